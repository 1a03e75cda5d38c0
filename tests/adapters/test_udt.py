"""The anyio UDT adapter on real loopback UDP sockets: UdtEndpoint and UdtStream.

Two endpoints in one process talk through the kernel, on asyncio and on trio.
Nothing is mocked and nothing sleeps to wait: every wait is bounded by
``fail_after`` and ends on an event (a byte count, a connection state).
"""

from __future__ import annotations

import hashlib
import os
import socket

import anyio
import anyio.abc
import anyio.lowlevel
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from wavesync_adapters.anyio.udt import UdtConnectError, UdtEndpoint, UdtStream
from wavesync_proto.addresses import Endpoint
from wavesync_proto.udt.connection_types import CloseReason, ConnectionState, UdtConfig
from wavesync_proto.udt.handshake import REGULAR_CONNECT_TIMEOUT

pytestmark = pytest.mark.anyio
WAIT = 30.0  # seconds any one step may take before the test fails
LOOPBACK: Endpoint = ("127.0.0.1", 0)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    backend: str = request.param
    return backend


async def receive_exactly(stream: anyio.abc.ByteStream, size: int) -> bytes:
    return await BufferedByteReceiveStream(stream).receive_exactly(size)


async def receive_to_end(stream: anyio.abc.ByteStream) -> bytes:
    received = bytearray()
    while True:
        try:
            received += await stream.receive()
        except anyio.EndOfStream:
            return bytes(received)


async def connected_pair(client: UdtEndpoint, server: UdtEndpoint) -> tuple[UdtStream, UdtStream]:
    server.listen()
    outgoing = await client.connect(server.local_address)
    incoming = await server.accept()
    return outgoing, incoming


async def test_connect_accept_and_a_round_trip() -> None:
    async with UdtEndpoint.bind(LOOPBACK) as server, UdtEndpoint.bind(LOOPBACK) as client:
        with anyio.fail_after(WAIT):
            outgoing, incoming = await connected_pair(client, server)
            assert outgoing.connection.state is ConnectionState.CONNECTED
            assert incoming.extra(anyio.abc.SocketAttribute.remote_address) == (
                client.local_address
            )
            assert (
                outgoing.extra(anyio.abc.SocketAttribute.remote_port) == (server.local_address[1])
            )
            await outgoing.send(b"ping")
            assert await receive_exactly(incoming, 4) == b"ping"
            await incoming.send(b"pong")
            assert await receive_exactly(outgoing, 4) == b"pong"
            await outgoing.aclose()
            assert outgoing.close_reason is CloseReason.LOCAL_CLOSE
            with pytest.raises(anyio.EndOfStream):
                await incoming.receive()
            assert incoming.close_reason is CloseReason.PEER_CLOSED
            await incoming.aclose()


async def test_twenty_megabytes_each_way_at_once_byte_exact() -> None:
    size = 20 * 1024 * 1024
    up, down = os.urandom(size), os.urandom(size)
    results: dict[str, bytes] = {}
    async with UdtEndpoint.bind(LOOPBACK) as server, UdtEndpoint.bind(LOOPBACK) as client:
        with anyio.fail_after(WAIT):
            outgoing, incoming = await connected_pair(client, server)

            async def carry(name: str, sender: UdtStream, receiver: UdtStream, data: bytes) -> None:
                async with anyio.create_task_group() as group:
                    group.start_soon(sender.send, data)
                    results[name] = await receive_exactly(receiver, len(data))

            async with anyio.create_task_group() as group:
                group.start_soon(carry, "up", outgoing, incoming, up)
                group.start_soon(carry, "down", incoming, outgoing, down)
            await outgoing.aclose()
            await incoming.aclose()
    assert hashlib.sha256(results["up"]).digest() == hashlib.sha256(up).digest()
    assert results["down"] == down
    assert outgoing.close_reason is CloseReason.LOCAL_CLOSE
    assert outgoing.connection.counters.bytes_received >= size


async def test_rendezvous_with_a_bogus_extra_candidate() -> None:
    # A port nobody listens on stands for an address of the peer that does not work.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as unused:
        unused.bind(LOOPBACK)
        bogus: Endpoint = ("127.0.0.1", unused.getsockname()[1])
    payload = os.urandom(1024 * 1024)
    async with UdtEndpoint.bind(LOOPBACK) as left, UdtEndpoint.bind(LOOPBACK) as right:
        streams: dict[str, UdtStream] = {}

        async def meet(name: str, endpoint: UdtEndpoint, candidates: list[Endpoint]) -> None:
            streams[name] = await endpoint.rendezvous(candidates)

        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as group:
                group.start_soon(meet, "left", left, [bogus, right.local_address])
                group.start_soon(meet, "right", right, [left.local_address, bogus])
            assert streams["left"].connection.peer_address == right.local_address
            assert streams["right"].connection.peer_address == left.local_address
            async with anyio.create_task_group() as group:
                group.start_soon(streams["left"].send, payload)
                assert await receive_exactly(streams["right"], len(payload)) == payload
            await streams["left"].aclose()
            assert await receive_to_end(streams["right"]) == b""


async def test_several_connections_over_one_endpoint() -> None:
    payloads = [os.urandom(256 * 1024 + n) for n in range(6)]
    echoed: dict[int, bytes] = {}
    socket_ids: set[int] = set()
    local_ports: set[int] = set()

    async def echo(stream: UdtStream) -> None:
        reader = BufferedByteReceiveStream(stream)
        size = int.from_bytes(await reader.receive_exactly(4), "big")
        await stream.send(await reader.receive_exactly(size))

    async with UdtEndpoint.bind(LOOPBACK) as server, UdtEndpoint.bind(LOOPBACK) as client:
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as serving:
                serving.start_soon(server.serve, echo)

                async def one(number: int) -> None:
                    stream = await client.connect(server.local_address)
                    socket_ids.add(stream.connection.socket_id)
                    local_ports.add(stream.extra(anyio.abc.SocketAttribute.local_port))
                    async with stream:
                        data = payloads[number]
                        await stream.send(len(data).to_bytes(4, "big") + data)
                        echoed[number] = await receive_exactly(stream, len(data))

                async with anyio.create_task_group() as group:
                    for number in range(len(payloads)):
                        group.start_soon(one, number)
                serving.cancel_scope.cancel()
    assert echoed == dict(enumerate(payloads))
    # Six connections, one UDP socket each side.
    assert len(socket_ids) == 6
    assert local_ports == {client.local_address[1]}


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

    async def forward(self) -> None:
        while True:
            await anyio.wait_readable(self.sock)
            data, source = self.sock.recvfrom(65536)
            if self.cut:
                continue
            if source == self.server:
                if self.client is not None:
                    self.sock.sendto(data, self.client)
            else:
                self.client = source
                self.sock.sendto(data, self.server)


async def test_a_path_that_dies_breaks_both_streams_at_the_idle_timeout() -> None:
    config = UdtConfig(idle_timeout=1.0)
    async with (
        UdtEndpoint.bind(LOOPBACK, config=config) as server,
        UdtEndpoint.bind(LOOPBACK, config=config) as client,
    ):
        path = Path(server.local_address)
        with path.sock:
            async with anyio.create_task_group() as group:
                group.start_soon(path.forward)
                with anyio.fail_after(WAIT):
                    server.listen()
                    outgoing = await client.connect(path.address)
                    incoming = await server.accept()
                    await outgoing.send(b"last words")
                    assert await receive_exactly(incoming, 10) == b"last words"
                    path.cut = True
                    with pytest.raises(anyio.BrokenResourceError, match="TIMEOUT"):
                        await incoming.receive()
                    assert incoming.close_reason is CloseReason.TIMEOUT
                    with pytest.raises(anyio.BrokenResourceError):
                        await incoming.send(b"anyone?")
                    with pytest.raises(anyio.BrokenResourceError, match="TIMEOUT"):
                        await outgoing.receive()
                    await incoming.aclose()
                    await outgoing.aclose()
                group.cancel_scope.cancel()


async def test_an_abort_drops_what_is_unacknowledged_and_ends_the_peer_stream() -> None:
    async with UdtEndpoint.bind(LOOPBACK) as server, UdtEndpoint.bind(LOOPBACK) as client:
        with anyio.fail_after(WAIT):
            outgoing, incoming = await connected_pair(client, server)
            await outgoing.send(os.urandom(4 * 1024 * 1024))  # taken, mostly unacknowledged
            await anyio.aclose_forcefully(outgoing)
            assert outgoing.close_reason is CloseReason.ABORTED
            # The abort is flagged in the Shutdown: the peer's stream breaks rather
            # than ending as if the bytes it got were all there was.
            with pytest.raises(anyio.BrokenResourceError, match="PEER_ABORTED"):
                await receive_exactly(incoming, 4 * 1024 * 1024)
            assert incoming.close_reason is CloseReason.PEER_ABORTED
            assert incoming.connection.counters.bytes_received < 4 * 1024 * 1024


async def test_connect_to_a_port_with_nobody_fails_within_the_connect_timeout() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as unused:
        unused.bind(LOOPBACK)
        nobody: Endpoint = ("127.0.0.1", unused.getsockname()[1])
    async with UdtEndpoint.bind(LOOPBACK) as client:
        started = anyio.current_time()
        with anyio.fail_after(REGULAR_CONNECT_TIMEOUT + 2.0):
            with pytest.raises(UdtConnectError) as failure:
                await client.connect(nobody)
        assert failure.value.reason is CloseReason.HANDSHAKE_FAILED
        assert anyio.current_time() - started >= REGULAR_CONNECT_TIMEOUT - 0.1
        assert "connect to 127.0.0.1" in str(failure.value)
        assert client.multiplexer.connections == {}


async def test_a_reader_that_stops_blocks_the_sender_and_memory_stays_bounded() -> None:
    # Small buffers so that "bounded" is far below what the sender has to send.
    config = UdtConfig(send_buffer_bytes=256 * 1024, receive_buffer_packets=128)
    high_water = 128 * 1024
    bound = config.send_buffer_bytes + config.receive_buffer_packets * 1500 + high_water
    payload = os.urandom(16 * 1024 * 1024)
    accepted = 0
    finished = anyio.Event()
    async with (
        UdtEndpoint.bind(LOOPBACK, config=config, receive_high_water=high_water) as server,
        UdtEndpoint.bind(LOOPBACK, config=config) as client,
    ):
        with anyio.fail_after(WAIT):
            outgoing, incoming = await connected_pair(client, server)

            async def send_all() -> None:
                nonlocal accepted
                for start in range(0, len(payload), 64 * 1024):
                    await outgoing.send(payload[start : start + 64 * 1024])
                    accepted = start + 64 * 1024
                finished.set()

            async with anyio.create_task_group() as group:
                group.start_soon(send_all)
                # Nobody reads: the sender fills the window and both buffers, then waits.
                while not (outgoing.send_blocked and accepted >= config.send_buffer_bytes):
                    await anyio.wait_all_tasks_blocked()
                assert not finished.is_set()
                assert accepted <= bound
                assert incoming.buffered_bytes <= high_water + 64 * 1024
                received = await receive_exactly(incoming, len(payload))
            assert received == payload
            await outgoing.aclose()
            await incoming.aclose()


async def test_stream_rules_no_half_close_and_nothing_after_close() -> None:
    async with UdtEndpoint.bind(LOOPBACK) as server, UdtEndpoint.bind(LOOPBACK) as client:
        with anyio.fail_after(WAIT):
            outgoing, incoming = await connected_pair(client, server)
            with pytest.raises(NotImplementedError, match="half-close"):
                await outgoing.send_eof()
            await outgoing.aclose()
            with pytest.raises(anyio.ClosedResourceError):
                await outgoing.send(b"late")
            with pytest.raises(anyio.ClosedResourceError):
                await outgoing.receive()
            await outgoing.aclose()  # twice is harmless
            await incoming.aclose()


async def test_a_handed_in_socket_carries_other_datagrams_and_stays_open() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(LOOPBACK)
    foreign: list[tuple[bytes, Endpoint]] = []
    arrived = anyio.Event()

    def hand_on(data: bytes, source: Endpoint) -> None:
        foreign.append((data, source))
        arrived.set()

    # A STUN Binding request (RFC 8489 §5): not UDT, so the endpoint hands it on.
    stun = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + bytes(12)
    with sock, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
        other.bind(LOOPBACK)
        async with UdtEndpoint(sock, foreign_datagram=hand_on) as endpoint:
            assert endpoint.local_address == sock.getsockname()
            with anyio.fail_after(WAIT):
                other.sendto(stun, endpoint.local_address)
                await arrived.wait()
        assert foreign == [(stun, other.getsockname())]
        assert sock.fileno() != -1  # still the punching code's socket


async def test_the_datagram_port_shares_the_socket_with_a_live_connection() -> None:
    # The punching socket's shape: a STUN exchange (the connect request, the ack) and
    # UDT connections on one socket, so the mediator sees the mapping UDT will use.
    stun = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + bytes(12)
    async with UdtEndpoint.bind(LOOPBACK) as server, UdtEndpoint.bind(LOOPBACK) as client:
        with anyio.fail_after(WAIT):
            outgoing, incoming = await connected_pair(client, server)
            port = client.datagram_port()
            await port.send((stun, server.local_address))
            assert await server.receive_foreign() == (stun, client.local_address)
            await outgoing.send(b"still flowing")
            assert await receive_exactly(incoming, 13) == b"still flowing"
            answer = stun[:-1] + b"\x01"  # another transaction id
            server.send_datagram(answer, client.local_address)
            assert await port.receive() == (answer, server.local_address)
            await outgoing.aclose()
            await incoming.aclose()


async def test_a_close_just_before_a_cancelled_exit_still_reaches_the_peer() -> None:
    # aclose() returns with the Shutdown queued; an endpoint left by a cancellation a
    # moment later (its driver stopped first) must still send it, or the peer keeps
    # the connection until its idle timeout (here a minute: WAIT ends the test first).
    patient = UdtConfig(idle_timeout=60.0)
    async with UdtEndpoint.bind(LOOPBACK, config=patient) as server:
        server.listen()
        with anyio.fail_after(WAIT):
            with anyio.CancelScope() as leave:
                async with UdtEndpoint.bind(LOOPBACK) as client:
                    outgoing = await client.connect(server.local_address)
                    incoming = await server.accept()
                    await outgoing.aclose()
                    leave.cancel()
                    await anyio.lowlevel.checkpoint()
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                await incoming.receive()


async def test_foreign_datagrams_nobody_takes_are_dropped_beyond_a_bound() -> None:
    stun = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + bytes(12)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
        other.bind(LOOPBACK)
        async with UdtEndpoint.bind(LOOPBACK) as endpoint:
            with anyio.fail_after(WAIT):
                for _ in range(100):
                    other.sendto(stun, endpoint.local_address)
                while endpoint.foreign_dropped < 100 - 64:
                    await anyio.wait_all_tasks_blocked()
            assert endpoint.foreign_dropped == 36
            for _ in range(64):
                assert (await endpoint.receive_foreign())[0] == stun


async def test_gso_sends_runs_of_datagrams_as_one_and_they_arrive_whole() -> None:
    payload = os.urandom(4 * 1024 * 1024)
    async with (
        UdtEndpoint.bind(LOOPBACK) as server,
        UdtEndpoint.bind(LOOPBACK, gso=True) as client,
    ):
        with anyio.fail_after(WAIT):
            outgoing, incoming = await connected_pair(client, server)
            async with anyio.create_task_group() as group:
                group.start_soon(outgoing.send, payload)
                assert await receive_exactly(incoming, len(payload)) == payload
            await outgoing.aclose()
            await incoming.aclose()
    assert client._io.gso_batches > 0


async def test_a_bulk_transfer_beside_many_idle_connections_and_every_one_still_works() -> None:
    # A turn pumps only the streams whose connection did something: the idle ones must
    # still hear their keep-alives, their data and their close.
    payload = os.urandom(4 * 1024 * 1024)
    async with UdtEndpoint.bind(LOOPBACK) as server, UdtEndpoint.bind(LOOPBACK) as client:
        with anyio.fail_after(WAIT):
            idle = [await connected_pair(client, server) for _ in range(150)]
            outgoing, incoming = await connected_pair(client, server)
            assert len(server.multiplexer.connections) == 151
            async with anyio.create_task_group() as group:
                group.start_soon(outgoing.send, payload)
                received = await receive_exactly(incoming, len(payload))
            assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
            for number, (their, ours) in enumerate(idle):
                await their.send(b"%d" % number)
                assert await ours.receive() == b"%d" % number
            await idle[0][0].aclose()
            with pytest.raises(anyio.EndOfStream):
                await idle[0][1].receive()
            assert all(o.connection.state is ConnectionState.CONNECTED for o, _ in idle[1:])
