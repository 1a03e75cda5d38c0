"""Through a real squid with Debian's default rules: a whole server agent and a client.

The mediator (``--http``) and the relay run as the real programs on loopback;
squid (tests/squid.py) runs with Debian's default access rules, where CONNECT
goes to port 443 only and the Upgrade header is stripped. Behind it, a server
agent's listen session and its standby pool each probe the tunnel methods
(the probe must pick getpost), register and stay; a client, also behind the
squid, asks the mediator over a tunnel, takes the relay URL it is given and
reaches the server's echo through the relay. Every wait is bounded.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import anyio
import anyio.abc
import pytest

from tests.adapters.tunnels import round_trip
from tests.daemons import RELAY_READY, new_system, run_wavesync, wavesync_daemon
from tests.squid import DEFAULT, Squid, squid_binary, squid_proxy
from wavesync_adapters.anyio._dial import AUTO
from wavesync_adapters.anyio.agent import AcceptedStream, ServerAgent
from wavesync_adapters.anyio.connect import request_connection
from wavesync_adapters.anyio.connector import Connector
from wavesync_adapters.anyio.listen import MediatorListener
from wavesync_adapters.anyio.relay_agent import RelayAgent, RelayTunnelInfo
from wavesync_adapters.anyio.relay_client import open_relay_stream
from wavesync_adapters.anyio.tunnel import parse_target
from wavesync_adapters.programs import ADAPTERS
from wavesync_proto.addresses import Endpoint
from wavesync_proto.mediator.listen import ConnectionRequestReceived
from wavesync_proto.race import PathKind
from wavesync_proto.tunnel import ProxyConfig, TunnelKind, TunnelMemory, TunnelMethod

MEDIATOR_READY = (
    r"mediator listening on udp\+tcp (?P<host>[\d.]+):(?P<port>\d+),"
    r" http (?P<http_host>[\d.]+):(?P<http_port>\d+)"
)
WAIT = 30.0
GETPOST = TunnelKind(method=TunnelMethod.GETPOST)

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(squid_binary() is None, reason="squid is not installed"),
]


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    backend: str = request.param
    return backend


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
    folder = tmp_path_factory.mktemp("faces-squid")
    path, system_id, key = new_system(folder, "behind-squid")
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


async def echo(stream: anyio.abc.ByteStream, info: RelayTunnelInfo) -> None:
    async with stream:
        while True:
            try:
                data = await stream.receive()
            except anyio.EndOfStream:
                await stream.send_eof()
                return
            await stream.send(data)


async def test_a_server_and_a_client_behind_default_squid_meet_through_the_relay(
    services: Services,
) -> None:
    proxy = ProxyConfig.from_url(services.squid.url)
    server_id = uuid.uuid4()
    relay = parse_target(services.relay_url)
    listener = MediatorListener(
        services.mediator,
        system_id=services.system_id,
        server_id=server_id,
        system_key=services.key,
        tunnel=AUTO,
        http=services.http,
        proxy=proxy,
    )
    agent = RelayAgent(
        relay, system_id=services.system_id, server_id=server_id, key=services.key,
        tunnel=AUTO, proxy=proxy,
    )  # fmt: skip
    payload = os.urandom(256 * 1024)
    with anyio.fail_after(WAIT):
        async with (
            anyio.create_task_group() as group,
            await anyio.create_udp_socket(local_host="127.0.0.1") as server_udp,
        ):
            await group.start(listener.run)
            await group.start(agent.serve, echo)
            await listener.wait_registered()
            await agent.wait_for_idle(3)

            async def answer_requests() -> None:
                while True:
                    request = await listener.next_request()
                    if isinstance(request, ConnectionRequestReceived):
                        await listener.acknowledge(request.connect_session_id, server_udp)

            group.start_soon(answer_requests)
            memory = TunnelMemory()  # the client's: one location each, mediator and relay
            answer = await request_connection(
                services.mediator,
                server_id=server_id,
                tunnel=AUTO,
                http=services.http,
                proxy=proxy,
                tunnel_memory=memory,
            )
            assert answer.response.relay_urls == (services.relay_url,)
            relayed = await open_relay_stream(
                parse_target(answer.response.relay_urls[0]),
                server_id=server_id,
                tunnel=AUTO,
                proxy=proxy,
                tunnel_memory=memory,
            )
            async with relayed.stream:
                echoed = await round_trip(relayed.stream, payload, block=16384)
            group.cancel_scope.cancel()
    assert echoed == payload
    # Behind Debian's default rules only getpost passes: the probes all chose it.
    assert listener.dialer.last_kind == GETPOST
    assert agent.dialer.last_kind == GETPOST


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_tunnel_probe_through_default_squid_says_getpost(services: Services, adapter: str) -> None:
    found = run_wavesync(
        "tunnel-probe", services.http, "--proxy", services.squid.url, "--timeout", "5",
        "--adapter", adapter,
    )  # fmt: skip
    assert found.returncode == 0, found.stderr
    assert found.stdout == f"getpost (proxy 127.0.0.1:{services.squid.port})\n"


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_tunnel_probe_on_each_runtime_direct_named_and_refused(
    services: Services, adapter: str
) -> None:
    # Without the proxy every method passes: the first to validate wins (upgrade or
    # websocket, whichever answered first), as on anyio.
    runtime = ("--timeout", "5", "--adapter", adapter)
    direct = run_wavesync("tunnel-probe", services.http, "--proxy", "direct", *runtime)
    assert direct.returncode == 0, direct.stderr
    assert direct.stdout in {"upgrade (no proxy)\n", "websocket (no proxy)\n"}
    relay = services.relay_url.removeprefix("http://")
    named = run_wavesync(
        "tunnel-probe", relay, "--proxy", "direct", "--tunnel", "getpost", *runtime
    )
    assert (named.returncode, named.stdout) == (0, "getpost (no proxy)\n"), named.stderr
    # Debian's squid strips the Upgrade header: asked for upgrade alone, the probe fails.
    refused = run_wavesync(
        "tunnel-probe", services.http, "--proxy", services.squid.url, "--tunnel", "upgrade",
        *runtime,
    )  # fmt: skip
    assert refused.returncode == 1
    assert refused.stdout == ""
    assert refused.stderr.startswith("wavesync tunnel-probe: ")
    assert "upgrade" in refused.stderr


async def test_server_agent_and_connector_behind_squid_meet_through_the_relay(
    services: Services,
) -> None:
    # The product's own pieces, told only "tunnel: auto" and the proxy: the agent's
    # listen session and standby pool, and the client's connect request and relay
    # session, each find the method squid passes (getpost) on their own.
    proxy = ProxyConfig.from_url(services.squid.url)
    server_id = uuid.uuid4()
    agent = ServerAgent(
        system_id=services.system_id, server_id=server_id, key=services.key,
        mediator=services.mediator, relays=(services.relay_url,), tcp_listen=("127.0.0.1", 0),
        udp_host="127.0.0.1", lan=False, standby_count=2, tunnel=AUTO, mediator_http=services.http,
        proxy=proxy,
    )  # fmt: skip
    payload = os.urandom(128 * 1024)

    async def echo_accepted(accepted: AcceptedStream) -> None:
        while True:
            try:
                data = await accepted.stream.receive()
            except anyio.EndOfStream:
                return
            await accepted.stream.send(data)

    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as group:
            await group.start(agent.serve, echo_accepted)
            await agent.wait_ready()
            async with Connector(
                server_id=server_id, mediator=services.mediator,
                paths=frozenset({PathKind.RELAY}), lan=False, tunnel=AUTO,
                mediator_http=services.http, proxy=proxy,
            ) as client:  # fmt: skip
                connection = await client.connect()
                async with connection.stream:
                    echoed = await round_trip(connection.stream, payload, block=16384)
            group.cancel_scope.cancel()
    assert connection.path is PathKind.RELAY
    assert connection.target == f"relay {services.relay_url}"  # learned from the mediator
    assert echoed == payload
    assert agent.relay_agents[0].dialer.last_kind == GETPOST
