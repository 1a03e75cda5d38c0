"""``wavesync demo --adapter asyncio``: the anyio demo's twin on one asyncio loop.

The same parts on loopback (a relay, a mediator that offers it, a tiny HTTP
service and a server agent forwarding to it), the same rows (each path alone, a
second UDT connection through the same hole, then ``auto``) and the same table:
``wavesync_adapters._demo`` holds all three. Never imports anyio or trio.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from wavesync_proto.addresses import Endpoint
from wavesync_proto.race import ALL_PATHS, PathKind

from .._demo import (
    AUTO,
    FETCH_SECONDS,
    HEAD_LIMIT,
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
from ._net import cancel_and_wait
from .agent import AcceptedStream, ServerAgent
from .connector import Connector, PathRaceError
from .forward import forward_to_service
from .mediator import MediatorDaemon
from .relay import RelayDaemon

__all__ = ["DemoRow", "run_demo"]

log = logging.getLogger("wavesync.demo")

_CHUNK = 65536


async def run_demo(
    *, page_bytes: int = PAGE_BYTES, announce: Callable[[str], None] = print
) -> list[DemoRow]:
    """Run the demo; ``announce`` gets the table line by line. Returns its rows."""
    system = DemoSystem.new()
    rows: list[DemoRow] = []
    async with contextlib.AsyncExitStack() as stack:
        relay = relay_url(
            await stack.enter_async_context(_serving(RelayDaemon(system.relay_service())))
        )
        mediator = await stack.enter_async_context(
            _serving(MediatorDaemon(system.mediator_service(relay)))
        )
        page = await stack.enter_async_context(_page_service(page_bytes))
        agent = ServerAgent(**system.agent_options(mediator, relay))

        async def forward(accepted: AcceptedStream) -> None:
            await forward_to_service(accepted, page)

        await stack.enter_async_context(agent.running(forward))
        async with asyncio.timeout(READY_SECONDS):
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
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        connection.writer.write(page_request())
        received = 0
        async with asyncio.timeout(FETCH_SECONDS):
            await connection.writer.drain()
            while chunk := await connection.reader.read(_CHUNK):
                received += len(chunk)
        seconds = loop.time() - started
    finally:
        connection.writer.close()
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


@contextlib.asynccontextmanager
async def _serving(daemon: MediatorDaemon | RelayDaemon) -> AsyncIterator[Endpoint]:
    """``daemon.serve`` on loopback in a task for the block; yields where it listens."""
    loop = asyncio.get_running_loop()
    bound: asyncio.Future[Endpoint] = loop.create_future()
    task = loop.create_task(daemon.serve(LOOPBACK, 0, started=bound.set_result))
    try:
        waits: set[asyncio.Future[Any]] = {bound, task}
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if not bound.done():
            await task  # it ended before it started: its exception says why
            raise RuntimeError("a demo daemon stopped before it started")
        yield bound.result()
    finally:
        await cancel_and_wait(task)


@contextlib.asynccontextmanager
async def _page_service(page_bytes: int) -> AsyncIterator[Endpoint]:
    """The service behind the server: answers any request with ``page_bytes`` bytes."""
    answer_bytes = response_head(page_bytes) + bytes(page_bytes)
    answering: set[asyncio.Task[None]] = set()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        answering.add(task)
        try:
            head = b""
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(HEAD_SECONDS):
                    while not received_head(head):
                        chunk = await reader.read(HEAD_LIMIT)
                        if not chunk:
                            break
                        head += chunk
            writer.write(answer_bytes)
            async with asyncio.timeout(FETCH_SECONDS):
                await writer.drain()
        except (OSError, TimeoutError, asyncio.CancelledError):
            pass  # the fetch gave up, or the demo is ending: nothing to answer
        finally:
            writer.close()
            answering.discard(task)

    server = await asyncio.start_server(answer, LOOPBACK, 0)
    try:
        bound = server.sockets[0].getsockname()
        yield (str(bound[0]), int(bound[1]))
    finally:
        server.close()
        if answering:
            await cancel_and_wait(*answering)
