"""HTTP tunnels on plain sockets, the client's side: open one (``open_tunnel``) or probe for one.

The twin of ``anyio/tunnel.py``, and as thin: the machines of ``wavesync_proto.tunnel``
speak every method and ``TunnelProbe`` decides which to try and which wins; this
module opens the TCP connections (straight, or to the proxy), puts TLS under the
``ssl+`` kinds (through ``CONNECT host:port`` when there is a proxy), bounds every
wait, runs the probe's echo through each finished tunnel, and turns failures into
``TunnelError``. A tunnel is handed out as a real ``socket.socket`` (one end of a
pair that ``TunnelPump``'s thread carries through the tunnel). The probe's attempts
run in one named thread each; the proxy comes from the caller, or from the
environment by ``environment_proxy``.
"""

from __future__ import annotations

import logging
import queue
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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
    TunnelEstablished,
    TunnelFailed,
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
from .tunnel_stream import TunnelPump

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


def open_tunnel(
    target: str,
    kind: TunnelKind,
    *,
    proxy: ProxyConfig | None = None,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    limits: TunnelLimits | None = None,
    timeout: float = 10.0,
) -> socket.socket:
    """A tunnel of ``kind`` to the tunnel server at ``target``, through ``proxy`` if given,
    as a connected blocking socket.

    The ``ssl+`` kinds verify the server's certificate against ``ssl_context``
    (default: the system's CAs) and ``server_hostname`` (default: the target's
    host). ``connect`` needs a proxy. Everything up to the established tunnel
    (TCP connects, CONNECT, TLS, the method's handshake, getpost's first POST
    leg) must finish within ``timeout`` seconds. Raises ``TunnelError``.
    """
    pump = _open_pump(
        target,
        kind,
        proxy=proxy,
        ssl_context=ssl_context,
        server_hostname=server_hostname,
        limits=limits,
        timeout=timeout,
    )
    return pump.start()


def _open_pump(
    target: str,
    kind: TunnelKind,
    *,
    proxy: ProxyConfig | None,
    ssl_context: ssl.SSLContext | None,
    server_hostname: str | None,
    limits: TunnelLimits | None,
    timeout: float,
    then: Callable[[TunnelPump, float], None] | None = None,
) -> TunnelPump:
    """An established tunnel, not started; ``then(pump, deadline)`` runs on it within the
    same deadline (the probe's echo)."""
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
    )
    deadline = time.monotonic() + timeout
    pump: TunnelPump | None = None
    try:
        pump = TunnelPump(
            _machine(route, limits),
            kind,
            legs={0: _open_leg(route, timeout)},
            open_leg=lambda leg_timeout: _open_leg(route, leg_timeout),
            leg_timeout=timeout,
        )
        pump.handshake(deadline)
        if pump.failure is not None:
            failure = pump.failure
            raise TunnelError(kind, failure.reason, status=failure.status, headers=failure.headers)
        if then is not None:
            then(pump, deadline)
    except BaseException as exc:
        if pump is not None:
            pump.close()
        if isinstance(exc, TimeoutError):
            raise TunnelError(kind, f"not established within {timeout:g} s") from None
        if isinstance(exc, OSError):
            cause = f" ({exc.__cause__})" if exc.__cause__ is not None else ""
            raise TunnelError(kind, f"{type(exc).__name__}: {exc}{cause}") from exc
        raise
    return pump


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


def _open_leg(route: _Route, timeout: float) -> socket.socket:
    """One TCP connection ready for the method's first request (TLS done when asked)."""
    deadline = time.monotonic() + timeout
    where = (route.proxy.host, route.proxy.port) if route.proxy else (route.host, route.port)
    sock = socket.create_connection(where, timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if route.kind.tls:
            assert route.ssl_context is not None
            if route.proxy is not None:
                _connect_through(sock, route, deadline)
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            sock = route.ssl_context.wrap_socket(sock, server_hostname=route.server_hostname)
    except BaseException:
        sock.close()
        raise
    return sock


def _connect_through(sock: socket.socket, route: _Route, deadline: float) -> None:
    """``CONNECT host:port`` on ``sock`` (to the proxy), reading no byte past the answer."""
    assert route.proxy is not None
    connect = ConnectClient(host=route.host, port=route.port, proxy=route.proxy)
    sock.settimeout(max(0.001, deadline - time.monotonic()))
    sock.sendall(connect.data_to_send(0))
    # One byte at a time: the server's first TLS bytes must stay in the socket. The
    # answer is a few hundred bytes, once per leg.
    while True:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        byte = sock.recv(1)
        connect.receive_data(byte, 0)
        while (event := connect.next_event()) is not None:
            if isinstance(event, TunnelFailed):
                raise TunnelError(route.kind, event.reason, status=event.status)
            if isinstance(event, TunnelEstablished):
                return
        if not byte:
            raise TunnelError(route.kind, "the proxy closed before answering CONNECT")


# --- the probe -----------------------------------------------------------------------------


def probe_tunnel(
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
) -> tuple[socket.socket, TunnelKind]:
    """The first tunnel to ``target`` that passes the echo (docs/tunnel.md §7.1), and its kind.

    Runs ``TunnelProbe``: attempts start as it says (a named thread each), each
    finished tunnel is validated end to end, the first valid one wins and the rest
    are closed; ``memory`` learns the winner and the failures, so the next probe for
    the same location (proxy + target) tries the winner first, alone. Without a
    proxy, ``connect`` kinds are left out. Raises ``TunnelError`` (kind and status
    None) with every kind's reason when none validates.
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

    def opener(kind: TunnelKind) -> TunnelPump:
        return _open_pump(
            target,
            kind,
            proxy=proxy,
            ssl_context=ssl_context,
            server_hostname=server_hostname,
            limits=None,
            timeout=attempt_timeout,
            then=_validate,
        )

    pump, kind = _ProbeRun(probe, opener).run()
    log.info("tunnel to %s via %s: %s", location.target, location.proxy, kind)
    return pump.start(), kind


#: What an attempt's thread reports: (attempt id, its validated pump or why it failed).
_Report = tuple[int, TunnelPump | str]


class _ProbeRun:
    """Carries out one probe's actions: a thread per attempt; the probe's timer here."""

    def __init__(self, probe: TunnelProbe, opener: Callable[[TunnelKind], TunnelPump]) -> None:
        self._probe = probe
        self._opener = opener
        self._reports: queue.Queue[_Report] = queue.Queue()
        self._threads: dict[int, threading.Thread] = {}
        self._pumps: dict[int, TunnelPump] = {}
        self._cancelled: set[int] = set()
        self._outcome: ProbeChosen | ProbeFailed | None = None
        self._over = False
        self._lock = threading.Lock()  # ``_over``, between the attempts and the drain

    def run(self) -> tuple[TunnelPump, TunnelKind]:
        try:
            self._apply(self._probe.start(time.monotonic()))
            while self._outcome is None:
                when = self._probe.get_timer()
                wait = None if when is None else max(0.0, when - time.monotonic())
                try:
                    attempt_id, result = self._reports.get(timeout=wait)
                except queue.Empty:
                    self._apply(self._probe.handle_timer(time.monotonic()))
                    continue
                self._settle(attempt_id, result)
        finally:
            outcome = self._outcome
            keep = outcome.attempt_id if isinstance(outcome, ProbeChosen) else None
            self._finish(keep)
        if isinstance(outcome, ProbeChosen):
            return self._pumps[outcome.attempt_id], outcome.kind
        raise TunnelError(None, f"no method works: {outcome}")

    def _settle(self, attempt_id: int, result: TunnelPump | str) -> None:
        now = time.monotonic()
        if isinstance(result, TunnelPump):
            self._pumps[attempt_id] = result
            if attempt_id in self._cancelled:
                result.close()
                return
            self._apply(self._probe.validated(attempt_id, now))
        elif attempt_id not in self._cancelled:
            self._apply(self._probe.failed(attempt_id, result, now))

    def _finish(self, keep: int | None) -> None:
        """Close every attempt's tunnel but ``keep``'s; attempts still opening close theirs
        when they report (their threads are bounded by ``attempt_timeout``)."""
        for attempt_id, pump in self._pumps.items():
            if attempt_id != keep:
                pump.close()
        for attempt_id, thread in self._threads.items():
            if thread.is_alive():
                self._cancelled.add(attempt_id)
        with self._lock:
            self._over = True  # reports that come later are closed by their own thread
        while True:
            try:
                attempt_id, result = self._reports.get_nowait()
            except queue.Empty:
                break
            if isinstance(result, TunnelPump) and attempt_id != keep:
                result.close()

    def _attempt(self, attempt_id: int, kind: TunnelKind) -> None:
        try:
            pump = self._opener(kind)
        except TunnelError as exc:
            self._reports.put((attempt_id, exc.reason))
        except (OSError, RemoteProtocolError, ValueError) as exc:
            self._reports.put((attempt_id, f"echo: {exc}"))
        else:
            with self._lock:
                if not self._over:
                    self._reports.put((attempt_id, pump))
                    return
            pump.close()  # the probe is over: nobody will take this one

    def _apply(self, actions: list[ProbeAction]) -> None:
        for action in actions:
            if isinstance(action, StartAttempt):
                thread = threading.Thread(
                    target=self._attempt,
                    args=(action.attempt_id, action.kind),
                    name=f"wavesync-probe-{action.kind}",
                    # Not a daemon: a thread still inside OpenSSL while the interpreter
                    # finalizes can crash it (a SIGSEGV after `wavesync tunnel-probe`
                    # printed its answer). Exit waits for it, bounded by attempt_timeout.
                    daemon=False,
                )
                self._threads[action.attempt_id] = thread
                thread.start()
                log.debug("probe: trying %s", action.kind)
            elif isinstance(action, CancelAttempt):
                self._cancelled.add(action.attempt_id)
                pump = self._pumps.get(action.attempt_id)
                if pump is not None:
                    pump.close()
            else:
                self._outcome = action


def _validate(pump: TunnelPump, deadline: float) -> None:
    """Send the echo and read it back whole; what follows it stays in the stream."""
    check = EchoCheck(secrets.token_bytes(16))
    pump.exchange(check.request, deadline)
    while True:
        data = pump.receive_blocking(deadline)
        if check.feed(data):  # raises RemoteProtocolError on a wrong or short answer
            break
    pump.push_front(check.rest)
