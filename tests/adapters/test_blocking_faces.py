"""End to end: the blocking daemons' HTTP tunnel faces, driven by the real anyio tunnel clients.

The blocking ``MediatorDaemon`` (``http=``) and ``RelayDaemon`` (its tunnel
hand-off) each run ``serve_forever`` in a thread of their own; the other side
is the anyio adapter's tunnel clients (``MediatorListener``,
``request_connection``, ``RelayAgent``, ``open_relay_stream``, ``open_tunnel``)
with a named method or the probe, directly or through a real squid. Bad
requests are answered byte for byte as anyio's ``TunnelServer`` answers them
(both read the core's answer). Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import secrets
import socket
import ssl
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.abc
import pytest
import trustme

from tests.adapters.tunnels import echo_server, round_trip
from tests.daemons import new_system, wavesync_daemon
from tests.squid import DEFAULT, PERMISSIVE, squid_binary, squid_proxy
from wavesync_adapters._common import AUTO, TunnelChoice
from wavesync_adapters.anyio.connect import request_connection
from wavesync_adapters.anyio.listen import MediatorListener
from wavesync_adapters.anyio.relay import RelayDaemon as AnyioRelayDaemon
from wavesync_adapters.anyio.relay_agent import RelayAgent, RelayTunnelInfo
from wavesync_adapters.anyio.relay_client import open_relay_stream
from wavesync_adapters.anyio.tunnel import open_tunnel
from wavesync_adapters.blocking._loop import SelectorLoop
from wavesync_adapters.blocking.mediator import MediatorDaemon
from wavesync_adapters.blocking.relay import RelayDaemon
from wavesync_adapters.blocking.tunnel_server import HIGH_WATER, TunnelServer
from wavesync_proto.addresses import Endpoint, format_endpoint
from wavesync_proto.mediator.listen import ConnectionRequestReceived
from wavesync_proto.mediator.service import MediatorService
from wavesync_proto.relay import RelayService
from wavesync_proto.stun.attributes import XorMappedAddress
from wavesync_proto.stun.message import (
    BINDING,
    Message,
    MessageClass,
    decode_message,
    encode_message,
)
from wavesync_proto.tunnel import GetPostRegistry, ProxyConfig, TunnelKind, TunnelMethod

WAIT = 20.0  # seconds any one step may take before the test fails
LOOPBACK = "127.0.0.1"
RELAY_URL = "https://relay.test.invalid:8443/"
MEDIATOR_READY = (
    r"mediator listening on udp\+tcp (?P<host>[\d.]+):(?P<port>\d+),"
    r" http (?P<http_host>[\d.]+):(?P<http_port>\d+)"
)
TUNNEL_ID = "0123456789abcdef0123456789abcdef"
GETPOST_GET = b"GET /wavesync/tunnel/v1/getpost/%s HTTP/1.1\r\nHost: x\r\n\r\n" % TUNNEL_ID.encode()

pytestmark = pytest.mark.anyio

T = TypeVar("T")

needs_squid = pytest.mark.skipif(squid_binary() is None, reason="squid is not installed")


@pytest.fixture
def anyio_backend() -> str:
    # The daemons under test run in their own threads; the anyio side is the
    # reference client, already tested on both backends by the anyio suites.
    return "asyncio"


@contextmanager
def serving(daemon: MediatorDaemon | RelayDaemon) -> Iterator[Endpoint]:
    """Run ``daemon.serve_forever`` on loopback in a thread; yield its address; then
    ``shutdown()`` it and check that its thread ended and no tunnel is left open."""
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
    assert daemon.tunnels.active == 0


def kind(name: str) -> TunnelKind:
    tls, _, method = name.rpartition("+")
    return TunnelKind(method=TunnelMethod(method), tls=tls == "ssl")


def choice(name: str | None) -> TunnelChoice | None:
    return None if name is None else AUTO if name == "auto" else kind(name)


def binding_request() -> bytes:
    return encode_message(
        Message(message_class=MessageClass.REQUEST, method=BINDING, transaction_id=bytes(12))
    )


# --- the tunnel server alone, echoing ----------------------------------------------------------


def echo_blocking(sock: socket.socket) -> None:
    """Send back every byte; pass the peer's end on as ours (a thread per stream: a test)."""
    with sock:
        sock.setblocking(True)
        sock.settimeout(WAIT)
        while data := sock.recv(65536):
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(2.0)
        with contextlib.suppress(OSError):  # a raw tunnel over TLS: the pair end just closes
            sock.recv(1)


@dataclass(frozen=True)
class Face:
    server: TunnelServer
    loop: SelectorLoop

    def ask(self, question: Callable[[], T]) -> T:
        """``question()``'s answer, asked in the loop's thread after its current turn."""
        answers: queue.Queue[T] = queue.Queue()
        self.loop.call_soon_threadsafe(lambda: answers.put(question()))
        return answers.get(timeout=WAIT)


@contextmanager
def echo_face(**options: Any) -> Iterator[Face]:
    """A blocking ``TunnelServer`` alone in its own selector loop thread, every tunnel echoed."""
    loop = SelectorLoop()
    echoes: list[threading.Thread] = []

    def handler(sock: socket.socket, remote: Endpoint) -> None:
        echoes.append(threading.Thread(target=echo_blocking, args=(sock,), name="echo"))
        echoes[-1].start()

    server = TunnelServer(loop, handler, **options)
    server.listen(LOOPBACK, 0)

    def run() -> None:
        try:
            loop.run(server.next_deadline, server.on_deadline)
        finally:
            server.close()
            loop.close()

    thread = threading.Thread(target=run, name="tunnel-face")
    thread.start()
    try:
        yield Face(server, loop)
    finally:
        loop.stop()
        thread.join(WAIT)
        for echo_thread in echoes:
            echo_thread.join(WAIT)
    assert not thread.is_alive()
    assert not any(echo_thread.is_alive() for echo_thread in echoes)
    assert server.active == 0


@pytest.mark.parametrize("tunnel", ["upgrade", "websocket", "getpost"])
async def test_each_method_carries_two_megabytes_both_ways_byte_exact(tunnel: str) -> None:
    payload = os.urandom(2_000_000 + 17)
    with echo_face() as face:
        assert face.server.bound is not None
        with anyio.fail_after(WAIT):
            stream = await open_tunnel(f"http://{format_endpoint(face.server.bound)}", kind(tunnel))
            async with stream:
                assert await round_trip(stream, payload, block=50_000) == payload
        assert face.server.served == {tunnel: 1}


@pytest.mark.parametrize("tunnel", ["ssl+upgrade", "ssl+websocket", "ssl+getpost"])
async def test_each_ssl_kind_carries_a_stream_through_the_non_blocking_tls(
    ca: trustme.CA, tunnel: str
) -> None:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    payload = os.urandom(1_000_000)
    # A raw method over TLS has no half-close: read back exactly what was sent.
    half_close = kind(tunnel).method is TunnelMethod.GETPOST or "websocket" in tunnel
    with echo_face(ssl_context=server_context) as face:
        assert face.server.bound is not None
        with anyio.fail_after(WAIT):
            stream = await open_tunnel(
                format_endpoint(face.server.bound), kind(tunnel), ssl_context=client_context
            )
            async with stream:
                echoed = await round_trip(stream, payload, block=50_000, half_close=half_close)
    assert echoed == payload


async def test_a_daemon_that_does_not_read_holds_the_tunnel_back_not_the_faces_memory() -> None:
    # The handler keeps its pair ends and never reads them: the face stops reading the
    # tunnel once HIGH_WATER is held, so the sender stalls instead of the face growing.
    kept: list[socket.socket] = []
    loop = SelectorLoop()
    server = TunnelServer(loop, lambda sock, remote: kept.append(sock))
    bound = server.listen(LOOPBACK, 0)
    thread = threading.Thread(target=loop.run, args=(server.next_deadline, server.on_deadline))
    thread.start()
    try:
        face = Face(server, loop)
        with anyio.fail_after(WAIT):
            stream = await open_tunnel(format_endpoint(bound), kind("websocket"))
            block = bytes(65536)
            sent = 0
            with anyio.move_on_after(1.0):
                while sent < 64_000_000:
                    await stream.send(block)
                    sent += len(block)
            assert sent < 64_000_000
            assert face.ask(lambda: server.buffered) <= HIGH_WATER + 4 * 65536
    finally:
        loop.stop()
        thread.join(WAIT)
        server.close()
        loop.close()
        for sock in kept:
            sock.close()
    with anyio.fail_after(WAIT):
        await stream.aclose()  # the face is gone: no linger for the peer's answer


async def test_a_silent_connection_and_a_get_without_its_post_are_closed_in_time() -> None:
    registry = GetPostRegistry(first_post_timeout=0.2)
    with echo_face(handshake_timeout=0.2, registry=registry) as face:
        assert face.server.bound is not None
        get = GETPOST_GET
        with (
            socket.create_connection(face.server.bound, timeout=WAIT) as silent,
            socket.create_connection(face.server.bound, timeout=WAIT) as lonely,
        ):
            lonely.sendall(get)
            assert lonely.recv(65536).startswith(b"HTTP/1.1 200 ")
            assert silent.recv(1024) == b""  # no request within the handshake timeout
            while lonely.recv(65536):  # the GET's answer ends: its tunnel failed
                pass
        assert face.ask(lambda: len(registry)) == 0
        # The id stays retired: a replayed GET cannot reopen it.
        assert raw_answer(face.server.bound, get).startswith(b"HTTP/1.1 409 ")


async def test_a_failed_tls_handshake_closes_the_connection(ca: trustme.CA) -> None:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    with echo_face(ssl_context=server_context) as face:
        assert face.server.bound is not None
        # A plaintext request where a TLS hello belongs: at most an alert, then the close.
        with socket.create_connection(face.server.bound, timeout=WAIT) as sock:
            sock.sendall(BAD_REQUESTS["not ours"])
            with contextlib.suppress(ConnectionResetError):
                while sock.recv(65536):
                    pass
        assert face.server.active == 0  # the connection left the face before it closed
        assert face.server.served == {}


# --- the mediator's HTTP face ----------------------------------------------------------------


@dataclass(frozen=True)
class Mediator:
    address: Endpoint
    http: str
    system_id: uuid.UUID
    key: str
    daemon: MediatorDaemon


@contextmanager
def mediator_daemon(
    ssl_context: ssl.SSLContext | None = None,
    *,
    relay_urls: tuple[str, ...] = (RELAY_URL,),
    system: tuple[uuid.UUID, str] | None = None,
) -> Iterator[Mediator]:
    system_id, key = system or (uuid.uuid4(), secrets.token_urlsafe(32))
    service = MediatorService(
        systems={system_id: key}, relay_urls=relay_urls, nonce_secret=secrets.token_bytes(32)
    )
    daemon = MediatorDaemon(service, http=(LOOPBACK, 0), http_ssl_context=ssl_context)
    with serving(daemon) as address:
        assert daemon.http_bound is not None
        yield Mediator(address, format_endpoint(daemon.http_bound), system_id, key, daemon)


@pytest.fixture(scope="module")
def mediator() -> Iterator[Mediator]:
    with mediator_daemon() as running:
        yield running


async def register_and_get_a_request(
    mediator: Mediator,
    tunnel: TunnelChoice,
    *,
    ssl_context: ssl.SSLContext | None = None,
    proxy: ProxyConfig | None = None,
) -> MediatorListener:
    """A listen session over ``tunnel`` registers; a plain TCP client's connect reaches it."""
    listener = MediatorListener(
        mediator.address,
        system_id=mediator.system_id,
        server_id=uuid.uuid4(),
        system_key=mediator.key,
        tunnel=tunnel,
        http=mediator.http,
        ssl_context=ssl_context,
        proxy=proxy,
    )
    with anyio.fail_after(WAIT):
        async with (
            anyio.create_task_group() as group,
            await anyio.create_udp_socket(local_host=LOOPBACK) as server_udp,
        ):
            local = server_udp.extra(anyio.abc.SocketAttribute.local_address)
            await group.start(listener.run)
            await listener.wait_registered()

            async def server_side() -> None:
                request = await listener.next_request()
                assert isinstance(request, ConnectionRequestReceived)
                await listener.acknowledge(request.connect_session_id, server_udp)

            group.start_soon(server_side)
            answer = await request_connection(mediator.address, server_id=listener.server_id)
            group.cancel_scope.cancel()
    assert answer.response.server_id == listener.server_id
    assert answer.response.udp_endpoints == ((str(local[0]), int(local[1])),)
    return listener


@pytest.mark.parametrize("tunnel", ["upgrade", "websocket", "getpost", "auto"])
async def test_a_listen_session_over_each_tunnel_registers_and_gets_a_tcp_clients_request(
    mediator: Mediator, tunnel: str
) -> None:
    served_before = dict(mediator.daemon.tunnels.served)
    listener = await register_and_get_a_request(
        mediator, AUTO if tunnel == "auto" else kind(tunnel)
    )
    last = listener.dialer.last_kind
    assert last is not None
    if tunnel != "auto":
        assert str(last) == tunnel
    # The session really rode a tunnel of that kind into the blocking face.
    assert mediator.daemon.tunnels.served.get(str(last), 0) > served_before.get(str(last), 0)


@pytest.mark.parametrize("tunnel", ["websocket", "getpost"])
async def test_a_clients_connect_copy_over_a_tunnel_reaches_a_tcp_server(
    mediator: Mediator, tunnel: str
) -> None:
    listener = MediatorListener(
        mediator.address,
        system_id=mediator.system_id,
        server_id=uuid.uuid4(),
        system_key=mediator.key,
    )
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind((LOOPBACK, 0))  # UDP nobody answers: only the tunnelled copy can succeed
        nowhere = (LOOPBACK, int(silent.getsockname()[1]))
        with anyio.fail_after(WAIT):
            async with (
                anyio.create_task_group() as group,
                await anyio.create_udp_socket(local_host=LOOPBACK) as server_udp,
            ):
                await group.start(listener.run)
                await listener.wait_registered()

                async def server_side() -> None:
                    request = await listener.next_request()
                    assert isinstance(request, ConnectionRequestReceived)
                    await listener.acknowledge(request.connect_session_id, server_udp)

                group.start_soon(server_side)
                answer = await request_connection(
                    nowhere,
                    server_id=listener.server_id,
                    tunnel=kind(tunnel),
                    http=f"http://{mediator.http}",
                )
                group.cancel_scope.cancel()
    assert answer.via == "tcp"
    assert answer.response.server_id == listener.server_id


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def tls_mediator(ca: trustme.CA) -> Iterator[Mediator]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    with mediator_daemon(context) as running:
        yield running


@pytest.mark.parametrize("tunnel", ["ssl+upgrade", "ssl+websocket", "ssl+getpost"])
async def test_the_tls_face_serves_each_ssl_kind_and_the_client_verifies_it(
    tls_mediator: Mediator, ca: trustme.CA, tunnel: str
) -> None:
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    listener = await register_and_get_a_request(tls_mediator, kind(tunnel), ssl_context=trusting)
    assert str(listener.dialer.last_kind) == tunnel
    # A client that does not trust the face's certificate gets no tunnel.
    with anyio.fail_after(WAIT), pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
        await open_tunnel(tls_mediator.http, kind(tunnel), ssl_context=ssl.create_default_context())


async def test_a_tunnel_answers_stun_with_the_address_of_the_connection_carrying_it(
    mediator: Mediator,
) -> None:
    with anyio.fail_after(WAIT):
        stream = await open_tunnel(mediator.http, kind("websocket"))
        async with stream:
            await stream.send(binding_request())
            answer = decode_message(await stream.receive())
            leg = stream.extra(anyio.abc.SocketAttribute.local_address)
    assert answer.get(XorMappedAddress) == XorMappedAddress((str(leg[0]), int(leg[1])))


BAD_REQUESTS = {
    "not ours": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "upgrade without Upgrade": b"GET /wavesync/tunnel/v1/upgrade HTTP/1.1\r\nHost: x\r\n\r\n",
    "websocket without its key": (
        b"GET /wavesync/tunnel/v1/websocket HTTP/1.1\r\nHost: x\r\n"
        b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    ),
    "post naming no tunnel": (
        b"POST /wavesync/tunnel/v1/getpost/" + TUNNEL_ID.encode() + b"/0 HTTP/1.1\r\n"
        b"Host: x\r\nContent-Length: 5\r\n\r\n"
    ),
    "get with a bad id": b"GET /wavesync/tunnel/v1/getpost/xyz HTTP/1.1\r\nHost: x\r\n\r\n",
    "malformed": b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
    "head too long": b"GET /" + b"x" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
}


def raw_answer(address: Endpoint, request: bytes) -> bytes:
    """Send ``request`` on a fresh connection; read the answer until the face closes."""
    with socket.create_connection(address, timeout=WAIT) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
async def test_bad_requests_get_the_answer_anyios_face_gives(mediator: Mediator, name: str) -> None:
    request = BAD_REQUESTS[name]
    host, port = mediator.http.split(":")
    with anyio.fail_after(WAIT):
        async with echo_server() as reference:
            assert reference.bound is not None
            expected = await anyio.to_thread.run_sync(raw_answer, reference.bound, request)
        answer = await anyio.to_thread.run_sync(raw_answer, (host, int(port)), request)
    assert answer == expected
    assert re.match(rb"HTTP/1\.1 [45]\d\d ", answer), answer[:100]


async def test_a_second_get_for_a_live_getpost_id_is_refused_and_the_first_goes_on(
    mediator: Mediator,
) -> None:
    get = GETPOST_GET
    host, port = mediator.http.split(":")
    with socket.create_connection((host, int(port)), timeout=WAIT) as first:
        first.sendall(get)
        assert first.recv(65536).startswith(b"HTTP/1.1 200 ")
        second = await anyio.to_thread.run_sync(raw_answer, (host, int(port)), get)
        assert second.startswith(b"HTTP/1.1 409 ")


async def test_shutdown_ends_the_faces_tunnels_too() -> None:
    with mediator_daemon() as running:
        with anyio.fail_after(WAIT):
            stream = await open_tunnel(running.http, kind("getpost"))
            await stream.send(binding_request())
            assert decode_message(await stream.receive()).get(XorMappedAddress) is not None
            assert running.daemon.tunnels.active == 1
            stopper = threading.Thread(target=running.daemon.shutdown, name="stopper")
            stopper.start()
            stopper.join(WAIT)
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                await stream.receive()
            await stream.aclose()
    # serving() checked that the loop ended and the face holds no tunnel.


# --- the relay's tunnel face -----------------------------------------------------------------


@dataclass(frozen=True)
class Relay:
    address: Endpoint
    system_id: uuid.UUID
    key: str
    daemon: RelayDaemon


@contextmanager
def relay_daemon() -> Iterator[Relay]:
    system_id, key = uuid.uuid4(), secrets.token_urlsafe(32)
    daemon = RelayDaemon(RelayService({system_id: key}))
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
    address: Endpoint,
    relay: Relay,
    tunnel: TunnelChoice | None,
    server_id: uuid.UUID,
    proxy: ProxyConfig | None = None,
) -> AsyncIterator[RelayAgent]:
    agent = RelayAgent(
        address,
        system_id=relay.system_id,
        server_id=server_id,
        key=relay.key,
        tunnel=tunnel,
        proxy=proxy,
    )
    async with anyio.create_task_group() as group:
        await group.start(agent.serve, echo)
        yield agent
        group.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("standby", "client"),
    [
        ("getpost", None),
        (None, "websocket"),
        ("upgrade", "getpost"),
        ("websocket", "upgrade"),
        ("auto", "auto"),
    ],
    ids=[
        "getpost-standby+tcp-client",
        "tcp-standby+websocket-client",
        "upgrade+getpost",
        "websocket+upgrade",
        "auto",
    ],
)
async def test_the_relay_pairs_tunnelled_and_plain_sessions_either_way(
    relay: Relay, standby: str | None, client: str | None
) -> None:
    payload = os.urandom(300_000)
    server_id = uuid.uuid4()
    async with running_agent(relay.address, relay, choice(standby), server_id) as agent:
        with anyio.fail_after(WAIT):
            await agent.wait_for_idle(1)
            echoed = []
            for _ in range(2):
                relayed = await open_relay_stream(
                    relay.address, server_id=server_id, tunnel=choice(client)
                )
                async with relayed.stream:
                    echoed.append(await round_trip(relayed.stream, payload, block=16384))
    assert echoed == [payload, payload]
    if standby is not None:
        assert agent.dialer.last_kind is not None


async def test_ten_megabytes_cross_a_tunnelled_session_byte_exact_both_ways(relay: Relay) -> None:
    to_server, to_client = os.urandom(10_000_000), os.urandom(10_000_000)
    got: dict[str, bytes] = {}
    server_done = anyio.Event()
    server_id = uuid.uuid4()

    async def sender(stream: anyio.abc.ByteStream, info: RelayTunnelInfo) -> None:
        async with stream:
            got["server"] = await exchange(stream, to_client)
        server_done.set()

    agent = RelayAgent(
        relay.address, system_id=relay.system_id, server_id=server_id, key=relay.key,
        tunnel=kind("websocket"),
    )  # fmt: skip
    with anyio.fail_after(60):
        async with anyio.create_task_group() as group:
            await group.start(agent.serve, sender)
            await agent.wait_for_idle(1)
            relayed = await open_relay_stream(
                relay.address, server_id=server_id, tunnel=kind("getpost")
            )
            async with relayed.stream:
                got["client"] = await exchange(relayed.stream, to_server)
            await server_done.wait()  # the agent's handler finishing its half
            group.cancel_scope.cancel()
    assert got["client"] == to_client
    assert got["server"] == to_server


async def exchange(stream: anyio.abc.ByteStream, payload: bytes) -> bytes:
    """Send ``payload`` then our end, while reading the peer's bytes to its end."""
    received = bytearray()

    async def read_all() -> None:
        while True:
            try:
                received.extend(await stream.receive())
            except anyio.EndOfStream:
                return

    async with anyio.create_task_group() as group:
        group.start_soon(read_all)
        view = memoryview(payload)
        for start in range(0, len(payload), 65536):
            await stream.send(bytes(view[start : start + 65536]))
        await stream.send_eof()
    return bytes(received)


async def test_shutdown_ends_a_tunnelled_session_in_flight() -> None:
    with relay_daemon() as relay:
        server_id = uuid.uuid4()
        async with running_agent(relay.address, relay, kind("upgrade"), server_id) as agent:
            with anyio.fail_after(WAIT):
                await agent.wait_for_idle(1)
                relayed = await open_relay_stream(
                    relay.address, server_id=server_id, tunnel=kind("websocket")
                )
                await relayed.stream.send(b"ping")
                assert await relayed.stream.receive() == b"ping"
                stopper = threading.Thread(target=relay.daemon.shutdown, name="stopper")
                stopper.start()
                stopper.join(WAIT)
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                    await relayed.stream.receive()
                await relayed.stream.aclose()


TUNNEL_PATH_REQUESTS = [
    "upgrade without Upgrade",
    "websocket without its key",
    "post naming no tunnel",
    "get with a bad id",
]


@pytest.mark.parametrize("name", TUNNEL_PATH_REQUESTS)
async def test_bad_tunnel_requests_on_the_relays_port_get_anyio_relays_answer(
    relay: Relay, name: str
) -> None:
    request = BAD_REQUESTS[name]
    reference = AnyioRelayDaemon(RelayService({relay.system_id: relay.key}))
    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as group:
            bound = await group.start(reference.serve, LOOPBACK, 0)
            expected = await anyio.to_thread.run_sync(raw_answer, bound, request)
            group.cancel_scope.cancel()
        answer = await anyio.to_thread.run_sync(raw_answer, relay.address, request)
    assert answer == expected
    assert re.match(rb"HTTP/1\.1 4\d\d ", answer), answer[:100]


# --- through a real squid --------------------------------------------------------------------


@needs_squid
async def test_behind_default_squid_a_server_and_client_meet_through_both_faces(
    tmp_path: Path,
) -> None:
    with (
        squid_proxy(tmp_path, DEFAULT) as squid,
        relay_daemon() as relay,
        mediator_daemon(
            relay_urls=(f"http://{format_endpoint(relay.address)}",),
            system=(relay.system_id, relay.key),
        ) as mediator,
    ):
        proxy = ProxyConfig.from_url(squid.url)
        server_id = uuid.uuid4()
        listener = MediatorListener(
            mediator.address, system_id=relay.system_id, server_id=server_id,
            system_key=relay.key, tunnel=AUTO, http=mediator.http, proxy=proxy,
        )  # fmt: skip
        payload = os.urandom(256 * 1024)
        with anyio.fail_after(40):
            async with (
                anyio.create_task_group() as group,
                await anyio.create_udp_socket(local_host=LOOPBACK) as server_udp,
                running_agent(relay.address, relay, AUTO, server_id, proxy) as agent,
            ):
                await group.start(listener.run)
                await listener.wait_registered()
                await agent.wait_for_idle(1)

                async def answer_requests() -> None:
                    while True:
                        request = await listener.next_request()
                        if isinstance(request, ConnectionRequestReceived):
                            await listener.acknowledge(request.connect_session_id, server_udp)

                group.start_soon(answer_requests)
                answer = await request_connection(
                    mediator.address, server_id=server_id, tunnel=AUTO, http=mediator.http,
                    proxy=proxy,
                )  # fmt: skip
                assert answer.response.relay_urls
                relayed = await open_relay_stream(
                    relay.address, server_id=server_id, tunnel=AUTO, proxy=proxy
                )
                async with relayed.stream:
                    echoed = await round_trip(relayed.stream, payload, block=16384)
                group.cancel_scope.cancel()
    assert echoed == payload
    # Behind Debian's default rules only getpost passes: every probe chose it.
    getpost = TunnelKind(method=TunnelMethod.GETPOST)
    assert listener.dialer.last_kind == getpost
    assert agent.dialer.last_kind == getpost


@needs_squid
@pytest.mark.parametrize("tunnel", ["connect", "upgrade", "websocket", "getpost"])
async def test_behind_permissive_squid_each_method_reaches_the_face(
    tmp_path: Path, mediator: Mediator, tunnel: str
) -> None:
    with squid_proxy(tmp_path, PERMISSIVE) as squid:
        listener = await register_and_get_a_request(
            mediator, kind(tunnel), proxy=ProxyConfig.from_url(squid.url)
        )
    assert str(listener.dialer.last_kind) == tunnel


# --- the command line ------------------------------------------------------------------------


def test_wavesync_mediator_on_the_blocking_adapter_says_where_its_http_face_is(
    tmp_path: Path,
) -> None:
    path, _, _ = new_system(tmp_path, "blocking-face")
    with wavesync_daemon(
        "mediator", "--adapter", "blocking", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0",
        "--systems", str(path), ready=MEDIATOR_READY,
    ) as (_, ready):  # fmt: skip
        http = (ready["http_host"], int(ready["http_port"]))
        # The face it names serves tunnels: a websocket upgrade is answered 101.
        answer = b""
        with socket.create_connection(http, timeout=WAIT) as sock:
            sock.sendall(
                b"GET /wavesync/tunnel/v1/websocket HTTP/1.1\r\nHost: x\r\n"
                b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"Sec-WebSocket-Protocol: wavesync-tunnel.v1\r\n\r\n"
            )
            while b"\r\n\r\n" not in answer:
                chunk = sock.recv(4096)
                assert chunk, answer
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 101 "), answer
