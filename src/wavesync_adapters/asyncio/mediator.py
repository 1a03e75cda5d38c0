"""The mediator daemon on plain asyncio: STUN over UDP and TCP on one port, driven by
``MediatorService``.

The twin of ``wavesync_adapters.anyio.mediator`` (same class, arguments, log lines
and counters), on public asyncio APIs only, so it runs on uvloop and imports
nothing of anyio. Thin by design: it moves datagrams, TCP bytes and time between
the operating system and the service and carries out the service's actions; it
makes no protocol decision (who is online, what to answer, when to give up).

Nothing here is a task per peer: the UDP socket is read from an ``add_reader``
callback, each TCP peer is an ``asyncio.Protocol`` whose ``data_received`` feeds the
service, and the service's timer is a ``call_later`` handle.

With ``http``, the daemon serves an HTTP face too (``TunnelServer``): every tunnel
of any method carries one session, which reaches the service as a TCP peer (the
same ``_TcpPeer``, on the tunnel's socket pair end), so the service cannot tell
them apart.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import socket
import ssl
import time
from collections.abc import Callable, Hashable
from typing import Any, cast

from wavesync_proto.addresses import Endpoint, format_endpoint
from wavesync_proto.errors import LocalProtocolError
from wavesync_proto.mediator.service import (
    Action,
    CloseTcp,
    MediatorService,
    SendDatagram,
    SendTcp,
)

from .tunnel_server import TunnelServer, TunnelSocket

__all__ = ["MediatorDaemon"]

log = logging.getLogger("wavesync.mediator")

# Bytes queued for one TCP peer before it counts as too slow and is dropped: about
# the anyio twin's 1,024 queued answers of a few hundred bytes each.
_OUTBOX_BYTES = 256 * 1024
# How long a closing peer may take to drain what was queued for it (an error answer).
_DRAIN_SECONDS = 5.0
_RECEIVE_BYTES = 65536
_UDP_BIND_ATTEMPTS = 20
# Datagrams handled per wake-up before other callbacks get their turn.
_RECEIVE_BATCH = 64
_LISTEN_BACKLOG = 4096


class ServiceTimer:
    """Runs a sans-I/O service's ``handle_timer`` when its ``get_timer`` says, with one
    ``call_later`` handle.

    The daemon calls ``changed()`` after every input it feeds the service; the handle
    is moved only when the service now wants it sooner than planned, so a busy daemon
    does not pay a reschedule per input (a late deadline fires early, finds nothing
    due, and the timer is set again). An exception from the service ends ``serve``:
    it is handed to ``failed``, which the daemon awaits.
    """

    def __init__(
        self,
        get_timer: Callable[[], float | None],
        handle_timer: Callable[[float], None],
    ) -> None:
        self._get_timer = get_timer
        self._handle_timer = handle_timer
        self._clock: Callable[[], float] = time.monotonic
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._planned = math.inf
        #: Set to the first exception the service raised from a timer.
        self.failed: asyncio.Future[None] | None = None

    def start(self, loop: asyncio.AbstractEventLoop, clock: Callable[[], float]) -> None:
        """Keep the service's deadlines on ``loop`` from now, reading ``clock``."""
        self._loop = loop
        self._clock = clock
        self.failed = loop.create_future()
        self.changed()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = None
        self._loop = None
        self._planned = math.inf

    def changed(self) -> None:
        """The service's deadline may have moved earlier: move the handle if so."""
        if self._loop is None:
            return
        deadline = self._get_timer()
        if deadline is None or deadline >= self._planned:
            return
        if self._handle is not None:
            self._handle.cancel()
        self._planned = deadline
        self._handle = self._loop.call_later(max(0.0, deadline - self._clock()), self._fire)

    def _fire(self) -> None:
        self._handle = None
        self._planned = math.inf
        try:
            self._handle_timer(self._clock())
        except Exception as exc:  # handed to serve(), which raises it
            if self.failed is not None and not self.failed.done():
                self.failed.set_exception(exc)
            return
        self.changed()


class _TcpPeer(asyncio.Protocol):
    """One TCP peer: its bytes go to the service, the service's answers to its transport."""

    def __init__(self, daemon: MediatorDaemon, tunnel: TunnelSocket | None = None) -> None:
        """``tunnel``: the peer is a tunnel's socket pair end; its remote address is that
        of the connection that carries the tunnel."""
        self._daemon = daemon
        self._tunnel = tunnel
        remote = None if tunnel is None else tunnel.remote
        self.handle = next(daemon._peer_ids)
        self.transport: asyncio.Transport | None = None
        self._given_remote = remote
        self.remote: Endpoint = remote or ("0.0.0.0", 0)  # noqa: S104 - an address to report
        self.closed_by_service = False
        #: Dropped by this daemon (too slow a reader): what it still sends is not read.
        self.dropped = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they have its methods.
        self.transport = cast(asyncio.Transport, transport)
        address = transport.get_extra_info("peername")
        if self._given_remote is None and isinstance(address, tuple):
            self.remote = (str(address[0]), int(address[1]))
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        daemon = self._daemon
        daemon._peers[self.handle] = self
        log.debug("tcp peer %d from %s", self.handle, format_endpoint(self.remote))
        daemon._apply(daemon.service.tcp_connected(self.handle, self.remote, daemon._clock()))

    def data_received(self, data: bytes) -> None:
        if self.closed_by_service or self.dropped:
            return  # closing: what it still sends is not read
        daemon = self._daemon
        daemon._apply(daemon.service.tcp_data_received(self.handle, data, daemon._clock()))

    def eof_received(self) -> bool:
        return False  # the peer is done sending: close (answers queued before still go)

    def connection_lost(self, exc: Exception | None) -> None:
        daemon = self._daemon
        daemon._peers.pop(self.handle, None)
        if not self.closed_by_service and daemon._serving:
            daemon._apply(daemon.service.tcp_closed(self.handle, daemon._clock()))
        log.debug("tcp peer %d closed", self.handle)
        if self._tunnel is not None:
            self._tunnel.closed()

    def send(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(data)
        if transport.get_write_buffer_size() > _OUTBOX_BYTES:
            log.info("dropping %s: it reads slower than we answer", format_endpoint(self.remote))
            # Unlike a CloseTcp, the service did not ask for this: connection_lost
            # tells it the peer is gone.
            self.dropped = True
            transport.abort()

    def close_after_drain(self, loop: asyncio.AbstractEventLoop) -> None:
        """Close once what is queued is written, or at ``_DRAIN_SECONDS`` regardless."""
        self.closed_by_service = True
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.close()
        loop.call_later(_DRAIN_SECONDS, transport.abort)


class MediatorDaemon:
    """Runs a ``MediatorService`` on a UDP socket and a TCP listener sharing one port."""

    def __init__(
        self,
        service: MediatorService,
        *,
        clock: Callable[[], float] | None = None,
        http: Endpoint | None = None,
        http_ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """``clock``: seconds, monotonic (default: the running loop's ``time``).
        ``http``: where the HTTP face listens. Each tunnel of any method
        (docs/tunnel.md) carries one session, served as a TCP peer; with
        ``http_ssl_context`` every connection there is TLS (the ``ssl+`` kinds)."""
        self.service = service
        self._http = http
        #: The HTTP face: every tunnel it opens is a TCP session of the service.
        self.tunnels = TunnelServer(on_socket=self._tunnel_opened, ssl_context=http_ssl_context)
        self.http_bound: Endpoint | None = None
        self._tunnel_peers: set[asyncio.Task[Any]] = set()
        self._given_clock = clock
        self._clock: Callable[[], float] = clock or _unset_clock
        self._peers: dict[Hashable, _TcpPeer] = {}
        self._peer_ids = itertools.count(1)
        self._udp: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._serving = False
        #: Datagrams dropped because the socket's send buffer was full.
        self.udp_send_drops = 0
        self._timer = ServiceTimer(
            service.get_timer,
            lambda now: self._apply(service.handle_timer(now)),
        )
        self.bound: Endpoint | None = None

    async def serve(
        self,
        host: str,
        port: int,
        *,
        started: Callable[[Endpoint], None] | None = None,
    ) -> None:
        """Bind ``host:port`` (UDP and TCP) and serve until cancelled; with ``http``
        (given to the constructor), the HTTP tunnel face too (``http_bound``).

        ``started(bound)`` is called once every socket is bound; an address that cannot
        be bound raises ``OSError`` before it.
        """
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._clock = self._given_clock or loop.time
        listener, udp = await self._bind(loop, host, port)
        self._udp = udp
        server: asyncio.Server | None = None
        try:
            server = await loop.create_server(lambda: _TcpPeer(self), sock=listener)
            if self._http is not None:
                self.http_bound = await self.tunnels.listen(*self._http)
            self._serving = True
            loop.add_reader(udp.fileno(), self._receive_datagrams, udp)
            self._timer.start(loop, self._clock)
            assert self.bound is not None
            assert self._timer.failed is not None
            log.info("mediator on udp+tcp %s", format_endpoint(self.bound))
            if started is not None:
                started(self.bound)
            await self._timer.failed  # runs until cancelled, or until the service raises
        finally:
            self._serving = False
            self.tunnels.close()
            for task in list(self._tunnel_peers):
                task.cancel()
            self._timer.stop()
            loop.remove_reader(udp.fileno())
            self._udp = None
            udp.close()
            if server is None:
                listener.close()
            else:
                server.close()
            for peer in list(self._peers.values()):
                if peer.transport is not None:
                    peer.transport.abort()
            self._peers.clear()

    async def _bind(
        self, loop: asyncio.AbstractEventLoop, host: str, port: int
    ) -> tuple[socket.socket, socket.socket]:
        # UDP and TCP must share the port number: clients are told one address.
        # With port 0, take the TCP port the kernel picked and claim it for UDP,
        # retrying if another process holds that UDP port.
        for _ in range(_UDP_BIND_ATTEMPTS if port == 0 else 1):
            listener = await _open_socket(loop, host, port, socket.SOCK_STREAM)
            bound_port = int(listener.getsockname()[1])
            try:
                udp = await _open_socket(loop, host, bound_port, socket.SOCK_DGRAM)
            except OSError:
                listener.close()
                if port != 0:
                    raise
                continue
            local = udp.getsockname()
            self.bound = (str(local[0]), int(local[1]))
            return listener, udp
        raise OSError(
            f"no port free for both UDP and TCP on {host} after {_UDP_BIND_ATTEMPTS} tries"
        )

    def _tunnel_opened(self, tunnel: TunnelSocket) -> None:
        """A tunnel from the HTTP face: its socket pair end becomes a TCP peer."""
        assert self._loop is not None
        task = self._loop.create_task(self._serve_tunnel(tunnel))
        self._tunnel_peers.add(task)
        task.add_done_callback(self._tunnel_peers.discard)

    async def _serve_tunnel(self, tunnel: TunnelSocket) -> None:
        assert self._loop is not None
        try:
            await self._loop.connect_accepted_socket(
                lambda: _TcpPeer(self, tunnel), sock=tunnel.sock
            )
        except BaseException:
            tunnel.sock.close()
            tunnel.closed()
            raise

    # --- carrying out the service's decisions ---------------------------------------------

    def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, SendTcp):
                peer = self._peers.get(action.peer)
                if peer is not None and not peer.closed_by_service and not peer.dropped:
                    peer.send(action.data)
            elif isinstance(action, CloseTcp):
                peer = self._peers.get(action.peer)
                if peer is not None and self._loop is not None:
                    log.debug("closing %s: %s", format_endpoint(peer.remote), action.reason)
                    peer.close_after_drain(self._loop)
            elif isinstance(action, SendDatagram):
                self._send_datagram(action.address, action.data)
        self._timer.changed()

    def _send_datagram(self, address: Endpoint, data: bytes) -> None:
        udp = self._udp
        if udp is None:
            return
        try:
            # Straight to the non-blocking socket: one syscall and no task switch.
            udp.sendto(data, address)
        except BlockingIOError:
            # The kernel's send buffer is full: UDP may lose this; the peer retransmits.
            self.udp_send_drops += 1
        except OSError as exc:
            log.debug("could not send to %s: %s", format_endpoint(address), exc)

    # --- inputs -----------------------------------------------------------------------------

    def _receive_datagrams(self, udp: socket.socket) -> None:
        service, clock = self.service, self._clock
        # Drain what is queued in one wake-up: under load, one event-loop round trip
        # per datagram costs more than the service's own work.
        for _ in range(_RECEIVE_BATCH):
            try:
                data, source = udp.recvfrom(_RECEIVE_BYTES)
            except BlockingIOError:
                return
            except OSError as exc:
                # ICMP errors for earlier answers surface here on some systems.
                log.debug("udp receive error: %s", exc)
                continue
            endpoint = (str(source[0]), int(source[1]))
            self._apply(service.datagram_received(data, endpoint, clock()))


def _unset_clock() -> float:
    raise LocalProtocolError("the daemon's clock is read before serve() started")


async def _open_socket(
    loop: asyncio.AbstractEventLoop, host: str, port: int, kind: socket.SocketKind
) -> socket.socket:
    """A non-blocking socket bound to ``host:port`` (the first address ``host`` names);
    a stream socket is listening."""
    infos: list[tuple[Any, ...]] = await loop.getaddrinfo(
        host, port, type=kind, flags=socket.AI_PASSIVE
    )
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, kind)
    try:
        sock.setblocking(False)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        if kind == socket.SOCK_STREAM:
            sock.listen(_LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock
