"""HTTP tunnels on the asyncio adapter's client side, against the anyio other side.

``open_tunnel`` and ``probe_tunnel`` (wavesync_adapters.asyncio.tunnel) reach the anyio
``TunnelServer`` echoing each tunnel (tests/adapters/tunnels.py), straight and through
a real squid (tests/squid.py) with Debian's default rules and with permissive ones, as
tests/adapters/test_tunnel_squid.py does for the anyio client. Then the whole product:
the asyncio ``ServerAgent`` and ``Connector`` behind Debian-default squid, told only
``tunnel="auto"`` and the proxy, reach the real ``wavesync mediator --http`` and
``wavesync relay`` (anyio daemons) and meet through the relay, byte-exact. Every wait is
bounded by ``asyncio.timeout``; nothing sleeps to wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import importlib.util
import os
import socket
import ssl
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import pytest
import trustme

from tests.adapters.tunnels import echo_server
from tests.daemons import RELAY_READY, new_system, wavesync_daemon
from tests.squid import DEFAULT, PERMISSIVE, Squid, squid_binary, squid_proxy
from wavesync_adapters.anyio.tunnel_server import TunnelServer
from wavesync_adapters.anyio.tunnel_stream import TunnelStream
from wavesync_adapters.asyncio._dial import AUTO, dialer_for
from wavesync_adapters.asyncio.agent import AcceptedStream, ServerAgent
from wavesync_adapters.asyncio.connector import Connector
from wavesync_adapters.asyncio.tunnel import (
    ALL_KINDS,
    TunnelError,
    environment_proxy,
    open_tunnel,
    probe_tunnel,
)
from wavesync_proto.addresses import Endpoint
from wavesync_proto.race import PathKind
from wavesync_proto.tunnel import ProxyConfig, TunnelKind, TunnelLocation, TunnelMemory

pytestmark = pytest.mark.anyio

#: The asyncio loops the tests run on: uvloop only where it is installed (it is optional).
ASYNCIO_LOOPS = ["asyncio"] + (["uvloop"] if importlib.util.find_spec("uvloop") else [])
WAIT = 30.0
TLS_HOST = "127.0.0.2"
PLAIN_KINDS = [kind for kind in ALL_KINDS if not kind.tls]
CONNECT, UPGRADE, WEBSOCKET, GETPOST = PLAIN_KINDS
needs_squid = pytest.mark.skipif(squid_binary() is None, reason="squid is not installed")

#: What Debian's default rules refuse, and how (everything else passes both configs).
REFUSED_BY_DEFAULT = {
    CONNECT: (403, "CONNECT refused: 403 Forbidden"),  # CONNECT !SSL_ports
    UPGRADE: (426, "upgrade refused: 426 Upgrade Required"),  # squid strips Upgrade
    WEBSOCKET: (426, "websocket refused: 426"),
}

Pair = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@pytest.fixture(params=ASYNCIO_LOOPS)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, bool]]:
    # The client under test is asyncio's own (the tunnel servers are anyio's, on the
    # same loop); on uvloop as well wherever uvloop is installed.
    return ("asyncio", {"use_uvloop": request.param == "uvloop"})


@pytest.fixture(scope="module")
def squids(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Squid]]:
    if squid_binary() is None:
        pytest.skip("squid is not installed")
    with (
        squid_proxy(tmp_path_factory.mktemp("squid-default"), DEFAULT) as default,
        squid_proxy(tmp_path_factory.mktemp("squid-permissive"), PERMISSIVE) as permissive,
    ):
        yield {"default": default, "permissive": permissive}


@pytest.fixture(scope="module")
def tls_contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(TLS_HOST, "127.0.0.1").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


@asynccontextmanager
async def tls_server_on_443(server_context: ssl.SSLContext) -> AsyncIterator[TunnelServer]:
    """An echoing TLS tunnel server on CONNECT's one port under Debian's rules."""
    try:
        async with echo_server(host=TLS_HOST, port=443, ssl_context=server_context) as server:
            yield server
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EADDRINUSE, errno.EADDRNOTAVAIL):
            raise
        pytest.skip(f"ssl kinds through squid need {TLS_HOST}:443, CONNECT's one port: {exc}")


def proxy_of(squid: Squid) -> ProxyConfig:
    return ProxyConfig(host=squid.host, port=squid.port)


def bound_target(server: TunnelServer) -> str:
    assert server.bound is not None
    return f"{server.bound[0]}:{server.bound[1]}"


async def round_trip(
    pair: Pair, payload: bytes, *, block: int = 65536, half_close: bool = True
) -> bytes:
    """Send ``payload`` in ``block``-byte writes, then our end (``half_close``) and read to
    the peer's; without it, read back exactly ``len(payload)`` bytes (a raw tunnel over TLS
    or through squid's CONNECT cannot pass a half-close)."""
    reader, writer = pair

    async def send() -> None:
        view = memoryview(payload)
        for start in range(0, len(payload), block):
            writer.write(view[start : start + block])
            await writer.drain()
        if half_close:
            writer.write_eof()

    sending = asyncio.create_task(send())
    try:
        received = await (reader.read() if half_close else reader.readexactly(len(payload)))
    finally:
        await sending
    return received


async def close(pair: Pair) -> None:
    pair[1].close()
    await pair[1].wait_closed()


# --- each method, straight to the tunnel server -------------------------------------------


@pytest.mark.parametrize("kind", [k for k in ALL_KINDS if k.method is not CONNECT.method], ids=str)
async def test_each_method_straight_to_the_anyio_tunnel_server(
    tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext], kind: TunnelKind
) -> None:
    server_context, client_context = tls_contexts
    context = server_context if kind.tls else None
    async with echo_server(ssl_context=context) as server, asyncio.timeout(WAIT):
        pair = await open_tunnel(bound_target(server), kind, ssl_context=client_context)
        assert pair[1].get_extra_info("tunnel_kind") == kind
        assert pair[1].get_extra_info("peername") == server.bound
        payload = b"\x00" + os.urandom(1 << 20)
        # Half-closes pass in band (websocket, getpost) or as TCP's (upgrade); over TLS
        # upgrade has none, so that one is read back by length.
        half_close = pair[1].can_write_eof()
        assert half_close == (kind != TunnelKind(method=UPGRADE.method, tls=True))
        assert await round_trip(pair, payload, half_close=half_close) == payload
        await close(pair)
    assert server.served == {str(kind): 1}


async def test_connect_without_a_proxy_and_a_dead_target_are_tunnel_errors() -> None:
    with pytest.raises(TunnelError, match="needs a proxy") as no_proxy:
        await open_tunnel("127.0.0.1:1", CONNECT)
    assert no_proxy.value.kind == CONNECT
    async with asyncio.timeout(WAIT):
        with pytest.raises(TunnelError, match="ConnectionRefusedError") as refused:
            await open_tunnel("127.0.0.1:1", GETPOST)
    assert refused.value.kind == GETPOST


async def test_a_silent_target_is_a_tunnel_error_within_the_timeout() -> None:
    accepted: list[asyncio.StreamWriter] = []
    silent = await asyncio.start_server(lambda r, w: accepted.append(w), "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    try:
        async with asyncio.timeout(WAIT):
            with pytest.raises(TunnelError, match=r"not established within 0\.3 s"):
                await open_tunnel(f"127.0.0.1:{port}", WEBSOCKET, timeout=0.3)
    finally:
        for writer in accepted:
            writer.close()
        silent.close()
        await silent.wait_closed()


async def test_the_dialer_names_the_kind_it_opened_and_reraises_as_connection_error() -> None:
    async with echo_server() as server, asyncio.timeout(WAIT):
        endpoint: Endpoint = ("127.0.0.1", server.bound[1] if server.bound else 0)
        dialer = dialer_for(endpoint, tunnel=AUTO, target=None, proxy=None, ssl_context=None)
        pair = await dialer.open(WAIT)
        assert dialer.last_kind == UPGRADE  # the cheapest kind that works without a proxy
        assert await round_trip(pair, b"\x00dial") == b"\x00dial"
        await close(pair)
        dead = dialer_for(
            ("127.0.0.1", 1), tunnel=GETPOST, target=None, proxy=None, ssl_context=None
        )
        with pytest.raises(ConnectionError, match="getpost"):
            await dead.open(WAIT)


FORBIDDEN = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize("kind", [UPGRADE, WEBSOCKET, GETPOST], ids=str)
async def test_a_refusal_names_the_method_and_the_status(kind: TunnelKind) -> None:
    # An HTTP server that refuses everything, as a proxy's 403 page does.
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.write(FORBIDDEN)
        writer.close()

    refuser = await asyncio.start_server(refuse, "127.0.0.1", 0)
    port = refuser.sockets[0].getsockname()[1]
    try:
        async with asyncio.timeout(WAIT):
            with pytest.raises(TunnelError) as caught:
                await open_tunnel(f"127.0.0.1:{port}", kind)
    finally:
        refuser.close()
        await refuser.wait_closed()
    assert (caught.value.kind, caught.value.status) == (kind, 403)
    assert str(caught.value).startswith(f"{kind} tunnel: ")


async def test_ssl_kinds_verify_the_certificate_by_default(
    tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    kind = TunnelKind(method=GETPOST.method, tls=True)
    async with echo_server(ssl_context=tls_contexts[0]) as server, asyncio.timeout(WAIT):
        # The system's CAs do not know our test CA.
        with pytest.raises(TunnelError, match="CERTIFICATE_VERIFY_FAILED") as caught:
            await open_tunnel(bound_target(server), kind)
    assert caught.value.kind == kind


async def test_the_probe_stream_starts_clean_after_the_echo_and_names_its_kind() -> None:
    async with echo_server() as server, asyncio.timeout(WAIT):
        reader, writer, kind = await probe_tunnel(
            bound_target(server), PLAIN_KINDS, proxy=None, memory=TunnelMemory()
        )
        assert writer.get_extra_info("tunnel_kind") == kind == UPGRADE
        assert await round_trip((reader, writer), b"\x00after the echo") == b"\x00after the echo"
        await close((reader, writer))


@pytest.mark.parametrize("after_yields", range(0, 60, 3))
async def test_a_probe_cancelled_at_any_moment_leaves_no_connection_open(
    after_yields: int,
) -> None:
    # A caller that gives up must not leave the attempts' sockets, not even the chosen
    # one's, to the garbage collector (uvloop fails the test on a transport left open).
    async def probe_then_close(target: str) -> None:
        pair = await probe_tunnel(target, PLAIN_KINDS, proxy=None, memory=TunnelMemory())
        await close((pair[0], pair[1]))  # finished before the cancel: closed as a caller would

    async with echo_server() as server, asyncio.timeout(WAIT):
        probing = asyncio.create_task(probe_then_close(bound_target(server)))
        for _ in range(after_yields):
            await asyncio.sleep(0)
        probing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await probing
    gc.collect()


async def test_a_probe_where_nothing_works_says_why_for_each_method() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    async with asyncio.timeout(WAIT):
        with pytest.raises(TunnelError) as caught:
            await probe_tunnel(f"127.0.0.1:{port}", PLAIN_KINDS, proxy=None, memory=TunnelMemory())
    message = str(caught.value)
    assert message.startswith("tunnel: no method works: upgrade: ")
    assert "websocket: " in message
    assert "getpost: " in message


async def test_a_tunnel_cut_midway_is_a_connection_error_and_still_closes() -> None:
    # A forwarder between the client and the tunnel server drops both connections: the
    # websocket tunnel ends with no close frame, which the machine calls a failure.
    cut = asyncio.Event()
    pumps: set[asyncio.Task[None]] = set()

    async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()

    async with echo_server() as server, asyncio.timeout(WAIT):
        assert server.bound is not None
        upstream_at = server.bound

        async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            up_reader, up_writer = await asyncio.open_connection(*upstream_at)
            pumps.update({asyncio.create_task(pipe(reader, up_writer)),
                          asyncio.create_task(pipe(up_reader, writer))})  # fmt: skip
            await cut.wait()
            writer.transport.abort()
            up_writer.transport.abort()

        forwarder = await asyncio.start_server(forward, "127.0.0.1", 0)
        port = forwarder.sockets[0].getsockname()[1]
        try:
            reader, writer = await open_tunnel(f"127.0.0.1:{port}", WEBSOCKET)
            writer.write(b"\x00ping")
            assert await reader.readexactly(5) == b"\x00ping"
            cut.set()
            with pytest.raises(ConnectionResetError, match="websocket tunnel: "):
                await reader.read()
            writer.close()
            # As over a reset TCP connection: wait_closed() says how the connection ended.
            with pytest.raises(ConnectionResetError):
                await writer.wait_closed()
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            forwarder.close()
            await forwarder.wait_closed()


def test_environment_proxy_follows_the_proxy_variables() -> None:
    environ = {"http_proxy": "http://proxy.example:3128", "no_proxy": "skip.example"}
    assert environment_proxy("target.example:80", tls=False, environ=environ) == ProxyConfig(
        host="proxy.example", port=3128
    )
    assert environment_proxy("skip.example:80", tls=False, environ=environ) is None


# --- through real squid ------------------------------------------------------------------


@needs_squid
@pytest.mark.parametrize("config", ["default", "permissive"])
@pytest.mark.parametrize("kind", ALL_KINDS, ids=str)
async def test_each_method_through_each_squid_config(
    squids: dict[str, Squid],
    tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext],
    config: str,
    kind: TunnelKind,
) -> None:
    server_context, client_context = tls_contexts
    refused = REFUSED_BY_DEFAULT.get(kind) if config == "default" else None
    server_cm = tls_server_on_443(server_context) if kind.tls else echo_server()
    async with server_cm as server, asyncio.timeout(WAIT):
        proxy = proxy_of(squids[config])
        if refused is not None:
            with pytest.raises(TunnelError) as caught:
                await open_tunnel(bound_target(server), kind, proxy=proxy)
            assert (caught.value.status, caught.value.kind) == (refused[0], kind)
            assert caught.value.reason.startswith(refused[1])
            return
        pair = await open_tunnel(
            bound_target(server), kind, proxy=proxy, ssl_context=client_context
        )
        payload = b"\x00" + os.urandom(300_000)
        # Squid's CONNECT does not pass a half-close: read back by length.
        assert await round_trip(pair, payload, half_close=False) == payload
        await close(pair)
    assert server.served == {str(kind): 1}


@needs_squid
@pytest.mark.parametrize("config", ["default", "permissive"])
async def test_the_probe_chooses_per_config_carries_megabytes_and_remembers(
    squids: dict[str, Squid], config: str, caplog: pytest.LogCaptureFixture
) -> None:
    memory = TunnelMemory()
    proxy = proxy_of(squids[config])
    caplog.set_level("DEBUG", logger="wavesync.tunnel")
    async with echo_server() as server:
        target = bound_target(server)
        async with asyncio.timeout(WAIT):
            reader, writer, kind = await probe_tunnel(
                target, PLAIN_KINDS, proxy=proxy, memory=memory
            )
            payload = os.urandom(4 << 20)
            assert await round_trip((reader, writer), payload, half_close=False) == payload
            await close((reader, writer))
        first_round = [r.getMessage() for r in caplog.records if "trying" in r.getMessage()]
        caplog.clear()
        async with asyncio.timeout(WAIT):
            reader, writer, second = await probe_tunnel(
                target, PLAIN_KINDS, proxy=proxy, memory=memory
            )
            assert await round_trip((reader, writer), b"\x00second", half_close=False) == (
                b"\x00second"
            )
            await close((reader, writer))
    second_round = [r.getMessage() for r in caplog.records if "trying" in r.getMessage()]
    location = TunnelLocation(proxy=f"{proxy.host}:{proxy.port}", target=target)
    assert first_round == [f"probe: trying {k}" for k in PLAIN_KINDS]  # all at once
    assert second == kind
    assert memory.winner(location) == kind
    assert second_round == [f"probe: trying {kind}"]  # straight to the remembered one
    if config == "default":
        assert kind == GETPOST
        demoted = memory.demoted(location, asyncio.get_running_loop().time())
        assert {k: reason.split(":")[0] for k, reason in demoted.items()} == {
            CONNECT: "CONNECT refused",
            UPGRADE: "upgrade refused",
            WEBSOCKET: "websocket refused",
        }
    else:
        # The one-connection methods finish a round trip before getpost has its POST leg.
        assert kind != GETPOST


@needs_squid
async def test_getpost_through_default_squid_ends_cleanly_both_ways(
    squids: dict[str, Squid],
) -> None:
    async with echo_server() as server, asyncio.timeout(WAIT):
        pair = await open_tunnel(bound_target(server), GETPOST, proxy=proxy_of(squids["default"]))
        payload = os.urandom(3 << 20)
        # getpost's ends are in band: the half-close survives squid.
        assert await round_trip(pair, payload, block=100_000) == payload
        await close(pair)


@needs_squid
async def test_getpost_upload_to_a_slow_reader_through_squid_is_not_cut(
    squids: dict[str, Squid],
) -> None:
    """As the anyio twin's test: an origin reading slower than we send fills squid's
    request buffer; POSTs of the default ``post_length`` cannot fill it (squid bug 5405).
    Here it also proves the transport's write side waits (drain) instead of buffering."""
    payload = os.urandom(8 << 20)
    received = bytearray()

    async def slow_reader(stream: TunnelStream) -> None:
        while len(received) < len(payload):
            await anyio.sleep(0.01)  # pacing (~6 MB/s), not a wait for an event
            received.extend(await stream.receive(65536))
        await stream.send(b"k")

    server = TunnelServer(slow_reader)
    async with anyio.create_task_group() as group:
        bound = await group.start(server.serve, "127.0.0.1", 0)
        async with asyncio.timeout(WAIT):
            reader, writer = await open_tunnel(
                f"127.0.0.1:{bound[1]}", GETPOST, proxy=proxy_of(squids["default"])
            )
            most_buffered = 0
            for start in range(0, len(payload), 65536):
                writer.write(payload[start : start + 65536])
                most_buffered = max(most_buffered, writer.transport.get_write_buffer_size())
                await writer.drain()
            assert await reader.readexactly(1) == b"k"
            await close((reader, writer))
        group.cancel_scope.cancel()
    assert received == payload
    assert most_buffered <= (1 << 20) + 65536  # the transport's high-water mark and one write


# --- the whole product behind Debian-default squid ---------------------------------------

MEDIATOR_READY = (
    r"mediator listening on udp\+tcp (?P<host>[\d.]+):(?P<port>\d+),"
    r" http (?P<http_host>[\d.]+):(?P<http_port>\d+)"
)


@dataclass(frozen=True)
class Services:
    mediator: Endpoint
    http: str
    relay_url: str
    system_id: uuid.UUID
    key: str
    squid: Squid


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    if squid_binary() is None:
        pytest.skip("squid is not installed")
    folder = tmp_path_factory.mktemp("asyncio-tunnel-faces")
    path, system_id, key = new_system(folder, "asyncio-behind-squid")
    with (
        squid_proxy(folder, DEFAULT) as squid,
        wavesync_daemon(
            "relay", "--listen", "127.0.0.1:0", "--systems", str(path), "--standby-count", "3",
            ready=RELAY_READY,
        ) as (_, relay),
    ):  # fmt: skip
        relay_url = f"http://127.0.0.1:{relay['port']}"
        with wavesync_daemon(
            "mediator", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0",
            "--systems", str(path), "--relay-url", relay_url, ready=MEDIATOR_READY,
        ) as (_, mediator):  # fmt: skip
            yield Services(
                ("127.0.0.1", int(mediator["port"])),
                f"127.0.0.1:{mediator['http_port']}",
                relay_url,
                system_id,
                key,
                squid,
            )


async def echo_accepted(accepted: AcceptedStream) -> None:
    while data := await accepted.reader.read(65536):
        accepted.writer.write(data)
        await accepted.writer.drain()
    with contextlib.suppress(OSError):
        accepted.writer.write_eof()


@needs_squid
async def test_server_agent_and_connector_behind_default_squid_meet_through_the_relay(
    services: Services,
) -> None:
    # Told only "tunnel: auto" and the proxy, the asyncio agent's listen session and
    # standby pool, and the asyncio client's connect request and relay session, each
    # find the method squid passes (getpost) on their own.
    proxy = ProxyConfig.from_url(services.squid.url)
    server_id = uuid.uuid4()
    agent = ServerAgent(
        system_id=services.system_id, server_id=server_id, key=services.key,
        mediator=services.mediator, relays=(services.relay_url,), tcp_listen=("127.0.0.1", 0),
        udp_host="127.0.0.1", lan=False, standby_count=2, tunnel=AUTO, mediator_http=services.http,
        proxy=proxy,
    )  # fmt: skip
    payload = os.urandom(512 * 1024)
    async with asyncio.timeout(WAIT), agent.running(echo_accepted):
        await agent.wait_ready()
        async with Connector(
            server_id=server_id, mediator=services.mediator,
            paths=frozenset({PathKind.RELAY}), lan=False, tunnel=AUTO,
            mediator_http=services.http, proxy=proxy,
        ) as client:  # fmt: skip
            connection = await client.connect()
            echoed = await round_trip((connection.reader, connection.writer), payload, block=16384)
            await close((connection.reader, connection.writer))
    assert connection.path is PathKind.RELAY
    assert connection.target == f"relay {services.relay_url}"  # learned from the mediator
    assert echoed == payload
    assert agent.listener is not None
    assert agent.listener.dialer.last_kind == GETPOST
    assert agent.relay_agents[0].dialer.last_kind == GETPOST
    assert agent.counters.accepted["relay"] == 1


def test_importing_the_asyncio_tunnel_modules_loads_no_anyio_or_trio() -> None:
    code = (
        "import sys, wavesync_adapters.asyncio.tunnel, wavesync_adapters.asyncio._dial\n"
        "import wavesync_adapters.asyncio.connector, wavesync_adapters.asyncio.agent\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('anyio', 'trio', 'sniffio')))"
    )
    result = subprocess.run(  # noqa: S603 - this interpreter, our code
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout == "[]\n"
