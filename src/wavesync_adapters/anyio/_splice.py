"""Copying bytes between two TCP sockets as cheaply as the platform allows, on anyio.

This module owns one thing: given two connected non-blocking sockets, move
every byte from each to the other until both directions end, passing a
half-close on. On Linux the bytes go socket → pipe → socket with ``os.splice``
and never enter Python; elsewhere a large reusable buffer does the copy.
It knows nothing about the relay protocol.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from dataclasses import dataclass

import anyio
import anyio.lowlevel

__all__ = ["SpliceResult", "send_all", "splice_sockets"]

_HAS_SPLICE = hasattr(os, "splice")
# One splice call moves at most this much, and each pump's pipe is resized to hold it.
# 256 KiB carries about as fast as 1 MiB on loopback; and a relay not running as root
# shares fs.pipe-user-pages-soft (64 MiB of pipes per user) among all its sessions, so
# larger pipes would leave later sessions with 8 KiB ones and a fraction of the speed.
_CHUNK = 256 * 1024
# F_SETPIPE_SZ: Linux's fcntl to resize a pipe (1031; not every Python names it).
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_COPY_BUFFER = 256 * 1024
# Yield to other tasks after this many chunks even when both sockets stay ready,
# so one fast session cannot starve the event loop.
_CHUNKS_PER_YIELD = 4


@dataclass
class SpliceResult:
    """What one spliced session carried."""

    client_to_server: int = 0
    server_to_client: int = 0
    #: Why it ended, for the log: "closed" when both sides half-closed cleanly.
    ending: str = "closed"


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
    client: socket.socket, server: socket.socket, *, to_client: bytes, to_server: bytes
) -> SpliceResult:
    """Write the pending bytes, then copy both ways until both directions have ended.

    A direction ends at EOF, which is passed on as ``shutdown(SHUT_WR)``; a reset
    or any other socket error ends both at once. The caller closes the sockets.
    """
    result = SpliceResult()

    async def client_to_server() -> None:
        result.client_to_server = await _pump(client, server, to_server)

    async def server_to_client() -> None:
        result.server_to_client = await _pump(server, client, to_client)

    try:
        async with anyio.create_task_group() as group:
            group.start_soon(client_to_server)
            group.start_soon(server_to_client)
    except* OSError as errors:
        result.ending = f"error: {errors.exceptions[0]}"
    return result


async def _pump(source: socket.socket, sink: socket.socket, first: bytes) -> int:
    await send_all(sink, first)
    if _HAS_SPLICE:
        carried = await _pump_spliced(source, sink)
    else:  # pragma: no cover - Linux has splice
        carried = await _pump_copied(source, sink)
    # The source said it will send no more: say the same to the sink, so a
    # request/response protocol that half-closes keeps working through the relay.
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)
    return len(first) + carried


async def _pump_spliced(source: socket.socket, sink: socket.socket) -> int:
    pipe_out, pipe_in = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        with contextlib.suppress(OSError):  # a smaller pipe only means more calls
            fcntl.fcntl(pipe_in, _F_SETPIPE_SZ, _CHUNK)
        flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
        source_fd, sink_fd = source.fileno(), sink.fileno()
        carried = chunks = 0
        while True:
            try:
                moved = os.splice(source_fd, pipe_in, _CHUNK, flags=flags)
            except BlockingIOError:
                await anyio.wait_readable(source)
                continue
            if moved == 0:
                return carried
            carried += moved
            while moved:
                try:
                    moved -= os.splice(pipe_out, sink_fd, moved, flags=flags)
                except BlockingIOError:
                    await anyio.wait_writable(sink)
            chunks += 1
            if chunks % _CHUNKS_PER_YIELD == 0:
                await anyio.lowlevel.checkpoint()
    finally:
        os.close(pipe_out)
        os.close(pipe_in)


async def _pump_copied(source: socket.socket, sink: socket.socket) -> int:  # pragma: no cover
    buffer = bytearray(_COPY_BUFFER)
    view = memoryview(buffer)
    carried = chunks = 0
    while True:
        try:
            received = source.recv_into(buffer)
        except BlockingIOError:
            await anyio.wait_readable(source)
            continue
        if received == 0:
            return carried
        carried += received
        await send_all(sink, view[:received])
        chunks += 1
        if chunks % _CHUNKS_PER_YIELD == 0:
            await anyio.lowlevel.checkpoint()
