"""Small blocking helpers the adapter's programs share: name resolution, STUN transactions.

Plain ``socket`` and ``time.monotonic``: the twin of ``anyio/_net.py``. Every wait has
a timeout; ``ClientTransaction`` decides when to send and when to give up.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import time
from typing import Any, Protocol

from wavesync_proto.addresses import Endpoint
from wavesync_proto.stun.errors import StunDecodeError
from wavesync_proto.stun.message import decode_message
from wavesync_proto.stun.transaction import (
    ClientTransaction,
    ResponseReceived,
    TransactionTimedOut,
)

__all__ = ["DatagramPort", "SocketDatagramPort", "resolve", "run_transaction"]

# A STUN answer is small; a larger datagram is not one, and a truncated read of it
# fails to decode like any other garbage.
_RECEIVE_BYTES = 65536


class DatagramPort(Protocol):
    """What a STUN exchange needs of a UDP socket: a ``SocketDatagramPort``, or a
    blocking ``UdtEndpoint``'s ``datagram_port()`` (the punching socket, shared with UDT).

    ``receive`` raises ``TimeoutError`` when nothing came within ``timeout`` seconds.
    """

    def send(self, item: tuple[bytes, tuple[str, int]], /) -> None: ...

    def receive(self, timeout: float | None) -> tuple[bytes, tuple[Any, ...]]: ...


class SocketDatagramPort:
    """A plain UDP socket as a ``DatagramPort`` (its blocking mode is left as it was)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send(self, item: tuple[bytes, tuple[str, int]], /) -> None:
        data, destination = item
        self.sock.sendto(data, destination)

    def receive(self, timeout: float | None) -> tuple[bytes, tuple[Any, ...]]:
        previous = self.sock.gettimeout()
        self.sock.settimeout(timeout)
        try:
            data, source = self.sock.recvfrom(_RECEIVE_BYTES)
        finally:
            self.sock.settimeout(previous)
        return data, source


def run_transaction(
    transaction: ClientTransaction, port: DatagramPort, destination: Endpoint
) -> ResponseReceived | TransactionTimedOut:
    """Send a STUN request from ``port`` to ``destination`` on the transaction's RFC 8489
    schedule until it is answered or gives up. Datagrams from anyone else, and what is
    not STUN, are dropped: call it while the port carries nothing else of yours. Bounded
    by the schedule (by default 39.5 s; the connection_ack's and report's are shorter)."""
    while True:
        for data in transaction.messages_to_send(time.monotonic()):
            port.send((data, destination))
        timer = transaction.get_timer()
        delay = None if timer is None else max(0.0, timer - time.monotonic())
        try:
            data, source = port.receive(delay)
        except (TimeoutError, ConnectionRefusedError, ConnectionResetError):
            # Silence, or an ICMP error for an earlier send: the schedule goes on.
            pass
        else:
            if (str(source[0]), int(source[1])) == destination:
                with contextlib.suppress(StunDecodeError):  # not STUN: not our answer
                    transaction.receive_response(decode_message(data), time.monotonic())
        transaction.handle_timer(time.monotonic())
        event = transaction.next_event()
        if isinstance(event, ResponseReceived | TransactionTimedOut):
            return event


def resolve(endpoint: Endpoint) -> Endpoint:
    """``endpoint`` with its host turned into an address (the first the resolver gives).

    Done once per program: a datagram's source is compared with this address, and a
    hostname in every ``sendto`` would mean a lookup per packet. The lookup itself
    blocks for as long as the system resolver takes (its own timeouts bound it).
    """
    host, port = endpoint
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return (host, port)
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    if not infos:
        raise OSError(f"{host!r} resolves to no address")
    address = infos[0][4]
    return (str(address[0]), int(address[1]))
