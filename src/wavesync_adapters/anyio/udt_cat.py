"""``wavesync udt send|recv``: netcat over UDT, the programs behind the CLI.

``receive_stream`` writes one connection's bytes to a file descriptor (stdout)
until the peer closes; ``send_stream`` sends a file descriptor (stdin) until its
end and closes gracefully. Both raise ``UdtCatError`` (a one-line reason) unless
every byte arrived and the connection closed cleanly: that is the exit status
contract of docs/udt.md.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import anyio.lowlevel
import anyio.to_thread

from wavesync_proto.addresses import Endpoint, format_endpoint
from wavesync_proto.udt.connection_types import CloseReason, UdtConfig

from .udt import UdtEndpoint
from .udt_stream import UdtConnectError, UdtStream

__all__ = ["CatResult", "UdtCatError", "UdtCatMode", "receive_stream", "send_stream"]

log = logging.getLogger("wavesync.udt")

#: Bytes per read of stdin and per receive(): large, so that a pipe's or a file's
#: system calls cost little next to the data.
_CHUNK = 1 << 20


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


@dataclass(frozen=True, kw_only=True)
class CatResult:
    """What was carried: bytes, seconds from the connection to the clean close, peer."""

    transferred: int
    seconds: float
    peer: Endpoint | None


async def receive_stream(
    mode: UdtCatMode,
    output_fd: int,
    *,
    announce: Callable[[str], None],
    config: UdtConfig | None = None,
) -> CatResult:
    """Take one connection and write its bytes to ``output_fd`` until the peer closes."""
    output = _Descriptor(output_fd, writing=True)
    try:
        async with _bound(mode, config) as endpoint:
            stream = await _open(endpoint, mode, announce)
            async with stream:
                started = time.monotonic()
                total = 0
                while True:
                    try:
                        data = await stream.receive(_CHUNK)
                    except anyio.EndOfStream:
                        break
                    except anyio.BrokenResourceError as exc:
                        raise UdtCatError(f"after {total} bytes: {exc}") from None
                    await output.write(data)
                    total += len(data)
                return _finished("received", total, started, stream)
    finally:
        output.restore()


async def send_stream(
    mode: UdtCatMode,
    input_fd: int,
    *,
    announce: Callable[[str], None],
    config: UdtConfig | None = None,
) -> CatResult:
    """Send ``input_fd`` to its end over one connection; close and wait for every ACK."""
    source = _Descriptor(input_fd, writing=False)
    try:
        async with _bound(mode, config) as endpoint:
            stream = await _open(endpoint, mode, announce)
            started = time.monotonic()
            total = 0
            try:
                while data := await source.read(_CHUNK):
                    await stream.send(data)
                    total += len(data)
            except anyio.BrokenResourceError as exc:
                await anyio.aclose_forcefully(stream)
                raise UdtCatError(f"after {total} bytes: {exc}") from None
            await stream.aclose()
            if stream.close_reason is not CloseReason.LOCAL_CLOSE:
                reason = stream.close_reason.name if stream.close_reason else "not closed"
                raise UdtCatError(
                    f"{total} bytes sent, not all acknowledged: {reason}: {stream.close_detail}"
                )
            return _finished("sent", total, started, stream)
    finally:
        source.restore()


def _bound(mode: UdtCatMode, config: UdtConfig | None) -> UdtEndpoint:
    local = mode.listen or mode.local
    if local is None:  # a plain connect: any port, of the peer's family
        assert mode.connect is not None
        local = ("::", 0) if ":" in mode.connect[0] else ("0.0.0.0", 0)  # noqa: S104
    return UdtEndpoint.bind(local, config=config)


async def _open(
    endpoint: UdtEndpoint, mode: UdtCatMode, announce: Callable[[str], None]
) -> UdtStream:
    local = format_endpoint(endpoint.local_address)
    try:
        if mode.listen is not None:
            endpoint.listen()
            announce(f"listening on udp {local}")
            return await endpoint.accept()
        if mode.connect is not None:
            return await endpoint.connect(mode.connect)
        assert mode.peer is not None
        announce(f"rendezvous from udp {local} with {format_endpoint(mode.peer)}")
        return await endpoint.rendezvous([mode.peer])
    except UdtConnectError as exc:
        raise UdtCatError(str(exc)) from None


def _finished(verb: str, total: int, started: float, stream: UdtStream) -> CatResult:
    seconds = time.monotonic() - started
    log.info(
        "%s %d bytes in %.3f s (%.1f MB/s)", verb, total, seconds, total / max(seconds, 1e-9) / 1e6
    )
    return CatResult(transferred=total, seconds=seconds, peer=stream.connection.peer_address)


class _Descriptor:
    """stdin or stdout, read or written without stalling the event loop.

    A pipe or socket is switched to non-blocking and waited on (restored at the end:
    the file description may be shared); a regular file or /dev/null never blocks for
    long and is used directly; anything else (a terminal) goes through a thread.
    """

    def __init__(self, fd: int, *, writing: bool) -> None:
        self.fd = fd
        mode = os.fstat(fd).st_mode
        self._polled = stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)
        self._threaded = not self._polled and os.isatty(fd)
        self._was_blocking = os.get_blocking(fd)
        self._writing = writing
        if self._polled:
            os.set_blocking(fd, False)

    def restore(self) -> None:
        if self._polled:
            os.set_blocking(self.fd, self._was_blocking)

    async def read(self, size: int) -> bytes:
        if self._threaded:
            return await anyio.to_thread.run_sync(os.read, self.fd, size)
        if not self._polled:
            await anyio.lowlevel.checkpoint()
            return os.read(self.fd, size)
        while True:
            try:
                return os.read(self.fd, size)
            except BlockingIOError:
                await anyio.wait_readable(self.fd)

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._threaded:
                written = await anyio.to_thread.run_sync(os.write, self.fd, view)
            else:
                try:
                    written = os.write(self.fd, view)
                except BlockingIOError:
                    await anyio.wait_writable(self.fd)
                    continue
            view = view[written:]
