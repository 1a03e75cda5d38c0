"""How a session reaches a service: a plain TCP connect, or an HTTP tunnel (named or probed).

The twin of ``anyio/_dial.py``. Every session that must reach the mediator or the
relay (the server's listen session and standby pool, the client's TCP connect copy
and relay session) opens its connection through a ``Dialer``, so each can run over
any tunnel method (docs/tunnel.md §8). The tunnel's choice stays the probe's
(``TunnelProbe`` through ``probe_tunnel``); this module only picks between a TCP
connect, ``open_tunnel`` and ``probe_tunnel``. Whichever it is, the caller gets a
connected blocking ``socket.socket``.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from wavesync_proto.addresses import Endpoint, format_endpoint
from wavesync_proto.tunnel import (
    ALL_KINDS,
    ProxyConfig,
    TunnelKind,
    TunnelLocation,
    TunnelMemory,
)

from .._common import AUTO, TunnelChoice, parse_tunnel_choice
from .tunnel import TunnelError, open_tunnel, probe_tunnel

__all__ = [
    "AUTO",
    "Dialer",
    "SharedTunnelMemory",
    "TunnelChoice",
    "dialer_for",
    "parse_tunnel_choice",
]


class SharedTunnelMemory(TunnelMemory):
    """A ``TunnelMemory`` that threads share: each probe (the listen session's, every
    standby's, a connector's mediator and relay attempts) runs in its own thread and
    reads and writes the one memory; a lock makes each of its calls whole."""

    def __init__(self, *, capacity: int = 1024, demotion: float = 600.0) -> None:
        super().__init__(capacity=capacity, demotion=demotion)
        self._lock = threading.RLock()

    def __len__(self) -> int:
        with self._lock:
            return super().__len__()

    def winner(self, location: TunnelLocation) -> TunnelKind | None:
        with self._lock:
            return super().winner(location)

    def demoted(self, location: TunnelLocation, now: float) -> dict[TunnelKind, str]:
        with self._lock:
            return super().demoted(location, now)

    def record_validated(self, location: TunnelLocation, kind: TunnelKind) -> None:
        with self._lock:
            super().record_validated(location, kind)

    def record_failed(
        self, location: TunnelLocation, kind: TunnelKind, reason: str, now: float
    ) -> None:
        with self._lock:
            super().record_failed(location, kind, reason, now)


@dataclass(kw_only=True)
class Dialer:
    """Opens connections to one service: TCP to ``endpoint``, or a tunnel to ``target``.

    ``tunnel`` None means plain TCP. ``target`` is the service's tunnel face
    (``host:port`` or ``http[s]://host[:port]``). ``memory`` keeps the probe's
    winner between connections, so a reconnect goes straight to what worked.
    """

    endpoint: Endpoint
    tunnel: TunnelChoice | None = None
    target: str | None = None
    proxy: ProxyConfig | None = None
    ssl_context: ssl.SSLContext | None = None
    kinds: Sequence[TunnelKind] = ALL_KINDS
    memory: TunnelMemory = field(default_factory=SharedTunnelMemory)
    #: The kind of the last tunnel opened (None: plain TCP, or none yet).
    last_kind: TunnelKind | None = None

    @property
    def tunnel_target(self) -> str:
        return self.target or format_endpoint(self.endpoint)

    def describe(self) -> str:
        if self.tunnel is None:
            return format_endpoint(self.endpoint)
        via = f" via proxy {self.proxy.host}:{self.proxy.port}" if self.proxy else ""
        return f"{self.tunnel_target} ({self.tunnel} tunnel{via})"

    def open(self, timeout: float) -> socket.socket:
        """A connected socket to the service within ``timeout`` s (a plain TCP one keeps
        ``timeout`` as its socket timeout, a tunnel's has none); ``OSError`` when there is
        none (a ``TunnelError`` is re-raised as ``ConnectionError`` with its reason)."""
        if self.tunnel is None:
            return socket.create_connection(self.endpoint, timeout=timeout)
        try:
            if self.tunnel == AUTO:
                sock, kind = probe_tunnel(
                    self.tunnel_target,
                    self.kinds,
                    proxy=self.proxy,
                    memory=self.memory,
                    ssl_context=self.ssl_context,
                    attempt_timeout=timeout,
                    deadline=3 * timeout,
                )
                self.last_kind = kind
                return sock
            assert isinstance(self.tunnel, TunnelKind)
            sock = open_tunnel(
                self.tunnel_target,
                self.tunnel,
                proxy=self.proxy,
                ssl_context=self.ssl_context,
                timeout=timeout,
            )
            self.last_kind = self.tunnel
            return sock
        except TunnelError as exc:
            raise ConnectionError(str(exc)) from exc


def dialer_for(
    endpoint: Endpoint,
    *,
    tunnel: TunnelChoice | None,
    target: str | None,
    proxy: ProxyConfig | None,
    ssl_context: ssl.SSLContext | None,
    memory: TunnelMemory | None = None,
) -> Dialer:
    """A ``Dialer``; ``memory`` shares the probe's memory between sessions (the same
    proxy and target are the same location)."""
    return Dialer(
        endpoint=endpoint,
        tunnel=tunnel,
        target=target,
        proxy=proxy,
        ssl_context=ssl_context,
        memory=memory if memory is not None else SharedTunnelMemory(),
    )
