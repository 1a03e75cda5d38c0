"""Copying bytes between two TCP sockets without waiting: the part every runtime shares.

This module owns the steps of a splice that never block: the ``PipePool`` the
pipes are lent from, one direction's ``SplicePump`` (which moves what can be
moved now and then says what it waits for), and ``SpliceResult``. How a wait is
carried out (anyio's ``wait_readable``, asyncio's ``add_reader``, a selector in a
thread) belongs to each adapter. It knows nothing about the relay protocol and
imports no runtime: only ``os``, ``fcntl`` and ``socket``.

On Linux the bytes go socket → pipe → socket with ``os.splice`` and never enter
Python (the pipe is lent only while bytes flow); elsewhere, or with no pool, a
large reusable buffer does the copy.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import os
import socket
from dataclasses import dataclass

__all__ = [
    "CHUNKS_PER_TURN",
    "HAS_SPLICE",
    "PipePool",
    "PumpWait",
    "SplicePump",
    "SpliceResult",
]

HAS_SPLICE = hasattr(os, "splice")
# One splice call moves at most this much, and each pump's pipe is resized to hold it.
# 256 KiB carries about as fast as 1 MiB on loopback; and a relay not running as root
# shares fs.pipe-user-pages-soft (64 MiB of pipes per user) among all its sessions, so
# larger pipes would leave later sessions with 8 KiB ones and a fraction of the speed.
_CHUNK = 256 * 1024
# F_SETPIPE_SZ: Linux's fcntl to resize a pipe (1031; not every Python names it).
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_COPY_BUFFER = 256 * 1024
#: A pump hands control back after this many chunks even when both sockets stay
#: ready, so one fast session cannot starve the others on the same event loop.
CHUNKS_PER_TURN = 4


@dataclass
class SpliceResult:
    """What one spliced session carried."""

    client_to_server: int = 0
    server_to_client: int = 0
    #: Why it ended, for the log: "closed" when both sides half-closed cleanly.
    ending: str = "closed"


class PipePool:
    """Pipes lent to pumps while they move bytes, so that an idle session holds none.

    A pipe per pump for a session's whole life would cost two descriptors and a
    pipe buffer per direction even while nobody speaks, and an unprivileged
    process shares 64 MiB of pipe buffers among all its pipes
    (fs.pipe-user-pages-soft). A pump takes a pipe when its source has bytes and
    gives it back, empty, when the source has none for now.

    Not thread-safe: one event loop (or one thread) owns a pool.
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


class PumpWait(enum.Enum):
    """What a pump needs before its next ``advance()``."""

    #: The source has nothing for now: call again when it is readable.
    READABLE = "readable"
    #: The sink is full: call again when it is writable.
    WRITABLE = "writable"
    #: Both may still be ready, but the pump had its turn: let others run, then call again.
    YIELD = "yield"
    #: The source ended, everything was written and the sink was shut down for writing.
    DONE = "done"


class SplicePump:
    """One direction of a splice: ``first`` bytes, then everything ``source`` sends, to ``sink``.

    ``advance()`` moves what the sockets take without waiting and returns what it
    waits for; the caller waits that way and calls it again. A socket error raises
    ``OSError`` (the caller ends the session). ``close()`` gives up the pipe (it may
    hold bytes, so it is closed, never lent again); call it whenever the pump stops,
    done or not. Both sockets must be non-blocking.
    """

    def __init__(
        self,
        source: socket.socket,
        sink: socket.socket,
        *,
        first: bytes,
        pipes: PipePool | None,
        chunks_per_turn: int = CHUNKS_PER_TURN,
    ) -> None:
        #: The sockets the caller waits on: ``source`` for READABLE, ``sink`` for WRITABLE.
        self.source = source
        self.sink = sink
        self._source_fd = source.fileno()
        self._sink_fd = sink.fileno()
        self._pipes = pipes if HAS_SPLICE else None
        self._chunks_per_turn = chunks_per_turn
        #: Bytes owed to the sink from Python memory: ``first``, then a copy buffer's rest.
        self._pending = memoryview(first)
        self._pipe: tuple[int, int] | None = None
        self._in_pipe = 0
        self._buffer: bytearray | None = None
        self._done = False
        #: Bytes written to the sink so far (``first`` included).
        self.carried = 0

    def advance(self) -> PumpWait:
        """Move bytes until a socket would block, the source ends, or the turn is over."""
        if self._done:
            return PumpWait.DONE
        chunks = 0
        while True:
            if self._pending and not self._write_pending():
                return PumpWait.WRITABLE
            if self._in_pipe and not self._drain_pipe():
                return PumpWait.WRITABLE
            if chunks == self._chunks_per_turn:
                return PumpWait.YIELD
            received = self._fill()
            if received is None:
                return PumpWait.READABLE
            if received == 0:
                self._finish()
                return PumpWait.DONE
            chunks += 1

    def close(self) -> None:
        if self._pipe is not None and self._pipes is not None:
            # Possibly not empty (an error or a cancel mid-chunk): never lend it out again.
            self._pipes.discard(self._pipe)
        self._pipe = None

    def _write_pending(self) -> bool:
        """Write what is owed from memory; False when the sink would block first."""
        while self._pending:
            try:
                sent = self.sink.send(self._pending)
            except BlockingIOError:
                return False
            self._pending = self._pending[sent:]
            self.carried += sent
        return True

    def _drain_pipe(self) -> bool:
        """Splice the pipe's bytes into the sink; False when the sink would block first."""
        assert self._pipe is not None
        flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
        while self._in_pipe:
            try:
                moved = os.splice(self._pipe[0], self._sink_fd, self._in_pipe, flags=flags)
            except BlockingIOError:
                return False
            self._in_pipe -= moved
            self.carried += moved
        return True

    def _fill(self) -> int | None:
        """Take one chunk from the source (into the pipe or the buffer): its size, 0 at
        the end, None when the source has nothing for now."""
        if self._pipes is None:
            return self._fill_buffer()
        if self._pipe is None:
            self._pipe = self._pipes.take()
        flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
        try:
            moved = os.splice(self._source_fd, self._pipe[1], _CHUNK, flags=flags)
        except BlockingIOError:
            moved = None
        if not moved:
            # Nothing to move (or the end): the pipe is empty, so lend it back meanwhile.
            self._pipes.give_back(self._pipe)
            self._pipe = None
            return moved
        self._in_pipe = moved
        return moved

    def _fill_buffer(self) -> int | None:
        if self._buffer is None:
            self._buffer = bytearray(_COPY_BUFFER)
        try:
            received = self.source.recv_into(self._buffer)
        except BlockingIOError:
            return None
        self._pending = memoryview(self._buffer)[:received]
        return received

    def _finish(self) -> None:
        self._done = True
        # The source said it will send no more: say the same to the sink, so a
        # request/response protocol that half-closes keeps working through the relay.
        with contextlib.suppress(OSError):
            self.sink.shutdown(socket.SHUT_WR)
