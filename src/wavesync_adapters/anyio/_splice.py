"""Copying bytes between two TCP sockets as cheaply as the platform allows, on anyio.

This module owns one thing: given two connected non-blocking sockets, move
every byte from each to the other until both directions end, passing a
half-close on. On Linux the bytes go socket → pipe → socket with ``os.splice``
and never enter Python (the pipes are lent from a ``PipePool`` only while bytes
flow); elsewhere a large reusable buffer does the copy.
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

__all__ = ["PipePool", "SpliceResult", "send_all", "splice_sockets"]

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


class PipePool:
    """Pipes lent to pumps while they move bytes, so that an idle session holds none.

    A pipe per pump for a session's whole life would cost two descriptors and a
    pipe buffer per direction even while nobody speaks, and an unprivileged
    process shares 64 MiB of pipe buffers among all its pipes
    (fs.pipe-user-pages-soft). A pump takes a pipe when its source has bytes and
    gives it back, empty, when the source has none for now.
    """

    def __init__(self, *, max_idle: int = 64) -> None:
        self._idle: list[tuple[int, int]] = []
        self._max_idle = max_idle
        #: Pipes in existence (lent out or idle), for tests and logs.
        self.open_pipes = 0

    def take(self) -> tuple[int, int]:
        """An empty non-blocking pipe: ``(read end, write end)``."""
        if self._idle:
            return self._idle.pop()
        pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # a smaller pipe only means more calls
            fcntl.fcntl(pipe[1], _F_SETPIPE_SZ, _CHUNK)
        self.open_pipes += 1
        return pipe

    def give_back(self, pipe: tuple[int, int]) -> None:
        """Return an *empty* pipe taken from this pool."""
        if len(self._idle) < self._max_idle:
            self._idle.append(pipe)
        else:
            self.discard(pipe)

    def discard(self, pipe: tuple[int, int]) -> None:
        """Close a pipe taken from this pool (one that may hold bytes)."""
        os.close(pipe[0])
        os.close(pipe[1])
        self.open_pipes -= 1

    def close(self) -> None:
        while self._idle:
            self.discard(self._idle.pop())


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
    if not _HAS_SPLICE:  # pragma: no cover - Linux has splice
        pipes = None
    result = SpliceResult()

    async def client_to_server() -> None:
        result.client_to_server = await _pump(client, server, to_server, pipes)

    async def server_to_client() -> None:
        result.server_to_client = await _pump(server, client, to_client, pipes)

    try:
        async with anyio.create_task_group() as group:
            group.start_soon(client_to_server)
            group.start_soon(server_to_client)
    except* OSError as errors:
        result.ending = f"error: {errors.exceptions[0]}"
    return result


async def _pump(
    source: socket.socket, sink: socket.socket, first: bytes, pipes: PipePool | None
) -> int:
    await send_all(sink, first)
    if pipes is not None:
        carried = await _pump_spliced(source, sink, pipes)
    else:  # pragma: no cover - Linux has splice
        carried = await _pump_copied(source, sink)
    # The source said it will send no more: say the same to the sink, so a
    # request/response protocol that half-closes keeps working through the relay.
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)
    return len(first) + carried


async def _pump_spliced(source: socket.socket, sink: socket.socket, pipes: PipePool) -> int:
    flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
    source_fd, sink_fd = source.fileno(), sink.fileno()
    carried = chunks = 0
    pipe: tuple[int, int] | None = None
    try:
        while True:
            if pipe is None:
                pipe = pipes.take()
            try:
                moved = os.splice(source_fd, pipe[1], _CHUNK, flags=flags)
            except BlockingIOError:
                # Nothing to move: the pipe is empty, so lend it back while we wait.
                pipes.give_back(pipe)
                pipe = None
                await anyio.wait_readable(source)
                continue
            if moved == 0:
                pipes.give_back(pipe)  # end of file: the pipe is empty
                pipe = None
                return carried
            carried += moved
            while moved:
                try:
                    moved -= os.splice(pipe[0], sink_fd, moved, flags=flags)
                except BlockingIOError:
                    await anyio.wait_writable(sink)
            chunks += 1
            if chunks % _CHUNKS_PER_YIELD == 0:
                await anyio.lowlevel.checkpoint()
    finally:
        if pipe is not None:
            # Possibly not empty (an error or a cancel mid-chunk): never lend it out again.
            pipes.discard(pipe)


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
