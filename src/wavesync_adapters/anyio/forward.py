"""Port forwarding over wavesync streams: what ``wavesync server`` and ``client`` run.

The server side pipes each accepted stream to a local TCP service; the client side
listens on a local TCP port and carries each connection to the server over a
``Connector``. Both copy bytes with ``copy_both_ways``.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import anyio
import anyio.abc

from wavesync_proto.addresses import Endpoint, format_endpoint

from .agent import AcceptedStream
from .connector import Connector, PathRaceError

__all__ = ["copy_both_ways", "forward_to_service", "serve_local_port"]

log = logging.getLogger("wavesync.forward")

_CHUNK = 65536
#: How long a graceful close of a stream without half-close may take (the rest of what
#: was sent is delivered meanwhile) before it is aborted.
_CLOSE_SECONDS = 30.0
_GONE = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


async def copy_both_ways(first: anyio.abc.ByteStream, second: anyio.abc.ByteStream) -> int:
    """Copy between two streams until both directions end; return the bytes copied.

    An end is passed on as a half-close where the receiving stream has one. A UDT
    stream has none (UDT4): there an end closes the UDT stream, gracefully (what was
    sent is still delivered), and the session with it, as a service that closes after
    its answer (HTTP/1.0 style) expects. A failure on either side closes both.
    """
    copied = 0

    async def one_way(
        source: anyio.abc.ByteStream, sink: anyio.abc.ByteStream, group: anyio.abc.TaskGroup
    ) -> None:
        nonlocal copied
        try:
            while True:
                data = await source.receive(_CHUNK)
                await sink.send(data)
                copied += len(data)
        except anyio.EndOfStream:
            try:
                await sink.send_eof()
            except NotImplementedError:
                # Shielded: the other direction sees the close and cancels the group,
                # which must not turn this graceful close into an abort.
                with anyio.move_on_after(_CLOSE_SECONDS, shield=True):
                    with contextlib.suppress(*_GONE):
                        await sink.aclose()
                group.cancel_scope.cancel()
            except _GONE:
                group.cancel_scope.cancel()
        except _GONE:
            group.cancel_scope.cancel()  # one side broke: the session is over

    async with anyio.create_task_group() as group:
        group.start_soon(one_way, first, second, group)
        group.start_soon(one_way, second, first, group)
    return copied


async def forward_to_service(accepted: AcceptedStream, service: Endpoint) -> None:
    """Pipe a verified stream to the local TCP ``service`` (``wavesync server --forward``)."""
    try:
        local = await anyio.connect_tcp(*service)
    except OSError as exc:
        log.warning("forward to %s failed: %s", format_endpoint(service), exc)
        return
    async with local:
        copied = await copy_both_ways(accepted.stream, local)
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
    task_status: anyio.abc.TaskStatus[Endpoint] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Accept local TCP connections on ``listen`` and carry each to the server
    (``wavesync client --listen``); ``task_status`` gets the bound address."""
    listener = await anyio.create_tcp_listener(local_host=listen[0], local_port=listen[1])
    async with listener, anyio.create_task_group() as group:
        bound = listener.extra(anyio.abc.SocketAttribute.local_address)
        task_status.started((str(bound[0]), int(bound[1])))
        await listener.serve(functools.partial(_carry, connector), group)


async def _carry(connector: Connector, local: anyio.abc.SocketStream) -> None:
    async with local:
        try:
            connection = await connector.connect()
        except PathRaceError as exc:
            log.warning("a local connection could not reach the server: %s", exc)
            return
        async with connection.stream:
            copied = await copy_both_ways(local, connection.stream)
        log.info("connection by %s ended: %d bytes", connection.target, copied)
