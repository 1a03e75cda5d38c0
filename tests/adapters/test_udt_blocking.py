"""The blocking UDT adapter on real loopback UDP sockets, and against the anyio one.

Endpoints in one process talk through the kernel; each stream is a real socket (one
end of a socketpair the endpoint's I/O thread pumps). The cross-adapter tests run the
anyio ``UdtEndpoint`` with ``anyio.run`` in a thread. Nothing is mocked and nothing
sleeps to wait: every wait has a timeout and ends on an event (a byte count, EOF, a
thread's end).
"""

from __future__ import annotations

import hashlib
import http.client
import http.server
import os
import queue
import secrets
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import anyio
import pytest
import trustme
from anyio.streams.buffered import BufferedByteReceiveStream

from wavesync_adapters.anyio.udt import UdtEndpoint as AnyioUdtEndpoint
from wavesync_adapters.blocking.udt import DEFAULT_RECEIVE_HIGH_WATER, UdtConnectError, UdtEndpoint
from wavesync_proto.addresses import Endpoint
from wavesync_proto.stun.message import Message, MessageClass, encode_message
from wavesync_proto.udt.connection_types import CloseReason, ConnectionState, UdtConfig
from wavesync_proto.udt.multiplexer import ConnectionAccepted, UdtMultiplexer

WAIT = 30.0  # seconds any one step may take before the test fails
LOOPBACK: Endpoint = ("127.0.0.1", 0)


def receive_exactly(sock: socket.socket, size: int) -> bytes:
    sock.settimeout(WAIT)
    received = bytearray()
    while len(received) < size:
        chunk = sock.recv(min(size - len(received), 1 << 20))
        if not chunk:
            raise EOFError(f"EOF after {len(received)} of {size} bytes")
        received += chunk
    return bytes(received)


def receive_to_end(sock: socket.socket) -> bytes:
    sock.settimeout(WAIT)
    received = bytearray()
    while chunk := sock.recv(1 << 20):
        received += chunk
    return bytes(received)


class Worker:
    """A function on a thread whose result (or exception) the test collects."""

    def __init__(self, target: Callable[[], Any], name: str = "test-worker") -> None:
        self._result: queue.Queue[tuple[bool, Any]] = queue.Queue()
        self.thread = threading.Thread(target=self._run, args=(target,), name=name)
        self.thread.start()

    def _run(self, target: Callable[[], Any]) -> None:
        try:
            self._result.put((True, target()))
        except BaseException as exc:
            self._result.put((False, exc))

    def result(self) -> Any:
        ok, value = self._result.get(timeout=WAIT)
        self.thread.join(WAIT)
        if not ok:
            raise value
        return value


@contextmanager
def endpoints(**options: Any) -> Iterator[tuple[UdtEndpoint, UdtEndpoint]]:
    with (
        UdtEndpoint.bind(LOOPBACK, **options) as server,
        UdtEndpoint.bind(LOOPBACK, **options) as client,
    ):
        yield server, client


def connected_pair(client: UdtEndpoint, server: UdtEndpoint) -> tuple[socket.socket, socket.socket]:
    server.listen()
    outgoing = client.connect(server.local_address, timeout=WAIT)
    incoming = server.accept(timeout=WAIT)
    return outgoing, incoming


def test_connect_accept_round_trip_and_graceful_close() -> None:
    with endpoints() as (server, client):
        outgoing, incoming = connected_pair(client, server)
        assert isinstance(outgoing, socket.socket)
        assert server.peer_of(incoming) == client.local_address
        assert client.peer_of(outgoing) == server.local_address
        assert client.stream_info(outgoing).connection.state is ConnectionState.CONNECTED
        assert client.thread.name == f"wavesync-udt-{client.local_address[1]}"
        outgoing.sendall(b"ping")
        assert receive_exactly(incoming, 4) == b"ping"
        incoming.sendall(b"pong")
        assert receive_exactly(outgoing, 4) == b"pong"
        # The application's half-close closes the UDT connection gracefully (no
        # half-close in UDT4): the peer reads what was sent, then EOF.
        outgoing.sendall(b"last words")
        outgoing.shutdown(socket.SHUT_WR)
        assert receive_to_end(incoming) == b"last words"
        assert server.stream_info(incoming).close_reason is CloseReason.PEER_CLOSED
        assert receive_to_end(outgoing) == b""
        assert client.stream_info(outgoing).close_reason is CloseReason.LOCAL_CLOSE
        outgoing.close()
        incoming.close()


def test_ten_megabytes_each_way_at_once_byte_exact() -> None:
    size = 10 * 1024 * 1024
    up, down = os.urandom(size), os.urandom(size)
    with endpoints() as (server, client):
        outgoing, incoming = connected_pair(client, server)
        senders = [
            Worker(lambda: outgoing.sendall(up), "send-up"),
            Worker(lambda: incoming.sendall(down), "send-down"),
        ]
        received_down = Worker(lambda: receive_exactly(outgoing, size), "receive-down")
        received_up = receive_exactly(incoming, size)
        for sender in senders:
            sender.result()
        assert hashlib.sha256(received_up).digest() == hashlib.sha256(up).digest()
        assert received_down.result() == down
        outgoing.close()
        assert receive_to_end(incoming) == b""
        incoming.close()
        counters = client.stream_info(outgoing).connection.counters
        assert counters.bytes_received >= size


def test_a_small_exchange_is_not_held_behind_a_bulk_stream() -> None:
    # Received bytes are gathered over busy turns before they are written to the
    # socketpair; a stream with a few bytes must not wait for the busy one to pause.
    # The bulk stream runs until the exchange is over, so the loop is busy throughout.
    chat_over = threading.Event()
    with endpoints() as (server, client):
        bulk_out, bulk_in = connected_pair(client, server)
        chat_out, chat_in = connected_pair(client, server)

        def send_bulk() -> bytes:
            digest = hashlib.sha256()
            while not chat_over.is_set():
                block = os.urandom(256 * 1024)
                bulk_out.sendall(block)
                digest.update(block)
            bulk_out.close()
            return digest.digest()

        sending = Worker(send_bulk, "bulk-send")
        receiving = Worker(lambda: hashlib.sha256(receive_to_end(bulk_in)).digest())
        try:
            for turn in range(20):
                chat_out.sendall(b"ping %02d" % turn)
                assert receive_exactly(chat_in, 7) == b"ping %02d" % turn
                chat_in.sendall(b"pong")
                assert receive_exactly(chat_out, 4) == b"pong"
        finally:
            chat_over.set()
        assert receiving.result() == sending.result()
        for sock in (bulk_in, chat_out, chat_in):
            sock.close()


def test_rendezvous_with_a_bogus_extra_candidate() -> None:
    # A port nobody listens on stands for an address of the peer that does not work.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as unused:
        unused.bind(LOOPBACK)
        bogus: Endpoint = ("127.0.0.1", unused.getsockname()[1])
    payload = os.urandom(1024 * 1024)
    with endpoints() as (left, right):
        right_side = Worker(lambda: right.rendezvous([left.local_address, bogus], timeout=WAIT))
        left_sock = left.rendezvous([bogus, right.local_address], timeout=WAIT)
        right_sock = right_side.result()
        assert left.peer_of(left_sock) == right.local_address
        assert right.peer_of(right_sock) == left.local_address
        left_sock.sendall(payload)
        left_sock.close()
        assert receive_to_end(right_sock) == payload
        right_sock.close()


def test_endpoint_close_aborts_streams_and_joins_its_thread() -> None:
    with UdtEndpoint.bind(LOOPBACK) as server:
        client = UdtEndpoint.bind(LOOPBACK)
        outgoing, incoming = connected_pair(client, server)
        incoming.sendall(b"before the end")
        assert receive_exactly(outgoing, 14) == b"before the end"
        client.close()
        client.close()  # twice: nothing more to do
        assert not client.thread.is_alive()
        # The aborted stream's socket ends: EOF, or a reset if it had unread bytes.
        outgoing.settimeout(WAIT)
        with suppress(ConnectionResetError):
            assert outgoing.recv(100) == b""
        assert client.stream_info(outgoing).close_reason is CloseReason.ABORTED
        # The peer heard the Shutdown (not its idle timeout): the stream is cut short.
        assert receive_to_end(incoming) == b""
        assert server.stream_info(incoming).close_reason is CloseReason.PEER_ABORTED
        outgoing.close()
        incoming.close()
        with pytest.raises(UdtConnectError, match="closed"):
            client.connect(server.local_address)
    assert not server.thread.is_alive()
    with pytest.raises(ConnectionAbortedError):
        server.accept(timeout=WAIT)


def test_a_peer_that_goes_silent_ends_the_stream_with_a_timeout() -> None:
    # The peer is a multiplexer driven by hand on a plain socket: it answers the
    # handshake, then never again (a peer whose machine vanished).
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
        raw.bind(LOOPBACK)
        raw.settimeout(WAIT)
        peer = UdtMultiplexer(now=0.0, random_bits=secrets.randbits, cookie_secret=bytes(32))
        peer.listen()
        config = UdtConfig(idle_timeout=0.5)
        with UdtEndpoint.bind(LOOPBACK, config=config) as endpoint:
            connecting = Worker(lambda: endpoint.connect(raw.getsockname(), timeout=WAIT))
            while not isinstance(peer.next_event(), ConnectionAccepted):
                data, source = raw.recvfrom(2048)
                peer.receive_datagram(data, source, 0.0)
                for datagram, destination in peer.datagrams_to_send(0.0):
                    raw.sendto(datagram, destination)
            stream = connecting.result()
            stream.sendall(b"anyone there?")
            with suppress(ConnectionResetError):
                assert receive_to_end(stream) == b""
            assert endpoint.stream_info(stream).close_reason is CloseReason.TIMEOUT
            stream.close()


def test_accept_times_out_and_needs_listen() -> None:
    with UdtEndpoint.bind(LOOPBACK) as endpoint:
        with pytest.raises(RuntimeError, match="listen"):
            endpoint.accept(timeout=0)
        endpoint.listen()
        with pytest.raises(TimeoutError):
            endpoint.accept(timeout=0)


def test_connect_to_a_silent_peer_fails_within_the_core_timeout() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(LOOPBACK)
        peer = silent.getsockname()
        with UdtEndpoint.bind(LOOPBACK, config=UdtConfig(connect_timeout=0.3)) as endpoint:
            with pytest.raises(UdtConnectError) as failure:
                endpoint.connect(peer)
            assert failure.value.reason is CloseReason.HANDSHAKE_FAILED
            assert "connect to 127.0.0.1" in str(failure.value)
            # The caller's own timeout aborts the attempt before the core's.
            with pytest.raises(UdtConnectError) as caller_gave_up:
                endpoint.rendezvous([peer], timeout=0.05)
            assert caller_gave_up.value.reason is CloseReason.ABORTED


def test_a_stream_the_application_does_not_read_holds_back_the_sender() -> None:
    with endpoints() as (server, client):
        outgoing, incoming = connected_pair(client, server)
        outgoing.settimeout(1.0)
        block = bytes(1 << 20)
        sent = 0
        # Nothing reads `incoming`: the socketpair, the bridge and both UDT buffers fill
        # up and then sendall blocks; the timeout only ends the test's wait.
        stalled = False
        while sent < 200 * len(block):
            try:
                outgoing.sendall(block)
            except TimeoutError:
                stalled = True
                break
            sent += len(block)
        assert stalled
        assert server.stream_info(incoming).buffered_bytes <= DEFAULT_RECEIVE_HIGH_WATER + (1 << 20)
        config = server.config
        assert (
            server.stream_info(incoming).connection.receive_buffer_packets
            <= config.receive_buffer_packets
        )
        outgoing.close()
        incoming.close()


def test_foreign_datagrams_and_the_datagram_port() -> None:
    stun = encode_message(
        Message(method=1, message_class=MessageClass.REQUEST, transaction_id=bytes(12))
    )
    with (
        UdtEndpoint.bind(LOOPBACK) as endpoint,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other,
    ):
        other.bind(LOOPBACK)
        other.settimeout(WAIT)
        other.sendto(stun, endpoint.local_address)
        data, source = endpoint.receive_foreign(timeout=WAIT)
        assert (data, source) == (stun, other.getsockname())
        port = endpoint.datagram_port()
        port.send((b"answer", source))
        assert other.recvfrom(100) == (b"answer", endpoint.local_address)
        other.sendto(stun, endpoint.local_address)
        assert port.receive(timeout=WAIT) == (stun, source)
        with pytest.raises(TimeoutError):
            port.receive(timeout=0)
        assert endpoint.multiplexer.counters.not_udt == 2


def test_a_handed_in_socket_stays_open() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(LOOPBACK)
    with sock, UdtEndpoint.bind(LOOPBACK) as server:
        with UdtEndpoint(sock) as client:
            outgoing, incoming = connected_pair(client, server)
            outgoing.sendall(b"x")
            assert receive_exactly(incoming, 1) == b"x"
            outgoing.close()
            incoming.close()
        assert sock.fileno() != -1


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"hello {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_http_client_over_a_udt_socket() -> None:
    with endpoints() as (server, client):
        server.listen()

        def serve_one() -> None:
            stream = server.accept(timeout=WAIT)
            stream.settimeout(WAIT)
            with stream:
                _Hello(stream, server.peer_of(stream), None)  # type: ignore[arg-type]

        serving = Worker(serve_one, "http-server")
        connection = http.client.HTTPConnection("wavesync.invalid", timeout=WAIT)
        connection.sock = client.connect(server.local_address, timeout=WAIT)
        connection.request("GET", "/over-udt")
        response = connection.getresponse()
        assert (response.status, response.read()) == (200, b"hello /over-udt")
        connection.close()
        serving.result()


def test_tls_over_a_udt_socket() -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("wavesync.test").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    with endpoints() as (server, client):
        outgoing, incoming = connected_pair(client, server)
        incoming.settimeout(WAIT)
        outgoing.settimeout(WAIT)

        def echo_once() -> None:
            with server_context.wrap_socket(incoming, server_side=True) as tls:
                tls.sendall(receive_exactly(tls, 5).upper())

        echoing = Worker(echo_once, "tls-server")
        with client_context.wrap_socket(outgoing, server_hostname="wavesync.test") as tls:
            tls.sendall(b"hello")
            assert receive_exactly(tls, 5) == b"HELLO"
        echoing.result()


# --- against the anyio adapter --------------------------------------------------------


class AnyioPeer:
    """An anyio ``UdtEndpoint`` run with ``anyio.run`` on a thread, serving one stream:
    it reads ``expect`` bytes, answers with their SHA-256 and ``reply``, and closes."""

    def __init__(self, *, listen: bool, expect: int, reply: bytes) -> None:
        self.address: queue.Queue[Endpoint] = queue.Queue()
        self._listen = listen
        self._expect = expect
        self._reply = reply
        self._worker: Worker | None = None

    def start(self, connect_to: Endpoint | None = None) -> Endpoint:
        self._worker = Worker(lambda: anyio.run(self._main, connect_to), "anyio-peer")
        return self.address.get(timeout=WAIT)

    def result(self) -> CloseReason | None:
        assert self._worker is not None
        reason: CloseReason | None = self._worker.result()
        return reason

    async def _main(self, connect_to: Endpoint | None) -> CloseReason | None:
        with anyio.fail_after(WAIT):
            async with AnyioUdtEndpoint.bind(LOOPBACK) as endpoint:
                if self._listen:
                    endpoint.listen()
                self.address.put(endpoint.local_address)
                if connect_to is None:
                    stream = await endpoint.accept()
                else:
                    stream = await endpoint.connect(connect_to)
                data = await BufferedByteReceiveStream(stream).receive_exactly(self._expect)
                await stream.send(hashlib.sha256(data).digest() + self._reply)
                await stream.aclose()
                return stream.close_reason


def test_interop_blocking_client_to_anyio_server() -> None:
    payload, reply = os.urandom(3 * 1024 * 1024), os.urandom(2 * 1024 * 1024)
    peer = AnyioPeer(listen=True, expect=len(payload), reply=reply)
    address = peer.start()
    with UdtEndpoint.bind(LOOPBACK) as client:
        stream = client.connect(address, timeout=WAIT)
        stream.sendall(payload)
        answer = receive_to_end(stream)
        assert answer == hashlib.sha256(payload).digest() + reply
        assert client.stream_info(stream).close_reason is CloseReason.PEER_CLOSED
        stream.close()
    assert peer.result() is CloseReason.LOCAL_CLOSE


def test_interop_anyio_client_to_blocking_server() -> None:
    payload, reply = os.urandom(3 * 1024 * 1024), os.urandom(2 * 1024 * 1024)
    with UdtEndpoint.bind(LOOPBACK) as server:
        server.listen()
        peer = AnyioPeer(listen=False, expect=len(payload), reply=reply)
        peer.start(server.local_address)
        stream = server.accept(timeout=WAIT)
        stream.sendall(payload)
        assert receive_to_end(stream) == hashlib.sha256(payload).digest() + reply
        stream.close()
    assert peer.result() is CloseReason.LOCAL_CLOSE


def test_the_blocking_adapter_imports_no_async_runtime() -> None:
    code = (
        "import sys, wavesync_adapters.blocking.udt\n"
        "print(sorted(m for m in ('asyncio', 'anyio', 'trio') if m in sys.modules))"
    )
    result = subprocess.run(  # noqa: S603 - this Python on a literal program
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=WAIT, check=True
    )
    assert result.stdout.strip() == "[]"


def test_close_from_the_io_thread_stops_after_its_turn() -> None:
    stopped: list[UdtEndpoint] = []

    def close_on_first(data: bytes, source: Endpoint) -> None:
        stopped[0].close()  # on the I/O thread: nothing to join, the loop just ends

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
        endpoint = UdtEndpoint.bind(LOOPBACK, foreign_datagram=close_on_first)
        stopped.append(endpoint)
        other.sendto(b"not udt", endpoint.local_address)
        endpoint.thread.join(WAIT)
        assert not endpoint.thread.is_alive()
        with pytest.raises(ConnectionAbortedError):
            endpoint.send_datagram(b"late", other.getsockname())
        endpoint.close()


def test_wake_on_foreign_pokes_a_selectable_socket() -> None:
    """A selector thread waits for foreign datagrams on a socketpair, no reader thread."""
    stun = encode_message(
        Message(method=1, message_class=MessageClass.REQUEST, transaction_id=bytes(12))
    )
    wake_out, wake_in = socket.socketpair()
    with (
        wake_out,
        wake_in,
        UdtEndpoint.bind(LOOPBACK) as endpoint,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other,
    ):
        other.bind(LOOPBACK)
        other.sendto(stun, endpoint.local_address)
        assert endpoint.receive_foreign(timeout=WAIT)[0] == stun  # queued before: no wake
        endpoint.wake_on_foreign(wake_in)
        wake_out.settimeout(0)
        with pytest.raises(BlockingIOError):
            wake_out.recv(1)  # nothing queued: no poke
        wake_out.settimeout(WAIT)
        other.sendto(stun, endpoint.local_address)
        assert wake_out.recv(1) == b"\0"
        assert endpoint.receive_foreign(timeout=0) == (stun, other.getsockname())
        other.sendto(stun, endpoint.local_address)
        assert endpoint.receive_foreign(timeout=WAIT)[0] == stun
        assert wake_out.recv(1) == b"\0"  # a datagram already taken still poked
        endpoint.wake_on_foreign(None)
        other.sendto(stun, endpoint.local_address)
        assert endpoint.receive_foreign(timeout=WAIT)[0] == stun
        endpoint.wake_on_foreign(wake_in)
        endpoint.close()
        assert wake_out.recv(1) == b"\0"  # stopping pokes too: receive_foreign raises
        with pytest.raises(ConnectionAbortedError):
            endpoint.receive_foreign(timeout=0)
        wake_out.settimeout(0)
        with pytest.raises(BlockingIOError):
            wake_out.recv(1)  # once


def test_a_bulk_transfer_beside_many_idle_connections_and_every_one_still_works() -> None:
    # A turn pumps only the bridges whose connection did something, or that the
    # selector woke, or that still have bytes for their pair.
    payload = os.urandom(4 * 1024 * 1024)
    with endpoints() as (server, client):
        idle = [connected_pair(client, server) for _ in range(100)]
        outgoing, incoming = connected_pair(client, server)
        assert len(server.multiplexer.connections) == 101
        sender = Worker(lambda: outgoing.sendall(payload))
        received = receive_exactly(incoming, len(payload))
        sender.result()
        assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
        for number, (ours, theirs) in enumerate(idle):
            ours.sendall(b"%d" % number)
            assert receive_exactly(theirs, len(b"%d" % number)) == b"%d" % number
        idle[0][0].shutdown(socket.SHUT_WR)
        assert receive_to_end(idle[0][1]) == b""
        for sock in (outgoing, incoming, *(s for pair in idle for s in pair)):
            sock.close()
