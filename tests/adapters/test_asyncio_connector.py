"""End to end: the asyncio ``Connector`` against the real daemons and the anyio server.

The mediator and the relay run as subprocesses (``wavesync mediator``, ``wavesync
relay``), exactly as an operator starts them; the server is the anyio adapter's
``ServerAgent`` (echoing every stream), run in the test's own asyncio loop as another
application would run it. The client is ``wavesync_adapters.asyncio.connector``, which
imports nothing of anyio (checked in a fresh interpreter below). Each path is forced
alone, then raced; a second connection must reuse the punched hole; a stranger on the
advertised TCP port must fail verification; killing the mediator must leave the LAN
and the punched hole working. Every wait is bounded by ``asyncio.timeout``; nothing
sleeps to wait.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.daemons import free_udp_port, new_system, relay_and_mediator
from wavesync_adapters.anyio.agent import AcceptedStream, ServerAgent
from wavesync_adapters.asyncio.connector import Connection, Connector, PathRaceError
from wavesync_adapters.asyncio.forward import forward_to_service, serve_local_port
from wavesync_adapters.asyncio.udt import (
    UdtTransport,
    create_udt_endpoint,
    open_udt_connection,
    start_udt_server,
)
from wavesync_proto.addresses import Endpoint
from wavesync_proto.discovery import DEFAULT_GROUP
from wavesync_proto.race import ALL_PATHS, PathKind

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
    relay_url: str
    lan_group: Endpoint
    mediator_process: subprocess.Popen[str]
    relay_process: subprocess.Popen[str]


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Services]:
    """A relay and a mediator that offers it, both real subprocesses, for one test."""
    path, system_id, key = new_system(tmp_path, "asyncio-connector")
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
    """The anyio server agent on loopback: mediator, relay standby pool, LAN, TCP."""
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
    async with anyio.create_task_group() as group:
        await group.start(agent.serve, echo)
        await agent.wait_ready()
        yield agent
        group.cancel_scope.cancel()


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


async def echoed(connection: Connection, size: int = 256 * 1024) -> bool:
    """Send ``size`` random bytes, read as many back, then close the stream."""
    payload = os.urandom(size)
    connection.writer.write(payload)
    back = await connection.reader.readexactly(size)
    connection.writer.close()
    await connection.writer.wait_closed()
    return back == payload


@pytest.mark.parametrize("kind", [PathKind.LAN, PathKind.TCP, PathKind.UDP, PathKind.RELAY])
async def test_each_path_alone_reaches_the_server(services: Services, kind: PathKind) -> None:
    server_id = uuid.uuid4()
    async with asyncio.timeout(WAIT):
        async with (
            running_agent(services, server_id) as agent,
            connector_for(services, server_id, frozenset({kind})) as client,
        ):
            connection = await client.connect()
            assert connection.path is kind
            assert not connection.reused_hole
            assert isinstance(connection.reader, asyncio.StreamReader)
            assert isinstance(connection.writer.transport, UdtTransport) == (kind is PathKind.UDP)
            assert await echoed(connection)
    # The server cannot tell a LAN client from a direct one: both dialled its TCP port.
    seen_as = PathKind.TCP if kind is PathKind.LAN else kind
    assert agent.counters.accepted[seen_as.value] == 1
    assert agent.counters.rejected == 0
    # After a mediator's answer the client tells it which path won (connection_result).
    asked_mediator = kind in (PathKind.TCP, PathKind.UDP)
    assert client.mediator_requests == (1 if asked_mediator else 0)
    assert client.results_reported == (1 if asked_mediator else 0)


async def test_auto_races_every_path_and_one_stream_wins(services: Services) -> None:
    server_id = uuid.uuid4()
    async with asyncio.timeout(WAIT):
        async with (
            running_agent(services, server_id) as agent,
            connector_for(services, server_id) as client,
        ):
            first = await client.connect()
            second = await client.connect()
            assert await echoed(first)
            assert await echoed(second)
    # Both winners reached the handler (a loser cut short during tunnel_syn may show
    # as a rejected stream on the server: the race cancelled it).
    assert sum(agent.counters.accepted.values()) >= 2


async def test_a_relay_held_back_lets_the_punch_win(services: Services) -> None:
    server_id = uuid.uuid4()
    udp_or_relay = frozenset({PathKind.UDP, PathKind.RELAY})
    async with asyncio.timeout(WAIT):
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
    async with asyncio.timeout(WAIT):
        async with (
            running_agent(services, server_id) as agent,
            connector_for(services, server_id, frozenset({PathKind.UDP})) as client,
        ):
            first = await client.connect()
            second = await client.connect()
            assert (first.reused_hole, second.reused_hole) == (False, True)
            assert second.target.startswith(first.target)
            hole = first.writer.get_extra_info("udt_endpoint")
            assert second.writer.get_extra_info("udt_endpoint") is hole  # one socket
            assert await echoed(first)
            assert await echoed(second)
            assert not hole.is_closing()  # lingers for a third connection
        # Leaving the block closes the punched socket it kept.
        assert hole.is_closing()
    # Observable on both ends: one connect request, two UDP streams.
    assert client.mediator_requests == 1
    assert agent.counters.connect_requests == 1
    assert agent.counters.accepted["udp"] == 2


async def test_without_the_mediator_lan_and_the_punched_hole_still_work(
    services: Services,
) -> None:
    server_id = uuid.uuid4()
    async with asyncio.timeout(WAIT):
        async with (
            running_agent(services, server_id),
            connector_for(services, server_id, frozenset({PathKind.UDP})) as punched,
        ):
            assert await echoed(await punched.connect())
            services.mediator_process.terminate()
            await asyncio.to_thread(services.mediator_process.wait, WAIT)
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
    async with asyncio.timeout(WAIT), running_agent(services, server_id):
        services.relay_process.terminate()
        await asyncio.to_thread(services.relay_process.wait, WAIT)
        for paths in ({PathKind.TCP}, {PathKind.UDP}, set(PathKind)):
            async with connector_for(services, server_id, frozenset(paths)) as client:
                connection = await client.connect()
                assert connection.path is not PathKind.RELAY
                assert await echoed(connection)


async def test_an_offline_server_fails_with_every_paths_reason(services: Services) -> None:
    async with asyncio.timeout(WAIT):
        async with connector_for(services, uuid.uuid4()) as client:
            with pytest.raises(PathRaceError) as failure:
                await client.connect()
    report = str(failure.value)
    assert "lan search: no server answered" in report
    assert "mediator: connect failed: 404" in report  # no such server online
    assert f"relay {services.relay_url}: " in report
    assert failure.value.reason == "every path failed"  # all said no before the deadline


async def test_a_stranger_on_the_tcp_port_fails_verification(services: Services) -> None:
    # The mediator hands out what the server advertises; here that is a TCP service
    # that is no wavesync server. The stream comes up, tunnel_syn must refuse it.
    stranger_saw: list[bytes] = []
    stranger_done = asyncio.Event()

    async def stranger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n" + bytes(64))
        stranger_saw.append(await reader.read())  # until the client hangs up
        writer.close()
        stranger_done.set()

    server_id = uuid.uuid4()
    async with asyncio.timeout(WAIT), await asyncio.start_server(stranger, LOOPBACK, 0) as fake:
        fake_endpoint = fake.sockets[0].getsockname()[:2]
        async with (
            running_agent(services, server_id, advertise=[fake_endpoint], lan=False) as agent,
            connector_for(services, server_id, frozenset({PathKind.TCP})) as client,
        ):
            with pytest.raises(PathRaceError) as failure:
                await client.connect()
            await stranger_done.wait()  # the connector closed the stream it refused
    report = str(failure.value)
    assert f"tcp {fake_endpoint[0]}:{fake_endpoint[1]}: " in report
    assert stranger_saw[0]  # the tunnel_syn request reached it
    assert agent.counters.accepted["tcp"] == 0


# --- forwarding (wavesync client --listen, wavesync server --forward) -------------------


async def test_a_local_port_is_carried_to_the_server(services: Services) -> None:
    # A local TCP client's bytes and half-close cross the connector's TCP stream to the
    # anyio agent's echo, and its answer and end come back.
    server_id = uuid.uuid4()
    payload = os.urandom(300 * 1024)
    async with asyncio.timeout(WAIT):
        async with (
            running_agent(services, server_id) as agent,
            connector_for(services, server_id, frozenset({PathKind.TCP})) as client,
        ):
            bound: asyncio.Future[Endpoint] = asyncio.get_running_loop().create_future()
            serving = asyncio.create_task(
                serve_local_port(client, (LOOPBACK, 0), started=bound.set_result)
            )
            try:
                reader, writer = await asyncio.open_connection(*await bound)
                writer.write(payload)
                writer.write_eof()
                assert await reader.read() == payload  # to the end the echo passed on
                writer.close()
            finally:
                serving.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await serving
    assert agent.counters.accepted["tcp"] == 1


@dataclass(frozen=True)
class Accepted:
    """An accepted stream as the asyncio agent hands it to a handler."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    path: PathKind


async def test_a_udt_stream_is_forwarded_and_closed_gracefully_at_the_services_end() -> None:
    # UDT has no half-close: the service answering and closing (HTTP/1.0 style) must
    # close the UDT stream gracefully, the whole answer delivered first.
    answer = os.urandom(1024 * 1024)

    async def service(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(5)
        writer.write(answer)
        writer.close()

    forwarded = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await forward_to_service(Accepted(reader, writer, PathKind.UDP), service_endpoint)
        forwarded.set()

    async with (
        asyncio.timeout(WAIT),
        await asyncio.start_server(service, LOOPBACK, 0) as tcp_service,
        await create_udt_endpoint((LOOPBACK, 0)) as endpoint,
    ):
        service_endpoint = tcp_service.sockets[0].getsockname()[:2]
        async with await start_udt_server(handler, endpoint=endpoint):
            reader, writer = await open_udt_connection(endpoint.local_address)
            writer.write(b"hello")
            assert await reader.read() == answer  # then the end, not a reset
            writer.close()
            await forwarded.wait()


def test_importing_the_connector_loads_no_anyio_or_trio() -> None:
    probe = (
        "import sys, wavesync_adapters.asyncio.connector, wavesync_adapters.asyncio.forward\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'anyio', 'trio'}))"
    )
    result = subprocess.run(  # noqa: S603 - this interpreter, a fixed script
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout
