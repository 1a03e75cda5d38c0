"""The client's relay connect on asyncio: a stream pair to a server through the relay.

The twin of ``wavesync_adapters.anyio.relay_client`` (uvloop too; no anyio import).
Thin by design: ``RelayConnect`` (the sans-I/O machine) writes the request and reads
the answer; this module opens the TCP connection, moves the bytes and the time, and
turns the result into ``(StreamReader, StreamWriter)`` or an exception.

Not a byte is lost past the handshake: the handshake runs on a protocol of its own,
and the moment the machine says "paired", inside that same ``data_received`` call,
the transport is handed to a ``StreamReaderProtocol`` whose reader already holds the
bytes that came with the 101.
"""

from __future__ import annotations

import asyncio
import ssl
import uuid
from dataclasses import dataclass
from typing import cast

from wavesync_proto.addresses import Endpoint, format_endpoint
from wavesync_proto.relay.client import (
    RelayConnect,
    RelayConnectEvent,
    RelayFailed,
    RelayPaired,
    RelayRedirected,
)
from wavesync_proto.tunnel import ProxyConfig, TunnelMemory

from ..errors import RelayConnectError
from ._dial import TunnelChoice, dialer_for

__all__ = ["DEFAULT_LIMIT", "RelayConnectError", "RelayTunnel", "open_relay_stream"]

#: asyncio's own default for a StreamReader (``asyncio.streams._DEFAULT_LIMIT``).
DEFAULT_LIMIT = 64 * 1024


@dataclass(frozen=True, kw_only=True)
class RelayTunnel:
    """A relayed stream pair to a server, and what the relay said about it."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    session_id: bytes
    server_id: uuid.UUID


async def open_relay_stream(
    relay: Endpoint,
    *,
    server_id: uuid.UUID | None = None,
    system_id: uuid.UUID | None = None,
    relay_host: str | None = None,
    timeout: float = 10.0,
    limit: int = DEFAULT_LIMIT,
    tunnel: TunnelChoice | None = None,
    proxy: ProxyConfig | None = None,
    tunnel_target: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    tunnel_memory: TunnelMemory | None = None,
) -> RelayTunnel:
    """Ask the relay at ``relay`` for ``server_id`` (or any server of ``system_id``).

    ``relay_host`` is the Host header (default ``host:port`` of ``relay``); ``limit``
    the reader's, as in ``asyncio.open_connection``. Raises ``RelayConnectError`` when
    the relay refuses, redirects, or does not answer within ``timeout`` seconds,
    ``OSError`` (``TimeoutError`` after ``timeout``) when it cannot be reached.

    ``tunnel`` carries the session in an HTTP tunnel of that kind, or the one the
    probe picks (``"auto"``, remembered in ``tunnel_memory``), to the relay's own
    port (or ``tunnel_target``), through ``proxy`` when given; None: plain TCP.
    """
    loop = asyncio.get_running_loop()
    host_header = relay_host or format_endpoint(relay)
    connect = RelayConnect(
        relay_host=host_header,
        now=loop.time(),
        server_id=server_id,
        system_id=system_id,
        timeout=timeout,
    )
    dialer = dialer_for(
        relay,
        tunnel=tunnel,
        target=tunnel_target,
        proxy=proxy,
        ssl_context=ssl_context,
        memory=tunnel_memory,
    )
    # An opening tunnel has its own budget, as on anyio.
    transport, handshake = await dialer.connect(lambda: _RelayHandshake(connect, limit), timeout)
    try:
        result = await handshake.finished(connect)
    except BaseException:
        transport.abort()
        raise
    if isinstance(result, RelayPaired):
        assert handshake.streams is not None  # set with a paired result
        reader, writer = handshake.streams
        return RelayTunnel(
            reader=reader,
            writer=writer,
            session_id=result.session_id,
            server_id=result.server_id,
        )
    transport.abort()
    if isinstance(result, RelayRedirected):
        raise RelayConnectError(
            f"the relay redirects to {result.location}", status=307, retry_after=None
        )
    raise RelayConnectError(
        f"relay {host_header}: {result.status or 'no answer'}: {result.reason}",
        status=result.status,
        retry_after=result.retry_after,
    )


class _RelayHandshake(asyncio.Protocol):
    """The connection's protocol until the relay answers; then a stream pair's."""

    def __init__(self, connect: RelayConnect, limit: int) -> None:
        self._connect = connect
        self._limit = limit
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._result: asyncio.Future[RelayConnectEvent] = self._loop.create_future()
        #: The stream pair, once paired.
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport is no asyncio.Transport subclass, but has its methods.
        self._transport = cast(asyncio.Transport, transport)
        self._transport.write(self._connect.data_to_send())

    def data_received(self, data: bytes) -> None:
        if self._result.done():
            return  # a refusal's body after its answer: the connection is going
        result = self._connect.data_received(data, self._loop.time())
        if result is not None:
            self._finish(result)

    def eof_received(self) -> bool:
        self.connection_lost(None)
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._result.done():
            result = self._connect.connection_lost()
            assert result is not None  # no result yet, so this is it
            self._finish(result)

    def _finish(self, result: RelayConnectEvent) -> None:
        if isinstance(result, RelayPaired):
            # In this very callback: the next data_received goes to the stream's protocol.
            transport = self._transport
            assert transport is not None
            reader = asyncio.StreamReader(limit=self._limit, loop=self._loop)
            if result.first_bytes:
                reader.feed_data(result.first_bytes)
            protocol = asyncio.StreamReaderProtocol(reader, loop=self._loop)
            transport.set_protocol(protocol)
            protocol.connection_made(transport)
            writer = asyncio.StreamWriter(transport, protocol, reader, self._loop)
            self.streams = (reader, writer)
        self._result.set_result(result)

    async def finished(self, connect: RelayConnect) -> RelayPaired | RelayRedirected | RelayFailed:
        """Wait for the relay's answer, running ``connect``'s timer."""
        while not self._result.done():
            try:
                async with asyncio.timeout_at(connect.get_timer()):
                    await asyncio.shield(self._result)
            except TimeoutError:
                result = connect.handle_timer(self._loop.time())
                if result is not None:
                    self._result.set_result(result)
        return self._result.result()
