"""End to end: the mediator's and relay's HTTP faces, and sessions that reach them by tunnel.

The real ``wavesync mediator --http`` runs as a subprocess. A server's listen
session reaches it over each tunnel method (directly, no proxy) and a client's
connect over plain TCP reaches that server: the connection_requested arrives
through the tunnel. A client's TCP connect copy rides a tunnel too. Every wait
is bounded by ``fail_after``.

The real ``wavesync relay`` takes tunnels on its own port: standby pools and
clients over tunnels pair with plain ones either way, and bytes go through.
"""

from __future__ import annotations

import os
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import anyio.abc
import pytest

from tests.adapters.tunnels import round_trip
from tests.daemons import RELAY_READY, WAVESYNC, new_system, wavesync_daemon
from wavesync_adapters.anyio._dial import AUTO, TunnelChoice, parse_tunnel_choice
from wavesync_adapters.anyio.connect import request_connection
from wavesync_adapters.anyio.listen import MediatorListener
from wavesync_adapters.anyio.relay_agent import RelayAgent, RelayTunnelInfo
from wavesync_adapters.anyio.relay_client import open_relay_stream
from wavesync_adapters.anyio.tunnel_server import TunnelServer
from wavesync_adapters.anyio.tunnel_stream import TunnelStream
from wavesync_proto.addresses import Endpoint, format_endpoint
from wavesync_proto.mediator.listen import ConnectionRequestReceived
from wavesync_proto.tunnel import GetPostRegistry, TunnelKind, TunnelLimits, TunnelMethod

MEDIATOR_READY = (
    r"mediator listening on udp\+tcp (?P<host>[\d.]+):(?P<port>\d+),"
    r" http (?P<http_host>[\d.]+):(?P<http_port>\d+)"
)
WAIT = 15.0

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    backend: str = request.param
    return backend


@dataclass(frozen=True)
class Mediator:
    address: Endpoint
    http: str
    system_id: uuid.UUID
    key: str


@pytest.fixture(scope="module")
def mediator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mediator]:
    path, system_id, key = new_system(tmp_path_factory.mktemp("faces"), "faces")
    with wavesync_daemon(
        "mediator", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0",
        "--systems", str(path), ready=MEDIATOR_READY,
    ) as (_, ready):  # fmt: skip
        yield Mediator(
            ("127.0.0.1", int(ready["port"])),
            f"127.0.0.1:{ready['http_port']}",
            system_id,
            key,
        )


def kind(name: str) -> TunnelKind:
    return TunnelKind(method=TunnelMethod(name))


def unused_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize("tunnel", ["upgrade", "websocket", "getpost", "auto"])
async def test_a_listen_session_over_a_tunnel_registers_and_gets_a_tcp_clients_request(
    mediator: Mediator, tunnel: str
) -> None:
    choice: TunnelChoice = AUTO if tunnel == "auto" else kind(tunnel)
    listener = MediatorListener(
        mediator.address,
        system_id=mediator.system_id,
        server_id=uuid.uuid4(),
        system_key=mediator.key,
        tunnel=choice,
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
    # The session really rode the tunnel (the probe picks one of the direct methods).
    assert listener.dialer.last_kind is not None
    if tunnel != "auto":
        assert str(listener.dialer.last_kind) == tunnel
    assert len(requests) == 1
    assert answer.response.server_id == listener.server_id
    assert answer.response.udp_endpoints == ((str(local[0]), int(local[1])),)


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


def test_tunnel_choices_parse_as_the_cli_spells_them() -> None:
    assert parse_tunnel_choice("auto") == AUTO
    assert parse_tunnel_choice("getpost") == kind("getpost")
    assert parse_tunnel_choice("ssl+websocket") == TunnelKind(
        method=TunnelMethod.WEBSOCKET, tls=True
    )
    for bad in ("tls+getpost", "carrier-pigeon", "ssl+"):
        with pytest.raises(ValueError, match="bad tunnel"):
            parse_tunnel_choice(bad)
    assert format_endpoint(("127.0.0.1", 1)) == "127.0.0.1:1"


# --- the relay's tunnel face: the same port --------------------------------------------------


@dataclass(frozen=True)
class Relay:
    address: Endpoint
    system_id: uuid.UUID
    key: str


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    path, system_id, key = new_system(tmp_path_factory.mktemp("faces-relay"), "faces-relay")
    with wavesync_daemon(
        "relay", "--listen", "127.0.0.1:0", "--systems", str(path), "--standby-count", "2",
        ready=RELAY_READY,
    ) as (_, ready):  # fmt: skip
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
    relay: Relay, tunnel: TunnelChoice | None, server_id: uuid.UUID
) -> AsyncIterator[RelayAgent]:
    agent = RelayAgent(
        relay.address,
        system_id=relay.system_id,
        server_id=server_id,
        key=relay.key,
        tunnel=tunnel,
    )
    async with anyio.create_task_group() as group:
        await group.start(agent.serve, echo)
        yield agent
        group.cancel_scope.cancel()


async def relayed_echo(
    relay: Relay, server_id: uuid.UUID, tunnel: TunnelChoice | None, payload: bytes
) -> bytes:
    relayed = await open_relay_stream(relay.address, server_id=server_id, tunnel=tunnel)
    assert relayed.server_id == server_id
    async with relayed.stream:
        return await round_trip(relayed.stream, payload, block=16384)


@pytest.mark.parametrize(
    ("standby", "client"),
    [("getpost", None), (None, "websocket"), ("upgrade", "getpost"), ("auto", "auto")],
    ids=["getpost-standby+tcp-client", "tcp-standby+websocket-client", "upgrade+getpost", "auto"],
)
async def test_the_relay_pairs_tunnelled_and_plain_sessions_either_way(
    relay: Relay, standby: str | None, client: str | None
) -> None:
    def choice(name: str | None) -> TunnelChoice | None:
        return None if name is None else AUTO if name == "auto" else kind(name)

    payload = os.urandom(300_000)
    server_id = uuid.uuid4()
    async with running_agent(relay, choice(standby), server_id) as agent:
        with anyio.fail_after(WAIT):
            await agent.wait_for_idle(2)
            echoed = [
                await relayed_echo(relay, server_id, choice(client), payload) for _ in range(2)
            ]
    assert echoed == [payload, payload]
    if standby is not None:
        assert agent.dialer.last_kind is not None


# --- the command line: wavesync tunnel-probe, --tunnel, --proxy and the environment ----------


def probe_command(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    return subprocess.run(  # noqa: S603 - our own program with test-chosen arguments
        [WAVESYNC, "tunnel-probe", *args, "--timeout", "5"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**environ, **env},
    )


def test_tunnel_probe_finds_a_method_to_the_mediators_face_and_the_relays_port(
    mediator: Mediator, relay: Relay
) -> None:
    found = probe_command(mediator.http, env={})
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() in {"upgrade (no proxy)", "websocket (no proxy)"}
    named = probe_command(format_endpoint(relay.address), "--tunnel", "getpost", env={})
    assert (named.returncode, named.stdout) == (0, "getpost (no proxy)\n"), named.stderr


def test_tunnel_probe_takes_the_proxy_from_the_environment_unless_no_proxy_or_direct(
    mediator: Mediator,
) -> None:
    dead = f"http://127.0.0.1:{unused_udp_port()}"  # nothing listens there (TCP) either
    via_dead = probe_command(mediator.http, "--tunnel", "getpost", env={"HTTP_PROXY": dead})
    assert via_dead.returncode == 1
    assert "getpost" in via_dead.stderr
    for bypass in ({"NO_PROXY": "127.0.0.1"}, {"no_proxy": "127.0.0.0/8"}):
        direct = probe_command(
            mediator.http, "--tunnel", "getpost", env={"HTTP_PROXY": dead, **bypass}
        )
        assert (direct.returncode, direct.stdout) == (0, "getpost (no proxy)\n"), direct.stderr
    forced = probe_command(
        mediator.http, "--tunnel", "getpost", "--proxy", "direct", env={"http_proxy": dead}
    )
    assert forced.returncode == 0, forced.stderr
    # HTTPS_PROXY is for the ssl+ kinds only: a plain kind ignores it.
    plain = probe_command(mediator.http, "--tunnel", "getpost", env={"HTTPS_PROXY": dead})
    assert plain.returncode == 0, plain.stderr
    bad = probe_command(mediator.http, "--tunnel", "pigeon", env={})
    assert bad.returncode == 2
    assert "bad tunnel" in bad.stderr


async def test_a_getpost_registry_handed_in_is_the_one_used() -> None:
    # An empty registry has length 0: a `registry or GetPostRegistry()` default replaced
    # it, silently dropping the caller's limits (first_post_timeout and the rest).
    given = GetPostRegistry(limits=TunnelLimits())
    assert len(given) == 0

    async def ignore(stream: TunnelStream) -> None:
        await stream.aclose()

    server = TunnelServer(ignore, registry=given)
    assert server.registry is given
