"""A UDT4 connection's Shutdown: what it sends as it closes, and what the peer's means.

This module owns the Shutdown side of closing (UDT 4.11 core.cpp ``close``/``processCtrl``
case 5): how many copies go out, what a closed connection answers a peer that missed
them, and which close reason a received Shutdown gives. It does not know the
connection's states, transitions or linger (``connection.py``'s), sockets or clocks.
docs/protocol.md §4.8.7 describes the behaviour.
"""

from __future__ import annotations

import struct

from ..addresses import Endpoint
from .connection_types import CloseReason
from .packet_types import ControlType, Shutdown
from .packets import encode_packet

__all__ = [
    "SHUTDOWN_COPIES",
    "ShutdownNotice",
    "peer_shutdown_reason",
]

#: A closed connection answers its peer's packets with Shutdown at most this often.
_SHUTDOWN_REPLY_INTERVAL = 1.0
#: Copies of each Shutdown. Nothing acknowledges a Shutdown, and a program that closes
#: usually exits at once, so nobody is left to repeat it: with one copy, a single loss
#: leaves the peer waiting for its idle timeout and reporting TIMEOUT after every byte
#: arrived (seen at 5 % loss). Three copies make that 1 in 8,000 at 5 % random loss;
#: a peer ignores the copies after the first (it is closed).
SHUTDOWN_COPIES = 3

_HEADER = struct.Struct("!IIII")
_SHUTDOWN_WORD = 0x80000000 | ControlType.SHUTDOWN << 16


def peer_shutdown_reason(packet: Shutdown, missing: int) -> tuple[CloseReason, str]:
    """The close reason and detail of the peer's Shutdown, with ``missing`` packets not here."""
    # UDT4's Shutdown says nothing of what was sent: a peer that closes with
    # packets still missing here (or says it aborted) cut the stream short, and
    # an application must not take the bytes it has for the whole (§4.8.7).
    if packet.aborted:
        return CloseReason.PEER_ABORTED, "the peer aborted"
    if missing:
        return CloseReason.PEER_ABORTED, f"the peer closed with {missing} packets still missing"
    return CloseReason.PEER_CLOSED, "the peer sent Shutdown"


class ShutdownNotice:
    """The Shutdowns of one connection: the copies it sends, and its repeats once closed."""

    def __init__(self, *, socket_id: int) -> None:
        self._socket_id = socket_id
        self._aborted = False  # what a repeated Shutdown must say again
        self._last_reply = float("-inf")

    def copies(
        self, peer: Endpoint, peer_socket_id: int, *, aborted: bool
    ) -> list[tuple[bytes, Endpoint]]:
        """The Shutdown datagrams to send to ``peer`` (``SHUTDOWN_COPIES`` of them)."""
        self._aborted = aborted
        packet = encode_packet(Shutdown(destination_socket_id=peer_socket_id, aborted=aborted))
        return [(packet, peer)] * SHUTDOWN_COPIES

    def reply(
        self, data: bytes, addr: Endpoint, now: float, peer: Endpoint | None, peer_socket_id: int
    ) -> list[tuple[bytes, Endpoint]]:
        """What a closed connection answers ``data``: a peer still talking missed its Shutdown.

        Say it again, at most once per ``_SHUTDOWN_REPLY_INTERVAL``, to a packet from the
        peer addressed to us that is not itself a Shutdown.
        """
        if addr != peer or len(data) < 16 or now - self._last_reply < _SHUTDOWN_REPLY_INTERVAL:
            return []
        word0, _, _, destination = _HEADER.unpack_from(data)
        if destination != self._socket_id or word0 & 0xFFFF0000 == _SHUTDOWN_WORD:
            return []
        self._last_reply = now
        return self.copies(addr, peer_socket_id, aborted=self._aborted)
