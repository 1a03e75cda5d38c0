"""The relay daemon on plain sockets: accepts TCP connections, runs ``RelayService``, splices
pairs, all in one selector thread.

Thin by design, the twin of ``wavesync_adapters.anyio.relay``: this module
moves bytes and time between the sockets and the service, and carries out its
actions. It makes no protocol decision (who is authentic, who is paired with
whom, when to give up): the service does.

A spliced session runs in the same selector loop as the handshakes: its two
``SplicePump``s (``_splice_core``) move what the sockets take without waiting
(socket → pipe → socket with ``os.splice`` on Linux, so the bytes never enter
Python) and the loop waits for whichever socket each pump needs next. A pump
that had its turn lets the others run, as on anyio.

The same port is the relay's HTTP tunnel face (docs/tunnel.md): a connection
whose request the service reports as a tunnel (``HandOffTunnel``) goes to a
``TunnelServer`` in the same loop. Each stream a tunnel carries enters the relay
through a socket pair: the service and the splice see one end as a connection
like any other, and the tunnel server copies between the other end and the
tunnel, so a tunnelled standby pairs with a plain client (and the reverse)
unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import socket
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from wavesync_proto.addresses import Endpoint, format_endpoint
from wavesync_proto.errors import LocalProtocolError
from wavesync_proto.relay import (
    Action,
    CloseConnection,
    HandOffTunnel,
    RelayService,
    SendBytes,
    StartSplice,
)

from .._splice_core import PipePool, PumpWait, SplicePump, SpliceResult
from ._loop import EVENT_READ, EVENT_WRITE, Deadlines, SelectorLoop, earliest
from .tunnel_server import TunnelServer

__all__ = ["RelayDaemon"]

log = logging.getLogger("wavesync.relay")

_RECEIVE_BYTES = 65536
# Connections accepted per wake-up of the listener before other sockets get their turn.
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
    #: Reading only to discard, until EOF or the drain deadline, then closed.
    closing: bool = False
    gone: bool = False


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
        """``clock``: the service's clock (default ``time.monotonic``); ``wall_clock``: for
        standby signatures only. ``report_interval``: seconds between info-level log
        lines of the service's counters (only when something changed)."""
        self.service = service
        self._report_interval = report_interval
        self._clock = clock or time.monotonic
        self._wall_clock = wall_clock
        self._loop = SelectorLoop(clock=self._clock)
        self._connections: dict[Hashable, _Connection] = {}
        self._ids = itertools.count(1)
        self._drains = Deadlines()
        self._sessions: set[_SplicedSession] = set()
        self._next_report = 0.0
        self._last_report = ""
        self._serving = threading.Lock()
        self.bound: Endpoint | None = None
        #: Bytes carried by spliced sessions that have ended, per direction.
        self.bytes_client_to_server = 0
        self.bytes_server_to_client = 0
        #: The pipes spliced sessions borrow while bytes flow.
        self.pipes = PipePool()
        #: The HTTP tunnel face on the same port; each tunnel carries one relay connection.
        self.tunnels = TunnelServer(self._loop, self._add_connection)

    def serve_forever(
        self,
        host: str,
        port: int,
        *,
        started: Callable[[Endpoint], None] | None = None,
    ) -> None:
        """Listen on ``host:port``, call ``started(bound)``, and serve in this thread until
        ``shutdown()``; then close every socket (spliced sessions and tunnels too). Raises
        ``OSError`` when the port cannot be bound. A daemon serves once."""
        if not self._serving.acquire(blocking=False):
            raise LocalProtocolError("RelayDaemon.serve_forever runs once")
        loop = self._loop
        try:
            listener = _listen(host, port)
            with listener, contextlib.closing(self.pipes), contextlib.closing(self.tunnels):
                local = listener.getsockname()
                self.bound = (str(local[0]), int(local[1]))
                loop.watch(listener, EVENT_READ, lambda _: self._accept(listener))
                self._next_report = self._clock() + self._report_interval
                log.info("relay on tcp %s", format_endpoint(self.bound))
                if started is not None:
                    started(self.bound)
                try:
                    loop.run(self._next_deadline, self._on_deadline)
                finally:
                    for session in list(self._sessions):
                        session.end("relay stopped")
                    for connection in list(self._connections.values()):
                        self._finish(connection)
        finally:
            loop.close()

    def shutdown(self) -> None:
        """Make ``serve_forever`` return (from any thread; returns at once). Before
        ``serve_forever`` has started, it makes it return as soon as it is bound."""
        self._loop.stop()

    # --- time --------------------------------------------------------------------------------

    def _next_deadline(self) -> float | None:
        return earliest(
            self.service.get_timer(),
            self._drains.next(),
            self._next_report,
            self.tunnels.next_deadline(),
        )

    def _on_deadline(self, now: float) -> None:
        for handle in self._drains.pop_due(now):
            connection = self._connections.get(handle)
            if connection is not None and connection.closing:
                self._finish(connection)
        timer = self.service.get_timer()
        if timer is not None and timer <= now:
            self._apply(self.service.handle_timer(now))
        if now >= self._next_report:
            self._next_report = now + self._report_interval
            self._report()
        tunnels = self.tunnels.next_deadline()
        if tunnels is not None and tunnels <= now:
            self.tunnels.on_deadline(now)

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
                    self._hand_off(connection, action.received)

    def _send_now(self, connection: _Connection, data: bytes) -> None:
        # Everything the relay itself says is small (answers, PING, OPEN) and fits the
        # kernel's send buffer of a connection that reads at all; one that does not
        # read is dropped rather than given a queue to grow.
        try:
            sent = connection.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            return  # the read side sees the error and reports the loss
        if sent < len(data):
            log.info("dropping %s: it does not read", format_endpoint(connection.remote))
            self._drain(connection)

    def _start_closing(self, connection: _Connection) -> None:
        connection.released = True
        with contextlib.suppress(OSError):
            connection.sock.shutdown(socket.SHUT_WR)
        self._drain(connection)

    def _drain(self, connection: _Connection) -> None:
        """Read and discard until EOF or a short deadline, then close.

        Closing a socket with unread input makes the kernel send RST, and a RST can
        destroy the error answer the peer has not read yet.
        """
        if connection.closing:
            return
        connection.closing = True
        self._drains.add(self._clock() + _DRAIN_SECONDS, connection.handle)

    def _start_splice(self, action: StartSplice) -> None:
        client = self._connections.pop(action.client)
        server = self._connections.pop(action.server)
        for connection in (client, server):
            connection.released = connection.gone = True
            self._loop.unwatch(connection.sock)
        session = _SplicedSession(
            self._loop,
            action,
            client.sock,
            server.sock,
            pipes=self.pipes,
            ended=self._splice_ended,
        )
        self._sessions.add(session)
        # Write the client's 101 (and any early bytes) now: the client's pairing time is
        # what the relay exists to keep short.
        session.start()

    def _hand_off(self, connection: _Connection, received: bytes) -> None:
        """The connection opens a tunnel: the tunnel server takes it (and its socket),
        reading ``received`` (every byte it sent so far) first."""
        connection.released = connection.gone = True
        self._loop.unwatch(connection.sock)
        del self._connections[connection.handle]
        self.tunnels.handle_connection(connection.sock, connection.remote, first=received)

    def _splice_ended(self, session: _SplicedSession, result: SpliceResult) -> None:
        self._sessions.discard(session)
        action = session.action
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

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, address = listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:  # out of file descriptors, a reset in the backlog
                log.warning("accept failed: %s", exc)
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._add_connection(sock, (str(address[0]), int(address[1])))

    def _add_connection(self, sock: socket.socket, remote: Endpoint) -> None:
        """A relay connection on ``sock``: accepted, or the relay's end of a tunnel's socket
        pair (``remote`` is then the address of the connection carrying the tunnel)."""
        sock.setblocking(False)
        handle = next(self._ids)
        connection = _Connection(handle, sock, remote)
        self._connections[handle] = connection
        self._loop.watch(sock, EVENT_READ, functools.partial(self._read, connection))
        self._apply(self.service.connection_made(handle, connection.remote, self._clock()))

    def _read(self, connection: _Connection, mask: int) -> None:
        try:
            data = connection.sock.recv(_RECEIVE_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._finish(connection)
        elif not connection.closing:
            now, unix_time = self._clock(), self._wall_clock()
            self._apply(
                self.service.data_received(connection.handle, data, now, unix_time=unix_time)
            )

    def _finish(self, connection: _Connection) -> None:
        """The connection is over (EOF, error, drained, handed off): close it."""
        if connection.gone:
            return
        connection.gone = True
        self._loop.unwatch(connection.sock)
        del self._connections[connection.handle]
        connection.sock.close()
        if not connection.released:
            self._apply(self.service.connection_lost(connection.handle, self._clock()))

    def _report(self) -> None:
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
    """Two paired sockets and a ``SplicePump`` each way, driven by one ``SelectorLoop``.

    ``ended(session, result)`` is called once, after both sockets are closed.
    """

    def __init__(
        self,
        loop: SelectorLoop,
        action: StartSplice,
        client: socket.socket,
        server: socket.socket,
        *,
        pipes: PipePool,
        ended: Callable[[_SplicedSession, SpliceResult], None],
    ) -> None:
        self.action = action
        self._loop = loop
        self._client = client
        self._server = server
        self._ended_callback = ended
        self._to_server = SplicePump(client, server, first=action.to_server, pipes=pipes)
        self._to_client = SplicePump(server, client, first=action.to_client, pipes=pipes)
        self._waits = {self._to_server: PumpWait.YIELD, self._to_client: PumpWait.YIELD}
        self._ended = False
        # One callback object per socket, so re-watching changes the mask only.
        self._on_client = self._ready_callback(client)
        self._on_server = self._ready_callback(server)

    def start(self) -> None:
        """Write the pending bytes and move what can move now; the loop does the rest."""
        self._advance(self._to_client)
        if not self._ended:
            self._advance(self._to_server)
        if not self._ended:
            self._rewatch()

    def end(self, ending: str) -> None:
        """Close both sockets (whatever is still in flight is lost) and report."""
        if self._ended:
            return
        self._ended = True
        for pump in (self._to_server, self._to_client):
            pump.close()
        for sock in (self._client, self._server):
            self._loop.unwatch(sock)
            sock.close()
        result = SpliceResult(
            client_to_server=self._to_server.carried,
            server_to_client=self._to_client.carried,
            ending=ending,
        )
        self._ended_callback(self, result)

    def _ready_callback(self, sock: socket.socket) -> Callable[[int], None]:
        # The pump reading from ``sock`` waits for EVENT_READ, the one writing to it
        # for EVENT_WRITE.
        reading = self._to_server if sock is self._client else self._to_client
        writing = self._to_client if sock is self._client else self._to_server

        def ready(mask: int) -> None:
            if mask & EVENT_READ and self._waits[reading] is not PumpWait.DONE:
                self._advance(reading)
            if mask & EVENT_WRITE and not self._ended and self._waits[writing] is PumpWait.WRITABLE:
                self._advance(writing)
            if not self._ended:
                self._rewatch()

        return ready

    def _advance(self, pump: SplicePump) -> None:
        try:
            wait = pump.advance()
        except OSError as exc:  # a reset, or any other socket error: both directions end
            self.end(f"error: {exc}")
            return
        self._waits[pump] = wait
        if all(wait is PumpWait.DONE for wait in self._waits.values()):
            self.end("closed")

    def _rewatch(self) -> None:
        # A pump that had its turn (YIELD) has an empty pipe and nothing pending, so it
        # waits for its source like one that found nothing: the level-triggered selector
        # reports the source at once if it is still readable.
        loop = self._loop
        for sock, reading, writing, callback in (
            (self._client, self._to_server, self._to_client, self._on_client),
            (self._server, self._to_client, self._to_server, self._on_server),
        ):
            mask = 0
            if self._waits[reading] in (PumpWait.READABLE, PumpWait.YIELD):
                mask |= EVENT_READ
            if self._waits[writing] is PumpWait.WRITABLE:
                mask |= EVENT_WRITE
            loop.watch(sock, mask, callback)


def _listen(host: str, port: int) -> socket.socket:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
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
