"""LAN discovery on the asyncio adapter, over real multicast on loopback.

The same checks as test_lan.py (the anyio adapter), on plain asyncio, plus the two
cross-adapter directions: an asyncio search finds an anyio responder and an anyio
search finds an asyncio responder (anyio runs on the same asyncio loop here; the
adapter under test never imports it). Nothing sleeps to wait: a search ends on an
answer or on its own timeout, and every test is bounded by ``asyncio.timeout``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest

try:
    import uvloop  # noqa: F401 - only whether it is there
except ImportError:
    HAVE_UVLOOP = False
else:
    HAVE_UVLOOP = True

from wavesync_adapters.anyio import lan as anyio_lan
from wavesync_adapters.asyncio.lan import LanResponder, search_lan
from wavesync_proto.addresses import Endpoint
from wavesync_proto.discovery import DiscoveryResponder, ServerFound
from wavesync_proto.errors import LocalProtocolError

pytestmark = pytest.mark.anyio
WAIT = 30.0  # seconds any one test may take before it fails
LOOPBACK = "127.0.0.1"
SYSTEM = uuid.UUID("04f5a9ea-3cb8-44b0-bb62-401b420701de")
SERVER_A = uuid.UUID("9b2f4c0e-1d7a-4e63-8a55-0c3f6b1e2d44")
SERVER_B = uuid.UUID("2c9d8e7f-6a5b-4c3d-8e2f-1a0b9c8d7e6f")
ANY_V4 = "0.0.0.0"  # noqa: S104 - an answered endpoint, never bound here


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


@pytest.fixture
def group() -> Endpoint:
    """The default group's address on a UDP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((ANY_V4, 0))
        port: int = probe.getsockname()[1]
    return ("239.255.77.77", port)


def agent(server_id: uuid.UUID, *endpoints: Endpoint) -> DiscoveryResponder:
    return DiscoveryResponder(system_id=SYSTEM, server_id=server_id, endpoints=endpoints)


@asynccontextmanager
async def responding(*responders: DiscoveryResponder, group: Endpoint) -> AsyncIterator[None]:
    """asyncio LanResponders joined on loopback for the block, cancelled after it."""
    loop = asyncio.get_running_loop()
    tasks = []
    try:
        for responder in responders:
            joined: asyncio.Future[None] = loop.create_future()
            lan = LanResponder(responder, group=group, interfaces=[LOOPBACK])
            tasks.append(asyncio.create_task(lan.run(started=joined)))
            await joined
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_search_by_server_id_finds_that_server(
    group: Endpoint, caplog: pytest.LogCaptureFixture
) -> None:
    responder = agent(SERVER_A, (LOOPBACK, 8000), ("::1", 8001))
    found: list[ServerFound] = []
    with caplog.at_level(logging.DEBUG, logger="wavesync.lan"):
        async with asyncio.timeout(WAIT), responding(responder, group=group):
            # A long timeout: the search must end on the answer, not on the clock.
            count = await search_lan(
                found.append, server_id=SERVER_A, timeout=WAIT, group=group, interface=LOOPBACK
            )
    assert count == 1
    (server,) = found
    assert (server.server_id, server.system_id) == (SERVER_A, SYSTEM)
    assert server.endpoints == ((LOOPBACK, 8000), ("::1", 8001))
    assert server.source == (LOOPBACK, group[1])
    assert responder.counters.answered >= 1
    assert any("answering a search from 127.0.0.1" in r.message for r in caplog.records)


async def test_a_search_by_system_id_finds_both_agents_on_one_group_port(
    group: Endpoint,
) -> None:
    a = agent(SERVER_A, (LOOPBACK, 8000))
    b = agent(SERVER_B, (ANY_V4, 9000))  # bound to the wildcard: the client fills in
    found: list[ServerFound] = []
    async with asyncio.timeout(WAIT), responding(a, b, group=group):
        count = await search_lan(
            found.append, system_id=SYSTEM, timeout=0.5, group=group, interface=LOOPBACK
        )
    assert count == 2
    assert {s.server_id: s.endpoints for s in found} == {
        SERVER_A: ((LOOPBACK, 8000),),
        SERVER_B: ((LOOPBACK, 9000),),
    }


async def test_a_search_for_an_unknown_server_finishes_with_nothing_found(
    group: Endpoint,
) -> None:
    responder = agent(SERVER_A, (LOOPBACK, 8000))
    found: list[ServerFound] = []
    async with asyncio.timeout(WAIT), responding(responder, group=group):
        count = await search_lan(
            found.append, server_id=SERVER_B, timeout=0.3, group=group, interface=LOOPBACK
        )
    assert (count, found) == (0, [])
    assert responder.counters.answered == 0
    assert responder.counters.not_for_us >= 1  # it heard the search, and let it be


async def test_a_search_with_nobody_listening_returns_at_its_timeout(group: Endpoint) -> None:
    found: list[ServerFound] = []
    async with asyncio.timeout(WAIT):
        count = await search_lan(
            found.append, system_id=SYSTEM, timeout=0.2, group=group, interface=LOOPBACK
        )
    assert (count, found) == (0, [])


async def test_a_cancelled_search_and_responder_stop_cleanly(group: Endpoint) -> None:
    responder = agent(SERVER_A, (LOOPBACK, 8000))
    async with asyncio.timeout(WAIT):
        async with responding(responder, group=group):
            search = asyncio.create_task(
                search_lan(
                    lambda _: None,
                    server_id=SERVER_B,
                    timeout=WAIT,
                    group=group,
                    interface=LOOPBACK,
                )
            )
            await asyncio.sleep(0)  # let it open its socket and send
            search.cancel()
            with pytest.raises(asyncio.CancelledError):
                await search
        # Both sockets are closed: the group port can be taken again without reuse options.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
            again.bind((ANY_V4, group[1]))


async def test_an_asyncio_search_finds_an_anyio_responder(group: Endpoint) -> None:
    responder = agent(SERVER_A, (LOOPBACK, 8000))
    found: list[ServerFound] = []
    async with asyncio.timeout(WAIT), anyio.create_task_group() as tasks:
        lan = anyio_lan.LanResponder(responder, group=group, interfaces=[LOOPBACK])
        await tasks.start(lan.run)
        count = await search_lan(
            found.append, server_id=SERVER_A, timeout=WAIT, group=group, interface=LOOPBACK
        )
        tasks.cancel_scope.cancel()
    assert count == 1
    assert found[0].endpoints == ((LOOPBACK, 8000),)


async def test_an_anyio_search_finds_an_asyncio_responder(group: Endpoint) -> None:
    responder = agent(SERVER_B, (LOOPBACK, 9000))
    found: list[ServerFound] = []
    async with asyncio.timeout(WAIT), responding(responder, group=group):
        count = await anyio_lan.search_lan(
            found.append, server_id=SERVER_B, timeout=WAIT, group=group, interface=LOOPBACK
        )
    assert count == 1
    assert found[0].endpoints == ((LOOPBACK, 9000),)


def test_ipv6_groups_and_empty_interface_lists_are_refused() -> None:
    with pytest.raises(LocalProtocolError, match="IPv4 multicast"):
        LanResponder(agent(SERVER_A), group=("ff02::1", 47115))
    with pytest.raises(LocalProtocolError, match="at least one interface"):
        LanResponder(agent(SERVER_A), interfaces=[])
