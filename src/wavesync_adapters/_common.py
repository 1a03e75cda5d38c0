"""What every adapter's agent and connector share that is no protocol decision and
needs no runtime: counters, the relay's tunnel info, reading a relay URL, the
address a server advertises, and how a failed attempt is described.

Plain ``socket`` at most; the asyncio and blocking adapters import this, so it must
never import anyio (or asyncio).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypeVar
from urllib.parse import urlsplit

from wavesync_proto.addresses import Endpoint
from wavesync_proto.race import PathKind
from wavesync_proto.tunnel import ProxyConfig, TunnelKind, TunnelMethod
from wavesync_proto.tunnel.proxy_env import proxy_from_environment
from wavesync_proto.udt.connection import UdtConnection
from wavesync_proto.udt.multiplexer import UdtMultiplexer

from .errors import UdtConnectError

__all__ = [
    "AUTO",
    "AgentCounters",
    "RelayTunnelInfo",
    "TunnelChoice",
    "advertised_endpoint",
    "describe_failure",
    "environment_proxy",
    "parse_target",
    "parse_tunnel_choice",
    "ready_wrappers",
]

AUTO: Literal["auto"] = "auto"
#: A tunnel method, or ``"auto"`` (probe every kind, keep the winner per location).
TunnelChoice = TunnelKind | Literal["auto"]


@dataclass
class AgentCounters:
    """What a server agent did, for logs and tests (the same on every adapter)."""

    accepted: dict[str, int] = field(default_factory=lambda: {k.value: 0 for k in PathKind})
    rejected: int = 0
    connect_requests: int = 0
    punches_refused: int = 0
    punches_evicted: int = 0
    rendezvous_failed: int = 0
    over_capacity: int = 0


@dataclass(frozen=True, kw_only=True)
class RelayTunnelInfo:
    """What the relay said about a tunnel it opened to us."""

    session_id: bytes
    #: The client's address as the relay saw it.
    client_address: Endpoint


def parse_target(target: str, *, tls: bool = False) -> tuple[str, int]:
    """``host:port``, ``http://host[:port]`` or ``https://host[:port]`` → (host, port);
    without a port, 443 for https or a TLS kind, else 80. ``ValueError`` otherwise."""
    text = target if "://" in target else f"//{target}"
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"bad target {target!r}: {exc}") from None
    if parts.scheme not in ("", "http", "https") or not parts.hostname:
        raise ValueError(f"bad target {target!r}: want [http[s]://]host[:port]")
    if port is None:
        port = 443 if tls or parts.scheme == "https" else 80
    return parts.hostname, port


def advertised_endpoint(bound: Endpoint, mediator: Endpoint | None) -> Endpoint:
    """``bound``, or with a wildcard host the address the route to ``mediator`` uses
    (loopback without one): what a server tells the mediator and LAN clients."""
    host, port = bound
    if not ipaddress.ip_address(host).is_unspecified:
        return bound
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    loopback = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    toward = mediator[0] if mediator else loopback
    try:
        # A connected UDP socket sends nothing: the kernel only picks the route.
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((toward, 9))
            return (str(probe.getsockname()[0]), port)
    except OSError:
        return (loopback, port)


def describe_failure(exc: BaseException) -> str:
    """A failed attempt's reason, as the race's failure report lists it."""
    if isinstance(exc, UdtConnectError):
        return f"udt: {exc}"
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return str(exc) or type(exc).__name__


def parse_tunnel_choice(text: str) -> TunnelChoice:
    """``auto``, a method (``getpost``) or ``ssl+<method>``; ``ValueError`` otherwise."""
    if text == AUTO:
        return AUTO
    tls, _, name = text.rpartition("+")
    if tls not in ("", "ssl"):
        raise ValueError(f"bad tunnel {text!r}: want auto, METHOD or ssl+METHOD")
    try:
        method = TunnelMethod(name)
    except ValueError:
        names = ", ".join(method.value for method in TunnelMethod)
        raise ValueError(f"bad tunnel method {name!r}: want one of {names}") from None
    return TunnelKind(method=method, tls=tls == "ssl")


def environment_proxy(
    target: str, *, tls: bool, environ: Mapping[str, str] | None = None
) -> ProxyConfig | None:
    """The proxy ``https_proxy``/``http_proxy``/``all_proxy``/``no_proxy`` name for ``target``."""
    host, port = parse_target(target, tls=tls)
    return proxy_from_environment(
        host, port, tls=tls, environ=os.environ if environ is None else environ
    )


class _Wrapper(Protocol):
    """What an adapter keeps per UDT connection: a stream, a transport, a bridge."""

    @property
    def connection(self) -> UdtConnection: ...


_W = TypeVar("_W", bound=_Wrapper)


def ready_wrappers(multiplexer: UdtMultiplexer, wrappers: Mapping[int, _W]) -> list[_W]:
    """The wrappers (by socket id) of the connections ``multiplexer`` names ready since
    the last call: what a driver turn pumps, O(active) rather than O(all). A socket id
    now naming another connection (the old one forgotten) is not the wrapper's."""
    ready = []
    for connection in multiplexer.ready_connections():
        wrapper = wrappers.get(connection.socket_id)
        if wrapper is not None and wrapper.connection is connection:
            ready.append(wrapper)
    return ready
