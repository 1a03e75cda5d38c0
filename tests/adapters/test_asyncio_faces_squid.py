"""The asyncio daemons' HTTP tunnel faces through a real squid (tests/squid.py).

With Debian's default rules (CONNECT to 443 only, Upgrade stripped), a server's
listen session and standby pool and a client, all anyio and all behind squid,
reach the asyncio mediator's HTTP face and relay's tunnel face with
``tunnel=AUTO``: every probe must pick getpost. With a permissive squid, every
tunnel kind (connect and the ssl+ kinds through CONNECT) reaches the asyncio
``TunnelServer``. The daemons run as in test_asyncio_faces.py; every wait is bounded.
"""

from __future__ import annotations

import os
import ssl
import uuid
from collections.abc import Iterator

import anyio
import pytest
import trustme

from tests.adapters.test_asyncio_daemons import asyncio_relay
from tests.adapters.test_asyncio_faces import GETPOST, WAIT, echo, echo_server, faced_mediator
from tests.adapters.tunnels import round_trip
from tests.squid import DEFAULT, PERMISSIVE, Squid, squid_binary, squid_proxy
from wavesync_adapters.anyio._dial import AUTO
from wavesync_adapters.anyio.connect import request_connection
from wavesync_adapters.anyio.listen import MediatorListener
from wavesync_adapters.anyio.relay_agent import RelayAgent
from wavesync_adapters.anyio.relay_client import open_relay_stream
from wavesync_adapters.anyio.tunnel import ALL_KINDS, open_tunnel
from wavesync_proto.mediator.listen import ConnectionRequestReceived
from wavesync_proto.tunnel import ProxyConfig, TunnelKind, TunnelMemory

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    backend: str = request.param
    return backend


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def squid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Squid]:
    if squid_binary() is None:
        pytest.skip("squid is not installed")
    with squid_proxy(tmp_path_factory.mktemp("asyncio-faces-squid"), DEFAULT) as running:
        yield running


async def test_a_server_and_a_client_behind_default_squid_meet_through_the_asyncio_faces(
    squid: Squid,
) -> None:
    proxy = ProxyConfig.from_url(squid.url)
    server_id = uuid.uuid4()
    payload = os.urandom(256 * 1024)
    with asyncio_relay() as relay:
        relay_url = f"http://127.0.0.1:{relay.address[1]}"
        with faced_mediator(relay_url) as mediator:
            # The mediator's service knows its own systems: the relay's must match.
            listener = MediatorListener(
                mediator.address,
                system_id=mediator.system_id,
                server_id=server_id,
                system_key=mediator.key,
                tunnel=AUTO,
                http=mediator.http,
                proxy=proxy,
            )
            agent = RelayAgent(
                relay.address, system_id=relay.system_id, server_id=server_id, key=relay.key,
                tunnel=AUTO, proxy=proxy,
            )  # fmt: skip
            with anyio.fail_after(2 * WAIT):
                async with (
                    anyio.create_task_group() as group,
                    await anyio.create_udp_socket(local_host="127.0.0.1") as server_udp,
                ):
                    await group.start(listener.run)
                    await group.start(agent.serve, echo)
                    await listener.wait_registered()
                    await agent.wait_for_idle(2)

                    async def answer_requests() -> None:
                        while True:
                            request = await listener.next_request()
                            if isinstance(request, ConnectionRequestReceived):
                                await listener.acknowledge(request.connect_session_id, server_udp)

                    group.start_soon(answer_requests)
                    memory = TunnelMemory()
                    answer = await request_connection(
                        mediator.address,
                        server_id=server_id,
                        tunnel=AUTO,
                        http=mediator.http,
                        proxy=proxy,
                        tunnel_memory=memory,
                    )
                    assert answer.response.relay_urls == (relay_url,)
                    relayed = await open_relay_stream(
                        relay.address,
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


@pytest.fixture(scope="module")
def permissive_squid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Squid]:
    if squid_binary() is None:
        pytest.skip("squid is not installed")
    with squid_proxy(tmp_path_factory.mktemp("asyncio-faces-permissive"), PERMISSIVE) as running:
        yield running


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("tunnel", ALL_KINDS, ids=str)
async def test_each_kind_through_a_permissive_squid_reaches_an_asyncio_handler(
    permissive_squid: Squid, ca: trustme.CA, tunnel: TunnelKind
) -> None:
    # connect and the ssl+ kinds arrive through squid's CONNECT: raw from the first byte.
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    proxy = ProxyConfig(host=permissive_squid.host, port=permissive_squid.port)
    # A raw stream must not start like an HTTP request (A-Z): it would be read as one.
    payload = b"\x00" + os.urandom(300_000)
    with echo_server(server_context if tunnel.tls else None) as echo:
        with anyio.fail_after(WAIT):
            stream = await open_tunnel(echo.url, tunnel, proxy=proxy, ssl_context=client_context)
            async with stream:
                # Squid's CONNECT does not pass a half-close: read back by length.
                echoed = await round_trip(stream, payload, half_close=False)
        served = echo.thread.call(lambda: dict(echo.server.served))
    assert echoed == payload
    # Through CONNECT (connect, ssl+connect) the server sees a raw stream: kind connect.
    assert served == {str(tunnel): 1}
