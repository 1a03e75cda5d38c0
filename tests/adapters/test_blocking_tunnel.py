"""The blocking adapter's HTTP tunnels (client side) against the anyio tunnel server.

Each method is opened with ``wavesync_adapters.blocking.tunnel.open_tunnel`` (and
probed) against the anyio ``TunnelServer`` echoing every tunnel (tests/adapters/
tunnels.py), run by ``anyio.run`` in a background thread; through a real squid
(tests/squid.py) as anyio's test_tunnel_squid.py does. The tunnel is a real
socket: ``sendall``/``recv``/``shutdown``, ``makefile`` and ``http.client`` work.
"""

from __future__ import annotations

import errno
import os
import socket
import ssl
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.client import HTTPConnection
from pathlib import Path

import anyio
import pytest
import trustme

from tests.adapters.tunnels import echo_server
from tests.daemons import RELAY_READY, new_system, wavesync_daemon
from tests.squid import DEFAULT, PERMISSIVE, Squid, squid_binary, squid_proxy
from wavesync_adapters._common import AUTO
from wavesync_adapters.blocking.agent import AcceptedStream, ServerAgent
from wavesync_adapters.blocking.connector import Connector
from wavesync_adapters.blocking.tunnel import (
    ALL_KINDS,
    TunnelError,
    environment_proxy,
    open_tunnel,
    probe_tunnel,
)
from wavesync_proto.race import PathKind
from wavesync_proto.tunnel import ProxyConfig, TunnelKind, TunnelLocation, TunnelMemory

WAIT = 30.0
TLS_HOST = "127.0.0.2"
PLAIN_KINDS = [kind for kind in ALL_KINDS if not kind.tls]
CONNECT, UPGRADE, WEBSOCKET, GETPOST = PLAIN_KINDS
NO_PROXY = [kind for kind in PLAIN_KINDS if kind is not CONNECT]

needs_squid = pytest.mark.skipif(squid_binary() is None, reason="squid is not installed")

#: What Debian's default rules refuse, and how (everything else passes both configs).
REFUSED_BY_DEFAULT = {
    CONNECT: (403, "CONNECT refused: 403 Forbidden"),
    UPGRADE: (426, "upgrade refused: 426 Upgrade Required"),
    WEBSOCKET: (426, "websocket refused: 426"),
}


@contextmanager
def in_anyio_thread(
    serve: Callable[[Callable[[object], None], anyio.Event], object],
) -> Iterator[object]:
    """Run ``serve(started, stop)`` (an async function) by ``anyio.run`` in a thread; yield
    what it passed to ``started``; set ``stop`` (from its own loop) when the block ends."""
    ready = threading.Event()
    box: dict[str, object] = {}

    async def main() -> None:
        stop = anyio.Event()
        box["stop"] = stop
        box["token"] = anyio.lowlevel.current_token()

        def started(value: object) -> None:
            box["value"] = value
            ready.set()

        try:
            await serve(started, stop)  # type: ignore[misc]
        except BaseException as exc:
            box["error"] = exc
            ready.set()
            raise

    thread = threading.Thread(target=anyio.run, args=(main,), name="anyio-side")
    thread.start()
    try:
        assert ready.wait(WAIT), "the anyio side did not start"
        if "error" in box:
            raise AssertionError(f"the anyio side failed: {box['error']!r}")
        yield box["value"]
    finally:
        stop = box.get("stop")
        if isinstance(stop, anyio.Event):
            anyio.from_thread.run_sync(stop.set, token=box["token"])  # type: ignore[arg-type]
        thread.join(WAIT)
        assert not thread.is_alive()


@contextmanager
def anyio_echo(
    host: str = "127.0.0.1", port: int = 0, ssl_context: ssl.SSLContext | None = None
) -> Iterator[tuple[str, int]]:
    """The anyio echo ``TunnelServer`` on ``host:port``; yields its bound address."""

    async def serve(started: Callable[[object], None], stop: anyio.Event) -> None:
        async with echo_server(host=host, port=port, ssl_context=ssl_context) as server:
            started(server.bound)
            await stop.wait()

    with in_anyio_thread(serve) as bound:
        assert isinstance(bound, tuple)
        yield bound


def round_trip(sock: socket.socket, payload: bytes, *, half_close: bool = True) -> bytes:
    """Send ``payload`` from a thread, then our end (``half_close``), and read to the
    peer's end (or exactly ``len(payload)`` bytes)."""
    sock.settimeout(WAIT)

    def write() -> None:
        view = memoryview(payload)
        for start in range(0, len(payload), 65536):
            sock.sendall(view[start : start + 65536])
        if half_close:
            sock.shutdown(socket.SHUT_WR)

    writer = threading.Thread(target=write, name="round-trip-writer")
    writer.start()
    received = bytearray()
    while half_close or len(received) < len(payload):
        data = sock.recv(1 << 20)
        if not data:
            break
        received += data
    writer.join(WAIT)
    return bytes(received)


@pytest.mark.parametrize("kind", NO_PROXY, ids=str)
def test_each_method_carries_a_stream_both_ways_byte_exact(kind: TunnelKind) -> None:
    payload = os.urandom(2_000_000 + 17)
    with anyio_echo() as (host, port):
        sock = open_tunnel(f"http://{host}:{port}", kind, timeout=WAIT)
        with sock:
            assert isinstance(sock, socket.socket)
            assert round_trip(sock, payload) == payload


@pytest.fixture(scope="module")
def tls_contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(TLS_HOST, "127.0.0.1").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


@pytest.mark.parametrize("kind", NO_PROXY, ids=str)
def test_ssl_kinds_verify_the_certificate(
    kind: TunnelKind, tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    server_context, client_context = tls_contexts
    kind = TunnelKind(method=kind.method, tls=True)
    with anyio_echo(ssl_context=server_context) as (host, port):
        target = f"{host}:{port}"
        with open_tunnel(target, kind, ssl_context=client_context, timeout=WAIT) as sock:
            # TLS has no half-close: upgrade's end is read by length.
            half_close = kind.method is not UPGRADE.method
            assert round_trip(sock, b"x" * 300_000, half_close=half_close) == b"x" * 300_000
        with pytest.raises(TunnelError, match="CERTIFICATE_VERIFY_FAILED") as caught:
            open_tunnel(target, kind, timeout=WAIT)
    assert caught.value.kind == kind


def test_nothing_listening_and_silence_are_clear_errors() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        with pytest.raises(TunnelError, match=r"upgrade tunnel: not established within 0\.3 s"):
            open_tunnel(f"127.0.0.1:{port}", UPGRADE, timeout=0.3)
    with pytest.raises(TunnelError, match=r"upgrade tunnel: .*Error") as caught:
        open_tunnel(f"127.0.0.1:{port}", UPGRADE, timeout=5)
    assert caught.value.status is None


def test_connect_needs_a_proxy() -> None:
    with pytest.raises(TunnelError, match="the connect method needs a proxy"):
        open_tunnel("127.0.0.1:9", CONNECT)


def test_http_client_and_makefile_work_over_a_tunnel() -> None:
    """The tunnel is a socket: ``makefile`` lines go and come back through the echo."""
    with anyio_echo() as (host, port), open_tunnel(f"{host}:{port}", GETPOST) as sock:
        sock.settimeout(WAIT)
        with sock.makefile("rwb") as file:
            file.write(b"\x00first line\n\x00second\n")
            file.flush()
            assert file.readline() == b"\x00first line\n"
            assert file.readline() == b"\x00second\n"


def test_the_probe_picks_and_remembers_without_a_proxy(caplog: pytest.LogCaptureFixture) -> None:
    memory = TunnelMemory()
    caplog.set_level("DEBUG", logger="wavesync.tunnel")
    with anyio_echo() as (host, port):
        target = f"{host}:{port}"
        sock, kind = probe_tunnel(target, PLAIN_KINDS, proxy=None, memory=memory)
        with sock:
            payload = os.urandom(1 << 20)
            assert round_trip(sock, payload) == payload
        caplog.clear()
        again, second = probe_tunnel(target, PLAIN_KINDS, proxy=None, memory=memory)
        with again:
            assert round_trip(again, b"\x00again") == b"\x00again"
    assert kind in NO_PROXY
    assert second == kind
    tried = [r.getMessage() for r in caplog.records if "trying" in r.getMessage()]
    assert tried == [f"probe: trying {kind}"]
    assert memory.winner(TunnelLocation(proxy=None, target=target)) == kind


# --- through a real squid --------------------------------------------------------------------


@pytest.fixture(scope="module")
def squids(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Squid]]:
    if squid_binary() is None:
        pytest.skip("squid is not installed")
    with (
        squid_proxy(tmp_path_factory.mktemp("squid-default"), DEFAULT) as default,
        squid_proxy(tmp_path_factory.mktemp("squid-permissive"), PERMISSIVE) as permissive,
    ):
        yield {"default": default, "permissive": permissive}


def proxy_of(squid: Squid) -> ProxyConfig:
    return ProxyConfig(host=squid.host, port=squid.port)


@contextmanager
def echo_for(kind: TunnelKind, server_context: ssl.SSLContext) -> Iterator[tuple[str, int]]:
    if not kind.tls:
        with anyio_echo() as bound:
            yield bound
        return
    try:
        with anyio_echo(TLS_HOST, 443, server_context) as bound:
            yield bound
    except AssertionError as exc:
        cause = str(exc)
        if not any(name in cause for name in ("EACCES", "Errno 13", "Errno 98", "Errno 99")):
            raise
        pytest.skip(f"ssl kinds need {TLS_HOST}:443, CONNECT's one port: {cause}")
    _ = errno


@needs_squid
@pytest.mark.parametrize("config", ["default", "permissive"])
@pytest.mark.parametrize("kind", ALL_KINDS, ids=str)
def test_each_method_through_each_squid_config(
    squids: dict[str, Squid],
    tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext],
    config: str,
    kind: TunnelKind,
) -> None:
    server_context, client_context = tls_contexts
    refused = REFUSED_BY_DEFAULT.get(kind) if config == "default" else None
    proxy = proxy_of(squids[config])
    with echo_for(kind, server_context) as (host, port):
        target = f"{host}:{port}"
        if refused is not None:
            with pytest.raises(TunnelError) as caught:
                open_tunnel(target, kind, proxy=proxy, ssl_context=client_context, timeout=WAIT)
            assert (caught.value.status, caught.value.kind) == (refused[0], kind)
            assert caught.value.reason.startswith(refused[1])
            return
        with open_tunnel(target, kind, proxy=proxy, ssl_context=client_context) as sock:
            payload = b"\x00" + os.urandom(300_000)
            # Squid's CONNECT does not pass a half-close: read back by length.
            assert round_trip(sock, payload, half_close=False) == payload


@needs_squid
@pytest.mark.parametrize("config", ["default", "permissive"])
def test_the_probe_chooses_per_config_carries_megabytes_and_remembers(
    squids: dict[str, Squid], config: str, caplog: pytest.LogCaptureFixture
) -> None:
    memory = TunnelMemory()
    proxy = proxy_of(squids[config])
    caplog.set_level("DEBUG", logger="wavesync.tunnel")
    with anyio_echo() as (host, port):
        target = f"{host}:{port}"
        sock, kind = probe_tunnel(target, PLAIN_KINDS, proxy=proxy, memory=memory)
        with sock:
            payload = os.urandom(4 << 20)
            assert round_trip(sock, payload, half_close=False) == payload
        first_round = [r.getMessage() for r in caplog.records if "trying" in r.getMessage()]
        caplog.clear()
        again, second = probe_tunnel(target, PLAIN_KINDS, proxy=proxy, memory=memory)
        with again:
            assert round_trip(again, b"\x00second", half_close=False) == b"\x00second"
    second_round = [r.getMessage() for r in caplog.records if "trying" in r.getMessage()]
    location = TunnelLocation(proxy=f"{proxy.host}:{proxy.port}", target=target)
    assert first_round == [f"probe: trying {k}" for k in PLAIN_KINDS]
    assert second == kind
    assert memory.winner(location) == kind
    assert second_round == [f"probe: trying {kind}"]
    if config == "default":
        assert kind == GETPOST
    else:
        assert kind is not GETPOST


@needs_squid
def test_getpost_through_default_squid_ends_cleanly_both_ways(squids: dict[str, Squid]) -> None:
    with anyio_echo() as (host, port):
        proxy = proxy_of(squids["default"])
        with open_tunnel(f"{host}:{port}", GETPOST, proxy=proxy) as sock:
            payload = os.urandom(3 << 20)
            assert round_trip(sock, payload) == payload


# --- a whole blocking server agent and client behind Debian-default squid ----------------------

MEDIATOR_READY = (
    r"mediator listening on udp\+tcp (?P<host>[\d.]+):(?P<port>\d+),"
    r" http (?P<http_host>[\d.]+):(?P<http_port>\d+)"
)
PAGE = b"<h1>through squid, a tunnel and the relay</h1>\n" * 1000


def serve_echo_or_page(accepted: AcceptedStream) -> None:
    """A GET gets ``PAGE`` (http.client's test); anything else is echoed to its end."""
    sock = accepted.sock
    sock.settimeout(WAIT)
    first = sock.recv(4, socket.MSG_PEEK)
    if first == b"GET ":
        with sock.makefile("rb") as request:
            while request.readline() not in (b"\r\n", b""):
                pass
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(PAGE)}\r\n\r\n".encode()
        sock.sendall(head + PAGE)
        return
    while data := sock.recv(1 << 16):
        sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


@needs_squid
def test_blocking_agent_and_connector_behind_default_squid_meet_through_the_relay(
    tmp_path: Path,
) -> None:
    """Told only ``tunnel="auto"`` and the proxy, the blocking agent's listen session and
    standby pool and the blocking client's connect request and relay session each find
    the one method Debian's default squid passes (getpost) and reach the REAL mediator's
    HTTP face and relay (anyio daemons); the relayed socket carries bytes exactly and
    serves ``http.client``."""
    path, system_id, key = new_system(tmp_path, "behind-squid")
    with (
        squid_proxy(tmp_path, DEFAULT) as squid,
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
            mediator_endpoint = ("127.0.0.1", int(mediator["port"]))
            http_face = f"127.0.0.1:{mediator['http_port']}"
            proxy = ProxyConfig.from_url(squid.url)
            server_id = uuid.uuid4()
            agent = ServerAgent(
                system_id=system_id, server_id=server_id, key=key, mediator=mediator_endpoint,
                relays=(relay_url,), tcp_listen=("127.0.0.1", 0), udp_host="127.0.0.1",
                lan=False, standby_count=2, tunnel=AUTO, mediator_http=http_face, proxy=proxy,
            )  # fmt: skip
            payload = b"\x00" + os.urandom(512 * 1024)
            with agent.running(serve_echo_or_page):
                agent.wait_ready(WAIT)
                with Connector(
                    server_id=server_id, mediator=mediator_endpoint,
                    paths=frozenset({PathKind.RELAY}), lan=False, tunnel=AUTO,
                    mediator_http=http_face, proxy=proxy,
                ) as client:  # fmt: skip
                    connection = client.connect()
                    with connection.sock:
                        echoed = round_trip(connection.sock, payload)
                    page = client.connect()
                    with page.sock:
                        http = HTTPConnection("wavesync.invalid", timeout=WAIT)
                        http.sock = page.sock
                        http.request("GET", "/")
                        answer = http.getresponse()
                        body = answer.read()
                    assert agent.listener is not None
                    listen_kind = agent.listener.dialer.last_kind
                    standby_kind = agent.relay_agents[0].dialer.last_kind
                    pumps = pump_threads()
            # The daemons still run: every tunnel's socket was closed with the agent and
            # the connector, each pump saw the hang-up and ends (getpost waits at most
            # CLOSE_LINGER for the answer to its last POST).
            for pump in pumps:
                pump.join(WAIT)
                assert not pump.is_alive(), pump.name
    assert len(pumps) >= 3  # the listen session's and two standbys' at least
    assert connection.path is PathKind.RELAY
    assert connection.target == f"relay {relay_url}"  # learned from the mediator
    assert echoed == payload
    assert (answer.status, body) == (200, PAGE)
    # Behind Debian's default rules only getpost passes: every probe chose it.
    assert listen_kind == GETPOST
    assert standby_kind == GETPOST


def pump_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("wavesync-tunnel-")]


@pytest.mark.parametrize("kind", NO_PROXY, ids=str)
def test_closing_the_socket_ends_the_pump_and_the_server_sees_the_end(kind: TunnelKind) -> None:
    """The application's ``close()`` (no half-close first) is the tunnel's end: the
    pump thread finishes and the anyio server's echo handler returns."""
    with anyio_echo() as (host, port):
        sock = open_tunnel(f"{host}:{port}", kind)
        [pump] = pump_threads()
        sock.sendall(b"\x00ping")
        sock.settimeout(WAIT)
        assert sock.recv(16) == b"\x00ping"
        sock.close()
        pump.join(WAIT)
        assert not pump.is_alive()


def test_a_probe_where_nothing_works_names_every_kind() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    with pytest.raises(TunnelError, match="no method works") as caught:
        probe_tunnel(f"127.0.0.1:{port}", NO_PROXY, proxy=None, memory=TunnelMemory())
    assert caught.value.kind is None
    assert not pump_threads()


def test_environment_proxy_reads_the_usual_variables() -> None:
    environ = {"http_proxy": "http://proxy.example:3128", "no_proxy": "localhost"}
    assert environment_proxy("example.com:80", tls=False, environ=environ) == ProxyConfig(
        host="proxy.example", port=3128
    )
    assert environment_proxy("localhost:80", tls=False, environ=environ) is None


@pytest.mark.parametrize("kind", [UPGRADE, GETPOST], ids=str)
def test_a_writer_whose_echo_nobody_reads_is_held_back(kind: TunnelKind) -> None:
    """Back-pressure end to end: the application writes and never reads, so the echo
    fills the pump's 1 MiB for the application, the legs, the server, and then the
    pump stops reading the application: ``send`` blocks (here: times out) after a
    bounded number of bytes instead of the pump buffering without end."""
    block = b"\x00" * 65536
    sent = 0
    held = False
    with anyio_echo() as (host, port), open_tunnel(f"{host}:{port}", kind) as sock:
        sock.settimeout(1.0)
        while sent < 512 << 20 and not held:
            try:
                sent += sock.send(block)
            except TimeoutError:
                held = True
    assert held
    assert 0 < sent < 64 << 20
