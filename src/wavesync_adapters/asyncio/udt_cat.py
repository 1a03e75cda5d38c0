"""``wavesync udt send|recv --adapter asyncio``: netcat over UDT on plain asyncio.

The twin of ``wavesync_adapters.anyio.udt_cat``, with the same contract (docs/udt.md):
``receive_stream`` writes one connection's bytes to a file descriptor (stdout) until
the peer closes; ``send_stream`` sends a file descriptor (stdin) until its end and
closes gracefully. Both raise ``UdtCatError`` (a one-line reason) unless every byte
arrived and the connection closed cleanly. The connection is a stream pair of
``wavesync_adapters.asyncio.udt``; stdin and stdout are waited on with the loop's
``add_reader``/``add_writer`` (uvloop works too).

This module imports nothing of anyio.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable

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
from .udt import (
    UdtConnectError,
    UdtEndpoint,
    UdtTransport,
    create_udt_endpoint,
    open_udt_connection,
    open_udt_rendezvous,
    start_udt_server,
)

__all__ = ["CatResult", "UdtCatError", "UdtCatMode", "receive_stream", "send_stream"]

StreamPair = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def receive_stream(
    mode: UdtCatMode,
    output_fd: int,
    *,
    announce: Callable[[str], None],
    config: UdtConfig | None = None,
) -> CatResult:
    """Take one connection and write its bytes to ``output_fd`` until the peer closes."""
    output = _Descriptor(output_fd)
    try:
        # Leaving the block closes the endpoint, which aborts a connection still open.
        async with await create_udt_endpoint(
            bind_address(mode), config=config, gso=mode.gso
        ) as endpoint:
            reader, writer = await _open(endpoint, mode, announce)
            transport = _transport(writer)
            started = time.monotonic()
            total = 0
            while True:
                try:
                    data = await reader.read(CHUNK)
                except ConnectionResetError as exc:  # UdtConnectionResetError: cut short
                    raise UdtCatError(f"after {total} bytes: {exc}") from None
                if not data:
                    break
                await output.write(data)
                total += len(data)
            if transport.close_reason is not CloseReason.PEER_CLOSED:
                raise UdtCatError(f"after {total} bytes: {_ended(transport)}")
            writer.close()
            await writer.wait_closed()
            return finished("received", total, started, transport.connection.peer_address)
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
    source = _Descriptor(input_fd)
    try:
        # Leaving the block early (an error, Ctrl-C) closes the endpoint, which aborts
        # the connection: the peer must not take a cut stream for a whole one.
        async with await create_udt_endpoint(
            bind_address(mode), config=config, gso=mode.gso
        ) as endpoint:
            _, writer = await _open(endpoint, mode, announce)
            transport = _transport(writer)
            started = time.monotonic()
            total = 0
            try:
                while data := await source.read(CHUNK):
                    writer.write(data)
                    await writer.drain()
                    total += len(data)
            except ConnectionResetError as exc:
                transport.abort()
                raise UdtCatError(f"after {total} bytes: {exc}") from None
            writer.close()  # graceful: every byte written is sent and acknowledged first
            # The linger running out raises here; close_reason says so below.
            with contextlib.suppress(ConnectionResetError):
                await writer.wait_closed()
            if transport.close_reason is not CloseReason.LOCAL_CLOSE:
                raise UdtCatError(f"{total} bytes sent, not all acknowledged: {_ended(transport)}")
            return finished("sent", total, started, transport.connection.peer_address)
    finally:
        source.restore()


async def _open(
    endpoint: UdtEndpoint, mode: UdtCatMode, announce: Callable[[str], None]
) -> StreamPair:
    local = format_endpoint(endpoint.local_address)
    try:
        if mode.listen is not None:
            return await _accept_one(endpoint, lambda: announce(f"listening on udp {local}"))
        if mode.connect is not None:
            return await open_udt_connection(mode.connect, endpoint=endpoint)
        assert mode.peer is not None
        announce(f"rendezvous from udp {local} with {format_endpoint(mode.peer)}")
        return await open_udt_rendezvous([mode.peer], endpoint=endpoint)
    except UdtConnectError as exc:
        raise UdtCatError(str(exc)) from None


async def _accept_one(endpoint: UdtEndpoint, listening: Callable[[], None]) -> StreamPair:
    accepted: asyncio.Future[StreamPair] = asyncio.get_running_loop().create_future()

    def take(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if accepted.done():  # one connection only, as the anyio program takes
            writer.transport.abort()
        else:
            accepted.set_result((reader, writer))

    server = await start_udt_server(take, endpoint=endpoint)
    listening()
    try:
        return await accepted
    finally:
        server.close()  # stop accepting; the endpoint stays ours


def _transport(writer: asyncio.StreamWriter) -> UdtTransport:
    transport = writer.transport
    assert isinstance(transport, UdtTransport)
    return transport


def _ended(transport: UdtTransport) -> str:
    reason = transport.close_reason
    if reason is None:
        return "not closed"
    return f"udt connection closed: {reason.name}: {transport.close_detail}"


class _Descriptor:
    """stdin or stdout, read or written without stalling the event loop (how each
    kind of descriptor is treated: ``DescriptorKind``)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._kind = DescriptorKind(fd)

    def restore(self) -> None:
        self._kind.restore()

    async def read(self, size: int) -> bytes:
        if self._kind.threaded:
            return await asyncio.to_thread(os.read, self.fd, size)
        if not self._kind.polled:
            await asyncio.sleep(0)
            return os.read(self.fd, size)
        while True:
            try:
                return os.read(self.fd, size)
            except BlockingIOError:
                await _ready(self.fd, writing=False)

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._kind.threaded:
                written = await asyncio.to_thread(os.write, self.fd, view)
            else:
                try:
                    written = os.write(self.fd, view)
                except BlockingIOError:
                    await _ready(self.fd, writing=True)
                    continue
            view = view[written:]


async def _ready(fd: int, *, writing: bool) -> None:
    """Wait until ``fd`` can be read (or written) without blocking."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    if writing:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        if writing:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)
