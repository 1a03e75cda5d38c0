"""The client's relay connect on anyio: a stream to a server through the relay.

Thin by design: ``RelayConnect`` (the sans-I/O machine) writes the request and
reads the answer; this module opens the TCP connection, moves the bytes and
the time, and turns the result into a stream or an exception.
"""

from __future__ import annotations

import ssl
import uuid
from dataclasses import dataclass

import anyio
import anyio.abc

from wavesync_proto.addresses import Endpoint, format_endpoint
from wavesync_proto.relay.client import RelayConnect, RelayFailed, RelayPaired, RelayRedirected
from wavesync_proto.tunnel import ProxyConfig, TunnelMemory

from ..errors import RelayConnectError
from ._dial import TunnelChoice, dialer_for
from ._streams import PrefixedStream

__all__ = ["RelayConnectError", "RelayTunnel", "open_relay_stream"]

_RECEIVE_BYTES = 65536


@dataclass(frozen=True, kw_only=True)
class RelayTunnel:
    """A relayed stream to a server, and what the relay said about it."""

    stream: anyio.abc.ByteStream
    session_id: bytes
    server_id: uuid.UUID


async def open_relay_stream(
    relay: Endpoint,
    *,
    server_id: uuid.UUID | None = None,
    system_id: uuid.UUID | None = None,
    relay_host: str | None = None,
    timeout: float = 10.0,
    tunnel: TunnelChoice | None = None,
    proxy: ProxyConfig | None = None,
    tunnel_target: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    tunnel_memory: TunnelMemory | None = None,
) -> RelayTunnel:
    """Ask the relay at ``relay`` for ``server_id`` (or any server of ``system_id``).

    ``relay_host`` is the Host header (default ``host:port`` of ``relay``). Raises
    ``RelayConnectError`` when the relay refuses, redirects, or does not answer
    within ``timeout`` seconds, and ``OSError`` when it cannot be reached.

    ``tunnel`` carries the session in an HTTP tunnel of that kind, or the one the
    probe picks (``"auto"``, remembered in ``tunnel_memory``), to the relay's own
    port (or ``tunnel_target``), through ``proxy`` when given; None: plain TCP.
    """
    host_header = relay_host or format_endpoint(relay)
    connect = RelayConnect(
        relay_host=host_header,
        now=anyio.current_time(),
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
    stream = await dialer.open(timeout)  # an opening tunnel has its own budget
    try:
        result = await _handshake(stream, connect)
    except BaseException:
        await anyio.aclose_forcefully(stream)
        raise
    if isinstance(result, RelayPaired):
        return RelayTunnel(
            stream=PrefixedStream(stream, result.first_bytes),
            session_id=result.session_id,
            server_id=result.server_id,
        )
    await anyio.aclose_forcefully(stream)
    if isinstance(result, RelayRedirected):
        raise RelayConnectError(
            f"the relay redirects to {result.location}", status=307, retry_after=None
        )
    raise RelayConnectError(
        f"relay {host_header}: {result.status or 'no answer'}: {result.reason}",
        status=result.status,
        retry_after=result.retry_after,
    )


async def _handshake(
    stream: anyio.abc.ByteStream, connect: RelayConnect
) -> RelayPaired | RelayRedirected | RelayFailed:
    await stream.send(connect.data_to_send())
    while True:
        deadline = connect.get_timer()
        assert deadline is not None  # pending until a result, which returns
        with anyio.move_on_after(max(0.0, deadline - anyio.current_time())):
            try:
                data = await stream.receive(_RECEIVE_BYTES)
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                result = connect.connection_lost()
                assert result is not None
                return result
            result = connect.data_received(data, anyio.current_time())
            if result is not None:
                return result
            continue
        result = connect.handle_timer(anyio.current_time())
        if result is not None:
            return result
