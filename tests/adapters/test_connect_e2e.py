"""End to end: connect anywhere, with the real `wavesync mediator` and `wavesync relay`.

The mediator and the relay run as subprocesses, exactly as an operator starts
them; a ``ServerAgent`` (echoing every stream) and client ``Connector``s run in
the test, on asyncio and on trio. Each path is forced alone, then raced; a second
connection must reuse the punched hole (no second connect request reaches the
mediator); killing the mediator or the relay must leave the other paths working.
Every wait is bounded by ``fail_after``; nothing sleeps to wait.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from tests.daemons import free_udp_port, new_system, relay_and_mediator
from wavesync_adapters.anyio.agent import AcceptedStream, ServerAgent
from wavesync_adapters.anyio.connector import Connection, Connector, PathRaceError
from wavesync_proto.addresses import Endpoint
from wavesync_proto.discovery import DEFAULT_GROUP
from wavesync_proto.race import ALL_PATHS, PathKind

pytestmark = pytest.mark.anyio

WAIT = 20.0  # seconds any one step may take before the test fails
LOOPBACK = "127.0.0.1"


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    backend: str = request.param
    return backend


@dataclass
class Services:
    system_id: uuid.UUID
    key: str
    mediator: Endpoint
    relay_url: str
    lan_group: Endpoint
    mediator_process: subprocess.Popen[str]
    relay_process: subprocess.Popen[str]


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Services]:
    """A relay and a mediator that offers it, both real subprocesses, for one test."""
    path, system_id, key = new_system(tmp_path, "connect-e2e")
    with relay_and_mediator(path) as daemons:
        yield Services(
            system_id=system_id,
            key=key,
            mediator=daemons.mediator,
            relay_url=daemons.relay_url,
            lan_group=(DEFAULT_GROUP[0], free_udp_port()),
            mediator_process=daemons.mediator_process,
            relay_process=daemons.relay_process,
        )


async def echo(accepted: AcceptedStream) -> None:
    stream = accepted.stream
    while True:
        try:
            data = await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            return
        await stream.send(data)


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
    **options: Any,
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
        **options,
    )


async def echoed(connection: Connection, size: int = 64 * 1024) -> bool:
    payload = os.urandom(size)
    async with connection.stream:
        await connection.stream.send(payload)
        back = await BufferedByteReceiveStream(connection.stream).receive_exactly(size)
    return back == payload


@pytest.mark.parametrize("kind", [PathKind.LAN, PathKind.TCP, PathKind.UDP, PathKind.RELAY])
async def test_each_path_alone_reaches_the_server(services: Services, kind: PathKind) -> None:
    server_id = uuid.uuid4()
    with anyio.fail_after(WAIT):
        async with (
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
    # After a mediator's answer the client tells it which path won (connection_result).
    asked_mediator = kind in (PathKind.TCP, PathKind.UDP)
    assert client.results_reported == (1 if asked_mediator else 0)


async def test_auto_races_every_path_and_one_stream_wins(services: Services) -> None:
    server_id = uuid.uuid4()
    with anyio.fail_after(WAIT):
        async with (
            running_agent(services, server_id),
            connector_for(services, server_id) as client,
        ):
            first = await client.connect()
            second = await client.connect()
            assert await echoed(first)
            assert await echoed(second)


async def test_a_relay_held_back_lets_the_punch_win(services: Services) -> None:
    # The race has no preference; a start delay is how a user prefers direct paths.
    server_id = uuid.uuid4()
    udp_or_relay = frozenset({PathKind.UDP, PathKind.RELAY})
    with anyio.fail_after(WAIT):
        async with (
            running_agent(services, server_id) as agent,
            connector_for(
                services, server_id, udp_or_relay, start_delays={PathKind.RELAY: WAIT}
            ) as client,
        ):
            connection = await client.connect()
            assert connection.path is PathKind.UDP
            assert await echoed(connection)
    assert agent.counters.accepted["relay"] == 0  # never started, not just beaten


async def test_a_second_connection_reuses_the_punched_hole(services: Services) -> None:
    server_id = uuid.uuid4()
    with anyio.fail_after(WAIT):
        async with (
            running_agent(services, server_id) as agent,
            connector_for(services, server_id, frozenset({PathKind.UDP})) as client,
        ):
            first = await client.connect()
            second = await client.connect()
            assert (first.reused_hole, second.reused_hole) == (False, True)
            assert second.target.startswith(first.target)
            assert await echoed(first)
            assert await echoed(second)
    # Observable on both ends: one connect request, two UDP streams.
    assert client.mediator_requests == 1
    assert agent.counters.connect_requests == 1
    assert agent.counters.accepted["udp"] == 2


async def test_at_the_punching_cap_a_stale_punch_makes_room_for_a_live_one(
    services: Services,
) -> None:
    # A client that wins by TCP leaves the agent punching toward it for 10 s; with one
    # punching socket allowed, the next client's UDP connect must still get one.
    server_id = uuid.uuid4()
    with anyio.fail_after(WAIT):
        async with running_agent(services, server_id, max_punch_sockets=1) as agent:
            for kind in (PathKind.TCP, PathKind.UDP):
                async with connector_for(services, server_id, frozenset({kind})) as client:
                    assert await echoed(await client.connect())
    assert agent.counters.punches_evicted == 1
    assert agent.counters.punches_refused == 0


async def test_without_the_mediator_lan_and_the_punched_hole_still_work(
    services: Services,
) -> None:
    server_id = uuid.uuid4()
    with anyio.fail_after(WAIT):
        async with (
            running_agent(services, server_id),
            connector_for(services, server_id, frozenset({PathKind.UDP})) as punched,
        ):
            assert await echoed(await punched.connect())
            services.mediator_process.terminate()
            services.mediator_process.wait(WAIT)
            again = await punched.connect()
            assert again.reused_hole
            assert await echoed(again)
            async with connector_for(services, server_id, frozenset({PathKind.LAN})) as lan:
                assert await echoed(await lan.connect())
            async with connector_for(services, server_id) as auto:
                connection = await auto.connect()
                assert connection.path in (PathKind.LAN, PathKind.RELAY)
                assert await echoed(connection)


async def test_without_the_relay_the_other_paths_still_work(services: Services) -> None:
    server_id = uuid.uuid4()
    with anyio.fail_after(WAIT):
        async with running_agent(services, server_id):
            services.relay_process.terminate()
            services.relay_process.wait(WAIT)
            for paths in ({PathKind.TCP}, {PathKind.UDP}, set(PathKind)):
                async with connector_for(services, server_id, frozenset(paths)) as client:
                    connection = await client.connect()
                    assert connection.path is not PathKind.RELAY
                    assert await echoed(connection)


async def test_an_offline_server_fails_with_every_paths_reason(services: Services) -> None:
    with anyio.fail_after(WAIT):
        async with connector_for(services, uuid.uuid4()) as client:
            with pytest.raises(PathRaceError) as failure:
                await client.connect()
    report = str(failure.value)
    assert "lan search: no server answered" in report
    assert "mediator: connect failed: 404" in report  # no such server online
    assert f"relay {services.relay_url}: " in report
    assert failure.value.reason == "every path failed"  # all said no before the deadline
