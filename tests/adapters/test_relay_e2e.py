"""End to end: the real `wavesync relay` program, an anyio server agent and clients on loopback.

The relay runs as a subprocess exactly as an operator starts it. The server
agent (``RelayAgent``) keeps its standby pool and echoes every tunnel; clients
use ``open_relay_stream``. Each test runs on asyncio and on trio, and every
wait is bounded by ``fail_after`` so a broken exchange fails instead of hanging.
"""

from __future__ import annotations

import os
import re
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.abc
import pytest

from tests.daemons import new_system, wavesync_daemon
from wavesync_adapters.anyio.relay_agent import RelayAgent, RelayTunnelInfo
from wavesync_adapters.anyio.relay_client import RelayConnectError, open_relay_stream
from wavesync_proto.addresses import Endpoint

READY = r"relay listening on tcp (?P<host>[\d.]+):(?P<port>\d+)"
WAIT = 15.0  # seconds any one step may take before the test fails

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    backend: str = request.param
    return backend


@dataclass(frozen=True)
class Relay:
    address: Endpoint
    system_id: uuid.UUID
    key: str


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    path, system_id, key = new_system(tmp_path_factory.mktemp("relay"), "relay-e2e")
    with wavesync_daemon(
        "relay", "--listen", "127.0.0.1:0", "--systems", str(path), ready=READY
    ) as (_, ready):
        yield Relay(("127.0.0.1", int(ready["port"])), system_id, key)


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
    relay: Relay, *, server_id: uuid.UUID | None = None, key: str | None = None
) -> AsyncIterator[RelayAgent]:
    agent = RelayAgent(
        relay.address,
        system_id=relay.system_id,
        server_id=server_id or uuid.uuid4(),
        key=relay.key if key is None else key,
    )
    async with anyio.create_task_group() as group:
        await group.start(agent.serve, echo)
        yield agent
        group.cancel_scope.cancel()


async def round_trip(stream: anyio.abc.ByteStream, payload: bytes) -> bytes:
    """Send ``payload`` and a half-close; return everything the echo sent back."""
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
        assert agent.pool.idle == 7
        assert agent.pool.target == 7  # the relay's 101 asked for its default

        payloads = [os.urandom(256 * 1024 + n) for n in range(10)]
        echoed: dict[int, bytes] = {}
        sessions: set[bytes] = set()

        async def client(number: int) -> None:
            tunnel = await open_relay_stream(relay.address, server_id=server_id)
            assert tunnel.server_id == server_id
            sessions.add(tunnel.session_id)
            async with tunnel.stream:
                echoed[number] = await round_trip(tunnel.stream, payloads[number])

        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as group:
                for number in range(10):
                    group.start_soon(client, number)
        assert [echoed[number] == payloads[number] for number in range(10)] == [True] * 10
        assert len(sessions) == 10

        # Every taken connection was replaced: the pool is back at seven idle.
        with anyio.fail_after(WAIT):
            await agent.wait_for_idle(7)


async def test_a_client_may_name_the_system_instead_of_the_server(relay: Relay) -> None:
    server_id = uuid.uuid4()
    async with running_agent(relay, server_id=server_id) as agent:
        with anyio.fail_after(WAIT):
            await agent.wait_for_idle(1)
            tunnel = await open_relay_stream(relay.address, system_id=relay.system_id)
            async with tunnel.stream:
                assert await round_trip(tunnel.stream, b"by system") == b"by system"
        # Other tests' agents may hold standby connections of the same system, so the
        # round robin may have picked theirs; every server of the system echoes.
        assert tunnel.server_id is not None


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


def relay_answer(relay: Relay, request: bytes) -> bytes:
    """Send a raw request and read the relay's whole answer (it closes after errors)."""
    with socket.create_connection(relay.address, timeout=WAIT) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
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
    ],
)
async def test_the_relay_is_not_an_open_proxy(
    relay: Relay, request_bytes: bytes, status: bytes
) -> None:
    # Only a registered server id (or system id) can be reached; a host and port
    # in any form of request is refused, and the connection is closed after it.
    answer = await anyio.to_thread.run_sync(relay_answer, relay, request_bytes)
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_relay_reports_its_counters_on_sigterm(tmp_path: Path) -> None:
    systems, system_id, key = new_system(tmp_path)
    with wavesync_daemon(
        "relay", "--listen", "127.0.0.1:0", "--systems", str(systems), "--log-level", "info",
        ready=READY,
    ) as (process, ready):  # fmt: skip
        private = Relay(("127.0.0.1", int(ready["port"])), system_id, key)
        async with running_agent(private) as agent:
            with anyio.fail_after(WAIT):
                await agent.wait_for_idle(7)
                tunnel = await open_relay_stream(private.address, system_id=system_id)
                async with tunnel.stream:
                    assert await round_trip(tunnel.stream, b"counted") == b"counted"
        process.terminate()
        _, log = await anyio.to_thread.run_sync(lambda: process.communicate(timeout=WAIT))
    assert process.returncode == 0
    assert "stopping on SIGTERM" in log
    assert "clients_paired=1" in log
    # Seven, and maybe the one replacing the taken one (the agent stops at once).
    accepted = re.search(r"standby_accepted=(\d+)", log)
    assert accepted is not None
    assert int(accepted[1]) in (7, 8)
