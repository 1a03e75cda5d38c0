"""How a session reaches a service on asyncio: a plain TCP connect, or an HTTP tunnel.

The twin of ``wavesync_adapters.anyio._dial`` (no anyio import). Every session that
must reach the mediator or the relay (the server's listen session and standby pool,
the client's TCP connect copy and relay session) opens its connection through a
``Dialer``, so each can run over any tunnel method (docs/tunnel.md §8). The tunnel's
choice stays the probe's (``TunnelProbe`` through ``probe_tunnel``); this module only
picks between a TCP connect, ``open_tunnel`` and ``probe_tunnel``, and gives the
result as asyncio gives a TCP connection: a ``(StreamReader, StreamWriter)`` pair
(``open``) or a transport under the caller's protocol (``connect``).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from wavesync_proto.addresses import Endpoint, format_endpoint
from wavesync_proto.tunnel import ProxyConfig, TunnelKind, TunnelMemory

from .._common import AUTO, TunnelChoice, parse_tunnel_choice
from .tunnel import (
    ALL_KINDS,
    DEFAULT_LIMIT,
    TunnelError,
    attach,
    open_tunnel_stream,
    probe_tunnel_stream,
)
from .tunnel_stream import TunnelStream

__all__ = ["AUTO", "Dialer", "TunnelChoice", "dialer_for", "parse_tunnel_choice"]

_P = TypeVar("_P", bound=asyncio.BaseProtocol)


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
    memory: TunnelMemory = field(default_factory=TunnelMemory)
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

    async def open(
        self, timeout: float, *, limit: int = DEFAULT_LIMIT
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection to the service within ``timeout`` s, as ``asyncio.open_connection``
        gives one; ``OSError`` when there is none (``TimeoutError`` after ``timeout``; a
        ``TunnelError`` is re-raised as ``ConnectionError`` with its reason)."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        transport, protocol = await self.connect(
            lambda: asyncio.StreamReaderProtocol(reader, loop=loop), timeout
        )
        return reader, asyncio.StreamWriter(transport, protocol, reader, loop)

    async def connect(
        self, protocol_factory: Callable[[], _P], timeout: float
    ) -> tuple[asyncio.Transport, _P]:
        """``loop.create_connection`` to the service (or through its tunnel) within
        ``timeout`` s; ``OSError`` as ``open``."""
        if self.tunnel is None:
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(timeout):
                transport, protocol = await loop.create_connection(protocol_factory, *self.endpoint)
            return transport, protocol
        return attach(await self._open_tunnel(timeout), protocol_factory)

    async def _open_tunnel(self, timeout: float) -> TunnelStream:
        try:
            if self.tunnel == AUTO:
                stream, kind = await probe_tunnel_stream(
                    self.tunnel_target,
                    self.kinds,
                    proxy=self.proxy,
                    memory=self.memory,
                    ssl_context=self.ssl_context,
                    attempt_timeout=timeout,
                    deadline=3 * timeout,
                )
                self.last_kind = kind
                return stream
            assert isinstance(self.tunnel, TunnelKind)
            stream = await open_tunnel_stream(
                self.tunnel_target,
                self.tunnel,
                proxy=self.proxy,
                ssl_context=self.ssl_context,
                timeout=timeout,
            )
            self.last_kind = self.tunnel
            return stream
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
        memory=memory if memory is not None else TunnelMemory(),
    )
