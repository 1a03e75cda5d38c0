"""HTTP tunnels on asyncio, the client's side: open one (``open_tunnel``) or probe for one.

The twin of ``wavesync_adapters.anyio.tunnel`` (uvloop too; no anyio import). Thin by
design: the machines of ``wavesync_proto.tunnel`` speak every method and
``TunnelProbe`` decides which to try and which wins; this module opens the TCP
connections (straight, or to the proxy), puts TLS under the ``ssl+`` kinds (through
``CONNECT host:port`` when there is a proxy), bounds every wait, runs the probe's echo
through each finished tunnel, and turns failures into ``TunnelError``. The proxy comes
from the caller, or from the environment by ``environment_proxy`` (the rules are
``wavesync_proto.tunnel.proxy_env``'s).

What the application gets is asyncio's own: a ``(StreamReader, StreamWriter)`` pair
over a ``TunnelTransport`` (``writer.get_extra_info("tunnel_kind")`` names the kind).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from wavesync_proto.errors import RemoteProtocolError
from wavesync_proto.tunnel import (
    ALL_KINDS,
    CancelAttempt,
    ConnectClient,
    GetPostClient,
    ProbeAction,
    ProbeChosen,
    ProbeFailed,
    ProxyConfig,
    RawEndpoint,
    StartAttempt,
    TunnelEndpoint,
    TunnelKind,
    TunnelLimits,
    TunnelLocation,
    TunnelMemory,
    TunnelMethod,
    TunnelProbe,
    UpgradeClient,
    WebSocketClient,
)
from wavesync_proto.tunnel.echo import EchoCheck
from wavesync_proto.tunnel.wire import authority

from .._common import environment_proxy, parse_target
from ..errors import TunnelError
from .tunnel_stream import Leg, TunnelStream, TunnelTransport

__all__ = [
    "ALL_KINDS",
    "DEFAULT_LIMIT",
    "TunnelError",
    "environment_proxy",
    "open_tunnel",
    "parse_target",
    "probe_tunnel",
]

log = logging.getLogger("wavesync.tunnel")

#: asyncio's own default for a StreamReader (``asyncio.streams._DEFAULT_LIMIT``).
DEFAULT_LIMIT = 64 * 1024


_P = TypeVar("_P", bound=asyncio.BaseProtocol)


def attach(stream: TunnelStream, protocol_factory: Callable[[], _P]) -> tuple[TunnelTransport, _P]:
    """``stream`` under a new protocol, as ``loop.create_connection`` would give it."""
    protocol = protocol_factory()
    return TunnelTransport(stream, protocol), protocol


def stream_pair(
    stream: TunnelStream, *, limit: int = DEFAULT_LIMIT
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """``stream`` as asyncio's stream pair (what ``asyncio.open_connection`` returns)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    transport, protocol = attach(stream, lambda: asyncio.StreamReaderProtocol(reader, loop=loop))
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


async def open_tunnel(
    target: str,
    kind: TunnelKind,
    *,
    proxy: ProxyConfig | None = None,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    limits: TunnelLimits | None = None,
    timeout: float = 10.0,
    limit: int = DEFAULT_LIMIT,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A tunnel of ``kind`` to the tunnel server at ``target``, through ``proxy`` if given,
    as a stream pair (``limit`` is the reader's, as in ``asyncio.open_connection``).

    The ``ssl+`` kinds verify the server's certificate against ``ssl_context``
    (default: the system's CAs) and ``server_hostname`` (default: the target's
    host). ``connect`` needs a proxy. Everything up to the established tunnel
    (TCP connects, CONNECT, TLS, the method's handshake, getpost's first POST
    leg) must finish within ``timeout`` seconds. Raises ``TunnelError``.
    """
    stream = await open_tunnel_stream(
        target,
        kind,
        proxy=proxy,
        ssl_context=ssl_context,
        server_hostname=server_hostname,
        limits=limits,
        timeout=timeout,
    )
    return stream_pair(stream, limit=limit)


@dataclass(frozen=True, kw_only=True)
class _Route:
    kind: TunnelKind
    host: str
    port: int
    proxy: ProxyConfig | None
    ssl_context: ssl.SSLContext | None
    server_hostname: str | None
    timeout: float


async def open_tunnel_stream(
    target: str,
    kind: TunnelKind,
    *,
    proxy: ProxyConfig | None = None,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    limits: TunnelLimits | None = None,
    timeout: float = 10.0,
) -> TunnelStream:
    """``open_tunnel``'s tunnel before it becomes a stream pair (``attach`` or
    ``stream_pair`` it)."""
    host, port = parse_target(target, tls=kind.tls)
    if kind.method is TunnelMethod.CONNECT and proxy is None:
        raise TunnelError(kind, "the connect method needs a proxy")
    context = ssl_context
    if kind.tls and context is None:
        context = ssl.create_default_context()
    route = _Route(
        kind=kind,
        host=host,
        port=port,
        proxy=proxy,
        ssl_context=context,
        server_hostname=server_hostname or host,
        timeout=timeout,
    )
    stream: TunnelStream | None = None
    try:
        async with asyncio.timeout(timeout):
            machine = _machine(route, limits)
            stream = TunnelStream(
                machine, kind, legs={0: await _open_leg(route)}, open_leg=lambda: _open_leg(route)
            )
            stream.absorb()  # a RawEndpoint (ssl+connect) is established from the start
            await stream.flush()
            while not stream.established and stream.failure is None:
                await stream.pump_leg_zero()
        if stream.failure is not None:
            failure = stream.failure
            raise TunnelError(kind, failure.reason, status=failure.status, headers=failure.headers)
    except BaseException as exc:
        if stream is not None:
            stream.abort()
        if isinstance(exc, TimeoutError):
            raise TunnelError(kind, f"not established within {timeout:g} s") from None
        if isinstance(exc, asyncio.IncompleteReadError):
            raise TunnelError(kind, "the connection closed before the tunnel opened") from exc
        if isinstance(exc, OSError):  # ssl.SSLError among them
            cause = f" ({exc.__cause__})" if exc.__cause__ is not None else ""
            raise TunnelError(kind, f"{type(exc).__name__}: {exc}{cause}") from exc
        raise
    return stream


def _machine(route: _Route, limits: TunnelLimits | None) -> TunnelEndpoint:
    method = route.kind.method
    # Inside TLS (through the proxy's CONNECT when there is one) requests go in origin form.
    proxy = None if route.kind.tls else route.proxy
    if method is TunnelMethod.CONNECT:
        if route.kind.tls:
            return RawEndpoint(limits=limits)  # CONNECT and TLS are done by _open_leg
        assert route.proxy is not None
        return ConnectClient(host=route.host, port=route.port, proxy=route.proxy, limits=limits)
    if method is TunnelMethod.UPGRADE:
        return UpgradeClient(host=route.host, port=route.port, proxy=proxy, limits=limits)
    if method is TunnelMethod.WEBSOCKET:
        return WebSocketClient(host=route.host, port=route.port, proxy=proxy, limits=limits)
    return GetPostClient(
        host=route.host,
        port=route.port,
        tunnel_id=secrets.token_bytes(16),
        proxy=proxy,
        limits=limits,
    )


async def _open_leg(route: _Route) -> Leg:
    """One TCP connection ready for the method's first request (TLS done when asked)."""
    if route.proxy is None:
        reader, writer = await asyncio.open_connection(
            route.host,
            route.port,
            ssl=route.ssl_context if route.kind.tls else None,
            server_hostname=route.server_hostname if route.kind.tls else None,
        )
        return Leg(reader, writer)
    reader, writer = await asyncio.open_connection(route.proxy.host, route.proxy.port)
    leg = Leg(reader, writer)
    try:
        if route.kind.tls:
            await _connect_through(leg, route)
            assert route.ssl_context is not None
            await writer.start_tls(route.ssl_context, server_hostname=route.server_hostname)
    except BaseException:
        writer.transport.abort()
        raise
    return leg


async def _connect_through(leg: Leg, route: _Route) -> None:
    """``CONNECT host:port`` on ``leg`` (to the proxy), left raw behind the proxy's 200."""
    assert route.proxy is not None
    connect = ConnectClient(host=route.host, port=route.port, proxy=route.proxy)
    tunnel = TunnelStream(connect, route.kind, legs={0: leg})
    await tunnel.flush()
    while not tunnel.established and tunnel.failure is None:
        await tunnel.pump_leg_zero()
    if tunnel.failure is not None:
        failure = tunnel.failure
        raise TunnelError(route.kind, failure.reason, status=failure.status)
    if tunnel.take_buffered():
        # The server speaks TLS only after our ClientHello: bytes before it are no TLS.
        raise TunnelError(route.kind, "the proxy sent bytes after its 200, before TLS")


# --- the probe -----------------------------------------------------------------------------


async def probe_tunnel(
    target: str,
    kinds: Sequence[TunnelKind] = ALL_KINDS,
    *,
    proxy: ProxyConfig | None,
    memory: TunnelMemory,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    stagger: float = 0.0,
    attempt_timeout: float = 10.0,
    deadline: float = 30.0,
    limit: int = DEFAULT_LIMIT,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, TunnelKind]:
    """The first tunnel to ``target`` that passes the echo (docs/tunnel.md §7.1), as a
    stream pair, and its kind.

    Runs ``TunnelProbe``: attempts start as it says, each finished tunnel is
    validated end to end, the first valid one wins and the rest are cancelled;
    ``memory`` learns the winner and the failures, so the next probe for the
    same location (proxy + target) tries the winner first, alone. Without a
    proxy, ``connect`` kinds are left out. Raises ``TunnelError`` (kind and
    status None) with every kind's reason when none validates.
    """
    stream, kind = await probe_tunnel_stream(
        target,
        kinds,
        proxy=proxy,
        memory=memory,
        ssl_context=ssl_context,
        server_hostname=server_hostname,
        stagger=stagger,
        attempt_timeout=attempt_timeout,
        deadline=deadline,
    )
    reader, writer = stream_pair(stream, limit=limit)
    return reader, writer, kind


async def probe_tunnel_stream(
    target: str,
    kinds: Sequence[TunnelKind] = ALL_KINDS,
    *,
    proxy: ProxyConfig | None,
    memory: TunnelMemory,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    stagger: float = 0.0,
    attempt_timeout: float = 10.0,
    deadline: float = 30.0,
) -> tuple[TunnelStream, TunnelKind]:
    """``probe_tunnel``'s winner before it becomes a stream pair."""
    if proxy is None:
        kinds = [kind for kind in kinds if kind.method is not TunnelMethod.CONNECT]
    host, port = parse_target(target)
    location = TunnelLocation(
        proxy=None if proxy is None else authority(proxy.host, proxy.port),
        target=authority(host, port),
    )
    probe = TunnelProbe(
        location=location,
        kinds=kinds,
        memory=memory,
        stagger=stagger,
        attempt_timeout=attempt_timeout,
        deadline=deadline,
    )

    async def opener(kind: TunnelKind) -> TunnelStream:
        return await open_tunnel_stream(
            target,
            kind,
            proxy=proxy,
            ssl_context=ssl_context,
            server_hostname=server_hostname,
            timeout=attempt_timeout,
        )

    stream, kind = await _ProbeRun(probe, opener).run()
    log.info("tunnel to %s via %s: %s", location.target, location.proxy, kind)
    return stream, kind


class _ProbeRun:
    """Carries out one probe's actions: a task per attempt, and its timer."""

    def __init__(
        self, probe: TunnelProbe, opener: Callable[[TunnelKind], Awaitable[TunnelStream]]
    ) -> None:
        self._probe = probe
        self._opener = opener
        self._loop = asyncio.get_running_loop()
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._streams: dict[int, TunnelStream] = {}
        self._wake = asyncio.Event()
        self._outcome: ProbeChosen | ProbeFailed | None = None

    async def run(self) -> tuple[TunnelStream, TunnelKind]:
        try:
            self._apply(self._probe.start(self._loop.time()))
            while self._outcome is None:
                self._wake.clear()
                try:
                    async with asyncio.timeout_at(self._probe.get_timer()):
                        await self._wake.wait()
                except TimeoutError:
                    self._apply(self._probe.handle_timer(self._loop.time()))
        except BaseException:
            # Cancelled from outside (or failed): nobody takes even the chosen stream.
            await self._end_attempts(keep=None)
            raise
        result = self._outcome
        keep = result.attempt_id if isinstance(result, ProbeChosen) else None
        await self._end_attempts(keep=keep)
        if isinstance(result, ProbeChosen) and result.attempt_id in self._streams:
            return self._streams[result.attempt_id], result.kind
        raise TunnelError(None, f"no method works: {result}")

    async def _end_attempts(self, *, keep: int | None) -> None:
        """Cancel every attempt, wait until each has ended, abort every stream but
        ``keep``'s; a cancel during the wait still aborts them all, then goes on."""
        tasks = [task for task in self._tasks.values() if not task.done()]
        for task in tasks:
            task.cancel()
        try:
            if tasks:
                await asyncio.wait(tasks)
        except BaseException:
            keep = None
            raise
        finally:
            for attempt_id, stream in self._streams.items():
                if attempt_id != keep:
                    stream.abort()

    async def _attempt(self, attempt_id: int, kind: TunnelKind) -> None:
        try:
            stream = self._streams[attempt_id] = await self._opener(kind)
            await _validate(stream)
        except TunnelError as exc:
            reason = exc.reason
        except (OSError, RemoteProtocolError) as exc:
            reason = f"echo: {exc}"
        else:
            self._apply(self._probe.validated(attempt_id, self._loop.time()))
            return
        self._apply(self._probe.failed(attempt_id, reason, self._loop.time()))

    def _apply(self, actions: list[ProbeAction]) -> None:
        for action in actions:
            if isinstance(action, StartAttempt):
                self._tasks[action.attempt_id] = asyncio.ensure_future(
                    self._attempt(action.attempt_id, action.kind)
                )
                log.debug("probe: trying %s", action.kind)
            elif isinstance(action, CancelAttempt):
                self._tasks[action.attempt_id].cancel()
            else:
                self._outcome = action
        self._wake.set()


async def _validate(stream: TunnelStream) -> None:
    """Send the echo and read it back whole; what follows it stays in the stream."""
    check = EchoCheck(secrets.token_bytes(16))
    await stream.send(check.request)
    while True:
        data = await stream.receive()  # b"": check.feed raises, the answer was not whole
        if check.feed(data):
            break
    stream.push_front(check.rest)
