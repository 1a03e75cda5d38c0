"""Port forwarding over wavesync streams on asyncio: ``wavesync server --forward`` and
``wavesync client --listen``.

The twin of ``wavesync_adapters.anyio.forward`` (uvloop too; no anyio import). The
server side pipes each accepted stream to a local TCP service; the client side listens
on a local TCP port and carries each connection to the server over a ``Connector``.
Both copy bytes with ``copy_both_ways``. Every stream is a ``(StreamReader,
StreamWriter)`` pair.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Protocol

from wavesync_proto.addresses import Endpoint, format_endpoint
from wavesync_proto.race import PathKind

from ._net import cancel_and_wait
from .connector import Connector, PathRaceError

__all__ = ["Streams", "copy_both_ways", "forward_to_service", "serve_local_port"]

log = logging.getLogger("wavesync.forward")

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]

_CHUNK = 65536
#: How long a graceful close of a stream without half-close may take (the rest of what
#: was sent is delivered meanwhile) before we stop waiting for it.
_CLOSE_SECONDS = 30.0
#: How a stream tells that its peer is gone (a UDT reset is a ConnectionResetError).
_GONE = (ConnectionError, OSError)


class AcceptedPair(Protocol):
    """What ``forward_to_service`` needs of an accepted stream: the asyncio agent's
    ``AcceptedStream`` has it."""

    @property
    def reader(self) -> asyncio.StreamReader: ...

    @property
    def writer(self) -> asyncio.StreamWriter: ...

    @property
    def path(self) -> PathKind: ...


async def copy_both_ways(first: Streams, second: Streams) -> int:
    """Copy between two stream pairs until both directions end; return the bytes copied.

    An end is passed on as a half-close (``write_eof``) where the receiving stream has
    one. A UDT stream has none (UDT4): there an end closes the UDT stream, gracefully
    (what was sent is still delivered), and the session with it, as a service that
    closes after its answer (HTTP/1.0 style) expects. A failure on either side ends
    both directions. Neither pair is closed otherwise: the caller owns both.
    """
    copied = 0
    directions: list[asyncio.Task[None]] = []

    def end_both() -> None:
        current = asyncio.current_task()
        for task in directions:
            if task is not current:
                task.cancel()

    async def one_way(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        nonlocal copied
        try:
            while data := await source.read(_CHUNK):
                sink.write(data)
                await sink.drain()
                copied += len(data)
        except _GONE:
            end_both()  # one side broke: the session is over
            return
        if sink.can_write_eof():
            try:
                sink.write_eof()
            except _GONE:
                end_both()
            return
        # No half-close: close gracefully. close() starts it and the transport finishes
        # it on its own (the other direction's cancel cannot turn it into an abort); we
        # wait, boundedly, so the caller's next step sees the data delivered.
        sink.close()
        with contextlib.suppress(*_GONE, TimeoutError):
            await asyncio.wait_for(asyncio.shield(sink.wait_closed()), _CLOSE_SECONDS)
        end_both()

    directions.append(asyncio.create_task(one_way(first[0], second[1])))
    directions.append(asyncio.create_task(one_way(second[0], first[1])))
    try:
        results = await asyncio.gather(*directions, return_exceptions=True)
    finally:
        if not all(task.done() for task in directions):  # we were cancelled
            await cancel_and_wait(*directions)
    for result in results:
        if isinstance(result, Exception):
            raise result  # not a peer gone (those end quietly): a bug to see
    return copied


async def forward_to_service(accepted: AcceptedPair, service: Endpoint) -> None:
    """Pipe a verified stream to the local TCP ``service`` (``wavesync server --forward``)."""
    try:
        local = await asyncio.open_connection(*service)
    except OSError as exc:
        log.warning("forward to %s failed: %s", format_endpoint(service), exc)
        return
    try:
        copied = await copy_both_ways((accepted.reader, accepted.writer), local)
    finally:
        local[1].close()
    log.info(
        "%s stream forwarded to %s ended: %d bytes",
        accepted.path.value,
        format_endpoint(service),
        copied,
    )


async def serve_local_port(
    connector: Connector,
    listen: Endpoint,
    *,
    started: Callable[[Endpoint], None] | None = None,
) -> None:
    """Accept local TCP connections on ``listen`` and carry each to the server
    (``wavesync client --listen``) until cancelled; ``started`` gets the bound address.
    Cancelling it stops the listener and every connection it carries."""
    carrying: set[asyncio.Task[None]] = set()

    async def carry(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        carrying.add(task)
        try:
            await _carry(connector, (reader, writer))
        except asyncio.CancelledError:
            # Cancelled by this function on its way out (it awaits the task). Ending
            # quietly matters: asyncio.start_server's own callback would otherwise log
            # the cancellation as an error with a traceback (Python 3.11).
            pass
        finally:
            carrying.discard(task)

    server = await asyncio.start_server(carry, listen[0], listen[1])
    try:
        bound = server.sockets[0].getsockname()
        if started is not None:
            started((str(bound[0]), int(bound[1])))
        await server.serve_forever()
    finally:
        server.close()
        if carrying:
            await cancel_and_wait(*carrying)


async def _carry(connector: Connector, local: Streams) -> None:
    try:
        try:
            connection = await connector.connect()
        except PathRaceError as exc:
            log.warning("a local connection could not reach the server: %s", exc)
            return
        try:
            copied = await copy_both_ways(local, (connection.reader, connection.writer))
        finally:
            connection.writer.close()
        log.info("connection by %s ended: %d bytes", connection.target, copied)
    finally:
        local[1].close()
