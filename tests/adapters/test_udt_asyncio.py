"""The asyncio UDT adapter on real loopback UDP sockets, and against the anyio one.

Endpoints in one process talk through the kernel on plain asyncio; the
cross-adapter tests run the anyio adapter as the ``wavesync udt`` program. Nothing
is mocked and nothing sleeps to wait: every wait is bounded by ``asyncio.timeout``
and ends on an event (a byte count, a connection state, a process exit).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from tests.daemons import WAVESYNC
from wavesync_adapters.asyncio._net import open_udp_port, resolve, run_transaction
from wavesync_adapters.asyncio.udt import (
    UdtConnectError,
    UdtConnectionResetError,
    UdtEndpoint,
    UdtTransport,
    create_udt_endpoint,
    open_udt_connection,
    open_udt_rendezvous,
    start_udt_server,
)
from wavesync_proto.addresses import Endpoint
from wavesync_proto.stun.message import Message, MessageClass, decode_message, encode_message
from wavesync_proto.stun.transaction import ClientTransaction, ResponseReceived
from wavesync_proto.udt.connection_types import CloseReason, UdtConfig
from wavesync_proto.udt.handshake import REGULAR_CONNECT_TIMEOUT

pytestmark = pytest.mark.anyio
WAIT = 30.0  # seconds any one step may take before the test fails
LOOPBACK: Endpoint = ("127.0.0.1", 0)
Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # this adapter is asyncio's own; anyio's plugin only runs the loop


def udt_transport(writer: asyncio.StreamWriter) -> UdtTransport:
    transport = writer.transport
    assert isinstance(transport, UdtTransport)
    return transport


@asynccontextmanager
async def accepting(endpoint: UdtEndpoint) -> AsyncIterator[asyncio.Queue[Streams]]:
    """A server on ``endpoint`` whose accepted stream pairs arrive in a queue."""
    accepted: asyncio.Queue[Streams] = asyncio.Queue()

    async def hand_over(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accepted.put((reader, writer))

    server = await start_udt_server(hand_over, endpoint=endpoint)
    try:
        yield accepted
    finally:
        server.close()


async def close(*writers: asyncio.StreamWriter) -> None:
    for writer in writers:
        writer.close()
    for writer in writers:
        await writer.wait_closed()


async def test_connect_accept_a_round_trip_and_a_clean_close() -> None:
    async with (
        await create_udt_endpoint(LOOPBACK) as server,
        await create_udt_endpoint(LOOPBACK) as client,
        accepting(server) as accepted,
        asyncio.timeout(WAIT),
    ):
        reader, writer = await open_udt_connection(server.local_address, endpoint=client)
        their_reader, their_writer = await accepted.get()
        assert writer.get_extra_info("peername") == server.local_address
        assert their_writer.get_extra_info("peername") == client.local_address
        assert writer.get_extra_info("sockname") == client.local_address
        writer.write(b"ping")
        assert await their_reader.readexactly(4) == b"ping"
        their_writer.write(b"pong")
        await their_writer.drain()
        assert await reader.readexactly(4) == b"pong"
        await close(writer)
        assert udt_transport(writer).close_reason is CloseReason.LOCAL_CLOSE
        assert await their_reader.read() == b""  # the peer's clean close is EOF
        assert udt_transport(their_writer).close_reason is CloseReason.PEER_CLOSED
        await close(their_writer)


async def test_twenty_megabytes_each_way_at_once_byte_exact() -> None:
    size = 20 * 1024 * 1024
    up, down = os.urandom(size), os.urandom(size)
    async with (
        await create_udt_endpoint(LOOPBACK) as server,
        await create_udt_endpoint(LOOPBACK) as client,
        accepting(server) as accepted,
        asyncio.timeout(WAIT),
    ):
        reader, writer = await open_udt_connection(server.local_address, endpoint=client)
        their_reader, their_writer = await accepted.get()

        async def carry(writer: asyncio.StreamWriter, data: bytes) -> None:
            for start in range(0, len(data), 1 << 20):
                writer.write(data[start : start + (1 << 20)])
                await writer.drain()

        _, _, got_up, got_down = await asyncio.gather(
            carry(writer, up),
            carry(their_writer, down),
            their_reader.readexactly(size),
            reader.readexactly(size),
        )
        await close(writer, their_writer)
    assert hashlib.sha256(got_up).digest() == hashlib.sha256(up).digest()
    assert got_down == down
    assert udt_transport(writer).close_reason in (CloseReason.LOCAL_CLOSE, CloseReason.PEER_CLOSED)


async def test_rendezvous_with_a_bogus_extra_candidate() -> None:
    # A port nobody listens on stands for an address of the peer that does not work.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as unused:
        unused.bind(LOOPBACK)
        bogus: Endpoint = ("127.0.0.1", unused.getsockname()[1])
    payload = os.urandom(1024 * 1024)
    async with (
        await create_udt_endpoint(LOOPBACK) as left,
        await create_udt_endpoint(LOOPBACK) as right,
        asyncio.timeout(WAIT),
    ):
        (left_reader, left_writer), (right_reader, right_writer) = await asyncio.gather(
            open_udt_rendezvous([bogus, right.local_address], endpoint=left),
            open_udt_rendezvous([left.local_address, bogus], endpoint=right),
        )
        assert left_writer.get_extra_info("peername") == right.local_address
        assert right_writer.get_extra_info("peername") == left.local_address
        left_writer.write(payload)
        assert await right_reader.readexactly(len(payload)) == payload
        await close(left_writer)
        assert await right_reader.read() == b""
        await close(right_writer)
        assert await left_reader.read() == b""


async def test_a_rendezvous_on_endpoints_of_their_own_closes_them_with_the_connection() -> None:
    ports = []
    for _ in range(2):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(LOOPBACK)
            ports.append(probe.getsockname()[1])
    left, right = ("127.0.0.1", ports[0]), ("127.0.0.1", ports[1])
    async with asyncio.timeout(WAIT):
        (_, left_writer), (right_reader, right_writer) = await asyncio.gather(
            open_udt_rendezvous([right], local=left),
            open_udt_rendezvous([left], local=right),
        )
        left_writer.write(b"hello")
        assert await right_reader.readexactly(5) == b"hello"
        await close(left_writer, right_writer)
        for writer in (left_writer, right_writer):
            endpoint = writer.get_extra_info("udt_endpoint")
            assert isinstance(endpoint, UdtEndpoint)
            await endpoint.wait_closed()


async def test_several_connections_over_one_endpoint() -> None:
    payloads = [os.urandom(256 * 1024 + n) for n in range(6)]

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        size = int.from_bytes(await reader.readexactly(4), "big")
        writer.write(await reader.readexactly(size))
        await writer.drain()
        assert await reader.read() == b""  # the client closes first
        await close(writer)

    async with (
        await create_udt_endpoint(LOOPBACK) as client,
        await start_udt_server(echo, LOOPBACK) as server,
        asyncio.timeout(WAIT),
    ):

        async def one(data: bytes) -> tuple[bytes, int, Endpoint]:
            reader, writer = await open_udt_connection(server.local_address, endpoint=client)
            writer.write(len(data).to_bytes(4, "big") + data)
            echoed = await reader.readexactly(len(data))
            await close(writer)
            return (
                echoed,
                udt_transport(writer).connection.socket_id,
                writer.get_extra_info("sockname"),
            )

        results = await asyncio.gather(*(one(data) for data in payloads))
    assert [echoed for echoed, _, _ in results] == payloads
    # Six connections, one UDP socket each side.
    assert len({socket_id for _, socket_id, _ in results}) == 6
    assert {local for _, _, local in results} == {client.local_address}


async def test_a_peer_abort_is_an_error_on_read_not_an_end_of_stream() -> None:
    async with (
        await create_udt_endpoint(LOOPBACK) as server,
        await create_udt_endpoint(LOOPBACK) as client,
        accepting(server) as accepted,
        asyncio.timeout(WAIT),
    ):
        _, writer = await open_udt_connection(server.local_address, endpoint=client)
        their_reader, their_writer = await accepted.get()
        writer.write(os.urandom(4 * 1024 * 1024))  # taken, mostly unacknowledged
        writer.transport.abort()
        await writer.wait_closed()  # our own abort: closed, no error, like TCP's
        assert udt_transport(writer).close_reason is CloseReason.ABORTED
        with pytest.raises(ConnectionResetError, match="PEER_ABORTED") as failure:
            await their_reader.readexactly(4 * 1024 * 1024)
        assert isinstance(failure.value, UdtConnectionResetError)
        assert failure.value.reason is CloseReason.PEER_ABORTED
        with pytest.raises(ConnectionResetError):
            await their_writer.wait_closed()


class Path:
    """A UDP forwarder between one client and a server that can be cut (a NAT forgetting
    its mapping): datagrams then vanish both ways, no error anywhere."""

    def __init__(self, server: Endpoint) -> None:
        self.server = server
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(LOOPBACK)
        self.sock.setblocking(False)
        self.address: Endpoint = self.sock.getsockname()
        self.client: Endpoint | None = None
        self.cut = False
        asyncio.get_running_loop().add_reader(self.sock, self._forward)

    def _forward(self) -> None:
        try:
            data, source = self.sock.recvfrom(65536)
        except BlockingIOError:
            return
        if self.cut:
            return
        if source == self.server:
            if self.client is not None:
                self.sock.sendto(data, self.client)
        else:
            self.client = source
            self.sock.sendto(data, self.server)

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.sock)
        self.sock.close()


async def test_a_path_that_dies_is_an_error_on_both_sides_at_the_idle_timeout() -> None:
    config = UdtConfig(idle_timeout=1.0)
    async with (
        await create_udt_endpoint(LOOPBACK, config=config) as server,
        await create_udt_endpoint(LOOPBACK, config=config) as client,
        accepting(server) as accepted,
        asyncio.timeout(WAIT),
    ):
        path = Path(server.local_address)
        try:
            reader, writer = await open_udt_connection(path.address, endpoint=client)
            their_reader, their_writer = await accepted.get()
            writer.write(b"last words")
            assert await their_reader.readexactly(10) == b"last words"
            path.cut = True
            with pytest.raises(ConnectionResetError, match="TIMEOUT") as failure:
                await their_reader.read()
            assert isinstance(failure.value, UdtConnectionResetError)
            assert failure.value.reason is CloseReason.TIMEOUT
            with pytest.raises(ConnectionResetError, match="TIMEOUT"):
                await reader.readexactly(1)
            with pytest.raises(ConnectionResetError):
                await writer.drain()
            assert udt_transport(their_writer).close_reason is CloseReason.TIMEOUT
        finally:
            path.close()


async def test_a_reader_that_stops_blocks_the_writers_drain_and_memory_stays_bounded() -> None:
    # Small buffers so that "bounded" is far below what the writer has to write.
    config = UdtConfig(send_buffer_bytes=256 * 1024, receive_buffer_packets=128)
    limit, chunk = 32 * 1024, 64 * 1024
    payload = os.urandom(16 * 1024 * 1024)
    written = 0
    async with (
        await create_udt_endpoint(LOOPBACK, config=config) as server,
        await create_udt_endpoint(LOOPBACK, config=config) as client,
        asyncio.timeout(WAIT),
    ):
        accepted: asyncio.Queue[Streams] = asyncio.Queue()

        async def hand_over(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await accepted.put((reader, writer))

        await start_udt_server(hand_over, endpoint=server, limit=limit)
        _, writer = await open_udt_connection(server.local_address, endpoint=client)
        their_reader, their_writer = await accepted.get()
        transport = udt_transport(writer)

        async def write_all() -> None:
            nonlocal written
            for start in range(0, len(payload), chunk):
                writer.write(payload[start : start + chunk])
                await writer.drain()
                written = start + chunk

        writing = asyncio.create_task(write_all())
        # Nobody reads: the reader's buffer passes its limit and it stops taking the
        # connection's data, the window closes, the send buffer fills, drain() waits.
        _, high = transport.get_write_buffer_limits()
        their_transport = udt_transport(their_writer)
        while not (
            not their_transport.is_reading()
            and transport.get_write_buffer_size() > high
            and written >= config.send_buffer_bytes
        ):
            await asyncio.sleep(0.01)
        assert not writing.done()
        assert transport.get_write_buffer_size() <= high + chunk
        bound = config.send_buffer_bytes + config.receive_buffer_packets * 1500
        bound += 2 * limit + chunk + high + chunk
        assert written <= bound
        assert len(their_reader._buffer) <= 2 * limit + 64 * 1024  # type: ignore[attr-defined]
        received = await their_reader.readexactly(len(payload))
        await writing
        assert received == payload
        await close(writer, their_writer)


async def test_no_half_close_and_nothing_after_close() -> None:
    async with (
        await create_udt_endpoint(LOOPBACK) as server,
        await create_udt_endpoint(LOOPBACK) as client,
        accepting(server) as accepted,
        asyncio.timeout(WAIT),
    ):
        reader, writer = await open_udt_connection(server.local_address, endpoint=client)
        _, their_writer = await accepted.get()
        assert not writer.can_write_eof()
        with pytest.raises(NotImplementedError, match="half-close"):
            writer.write_eof()
        await close(writer)
        writer.write(b"late")  # dropped, as asyncio drops writes after the end
        assert writer.transport.get_write_buffer_size() == 0
        assert await reader.read() == b""
        writer.close()  # twice is harmless
        await writer.wait_closed()
        await close(their_writer)


async def test_connect_to_a_port_with_nobody_fails_within_the_connect_timeout() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as unused:
        unused.bind(LOOPBACK)
        nobody: Endpoint = ("127.0.0.1", unused.getsockname()[1])
    async with await create_udt_endpoint(LOOPBACK) as client:
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with asyncio.timeout(REGULAR_CONNECT_TIMEOUT + 2.0):
            with pytest.raises(UdtConnectError) as failure:
                await open_udt_connection(nobody, endpoint=client)
        assert failure.value.reason is CloseReason.HANDSHAKE_FAILED
        assert isinstance(failure.value, ConnectionError)
        assert loop.time() - started >= REGULAR_CONNECT_TIMEOUT - 0.1
        assert "connect to 127.0.0.1" in str(failure.value)
        assert client.connections == []


async def test_a_cancelled_connect_leaves_no_connection_behind() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as unused:
        unused.bind(LOOPBACK)
        nobody: Endpoint = ("127.0.0.1", unused.getsockname()[1])
        async with await create_udt_endpoint(LOOPBACK) as client:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):
                    await open_udt_connection(nobody, endpoint=client)
            assert client.connections == []


async def test_a_handed_in_socket_carries_other_datagrams_and_stays_open() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(LOOPBACK)
    foreign: list[tuple[bytes, Endpoint]] = []
    arrived = asyncio.Event()

    def hand_on(data: bytes, source: Endpoint) -> None:
        foreign.append((data, source))
        arrived.set()

    # A STUN Binding request (RFC 8489 §5): not UDT, so the endpoint hands it on.
    stun = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + bytes(12)
    with sock, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
        other.bind(LOOPBACK)
        async with await create_udt_endpoint(sock=sock, foreign_datagram=hand_on) as endpoint:
            assert endpoint.local_address == sock.getsockname()
            async with asyncio.timeout(WAIT):
                other.sendto(stun, endpoint.local_address)
                await arrived.wait()
        assert foreign == [(stun, other.getsockname())]
        assert sock.fileno() != -1  # still the punching code's socket


def test_the_asyncio_adapter_does_not_import_anyio() -> None:
    code = (
        "import sys, wavesync_adapters.asyncio.udt\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('anyio', 'trio', 'sniffio')))"
    )
    result = subprocess.run(  # noqa: S603 - this interpreter, our code
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=WAIT
    )
    assert result.stdout.strip() == "[]"


# --- against the anyio adapter: the `wavesync udt` program --------------------------------

SIZE = 20 * 1024 * 1024


async def wavesync_udt(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        WAVESYNC,
        "udt",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def finish(process: asyncio.subprocess.Process) -> None:
    """Kill ``process`` if it still runs, and reap it (reading its pipes: asyncio's
    ``wait()`` alone never returns while a pipe it stopped reading is still open)."""
    if process.returncode is None:
        process.kill()
    async with asyncio.timeout(WAIT):
        await process.communicate()


async def test_asyncio_sends_to_the_anyio_adapter() -> None:
    payload = os.urandom(SIZE)
    receiver = await wavesync_udt("recv", "--listen", "127.0.0.1:0")
    try:
        async with asyncio.timeout(WAIT):
            assert receiver.stderr is not None
            line = await receiver.stderr.readline()
            match = re.search(rb"listening on udp 127\.0\.0\.1:(\d+)", line)
            assert match, line
            # Its stdout is read meanwhile: a full pipe would stop it, and so our close.
            output = asyncio.create_task(receiver.communicate())
            _, writer = await open_udt_connection(("127.0.0.1", int(match[1])))
            writer.write(payload)
            await close(writer)  # returns once every byte is acknowledged
            assert udt_transport(writer).close_reason is CloseReason.LOCAL_CLOSE
            received, errors = await output
            assert receiver.returncode == 0, errors
    finally:
        await finish(receiver)
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()


async def test_the_anyio_adapter_sends_to_asyncio() -> None:
    payload = os.urandom(SIZE)
    received: asyncio.Future[tuple[bytes, CloseReason | None]] = (
        asyncio.get_running_loop().create_future()
    )

    async def take(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(-1)  # to the peer's clean close
        received.set_result((data, udt_transport(writer).close_reason))
        await close(writer)

    async with await start_udt_server(take, LOOPBACK) as server:
        port = server.local_address[1]
        sender = await wavesync_udt("send", "--connect", f"127.0.0.1:{port}")
        try:
            async with asyncio.timeout(WAIT):
                _, errors = await sender.communicate(payload)
                assert sender.returncode == 0, errors
                data, reason = await received
        finally:
            await finish(sender)
    assert reason is CloseReason.PEER_CLOSED
    assert hashlib.sha256(data).digest() == hashlib.sha256(payload).digest()


async def test_an_interrupted_anyio_sender_is_an_error_on_the_asyncio_reader() -> None:
    arrived: asyncio.Future[asyncio.StreamReader] = asyncio.get_running_loop().create_future()
    finished = asyncio.Event()

    async def take(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(1)
        arrived.set_result(reader)
        await finished.wait()
        writer.close()

    async with await start_udt_server(take, LOOPBACK) as server:
        sender = await wavesync_udt("send", "--connect", f"127.0.0.1:{server.local_address[1]}")
        try:
            async with asyncio.timeout(WAIT):
                assert sender.stdin is not None
                sender.stdin.write(os.urandom(1024 * 1024))
                await sender.stdin.drain()
                reader = await arrived
                sender.send_signal(2)  # SIGINT: the program aborts its connection
                await sender.wait()
                with pytest.raises(ConnectionResetError, match="PEER_ABORTED"):
                    await reader.read(-1)
        finally:
            finished.set()
            await finish(sender)
    assert sender.returncode != 0


async def test_the_datagram_port_carries_stun_beside_udt_and_bounds_its_queue() -> None:
    """``datagram_port()`` sends from the endpoint's own socket and receives what is not
    UDT; unread foreign datagrams are bounded (the oldest dropped, counted)."""
    stun = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + bytes(12)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
        other.bind(LOOPBACK)
        other.settimeout(WAIT)
        async with await create_udt_endpoint(LOOPBACK) as endpoint:
            port = endpoint.datagram_port()
            await port.send((b"hello", other.getsockname()))
            data, source = other.recvfrom(64)
            assert (data, source) == (b"hello", endpoint.local_address)
            other.sendto(stun, endpoint.local_address)
            async with asyncio.timeout(WAIT):
                assert await port.receive() == (stun, other.getsockname())
            # 70 datagrams, none read: the queue keeps the last 64.
            for index in range(70):
                other.sendto(stun[:-1] + bytes([index]), endpoint.local_address)
            async with asyncio.timeout(WAIT):
                while endpoint.foreign_dropped < 6:
                    await asyncio.sleep(0)
                first, _ = await endpoint.receive_foreign()
            assert first[-1] == 6
        # Closed: what was queued is still handed out, then the port says it is closed.
        for index in range(7, 70):
            assert (await endpoint.receive_foreign())[0][-1] == index
        with pytest.raises(ConnectionAbortedError):
            await endpoint.receive_foreign()
        with pytest.raises(ConnectionAbortedError):
            endpoint.send_datagram(b"late", other.getsockname())


def binding_transaction(now: float) -> ClientTransaction:
    request = Message(method=1, message_class=MessageClass.REQUEST, transaction_id=bytes(12))
    return ClientTransaction(encode_message(request), now=now)


async def answer_one_binding(answerer: socket.socket) -> None:
    """Answer the next STUN request on the non-blocking ``answerer`` with a success."""
    loop = asyncio.get_running_loop()
    data, source = await loop.sock_recvfrom(answerer, 2048)
    request = decode_message(data)
    response = Message(
        method=request.method,
        message_class=MessageClass.SUCCESS,
        transaction_id=request.transaction_id,
    )
    await loop.sock_sendto(answerer, encode_message(response), source)


async def test_run_transaction_over_the_punching_socket() -> None:
    """``_net.run_transaction`` drives a STUN Binding over a UDT endpoint's port to a
    peer that answers, while UDT could share the socket."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as answerer:
        answerer.bind(LOOPBACK)
        answerer.setblocking(False)
        loop = asyncio.get_running_loop()

        async with await create_udt_endpoint(LOOPBACK) as endpoint:
            peer = await resolve(answerer.getsockname())
            transaction = binding_transaction(loop.time())
            async with asyncio.timeout(WAIT), asyncio.TaskGroup() as group:
                group.create_task(answer_one_binding(answerer))
                event = await run_transaction(transaction, endpoint.datagram_port(), peer)
            assert isinstance(event, ResponseReceived)


async def test_run_transaction_over_a_plain_udp_port_and_the_port_closes() -> None:
    """``_net.open_udp_port`` is a ``DatagramPort`` of its own (no UDT): a transaction
    is answered over it, and once closed it says so instead of waiting forever."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as answerer:
        answerer.bind(LOOPBACK)
        answerer.setblocking(False)
        loop = asyncio.get_running_loop()

        peer = answerer.getsockname()
        port = await open_udp_port(peer)
        try:
            transaction = binding_transaction(loop.time())
            async with asyncio.timeout(WAIT), asyncio.TaskGroup() as group:
                group.create_task(answer_one_binding(answerer))
                event = await run_transaction(transaction, port, peer)
            assert isinstance(event, ResponseReceived)
        finally:
            port.close()
        async with asyncio.timeout(WAIT):
            with pytest.raises(ConnectionAbortedError):
                await port.receive()
        with pytest.raises(ConnectionAbortedError):
            await port.send((b"late", peer))


async def test_a_bulk_transfer_beside_many_idle_connections_and_every_one_still_works() -> None:
    # A run pumps only the transports whose connection did something (or that asked).
    payload = os.urandom(4 * 1024 * 1024)
    async with (
        await create_udt_endpoint(LOOPBACK) as server,
        await create_udt_endpoint(LOOPBACK) as client,
        accepting(server) as accepted,
        asyncio.timeout(WAIT),
    ):
        idle = []
        for _ in range(150):
            _, writer = await open_udt_connection(server.local_address, endpoint=client)
            their_reader, _ = await accepted.get()
            idle.append((writer, their_reader))
        reader, writer = await open_udt_connection(server.local_address, endpoint=client)
        their_reader, their_writer = await accepted.get()
        assert len(server.multiplexer.connections) == 151
        their_writer.write(payload)
        received = await reader.readexactly(len(payload))
        assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
        for number, (idle_writer, idle_reader) in enumerate(idle):
            idle_writer.write(b"%d." % number)
            assert await idle_reader.readuntil(b".") == b"%d." % number
        await close(idle[0][0])
        assert await idle[0][1].read() == b""
        await close(writer, their_writer, *(w for w, _ in idle[1:]))
