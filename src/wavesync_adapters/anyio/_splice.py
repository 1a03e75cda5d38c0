"""Copying bytes between two TCP sockets as cheaply as the platform allows, on anyio.

This module owns one thing: given two connected non-blocking sockets, move
every byte from each to the other until both directions end, passing a
half-close on. The steps that never wait (``os.splice`` through a pipe lent from
a ``PipePool`` on Linux, a buffer copy elsewhere) live in the runtime-neutral
``wavesync_adapters._splice_core``, shared with the asyncio and blocking relays;
here they are only driven with anyio's waits.
It knows nothing about the relay protocol.
"""

from __future__ import annotations

import socket

import anyio
import anyio.lowlevel

from .._splice_core import PipePool, PumpWait, SplicePump, SpliceResult

__all__ = ["PipePool", "SpliceResult", "send_all", "splice_sockets"]


async def send_all(sock: socket.socket, data: bytes | memoryview) -> None:
    """Write all of ``data`` to a non-blocking socket, waiting whenever it is full."""
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except BlockingIOError:
            await anyio.wait_writable(sock)
            continue
        view = view[sent:]


async def splice_sockets(
    client: socket.socket,
    server: socket.socket,
    *,
    to_client: bytes,
    to_server: bytes,
    pipes: PipePool | None,
) -> SpliceResult:
    """Write the pending bytes, then copy both ways until both directions have ended.

    ``pipes`` lends the pipes ``os.splice`` moves bytes through; None (or a
    platform without splice) copies through a buffer instead. A direction ends at
    EOF, which is passed on as ``shutdown(SHUT_WR)``; a reset or any other socket
    error ends both at once. The caller closes the sockets.
    """
    result = SpliceResult()

    async def client_to_server() -> None:
        result.client_to_server = await _pump(
            SplicePump(client, server, first=to_server, pipes=pipes)
        )

    async def server_to_client() -> None:
        result.server_to_client = await _pump(
            SplicePump(server, client, first=to_client, pipes=pipes)
        )

    try:
        async with anyio.create_task_group() as group:
            group.start_soon(client_to_server)
            group.start_soon(server_to_client)
    except* OSError as errors:
        result.ending = f"error: {errors.exceptions[0]}"
    return result


async def _pump(pump: SplicePump) -> int:
    try:
        while True:
            wait = pump.advance()
            if wait is PumpWait.READABLE:
                await anyio.wait_readable(pump.source)
            elif wait is PumpWait.WRITABLE:
                await anyio.wait_writable(pump.sink)
            elif wait is PumpWait.YIELD:
                await anyio.lowlevel.checkpoint()
            else:
                return pump.carried
    finally:
        pump.close()
