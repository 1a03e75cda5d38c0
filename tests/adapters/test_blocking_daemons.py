"""End to end: the blocking adapter's mediator and relay, driven by the real anyio clients.

Each daemon runs ``serve_forever`` in a thread of its own, exactly as a blocking
application would run it, and is stopped with ``shutdown()`` from the test's
thread. The other side is the anyio adapter (``MediatorListener``,
``request_connection``, ``RelayAgent``, ``open_relay_stream``), the core's
sans-I/O ``ConnectRequest`` over plain sockets, or raw bytes. Every wait is
bounded (``fail_after``, socket timeouts, ``join`` timeouts).
"""

from __future__ import annotations

import hashlib
import os
import queue
import secrets
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

import anyio
import anyio.abc
import pytest

from wavesync_adapters.anyio.connect import ConnectError, request_connection
from wavesync_adapters.anyio.listen import MediatorListener, RegistrationError
from wavesync_adapters.anyio.relay_agent import RelayAgent, RelayTunnelInfo
from wavesync_adapters.anyio.relay_client import RelayConnectError, open_relay_stream
from wavesync_adapters.blocking.mediator import MediatorDaemon
from wavesync_adapters.blocking.relay import RelayDaemon
from wavesync_proto.addresses import Endpoint
from wavesync_proto.errors import LocalProtocolError
from wavesync_proto.mediator.connect import ConnectRequest, ConnectSucceeded
from wavesync_proto.mediator.listen import ConnectionRequestReceived
from wavesync_proto.mediator.service import MediatorLimits, MediatorService
from wavesync_proto.relay import RelayLimits, RelayService
from wavesync_proto.stun.attributes import XorMappedAddress
from wavesync_proto.stun.message import (
    BINDING,
    Message,
    MessageClass,
    decode_message,
    encode_message,
)

RELAY_URL = "https://relay.test.invalid:8443/"
WAIT = 15.0  # seconds any one step may take before the test fails
LOCAL_TCP: Endpoint = ("192.0.2.10", 4433)
FORWARDED_TCP: Endpoint = ("198.51.100.7", 443)
LOOPBACK = "127.0.0.1"

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    # The daemons under test run in their own threads; the anyio side is the
    # reference client, already tested on both backends by the anyio e2e suites.
    return "asyncio"


@contextmanager
def serving(daemon: MediatorDaemon | RelayDaemon) -> Iterator[Endpoint]:
    """Run ``daemon.serve_forever`` on loopback in a thread; yield its address; then
    ``shutdown()`` it and check that its thread ends."""
    bound: queue.Queue[Endpoint | BaseException] = queue.Queue()

    def run() -> None:
        try:
            daemon.serve_forever(LOOPBACK, 0, started=bound.put)
        except BaseException as exc:
            bound.put(exc)
            raise

    thread = threading.Thread(target=run, name="blocking-daemon")
    thread.start()
    try:
        address = bound.get(timeout=WAIT)
        assert not isinstance(address, BaseException), address
        yield address
    finally:
        daemon.shutdown()
        thread.join(WAIT)
    assert not thread.is_alive(), "serve_forever did not return after shutdown()"


def new_systems(count: int) -> dict[uuid.UUID, str]:
    return {uuid.uuid4(): secrets.token_urlsafe(32) for _ in range(count)}


# --- the mediator ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Mediator:
    address: Endpoint
    systems: dict[uuid.UUID, str]
    service: MediatorService


@pytest.fixture(scope="module")
def mediator() -> Iterator[Mediator]:
    systems = new_systems(2)
    service = MediatorService(
        systems=systems, relay_urls=(RELAY_URL,), nonce_secret=secrets.token_bytes(32)
    )
    with serving(MediatorDaemon(service)) as address:
        yield Mediator(address, systems, service)


def listener_for(
    mediator: Mediator, system_id: uuid.UUID, key: str | None = None
) -> MediatorListener:
    return MediatorListener(
        mediator.address,
        system_id=system_id,
        server_id=uuid.uuid4(),
        system_key=mediator.systems[system_id] if key is None else key,
        local_endpoints=[LOCAL_TCP],
        forwarded_endpoints=[FORWARDED_TCP],
    )


def local(udp: anyio.abc.UDPSocket) -> Endpoint:
    address = udp.extra(anyio.abc.SocketAttribute.local_address)
    return (str(address[0]), int(address[1]))


@asynccontextmanager
async def acking_server(
    mediator: Mediator, system_id: uuid.UUID
) -> AsyncIterator[tuple[MediatorListener, Endpoint, list[ConnectionRequestReceived]]]:
    """A registered server that acks every connection request from one UDP socket."""
    listener = listener_for(mediator, system_id)
    requests: list[ConnectionRequestReceived] = []
    async with (
        anyio.create_task_group() as group,
        await anyio.create_udp_socket(local_host=LOOPBACK) as udp,
    ):
        await group.start(listener.run)
        registered = await listener.wait_registered()
        assert registered.public_endpoint[0] == LOOPBACK  # the mediator saw our TCP source

        async def ack_all() -> None:
            while True:
                request = await listener.next_request()
                assert isinstance(request, ConnectionRequestReceived)
                requests.append(request)
                await listener.acknowledge(request.connect_session_id, udp)

        group.start_soon(ack_all)
        yield listener, local(udp), requests
        group.cancel_scope.cancel()


async def test_a_client_reaches_a_server_by_its_id_and_both_learn_each_others_udp_address(
    mediator: Mediator,
) -> None:
    system_id = next(iter(mediator.systems))
    with anyio.fail_after(WAIT):
        async with (
            acking_server(mediator, system_id) as (listener, server_udp, requests),
            await anyio.create_udp_socket(local_host=LOOPBACK) as client_udp,
        ):
            client_address = local(client_udp)
            answer = await request_connection(
                mediator.address, server_id=listener.server_id, udp=client_udp
            )
    [request] = requests
    assert request.client_udp_endpoint == client_address
    response = answer.response
    assert response.server_id == listener.server_id
    assert response.system_id == system_id
    assert response.udp_endpoints == (server_udp,)
    assert response.local_endpoints == (LOCAL_TCP,)
    assert response.forwarded_endpoints == (FORWARDED_TCP,)
    assert response.relay_urls == (RELAY_URL,)


def connect_over_tcp_only(mediator: Endpoint, server_id: uuid.UUID) -> ConnectSucceeded:
    """The core's connect request, its TCP copy only, over a blocking socket."""
    request = ConnectRequest(server_id=server_id, now=time.monotonic(), timeout=WAIT)
    with socket.create_connection(mediator, timeout=WAIT) as tcp:
        tcp.sendall(request.tcp_data_to_send())
        while not request.done:
            data = tcp.recv(65536)
            if not data:
                request.tcp_connection_lost(time.monotonic())
                break
            request.tcp_data_received(data, time.monotonic())
    event = request.next_event()
    assert isinstance(event, ConnectSucceeded), event
    return event


def connect_over_udp_only(
    mediator: Endpoint, server_id: uuid.UUID, udp: socket.socket
) -> ConnectSucceeded:
    """The core's connect request, its UDP copy only (retransmitted on its schedule)."""
    request = ConnectRequest(server_id=server_id, now=time.monotonic(), timeout=WAIT)
    while not request.done:
        for data in request.datagrams_to_send(time.monotonic()):
            udp.sendto(data, mediator)
        timer = request.get_timer()
        udp.settimeout(None if timer is None else max(0.001, timer - time.monotonic()))
        try:
            data, source = udp.recvfrom(65536)
        except TimeoutError:
            request.handle_timer(time.monotonic())
            continue
        if source == mediator:
            request.datagram_received(data, time.monotonic())
    event = request.next_event()
    assert isinstance(event, ConnectSucceeded), event
    return event


async def test_connect_is_brokered_over_tcp_alone(mediator: Mediator) -> None:
    system_id = next(iter(mediator.systems))
    with anyio.fail_after(WAIT):
        async with acking_server(mediator, system_id) as (listener, server_udp, requests):
            answer = await anyio.to_thread.run_sync(
                connect_over_tcp_only, mediator.address, listener.server_id
            )
    assert answer.via == "tcp"
    assert answer.response.server_id == listener.server_id
    assert answer.response.udp_endpoints == (server_udp,)
    assert [request.connect_session_id for request in requests] == [answer.connect_session_id]


async def test_connect_is_brokered_over_udp_alone(mediator: Mediator) -> None:
    system_id = next(iter(mediator.systems))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client_udp:
        client_udp.bind((LOOPBACK, 0))
        with anyio.fail_after(WAIT):
            async with acking_server(mediator, system_id) as (listener, server_udp, requests):
                answer = await anyio.to_thread.run_sync(
                    connect_over_udp_only, mediator.address, listener.server_id, client_udp
                )
        client_address = client_udp.getsockname()
    assert answer.via == "udp"
    assert answer.response.client_mapped == client_address
    assert answer.response.udp_endpoints == (server_udp,)
    [request] = requests
    assert request.client_udp_endpoint == client_address


async def test_a_client_asking_for_a_system_gets_its_online_servers_in_turn(
    mediator: Mediator,
) -> None:
    system_id = list(mediator.systems)[1]
    with anyio.fail_after(WAIT):
        async with (
            acking_server(mediator, system_id) as (first, _, _),
            acking_server(mediator, system_id) as (second, _, _),
        ):
            chosen = [
                (await request_connection(mediator.address, system_id=system_id)).response
                for _ in range(4)
            ]
    ids = [response.server_id for response in chosen]
    assert set(ids) == {first.server_id, second.server_id}
    assert ids[0] != ids[1]
    assert ids[:2] == ids[2:]


async def test_a_server_with_the_wrong_key_is_refused_and_cannot_be_reached(
    mediator: Mediator,
) -> None:
    system_id = next(iter(mediator.systems))
    impostor = listener_for(mediator, system_id, key="not-the-system-key")
    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as group:
            await group.start(impostor.run)
            with pytest.raises(RegistrationError) as refused:
                await impostor.wait_registered()
            with pytest.raises(ConnectError) as offline:
                await request_connection(mediator.address, server_id=impostor.server_id)
            group.cancel_scope.cancel()
    assert refused.value.code == 401
    assert offline.value.code == 404


async def test_an_unknown_system_is_not_found(mediator: Mediator) -> None:
    with anyio.fail_after(WAIT), pytest.raises(ConnectError) as failed:
        await request_connection(mediator.address, system_id=uuid.uuid4())
    assert failed.value.code == 404


def binding_request() -> bytes:
    return encode_message(
        Message(message_class=MessageClass.REQUEST, method=BINDING, transaction_id=bytes(12))
    )


def test_the_mediator_answers_binding_on_both_faces_and_closes_on_garbage() -> None:
    service = MediatorService(systems=new_systems(1), nonce_secret=secrets.token_bytes(32))
    with serving(MediatorDaemon(service)) as address:
        with socket.create_connection(address, timeout=WAIT) as tcp:
            tcp.sendall(binding_request())
            answer = decode_message(tcp.recv(2048))
            assert answer.get(XorMappedAddress) == XorMappedAddress(tcp.getsockname())
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.settimeout(WAIT)
            udp.bind((LOOPBACK, 0))
            udp.sendto(binding_request(), address)
            data, source = udp.recvfrom(2048)
            assert source == address
            assert decode_message(data).get(XorMappedAddress) == XorMappedAddress(udp.getsockname())
        with socket.create_connection(address, timeout=WAIT) as tcp:
            tcp.sendall(b"GET / HTTP/1.1\r\n\r\n")
            assert tcp.recv(2048) == b""  # closed on the first bytes that are not STUN
    assert service.counters.bindings_answered == 2
    assert service.counters.malformed == 1


def test_the_mediator_limits_hold_an_oversized_message_and_an_idle_peer_are_closed() -> None:
    limits = MediatorLimits(max_tcp_buffer=1024, client_idle_timeout=0.2)
    service = MediatorService(
        systems=new_systems(1), nonce_secret=secrets.token_bytes(32), limits=limits
    )
    with serving(MediatorDaemon(service)) as address:
        with socket.create_connection(address, timeout=WAIT) as tcp:
            # A STUN header announcing 60,000 bytes: refused as soon as the header is in.
            header = bytearray(binding_request()[:20])
            header[2:4] = (60_000).to_bytes(2, "big")
            tcp.sendall(header)
            assert tcp.recv(2048) == b""
        with socket.create_connection(address, timeout=WAIT) as idle:
            idle.sendall(binding_request())
            assert decode_message(idle.recv(2048)).get(XorMappedAddress) is not None
            # Then silence: the service's timer closes the peer after client_idle_timeout.
            assert idle.recv(2048) == b""
    assert service.counters.bindings_answered == 1


def test_a_taken_port_is_an_oserror_and_shutdown_from_another_thread_ends_serving() -> None:
    service = MediatorService(systems=new_systems(1), nonce_secret=secrets.token_bytes(32))
    daemon = MediatorDaemon(service)
    with serving(daemon) as address:
        second = MediatorDaemon(service)
        with pytest.raises(OSError, match="in use"):
            second.serve_forever(*address)
        peer = socket.create_connection(address, timeout=WAIT)
        # The peer is served (answered), so shutdown must end a loop that holds it.
        peer.sendall(binding_request())
        assert peer.recv(2048)
        stopper = threading.Thread(target=daemon.shutdown, name="stopper")
        stopper.start()
        stopper.join(WAIT)
    # serving() checked that serve_forever returned; every socket of the daemon is closed:
    assert peer.recv(2048) == b""
    peer.close()
    with pytest.raises(ConnectionRefusedError), socket.create_connection(address, timeout=WAIT):
        pass


# --- the relay ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Relay:
    address: Endpoint
    system_id: uuid.UUID
    key: str
    daemon: RelayDaemon


@contextmanager
def relay_daemon(limits: RelayLimits | None = None) -> Iterator[Relay]:
    systems = new_systems(1)
    [(system_id, key)] = systems.items()
    daemon = RelayDaemon(RelayService(systems, limits=limits))
    with serving(daemon) as address:
        yield Relay(address, system_id, key, daemon)


@pytest.fixture(scope="module")
def relay() -> Iterator[Relay]:
    with relay_daemon() as running:
        yield running


async def echo(stream: anyio.abc.ByteStream, info: RelayTunnelInfo) -> None:
    async with stream:
        while True:
            try:
                data = await stream.receive()
            except anyio.EndOfStream:
                await stream.send_eof()
                return
            await stream.send(data)


@asynccontextmanager
async def running_agent(
    relay: Relay,
    handler: object = echo,
    *,
    server_id: uuid.UUID | None = None,
    key: str | None = None,
) -> AsyncIterator[RelayAgent]:
    agent = RelayAgent(
        relay.address,
        system_id=relay.system_id,
        server_id=server_id or uuid.uuid4(),
        key=relay.key if key is None else key,
    )
    async with anyio.create_task_group() as group:
        await group.start(agent.serve, handler)
        yield agent
        group.cancel_scope.cancel()


async def send_and_read_all(stream: anyio.abc.ByteStream, payload: bytes) -> bytes:
    """Send ``payload`` and a half-close while reading everything until EOF."""
    received = bytearray()

    async def read_all() -> None:
        while True:
            try:
                received.extend(await stream.receive())
            except anyio.EndOfStream:
                return

    async with anyio.create_task_group() as group:
        group.start_soon(read_all)
        await stream.send(payload)
        await stream.send_eof()
    return bytes(received)


async def test_agent_keeps_seven_and_ten_clients_each_get_their_own_echo(relay: Relay) -> None:
    server_id = uuid.uuid4()
    async with running_agent(relay, server_id=server_id) as agent:
        with anyio.fail_after(WAIT):
            await agent.wait_for_idle(7)
        assert agent.pool.target == 7  # the blocking relay's 101 asked for the default
        payloads = [os.urandom(256 * 1024 + n) for n in range(10)]
        echoed: dict[int, bytes] = {}
        sessions: set[bytes] = set()

        async def client(number: int) -> None:
            tunnel = await open_relay_stream(relay.address, server_id=server_id)
            sessions.add(tunnel.session_id)
            async with tunnel.stream:
                echoed[number] = await send_and_read_all(tunnel.stream, payloads[number])

        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as group:
                for number in range(10):
                    group.start_soon(client, number)
            await agent.wait_for_idle(7)  # every taken connection was replaced
    assert [echoed[number] == payloads[number] for number in range(10)] == [True] * 10
    assert len(sessions) == 10


async def test_ten_megabytes_cross_byte_exact_both_ways_and_each_half_close_passes(
    relay: Relay,
) -> None:
    # Each end sends its own 10 MB and then half-closes, while reading the other's
    # until EOF: both directions at once, and each EOF reaches the other end.
    to_server, to_client = os.urandom(10 * 2**20), os.urandom(10 * 2**20)
    server_got: list[bytes] = []

    async def sender(stream: anyio.abc.ByteStream, info: RelayTunnelInfo) -> None:
        async with stream:
            server_got.append(await send_and_read_all(stream, to_client))

    server_id = uuid.uuid4()
    async with running_agent(relay, sender, server_id=server_id) as agent:
        with anyio.fail_after(WAIT):
            await agent.wait_for_idle(1)
            tunnel = await open_relay_stream(relay.address, server_id=server_id)
            async with tunnel.stream:
                client_got = await send_and_read_all(tunnel.stream, to_server)
            while not server_got:
                await agent.wait_for_change()
    assert hashlib.sha256(client_got).digest() == hashlib.sha256(to_client).digest()
    assert hashlib.sha256(server_got[0]).digest() == hashlib.sha256(to_server).digest()


async def test_a_client_may_name_the_system_and_the_relay_counts_the_session(
    relay: Relay,
) -> None:
    service = relay.daemon.service
    paired = service.counters.clients_paired
    async with running_agent(relay) as agent:
        with anyio.fail_after(WAIT):
            await agent.wait_for_idle(1)
            tunnel = await open_relay_stream(relay.address, system_id=relay.system_id)
            async with tunnel.stream:
                assert await send_and_read_all(tunnel.stream, b"by system") == b"by system"
    assert service.counters.clients_paired == paired + 1


async def test_an_unknown_server_is_a_clear_404(relay: Relay) -> None:
    with anyio.fail_after(WAIT), pytest.raises(RelayConnectError) as caught:
        await open_relay_stream(relay.address, server_id=uuid.uuid4())
    assert caught.value.status == 404
    assert "no standby connection" in str(caught.value)


async def test_a_wrong_key_is_refused_and_the_agent_backs_off(relay: Relay) -> None:
    async with running_agent(relay, key="not-the-system-key-0000") as agent:
        with anyio.fail_after(WAIT):
            while agent.pool.consecutive_failures == 0:
                await agent.wait_for_change()
    assert agent.pool.idle == 0


def relay_answer(address: Endpoint, request: bytes) -> bytes:
    """Send a raw request and read the relay's whole answer (it closes after errors)."""
    with socket.create_connection(address, timeout=WAIT) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n", b"404"),
        (b"GET http://127.0.0.1:22/ HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n", b"404"),
        (b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n", b"404"),
        (
            b"GET /wavesync/relay/v1/connect HTTP/1.1\r\nHost: relay\r\n"
            b"Connection: Upgrade\r\nUpgrade: wavesync-relay/1\r\n"
            b"Wavesync-Server: 127.0.0.1:22\r\n\r\n",
            b"400",
        ),
        (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(40), b"400"),
        (b"GET /" + b"x" * 9000 + b" HTTP/1.1\r\nHost: relay\r\n\r\n", b"431"),
    ],
)
def test_the_relay_is_not_an_open_proxy_and_answers_bad_input(
    relay: Relay, request_bytes: bytes, status: bytes
) -> None:
    answer = relay_answer(relay.address, request_bytes)
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]


def test_the_handshake_limits_are_enforced_by_the_service_timer() -> None:
    # One handshake at a time, and a short handshake timeout: a silent connection
    # is closed by the service's timer, a second one at once.
    limits = RelayLimits(max_handshaking=1, handshake_timeout=0.2)
    with (
        relay_daemon(limits) as relay,
        socket.create_connection(relay.address, timeout=WAIT) as silent,
    ):
        assert relay_answer(relay.address, b"GET / HTTP/1.1\r\n") == b""
        assert silent.recv(1024) == b""
        counters = relay.daemon.service.counters
    assert counters.connections_refused == 1
    assert counters.handshake_timeouts == 1


async def test_shutdown_ends_serving_with_a_session_in_flight() -> None:
    with relay_daemon() as relay:
        server_id = uuid.uuid4()
        async with running_agent(relay, server_id=server_id) as agent:
            with anyio.fail_after(WAIT):
                await agent.wait_for_idle(1)
                tunnel = await open_relay_stream(relay.address, server_id=server_id)
                await tunnel.stream.send(b"ping")
                assert await tunnel.stream.receive() == b"ping"
                stopper = threading.Thread(target=relay.daemon.shutdown, name="stopper")
                stopper.start()
                stopper.join(WAIT)
                # The relay closed the spliced session as it stopped.
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                    await tunnel.stream.receive()
                await tunnel.stream.aclose()
    # Closing the session as it stopped ended it in the service's books, and every
    # pipe went back and was closed.
    counters = relay.daemon.service.counters
    assert (counters.clients_paired, counters.sessions_ended, counters.sessions_active) == (1, 1, 0)
    assert relay.daemon.bytes_client_to_server == 4
    assert relay.daemon.bytes_server_to_client > 4  # the client's 101 answer, then the echo
    assert relay.daemon.pipes.open_pipes == 0


def test_a_shutdown_before_serving_makes_serve_forever_return_once_bound() -> None:
    daemon = RelayDaemon(RelayService(new_systems(1)))
    daemon.shutdown()
    bound: list[Endpoint] = []
    daemon.serve_forever(LOOPBACK, 0, started=bound.append)
    assert daemon.bound is not None
    assert bound == [daemon.bound]
    with pytest.raises(LocalProtocolError, match="runs once"):
        daemon.serve_forever(LOOPBACK, 0)
    with pytest.raises(ConnectionRefusedError), socket.create_connection(bound[0], timeout=WAIT):
        pass


# --- no async runtime on the blocking path --------------------------------------------------


def test_importing_the_blocking_daemons_loads_no_async_runtime() -> None:
    code = (
        "import sys\n"
        "import wavesync_adapters.blocking.mediator, wavesync_adapters.blocking.relay\n"
        "print(sorted(m for m in ('asyncio', 'anyio', 'trio') if m in sys.modules))\n"
    )
    result = subprocess.run(  # noqa: S603 - this interpreter, a fixed script
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
