"""Test helpers for the tunnel adapter: an echoing tunnel server and a byte-exact round trip."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.abc

from wavesync_adapters.anyio.tunnel_server import TunnelServer
from wavesync_adapters.anyio.tunnel_stream import TunnelStream

__all__ = ["echo", "echo_server", "round_trip"]


async def echo(stream: TunnelStream) -> None:
    """Send back every byte; end our direction when the peer ends theirs."""
    while True:
        try:
            data = await stream.receive()
        except anyio.EndOfStream:
            # A raw tunnel over TLS cannot half-close: its peer closes when it has all.
            with contextlib.suppress(NotImplementedError):
                await stream.send_eof()
            return
        await stream.send(data)


@asynccontextmanager
async def echo_server(
    *, host: str = "127.0.0.1", port: int = 0, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[TunnelServer]:
    """A ``TunnelServer`` echoing every tunnel, on ``host:port`` until the block ends."""
    server = TunnelServer(echo, ssl_context=ssl_context)
    async with anyio.create_task_group() as group:
        await group.start(server.serve, host, port)
        yield server
        group.cancel_scope.cancel()


async def round_trip(
    stream: anyio.abc.ByteStream, payload: bytes, *, block: int = 65536, half_close: bool = True
) -> bytes:
    """Send ``payload`` in ``block``-byte writes, then our end (``half_close``) and read
    to the peer's; without it, read back exactly ``len(payload)`` bytes (a raw tunnel over
    TLS or through squid's CONNECT cannot pass a half-close)."""
    received = bytearray()

    async def read_all() -> None:
        while half_close or len(received) < len(payload):
            try:
                received.extend(await stream.receive())
            except anyio.EndOfStream:
                return

    async with anyio.create_task_group() as group:
        group.start_soon(read_all)
        view = memoryview(payload)
        for start in range(0, len(payload), block):
            await stream.send(bytes(view[start : start + block]))
        if half_close:
            await stream.send_eof()
    return bytes(received)
