"""The asyncio daemons' HTTP tunnel faces, driven by the real anyio tunnel clients.

The asyncio ``TunnelServer``, ``MediatorDaemon(http=...)`` and ``RelayDaemon`` (its
tunnel hand-off) each run on a plain asyncio loop in a thread of this process
(``in_thread`` from test_asyncio_daemons); the other side is the anyio adapter's
``open_tunnel``, ``MediatorListener``, ``request_connection``, ``RelayAgent`` and
``open_relay_stream`` with every tunnel method or ``tunnel=AUTO``, directly and
through a real squid with Debian's default rules. Bad requests are compared with
what the core's ``TunnelRequestReader`` says to answer. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import ssl
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
import trustme

from tests.adapters.test_asyncio_daemons import DaemonThread, asyncio_relay, in_thread
from tests.adapters.tunnels import round_trip
from tests.daemons import new_system, wavesync_daemon
from wavesync_adapters.anyio._dial import AUTO, TunnelChoice
from wavesync_adapters.anyio.connect import request_connection
from wavesync_adapters.anyio.listen import MediatorListener
from wavesync_adapters.anyio.relay_agent import RelayAgent, RelayTunnelInfo
from wavesync_adapters.anyio.relay_client import open_relay_stream
from wavesync_adapters.anyio.tunnel import open_tunnel
from wavesync_adapters.asyncio.mediator import MediatorDaemon
from wavesync_adapters.asyncio.tunnel_server import AcceptedTunnel, TunnelServer, TunnelSocket
from wavesync_proto.addresses import Endpoint, format_endpoint
from wavesync_proto.mediator.listen import ConnectionRequestReceived
from wavesync_proto.mediator.service import MediatorService
from wavesync_proto.tunnel import (
    GetPostClient,
    GetPostRegistry,
    RequestRejected,
    TunnelKind,
    TunnelMethod,
    TunnelRequestReader,
)

pytestmark = pytest.mark.anyio
WAIT = 20.0  # seconds any one step may take before the test fails
RELAY_URL = "https://relay.test.invalid:8443/"
GETPOST = TunnelKind(method=TunnelMethod.GETPOST)
PLAIN = [TunnelKind(method=method) for method in (TunnelMethod.UPGRADE, TunnelMethod.WEBSOCKET)]
PLAIN.append(GETPOST)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    backend: str = request.param
    return backend


def kind(name: str) -> TunnelKind:
    return TunnelKind(method=TunnelMethod(name))


def choice(name: str | None) -> TunnelChoice | None:
    return None if name is None else AUTO if name == "auto" else kind(name)


# --- the tunnel server on its own: a handler gets asyncio streams --------------------------


async def echo_handler(tunnel: AcceptedTunnel) -> None:
    """Send back every byte; end our direction when the peer ends theirs."""
    while data := await tunnel.reader.read(65536):
        tunnel.writer.write(data)
        await tunnel.writer.drain()
    if tunnel.writer.can_write_eof():
        tunnel.writer.write_eof()
        await tunnel.writer.drain()


@dataclass(frozen=True)
class EchoServer:
    url: str
    server: TunnelServer
    thread: DaemonThread


@contextlib.contextmanager
def echo_server(ssl_context: ssl.SSLContext | None = None) -> Iterator[EchoServer]:
    server = TunnelServer(echo_handler, ssl_context=ssl_context)
    with in_thread(server.serve) as thread:
        assert server.bound is not None
        scheme = "https" if ssl_context is not None else "http"
        yield EchoServer(f"{scheme}://127.0.0.1:{server.bound[1]}", server, thread)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.mark.parametrize("tunnel", PLAIN, ids=str)
async def test_each_method_reaches_an_asyncio_handler_byte_exact_with_half_closes(
    tunnel: TunnelKind,
) -> None:
    payload = os.urandom(2_000_000 + 17)
    with echo_server() as echo:
        with anyio.fail_after(WAIT):
            stream = await open_tunnel(echo.url, tunnel)
            async with stream:
                assert await round_trip(stream, payload, block=50_000) == payload
        served = echo.thread.call(lambda: dict(echo.server.served))
    assert served == {str(tunnel): 1}


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize(
    "method", [TunnelMethod.WEBSOCKET, TunnelMethod.GETPOST, TunnelMethod.UPGRADE]
)
async def test_ssl_kinds_are_served_over_tls(ca: trustme.CA, method: TunnelMethod) -> None:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    tunnel = TunnelKind(method=method, tls=True)
    payload = os.urandom(300_000)
    with echo_server(server_context) as echo:
        with anyio.fail_after(WAIT):
            stream = await open_tunnel(echo.url, tunnel, ssl_context=client_context)
            async with stream:
                # A raw method over TLS has no half-close: read back what was sent.
                half_close = method is not TunnelMethod.UPGRADE
                echoed = await round_trip(stream, payload, half_close=half_close)
        served = echo.thread.call(lambda: dict(echo.server.served))
    assert echoed == payload
    assert served == {str(tunnel): 1}


def face_answer(address: Endpoint, request: bytes) -> bytes:
    """Send a raw request to an HTTP face and read its whole answer (it closes after it)."""
    with socket.create_connection(address, timeout=WAIT) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def core_answer(request: bytes) -> bytes:
    """What the core says to answer ``request`` with."""
    reader = TunnelRequestReader()
    reader.receive_data(request)
    event = reader.next_event()
    assert isinstance(event, RequestRejected), event
    return reader.data_to_send()


BAD_REQUESTS = [
    b"GET / HTTP/1.1\r\nHost: face\r\n\r\n",
    b"GET /wavesync/tunnel/v1/upgrade HTTP/1.1\r\nHost: face\r\n\r\n",
    b"PUT /wavesync/tunnel/v1/getpost/0011 HTTP/1.1\r\nHost: face\r\n\r\n",
    b"GET /wavesync/tunnel/v1/" + b"x" * 70_000 + b" HTTP/1.1\r\n\r\n",
]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_bad_requests_are_answered_as_the_core_says_and_closed() -> None:
    with echo_server() as echo:
        address = echo.server.bound
        assert address is not None
        for request in BAD_REQUESTS:
            expected = core_answer(request)
            assert expected.startswith(b"HTTP/1.1 4")
            assert await anyio.to_thread.run_sync(face_answer, address, request) == expected
        # A POST to a getpost tunnel nobody opened: the registry's 404.
        post = (
            b"POST /wavesync/tunnel/v1/getpost/" + b"ab" * 16 + b"/0 HTTP/1.1\r\n"
            b"Host: face\r\nContent-Length: 5\r\n\r\n"
        )
        answer = await anyio.to_thread.run_sync(face_answer, address, post)
        served = echo.thread.call(lambda: dict(echo.server.served))
    assert answer.startswith(b"HTTP/1.1 404"), answer[:100]
    assert served == {}


# --- the mediator's HTTP face ---------------------------------------------------------------


@dataclass(frozen=True)
class Mediator:
    address: Endpoint
    http: str
    system_id: uuid.UUID
    key: str
    daemon: MediatorDaemon


@contextlib.contextmanager
def faced_mediator(relay_url: str = RELAY_URL) -> Iterator[Mediator]:
    system_id, key = uuid.uuid4(), os.urandom(16).hex()
    service = MediatorService(
        systems={system_id: key}, relay_urls=(relay_url,), nonce_secret=os.urandom(32)
    )
    daemon = MediatorDaemon(service, http=("127.0.0.1", 0))
    with in_thread(daemon.serve):
        assert daemon.bound is not None
        assert daemon.http_bound is not None
        yield Mediator(daemon.bound, format_endpoint(daemon.http_bound), system_id, key, daemon)


@pytest.fixture(scope="module")
def mediator() -> Iterator[Mediator]:
    with faced_mediator() as running:
        yield running


def local(udp: anyio.abc.UDPSocket) -> Endpoint:
    address = udp.extra(anyio.abc.SocketAttribute.local_address)
    return (str(address[0]), int(address[1]))


def unused_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize("tunnel", ["upgrade", "websocket", "getpost", "auto"])
async def test_a_listen_session_over_a_tunnel_registers_and_gets_a_tcp_clients_request(
    mediator: Mediator, tunnel: str
) -> None:
    listener = MediatorListener(
        mediator.address,
        system_id=mediator.system_id,
        server_id=uuid.uuid4(),
        system_key=mediator.key,
        tunnel=choice(tunnel),
        http=mediator.http,
    )
    with anyio.fail_after(WAIT):
        async with (
            anyio.create_task_group() as group,
            await anyio.create_udp_socket(local_host="127.0.0.1") as server_udp,
        ):
            local = server_udp.extra(anyio.abc.SocketAttribute.local_address)
            await group.start(listener.run)
            await listener.wait_registered()
            requests: list[ConnectionRequestReceived] = []

            async def server_side() -> None:
                request = await listener.next_request()
                assert isinstance(request, ConnectionRequestReceived)
                requests.append(request)
                await listener.acknowledge(request.connect_session_id, server_udp)

            group.start_soon(server_side)
            answer = await request_connection(mediator.address, server_id=listener.server_id)
            group.cancel_scope.cancel()
    assert listener.dialer.last_kind is not None  # the session really rode a tunnel
    if tunnel != "auto":
        assert str(listener.dialer.last_kind) == tunnel
    assert len(requests) == 1
    assert answer.response.server_id == listener.server_id
    assert answer.response.udp_endpoints == ((str(local[0]), int(local[1])),)


@pytest.mark.parametrize("tunnel", ["websocket", "getpost", "upgrade"])
async def test_a_clients_connect_over_a_tunnel_reaches_a_tcp_server(
    mediator: Mediator, tunnel: str
) -> None:
    listener = MediatorListener(
        mediator.address,
        system_id=mediator.system_id,
        server_id=uuid.uuid4(),
        system_key=mediator.key,
    )
    with anyio.fail_after(WAIT):
        async with (
            anyio.create_task_group() as group,
            await anyio.create_udp_socket(local_host="127.0.0.1") as server_udp,
        ):
            await group.start(listener.run)
            await listener.wait_registered()

            async def server_side() -> None:
                request = await listener.next_request()
                assert isinstance(request, ConnectionRequestReceived)
                await listener.acknowledge(request.connect_session_id, server_udp)

            group.start_soon(server_side)
            # UDP goes to a port nobody answers on: only the tunnelled copy can succeed.
            answer = await request_connection(
                ("127.0.0.1", unused_udp_port()),
                server_id=listener.server_id,
                tunnel=kind(tunnel),
                http=f"http://{mediator.http}",
            )
            group.cancel_scope.cancel()
    assert answer.via == "tcp"
    assert answer.response.server_id == listener.server_id
    assert answer.response.relay_urls == (RELAY_URL,)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_mediators_face_answers_bad_requests_as_the_core_says(
    mediator: Mediator,
) -> None:
    host, port = mediator.http.rsplit(":", 1)
    for request in BAD_REQUESTS[:2]:
        answer = await anyio.to_thread.run_sync(face_answer, (host, int(port)), request)
        assert answer == core_answer(request)


def test_the_asyncio_mediator_program_prints_its_http_address(tmp_path: Path) -> None:
    systems, _, _ = new_system(tmp_path, "faces-program")
    ready = (
        r"mediator listening on udp\+tcp (?P<host>[\d.]+):(?P<port>\d+),"
        r" http (?P<http_host>[\d.]+):(?P<http_port>\d+)"
    )
    with wavesync_daemon(
        "mediator", "--adapter", "asyncio", "--listen", "127.0.0.1:0",
        "--http", "127.0.0.1:0", "--systems", str(systems), ready=ready,
    ) as (_, match):  # fmt: skip
        http = ("127.0.0.1", int(match["http_port"]))
        assert http[1] != int(match["port"])
        # The printed port is the face: a bad request there gets the core's answer.
        request = BAD_REQUESTS[0]
        assert face_answer(http, request) == core_answer(request)


# --- the relay's tunnel face ------------------------------------------------------------------


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
    system_id: uuid.UUID,
    key: str,
    tunnel: TunnelChoice | None,
    server_id: uuid.UUID,
) -> AsyncIterator[RelayAgent]:
    agent = RelayAgent(address, system_id=system_id, server_id=server_id, key=key, tunnel=tunnel)
    async with anyio.create_task_group() as group:
        await group.start(agent.serve, echo)
        yield agent
        group.cancel_scope.cancel()


async def relayed_digest(
    address: Endpoint, server_id: uuid.UUID, tunnel: TunnelChoice | None, payload: bytes
) -> bytes:
    relayed = await open_relay_stream(address, server_id=server_id, tunnel=tunnel)
    assert relayed.server_id == server_id
    async with relayed.stream:
        return await round_trip(relayed.stream, payload, block=16384)


@pytest.mark.parametrize(
    ("standby", "client"),
    [
        ("getpost", None),
        (None, "websocket"),
        ("upgrade", "getpost"),
        ("websocket", "upgrade"),
        ("auto", "auto"),
    ],
    ids=["getpost+tcp", "tcp+websocket", "upgrade+getpost", "websocket+upgrade", "auto"],
)
async def test_the_relay_pairs_tunnelled_and_plain_sessions_either_way(
    standby: str | None, client: str | None
) -> None:
    payload = os.urandom(300_000)
    server_id = uuid.uuid4()
    with asyncio_relay() as relay:
        async with running_agent(
            relay.address, relay.system_id, relay.key, choice(standby), server_id
        ) as agent:
            with anyio.fail_after(WAIT):
                await agent.wait_for_idle(2)
                echoed = [
                    await relayed_digest(relay.address, server_id, choice(client), payload)
                    for _ in range(2)
                ]
        served = relay.thread.call(lambda: sum(relay.daemon.tunnels.served.values()))
    assert echoed == [payload, payload]
    if standby is not None:
        assert agent.dialer.last_kind is not None
    # Each tunnelled standby used (or idle) and each tunnelled client came through the face.
    assert served >= (2 if standby else 0) + (2 if client else 0)


@pytest.mark.parametrize(("standby", "client"), [("websocket", "getpost"), ("getpost", None)])
async def test_ten_megabytes_each_way_through_the_relays_face_arrive_byte_exact(
    standby: str, client: str | None
) -> None:
    payload = os.urandom(10 * 1024 * 1024)
    server_id = uuid.uuid4()
    with asyncio_relay() as relay:
        async with running_agent(
            relay.address, relay.system_id, relay.key, choice(standby), server_id
        ) as agent:
            with anyio.fail_after(4 * WAIT):
                await agent.wait_for_idle(1)
                echoed = await relayed_digest(relay.address, server_id, choice(client), payload)
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
    assert len(echoed) == len(payload)


# --- timeouts, uvloop, and the relay stopping with tunnels open ------------------------------


def read_until_closed(sock: socket.socket) -> bytes:
    received = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            received += chunk
    return received


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_getpost_get_without_its_post_and_a_silent_connection_are_closed_in_time() -> None:
    registry = GetPostRegistry(first_post_timeout=0.2)
    server = TunnelServer(echo_handler, registry=registry, handshake_timeout=0.2)
    assert server.registry is registry  # an empty registry is falsy: not replaced
    # Well before the defaults (10 s each): a close that waits for them fails the test.
    soon = 5.0
    with in_thread(server.serve) as thread:
        assert server.bound is not None
        machine = GetPostClient(host="127.0.0.1", port=server.bound[1], tunnel_id=os.urandom(16))

        def exchange() -> tuple[bytes, bytes]:
            with socket.create_connection(server.bound, timeout=soon) as get:  # type: ignore[arg-type]
                get.sendall(machine.data_to_send(0))
                answered = read_until_closed(get)  # the 200's head, then the close
            with socket.create_connection(server.bound, timeout=soon) as silent:  # type: ignore[arg-type]
                said = read_until_closed(silent)
            return answered, said

        answered, said = await anyio.to_thread.run_sync(exchange)
        live = thread.call(lambda: len(server.registry))
    assert answered.startswith(b"HTTP/1.1 200"), answered[:100]
    assert said == b""
    assert live == 0  # released once its GET connection was closed


def uvloop_or_skip() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop  # noqa: PLC0415 - optional
    except ImportError:
        pytest.skip("uvloop is not installed: the faces run on the default loop only")
    new_loop: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return new_loop


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_relays_face_runs_on_uvloop_and_stopping_closes_open_tunnels() -> None:
    payload = os.urandom(1_000_000)
    server_id = uuid.uuid4()
    with asyncio_relay(new_loop=uvloop_or_skip()) as relay:
        async with running_agent(
            relay.address, relay.system_id, relay.key, kind("websocket"), server_id
        ) as agent:
            with anyio.fail_after(WAIT):
                await agent.wait_for_idle(2)
                relayed = await open_relay_stream(
                    relay.address, server_id=server_id, tunnel=kind("getpost")
                )
                async with relayed.stream:
                    echoed = await round_trip(relayed.stream, payload, block=16384)
            open_tunnels = relay.thread.call(lambda: len(relay.daemon.tunnels._tunnels))
            relay.thread.stop()  # with two standby tunnels still open
            left = len(relay.daemon.tunnels._tunnels)
    assert echoed == payload
    assert open_tunnels >= 2
    assert left == 0


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("tunnel", ["websocket", "getpost"])
async def test_a_tunnel_whose_relay_connection_was_closed_ends_though_its_peer_stays(
    tunnel: str,
) -> None:
    with asyncio_relay() as relay:
        ended = threading.Event()
        tunnels = relay.daemon.tunnels
        end = tunnels.tunnel_ended

        def noting(which: Any) -> None:
            end(which)
            ended.set()

        relay.thread.call(lambda: setattr(tunnels, "tunnel_ended", noting))
        with anyio.fail_after(WAIT):
            stream = await open_tunnel(f"http://127.0.0.1:{relay.address[1]}", kind(tunnel))
            async with stream:
                await stream.send(b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n")
                answer = b""
                with contextlib.suppress(anyio.EndOfStream):
                    while True:
                        answer += await stream.receive()
                # The relay answered and closed; we keep our direction open: the tunnel
                # must still end (its legs closed) rather than wait for us forever.
                assert await anyio.to_thread.run_sync(ended.wait, WAIT)
    assert answer.startswith(b"HTTP/1.1 404"), answer[:100]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("tunnel", PLAIN, ids=str)
async def test_on_socket_owns_the_pair_end_and_a_tunnel_ended_both_ways_closes_its_legs(
    tunnel: TunnelKind,
) -> None:
    # The application ends its direction first and keeps its socket: the tunnel must
    # still close its legs once the peer ends too (leg 0 was only half-closed).
    ended = threading.Event()
    read_all = threading.Event()
    held: list[asyncio.StreamWriter] = []
    received: list[bytes] = []
    tasks: set[asyncio.Task[None]] = set()

    async def greet_then_read(given: TunnelSocket) -> None:
        reader, writer = await asyncio.open_connection(sock=given.sock)
        held.append(writer)
        writer.write(b"\x00hello")
        writer.write_eof()
        received.append(await reader.read())
        read_all.set()

    def take(given: TunnelSocket) -> None:
        assert given.kind == tunnel
        assert given.remote[0] == "127.0.0.1"
        tasks.add(asyncio.get_running_loop().create_task(greet_then_read(given)))

    server = TunnelServer(on_socket=take)
    end = server.tunnel_ended

    def noting(which: Any) -> None:
        end(which)
        ended.set()

    setattr(server, "tunnel_ended", noting)  # noqa: B010 - an instance hook, for the test
    payload = os.urandom(500_000)
    with in_thread(server.serve) as thread:
        assert server.bound is not None
        with anyio.fail_after(WAIT):
            stream = await open_tunnel(f"http://127.0.0.1:{server.bound[1]}", tunnel)
            async with stream:
                greeting = b""
                with contextlib.suppress(anyio.EndOfStream):
                    while True:
                        greeting += await stream.receive()
                for start in range(0, len(payload), 32768):
                    await stream.send(payload[start : start + 32768])
                await stream.send_eof()
                assert await anyio.to_thread.run_sync(ended.wait, WAIT)
                # The owner reads to its EOF in its own task: closing its socket before
                # that task is done would cut what it has not read yet (a loaded CI
                # machine did, twice, and the test saw a payload with its tail missing).
                assert await anyio.to_thread.run_sync(read_all.wait, WAIT)

        def close_held() -> None:
            for writer in held:
                writer.close()

        thread.call(close_held)
    assert greeting == b"\x00hello"
    assert received == [payload]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("method", [TunnelMethod.WEBSOCKET, TunnelMethod.GETPOST])
async def test_the_mediators_tls_face_registers_an_ssl_listen_session(
    ca: trustme.CA, method: TunnelMethod
) -> None:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    system_id, key = uuid.uuid4(), os.urandom(16).hex()
    service = MediatorService(systems={system_id: key}, nonce_secret=os.urandom(32))
    daemon = MediatorDaemon(service, http=("127.0.0.1", 0), http_ssl_context=server_context)
    with in_thread(daemon.serve):
        assert daemon.bound is not None
        assert daemon.http_bound is not None
        listener = MediatorListener(
            daemon.bound,
            system_id=system_id,
            server_id=uuid.uuid4(),
            system_key=key,
            tunnel=TunnelKind(method=method, tls=True),
            http=f"https://{format_endpoint(daemon.http_bound)}",
            ssl_context=client_context,
        )
        with anyio.fail_after(WAIT):
            async with (
                anyio.create_task_group() as group,
                await anyio.create_udp_socket(local_host="127.0.0.1") as server_udp,
            ):
                udp_endpoint = local(server_udp)
                await group.start(listener.run)
                await listener.wait_registered()

                async def server_side() -> None:
                    request = await listener.next_request()
                    assert isinstance(request, ConnectionRequestReceived)
                    await listener.acknowledge(request.connect_session_id, server_udp)

                group.start_soon(server_side)
                answer = await request_connection(daemon.bound, server_id=listener.server_id)
                group.cancel_scope.cancel()
    assert str(listener.dialer.last_kind) == f"ssl+{method.value}"
    assert answer.response.udp_endpoints == (udp_endpoint,)
    assert answer.response.server_id == listener.server_id
