"""``wavesync demo``: every part in one process on loopback, every path tried in turn.

It starts a relay, a mediator that offers it, a tiny HTTP service and a server
agent forwarding to it, then fetches a page through a client ``Connector`` with
each path forced alone (LAN, direct TCP, punched UDT, relay), with a second UDT
connection through the same hole, and with ``auto``. Each row says whether the
path connected, how long connecting took and how fast a short download ran.
The settings, rows and table are ``wavesync_adapters._demo``'s, shared with the
asyncio and blocking demos.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import anyio
import anyio.abc

from wavesync_proto.addresses import Endpoint
from wavesync_proto.race import ALL_PATHS, PathKind

from .._demo import (
    AUTO,
    FETCH_SECONDS,
    HEAD_SECONDS,
    LOOPBACK,
    PAGE_BYTES,
    READY_SECONDS,
    REUSED_UDP,
    SINGLE_PATHS,
    DemoRow,
    DemoSystem,
    failed_row,
    fetched_row,
    header_line,
    intro_line,
    page_request,
    received_head,
    relay_url,
    response_head,
)
from .agent import AcceptedStream, ServerAgent
from .connector import Connector, PathRaceError
from .forward import forward_to_service
from .mediator import MediatorDaemon
from .relay import RelayDaemon

__all__ = ["DemoRow", "run_demo"]

log = logging.getLogger("wavesync.demo")


async def run_demo(
    *, page_bytes: int = PAGE_BYTES, announce: Callable[[str], None] = print
) -> list[DemoRow]:
    """Run the demo; ``announce`` gets the table line by line. Returns its rows."""
    system = DemoSystem.new()
    rows: list[DemoRow] = []
    async with anyio.create_task_group() as group:
        relay_bound = await group.start(RelayDaemon(system.relay_service()).serve, LOOPBACK, 0)
        relay = relay_url(relay_bound)
        mediator = await group.start(
            MediatorDaemon(system.mediator_service(relay)).serve, LOOPBACK, 0
        )
        page = await group.start(_serve_page, page_bytes)
        agent = ServerAgent(**system.agent_options(mediator, relay))

        async def forward(accepted: AcceptedStream) -> None:
            await forward_to_service(accepted, page)

        await group.start(agent.serve, forward)
        with anyio.fail_after(READY_SECONDS):
            await agent.wait_ready()
        announce(intro_line(mediator, relay, system.server_id, page))
        announce(header_line())

        def connector(paths: frozenset[PathKind]) -> Connector:
            return Connector(**system.connector_options(mediator, relay, paths))

        for kind in SINGLE_PATHS:
            async with connector(frozenset({kind})) as client:
                rows.append(await _fetch(client, kind.value, page_bytes, announce))
                if kind is PathKind.UDP and rows[-1].connected:
                    # A second connection through the hole the first one punched.
                    rows.append(await _fetch(client, REUSED_UDP, page_bytes, announce))
        async with connector(ALL_PATHS) as client:
            rows.append(await _fetch(client, AUTO, page_bytes, announce))
        group.cancel_scope.cancel()
    return rows


async def _fetch(
    client: Connector, label: str, page_bytes: int, announce: Callable[[str], None]
) -> DemoRow:
    try:
        connection = await client.connect()
    except PathRaceError as exc:
        row, line = failed_row(label, exc.reason)
        announce(line)
        return row
    async with connection.stream:
        started = anyio.current_time()
        await connection.stream.send(page_request())
        received = 0
        with anyio.fail_after(FETCH_SECONDS), contextlib.suppress(anyio.EndOfStream):
            while True:
                received += len(await connection.stream.receive())
        seconds = anyio.current_time() - started
    row, line = fetched_row(
        label,
        target=connection.target,
        elapsed=connection.elapsed,
        received=received,
        seconds=seconds,
        page_bytes=page_bytes,
    )
    announce(line)
    return row


async def _serve_page(
    page_bytes: int, *, task_status: anyio.abc.TaskStatus[Endpoint] = anyio.TASK_STATUS_IGNORED
) -> None:
    """The service behind the server: answers any request with ``page_bytes`` bytes."""
    answer_bytes = response_head(page_bytes) + bytes(page_bytes)
    listener = await anyio.create_tcp_listener(local_host=LOOPBACK, local_port=0)
    bound = listener.extra(anyio.abc.SocketAttribute.local_address)

    async def answer(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                await _answer(stream)

    async def _answer(stream: anyio.abc.SocketStream) -> None:
        head = b""
        with anyio.move_on_after(HEAD_SECONDS):
            while not received_head(head):
                head += await stream.receive()
        await stream.send(answer_bytes)

    async with listener:
        task_status.started((str(bound[0]), int(bound[1])))
        await listener.serve(answer)
