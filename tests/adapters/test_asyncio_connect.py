"""The asyncio client's connect request and relay connect against the real daemons.

``request_connection`` and ``open_relay_stream`` (wavesync_adapters.asyncio) talk to the
real ``wavesync mediator`` and ``wavesync relay`` subprocesses; the server is the anyio
adapter's (``ServerAgent``, ``RelayAgent``) in the same asyncio loop, as an application
on another runtime would be. Where the relay's exact bytes matter (what comes with the
101, a redirect, silence), a small scripted relay on loopback plays it. Every wait is
bounded by ``asyncio.timeout``; nothing sleeps to wait.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.abc
import pytest

from tests.daemons import free_udp_port, new_system, relay_and_mediator
from wavesync_adapters.anyio.agent import AcceptedStream, ServerAgent
from wavesync_adapters.anyio.relay_agent import RelayAgent, RelayTunnelInfo
from wavesync_adapters.asyncio._net import open_udp_port
from wavesync_adapters.asyncio.connect import ConnectError, request_connection
from wavesync_adapters.asyncio.relay_client import RelayConnectError, open_relay_stream
from wavesync_proto.addresses import Endpoint
from wavesync_proto.relay.wire import HEADER_SERVER, HEADER_SESSION
from wavesync_proto.tunnel import TunnelKind, TunnelMethod

pytestmark = pytest.mark.anyio

#: The asyncio loops the tests run on: uvloop only where it is installed (it is optional).
ASYNCIO_LOOPS = ["asyncio"] + (["uvloop"] if importlib.util.find_spec("uvloop") else [])
WAIT = 20.0  # seconds any one step may take before the test fails
LOOPBACK = "127.0.0.1"


@pytest.fixture(params=ASYNCIO_LOOPS)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, bool]]:
    # The adapter under test is asyncio's own (the servers are anyio's, on the same
    # loop); on uvloop as well wherever uvloop is installed.
    return ("asyncio", {"use_uvloop": request.param == "uvloop"})


@dataclass
class Services:
    system_id: uuid.UUID
    key: str
    mediator: Endpoint
    relay: Endpoint


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Services]:
    path, system_id, key = new_system(tmp_path, "asyncio-connect")
    with relay_and_mediator(path) as daemons:
        host, port = daemons.relay_url.removeprefix("http://").rsplit(":", 1)
        yield Services(system_id, key, daemons.mediator, (host, int(port)))


async def refuse(accepted: AcceptedStream) -> None:
    """No stream is expected to reach this agent's handler."""
    raise AssertionError(f"unexpected stream by {accepted.path}")


@asynccontextmanager
async def online_server(services: Services, server_id: uuid.UUID) -> AsyncIterator[ServerAgent]:
    """The anyio agent, registered with the real mediator (no relay, no LAN)."""
    agent = ServerAgent(
        system_id=services.system_id,
        server_id=server_id,
        key=services.key,
        mediator=services.mediator,
        tcp_listen=(LOOPBACK, 0),
        udp_host=LOOPBACK,
        lan=False,
    )
    async with anyio.create_task_group() as group:
        await group.start(agent.serve, refuse)
        await agent.wait_ready()
        yield agent
        group.cancel_scope.cancel()


async def echo_relayed(stream: anyio.abc.ByteStream, info: RelayTunnelInfo) -> None:
    async with stream:
        while True:
            try:
                data = await stream.receive()
            except anyio.EndOfStream:
                await stream.send_eof()
                return
            await stream.send(data)


@asynccontextmanager
async def relay_server(services: Services, server_id: uuid.UUID) -> AsyncIterator[RelayAgent]:
    """The anyio relay agent, holding standby connections at the real relay."""
    agent = RelayAgent(
        services.relay, system_id=services.system_id, server_id=server_id, key=services.key
    )
    async with anyio.create_task_group() as group:
        await group.start(agent.serve, echo_relayed)
        await agent.wait_for_idle(1)
        yield agent
        group.cancel_scope.cancel()


# --- request_connection ----------------------------------------------------------------


@pytest.mark.parametrize("own_socket", [True, False], ids=["own-socket", "given-socket"])
async def test_the_mediator_answers_with_the_online_server(
    services: Services, own_socket: bool
) -> None:
    server_id = uuid.uuid4()
    async with asyncio.timeout(WAIT), online_server(services, server_id) as agent:
        port = None if own_socket else await open_udp_port(services.mediator)
        try:
            answer = await request_connection(
                services.mediator, server_id=server_id, udp=port, timeout=WAIT
            )
        finally:
            if port is not None:
                port.close()
        assert answer.response.server_id == server_id
        assert agent.tcp_endpoint in answer.response.local_endpoints
        assert len(answer.connect_session_id) == 16
        # The server hears it once, whichever copy arrived first.
        assert agent.counters.connect_requests == 1


async def test_a_system_target_reaches_any_of_its_servers(services: Services) -> None:
    server_id = uuid.uuid4()
    async with asyncio.timeout(WAIT), online_server(services, server_id):
        answer = await request_connection(services.mediator, system_id=services.system_id)
    assert answer.response.server_id == server_id


async def test_an_offline_server_is_the_mediators_404(services: Services) -> None:
    async with asyncio.timeout(WAIT):
        with pytest.raises(ConnectError) as failure:
            await request_connection(services.mediator, server_id=uuid.uuid4())
    assert failure.value.code == 404


async def test_no_mediator_at_all_fails_within_the_timeout() -> None:
    # Nothing listens on either transport: TCP is refused, UDP goes unanswered.
    nobody = (LOOPBACK, free_udp_port())
    async with asyncio.timeout(WAIT):
        with pytest.raises(ConnectError) as failure:
            await request_connection(nobody, server_id=uuid.uuid4(), timeout=0.5)
    assert failure.value.code is None


async def test_a_tunnel_that_cannot_open_fails_the_tcp_copy_and_the_relay_connect() -> None:
    # HTTP tunnels are the asyncio adapter's too (tests/adapters/test_asyncio_tunnel.py):
    # a tunnel face nobody serves ends the TCP copy, and the relay connect, as OSError.
    nobody = (LOOPBACK, free_udp_port())
    getpost = TunnelKind(method=TunnelMethod.GETPOST)
    async with asyncio.timeout(WAIT):
        with pytest.raises(ConnectError):
            await request_connection(nobody, server_id=uuid.uuid4(), timeout=0.5, tunnel=getpost)
        with pytest.raises(ConnectionError, match="getpost"):
            await open_relay_stream((LOOPBACK, 1), server_id=uuid.uuid4(), tunnel=getpost)


# --- open_relay_stream against the real relay -------------------------------------------


@pytest.mark.parametrize("by_system", [False, True], ids=["server", "system"])
async def test_a_relayed_stream_pair_echoes_byte_exact(services: Services, by_system: bool) -> None:
    server_id = uuid.uuid4()
    payload = os.urandom(512 * 1024)
    async with asyncio.timeout(WAIT), relay_server(services, server_id):
        target = {"system_id": services.system_id} if by_system else {"server_id": server_id}
        tunnel = await open_relay_stream(services.relay, **target)  # type: ignore[arg-type]
        assert tunnel.server_id == server_id
        assert len(tunnel.session_id) == 16
        tunnel.writer.write(payload)
        tunnel.writer.write_eof()
        back = await tunnel.reader.read()  # to the echo's half-close
        tunnel.writer.close()
        await tunnel.writer.wait_closed()
    assert back == payload


async def test_an_unknown_server_is_the_relays_404(services: Services) -> None:
    async with asyncio.timeout(WAIT):
        with pytest.raises(RelayConnectError) as failure:
            await open_relay_stream(services.relay, server_id=uuid.uuid4())
    assert failure.value.status == 404


# --- open_relay_stream against a scripted relay -----------------------------------------

PAIRED = (
    "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
    "Upgrade: wavesync-relay/1\r\n{session}: {session_id}\r\n{server}: {server_id}\r\n\r\n"
)


def paired_answer(server_id: uuid.UUID) -> bytes:
    return PAIRED.format(
        session=HEADER_SESSION,
        session_id="ab" * 16,
        server=HEADER_SERVER,
        server_id=server_id,
    ).encode("ascii")


Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def scripted_relay(script: Script) -> AsyncIterator[Endpoint]:
    """A TCP listener that reads one request head and then plays ``script``."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            await script(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(serve, LOOPBACK, 0)
    async with server:
        host, port = server.sockets[0].getsockname()[:2]
        yield (host, port)


async def test_bytes_that_came_with_the_101_are_read_first() -> None:
    # The server's first bytes share a segment with the 101 (one write), and more
    # follow; the stream pair must hand over every one of them, in order.
    server_id = uuid.uuid4()
    more_sent = asyncio.Event()

    async def pair_then_talk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(paired_answer(server_id) + b"first bytes|")
        await writer.drain()
        assert await reader.readexactly(5) == b"hello"  # the client wrote after pairing
        writer.write(b"more bytes")
        writer.write_eof()
        await writer.drain()
        more_sent.set()
        await reader.read()

    async with asyncio.timeout(WAIT), scripted_relay(pair_then_talk) as relay:
        tunnel = await open_relay_stream(relay, server_id=server_id)
        assert (tunnel.server_id, tunnel.session_id) == (server_id, bytes.fromhex("ab" * 16))
        tunnel.writer.write(b"hello")
        await more_sent.wait()
        assert await tunnel.reader.read() == b"first bytes|more bytes"
        tunnel.writer.close()
        await tunnel.writer.wait_closed()


@pytest.mark.parametrize(
    ("answer", "status", "words"),
    [
        (
            b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://other:3479\r\n"
            b"Content-Length: 0\r\n\r\n",
            307,
            "redirects to http://other:3479",
        ),
        (
            b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 7\r\nContent-Length: 9\r\n\r\n"
            b"no server",
            503,
            "503: no server",
        ),
        (b"", None, "closed without answering"),
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", None, "not HTTP"),
    ],
    ids=["redirect", "refused", "closed", "garbage"],
)
async def test_a_relay_that_does_not_pair_is_a_relay_connect_error(
    answer: bytes, status: int | None, words: str
) -> None:
    async def say(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(answer)
        await writer.drain()

    async with asyncio.timeout(WAIT), scripted_relay(say) as relay:
        with pytest.raises(RelayConnectError) as failure:
            await open_relay_stream(relay, server_id=uuid.uuid4())
    assert failure.value.status == status
    assert words in str(failure.value)
    if status == 503:
        assert failure.value.retry_after == 7


async def test_a_silent_relay_is_given_up_at_the_timeout() -> None:
    gone = asyncio.Event()

    async def stay_silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up and closes
        gone.set()

    async with asyncio.timeout(WAIT), scripted_relay(stay_silent) as relay:
        with pytest.raises(RelayConnectError, match="no answer from the relay in time"):
            await open_relay_stream(relay, server_id=uuid.uuid4(), timeout=0.3)
        await gone.wait()  # and the connection was closed, not left open


async def test_no_relay_listening_is_an_os_error() -> None:
    nobody = (LOOPBACK, free_udp_port())  # a free UDP port: no TCP listener there either
    async with asyncio.timeout(WAIT):
        with pytest.raises(ConnectionRefusedError):
            await open_relay_stream(nobody, server_id=uuid.uuid4())
