"""What ``wavesync udt send|recv`` means on every runtime: the mode, the error, the result.

Runtime-neutral (no event loop, no threads): each adapter's ``udt_cat`` module
(anyio, asyncio, blocking) moves the bytes; the choices they must make alike live
here, so the three programs accept the same arguments, bind the same address and
report the same lines.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from dataclasses import dataclass

from wavesync_proto.addresses import Endpoint

__all__ = [
    "CHUNK",
    "CatResult",
    "DescriptorKind",
    "UdtCatError",
    "UdtCatMode",
    "bind_address",
    "finished",
]

log = logging.getLogger("wavesync.udt")

#: Bytes per read of stdin and per receive: large, so that a pipe's or a file's
#: system calls cost little next to the data.
CHUNK = 1 << 20


class UdtCatError(Exception):
    """The transfer did not complete: the message is the one-line reason."""


@dataclass(frozen=True, kw_only=True)
class UdtCatMode:
    """How to get the connection: listen on ``listen``, connect to ``connect``, or
    rendezvous from ``local`` with ``peer`` (exactly one of the three)."""

    listen: Endpoint | None = None
    connect: Endpoint | None = None
    local: Endpoint | None = None
    peer: Endpoint | None = None
    #: Send runs of equal datagrams as one ``sendmsg`` with ``UDP_SEGMENT`` (Linux GSO).
    gso: bool = False


@dataclass(frozen=True, kw_only=True)
class CatResult:
    """What was carried: bytes, seconds from the connection to the clean close, peer."""

    transferred: int
    seconds: float
    peer: Endpoint | None


def bind_address(mode: UdtCatMode) -> Endpoint:
    """The UDP address to bind: the listen or rendezvous one; for a plain connect any
    port, of the peer's family."""
    local = mode.listen or mode.local
    if local is not None:
        return local
    assert mode.connect is not None
    return ("::", 0) if ":" in mode.connect[0] else ("0.0.0.0", 0)  # noqa: S104


def finished(verb: str, total: int, started: float, peer: Endpoint | None) -> CatResult:
    """The result of a clean transfer, logged alike by every runtime."""
    seconds = time.monotonic() - started
    log.info(
        "%s %d bytes in %.3f s (%.1f MB/s)", verb, total, seconds, total / max(seconds, 1e-9) / 1e6
    )
    return CatResult(transferred=total, seconds=seconds, peer=peer)


class DescriptorKind:
    """How an event loop must treat stdin or stdout.

    A pipe or socket is ``polled``: switched to non-blocking and waited on (``restore``
    puts the flag back at the end: the file description may be shared); a regular
    file or /dev/null never blocks for long and is used directly; anything else (a
    terminal) is ``threaded``: read or written in a worker thread.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        mode = os.fstat(fd).st_mode
        self.polled = stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)
        self.threaded = not self.polled and os.isatty(fd)
        self._was_blocking = os.get_blocking(fd)
        if self.polled:
            os.set_blocking(fd, False)

    def restore(self) -> None:
        if self.polled:
            os.set_blocking(self.fd, self._was_blocking)
