"""HTTP tunnels on anyio, the client's side: open one (``open_tunnel``) or probe for one.

Thin by design: the machines of ``wavesync_proto.tunnel`` speak every method
and ``TunnelProbe`` decides which to try and which wins; this module opens the
TCP connections (straight, or to the proxy), puts TLS under the ``ssl+`` kinds
(through ``CONNECT host:port`` when there is a proxy), bounds every wait, runs
the probe's echo through each finished tunnel, and turns failures into
``TunnelError``. The proxy comes from the caller, or from the environment by
``environment_proxy`` (the rules are ``wavesync_proto.tunnel.proxy_env``'s).
"""

from __future__ import annotations

import logging
import secrets
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import anyio
import anyio.abc
from anyio.streams.tls import TLSStream

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
from ._streams import PrefixedStream
from .tunnel_stream import TunnelStream

__all__ = [
    "ALL_KINDS",
    "TunnelError",
    "environment_proxy",
    "open_tunnel",
    "parse_target",
    "probe_tunnel",
]

log = logging.getLogger("wavesync.tunnel")


@dataclass(frozen=True, kw_only=True)
class _Route:
    kind: TunnelKind
    host: str
    port: int
    proxy: ProxyConfig | None
    ssl_context: ssl.SSLContext | None
    server_hostname: str | None
    timeout: float


async def open_tunnel(
    target: str,
    kind: TunnelKind,
    *,
    proxy: ProxyConfig | None = None,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    limits: TunnelLimits | None = None,
    timeout: float = 10.0,
) -> TunnelStream:
    """A tunnel of ``kind`` to the tunnel server at ``target``, through ``proxy`` if given.

    The ``ssl+`` kinds verify the server's certificate against ``ssl_context``
    (default: the system's CAs) and ``server_hostname`` (default: the target's
    host). ``connect`` needs a proxy. Everything up to the established tunnel
    (TCP connects, CONNECT, TLS, the method's handshake, getpost's first POST
    leg) must finish within ``timeout`` seconds. Raises ``TunnelError``.
    """
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
        with anyio.fail_after(timeout):
            machine = _machine(route, limits)
            stream = TunnelStream(
                machine,
                kind,
                legs={0: await _open_leg(route)},
                reads_leg_zero=True,
                open_leg=lambda: _open_leg(route),
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
            # Shielded: cancelled from outside, the close would raise that Cancelled.
            with anyio.CancelScope(shield=True):
                await anyio.aclose_forcefully(stream)
        if isinstance(exc, TimeoutError):
            raise TunnelError(kind, f"not established within {timeout:g} s") from None
        if isinstance(exc, anyio.EndOfStream):  # e.g. a TLS handshake the server hung up on
            raise TunnelError(kind, "the connection closed before the tunnel opened") from exc
        if isinstance(exc, OSError | anyio.BrokenResourceError | ssl.SSLError):
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


async def _open_leg(route: _Route) -> anyio.abc.ByteStream:
    """One TCP connection ready for the method's first request (TLS done when asked)."""
    where = (route.proxy.host, route.proxy.port) if route.proxy else (route.host, route.port)
    stream: anyio.abc.ByteStream = await anyio.connect_tcp(*where)
    try:
        if route.kind.tls:
            if route.proxy is not None:
                stream = await _connect_through(stream, route)
            stream = await TLSStream.wrap(
                stream,
                hostname=route.server_hostname,
                ssl_context=route.ssl_context,
                standard_compatible=False,
            )
    except BaseException:
        with anyio.CancelScope(shield=True):
            await anyio.aclose_forcefully(stream)
        raise
    return stream


async def _connect_through(stream: anyio.abc.ByteStream, route: _Route) -> anyio.abc.ByteStream:
    """``CONNECT host:port`` on ``stream`` (to the proxy); the raw stream behind it."""
    assert route.proxy is not None
    connect = ConnectClient(host=route.host, port=route.port, proxy=route.proxy)
    tunnel = TunnelStream(connect, route.kind, legs={0: stream}, reads_leg_zero=True)
    await tunnel.flush()
    while not tunnel.established and tunnel.failure is None:
        await tunnel.pump_leg_zero()
    if tunnel.failure is not None:
        failure = tunnel.failure
        raise TunnelError(route.kind, failure.reason, status=failure.status)
    # Bytes glued to the 200 would be the server's first TLS bytes: none come before ours.
    return PrefixedStream(stream, tunnel.take_buffered())


# --- the probe -----------------------------------------------------------------------------


@dataclass(eq=False)
class _Attempt:
    kind: TunnelKind
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    stream: TunnelStream | None = None


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
) -> tuple[TunnelStream, TunnelKind]:
    """The first tunnel to ``target`` that passes the echo (docs/tunnel.md §7.1), and its kind.

    Runs ``TunnelProbe``: attempts start as it says, each finished tunnel is
    validated end to end, the first valid one wins and the rest are cancelled;
    ``memory`` learns the winner and the failures, so the next probe for the
    same location (proxy + target) tries the winner first, alone. Without a
    proxy, ``connect`` kinds are left out. Raises ``TunnelError`` (kind and
    status None) with every kind's reason when none validates.
    """
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
        return await open_tunnel(
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
        self._attempts: dict[int, _Attempt] = {}
        self._wake = anyio.Event()
        self._outcome: ProbeChosen | ProbeFailed | None = None
        self._group: anyio.abc.TaskGroup | None = None

    async def run(self) -> tuple[TunnelStream, TunnelKind]:
        try:
            async with anyio.create_task_group() as group:
                self._group = group
                group.start_soon(self._timer)
                self._apply(self._probe.start(anyio.current_time()))
        except BaseException:
            # Cancelled from outside (or failed): nobody will take even the chosen
            # stream, so every attempt's connection closes here.
            await self._close_attempts(keep=None)
            raise
        result = self._outcome
        if isinstance(result, ProbeChosen):
            chosen = self._attempts[result.attempt_id].stream
            await self._close_attempts(keep=result.attempt_id)
            if chosen is not None:
                return chosen, result.kind
        await self._close_attempts(keep=None)
        raise TunnelError(None, f"no method works: {result}")

    async def _close_attempts(self, *, keep: int | None) -> None:
        # Shielded: cancelled from outside, the first close would raise that Cancelled
        # and leave the other attempts' streams (and the chosen one) to the collector.
        with anyio.CancelScope(shield=True):
            for attempt_id, record in self._attempts.items():
                if attempt_id != keep and record.stream is not None:
                    await anyio.aclose_forcefully(record.stream)

    async def _attempt(self, attempt_id: int, record: _Attempt) -> None:
        with record.scope:
            try:
                record.stream = await self._opener(record.kind)
                await _validate(record.stream)
            except TunnelError as exc:
                reason = exc.reason
            except (anyio.BrokenResourceError, RemoteProtocolError) as exc:
                reason = f"echo: {exc}"
            else:
                self._apply(self._probe.validated(attempt_id, anyio.current_time()))
                return
            self._apply(self._probe.failed(attempt_id, reason, anyio.current_time()))

    def _apply(self, actions: list[ProbeAction]) -> None:
        assert self._group is not None
        for action in actions:
            if isinstance(action, StartAttempt):
                record = self._attempts[action.attempt_id] = _Attempt(action.kind)
                self._group.start_soon(self._attempt, action.attempt_id, record)
                log.debug("probe: trying %s", action.kind)
            elif isinstance(action, CancelAttempt):
                self._attempts[action.attempt_id].scope.cancel()
            else:
                self._outcome = action
                self._group.cancel_scope.cancel()
        self._wake.set()

    async def _timer(self) -> None:
        while True:
            when = self._probe.get_timer()
            self._wake = anyio.Event()
            delay = None if when is None else max(0.0, when - anyio.current_time())
            with anyio.move_on_after(delay):
                await self._wake.wait()
                continue
            self._apply(self._probe.handle_timer(anyio.current_time()))


async def _validate(stream: TunnelStream) -> None:
    """Send the echo and read it back whole; what follows it stays in the stream."""
    check = EchoCheck(secrets.token_bytes(16))
    await stream.send(check.request)
    while True:
        try:
            data = await stream.receive()
        except anyio.EndOfStream:
            data = b""  # check.feed raises: the stream ended before the answer was whole
        if check.feed(data):
            break
    stream.push_front(check.rest)
