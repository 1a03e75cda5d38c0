"""The relay daemon on plain asyncio: accepts TCP connections, runs ``RelayService``, splices
pairs.

The twin of ``wavesync_adapters.anyio.relay`` (same class, arguments, log lines and
counters), on public asyncio APIs only (``add_reader``/``add_writer`` on raw
non-blocking sockets, ``call_later``), so it runs on uvloop and imports nothing of
anyio. Thin by design: it moves bytes and time between the sockets and the service
and carries out its actions; the service decides who is authentic, who is paired
with whom and when to give up.

Every connection is a set of callbacks, not a task: a readable socket is read and
fed to the service; a paired session is moved by two ``SplicePump``s (the steps
shared with the anyio and blocking relays, ``wavesync_adapters._splice_core``),
each woken by the readiness it last asked for, so on Linux the bytes go through
``os.splice`` and never enter Python.

The same port is the relay's HTTP tunnel face (docs/tunnel.md): a connection
whose request the service reports as a tunnel (``HandOffTunnel``) goes to a
``TunnelServer``. Each stream a tunnel carries enters the relay through a socket
pair, as on the anyio relay: the service and the splice see one end as a
connection like any other (the tunnel server moves bytes between the other end
and the tunnel), so a tunnelled standby pairs with a plain client (and the
reverse) unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from wavesync_proto.addresses import Endpoint, format_endpoint
from wavesync_proto.relay import (
    Action,
    CloseConnection,
    HandOffTunnel,
    RelayService,
    SendBytes,
    StartSplice,
)

from .._splice_core import PipePool, PumpWait, SplicePump, SpliceResult
from .mediator import ServiceTimer
from .tunnel_server import TunnelServer, TunnelSocket

__all__ = ["RelayDaemon"]

log = logging.getLogger("wavesync.relay")

_RECEIVE_BYTES = 65536
# Connections accepted per wake-up of the listener before other callbacks get their turn.
_ACCEPT_BATCH = 64
# A closing connection's peer gets this long to read our last answer before the close.
_DRAIN_SECONDS = 2.0
_LISTEN_BACKLOG = 4096


@dataclass(eq=False)
class _Connection:
    handle: int
    sock: socket.socket
    remote: Endpoint
    #: The service let go of this connection (closed it, or handed it to a splice).
    released: bool = False
    closing: bool = False
    #: Closed and forgotten: nothing more is reported for it.
    gone: bool = False
    #: Reading and discarding until EOF before the close (see ``_drain``).
    draining: asyncio.TimerHandle | None = field(default=None, repr=False)
    #: A tunnel's socket pair end: tells the tunnel server once the socket is closed.
    on_close: Callable[[], None] | None = field(default=None, repr=False)


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
        counters (only when something changed). ``clock``: seconds, monotonic (default:
        the running loop's ``time``)."""
        self.service = service
        self._report_interval = report_interval
        self._given_clock = clock
        self._clock: Callable[[], float] = clock or time.monotonic
        self._wall_clock = wall_clock
        self._connections: dict[Hashable, _Connection] = {}
        self._sessions: set[_SplicedSession] = set()
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer = ServiceTimer(
            service.get_timer, lambda now: self._apply(service.handle_timer(now))
        )
        self._last_report = ""
        self._report_handle: asyncio.TimerHandle | None = None
        self.bound: Endpoint | None = None
        #: Bytes carried by spliced sessions that have ended, per direction.
        self.bytes_client_to_server = 0
        self.bytes_server_to_client = 0
        #: The pipes spliced sessions borrow while bytes flow.
        self.pipes = PipePool()
        #: The HTTP tunnel face on the same port; each tunnel carries one relay connection.
        self.tunnels = TunnelServer(on_socket=self._tunnel_opened)

    async def serve(
        self,
        host: str,
        port: int,
        *,
        started: Callable[[Endpoint], None] | None = None,
    ) -> None:
        """Listen on ``host:port`` and serve until cancelled.

        ``started(bound)`` is called once the socket listens; an address that cannot be
        bound raises ``OSError`` before it.
        """
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._clock = self._given_clock or loop.time
        listener = await _listen(loop, host, port)
        try:
            local = listener.getsockname()
            self.bound = (str(local[0]), int(local[1]))
            self.tunnels.attach(loop)
            loop.add_reader(listener.fileno(), self._accept, listener)
            self._timer.start(loop, self._clock)
            self._report_handle = loop.call_later(self._report_interval, self._report)
            assert self._timer.failed is not None
            log.info("relay on tcp %s", format_endpoint(self.bound))
            if started is not None:
                started(self.bound)
            await self._timer.failed  # runs until cancelled, or until the service raises
        finally:
            if self._report_handle is not None:
                self._report_handle.cancel()
            self._timer.stop()
            self.tunnels.close()
            loop.remove_reader(listener.fileno())
            listener.close()
            for session in list(self._sessions):
                session.stop("relay stopped")
            for connection in list(self._connections.values()):
                self._forget(connection)
            self._connections.clear()
            self.pipes.close()
            self._loop = None

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
                    connection.released = True
                    with contextlib.suppress(OSError):
                        connection.sock.shutdown(socket.SHUT_WR)
                    self._drain(action.connection, connection)
            elif isinstance(action, StartSplice):
                self._start_splice(action)
            elif isinstance(action, HandOffTunnel):
                connection = self._connections.pop(action.connection, None)
                if connection is not None:
                    # The tunnel server owns the socket now; the bytes read so far are
                    # the start of its request.
                    connection.released = connection.gone = True
                    self._stop_reading(connection)
                    self.tunnels.handle_socket(connection.sock, action.received)
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
            return  # the next read sees the error and reports the loss
        if sent < len(data):
            log.info("dropping %s: it does not read", format_endpoint(connection.remote))
            self._drain(connection.handle, connection)

    def _start_splice(self, action: StartSplice) -> None:
        client = self._connections.pop(action.client)
        server = self._connections.pop(action.server)
        for connection in (client, server):
            connection.released = True
            self._stop_reading(connection)
        session = _SplicedSession(self, action, client, server)
        self._sessions.add(session)
        # Write the client's 101 (and any early bytes) now, in this callback: the
        # client's pairing time is what the relay exists to keep short.
        session.start()

    def _session_ended(self, session: _SplicedSession, result: SpliceResult) -> None:
        self._sessions.discard(session)
        self.bytes_client_to_server += result.client_to_server
        self.bytes_server_to_client += result.server_to_client
        log.debug(
            "session %s ended (%s): %d bytes to the server, %d to the client",
            session.session_id.hex(),
            result.ending,
            result.client_to_server,
            result.server_to_client,
        )
        if self._loop is not None:
            self.service.splice_ended(session.session_id, self._clock())

    # --- inputs -----------------------------------------------------------------------------

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, address = listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:  # out of file descriptors, a reset in the backlog
                log.warning("accept failed: %s", exc)
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._connection_made(sock, (str(address[0]), int(address[1])))

    def _connection_made(
        self, sock: socket.socket, remote: Endpoint, *, on_close: Callable[[], None] | None = None
    ) -> None:
        assert self._loop is not None
        handle = next(self._ids)
        connection = _Connection(handle=handle, sock=sock, remote=remote, on_close=on_close)
        self._connections[handle] = connection
        self._loop.add_reader(sock.fileno(), self._readable, handle, connection)
        self._apply(self.service.connection_made(handle, remote, self._clock()))

    def _tunnel_opened(self, tunnel: TunnelSocket) -> None:
        """One tunnel's stream, as the socket pair's end: a relay connection like any other."""
        self._connection_made(tunnel.sock, tunnel.remote, on_close=tunnel.closed)

    def _readable(self, handle: int, connection: _Connection) -> None:
        if connection.draining is not None:
            self._read_while_draining(handle, connection)
            return
        try:
            data = connection.sock.recv(_RECEIVE_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._lost(handle, connection)
            return
        now, unix_time = self._clock(), self._wall_clock()
        self._apply(self.service.data_received(handle, data, now, unix_time=unix_time))

    def _lost(self, handle: Hashable, connection: _Connection) -> None:
        """The connection ended (EOF, an error, a drain's end): forget it and tell the
        service, unless it let go first."""
        if connection.gone:
            return
        if self._connections.get(handle) is connection:
            del self._connections[handle]
        self._forget(connection)
        if not connection.released:
            self._apply(self.service.connection_lost(handle, self._clock()))

    def _drain(self, handle: Hashable, connection: _Connection) -> None:
        """Read and discard until EOF or a short deadline, then close, so the close is not
        a reset: closing a socket with unread input makes the kernel send RST, and a RST
        can destroy the error answer the peer has not read yet."""
        if connection.closing or self._loop is None:
            return
        connection.closing = True
        connection.draining = self._loop.call_later(_DRAIN_SECONDS, self._lost, handle, connection)
        self._read_while_draining(handle, connection)

    def _read_while_draining(self, handle: Hashable, connection: _Connection) -> None:
        while True:
            try:
                if not connection.sock.recv(_RECEIVE_BYTES):
                    break
            except BlockingIOError:
                return
            except OSError:
                break
        self._lost(handle, connection)

    def _stop_reading(self, connection: _Connection) -> None:
        if self._loop is not None and connection.sock.fileno() != -1:
            self._loop.remove_reader(connection.sock.fileno())
        if connection.draining is not None:
            connection.draining.cancel()

    def _forget(self, connection: _Connection) -> None:
        connection.gone = True
        self._stop_reading(connection)
        connection.sock.close()
        if connection.on_close is not None:
            connection.on_close()

    def _report(self) -> None:
        if self._loop is None:
            return
        self._report_handle = self._loop.call_later(self._report_interval, self._report)
        counters = self.service.counters
        line = (
            f"{counters.standby_idle} standby idle, {counters.clients_waiting} clients"
            f" waiting, {counters.sessions_active} sessions active; so far"
            f" {counters.standby_accepted} standby accepted, {counters.clients_paired}"
            f" clients paired, {counters.clients_not_found} not found,"
            f" {counters.clients_timed_out} timed out, {counters.standby_auth_failures}"
            f" standby auth failures"
        )
        if line != self._last_report:
            log.info("relay: %s", line)
            self._last_report = line


class _SplicedSession:
    """A paired client and server: two pumps, each woken by the readiness it asked for.

    A pump's waits are registered with the loop only when they change (the selector is
    level-triggered), so a busy session costs one callback per turn and no ``epoll_ctl``.
    A pump's turn ending (``YIELD``) leaves it waiting for its source, which is still
    readable: the loop runs the other callbacks once and calls it again.
    """

    def __init__(
        self,
        daemon: RelayDaemon,
        action: StartSplice,
        client_connection: _Connection,
        server_connection: _Connection,
    ) -> None:
        assert daemon._loop is not None
        self._daemon = daemon
        self._loop = daemon._loop
        self.session_id = action.session_id
        client, server = client_connection.sock, server_connection.sock
        self._sockets = (client, server)
        # A tunnel's socket pair end among them: its tunnel server hears of the close.
        self._on_close = [
            connection.on_close
            for connection in (client_connection, server_connection)
            if connection.on_close is not None
        ]
        self._to_server = SplicePump(client, server, first=action.to_server, pipes=daemon.pipes)
        self._to_client = SplicePump(server, client, first=action.to_client, pipes=daemon.pipes)
        # What each pump waits for now: a registered reader or writer, or nothing.
        self._waits: dict[SplicePump, PumpWait | None] = {
            self._to_server: None,
            self._to_client: None,
        }
        self._ended = False

    def start(self) -> None:
        self._advance(self._to_client)
        self._advance(self._to_server)

    def _advance(self, pump: SplicePump) -> None:
        if self._ended:
            return
        try:
            wait = pump.advance()
        except OSError as exc:
            self.stop(f"error: {exc}")
            return
        if wait is PumpWait.YIELD:
            wait = PumpWait.READABLE  # see the class docstring
        self._wait(pump, wait)
        if all(waiting is PumpWait.DONE for waiting in self._waits.values()):
            self.stop("closed")

    def _wait(self, pump: SplicePump, wait: PumpWait) -> None:
        before = self._waits[pump]
        if wait is before:
            return
        self._unregister(pump)
        self._waits[pump] = wait
        if wait is PumpWait.READABLE:
            self._loop.add_reader(pump.source.fileno(), self._advance, pump)
        elif wait is PumpWait.WRITABLE:
            self._loop.add_writer(pump.sink.fileno(), self._advance, pump)
        else:
            pump.close()

    def _unregister(self, pump: SplicePump) -> None:
        before = self._waits[pump]
        if before is PumpWait.READABLE:
            self._loop.remove_reader(pump.source.fileno())
        elif before is PumpWait.WRITABLE:
            self._loop.remove_writer(pump.sink.fileno())

    def stop(self, ending: str) -> None:
        """End both directions (done, failed, or the relay stops) and close both sockets."""
        if self._ended:
            return
        self._ended = True
        for pump in self._waits:
            self._unregister(pump)
            pump.close()
        for sock in self._sockets:
            sock.close()
        for closed in self._on_close:
            closed()
        result = SpliceResult(
            client_to_server=self._to_server.carried,
            server_to_client=self._to_client.carried,
            ending=ending,
        )
        self._daemon._session_ended(self, result)


async def _listen(loop: asyncio.AbstractEventLoop, host: str, port: int) -> socket.socket:
    infos: list[tuple[Any, ...]] = await loop.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
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
