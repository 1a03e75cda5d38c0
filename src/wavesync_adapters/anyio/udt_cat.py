"""``wavesync udt send|recv``: netcat over UDT, the programs behind the CLI.

``receive_stream`` writes one connection's bytes to a file descriptor (stdout)
until the peer closes; ``send_stream`` sends a file descriptor (stdin) until its
end and closes gracefully. Both raise ``UdtCatError`` (a one-line reason) unless
every byte arrived and the connection closed cleanly: that is the exit status
contract of docs/udt.md. ``UdtCatMode``, ``UdtCatError`` and ``CatResult`` are
the runtime-neutral ones of ``wavesync_adapters._udt_cat``, shared with the asyncio
and blocking twins.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import anyio
import anyio.lowlevel
import anyio.to_thread

from wavesync_proto.addresses import format_endpoint
from wavesync_proto.udt.connection_types import CloseReason, UdtConfig

from .._udt_cat import (
    CHUNK,
    CatResult,
    DescriptorKind,
    UdtCatError,
    UdtCatMode,
    bind_address,
    finished,
)
from .udt import UdtEndpoint
from .udt_stream import UdtConnectError, UdtStream

__all__ = ["CatResult", "UdtCatError", "UdtCatMode", "receive_stream", "send_stream"]


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
                        data = await stream.receive(CHUNK)
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
                while data := await source.read(CHUNK):
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
    return UdtEndpoint.bind(bind_address(mode), config=config, gso=mode.gso)


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
    return finished(verb, total, started, stream.connection.peer_address)


class _Descriptor:
    """stdin or stdout, read or written without stalling the event loop (how each
    kind of descriptor is treated: ``DescriptorKind``)."""

    def __init__(self, fd: int, *, writing: bool) -> None:
        self.fd = fd
        self._kind = DescriptorKind(fd)
        self._polled = self._kind.polled
        self._threaded = self._kind.threaded
        self._writing = writing

    def restore(self) -> None:
        self._kind.restore()

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
