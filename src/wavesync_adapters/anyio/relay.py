"""The relay daemon on anyio: accepts TCP connections, runs ``RelayService``, splices pairs.

Thin by design: this module moves bytes and time between the sockets and the
service, and carries out its actions. It makes no protocol decision (who is
authentic, who is paired with whom, when to give up): the service does.

It works on raw non-blocking sockets with ``anyio.wait_readable``/``wait_writable``
rather than anyio streams, so that a paired session can be handed to
``os.splice`` and its bytes never pass through Python.

The same port is the relay's HTTP tunnel face (docs/tunnel.md): a connection
whose request the service reports as a tunnel (``HandOffTunnel``) goes to a
``TunnelServer``. Each stream a tunnel carries enters the relay through a
socket pair: the service and the splice see one end as a connection like any
other, and a copy task moves bytes between the other end and the tunnel, so a
tunnelled standby pairs with a plain client (and the reverse) unchanged.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import socket
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, replace

import anyio
import anyio.abc

from wavesync_proto.addresses import Endpoint, format_endpoint
from wavesync_proto.relay import (
    Action,
    CloseConnection,
    HandOffTunnel,
    RelayService,
    SendBytes,
    StartSplice,
)

from ._net import ServiceTimer
from ._splice import PipePool, splice_sockets
from ._streams import PrefixedStream
from .tunnel_server import TunnelServer
from .tunnel_stream import TunnelStream

__all__ = ["RelayDaemon"]

log = logging.getLogger("wavesync.relay")

_RECEIVE_BYTES = 65536
# Connections accepted per wake-up of the listener before other tasks get their turn.
_ACCEPT_BATCH = 64
# A closing connection's peer gets this long to read our last answer before the close.
_DRAIN_SECONDS = 2.0
_LISTEN_BACKLOG = 4096


@dataclass(eq=False)
class _Connection:
    sock: socket.socket
    remote: Endpoint
    #: Cancels a wait for input (the connection is being spliced or closed).
    wait_scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    #: The service let go of this connection (closed it, or handed it to a splice).
    released: bool = False
    closing: bool = False
    #: Set when the connection's own task no longer touches the socket.
    idle: anyio.Event = field(default_factory=anyio.Event)
    spliced: anyio.Event | None = None
    #: Handed to the tunnel server: every byte it sent so far.
    tunnel_bytes: bytes | None = None


class RelayDaemon:
    """Runs a ``RelayService`` on one TCP listening socket."""

    def __init__(
        self,
        service: RelayService,
        *,
        clock: Callable[[], float] | None = None,
        wall_clock: Callable[[], float] = time.time,
        report_interval: float = 60.0,
    ) -> None:
        """``report_interval``: seconds between info-level log lines of the service's
        counters (only when something changed)."""
        self.service = service
        self._report_interval = report_interval
        self._clock = clock or anyio.current_time
        self._wall_clock = wall_clock
        self._connections: dict[Hashable, _Connection] = {}
        self._ids = itertools.count(1)
        self._group: anyio.abc.TaskGroup | None = None
        self._timer = ServiceTimer(
            service.get_timer,
            lambda now: self._apply(service.handle_timer(now)),
            self._clock,
        )
        self.bound: Endpoint | None = None
        #: Bytes carried by spliced sessions that have ended, per direction.
        self.bytes_client_to_server = 0
        self.bytes_server_to_client = 0
        #: The pipes spliced sessions borrow while bytes flow.
        self.pipes = PipePool()
        #: The HTTP tunnel face on the same port; each tunnel carries one relay connection.
        self.tunnels = TunnelServer(self._serve_tunnel)

    async def serve(
        self,
        host: str,
        port: int,
        *,
        task_status: anyio.abc.TaskStatus[Endpoint] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port`` and serve until cancelled."""
        listener = await _listen(host, port)
        with listener, contextlib.closing(self.pipes):
            local = listener.getsockname()
            self.bound = (str(local[0]), int(local[1]))
            async with anyio.create_task_group() as group:
                self._group = group
                group.start_soon(self._timer.run)
                group.start_soon(self.tunnels.run_timer)
                group.start_soon(self._accept, listener)
                group.start_soon(self._report)
                log.info("relay on tcp %s", format_endpoint(self.bound))
                task_status.started(self.bound)

    # --- carrying out the service's decisions ---------------------------------------------

    def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, SendBytes):
                connection = self._connections.get(action.connection)
                if connection is not None and not connection.closing:
                    self._send_now(connection, action.data)
            elif isinstance(action, CloseConnection):
                connection = self._connections.get(action.connection)
                if connection is not None:
                    log.debug("closing %s: %s", format_endpoint(connection.remote), action.reason)
                    self._start_closing(connection)
            elif isinstance(action, StartSplice):
                self._start_splice(action)
            elif isinstance(action, HandOffTunnel):
                connection = self._connections.get(action.connection)
                if connection is not None:
                    connection.released = True
                    connection.tunnel_bytes = action.received
                    connection.wait_scope.cancel()
        self._timer.changed()

    def _send_now(self, connection: _Connection, data: bytes) -> None:
        # Everything the relay itself says is small (answers, PING, OPEN) and fits the
        # kernel's send buffer of a connection that reads at all; one that does not
        # read is dropped rather than given a queue to grow.
        try:
            sent = connection.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            return  # the reading task sees the error and reports the loss
        if sent < len(data):
            log.info("dropping %s: it does not read", format_endpoint(connection.remote))
            connection.closing = True
            connection.wait_scope.cancel()

    def _start_closing(self, connection: _Connection) -> None:
        connection.released = connection.closing = True
        with contextlib.suppress(OSError):
            connection.sock.shutdown(socket.SHUT_WR)
        connection.wait_scope.cancel()

    def _start_splice(self, action: StartSplice) -> None:
        client = self._connections[action.client]
        server = self._connections[action.server]
        done = anyio.Event()
        for connection in (client, server):
            connection.released = True
            connection.spliced = done
            connection.wait_scope.cancel()
        # Write the client's 101 (and any early bytes) now rather than when the splice
        # task runs: that is a few event-loop turns later, behind whatever else is ready,
        # and the client's pairing time is what the relay exists to keep short.
        to_client = _send_what_fits(client.sock, action.to_client)
        to_server = _send_what_fits(server.sock, action.to_server)
        self.bytes_server_to_client += len(action.to_client) - len(to_client)
        self.bytes_client_to_server += len(action.to_server) - len(to_server)
        rest = replace(action, to_client=to_client, to_server=to_server)
        assert self._group is not None
        self._group.start_soon(self._splice, rest, client, server, done)

    async def _splice(
        self, action: StartSplice, client: _Connection, server: _Connection, done: anyio.Event
    ) -> None:
        try:
            # Each connection's own task may still be inside a wait on its socket.
            await client.idle.wait()
            await server.idle.wait()
            result = await splice_sockets(
                client.sock,
                server.sock,
                to_client=action.to_client,
                to_server=action.to_server,
                pipes=self.pipes,
            )
        finally:
            client.sock.close()
            server.sock.close()
            done.set()
        self.bytes_client_to_server += result.client_to_server
        self.bytes_server_to_client += result.server_to_client
        log.debug(
            "session %s ended (%s): %d bytes to the server, %d to the client",
            action.session_id.hex(),
            result.ending,
            result.client_to_server,
            result.server_to_client,
        )
        self.service.splice_ended(action.session_id, self._clock())

    # --- inputs -----------------------------------------------------------------------------

    async def _accept(self, listener: socket.socket) -> None:
        assert self._group is not None
        while True:
            await anyio.wait_readable(listener)
            for _ in range(_ACCEPT_BATCH):
                try:
                    sock, address = listener.accept()
                except BlockingIOError:
                    break
                except OSError as exc:  # out of file descriptors, a reset in the backlog
                    log.warning("accept failed: %s", exc)
                    break
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._group.start_soon(self._serve_connection, sock, (address[0], address[1]))

    async def _serve_connection(self, sock: socket.socket, remote: Endpoint) -> None:
        handle = next(self._ids)
        connection = _Connection(sock=sock, remote=remote)
        self._connections[handle] = connection
        try:
            self._apply(self.service.connection_made(handle, remote, self._clock()))
            await self._read(handle, connection)
        finally:
            del self._connections[handle]
            if not connection.released:
                self._apply(self.service.connection_lost(handle, self._clock()))
            connection.idle.set()
            if connection.spliced is None and connection.tunnel_bytes is None:
                sock.close()
        if connection.spliced is not None:
            await connection.spliced.wait()  # the splice task owns the socket now
        elif connection.tunnel_bytes is not None:
            try:
                stream = await anyio.abc.SocketStream.from_socket(sock)
            except BaseException:
                sock.close()
                raise
            await self.tunnels.handle_connection(PrefixedStream(stream, connection.tunnel_bytes))

    async def _read(self, handle: int, connection: _Connection) -> None:
        sock, service = connection.sock, self.service
        while not connection.released and not connection.closing:
            try:
                data = sock.recv(_RECEIVE_BYTES)
            except BlockingIOError:
                # A scope per wait (a scope is entered once): _apply cancels it when the
                # connection is released or closed while we sleep.
                connection.wait_scope = anyio.CancelScope()
                with connection.wait_scope:
                    await anyio.wait_readable(sock)
                continue
            except OSError:
                return
            if not data:
                return
            now, unix_time = self._clock(), self._wall_clock()
            self._apply(service.data_received(handle, data, now, unix_time=unix_time))
        if connection.closing and connection.spliced is None:
            await _drain(sock)

    async def _serve_tunnel(self, tunnel: TunnelStream) -> None:
        """One tunnel's stream as a relay connection: through a socket pair, copied."""
        unknown = ("0.0.0.0", 0)  # noqa: S104 - an address to report, not to bind
        address = tunnel.extra(anyio.abc.SocketAttribute.remote_address, unknown)
        inner, outer = socket.socketpair()
        inner.setblocking(False)
        try:
            peer = await anyio.abc.SocketStream.from_socket(outer)
        except BaseException:
            inner.close()
            outer.close()
            raise
        async with peer, anyio.create_task_group() as group:
            copying = anyio.CancelScope()

            async def relay_side() -> None:
                await self._serve_connection(inner, (str(address[0]), int(address[1])))
                # The relay is done with its end: what is still in flight gets a moment.
                copying.deadline = min(copying.deadline, anyio.current_time() + _DRAIN_SECONDS)

            group.start_soon(relay_side)
            with copying:
                await _copy_both_ways(tunnel, peer)

    async def _report(self) -> None:
        last = ""
        while True:
            await anyio.sleep(self._report_interval)
            counters = self.service.counters
            line = (
                f"{counters.standby_idle} standby idle, {counters.clients_waiting} clients"
                f" waiting, {counters.sessions_active} sessions active; so far"
                f" {counters.standby_accepted} standby accepted, {counters.clients_paired}"
                f" clients paired, {counters.clients_not_found} not found,"
                f" {counters.clients_timed_out} timed out, {counters.standby_auth_failures}"
                f" standby auth failures"
            )
            if line != last:
                log.info("relay: %s", line)
                last = line


async def _copy_both_ways(tunnel: TunnelStream, peer: anyio.abc.SocketStream) -> None:
    """Copy between a tunnel and the socket pair's end until both directions end; an end
    is passed on as an end (a half-close), a failure closes both."""

    async def tunnel_to_peer() -> None:
        try:
            while True:
                await peer.send(await tunnel.receive())
        except anyio.EndOfStream:
            with contextlib.suppress(*_GONE):
                await peer.send_eof()
        except _GONE:
            await anyio.aclose_forcefully(peer)

    async def peer_to_tunnel() -> None:
        try:
            while True:
                await tunnel.send(await peer.receive())
        except anyio.EndOfStream:
            try:
                await tunnel.send_eof()
            except NotImplementedError:  # a raw method over TLS: no half-close
                await tunnel.aclose()
            except _GONE:
                await anyio.aclose_forcefully(peer)
        except _GONE:
            await tunnel.aclose()

    async with anyio.create_task_group() as group:
        group.start_soon(tunnel_to_peer)
        await peer_to_tunnel()


_GONE = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


def _send_what_fits(sock: socket.socket, data: bytes) -> bytes:
    """Write what the socket takes without waiting; return the rest."""
    if not data:
        return data
    try:
        return data[sock.send(data) :]
    except OSError:
        return data  # full, or broken: the splice finds out and ends the session


async def _drain(sock: socket.socket) -> None:
    """Read and discard until EOF or a short deadline, so the close is not a reset.

    Closing a socket with unread input makes the kernel send RST, and a RST can
    destroy the error answer the peer has not read yet.
    """
    with anyio.move_on_after(_DRAIN_SECONDS):
        while True:
            try:
                if not sock.recv(_RECEIVE_BYTES):
                    return
            except BlockingIOError:
                await anyio.wait_readable(sock)
            except OSError:
                return


async def _listen(host: str, port: int) -> socket.socket:
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, address = infos[0]
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.setblocking(False)
        listener.bind(address)
        listener.listen(_LISTEN_BACKLOG)
    except OSError:
        listener.close()
        raise
    return listener
