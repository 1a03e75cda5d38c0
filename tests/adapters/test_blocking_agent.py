"""End to end: the blocking ``ServerAgent`` against the real daemons and anyio's client.

The mediator and the relay run as subprocesses (``wavesync mediator``/``relay``), the
agent runs in its own threads, and the client is the anyio ``Connector`` driven by
``anyio.run`` in the test thread: a cross-runtime check on every path (LAN, TCP, UDP,
relay, auto), hole reuse, the cap on punching sockets, bad input, and a clean stop.
Every wait is bounded (``fail_after`` on the client, timeouts on the agent).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from tests.daemons import free_udp_port, new_system, relay_and_mediator
from wavesync_adapters.anyio.connector import Connector
from wavesync_adapters.blocking.agent import AcceptedStream, ServerAgent
from wavesync_adapters.blocking.lan import search_lan
from wavesync_adapters.blocking.udt import UdtEndpoint
from wavesync_adapters.blocking.verify import VerificationError, verify_server
from wavesync_proto.addresses import Endpoint
from wavesync_proto.discovery import DEFAULT_GROUP, ServerFound
from wavesync_proto.race import ALL_PATHS, PathKind

WAIT = 20.0  # seconds any one step may take before the test fails
LOOPBACK = "127.0.0.1"
PAYLOAD = 64 * 1024


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
    path, system_id, key = new_system(tmp_path, "blocking-agent")
    with relay_and_mediator(path) as daemons:
        yield Services(
            system_id=system_id,
            key=key,
            mediator=daemons.mediator,
            relay_url=daemons.relay_url,
            lan_group=(DEFAULT_GROUP[0], free_udp_port()),
        )


class Echo:
    """The application: echoes every stream, and notes what it was given."""

    def __init__(self) -> None:
        self.socket_types: list[type] = []
        self.paths: list[PathKind] = []

    def __call__(self, accepted: AcceptedStream) -> None:
        self.socket_types.append(type(accepted.sock))
        self.paths.append(accepted.path)
        with accepted.sock.makefile("rwb", buffering=0) as stream:
            while data := stream.read(65536):
                stream.write(data)


@contextmanager
def running_agent(
    services: Services, server_id: uuid.UUID, handler: Any = None, **options: Any
) -> Iterator[ServerAgent]:
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
    before = set(threading.enumerate())
    with agent.running(handler or Echo()):
        agent.wait_ready(WAIT)
        yield agent
    # A clean stop: every thread the agent (and its UDT endpoints) started has ended.
    left = [t.name for t in set(threading.enumerate()) - before if t.is_alive()]
    assert left == []


@dataclass
class Outcome:
    paths: list[PathKind]
    reused: list[bool]
    echoed: list[bool]
    mediator_requests: int
    results_reported: int


def connect(
    services: Services,
    server_id: uuid.UUID,
    paths: frozenset[PathKind] = ALL_PATHS,
    count: int = 1,
    backend: str = "asyncio",
) -> Outcome:
    """``count`` connections by the anyio client (on ``backend``), each echoed byte-exact."""
    outcome = Outcome([], [], [], 0, 0)

    async def run() -> None:
        with anyio.fail_after(WAIT):
            async with Connector(
                server_id=server_id,
                mediator=services.mediator,
                relays=(services.relay_url,),
                paths=paths,
                lan_group=services.lan_group,
                lan_interface=LOOPBACK,
                lan_timeout=0.5,
                udp_host=LOOPBACK,
                deadline=8.0,
            ) as client:
                connections = [await client.connect() for _ in range(count)]
                for connection in connections:
                    payload = os.urandom(PAYLOAD)
                    async with connection.stream:
                        await connection.stream.send(payload)
                        back = await BufferedByteReceiveStream(connection.stream).receive_exactly(
                            PAYLOAD
                        )
                    outcome.paths.append(connection.path)
                    outcome.reused.append(connection.reused_hole)
                    outcome.echoed.append(back == payload)
            outcome.mediator_requests = client.mediator_requests
            outcome.results_reported = client.results_reported

    anyio.run(run, backend=backend)
    return outcome


@pytest.mark.parametrize("kind", [PathKind.LAN, PathKind.TCP, PathKind.UDP, PathKind.RELAY])
def test_each_path_alone_reaches_the_blocking_server(services: Services, kind: PathKind) -> None:
    server_id = uuid.uuid4()
    echo = Echo()
    with running_agent(services, server_id, echo) as agent:
        outcome = connect(services, server_id, frozenset({kind}))
    assert outcome.paths == [kind]
    assert outcome.echoed == [True]
    assert outcome.reused == [False]
    # The server cannot tell a LAN client from a direct one: both dialled its TCP port.
    seen_as = PathKind.TCP if kind is PathKind.LAN else kind
    assert agent.counters.accepted[seen_as.value] == 1
    assert agent.counters.rejected == 0
    assert echo.socket_types == [socket.socket]  # a real socket, whichever the path
    assert echo.paths == [seen_as]


def test_the_blocking_lan_search_finds_the_blocking_agent(services: Services) -> None:
    server_id = uuid.uuid4()
    found: list[ServerFound] = []
    with running_agent(services, server_id) as agent:
        count = search_lan(
            found.append,
            server_id=server_id,
            timeout=WAIT,
            group=services.lan_group,
            interface=LOOPBACK,
        )
    assert count == 1
    assert [(f.server_id, f.endpoints) for f in found] == [(server_id, agent.advertised)]


def test_auto_on_trio_races_every_path(services: Services) -> None:
    server_id = uuid.uuid4()
    with running_agent(services, server_id) as agent:
        outcome = connect(services, server_id, count=2, backend="trio")
    assert outcome.echoed == [True, True]
    assert sum(agent.counters.accepted.values()) >= 2


def test_a_second_connection_reuses_the_punched_hole(services: Services) -> None:
    server_id = uuid.uuid4()
    with running_agent(services, server_id) as agent:
        outcome = connect(services, server_id, frozenset({PathKind.UDP}), count=2)
    assert outcome.reused == [False, True]
    assert outcome.echoed == [True, True]
    # Observable on both ends: one connect request, two UDP streams.
    assert outcome.mediator_requests == 1
    assert agent.counters.connect_requests == 1
    assert agent.counters.accepted["udp"] == 2


def test_at_the_punching_cap_a_stale_punch_makes_room_for_a_live_one(
    services: Services,
) -> None:
    # A client that wins by TCP leaves the agent punching toward it; with one punching
    # socket allowed, the next client's UDP connect must still get one.
    server_id = uuid.uuid4()
    with running_agent(services, server_id, max_punch_sockets=1) as agent:
        for kind in (PathKind.TCP, PathKind.UDP):
            assert connect(services, server_id, frozenset({kind})).echoed == [True]
    assert agent.counters.punches_evicted == 1
    assert agent.counters.punches_refused == 0


def test_a_foreign_tcp_client_is_rejected_and_counted(services: Services) -> None:
    server_id = uuid.uuid4()
    with running_agent(services, server_id) as agent:
        assert agent.tcp_endpoint is not None
        with socket.create_connection(agent.tcp_endpoint, timeout=WAIT) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            # Closed without a word: not a wavesync client. The agent read only the 20
            # bytes a STUN header needs, so the close may come as a reset.
            try:
                answer = sock.recv(100)
            except ConnectionResetError:
                answer = b""
            assert answer == b""
        with socket.create_connection(agent.tcp_endpoint, timeout=WAIT) as sock:
            with pytest.raises(VerificationError) as wrong:
                verify_server(sock, server_id=uuid.uuid4(), timeout=WAIT)
            assert wrong.value.code == 404
        # The agent still serves a real client afterwards.
        assert connect(services, server_id, frozenset({PathKind.TCP})).echoed == [True]
    assert agent.counters.rejected == 2
    assert agent.counters.accepted["tcp"] == 1


def test_a_udt_stream_with_a_wrong_session_is_rejected(services: Services) -> None:
    server_id = uuid.uuid4()
    with running_agent(services, server_id) as agent:
        assert connect(services, server_id, frozenset({PathKind.UDP})).echoed == [True]
        [punch] = agent._punches.values()  # the hole stays open for hole_linger
        with UdtEndpoint.bind((LOOPBACK, 0)) as stranger:
            sock = stranger.connect(punch.endpoint.local_address, timeout=WAIT)
            with sock, pytest.raises(VerificationError) as refused:
                verify_server(sock, server_id=server_id, connect_session_id=os.urandom(16))
        assert refused.value.code == 403
    assert agent.counters.rejected == 1
    assert agent.counters.accepted["udp"] == 1


def test_leaving_the_block_stops_every_thread_and_open_stream(services: Services) -> None:
    server_id = uuid.uuid4()
    handler_entered = threading.Event()
    handler_saw_eof = threading.Event()

    def hold(accepted: AcceptedStream) -> None:
        handler_entered.set()
        if accepted.sock.recv(1) == b"":  # blocks until the agent shuts the stream down
            handler_saw_eof.set()

    held = socket.socket()
    with running_agent(services, server_id, hold) as agent:
        assert agent.tcp_endpoint is not None
        held.settimeout(WAIT)
        held.connect(agent.tcp_endpoint)
        verify_server(held, server_id=server_id, timeout=WAIT)
        assert handler_entered.wait(WAIT)
    held.close()
    assert handler_saw_eof.is_set()  # and running_agent saw no thread left


def test_streams_over_max_streams_are_closed_and_counted(services: Services) -> None:
    server_id = uuid.uuid4()
    release = threading.Event()

    def hold(accepted: AcceptedStream) -> None:
        release.wait(WAIT)

    with running_agent(services, server_id, hold, max_streams=1) as agent:
        assert agent.tcp_endpoint is not None
        with socket.create_connection(agent.tcp_endpoint, timeout=WAIT) as first:
            verify_server(first, server_id=server_id, timeout=WAIT)  # holds the only slot
            with (
                socket.create_connection(agent.tcp_endpoint, timeout=WAIT) as second,
                pytest.raises(VerificationError, match="closed before"),
            ):
                verify_server(second, server_id=server_id, timeout=WAIT)
            release.set()
    assert agent.counters.over_capacity == 1
    assert agent.counters.accepted["tcp"] == 1


def test_importing_the_blocking_agent_loads_no_async_runtime() -> None:
    probe = (
        "import sys, wavesync_adapters.blocking.agent; "
        "print(sorted(m for m in ('asyncio', 'anyio', 'trio') if m in sys.modules))"
    )
    result = subprocess.run(  # noqa: S603 - this interpreter, a fixed script
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=WAIT, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout
