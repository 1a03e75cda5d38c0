"""The I/O thread under a blocking ``UdtEndpoint``: one selector loop per UDP socket.

One named thread owns the UDP socket, the sans-I/O ``UdtMultiplexer`` and the
I/O thread's end of every stream's ``socket.socketpair()``. Each turn it reads every
waiting datagram into the multiplexer (a bounded batch, through the adapters' shared
``BatchedUdpSocket``: GRO runs in, GSO runs out with ``gso``), fires the core's timer,
moves bytes between each connection and its socketpair end, and sends what the core
returns (what the kernel refuses waits for the socket to be writable). Other threads
never touch the multiplexer: they queue a callable (``call_soon``) and wake the loop.
The core decides everything about the protocol (DESIGN.md §3); this module moves bytes
and time.

Back-pressure both ways: a socketpair end is read only while the connection's send
buffer has room (a writer then blocks in ``sendall``), and a connection's events are
taken only while the bytes waiting for the application stay below a high-water mark
(the core counts untaken events as occupied receive buffer, so the peer's flow
window closes instead of our memory growing).

This module imports nothing of asyncio, anyio or trio.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import selectors
import socket
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError

from wavesync_proto.addresses import Endpoint, format_endpoint
from wavesync_proto.errors import LocalProtocolError
from wavesync_proto.udt.connection import UdtConnection
from wavesync_proto.udt.connection_types import (
    CloseReason,
    ConnectionClosed,
    ConnectionEstablished,
    ConnectionState,
    DataReceived,
)
from wavesync_proto.udt.multiplexer import ConnectionAccepted, UdtMultiplexer

from .._common import ready_wrappers
from .._udp_batches import BatchedUdpSocket
from ..errors import UdtConnectError

__all__ = ["StreamBridge", "UdtIoLoop"]

log = logging.getLogger("wavesync.udt")

_READ = selectors.EVENT_READ
_WRITE = selectors.EVENT_WRITE
#: Datagrams read per turn before the core gets to answer: bounds the latency of our
#: ACKs while a fast peer floods us (as the anyio driver's).
RECEIVE_BATCH = 256
#: A deadline nearer than this is not slept on: ``epoll_wait`` sleeps whole
#: milliseconds, so a pacing gap of microseconds would become one. The loop polls.
_SPIN_SECONDS = 100e-6
#: The longest the loop sleeps with nothing timed: a safety net, not a mechanism.
_IDLE_POLL_SECONDS = 1.0
#: Bytes read from a socketpair end at once (less when the send buffer has less room).
_PULL_BYTES = 256 * 1024
#: Received bytes a stream holds beyond what its socketpair took, before the loop
#: stops taking the connection's events (back-pressure to the peer's flow window).
RECEIVE_HIGH_WATER = 1024 * 1024
#: Received bytes a stream gathers over busy turns (data arrived in each) before it
#: writes them to its socketpair: fewer, larger writes mean fewer wake-ups of the
#: reading thread, each a hand-over of the GIL (a third of the wake-ups at 64 KiB).
_FLUSH_BYTES = 64 * 1024
#: Reads that discard what the application wrote after its peer closed.
_DRAIN_READS = 16
#: Buffers per ``sendmsg`` to a socketpair end (Linux's IOV_MAX is 1024).
_IOV_MAX = 512
#: Kernel buffer asked for on each socketpair end: a few ACKs' worth at full speed.
_PAIR_BUFFER_BYTES = 1024 * 1024
#: Ends after which the application's socket reads a clean EOF after the last byte
#: (any others: EOF, or ECONNRESET if the application's own bytes were left unread).
_CLEAN_ENDS = (CloseReason.PEER_CLOSED, CloseReason.LOCAL_CLOSE)


def _socketpair() -> tuple[socket.socket, socket.socket]:
    inner, outer = socket.socketpair()
    for end in (inner, outer):
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            with contextlib.suppress(OSError):
                end.setsockopt(socket.SOL_SOCKET, option, _PAIR_BUFFER_BYTES)
    inner.setblocking(False)
    return inner, outer


class StreamBridge:
    """One UDT connection and the I/O thread's end of its socketpair.

    ``outer`` is the application's socket (a real ``socket.socket``). Everything but
    the read-only properties runs on the I/O thread.
    """

    __slots__ = (
        "_clock",
        "_closed",
        "_connection",
        "_done",
        "_full",
        "_high_water",
        "_mask",
        "_pending",
        "_pending_bytes",
        "_user_eof",
        "_user_gone",
        "established",
        "inner",
        "outer",
        "waiter",
        "what",
    )

    def __init__(
        self,
        connection: UdtConnection,
        what: str,
        *,
        clock: Callable[[], float],
        high_water: int = RECEIVE_HIGH_WATER,
    ) -> None:
        self._connection = connection
        self._clock = clock
        self._high_water = high_water
        self.what = what
        self.inner, self.outer = _socketpair()
        #: Resolved with ``outer`` once established; an error if it never is.
        self.waiter: Future[socket.socket] | None = None
        self.established = False
        self._closed: ConnectionClosed | None = None
        self._pending: deque[memoryview] = deque()
        self._pending_bytes = 0
        self._user_eof = False  # the application shut down (or closed) its end for writing
        self._user_gone = False  # ... and will not read either: drop what arrives
        self._done = False  # the inner end is closed: the bridge is over
        self._full = False  # the pair refused bytes: wait until it is writable
        self._mask = 0

    # --- read-only views, for any thread ------------------------------------------------

    @property
    def connection(self) -> UdtConnection:
        return self._connection

    @property
    def peer_address(self) -> Endpoint | None:
        return self._connection.peer_address

    @property
    def close_reason(self) -> CloseReason | None:
        """Why the connection ended (None while it is open)."""
        return None if self._closed is None else self._closed.reason

    @property
    def close_detail(self) -> str:
        return "" if self._closed is None else self._closed.detail

    @property
    def buffered_bytes(self) -> int:
        """Received bytes the socketpair has not taken yet."""
        return self._pending_bytes

    # --- the I/O thread's side ----------------------------------------------------------

    def pull(self, now: float) -> None:
        """The application's end wrote: move what the send buffer has room for."""
        connection = self._connection
        space = connection.send_space
        if space <= 0 or self._user_eof:
            return
        try:
            data = self.inner.recv(min(space, _PULL_BYTES))
        except BlockingIOError:
            return
        except OSError:  # ECONNRESET: the application closed with our bytes unread
            data = b""
            self._user_gone = True
        if data:
            connection.send(data)
            return
        # EOF: UDT4 has no half-close, so the application's shutdown(SHUT_WR) or close()
        # closes the connection gracefully; what it wrote is still delivered.
        self._user_eof = True
        if connection.state in (ConnectionState.CONNECTING, ConnectionState.CONNECTED):
            with contextlib.suppress(LocalProtocolError):  # the peer closed a moment ago
                connection.close(now)

    def pump(self) -> None:
        """Take the connection's events while below high water; write them to the pair
        once there are ``_FLUSH_BYTES``, or no more came this turn, or before the loop
        sleeps (``flush``)."""
        connection = self._connection
        pending = self._pending
        arrived = False
        while self._pending_bytes < self._high_water:
            event = connection.next_event()
            if event is None:
                break
            if type(event) is DataReceived:
                arrived = True
                if event.data and not self._user_gone:
                    pending.append(memoryview(event.data))
                    self._pending_bytes += len(event.data)
            elif isinstance(event, ConnectionEstablished):
                self._on_established(event)
            elif isinstance(event, ConnectionClosed):
                self._on_closed(event)
        if pending and (
            not arrived or self._pending_bytes >= _FLUSH_BYTES or self._closed is not None
        ):
            self.flush()
        if self._closed is not None and not self._done and not pending:
            self.finish()

    def flush(self) -> None:
        """Write waiting bytes to the pair until the kernel's buffer is full."""
        pending = self._pending
        # One system call for many events: data arrives a few packets per event, and a
        # send per event cost a quarter of the receiving thread's time (py-spy).
        sendmsg = self.inner.sendmsg
        while pending:
            batch = list(itertools.islice(pending, _IOV_MAX)) if len(pending) > 1 else [pending[0]]
            try:
                sent = sendmsg(batch)
            except BlockingIOError:
                self._full = True
                return
            except OSError:  # EPIPE: the application closed its end
                self._drop_pending()
                self._user_gone = True
                return
            self._pending_bytes -= sent
            while sent:
                chunk = pending[0]
                if sent >= len(chunk):
                    sent -= len(chunk)
                    pending.popleft()
                else:
                    pending[0] = chunk[sent:]
                    sent = 0
        self._full = False

    def unsettled(self) -> bool:
        """Quiet connection, turn due anyway: bytes for a pair with room, or a close."""
        return not (self._done or self._full) and (bool(self._pending) or self._closed is not None)

    def wanted_mask(self) -> int:
        """What the selector should watch on the inner end now."""
        if self._done:
            return 0
        mask = _WRITE if self._full else 0
        connection = self._connection
        if (
            self.established
            and not self._user_eof
            and connection.state is ConnectionState.CONNECTED
            and connection.send_space > 0
        ):
            mask |= _READ
        return mask

    def abort(self, now: float) -> None:
        """Cut the connection (its Shutdown goes out on the loop's next send)."""
        if self._connection.state is not ConnectionState.CLOSED:
            self._connection.abort(now)
        self._user_gone = True
        self._drop_pending()
        self.pump()

    def finish(self) -> None:
        """Close the inner end: the application reads what is queued, then EOF."""
        if self._done:
            return
        self._done = True
        closed = self._closed
        if closed is not None and closed.reason in _CLEAN_ENDS:
            # Bytes the application wrote that we never read would turn its EOF into
            # ECONNRESET (Linux marks the peer of a socket closed with unread data).
            with contextlib.suppress(OSError):
                for _ in range(_DRAIN_READS):  # bounded: a writer that never stops
                    if not self.inner.recv(_PULL_BYTES):
                        break
        self.inner.close()
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            self._fail_waiter(waiter)
        if not self.established or (waiter is not None and waiter.cancelled()):
            self.outer.close()  # never handed to anyone

    def _on_established(self, event: ConnectionEstablished) -> None:
        self.established = True
        log.info(
            "udt connection %d established with %s (peer socket %d)",
            self._connection.socket_id,
            format_endpoint(event.peer_address),
            event.peer_socket_id,
        )
        waiter = self.waiter
        if waiter is not None:
            try:
                waiter.set_result(self.outer)
            except InvalidStateError:  # the caller gave up (its timeout) just now
                self.abort(self._clock())

    def _on_closed(self, event: ConnectionClosed) -> None:
        self._closed = event
        log.info(
            "udt connection %d closed: %s (%s); %s",
            self._connection.socket_id,
            event.reason.name,
            event.detail,
            self._connection.counters,
        )
        if event.reason is CloseReason.ABORTED:
            self._drop_pending()  # ours (or the endpoint's) abort: nobody reads on

    def _fail_waiter(self, waiter: Future[socket.socket]) -> None:
        closed = self._closed
        if closed is not None:
            reason, detail = closed.reason, closed.detail
        else:
            reason, detail = CloseReason.ABORTED, "endpoint closed"
        with contextlib.suppress(InvalidStateError):
            waiter.set_exception(
                UdtConnectError(f"udt {self.what} failed: {detail}", reason=reason, detail=detail)
            )

    def _drop_pending(self) -> None:
        self._pending.clear()
        self._pending_bytes = 0


class UdtIoLoop:
    """The selector loop of one endpoint, on its own thread (``start``/``stop``)."""

    def __init__(
        self,
        sock: socket.socket,
        multiplexer: UdtMultiplexer,
        *,
        clock: Callable[[], float],
        datagram_bytes: int,
        owns_socket: bool,
        gso: bool = False,
        receive_high_water: int = RECEIVE_HIGH_WATER,
        on_foreign: Callable[[bytes, Endpoint], None],
        on_accepted: Callable[[StreamBridge], None],
        on_stopped: Callable[[str], None],
    ) -> None:
        self.sock = sock
        self.multiplexer = multiplexer
        self.bridges: dict[int, StreamBridge] = {}
        # Pumped next turn beside the core's ready ones: the selector's, the unsettled.
        self._active: dict[int, StreamBridge] = {}
        self._clock = clock
        self._owns_socket = owns_socket
        self._high_water = receive_high_water
        #: Reads and sends on ``sock``; only this loop's thread touches it.
        self.io = BatchedUdpSocket(sock, datagram_bytes=datagram_bytes, clock=clock, gso=gso)
        self._on_foreign = on_foreign
        self._on_accepted = on_accepted
        self._on_stopped = on_stopped
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._wake_sent = False
        self._commands: deque[Callable[[], None]] = deque()
        self._udp_mask = _READ
        self._stopping = False
        self._more = False  # the last batch was full: more datagrams are waiting
        port = sock.getsockname()[1]
        self.thread = threading.Thread(target=self._run, name=f"wavesync-udt-{port}", daemon=False)

    def start(self) -> None:
        self._selector.register(self.sock, _READ, None)
        self._selector.register(self._wake_r, _READ, self._wake_r)
        self.thread.start()

    def call_soon(self, command: Callable[[], None]) -> None:
        """Run ``command`` on the I/O thread, soon (from any thread)."""
        self._commands.append(command)
        self.wake()

    def wake(self) -> None:
        if not self._wake_sent:
            self._wake_sent = True
            with contextlib.suppress(OSError):  # full (a wake-up is pending) or closed
                self._wake_w.send(b"\0")

    def stop(self) -> None:
        """Ask the loop to abort everything and end (from any thread)."""
        self._stopping = True
        self.wake()

    def send_soon(self, data: bytes, peer: Endpoint) -> None:
        """Send a datagram now, or from the I/O thread when the kernel's buffer is full."""
        try:
            self.sock.sendto(data, peer)
        except BlockingIOError:
            self.call_soon(lambda: self._send([(data, peer)]))

    # --- the loop -----------------------------------------------------------------------

    def _run(self) -> None:
        why = "endpoint closed"
        try:
            self._loop()
        except BaseException as exc:
            why = f"udt endpoint stopped: {exc!r}"
            log.exception("udt endpoint %s stopped", self.sock.getsockname())
        finally:
            self._shut(why)

    def _loop(self) -> None:
        multiplexer = self.multiplexer
        select = self._selector.select
        clock = self._clock
        bridges = self.bridges
        while not self._stopping:
            timeout = self._timeout()
            if timeout:
                self._flush_before_sleep()
            ready = select(timeout)
            if ready:
                self._handle_ready(ready)
            if self._commands:
                self._run_commands()
            self._receive_batch()
            now = clock()
            deadline = multiplexer.get_timer()
            if deadline is not None and deadline <= now:
                multiplexer.handle_timer(now)
            while (event := multiplexer.next_event()) is not None:
                if isinstance(event, ConnectionAccepted):
                    self._accepted(event.connection)
            active = self._active
            self._active = {}
            for bridge in ready_wrappers(multiplexer, bridges):
                active[bridge.connection.socket_id] = bridge
            for socket_id, bridge in active.items():
                bridge.pump()
                self._watch(bridge)
                if bridge.unsettled():
                    self._active[socket_id] = bridge
            outgoing = multiplexer.datagrams_to_send(clock())
            if outgoing or self.io.pending:
                self._send(outgoing)

    def _handle_ready(self, ready: list[tuple[selectors.SelectorKey, int]]) -> None:
        for key, mask in ready:
            handler = key.data
            if handler is None:
                continue  # the UDP socket: read every turn
            if handler is self._wake_r:
                self._drain_wake()
                continue
            assert isinstance(handler, StreamBridge)
            self._active[handler.connection.socket_id] = handler
            if mask & _WRITE:
                handler.flush()
            if mask & _READ:
                handler.pull(self._clock())

    def _timeout(self) -> float:
        if self._more or self._commands or self._stopping:
            return 0.0
        deadline = self.multiplexer.get_timer()
        if deadline is None:
            return _IDLE_POLL_SECONDS
        wait = deadline - self._clock()
        return 0.0 if wait < _SPIN_SECONDS else min(wait, _IDLE_POLL_SECONDS)

    def _flush_before_sleep(self) -> None:
        # Bridges with bytes for a pair that has room are all unsettled, so in _active.
        for bridge in list(self._active.values()):
            if bridge._pending and not bridge._full:
                bridge.flush()
                self._watch(bridge)

    def _drain_wake(self) -> None:
        # Drain, then clear the flag: a wake-up sent after the drain stays in the socket
        # (the next select returns at once); the other order could lose one.
        with contextlib.suppress(OSError):
            while self._wake_r.recv(4096):
                pass
        self._wake_sent = False

    def _run_commands(self) -> None:
        commands = self._commands
        while commands:
            commands.popleft()()

    def _receive_batch(self) -> None:
        count = self.io.receive_all(
            self.multiplexer.receive_datagram, RECEIVE_BATCH, self._on_foreign
        )
        self._more = count >= RECEIVE_BATCH

    def _send(self, datagrams: list[tuple[bytes, Endpoint]]) -> None:
        io = self.io
        io.send_all(datagrams)
        # What the kernel refused waits in ``pending``: wake when the socket is writable.
        mask = _READ | _WRITE if io.pending else _READ
        if mask != self._udp_mask:
            self._udp_mask = mask
            self._selector.modify(self.sock, mask, None)

    @property
    def receive_errors(self) -> int:
        return self.io.receive_errors

    @property
    def send_errors(self) -> int:
        return self.io.send_errors

    def _watch(self, bridge: StreamBridge) -> None:
        mask = bridge.wanted_mask()
        current = bridge._mask
        if mask == current:
            if bridge._done:
                self.bridges.pop(bridge.connection.socket_id, None)
            return
        bridge._mask = mask
        if current == 0:
            self._selector.register(bridge.inner, mask, bridge)
        elif mask == 0:
            self._selector.unregister(bridge.inner)
        else:
            self._selector.modify(bridge.inner, mask, bridge)
        if bridge._done:
            self.bridges.pop(bridge.connection.socket_id, None)

    # --- connections --------------------------------------------------------------------

    def adopt(self, connection: UdtConnection, what: str) -> StreamBridge:
        """A bridge for a new connection (on the I/O thread)."""
        bridge = StreamBridge(connection, what, clock=self._clock, high_water=self._high_water)
        self.bridges[connection.socket_id] = bridge
        return bridge

    def _accepted(self, connection: UdtConnection) -> None:
        peer = connection.peer_address
        bridge = self.adopt(connection, "accept from " + ("?" if peer is None else str(peer)))
        bridge.pump()  # ConnectionEstablished: the bridge is ready to hand out
        self._on_accepted(bridge)

    def _shut(self, why: str) -> None:
        """Abort every connection, send their Shutdowns, close what the loop owns."""
        self._stopping = True
        # From here on no thread queues a command: run those queued, then abort every
        # connection, theirs included (a connect waiting on one fails "endpoint closed").
        self._on_stopped(why)
        while self._commands:
            try:
                self._commands.popleft()()
            except Exception:  # pragma: no cover - a command must not stop the shutdown
                log.exception("udt: a command failed while stopping")
        now = self._clock()
        for bridge in list(self.bridges.values()):
            try:
                bridge.abort(now)
                bridge.finish()
            except Exception:  # pragma: no cover - one broken bridge must not stop the rest
                log.exception("udt: closing a stream failed")
        with contextlib.suppress(Exception):
            # The peers hear our Shutdowns rather than keep the connections until their
            # idle timeout.
            self._send(self.multiplexer.datagrams_to_send(now))
        self.bridges.clear()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()
        self.io.release(closing=self._owns_socket)
        if self._owns_socket:
            # Here, not in the caller's close(): that may run on this very thread (from
            # a foreign-datagram callback), and the loop must not lose its socket mid-turn.
            self.sock.close()
