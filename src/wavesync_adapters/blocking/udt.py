"""UDT streams for blocking code: ``UdtEndpoint``, whose streams are real sockets.

Thin by design, like the anyio and asyncio endpoints: one UDP socket, one sans-I/O
``UdtMultiplexer``, and one named I/O thread (``udt_loop.py``) that feeds it, fires
its timer and sends what it returns. Every stream is one end of a
``socket.socketpair()`` whose other end the I/O thread pumps, so the application
gets a real ``socket.socket``: ``sendall``, ``recv``, ``makefile``, ``settimeout``,
``ssl.SSLContext.wrap_socket`` and ``http.client`` work on it unchanged.

What the application's socket sees:

- a byte stream in order, exactly once; its writes block while the connection's send
  buffer is full;
- EOF once the peer closed and every byte was read (``PEER_CLOSED``);
- EOF (or ``ConnectionResetError``) when the connection timed out or was aborted,
  by either end or by ``UdtEndpoint.close()``: ``stream_info(sock).close_reason``
  says which;
- ``shutdown(SHUT_WR)`` or ``close()`` closes the UDT connection gracefully (UDT4
  has no half-close): what was written is still delivered, and the socket reads
  what arrives until the close completes, then EOF.

This module imports nothing of asyncio, anyio or trio.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import secrets
import socket
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from types import TracebackType
from typing import Any

from wavesync_proto.addresses import Endpoint, format_endpoint
from wavesync_proto.udt.connection import UdtConnection
from wavesync_proto.udt.connection_types import CloseReason, UdtConfig
from wavesync_proto.udt.multiplexer import UdtMultiplexer

from .._udp_socket import open_udp_socket, tune_udp_socket
from ..errors import UdtConnectError
from .udt_loop import RECEIVE_HIGH_WATER, StreamBridge, UdtIoLoop

__all__ = [
    "DEFAULT_ACCEPT_BACKLOG",
    "DEFAULT_RECEIVE_HIGH_WATER",
    "UdtConnectError",
    "UdtDatagramPort",
    "UdtEndpoint",
    "UdtStreamInfo",
]

log = logging.getLogger("wavesync.udt")

#: Bytes a stream holds for its socketpair before the I/O thread stops taking the
#: connection's events: the core counts events not yet taken as occupied receive
#: buffer, so a reader that stops reading closes the peer's flow window instead.
DEFAULT_RECEIVE_HIGH_WATER = RECEIVE_HIGH_WATER
#: Accepted connections waiting for ``accept()``; more are aborted (a listener nobody
#: serves must not collect connections).
DEFAULT_ACCEPT_BACKLOG = 128
#: Foreign (non-UDT) datagrams kept for ``receive_foreign`` when no callback takes them:
#: a handful of STUN answers at a time; a flood of junk is dropped, not stored.
_FOREIGN_QUEUE = 64
#: ``close()`` waits this long for the I/O thread (it stops within one turn).
_JOIN_SECONDS = 10.0


class UdtStreamInfo:
    """What a stream's socket cannot tell: a live view of the UDT connection behind it."""

    __slots__ = ("_bridge",)

    def __init__(self, bridge: StreamBridge) -> None:
        self._bridge = bridge

    @property
    def connection(self) -> UdtConnection:
        """The core's connection (read it, do not drive it: the I/O thread does)."""
        return self._bridge.connection

    @property
    def peer_address(self) -> Endpoint:
        """The peer's UDP address (for a rendezvous, the candidate that answered)."""
        peer = self._bridge.peer_address
        assert peer is not None  # streams are handed out established
        return peer

    @property
    def close_reason(self) -> CloseReason | None:
        """Why the connection ended (None while it is open)."""
        return self._bridge.close_reason

    @property
    def close_detail(self) -> str:
        """The core's words on why it ended ('' while open)."""
        return self._bridge.close_detail

    @property
    def buffered_bytes(self) -> int:
        """Received bytes waiting for room in the socketpair (at most about the
        endpoint's ``receive_high_water``)."""
        return self._bridge.buffered_bytes


class UdtEndpoint:
    """All UDT connections of one UDP socket: connect, rendezvous, listen and accept.

    ``with UdtEndpoint.bind(("0.0.0.0", 9000)) as endpoint:`` binds a socket of its
    own; ``UdtEndpoint(sock)`` drives a socket handed in (a hole-punched one; it is
    made non-blocking and its kernel buffers enlarged) and leaves it open at the end.
    The I/O thread starts at once; ``close()`` (or leaving the ``with`` block) aborts
    the connections still open and joins it: close each stream's socket first for a
    graceful close. ``foreign_datagram`` receives, on the I/O thread, what is not UDT
    (a STUN answer on a punched socket); without it such datagrams wait (at most 64)
    for ``receive_foreign``. ``send_datagram`` sends one from the same socket, so a
    mediator exchange and the UDT connections share one NAT mapping. Every method
    may be called from any thread. ``gso=True`` sends runs of datagrams with Linux UDP
    GSO (off by default, as in the anyio and asyncio endpoints); runs the kernel
    coalesced (GRO) are read back as the same datagrams either way.
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
        self._clock = clock
        self._backlog = accept_backlog
        self._foreign = foreign_datagram
        local = sock.getsockname()
        self.local_address: Endpoint = (str(local[0]), int(local[1]))
        self.family = socket.AddressFamily(sock.family)
        self.multiplexer = UdtMultiplexer(
            now=clock(),
            random_bits=secrets.randbits,
            cookie_secret=secrets.token_bytes(32),
            config=self.config,
        )
        # From here on the multiplexer names the connections with news: a turn pumps
        # only those streams (ready_connections).
        self.multiplexer.ready_connections()
        # Guards what user threads wait on: accepted streams, foreign datagrams, stopping.
        self._condition = threading.Condition()
        self._accepted: deque[socket.socket] = deque()
        self._foreign_queue: deque[tuple[bytes, Endpoint]] = deque()
        #: Poked (one byte) when a foreign datagram is queued or the endpoint stops.
        self._foreign_wake: socket.socket | None = None
        #: Foreign datagrams dropped because nobody took the queued ones.
        self.foreign_dropped = 0
        self._listening = False
        self._stopped: str | None = None
        self._infos: weakref.WeakKeyDictionary[socket.socket, UdtStreamInfo] = (
            weakref.WeakKeyDictionary()
        )
        self._loop = UdtIoLoop(
            sock,
            self.multiplexer,
            clock=clock,
            datagram_bytes=self.config.mss,
            owns_socket=owns_socket,
            gso=gso,
            receive_high_water=receive_high_water,
            on_foreign=foreign_datagram or self._queue_foreign,
            on_accepted=self._take_accepted,
            on_stopped=self._on_stopped,
        )
        #: The batched UDP socket (its counters: ``gso_batches``, ``gro_batches``, ...);
        #: the I/O thread's alone.
        self._io = self._loop.io
        self._loop.start()

    @classmethod
    def bind(cls, local: Endpoint, **options: Any) -> UdtEndpoint:
        """An endpoint on a new UDP socket bound to ``local`` (port 0: any free port)."""
        sock = open_udp_socket(local)
        try:
            return cls(sock, owns_socket=True, **options)
        except BaseException:
            sock.close()
            raise

    def now(self) -> float:
        """The endpoint's clock: what it passes the core as ``now``."""
        return self._clock()

    @property
    def thread(self) -> threading.Thread:
        """The I/O thread (named ``wavesync-udt-<port>``)."""
        return self._loop.thread

    def __enter__(self) -> UdtEndpoint:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Abort the connections still open (their peers hear a Shutdown), stop the I/O
        thread and join it (unless called on it: then it stops after this turn); the
        thread closes the socket if the endpoint opened it."""
        self._loop.stop()
        if threading.current_thread() is not self._loop.thread:
            self._loop.thread.join(_JOIN_SECONDS)
            if self._loop.thread.is_alive():  # pragma: no cover - a stuck turn is a bug
                log.error("udt endpoint %s: the I/O thread did not stop", self.local_address)

    # --- opening connections ----------------------------------------------------------

    def connect(self, peer: Endpoint, timeout: float | None = None) -> socket.socket:
        """A regular UDT connect to a listener at ``peer``; the stream's socket.

        Raises ``UdtConnectError`` when the core gives up (no answer within its connect
        timeout, 3 s as in UDT 4.11, or a refusal), after ``timeout`` seconds
        (``reason`` ABORTED), or when the endpoint is closed.
        """
        address = self._resolve(peer)
        return self._open(
            lambda now: self.multiplexer.connect(address, now),
            f"connect to {format_endpoint(address)}",
            timeout,
        )

    def rendezvous(
        self, candidates: Sequence[Endpoint], timeout: float | None = None
    ) -> socket.socket:
        """A rendezvous connect toward every candidate at once; the first that answers wins.

        Both peers call this with each other's addresses (hole punching). Raises
        ``UdtConnectError`` when none answers within the core's rendezvous timeout
        (30 s unless ``UdtConfig.connect_timeout`` says otherwise) or ``timeout``.
        """
        if not candidates:
            raise ValueError("rendezvous needs at least one candidate address")
        addresses = [self._resolve(candidate) for candidate in candidates]
        return self._open(
            lambda now: self.multiplexer.rendezvous(addresses, now),
            "rendezvous with " + ", ".join(format_endpoint(a) for a in addresses),
            timeout,
        )

    def listen(self) -> None:
        """Accept regular connects from now on (``accept`` hands them out)."""
        with self._condition:
            if self._listening:
                return
            self._listening = True
        self._run_on_loop(self.multiplexer.listen)
        log.info("udt listening on %s", format_endpoint(self.local_address))

    def accept(self, timeout: float | None = None) -> socket.socket:
        """The next connection a peer opened to us (``listen`` must have been called).

        Raises ``TimeoutError`` after ``timeout`` seconds, ``ConnectionAbortedError``
        once the endpoint is closed.
        """
        if not self._listening:
            raise RuntimeError("call listen() before accept()")
        with self._condition:
            if not self._condition.wait_for(
                lambda: self._accepted or self._stopped is not None, timeout
            ):
                raise TimeoutError(f"no UDT connection accepted within {timeout} s")
            if not self._accepted:
                raise ConnectionAbortedError(self._stopped)
            return self._accepted.popleft()

    # --- what a stream's socket cannot tell ---------------------------------------------

    def stream_info(self, sock: socket.socket) -> UdtStreamInfo:
        """The connection behind a stream socket this endpoint gave out (a live view:
        ``connection``, ``peer_address``, ``close_reason``, ``close_detail``,
        ``buffered_bytes``). ``KeyError`` for any other socket."""
        with self._condition:
            return self._infos[sock]

    def peer_of(self, sock: socket.socket) -> Endpoint:
        """The UDP address of the peer behind a stream socket (``getpeername`` of a
        socketpair says nothing)."""
        return self.stream_info(sock).peer_address

    # --- datagrams that are not UDT -----------------------------------------------------

    def send_datagram(self, data: bytes, peer: Endpoint) -> None:
        """Send one datagram that is not UDT (a STUN request) from this endpoint's socket."""
        self._check_running()
        self._loop.send_soon(data, peer)

    def receive_foreign(self, timeout: float | None = None) -> tuple[bytes, Endpoint]:
        """The next datagram that was not UDT (only without a ``foreign_datagram`` callback).

        Raises ``TimeoutError`` after ``timeout`` seconds, ``ConnectionAbortedError``
        once the endpoint is closed.
        """
        with self._condition:
            if not self._condition.wait_for(
                lambda: self._foreign_queue or self._stopped is not None, timeout
            ):
                raise TimeoutError(f"no datagram within {timeout} s")
            if not self._foreign_queue:
                raise ConnectionAbortedError(self._stopped)
            return self._foreign_queue.popleft()

    def wake_on_foreign(self, wake: socket.socket | None) -> None:
        """Poke ``wake`` (send one byte, never blocking) whenever a foreign datagram is
        queued for ``receive_foreign`` and when the endpoint stops; ``None`` stops it.

        Lets a thread that runs a selector wait for the queue on a socket of its own
        (one end of a ``socketpair``) instead of keeping a thread in ``receive_foreign``.
        One wake at a time; a datagram already queued pokes at once.
        """
        with self._condition:
            self._foreign_wake = wake
            if wake is not None and (self._foreign_queue or self._stopped is not None):
                _poke(wake)

    def datagram_port(self) -> UdtDatagramPort:
        """This endpoint as a blocking datagram port for STUN exchanges."""
        return UdtDatagramPort(self)

    # --- the I/O thread's callbacks -----------------------------------------------------

    def _queue_foreign(self, data: bytes, source: Endpoint) -> None:
        with self._condition:
            if len(self._foreign_queue) >= _FOREIGN_QUEUE:
                self.foreign_dropped += 1
                return
            self._foreign_queue.append((data, source))
            self._condition.notify_all()
            if self._foreign_wake is not None:
                _poke(self._foreign_wake)

    def _take_accepted(self, bridge: StreamBridge) -> None:
        with self._condition:
            if len(self._accepted) < self._backlog:
                self._infos[bridge.outer] = UdtStreamInfo(bridge)
                self._accepted.append(bridge.outer)
                self._condition.notify_all()
                return
        log.warning(
            "udt: aborting a connection from %s: %d wait for accept()",
            bridge.peer_address,
            len(self._accepted),
        )
        bridge.abort(self._clock())
        bridge.outer.close()

    def _on_stopped(self, why: str) -> None:
        with self._condition:
            self._stopped = why
            # Accepted streams nobody took: their connections are aborted; close them.
            while self._accepted:
                self._accepted.popleft().close()
            self._condition.notify_all()
            if self._foreign_wake is not None:
                _poke(self._foreign_wake)

    # --- internals ----------------------------------------------------------------------

    def _open(
        self,
        start: Callable[[float], UdtConnection],
        what: str,
        timeout: float | None,
    ) -> socket.socket:
        result: Future[socket.socket] = Future()
        bridge_box: list[StreamBridge] = []

        def begin() -> None:
            try:
                connection = start(self._clock())
            except BaseException as exc:
                result.set_exception(exc)
                return
            bridge = self._loop.adopt(connection, what)
            bridge.waiter = result
            bridge_box.append(bridge)

        try:
            self._submit(begin)
        except ConnectionAbortedError as exc:
            # As the asyncio endpoint: every failed connect is a UdtConnectError.
            detail = str(exc)
            raise UdtConnectError(
                f"udt {what} failed: {detail}", reason=CloseReason.ABORTED, detail=detail
            ) from None
        try:
            sock = result.result(timeout)
        except FutureTimeout:
            if not result.cancel():
                sock = result.result()  # it completed just now
            else:
                self._loop.call_soon(lambda: self._abort_all(bridge_box))
                detail = f"no connection within {timeout} s"
                raise UdtConnectError(
                    f"udt {what} failed: {detail}", reason=CloseReason.ABORTED, detail=detail
                ) from None
        with self._condition:
            self._infos[sock] = UdtStreamInfo(bridge_box[0])
        return sock

    def _abort_all(self, bridges: list[StreamBridge]) -> None:
        for bridge in bridges:
            bridge.abort(self._clock())

    def _submit(self, command: Callable[[], None]) -> None:
        with self._condition:
            self._check_running()
            self._loop.call_soon(command)

    def _run_on_loop(self, command: Callable[[], None]) -> None:
        done: Future[None] = Future()

        def run() -> None:
            try:
                command()
            except BaseException as exc:
                done.set_exception(exc)
            else:
                done.set_result(None)

        self._submit(run)
        # The loop runs commands every turn, and those left when it stops on its way out:
        # this ends; the check is for a loop that died without its shutdown.
        while not done.done():
            try:
                done.result(_JOIN_SECONDS)
            except FutureTimeout:
                self._check_running()
        done.result()

    def _check_running(self) -> None:
        if self._stopped is not None or not self._loop.thread.is_alive():
            raise ConnectionAbortedError(self._stopped or "the UdtEndpoint is closed")

    def _resolve(self, endpoint: Endpoint) -> Endpoint:
        host, port = endpoint
        try:
            ipaddress.ip_address(host)
        except ValueError:
            infos = socket.getaddrinfo(host, port, family=self.family, type=socket.SOCK_DGRAM)
            if not infos:
                raise OSError(f"{host!r} resolves to no address") from None
            address = infos[0][4]
            return (str(address[0]), int(address[1]))
        return (host, int(port))


def _poke(wake: socket.socket) -> None:
    """One byte on a wake-up socket; a full buffer already holds a wake-up."""
    with contextlib.suppress(OSError):  # full (one is pending anyway), or closed
        wake.send(b"\0", socket.MSG_DONTWAIT)


class UdtDatagramPort:
    """An endpoint's non-UDT datagrams as a blocking port: ``send((data, addr))`` and
    ``receive(timeout)``. A STUN transaction run on it goes out of the very socket (and
    NAT mapping) the UDT connections use."""

    def __init__(self, endpoint: UdtEndpoint) -> None:
        self.endpoint = endpoint

    def send(self, item: tuple[bytes, tuple[str, int]]) -> None:
        data, peer = item
        self.endpoint.send_datagram(data, (str(peer[0]), int(peer[1])))

    def receive(self, timeout: float | None = None) -> tuple[bytes, Endpoint]:
        return self.endpoint.receive_foreign(timeout)
