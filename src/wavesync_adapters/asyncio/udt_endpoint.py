"""UDT on plain asyncio (uvloop too): ``UdtEndpoint``, one UDP socket's connections.

Thin by design: one UDP socket watched with ``loop.add_reader``, one sans-I/O
``UdtMultiplexer``, the core's timer on ``loop.call_at``. The reader callback reads
every waiting datagram into the multiplexer (``BatchedUdpSocket``: with Linux GRO a
run of them in one system call); the answer (``datagrams_to_send``) is computed once
per burst, in a callback deferred with ``call_soon``, and sent as one list (with
``gso=True``, runs of it as one ``sendmsg``). What the kernel refuses waits until
``loop.add_writer`` says the socket takes more. No ``asyncio.DatagramTransport``: it
would read one datagram per loop turn, send one per call and keep a buffer of its
own beside ours. The core decides everything about the protocol (DESIGN.md §3).
``UdtEndpoint.create_connection(protocol_factory, peer)`` and
``start_serving(protocol_factory)`` give ``UdtTransport``/``Protocol`` pairs; the
stream pairs are built on them in ``udt.py``. A datagram the multiplexer does not
take (a STUN answer on a punched socket) goes to the ``foreign_datagram`` callback,
or waits in a small queue for ``receive_foreign``; ``send_datagram`` and
``datagram_port()`` send such datagrams from the same socket, so a mediator exchange
and the UDT connections share one NAT mapping.

This module imports nothing of anyio.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import TypeVar

from wavesync_proto.addresses import Endpoint, format_endpoint
from wavesync_proto.udt.connection import UdtConnection
from wavesync_proto.udt.connection_types import CloseReason, UdtConfig
from wavesync_proto.udt.multiplexer import ConnectionAccepted, UdtMultiplexer

from .._common import ready_wrappers
from .._udp_batches import BatchedUdpSocket, open_udp_socket, tune_udp_socket
from .udt_transport import UdtConnectError, UdtTransport

__all__ = ["DEFAULT_LIMIT", "UdtDatagramPort", "UdtEndpoint", "create_udt_endpoint"]

log = logging.getLogger("wavesync.udt")

_P = TypeVar("_P", bound=asyncio.BaseProtocol)

#: asyncio's own default for a StreamReader (``asyncio.streams._DEFAULT_LIMIT``).
DEFAULT_LIMIT = 64 * 1024
#: A deadline nearer than this is not put on the loop's timer: ``epoll_wait`` sleeps in
#: whole milliseconds, so a pacing gap of a few microseconds would become one. The run
#: is queued with ``call_soon`` instead (the loop still polls its sockets in between).
_SPIN_SECONDS = 100e-6
#: Datagrams read per wake-up before the core gets to answer: bounds the latency of our
#: ACKs while a fast peer floods us.
_RECEIVE_BATCH = 256
#: While datagrams wait for the kernel to take them (``BatchedUdpSocket.pending``), the
#: core's timer is not run sooner than this: its pacing slot stays due until the socket
#: is writable again, and that wakes the endpoint by itself.
_PAUSED_POLL_SECONDS = 0.005
#: Foreign (non-UDT) datagrams kept for ``receive_foreign`` when no callback takes them:
#: a handful of STUN answers at a time. When full the oldest goes: a flood of junk
#: must not hold memory, and the newest is the likelier answer to a retransmission.
_FOREIGN_QUEUE = 64


class UdtEndpoint:
    """All UDT connections of one UDP socket: connect, rendezvous, serve.

    Made by ``await create_udt_endpoint(local)`` (a socket of its own) or
    ``await create_udt_endpoint(sock=sock)`` (a socket handed in, a hole-punched one:
    it is made non-blocking, its kernel buffers enlarged, and it is left open at the
    end). ``close()`` aborts the connections still open (``UdtConnectionResetError`` on
    their side): close each transport first for a graceful close.
    ``foreign_datagram`` receives what is not UDT (a STUN answer on a punched socket);
    without it such datagrams wait (at most 64, the oldest dropped) for
    ``receive_foreign``. ``gso=True`` sends runs of equal-sized datagrams to one peer
    as one ``sendmsg`` with Linux UDP GSO, as the anyio adapter's ``gso``: off by
    default there too. Linux GRO is asked for on every socket (the kernel hands a run
    over in one read; ``BatchedUdpSocket`` cuts it back into datagrams).
    ``clock`` is what the core is given as ``now`` (``time.monotonic`` by default: the
    stdlib loop's own clock; uvloop's ``loop.time()`` counts libuv's whole
    milliseconds, too coarse for a 0.2 ms RTT and pacing periods of microseconds).
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        loop: asyncio.AbstractEventLoop,
        config: UdtConfig | None = None,
        foreign_datagram: Callable[[bytes, Endpoint], None] | None = None,
        gso: bool = False,
        clock: Callable[[], float] | None = None,
        owns_socket: bool = False,
    ) -> None:
        if sock.type != socket.SOCK_DGRAM:
            raise ValueError("a UdtEndpoint needs a UDP socket")
        tune_udp_socket(sock)
        self.loop = loop
        self.config = config or UdtConfig()
        self._sock = sock
        self._owns_socket = owns_socket
        self._clock = clock or time.monotonic
        #: The loop's clock minus ours: the timer is armed on the loop's, stamped with ours.
        self._offset = loop.time() - self._clock()
        self._foreign = foreign_datagram
        self._foreign_queue: deque[tuple[bytes, Endpoint]] = deque()
        self._foreign_ready = asyncio.Event()
        #: Foreign datagrams dropped because nobody took the queued ones.
        self.foreign_dropped = 0
        # The loop watches a duplicate: ours (the caller's, if handed in) may be closed
        # or watched by its owner independently, and the duplicate is always ours to close.
        self._watched = sock.dup()
        self._fd = self._watched.fileno()
        self._io = BatchedUdpSocket(
            self._watched, datagram_bytes=self.config.mss, clock=self._clock, gso=gso
        )
        self._reading = False
        self._writer_armed = False
        self.multiplexer = UdtMultiplexer(
            now=self._clock(),
            random_bits=secrets.randbits,
            cookie_secret=secrets.token_bytes(32),
            config=self.config,
        )
        # From here on the multiplexer names the connections with news: a turn pumps
        # only those streams (ready_connections).
        self.multiplexer.ready_connections()
        local = sock.getsockname()
        self.local_address: Endpoint = (str(local[0]), int(local[1]))
        self.family = socket.AddressFamily(sock.family)
        self._transports: dict[int, UdtTransport] = {}
        # Transports to pump on the next run besides those the core reports ready (a
        # resume_reading, a close: their events wait in the core untouched).
        self._wanted: dict[int, UdtTransport] = {}
        self._serving: Callable[[], asyncio.BaseProtocol] | None = None
        self._accepted: set[UdtTransport] = set()
        self._accepted_done: asyncio.Event | None = None
        self._scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = 0.0
        self._closing = False
        self._close_when_idle = False
        self._closed: asyncio.Future[None] = loop.create_future()

    async def _start(self) -> None:
        self.loop.add_reader(self._fd, self._on_readable)
        self._reading = True

    @property
    def errors_received(self) -> int:
        """Reads that failed (an ICMP error queued on the socket, say)."""
        return self._io.receive_errors

    def now(self) -> float:
        """The endpoint's clock: what it passes the core as ``now``."""
        return self._clock()

    @property
    def connections(self) -> list[UdtTransport]:
        """The transports of the connections open (or opening) on this endpoint."""
        return list(self._transports.values())

    def is_closing(self) -> bool:
        return self._closing

    async def __aenter__(self) -> UdtEndpoint:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
        await self.wait_closed()

    def close(self) -> None:
        """Stop: abort every connection still open, send their Shutdowns, close the socket."""
        if self._closing:
            return
        self._closing = True
        self._serving = None
        for transport in list(self._transports.values()):
            transport._break("endpoint closed")
        # One last send: the peers hear our Shutdowns rather than time out (what the
        # kernel does not take at once is dropped).
        self._io.send_all(self.multiplexer.datagrams_to_send(self._clock()))
        self._release()
        self._foreign_ready.set()  # receive_foreign raises now
        if not self._closed.done():
            self._closed.set_result(None)

    async def wait_closed(self) -> None:
        """Wait until ``close()`` has finished (the socket is released)."""
        await asyncio.shield(self._closed)

    # --- opening connections ------------------------------------------------------------

    async def create_connection(
        self, protocol_factory: Callable[[], _P], peer: Endpoint
    ) -> tuple[UdtTransport, _P]:
        """A regular UDT connect to a listener at ``peer``, as ``loop.create_connection``.

        Raises ``UdtConnectError`` when the core gives up (no answer within its connect
        timeout, 3 s as in UDT 4.11, or a refusal).
        """
        peer = await self._address(peer)
        transport = self._adopt(self.multiplexer.connect(peer, self._clock()), protocol_factory)
        transport.what = f"connect to {format_endpoint(peer)}"
        return await self._established(transport, protocol_factory)

    async def create_rendezvous(
        self, protocol_factory: Callable[[], _P], candidates: Sequence[Endpoint]
    ) -> tuple[UdtTransport, _P]:
        """A rendezvous connect toward every candidate at once; the first that answers wins.

        Both peers call this with each other's addresses (hole punching). Raises
        ``UdtConnectError`` when none answers within the core's rendezvous timeout.
        """
        if not candidates:
            raise ValueError("rendezvous needs at least one candidate address")
        addresses = [await self._address(candidate) for candidate in candidates]
        transport = self._adopt(
            self.multiplexer.rendezvous(addresses, self._clock()), protocol_factory
        )
        transport.what = "rendezvous with " + ", ".join(format_endpoint(a) for a in addresses)
        return await self._established(transport, protocol_factory)

    def start_serving(self, protocol_factory: Callable[[], asyncio.BaseProtocol]) -> None:
        """Accept regular connects from now on: each gets ``protocol_factory()``."""
        if self._closing:
            raise RuntimeError("the UdtEndpoint is closed")
        self._serving = protocol_factory
        self.multiplexer.listen()
        log.info("udt listening on %s", format_endpoint(self.local_address))

    def stop_serving(self) -> None:
        """Accept no more connects (those that arrive are aborted); open ones go on."""
        self._serving = None

    def is_serving(self) -> bool:
        return self._serving is not None

    async def wait_accepted_closed(self) -> None:
        """Wait until every connection accepted so far has ended."""
        while self._accepted:
            self._accepted_done = asyncio.Event()
            await self._accepted_done.wait()

    async def _address(self, endpoint: Endpoint) -> Endpoint:
        try:
            ipaddress.ip_address(endpoint[0])
        except ValueError:
            host, port = endpoint
            infos = await self.loop.getaddrinfo(
                host, port, family=self.family, type=socket.SOCK_DGRAM
            )
            if not infos:
                raise OSError(f"{host!r} resolves to no address") from None
            address = infos[0][4]
            return (str(address[0]), int(address[1]))
        return endpoint

    async def _established(
        self, transport: UdtTransport, protocol_factory: Callable[[], _P]
    ) -> tuple[UdtTransport, _P]:
        try:
            await transport.established
        except asyncio.CancelledError:
            transport.abort()  # do not leave a handshake running for nobody
            raise
        protocol = transport.get_protocol()
        return transport, protocol  # type: ignore[return-value]

    # --- the driver -----------------------------------------------------------------------

    def _adopt(
        self,
        connection: UdtConnection,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        *,
        accepted: bool = False,
    ) -> UdtTransport:
        if self._closing:
            connection.abort(self._clock())
            raise UdtConnectError(
                "the UdtEndpoint is closed", reason=CloseReason.ABORTED, detail="endpoint closed"
            )
        transport = UdtTransport(self, connection, protocol_factory, accepted=accepted)
        self._transports[connection.socket_id] = transport
        self._kick()
        return transport

    def _forget(self, transport: UdtTransport) -> None:
        self._transports.pop(transport.connection.socket_id, None)
        if transport in self._accepted:
            self._accepted.discard(transport)
            if not self._accepted and self._accepted_done is not None:
                self._accepted_done.set()
        if self._close_when_idle and not self._transports and self._serving is None:
            # After this turn's send: the connection's last datagrams go out first.
            self.loop.call_soon(self.close)

    def _kick(self, transport: UdtTransport | None = None) -> None:
        """Something changed (input, a write, a close): run the core soon, once; pump
        ``transport`` then."""
        if transport is not None:
            self._wanted[transport.connection.socket_id] = transport
        if not self._scheduled and not self._closing:
            self._scheduled = True
            self.loop.call_soon(self._run)

    # --- datagrams that are not UDT --------------------------------------------------------

    def send_datagram(self, data: bytes, peer: Endpoint) -> None:
        """Send one datagram that is not UDT (a STUN request) from this endpoint's socket.

        Raises ``ConnectionAbortedError`` once the endpoint is closed."""
        if self._closing:
            raise ConnectionAbortedError("the UdtEndpoint is closed")
        self._send([(data, peer)])

    async def receive_foreign(self) -> tuple[bytes, Endpoint]:
        """The next datagram that was not UDT (only without a ``foreign_datagram`` callback).

        Raises ``ConnectionAbortedError`` once the endpoint is closed."""
        while not self._foreign_queue:
            if self._closing:
                raise ConnectionAbortedError("the UdtEndpoint is closed")
            self._foreign_ready.clear()
            await self._foreign_ready.wait()
        return self._foreign_queue.popleft()

    def datagram_port(self) -> UdtDatagramPort:
        """This endpoint as a datagram port for STUN exchanges (``_net.run_transaction``,
        ``MediatorListener.acknowledge``, a connect request from the punching socket)."""
        return UdtDatagramPort(self)

    def _queue_foreign(self, data: bytes, source: Endpoint) -> None:
        queue = self._foreign_queue
        if len(queue) >= _FOREIGN_QUEUE:
            queue.popleft()
            self.foreign_dropped += 1
            log.debug(
                "udt %s: a foreign datagram dropped (%d waiting)",
                format_endpoint(self.local_address),
                len(queue),
            )
        queue.append((data, source))
        self._foreign_ready.set()

    def _on_readable(self) -> None:
        """The socket has datagrams: read them all (up to a batch), then answer once."""
        if self._closing:
            return
        try:
            self._io.receive_all(
                self.multiplexer.receive_datagram,
                _RECEIVE_BATCH,
                self._foreign or self._queue_foreign,
            )
        except Exception as exc:  # a bug below us: the endpoint cannot go on
            self._fail("reading", exc)
            return
        self._kick()

    def _on_writable(self) -> None:
        """The kernel takes datagrams again: send what waits, then let the core go on."""
        if self._closing:
            return
        try:
            self._io.flush()
        except Exception as exc:
            self._fail("sending", exc)
            return
        if not self._io.pending:
            self._writer_armed = False
            self.loop.remove_writer(self._fd)
            self._kick()

    def _send(self, datagrams: list[tuple[bytes, Endpoint]]) -> None:
        io = self._io
        io.send_all(datagrams)
        if io.pending and not self._writer_armed:
            self._writer_armed = True
            self.loop.add_writer(self._fd, self._on_writable)

    def _run(self) -> None:
        """Fire the timer if due, hand events out, send the answer, re-arm the timer."""
        if self._closing:
            self._scheduled = False
            return
        multiplexer = self.multiplexer
        now = self._clock()
        deadline = multiplexer.get_timer()
        if deadline is not None and deadline <= now:
            multiplexer.handle_timer(now)
        # Events first: writes the protocols make meanwhile go out in this same send.
        while (event := multiplexer.next_event()) is not None:
            if isinstance(event, ConnectionAccepted):
                self._take_accepted(event.connection)
        # Only the transports whose connection did something (O(active), not O(all)).
        wanted = self._wanted
        self._wanted = {}
        for transport in ready_wrappers(multiplexer, self._transports):
            wanted[transport.connection.socket_id] = transport
        for transport in wanted.values():
            transport._pump()
        self._scheduled = False
        if self._closing:
            return
        if not self._io.pending:
            outgoing = multiplexer.datagrams_to_send(self._clock())
            if outgoing:
                self._send(outgoing)
        self._arm()

    def _arm(self) -> None:
        deadline = self.multiplexer.get_timer()
        if deadline is None or self._scheduled:
            return  # nothing timed, or a run is queued (it re-arms)
        now = self._clock()
        if self._io.pending:
            deadline = max(deadline, now + _PAUSED_POLL_SECONDS)
        elif deadline - now < _SPIN_SECONDS:
            self._kick()
            return
        when = deadline + self._offset
        timer = self._timer
        if timer is not None:
            if self._timer_when <= when:
                return  # an earlier wake-up is armed: it runs and re-arms
            timer.cancel()
        self._timer_when = when
        self._timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if not self._scheduled:
            self._scheduled = True
            self._run()

    def _take_accepted(self, connection: UdtConnection) -> None:
        factory = self._serving
        if factory is None:
            log.info("udt: aborting a connection from %s: not serving", connection.peer_address)
            connection.abort(self._clock())
            return
        transport = self._adopt(connection, factory, accepted=True)
        peer = connection.peer_address
        transport.what = "accept from " + ("?" if peer is None else format_endpoint(peer))
        self._accepted.add(transport)

    def _fail(self, doing: str, exc: Exception) -> None:
        self.loop.call_exception_handler(
            {"message": f"udt endpoint: {doing} failed", "exception": exc}
        )
        self._udp_lost(exc)

    def _udp_lost(self, exc: Exception | None) -> None:
        """The socket cannot be used any more: every connection breaks, the endpoint ends."""
        if not self._closing:
            why = f"udp socket lost: {exc!r}"
            log.warning("udt endpoint %s: %s", format_endpoint(self.local_address), why)
            for transport in list(self._transports.values()):
                transport._break(why)
            self._closing = True
            self._release()
            self._foreign_ready.set()
        if not self._closed.done():
            self._closed.set_result(None)

    def _release(self) -> None:
        """Stop watching the socket and the clock; close what is ours to close."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._reading:
            self._reading = False
            self.loop.remove_reader(self._fd)
        if self._writer_armed:
            self._writer_armed = False
            self.loop.remove_writer(self._fd)
        self._io.pending.clear()
        self._io.release(closing=self._owns_socket)
        self._watched.close()
        if self._owns_socket:
            self._sock.close()


class UdtDatagramPort:
    """An endpoint's non-UDT datagrams as a port: ``await send((data, addr))`` and
    ``await receive() -> (data, addr)``, as a STUN transaction needs them.

    The mediator thus sees the very socket (and NAT mapping) the UDT connections use.
    """

    def __init__(self, endpoint: UdtEndpoint) -> None:
        self.endpoint = endpoint

    async def send(self, item: tuple[bytes, tuple[str, int]]) -> None:
        data, peer = item
        self.endpoint.send_datagram(data, (str(peer[0]), int(peer[1])))

    async def receive(self) -> tuple[bytes, Endpoint]:
        return await self.endpoint.receive_foreign()


async def create_udt_endpoint(
    local: Endpoint | None = None,
    *,
    sock: socket.socket | None = None,
    config: UdtConfig | None = None,
    foreign_datagram: Callable[[bytes, Endpoint], None] | None = None,
    gso: bool = False,
    clock: Callable[[], float] | None = None,
) -> UdtEndpoint:
    """An endpoint on a new UDP socket bound to ``local`` (port 0: any free port), or on
    ``sock`` (handed in, left open at the end). ``async with`` it, or ``close()`` it.
    ``gso``: see ``UdtEndpoint``."""
    if (local is None) == (sock is None):
        raise ValueError("give exactly one of local and sock")
    loop = asyncio.get_running_loop()
    owns = sock is None
    if sock is None:
        assert local is not None
        sock = open_udp_socket(local)
    endpoint: UdtEndpoint | None = None
    try:
        endpoint = UdtEndpoint(
            sock,
            loop=loop,
            config=config,
            foreign_datagram=foreign_datagram,
            gso=gso,
            clock=clock,
            owns_socket=owns,
        )
        await endpoint._start()
    except BaseException:
        if endpoint is not None:
            endpoint._release()
        elif owns:
            sock.close()
        raise
    return endpoint
