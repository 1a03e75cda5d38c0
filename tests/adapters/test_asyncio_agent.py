"""End to end: the asyncio ServerAgent against the real `wavesync mediator` and `wavesync relay`.

The mediator and the relay run as subprocesses (tests/daemons.py); the server is the
asyncio adapter's ``ServerAgent`` (echoing every stream) and the client is the REAL
anyio ``Connector``, run on the same asyncio loop (anyio on its asyncio backend: the
test imports anyio, the adapter under test never does). Each path is forced alone,
then raced; a second connection must reuse the punched hole (one connect request
reaches the mediator); bad input (a client that is not wavesync, a wrong session on
the punched socket) is rejected and counted; at a cap of one punching socket a stale
punch gives way. Every wait is bounded by ``asyncio.timeout``; nothing sleeps to wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

try:
    import uvloop  # noqa: F401 - only whether it is there
except ImportError:
    HAVE_UVLOOP = False
else:
    HAVE_UVLOOP = True
from anyio.streams.buffered import BufferedByteReceiveStream

from tests.daemons import free_udp_port, new_system, relay_and_mediator
from wavesync_adapters.anyio.connector import Connection, Connector
from wavesync_adapters.asyncio.agent import AcceptedStream, AgentCounters, ServerAgent
from wavesync_adapters.asyncio.udt import open_udt_connection
from wavesync_adapters.asyncio.verify import VerificationError, verify_server
from wavesync_proto.addresses import Endpoint
from wavesync_proto.discovery import DEFAULT_GROUP
from wavesync_proto.race import ALL_PATHS, PathKind
from wavesync_proto.tunnel import ProxyConfig

pytestmark = pytest.mark.anyio

WAIT = 20.0  # seconds any one step may take before the test fails
LOOPBACK = "127.0.0.1"
WRONG = b"\xee" * 16  # a connect session nobody opened


#: The loops the adapter must run on: asyncio's own, and uvloop (skipped, with the
#: reason printed, where it is not installed).
ASYNCIO_LOOPS = [
    "asyncio",
    pytest.param(
        ("asyncio", {"use_uvloop": True}),
        id="uvloop",
        marks=pytest.mark.skipif(not HAVE_UVLOOP, reason="uvloop is not installed here"),
    ),
]


@pytest.fixture(params=ASYNCIO_LOOPS)
def anyio_backend(request: pytest.FixtureRequest) -> object:
    """Plain asyncio, and uvloop where it is installed (public asyncio APIs only)."""
    return request.param


@dataclass
class Services:
    system_id: uuid.UUID
    key: str
    mediator: Endpoint
    relay_url: str
    lan_group: Endpoint


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Services]:
    """A relay and a mediator that offers it, both real subprocesses, for one test."""
    path, system_id, key = new_system(tmp_path, "asyncio-agent")
    with relay_and_mediator(path) as daemons:
        yield Services(
            system_id=system_id,
            key=key,
            mediator=daemons.mediator,
            relay_url=daemons.relay_url,
            lan_group=(DEFAULT_GROUP[0], free_udp_port()),
        )


async def echo(accepted: AcceptedStream) -> None:
    reader, writer = accepted.reader, accepted.writer
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        return


@asynccontextmanager
async def running_agent(
    services: Services, server_id: uuid.UUID, **options: Any
) -> AsyncIterator[ServerAgent]:
    agent = ServerAgent(
        system_id=services.system_id,
        server_id=server_id,
        key=services.key,
        mediator=services.mediator,
        relays=(services.relay_url,),
        tcp_listen=(LOOPBACK, 0),
        udp_host=LOOPBACK,
        lan_group=services.lan_group,
        lan_interfaces=(LOOPBACK,),
        standby_count=2,
        **options,
    )
    async with agent.running(echo) as tcp_endpoint:
        assert tcp_endpoint == agent.tcp_endpoint
        await agent.wait_ready()
        yield agent


def connector_for(
    services: Services,
    server_id: uuid.UUID,
    paths: frozenset[PathKind] = ALL_PATHS,
) -> Connector:
    return Connector(
        server_id=server_id,
        mediator=services.mediator,
        relays=(services.relay_url,),
        paths=paths,
        lan_group=services.lan_group,
        lan_interface=LOOPBACK,
        lan_timeout=0.5,
        udp_host=LOOPBACK,
        deadline=8.0,
    )


async def echoed(connection: Connection, size: int = 256 * 1024) -> bool:
    """A random payload there and back, byte for byte."""
    payload = os.urandom(size)
    async with connection.stream:
        await connection.stream.send(payload)
        back = await BufferedByteReceiveStream(connection.stream).receive_exactly(size)
    return back == payload


@pytest.mark.parametrize("kind", [PathKind.LAN, PathKind.TCP, PathKind.UDP, PathKind.RELAY])
async def test_each_path_alone_reaches_the_asyncio_server(
    services: Services, kind: PathKind
) -> None:
    server_id = uuid.uuid4()
    async with (
        asyncio.timeout(WAIT),
        running_agent(services, server_id) as agent,
        connector_for(services, server_id, frozenset({kind})) as client,
    ):
        connection = await client.connect()
        assert connection.path is kind
        assert not connection.reused_hole
        assert await echoed(connection)
    # The server cannot tell a LAN client from a direct one: both dialled its TCP port.
    seen_as = PathKind.TCP if kind is PathKind.LAN else kind
    assert agent.counters.accepted[seen_as.value] == 1
    assert agent.counters.rejected == 0


async def test_auto_races_every_path_and_each_connection_echoes(services: Services) -> None:
    server_id = uuid.uuid4()
    async with (
        asyncio.timeout(WAIT),
        running_agent(services, server_id) as agent,
        connector_for(services, server_id) as client,
    ):
        first = await client.connect()
        second = await client.connect()
        assert await echoed(first)
        assert await echoed(second)
    assert sum(agent.counters.accepted.values()) >= 2


async def test_a_second_connection_reuses_the_punched_hole(services: Services) -> None:
    server_id = uuid.uuid4()
    async with (
        asyncio.timeout(WAIT),
        running_agent(services, server_id) as agent,
        connector_for(services, server_id, frozenset({PathKind.UDP})) as client,
    ):
        first = await client.connect()
        second = await client.connect()
        assert (first.reused_hole, second.reused_hole) == (False, True)
        assert await echoed(first)
        assert await echoed(second)
    # Observable on both ends: one connect request, two UDP streams.
    assert client.mediator_requests == 1
    assert agent.counters.connect_requests == 1
    assert agent.counters.accepted["udp"] == 2


async def test_a_client_that_is_not_wavesync_is_rejected_and_counted(
    services: Services,
) -> None:
    server_id = uuid.uuid4()
    async with asyncio.timeout(WAIT), running_agent(services, server_id) as agent:
        assert agent.tcp_endpoint is not None
        reader, writer = await asyncio.open_connection(*agent.tcp_endpoint)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert await reader.read() == b""  # closed without an answer
        writer.close()
        # The agent goes on serving verified clients.
        async with connector_for(services, server_id, frozenset({PathKind.TCP})) as client:
            assert await echoed(await client.connect())
    assert agent.counters.rejected == 1
    assert agent.counters.accepted["tcp"] == 1


async def test_a_wrong_session_on_the_punched_socket_is_refused_and_counted(
    services: Services,
) -> None:
    server_id = uuid.uuid4()
    async with (
        asyncio.timeout(WAIT),
        running_agent(services, server_id) as agent,
        connector_for(services, server_id, frozenset({PathKind.UDP})) as client,
    ):
        assert await echoed(await client.connect())
        (punch,) = agent._punches.values()  # the hole the client punched, still open
        reader, writer = await open_udt_connection(punch.endpoint.local_address)
        with pytest.raises(VerificationError) as refused:
            await verify_server(
                reader, writer, server_id=server_id, connect_session_id=b"\xee" * 16
            )
        writer.close()
        # Without any session at all: refused too (a punched stream must name one).
        reader, writer = await open_udt_connection(punch.endpoint.local_address)
        with pytest.raises(VerificationError):
            await verify_server(reader, writer, server_id=server_id)
        writer.close()
    assert refused.value.code == 403
    assert agent.counters.rejected == 2
    assert agent.counters.accepted["udp"] == 1


async def test_at_the_punching_cap_a_stale_punch_makes_room_for_a_live_one(
    services: Services,
) -> None:
    # A client that wins by TCP leaves the agent punching toward it for 10 s; with one
    # punching socket allowed, the next client's UDP connect must still get one.
    server_id = uuid.uuid4()
    async with (
        asyncio.timeout(WAIT),
        running_agent(services, server_id, max_punch_sockets=1) as agent,
    ):
        for kind in (PathKind.TCP, PathKind.UDP):
            async with connector_for(services, server_id, frozenset({kind})) as client:
                assert await echoed(await client.connect())
        # The TCP client's punch is gone (its socket closed); the UDP client's holds.
        (punch,) = agent._punches.values()
        assert punch.use.proven
    assert agent.counters.punches_evicted == 1
    assert agent.counters.punches_refused == 0
    assert agent.counters.accepted == {"lan": 0, "tcp": 1, "udp": 1, "relay": 0}


async def test_a_wrong_key_fails_wait_ready_with_a_registration_error(
    services: Services,
) -> None:
    from wavesync_adapters.errors import RegistrationError  # noqa: PLC0415 - one test's

    agent = ServerAgent(
        system_id=services.system_id,
        server_id=uuid.uuid4(),
        key="not-the-key",
        mediator=services.mediator,
        tcp_listen=(LOOPBACK, 0),
        udp_host=LOOPBACK,
        lan=False,
    )
    async with asyncio.timeout(WAIT), agent.running(echo):
        with pytest.raises(RegistrationError) as refused:
            await agent.wait_ready()
    assert refused.value.code == 401


async def test_a_stream_over_max_streams_is_dropped_and_counted(services: Services) -> None:
    server_id = uuid.uuid4()
    async with (
        asyncio.timeout(WAIT),
        running_agent(services, server_id, max_streams=1) as agent,
        connector_for(services, server_id, frozenset({PathKind.TCP})) as client,
    ):
        held = await client.connect()  # its echo handler holds the one slot
        assert agent.tcp_endpoint is not None
        reader, writer = await asyncio.open_connection(*agent.tcp_endpoint)
        with contextlib.suppress(ConnectionError):
            assert await reader.read() == b""  # aborted at once, nothing answered
        writer.close()
        assert await echoed(held)
    assert agent.counters.over_capacity == 1
    assert agent.counters.accepted["tcp"] == 1


def test_tunnels_and_proxies_are_accepted_as_on_anyio() -> None:
    # Carried through to the listen session and the standby pool: behind squid, see
    # tests/adapters/test_asyncio_tunnel.py.
    common: dict[str, Any] = {"system_id": uuid.uuid4(), "server_id": uuid.uuid4(), "key": "k"}
    proxy = ProxyConfig(host="127.0.0.1", port=3128)
    ServerAgent(**common, tunnel="auto", mediator_http="127.0.0.1:8080", proxy=proxy)


def test_agent_counters_match_the_anyio_agents() -> None:
    from wavesync_adapters.anyio.agent import AgentCounters as AnyioCounters  # noqa: PLC0415

    assert AgentCounters() == AgentCounters(**vars(AnyioCounters()))
    assert list(vars(AgentCounters())) == list(vars(AnyioCounters()))


def test_importing_the_asyncio_agent_loads_no_anyio_or_trio() -> None:
    code = (
        "import sys, wavesync_adapters.asyncio.agent\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('anyio', 'trio', 'sniffio')))"
    )
    result = subprocess.run(  # noqa: S603 - this interpreter, our code
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"
