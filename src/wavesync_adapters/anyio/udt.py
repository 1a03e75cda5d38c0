"""UDT streams on anyio (asyncio or trio): ``UdtEndpoint`` and its ``UdtStream``s.

Thin by design: one UDP socket, one sans-I/O ``UdtMultiplexer`` and one driver
task that reads every waiting datagram into it, fires its timer, sends what it
returns and hands each connection's events to its stream. The core decides
everything about the protocol (handshakes, timeouts, pacing, flow control); this
module moves bytes and time (DESIGN.md §3).

The driver uses the raw non-blocking socket, not an anyio UDP socket: one
``anyio.wait_readable`` per batch of datagrams instead of one task switch
per datagram is what makes the throughput (docs/benchmarks.md).
"""

from __future__ import annotations

import logging
import math
import secrets
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel

from wavesync_proto.addresses import Endpoint, format_endpoint
from wavesync_proto.udt.connection import UdtConnection
from wavesync_proto.udt.connection_types import ConnectionState, UdtConfig
from wavesync_proto.udt.multiplexer import ConnectionAccepted, UdtMultiplexer

from .._common import ready_wrappers
from .._udp_batches import BatchedUdpSocket, open_udp_socket, tune_udp_socket
from ._net import resolve
from .udt_stream import UdtConnectError, UdtStream

__all__ = ["UdtConnectError", "UdtDatagramPort", "UdtEndpoint", "UdtStream"]

log = logging.getLogger("wavesync.udt")

#: Bytes a stream keeps for its application before it stops taking the connection's
#: events. The core counts events not yet taken as occupied receive buffer, so a
#: reader that stops reading closes the peer's flow window instead of growing this.
DEFAULT_RECEIVE_HIGH_WATER = 1024 * 1024
#: Accepted connections waiting for ``accept()``; more are aborted (a listener nobody
#: serves must not collect connections).
DEFAULT_ACCEPT_BACKLOG = 128
#: A pacing gap shorter than this is not slept: a wake-up through the event loop costs
#: about as much, so the driver just runs again (it yields to other tasks first).
_SPIN_SECONDS = 100e-6
#: Datagrams read per driver turn before the core gets to send: bounds the latency of
#: ACKs while a fast peer floods us.
_RECEIVE_BATCH = 256
#: Foreign (non-UDT) datagrams kept for ``receive_foreign`` when no callback takes them:
#: a handful of STUN answers at a time; a flood of junk is dropped, not stored.
_FOREIGN_QUEUE = 64


class UdtEndpoint:
    """All UDT connections of one UDP socket: connect, rendezvous, listen and accept.

    ``async with UdtEndpoint.bind(("0.0.0.0", 9000)) as endpoint:`` binds a socket of
    its own; ``UdtEndpoint(sock)`` drives a socket handed in (a hole-punched one; it is
    made non-blocking and its kernel buffers enlarged) and leaves it open at the end.
    Leaving the block aborts the connections still open: ``aclose`` each stream first
    for a graceful close. ``foreign_datagram`` receives what is not UDT (a STUN answer
    on a punched socket, say); without it such datagrams wait (at most 64) for
    ``receive_foreign``, and ``send_datagram`` sends one from the same socket, so a
    mediator exchange and the UDT connections share one NAT mapping. ``gso=True``
    sends runs of datagrams with Linux UDP GSO: off by default, as on loopback it made
    bursts the Python receiver dropped (206 MB/s with 1% loss against 300 MB/s with
    none, 200 MiB, docs/udt.md).
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        config: UdtConfig | None = None,
        receive_high_water: int = DEFAULT_RECEIVE_HIGH_WATER,
        accept_backlog: int = DEFAULT_ACCEPT_BACKLOG,
        foreign_datagram: Callable[[bytes, Endpoint], None] | None = None,
        gso: bool = False,
        clock: Callable[[], float] = time.monotonic,
        owns_socket: bool = False,
    ) -> None:
        if sock.type != socket.SOCK_DGRAM:
            raise ValueError("a UdtEndpoint needs a UDP socket")
        tune_udp_socket(sock)
        self.config = config or UdtConfig()
        self._sock = sock
        self._owns_socket = owns_socket
        self._clock = clock
        self._high_water = receive_high_water
        self._backlog = accept_backlog
        self._foreign = foreign_datagram
        self._foreign_queue: deque[tuple[bytes, Endpoint]] = deque()
        self._foreign_waiter: anyio.Event | None = None
        #: Foreign datagrams dropped because nobody took the queued ones.
        self.foreign_dropped = 0
        self._io = BatchedUdpSocket(sock, datagram_bytes=self.config.mss, clock=clock, gso=gso)
        self.multiplexer = UdtMultiplexer(
            now=clock(),
            random_bits=secrets.randbits,
            cookie_secret=secrets.token_bytes(32),
            config=self.config,
        )
        # From here on the multiplexer names the connections with news: a turn pumps
        # only those streams (ready_connections).
        self.multiplexer.ready_connections()
        self._streams: dict[int, UdtStream] = {}
        self._accepted: deque[UdtStream] = deque()
        self._accept_waiter: anyio.Event | None = None
        self._listening = False
        self._group: anyio.abc.TaskGroup | None = None
        self._running = False
        self._stopped: str | None = None
        self._kicked = False
        self._wait_scope: anyio.CancelScope | None = None
        #: anyio's clock minus ours: the driver sleeps on anyio's, stamps with ours.
        self._offset = 0.0
        local = sock.getsockname()
        self.local_address: Endpoint = (str(local[0]), int(local[1]))
        self.family = socket.AddressFamily(sock.family)

    @classmethod
    def bind(cls, local: Endpoint, **options: Any) -> UdtEndpoint:
        """An endpoint on a new UDP socket bound to ``local`` (port 0: any free port)."""
        return cls(open_udp_socket(local), owns_socket=True, **options)

    def now(self) -> float:
        """The endpoint's clock: what it passes the core as ``now``."""
        return self._clock()

    async def __aenter__(self) -> UdtEndpoint:
        if self._group is not None:
            raise RuntimeError("this UdtEndpoint has already been entered")
        self._offset = anyio.current_time() - self._clock()
        group = anyio.create_task_group()
        await group.__aenter__()
        self._group = group
        self._running = True
        group.start_soon(self._drive)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        assert self._group is not None
        now = self._clock()
        for stream in list(self._streams.values()):
            if stream.connection.state is not ConnectionState.CLOSED:
                stream.connection.abort(now)
        # One last send, even when a cancellation stopped the driver first: the peers
        # hear our Shutdowns (those of streams closed a moment ago too) rather than
        # keep the connections until their idle timeout.
        try:
            self._io.send_all(self.multiplexer.datagrams_to_send(now))
        except OSError as send_error:
            log.debug("udt: the last send failed: %s", send_error)
        self._stop("endpoint closed")
        self._group.cancel_scope.cancel()
        try:
            if isinstance(exc, anyio.get_cancelled_exc_class()):
                # It may be ours (the driver failed) or an outer scope's: the group knows.
                return await self._group.__aexit__(exc_type, exc, traceback)
            # Anything else the block raised goes on as it is, not wrapped in the task
            # group's ExceptionGroup: the driver is an implementation detail.
            await self._group.__aexit__(None, None, None)
            return None
        finally:
            self._stop("endpoint closed")
            self._io.release(closing=self._owns_socket)
            if self._owns_socket:
                self._sock.close()

    # --- opening connections ----------------------------------------------------------

    async def connect(self, peer: Endpoint) -> UdtStream:
        """A regular UDT connect to a listener at ``peer``.

        Raises ``UdtConnectError`` when the core gives up (no answer within its connect
        timeout, 3 s as in UDT 4.11, or a refusal).
        """
        peer = await resolve(peer)
        stream = self._adopt(self.multiplexer.connect(peer, self._clock()))
        await stream._wait_established(f"connect to {format_endpoint(peer)}")
        return stream

    async def rendezvous(self, candidates: Sequence[Endpoint]) -> UdtStream:
        """A rendezvous connect toward every candidate at once; the first that answers wins.

        Both peers call this with each other's addresses (hole punching). Raises
        ``UdtConnectError`` when none answers within the core's rendezvous timeout.
        """
        if not candidates:
            raise ValueError("rendezvous needs at least one candidate address")
        addresses = [await resolve(candidate) for candidate in candidates]
        stream = self._adopt(self.multiplexer.rendezvous(addresses, self._clock()))
        await stream._wait_established(
            "rendezvous with " + ", ".join(format_endpoint(a) for a in addresses)
        )
        return stream

    def listen(self) -> None:
        """Accept regular connects from now on (``accept`` hands them out)."""
        if not self._listening:
            self._listening = True
            self.multiplexer.listen()
            log.info("udt listening on %s", format_endpoint(self.local_address))

    async def accept(self) -> UdtStream:
        """The next connection a peer opened to us (``listen`` must have been called)."""
        if not self._listening:
            raise RuntimeError("call listen() before accept()")
        while not self._accepted:
            if self._stopped is not None:
                raise anyio.BrokenResourceError(self._stopped)
            self._accept_waiter = anyio.Event()
            await self._accept_waiter.wait()
        return self._accepted.popleft()

    async def serve(self, handler: Callable[[UdtStream], Awaitable[None]]) -> None:
        """Listen and run ``handler`` on each accepted stream in its own task, until
        cancelled. Each stream is closed (``aclose``) when its handler returns."""

        async def run(stream: UdtStream) -> None:
            async with stream:
                await handler(stream)

        self.listen()
        async with anyio.create_task_group() as group:
            while True:
                group.start_soon(run, await self.accept())

    # --- datagrams that are not UDT --------------------------------------------------------

    def send_datagram(self, data: bytes, peer: Endpoint) -> None:
        """Send one datagram that is not UDT (a STUN request) from this endpoint's socket."""
        if self._stopped is not None:
            raise anyio.BrokenResourceError(self._stopped)
        self._io.send_all([(data, peer)])

    async def receive_foreign(self) -> tuple[bytes, Endpoint]:
        """The next datagram that was not UDT (only without a ``foreign_datagram`` callback)."""
        while not self._foreign_queue:
            if self._stopped is not None:
                raise anyio.BrokenResourceError(self._stopped)
            self._foreign_waiter = anyio.Event()
            await self._foreign_waiter.wait()
        return self._foreign_queue.popleft()

    def datagram_port(self) -> UdtDatagramPort:
        """This endpoint as an anyio-UDP-socket-like port for STUN exchanges
        (``request_connection(udp=...)``, ``MediatorListener.acknowledge``)."""
        return UdtDatagramPort(self)

    def _queue_foreign(self, data: bytes, source: Endpoint) -> None:
        if len(self._foreign_queue) >= _FOREIGN_QUEUE:
            self.foreign_dropped += 1
            return
        self._foreign_queue.append((data, source))
        if self._foreign_waiter is not None:
            self._foreign_waiter.set()
            self._foreign_waiter = None

    # --- the driver -------------------------------------------------------------------

    def _adopt(self, connection: UdtConnection) -> UdtStream:
        if self._stopped is not None:
            connection.abort(self._clock())
            raise anyio.BrokenResourceError(self._stopped)
        stream = UdtStream(self, connection, self._high_water)
        self._streams[connection.socket_id] = stream
        self._kick()
        return stream

    def _forget(self, stream: UdtStream) -> None:
        self._streams.pop(stream.connection.socket_id, None)

    def _kick(self) -> None:
        """Something changed outside the driver (data to send, a close): run it again."""
        self._kicked = True
        if self._wait_scope is not None:
            self._wait_scope.cancel()
            self._wait_scope = None

    def _stop(self, why: str) -> None:
        self._running = False
        if self._stopped is None:
            self._stopped = why
        for stream in list(self._streams.values()):
            stream._break(why)
        for stream in self._accepted:
            stream._break(why)
        if self._accept_waiter is not None:
            self._accept_waiter.set()
        if self._foreign_waiter is not None:
            self._foreign_waiter.set()

    def _deliver(self) -> None:
        multiplexer = self.multiplexer
        while (event := multiplexer.next_event()) is not None:
            if isinstance(event, ConnectionAccepted):
                self._take_accepted(event.connection)
        # Only the streams whose connection did something (O(active), not O(all)): what
        # a stream's own calls change (a read that frees buffer, a close) it pumps itself.
        for stream in ready_wrappers(multiplexer, self._streams):
            stream._pump()

    def _take_accepted(self, connection: UdtConnection) -> None:
        stream = self._adopt(connection)
        if len(self._accepted) >= self._backlog:
            log.warning(
                "udt: aborting a connection from %s: %d wait for accept()",
                connection.peer_address,
                len(self._accepted),
            )
            connection.abort(self._clock())
            return
        self._accepted.append(stream)
        if self._accept_waiter is not None:
            self._accept_waiter.set()
            self._accept_waiter = None

    async def _drive(self) -> None:
        multiplexer = self.multiplexer
        io = self._io
        sock = self._sock
        clock = self._clock
        feed = multiplexer.receive_datagram
        foreign = self._foreign or self._queue_foreign

        try:
            while True:
                io.receive_all(feed, _RECEIVE_BATCH, foreign)
                now = clock()
                deadline = multiplexer.get_timer()
                if deadline is not None and deadline <= now:
                    multiplexer.handle_timer(now)
                outgoing = multiplexer.datagrams_to_send(now)
                if outgoing or io.pending:
                    io.send_all(outgoing)
                self._deliver()
                if self._kicked:
                    self._kicked = False
                    await anyio.lowlevel.checkpoint()
                    continue
                deadline = multiplexer.get_timer()
                if deadline is not None and deadline - clock() < _SPIN_SECONDS:
                    await anyio.lowlevel.checkpoint()
                    continue
                wake_at = math.inf if deadline is None else deadline + self._offset
                with anyio.CancelScope(deadline=wake_at) as scope:
                    self._wait_scope = scope
                    if io.pending:
                        await anyio.wait_writable(sock)
                    else:
                        await anyio.wait_readable(sock)
                self._wait_scope = None
        except BaseException as exc:
            self._wait_scope = None
            self._stop(f"udt endpoint stopped: {exc!r}")
            raise


class UdtDatagramPort:
    """An endpoint's non-UDT datagrams, shaped like an anyio UDP socket's send/receive.

    STUN transactions written for ``anyio.abc.UDPSocket`` run on it unchanged, so the
    mediator sees the very socket (and NAT mapping) the UDT connections use.
    """

    def __init__(self, endpoint: UdtEndpoint) -> None:
        self.endpoint = endpoint

    async def send(self, item: tuple[bytes, tuple[str, int]]) -> None:
        data, peer = item
        self.endpoint.send_datagram(data, (str(peer[0]), int(peer[1])))
        await anyio.lowlevel.checkpoint()

    async def receive(self) -> tuple[bytes, Endpoint]:
        return await self.endpoint.receive_foreign()
