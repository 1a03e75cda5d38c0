"""The mediator daemon on plain sockets: STUN over UDP and TCP on one port, driven by
``MediatorService``, in one selector thread.

Thin by design, the twin of ``wavesync_adapters.anyio.mediator``: this module
moves datagrams, TCP bytes and time between the operating system and the
service, and carries out the service's actions. It makes no protocol decision
(who is online, what to answer, when to give up). One thread runs everything
(``SelectorLoop``), so the service is never entered from two threads and
thousands of TCP peers cost no thread each. The HTTP tunnel face (``http``)
runs in the same loop (``TunnelServer``): every tunnel reaches the service as a
TCP peer, through one end of a socket pair.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from wavesync_proto.addresses import Endpoint, format_endpoint
from wavesync_proto.errors import LocalProtocolError
from wavesync_proto.mediator.service import (
    Action,
    CloseTcp,
    MediatorService,
    SendDatagram,
    SendTcp,
)

from ._loop import EVENT_READ, EVENT_WRITE, Deadlines, SelectorLoop, earliest
from .tunnel_server import TunnelServer

__all__ = ["MediatorDaemon"]

log = logging.getLogger("wavesync.mediator")

# Outgoing messages queued per TCP peer before the peer counts as too slow and is dropped.
_OUTBOX_MESSAGES = 1024
# How long a closing peer may take to drain what was queued for it (an error answer).
_DRAIN_SECONDS = 5.0
_RECEIVE_BYTES = 65536
_UDP_BIND_ATTEMPTS = 20
# Datagrams (and connections) handled per wake-up before other sockets get their turn.
_RECEIVE_BATCH = 64
_LISTEN_BACKLOG = 4096


@dataclass(eq=False)
class _Peer:
    handle: int
    sock: socket.socket
    remote: Endpoint
    #: What the service asked us to write and the socket has not taken yet.
    outbox: collections.deque[memoryview] = field(default_factory=collections.deque)
    closed_by_service: bool = False
    #: Set once the service closed it: write what is queued, then close.
    closing: bool = False
    gone: bool = False
    #: The loop's callback for this peer's socket (one object, so re-watching is cheap).
    ready: Callable[[int], None] = field(default=lambda mask: None)


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
        """``clock``: the service's clock (default ``time.monotonic``). ``http``: where the
        HTTP face listens. Each tunnel of any method (docs/tunnel.md) carries one session,
        served as a TCP peer; with ``http_ssl_context`` every connection there is TLS (the
        ``ssl+`` kinds)."""
        self.service = service
        self._http = http
        self._clock = clock or time.monotonic
        self._loop = SelectorLoop(clock=self._clock)
        #: The HTTP face: every tunnel it opens is a TCP session of the service.
        self.tunnels = TunnelServer(self._loop, self._add_peer, ssl_context=http_ssl_context)
        self._peers: dict[Hashable, _Peer] = {}
        self._peer_ids = itertools.count(1)
        #: Closing peers still writing their last answer, by handle.
        self._drains = Deadlines()
        self._udp: socket.socket | None = None
        self._serving = threading.Lock()
        #: Datagrams dropped because the socket's send buffer was full.
        self.udp_send_drops = 0
        self.bound: Endpoint | None = None
        self.http_bound: Endpoint | None = None

    def serve_forever(
        self,
        host: str,
        port: int,
        *,
        started: Callable[[Endpoint], None] | None = None,
    ) -> None:
        """Bind ``host:port`` (UDP and TCP) and, with ``http`` (given to the constructor),
        the HTTP tunnel face (``http_bound``); call ``started(bound)``, and serve in this
        thread until ``shutdown()``; then close every socket (tunnels too). Raises
        ``OSError`` when a port cannot be bound. A daemon serves once."""
        if not self._serving.acquire(blocking=False):
            raise LocalProtocolError("MediatorDaemon.serve_forever runs once")
        loop = self._loop
        try:
            listener, udp = self._bind(host, port)
            self._udp = udp
            with listener, udp, contextlib.closing(self.tunnels):
                if self._http is not None:
                    self.http_bound = self.tunnels.listen(*self._http)
                loop.watch(listener, EVENT_READ, lambda _: self._accept(listener))
                loop.watch(udp, EVENT_READ, lambda _: self._receive_datagrams(udp))
                assert self.bound is not None
                log.info("mediator on udp+tcp %s", format_endpoint(self.bound))
                if started is not None:
                    started(self.bound)
                try:
                    loop.run(self._next_deadline, self._on_deadline)
                finally:
                    for peer in list(self._peers.values()):
                        self._close_peer(peer)
                    self._udp = None
        finally:
            loop.close()

    def shutdown(self) -> None:
        """Make ``serve_forever`` return (from any thread; returns at once). Before
        ``serve_forever`` has started, it makes it return as soon as it is bound."""
        self._loop.stop()

    def _bind(self, host: str, port: int) -> tuple[socket.socket, socket.socket]:
        # UDP and TCP must share the port number: clients are told one address.
        # With port 0, take the TCP port the kernel picked and claim it for UDP,
        # retrying if another process holds that UDP port.
        for _ in range(_UDP_BIND_ATTEMPTS if port == 0 else 1):
            listener = _open(host, port, socket.SOCK_STREAM)
            bound_port = int(listener.getsockname()[1])
            try:
                udp = _open(host, bound_port, socket.SOCK_DGRAM)
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

    # --- time --------------------------------------------------------------------------------

    def _next_deadline(self) -> float | None:
        return earliest(self.service.get_timer(), self._drains.next(), self.tunnels.next_deadline())

    def _on_deadline(self, now: float) -> None:
        for handle in self._drains.pop_due(now):
            peer = self._peers.get(handle)
            if peer is not None and peer.closing:
                self._close_peer(peer)  # it would not read its last answer in time
        timer = self.service.get_timer()
        if timer is not None and timer <= now:
            self._apply(self.service.handle_timer(now))
        tunnels = self.tunnels.next_deadline()
        if tunnels is not None and tunnels <= now:
            self.tunnels.on_deadline(now)

    # --- carrying out the service's decisions ---------------------------------------------

    def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, SendTcp):
                peer = self._peers.get(action.peer)
                if peer is not None and not peer.closing:
                    self._send_tcp(peer, action.data)
            elif isinstance(action, CloseTcp):
                peer = self._peers.get(action.peer)
                if peer is not None:
                    log.debug("closing %s: %s", format_endpoint(peer.remote), action.reason)
                    peer.closed_by_service = peer.closing = True
                    if peer.outbox:
                        # Write what is queued (an error answer), then close.
                        self._loop.watch(peer.sock, EVENT_WRITE, peer.ready)
                        self._drains.add(self._clock() + _DRAIN_SECONDS, peer.handle)
                    else:
                        self._close_peer(peer)
            elif isinstance(action, SendDatagram):
                self._send_datagram(action.address, action.data)

    def _send_tcp(self, peer: _Peer, data: bytes) -> None:
        if peer.outbox:
            if len(peer.outbox) >= _OUTBOX_MESSAGES:
                log.info(
                    "dropping %s: it reads slower than we answer", format_endpoint(peer.remote)
                )
                # Unlike a CloseTcp, the service did not ask for this: _close_peer tells
                # it the peer is gone, so what was registered over it is no longer offered.
                self._close_peer(peer)
                return
            peer.outbox.append(memoryview(data))
            return
        # Nothing queued: straight to the socket, which takes a mediator's answer whole.
        try:
            sent = peer.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            return  # the read side sees the error and reports the loss
        if sent < len(data):
            peer.outbox.append(memoryview(data)[sent:])
            self._loop.watch(peer.sock, EVENT_READ | EVENT_WRITE, peer.ready)

    def _send_datagram(self, address: Endpoint, data: bytes) -> None:
        udp = self._udp
        if udp is None:
            return
        try:
            udp.sendto(data, address)
        except BlockingIOError:
            # The kernel's send buffer is full: UDP may lose this; the peer retransmits.
            self.udp_send_drops += 1
        except OSError as exc:
            log.debug("could not send to %s: %s", format_endpoint(address), exc)

    # --- inputs -----------------------------------------------------------------------------

    def _receive_datagrams(self, udp: socket.socket) -> None:
        service, clock = self.service, self._clock
        # Drain what is queued in one wake-up: one select() per datagram costs more
        # than the service's own work under load.
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

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(_RECEIVE_BATCH):
            try:
                sock, address = listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:  # out of file descriptors, a reset in the backlog
                log.warning("accept failed: %s", exc)
                return
            self._add_peer(sock, (str(address[0]), int(address[1])))

    def _add_peer(self, sock: socket.socket, remote: Endpoint) -> None:
        """Serve a session on ``sock`` as a TCP peer: an accepted connection, or the
        daemon's end of a tunnel from the HTTP face (the service cannot tell them apart;
        ``remote`` is then the address of the connection carrying the tunnel)."""
        sock.setblocking(False)
        handle = next(self._peer_ids)
        peer = _Peer(handle=handle, sock=sock, remote=remote)
        self._peers[handle] = peer
        log.debug("tcp peer %d from %s", handle, format_endpoint(peer.remote))
        peer.ready = self._peer_callback(peer)
        self._loop.watch(sock, EVENT_READ, peer.ready)
        self._apply(self.service.tcp_connected(handle, peer.remote, self._clock()))

    def _peer_callback(self, peer: _Peer) -> Callable[[int], None]:
        def ready(mask: int) -> None:
            if mask & EVENT_WRITE:
                self._flush(peer)
            if mask & EVENT_READ and not peer.gone and not peer.closing:
                self._read(peer)

        return ready

    def _read(self, peer: _Peer) -> None:
        try:
            data = peer.sock.recv(_RECEIVE_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close_peer(peer)
            return
        self._apply(self.service.tcp_data_received(peer.handle, data, self._clock()))

    def _flush(self, peer: _Peer) -> None:
        outbox = peer.outbox
        while outbox:
            try:
                sent = peer.sock.send(outbox[0])
            except BlockingIOError:
                return
            except OSError:
                self._close_peer(peer)
                return
            if sent < len(outbox[0]):
                outbox[0] = outbox[0][sent:]
                return
            outbox.popleft()
        if peer.closing:
            self._close_peer(peer)  # the service's last words are out
        elif not peer.gone:
            self._loop.watch(peer.sock, EVENT_READ, peer.ready)

    def _close_peer(self, peer: _Peer) -> None:
        if peer.gone:
            return
        peer.gone = True
        self._loop.unwatch(peer.sock)
        del self._peers[peer.handle]
        peer.outbox.clear()
        with contextlib.suppress(OSError):
            peer.sock.close()
        if not peer.closed_by_service:
            self._apply(self.service.tcp_closed(peer.handle, self._clock()))
        log.debug("tcp peer %d closed", peer.handle)


def _open(host: str, port: int, kind: socket.SocketKind) -> socket.socket:
    """A non-blocking socket of ``kind`` bound to ``host:port`` (the first address ``host``
    names); a stream socket is listening."""
    infos = socket.getaddrinfo(host, port, type=kind, flags=socket.AI_PASSIVE)
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, kind)
    try:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setblocking(False)
        sock.bind(address)
        if kind == socket.SOCK_STREAM:
            sock.listen(_LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock
