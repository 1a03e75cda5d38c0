"""The client's relay connect on plain sockets: a connected socket to a server through the relay.

Thin by design: ``RelayConnect`` (the sans-I/O machine) writes the request and reads the
answer; this module opens the TCP connection, moves the bytes and the time, and hands the
socket itself to the caller. The answer's head is read byte-exact (peeked first, then
taken up to its blank line), so the server's first bytes stay in the socket for the
caller instead of in a buffer nobody can hand over with a ``socket.socket``.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
import uuid
from dataclasses import dataclass

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

__all__ = ["RelayConnectError", "RelayTunnel", "open_relay_stream"]

_RECEIVE_BYTES = 65536
#: Where an HTTP head ends (RFC 9112 §2.1): every byte before this is the relay's answer.
_HEAD_END = b"\r\n\r\n"


@dataclass(frozen=True, kw_only=True)
class RelayTunnel:
    """A relayed, connected socket to a server, and what the relay said about it."""

    sock: socket.socket
    session_id: bytes
    server_id: uuid.UUID


def open_relay_stream(
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
    within ``timeout`` seconds, and ``OSError`` when it cannot be reached. The
    returned socket is blocking, without a timeout, and carries the server's bytes
    from the first one on.

    ``tunnel`` carries the session in an HTTP tunnel of that kind, or the one the
    probe picks (``"auto"``, remembered in ``tunnel_memory``), to the relay's own
    port (or ``tunnel_target``), through ``proxy`` when given; None: plain TCP.
    The socket is then one end of a pair the tunnel's thread pumps (a real socket all
    the same: the answer's head is read from it byte-exact like a TCP one's).
    """
    dialer = dialer_for(
        relay,
        tunnel=tunnel,
        target=tunnel_target,
        proxy=proxy,
        ssl_context=ssl_context,
        memory=tunnel_memory,
    )
    host_header = relay_host or format_endpoint(relay)
    connect = RelayConnect(
        relay_host=host_header,
        now=time.monotonic(),
        server_id=server_id,
        system_id=system_id,
        timeout=timeout,
    )
    sock = dialer.open(timeout)  # an opening tunnel has its own budget
    try:
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        result = _handshake(sock, connect)
        if isinstance(result, RelayPaired) and result.first_bytes:
            # Cannot happen: only the head is ever taken from the socket.
            result = RelayFailed(status=101, reason="tunnel bytes were read with the answer")
    except BaseException:
        sock.close()
        raise
    if isinstance(result, RelayPaired):
        sock.settimeout(None)
        return RelayTunnel(sock=sock, session_id=result.session_id, server_id=result.server_id)
    sock.close()
    if isinstance(result, RelayRedirected):
        raise RelayConnectError(
            f"the relay redirects to {result.location}", status=307, retry_after=None
        )
    raise RelayConnectError(
        f"relay {host_header}: {result.status or 'no answer'}: {result.reason}",
        status=result.status,
        retry_after=result.retry_after,
    )


def _handshake(sock: socket.socket, connect: RelayConnect) -> RelayConnectEvent:
    sock.settimeout(max(0.0, _remaining(connect)))
    try:
        sock.sendall(connect.data_to_send())
    except OSError:
        result = connect.connection_lost()
        assert result is not None  # no answer yet, so this is the result
        return result
    tail = b""  # the last bytes taken, for a head end split across two reads
    while True:
        remaining = _remaining(connect)
        if remaining <= 0:
            timed_out = connect.handle_timer(time.monotonic())
            if timed_out is not None:
                return timed_out
            continue
        sock.settimeout(remaining)
        try:
            peeked = sock.recv(_RECEIVE_BYTES, socket.MSG_PEEK)
        except TimeoutError:
            continue  # the deadline check above decides
        except OSError:
            peeked = b""
        if not peeked:
            lost = connect.connection_lost()
            assert lost is not None
            return lost
        window = tail + peeked
        end = window.find(_HEAD_END)
        wanted = len(peeked) if end < 0 else end + len(_HEAD_END) - len(tail)
        data = _take(sock, wanted)
        tail = (tail + data)[-(len(_HEAD_END) - 1) :]
        result = connect.data_received(data, time.monotonic())
        if result is not None:
            return result


def _take(sock: socket.socket, size: int) -> bytes:
    """Exactly ``size`` bytes that a peek has shown are waiting."""
    chunks = bytearray()
    while len(chunks) < size:
        with contextlib.suppress(InterruptedError):
            data = sock.recv(size - len(chunks))
            if not data:
                break
            chunks += data
    return bytes(chunks)


def _remaining(connect: RelayConnect) -> float:
    deadline = connect.get_timer()
    assert deadline is not None  # pending until a result, which returns
    return deadline - time.monotonic()
