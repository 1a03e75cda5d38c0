"""The mediator daemon on anyio: STUN over UDP and TCP on one port, driven by ``MediatorService``.

Thin by design: this module moves datagrams, TCP bytes and time between the
operating system and the service, and carries out the service's actions. It
makes no protocol decision (who is online, what to answer, when to give up).
"""

from __future__ import annotations

import itertools
import logging
import socket
import ssl
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from wavesync_proto.addresses import Endpoint, format_endpoint
from wavesync_proto.mediator.service import (
    Action,
    CloseTcp,
    MediatorService,
    SendDatagram,
    SendTcp,
)

from ._net import ServiceTimer
from .tunnel_server import TunnelServer

__all__ = ["MediatorDaemon"]

log = logging.getLogger("wavesync.mediator")

# Outgoing messages queued per TCP peer before the peer counts as too slow and is dropped.
_OUTBOX_MESSAGES = 1024
# How long a closing peer may take to drain what was queued for it (an error answer).
_DRAIN_SECONDS = 5.0
_RECEIVE_BYTES = 65536
_UDP_BIND_ATTEMPTS = 20
# Datagrams handled per wake-up before other tasks get their turn.
_RECEIVE_BATCH = 64


@dataclass
class _Peer:
    outbox: MemoryObjectSendStream[bytes]
    scope: anyio.CancelScope
    remote: Endpoint
    closed_by_service: bool = False
    #: Dropped by this daemon (too slow a reader): the service is told when it ends.
    dropped: bool = False


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
        """``http``: where the HTTP face listens. Each tunnel of any method
        (docs/tunnel.md) carries one session, served as a TCP peer; with
        ``http_ssl_context`` every connection there is TLS (the ``ssl+`` kinds)."""
        self.service = service
        self._http = http
        #: The HTTP face: every tunnel it opens is a TCP session of the service.
        self.tunnels = TunnelServer(self.serve_stream, ssl_context=http_ssl_context)
        self.http_bound: Endpoint | None = None
        self._clock = clock or anyio.current_time
        self._peers: dict[Hashable, _Peer] = {}
        self._peer_ids = itertools.count(1)
        self._udp: socket.socket | None = None
        #: Datagrams dropped because the socket's send buffer was full.
        self.udp_send_drops = 0
        self._timer = ServiceTimer(
            service.get_timer,
            lambda now: self._apply(service.handle_timer(now)),
            self._clock,
        )
        self.bound: Endpoint | None = None

    async def serve(
        self,
        host: str,
        port: int,
        *,
        task_status: anyio.abc.TaskStatus[Endpoint] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Bind ``host:port`` (UDP and TCP) and serve until cancelled; with ``http``
        (given to the constructor), the HTTP tunnel face too (``http_bound``)."""
        listener, udp = await self._bind(host, port)
        self._udp = udp
        with udp:
            if self._http is None:
                await self._serve(listener, udp, task_status)
                return
            async with anyio.create_task_group() as group:
                self.http_bound = await group.start(self.tunnels.serve, *self._http)
                await self._serve(listener, udp, task_status)

    async def _serve(
        self,
        listener: anyio.abc.Listener[anyio.abc.SocketStream],
        udp: socket.socket,
        task_status: anyio.abc.TaskStatus[Endpoint],
    ) -> None:
        async with listener, anyio.create_task_group() as group:
            group.start_soon(listener.serve, self._serve_tcp_peer, group)
            group.start_soon(self._receive_datagrams, udp)
            group.start_soon(self._timer.run)
            assert self.bound is not None
            log.info("mediator on udp+tcp %s", format_endpoint(self.bound))
            task_status.started(self.bound)

    async def _bind(
        self, host: str, port: int
    ) -> tuple[anyio.abc.Listener[anyio.abc.SocketStream], socket.socket]:
        # UDP and TCP must share the port number: clients are told one address.
        # With port 0, take the TCP port the kernel picked and claim it for UDP,
        # retrying if another process holds that UDP port.
        for _ in range(_UDP_BIND_ATTEMPTS if port == 0 else 1):
            listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
            bound_port = listener.extra(anyio.abc.SocketAttribute.local_port)
            try:
                udp = await _open_udp(host, bound_port)
            except OSError:
                await listener.aclose()
                if port != 0:
                    raise
                continue
            local = udp.getsockname()
            self.bound = (str(local[0]), int(local[1]))
            return listener, udp
        raise OSError(
            f"no port free for both UDP and TCP on {host} after {_UDP_BIND_ATTEMPTS} tries"
        )

    # --- carrying out the service's decisions ---------------------------------------------

    def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, SendTcp):
                peer = self._peers.get(action.peer)
                if peer is None or peer.dropped:
                    continue
                try:
                    peer.outbox.send_nowait(action.data)
                except anyio.WouldBlock:
                    log.info(
                        "dropping %s: it reads slower than we answer", format_endpoint(peer.remote)
                    )
                    # Unlike a CloseTcp, the service did not ask for this: the end of
                    # serve_stream tells it the peer is gone (tcp_closed), so the servers
                    # registered over this connection stop being offered to clients.
                    peer.dropped = True
                    peer.scope.cancel()
                except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                    pass
            elif isinstance(action, CloseTcp):
                peer = self._peers.get(action.peer)
                if peer is not None:
                    log.debug("closing %s: %s", format_endpoint(peer.remote), action.reason)
                    peer.closed_by_service = True
                    peer.outbox.close()  # the writer drains what is queued, then closes
            elif isinstance(action, SendDatagram):
                self._send_datagram(action.address, action.data)
        self._timer.changed()

    def _send_datagram(self, address: Endpoint, data: bytes) -> None:
        udp = self._udp
        if udp is None:
            return
        try:
            # Straight to the non-blocking socket: one syscall, no task switch, and no
            # two tasks ever "sending at once" (anyio refuses that on its own sockets).
            udp.sendto(data, address)
        except BlockingIOError:
            # The kernel's send buffer is full: UDP may lose this; the peer retransmits.
            self.udp_send_drops += 1
        except OSError as exc:
            log.debug("could not send to %s: %s", format_endpoint(address), exc)

    # --- inputs -----------------------------------------------------------------------------

    async def _receive_datagrams(self, udp: socket.socket) -> None:
        service, clock = self.service, self._clock
        while True:
            await anyio.wait_readable(udp)
            # Drain what is queued in one wake-up: under load, one event-loop round trip
            # per datagram costs more than the service's own work.
            for _ in range(_RECEIVE_BATCH):
                try:
                    data, source = udp.recvfrom(_RECEIVE_BYTES)
                except BlockingIOError:
                    break
                except OSError as exc:
                    # ICMP errors for earlier answers surface here on some systems.
                    log.debug("udp receive error: %s", exc)
                    continue
                endpoint = (str(source[0]), int(source[1]))
                self._apply(service.datagram_received(data, endpoint, clock()))

    async def _serve_tcp_peer(self, stream: anyio.abc.SocketStream) -> None:
        await self.serve_stream(stream)

    async def serve_stream(self, stream: anyio.abc.ByteStream) -> None:
        """Serve one session on ``stream`` as a TCP peer, until it ends (then close it).

        A tunnel from the HTTP face comes here exactly as a TCP connection does: the
        service cannot tell them apart. Its remote address is that of the connection
        that carries it (the proxy's, behind one), or 0.0.0.0:0 when unknown.
        """
        unknown = ("0.0.0.0", 0)  # noqa: S104 - an address to report, not to bind
        remote_address = stream.extra(anyio.abc.SocketAttribute.remote_address, unknown)
        remote = (str(remote_address[0]), int(remote_address[1]))
        handle = next(self._peer_ids)
        send, receive = anyio.create_memory_object_stream[bytes](_OUTBOX_MESSAGES)
        peer = _Peer(outbox=send, scope=anyio.CancelScope(), remote=remote)
        self._peers[handle] = peer
        log.debug("tcp peer %d from %s", handle, format_endpoint(remote))
        try:
            with peer.scope:
                self._apply(self.service.tcp_connected(handle, remote, self._clock()))
                async with anyio.create_task_group() as group:
                    group.start_soon(self._write_tcp, stream, receive, group.cancel_scope)
                    await self._read_tcp(handle, stream)
                    group.cancel_scope.cancel()
        finally:
            del self._peers[handle]
            send.close()
            receive.close()
            with anyio.CancelScope(shield=True):
                await stream.aclose()
                if not peer.closed_by_service:
                    self._apply(self.service.tcp_closed(handle, self._clock()))
            log.debug("tcp peer %d closed", handle)

    async def _read_tcp(self, handle: int, stream: anyio.abc.ByteStream) -> None:
        while True:
            try:
                data = await stream.receive(_RECEIVE_BYTES)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                return
            self._apply(self.service.tcp_data_received(handle, data, self._clock()))

    async def _write_tcp(
        self,
        stream: anyio.abc.ByteStream,
        outbox: MemoryObjectReceiveStream[bytes],
        peer_scope: anyio.CancelScope,
    ) -> None:
        try:
            async for data in outbox:
                await stream.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        # The outbox was closed: the service asked to close this peer once drained.
        with anyio.move_on_after(_DRAIN_SECONDS, shield=True):
            await stream.aclose()
        peer_scope.cancel()


async def _open_udp(host: str, port: int) -> socket.socket:
    """A non-blocking UDP socket bound to ``host:port`` (the first address ``host`` names)."""
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE)
    family, _, _, _, address = infos[0]
    udp = socket.socket(family, socket.SOCK_DGRAM)
    try:
        udp.setblocking(False)
        udp.bind(address)
    except OSError:
        udp.close()
        raise
    return udp
