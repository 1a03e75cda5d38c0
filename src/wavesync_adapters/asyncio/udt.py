"""UDT on plain asyncio (uvloop too): endpoints, transports, and stream pairs.

``open_udt_connection``, ``open_udt_rendezvous`` and ``start_udt_server`` give
``(asyncio.StreamReader, asyncio.StreamWriter)`` pairs, built exactly as
``asyncio.open_connection`` builds them, on the ``UdtTransport``/``Protocol`` pairs
of ``UdtEndpoint`` (udt_endpoint.py) (docs/udt.md, "asyncio").

This module imports nothing of anyio.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any

from wavesync_proto.addresses import Endpoint

from .udt_endpoint import DEFAULT_LIMIT, UdtDatagramPort, UdtEndpoint, create_udt_endpoint
from .udt_transport import UdtConnectError, UdtConnectionResetError, UdtTransport

__all__ = [
    "UdtConnectError",
    "UdtConnectionResetError",
    "UdtDatagramPort",
    "UdtEndpoint",
    "UdtServer",
    "UdtTransport",
    "create_udt_endpoint",
    "open_udt_connection",
    "open_udt_rendezvous",
    "start_udt_server",
]


class UdtServer:
    """What ``start_udt_server`` returns, shaped like ``asyncio.Server``.

    ``close()`` stops accepting (connections already accepted go on); ``wait_closed()``
    waits until they have all ended, and for the endpoint if the server made its own.
    """

    def __init__(self, endpoint: UdtEndpoint, *, owns_endpoint: bool) -> None:
        self.endpoint = endpoint
        self._owns_endpoint = owns_endpoint

    @property
    def local_address(self) -> Endpoint:
        return self.endpoint.local_address

    def is_serving(self) -> bool:
        return self.endpoint.is_serving()

    def close(self) -> None:
        self.endpoint.stop_serving()
        if self._owns_endpoint:
            self.endpoint._close_when_idle = True
            if not self.endpoint.connections:
                self.endpoint.close()

    async def wait_closed(self) -> None:
        await self.endpoint.wait_accepted_closed()
        if self._owns_endpoint:
            await self.endpoint.wait_closed()

    async def serve_forever(self) -> None:
        """Serve until cancelled; then close and wait, as ``asyncio.Server.serve_forever``."""
        try:
            await asyncio.get_running_loop().create_future()
        finally:
            self.close()

    async def __aenter__(self) -> UdtServer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
        await self.wait_closed()


def _stream_pair(
    loop: asyncio.AbstractEventLoop, limit: int
) -> tuple[asyncio.StreamReader, asyncio.StreamReaderProtocol]:
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    return reader, asyncio.StreamReaderProtocol(reader, loop=loop)


async def _private_endpoint(peers: Sequence[Endpoint], **options: Any) -> UdtEndpoint:
    local = options.pop("local", None)
    if local is None:
        # A client socket, reachable only by whom it talks to first.
        any_host = "::" if ":" in peers[0][0] else "0.0.0.0"  # noqa: S104
        local = (any_host, 0)
    return await create_udt_endpoint(local, **options)


async def open_udt_connection(
    peer: Endpoint,
    *,
    endpoint: UdtEndpoint | None = None,
    limit: int = DEFAULT_LIMIT,
    **endpoint_options: Any,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A UDT connection to the listener at ``peer`` as ``asyncio.open_connection`` gives it.

    On ``endpoint`` (shared: a hole-punched socket, several connections), or on an
    endpoint of its own made with ``endpoint_options`` (``local=``, ``config=``,
    ``gso=``: those of ``create_udt_endpoint``) that closes with the connection.
    """
    reader, protocol = _stream_pair(asyncio.get_running_loop(), limit)

    def opening(on: UdtEndpoint) -> Awaitable[tuple[UdtTransport, Any]]:
        return on.create_connection(lambda: protocol, peer)

    return await _open_with(opening, reader, endpoint, [peer], endpoint_options)


async def open_udt_rendezvous(
    candidates: Sequence[Endpoint],
    *,
    endpoint: UdtEndpoint | None = None,
    limit: int = DEFAULT_LIMIT,
    **endpoint_options: Any,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A rendezvous toward every candidate address at once, as a stream pair.

    The peer does the same toward ours; both must use the local port the other names
    (``local=(host, port)``, or the ``endpoint`` on the hole-punched socket).
    """
    if not candidates:
        raise ValueError("rendezvous needs at least one candidate address")
    reader, protocol = _stream_pair(asyncio.get_running_loop(), limit)

    def opening(on: UdtEndpoint) -> Awaitable[tuple[UdtTransport, Any]]:
        return on.create_rendezvous(lambda: protocol, candidates)

    return await _open_with(opening, reader, endpoint, candidates, endpoint_options)


async def _open_with(
    opening: Callable[[UdtEndpoint], Awaitable[tuple[UdtTransport, Any]]],
    reader: asyncio.StreamReader,
    endpoint: UdtEndpoint | None,
    peers: Sequence[Endpoint],
    options: dict[str, Any],
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    own = endpoint is None
    if endpoint is None:
        endpoint = await _private_endpoint(peers, **options)
    elif options:
        raise TypeError(f"endpoint= and {', '.join(options)} do not go together")
    try:
        transport, protocol = await opening(endpoint)
    except BaseException:
        if own:
            endpoint.close()
        raise
    if own:
        # The endpoint is this connection's alone: it closes when the connection has.
        endpoint._close_when_idle = True
    loop = asyncio.get_running_loop()
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


async def start_udt_server(
    client_connected_cb: Callable[
        [asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None] | None
    ],
    local: Endpoint | None = None,
    *,
    endpoint: UdtEndpoint | None = None,
    limit: int = DEFAULT_LIMIT,
    **endpoint_options: Any,
) -> UdtServer:
    """Accept UDT connects on ``local`` (or on ``endpoint``), as ``asyncio.start_server``:
    ``client_connected_cb(reader, writer)`` runs for each (a coroutine: as a task).
    ``endpoint_options`` (``config=``, ``gso=``, ...) go to ``create_udt_endpoint``."""
    loop = asyncio.get_running_loop()
    own = endpoint is None
    if endpoint is None:
        if local is None:
            raise ValueError("give local or endpoint")
        endpoint = await create_udt_endpoint(local, **endpoint_options)
    elif local is not None or endpoint_options:
        raise TypeError("endpoint= goes alone")

    def factory() -> asyncio.StreamReaderProtocol:
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        return asyncio.StreamReaderProtocol(reader, client_connected_cb, loop=loop)

    endpoint.start_serving(factory)
    return UdtServer(endpoint, owns_endpoint=own)
