"""UDT4 packet values (UDT 4.11, draft-gg-udt-03): the typed form of every datagram.

This module owns what a UDT packet *is*: the enums of its fields and one frozen
dataclass per packet type, with the header fields every packet has. Turning
them into bytes and back is ``packets.py``'s; what they mean to a connection is
the connection's.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar

from ..errors import RemoteProtocolError

__all__ = [
    "HANDSHAKE_LENGTH",
    "HEADER_LENGTH",
    "SHUTDOWN_ABORTED",
    "UDT_VERSION",
    "Ack",
    "Ack2",
    "Boundary",
    "CongestionWarning",
    "ControlPacket",
    "ControlType",
    "DataPacket",
    "ErrorSignal",
    "Handshake",
    "KeepAlive",
    "LightAck",
    "MessageDropRequest",
    "Nak",
    "Packet",
    "RequestType",
    "Shutdown",
    "SocketType",
    "UdtDecodeError",
    "UserDefinedControl",
]

HEADER_LENGTH = 16
#: The handshake body: eight 32-bit fields and a 16-byte peer address
#: (``CHandShake::m_iContentSize``). A 4.11 listener drops any other length.
HANDSHAKE_LENGTH = 48
UDT_VERSION = 4


class UdtDecodeError(RemoteProtocolError):
    """Bytes that are not a well-formed UDT4 packet.

    There is nothing to answer a malformed datagram with, so the hint is None:
    the receiver counts it and drops it.
    """


class ControlType(enum.IntEnum):
    """Control packet types: bits 1-15 of the first header word (packet.cpp)."""

    HANDSHAKE = 0
    KEEP_ALIVE = 1
    ACK = 2
    NAK = 3
    CONGESTION_WARNING = 4
    SHUTDOWN = 5
    ACK2 = 6
    MESSAGE_DROP_REQUEST = 7
    #: UDT 4.11 only; the draft stops at 7.
    ERROR_SIGNAL = 8
    #: The real type is in the low 16 bits of the first word.
    USER_DEFINED = 0x7FFF


class Boundary(enum.IntEnum):
    """Where a data packet sits in its message: the two top bits of the second word."""

    MIDDLE = 0b00
    LAST = 0b01
    FIRST = 0b10
    SOLO = 0b11


class SocketType(enum.IntEnum):
    """The handshake's socket type as libudt 4.11 writes it (core.h ``UDTSockType``).

    draft-gg-udt-03 says STREAM is 0 and DGRAM 1; libudt, which everything
    else talks to, sends 1 and 2 (verified on the wire).
    """

    STREAM = 1
    DGRAM = 2


class RequestType(enum.IntEnum):
    """The handshake's connection/request type (core.cpp ``connect``, ``listen``)."""

    #: A client's first request; a listener answers with the same type and a cookie.
    REGULAR = 1
    #: A rendezvous peer's first request.
    RENDEZVOUS = 0
    #: A client's second request (with the cookie), a listener's acceptance, and a
    #: rendezvous peer's answer to type 0.
    RESPONSE = -1
    #: A connected rendezvous peer's answer to a repeated handshake.
    RENDEZVOUS_RESPONSE = -2
    #: A listener's refusal (version or socket type mismatch, or no resources).
    REJECTED = 1002


#: The additional info of a Shutdown that says "aborted" (ASCII "WSAB"): a value no
#: zeroed or stale 4.11 header word is likely to hold by accident.
SHUTDOWN_ABORTED = 0x57534142


# --- packet classes ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Packet:
    """Fields of the 16-byte header that every packet has."""

    #: Microseconds since the sender's connection started, modulo 2**32. libudt 4.11
    #: stamps data packets and leaves 0 in every control packet.
    timestamp: int = 0
    #: The receiver's socket id; 0 in a connection request, which has none yet.
    destination_socket_id: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class DataPacket(Packet):
    """A data packet: the first header bit is 0."""

    #: 31-bit packet sequence number.
    sequence_number: int
    #: 29-bit message number (bits 3-31 of the second word).
    message_number: int
    boundary: Boundary = Boundary.SOLO
    #: Bit 2 of the second word: deliver this message in order (set by 4.11 only for
    #: ``sendmsg(..., inorder=true)`` and ``sendfile``; 0 for ``send``).
    in_order: bool = False
    payload: bytes = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class ControlPacket(Packet):
    """Base of every control packet: the first header bit is 1."""

    CONTROL_TYPE: ClassVar[int]


@dataclass(frozen=True, slots=True, kw_only=True)
class Handshake(ControlPacket):
    """Type 0: connection setup, 48 bytes of control information (packet.h ``CHandShake``).

    Version and socket type are kept as plain ints: a connected 4.11 socket that
    answers a repeated handshake sends both as 0.
    """

    CONTROL_TYPE: ClassVar[int] = ControlType.HANDSHAKE
    version: int = UDT_VERSION
    #: ``SocketType`` value.
    socket_type: int
    #: The sender's first data sequence number (31 bits).
    initial_sequence_number: int
    #: Maximum packet size including the IP and UDP headers (libudt's MSS, 1500 by default).
    mss: int
    #: Maximum flow window, in packets.
    flow_window: int
    #: ``RequestType`` value; signed on the wire.
    request_type: int
    #: The sender's own socket id.
    socket_id: int
    #: SYN cookie: 0 in a first request, the listener's value after that.
    cookie: int = 0
    #: The 16 bytes exactly as on the wire; ``pack_peer_ip`` / ``unpack_peer_ip``.
    peer_ip: bytes = bytes(16)


@dataclass(frozen=True, slots=True, kw_only=True)
class KeepAlive(ControlPacket):
    """Type 1: "the only purpose of keep-alive packet is to tell that the peer is still alive"."""

    CONTROL_TYPE: ClassVar[int] = ControlType.KEEP_ALIVE


@dataclass(frozen=True, slots=True, kw_only=True)
class Ack(ControlPacket):
    """Type 2 with 4 or 6 words of control information: a full ACK, answered by ACK2.

    libudt 4.11 sends six words when more than one SYN interval (10 ms) has passed
    since its last six-word ACK, and four otherwise; the draft knows only six.
    """

    CONTROL_TYPE: ClassVar[int] = ControlType.ACK
    #: ACK sub-sequence number (additional info), echoed by the ACK2.
    ack_number: int
    #: Every packet before this sequence number has arrived (exclusive bound).
    sequence_number: int
    #: Round-trip time, microseconds.
    rtt: int
    #: RTT variance, microseconds.
    rtt_variance: int
    #: Free receive buffer, in packets (4.11 never sends less than 2; the draft says bytes).
    available_buffer: int
    #: Packets per second the receiver sees arrive; only in a six-word ACK.
    receive_rate: int | None = None
    #: Estimated link capacity, packets per second; only in a six-word ACK.
    link_capacity: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class LightAck(ControlPacket):
    """Type 2 with one word: 4.11's "light ACK", sent every 64 packets between full ACKs.

    It carries only the sequence number, has no ACK number and gets no ACK2.
    """

    CONTROL_TYPE: ClassVar[int] = ControlType.ACK
    sequence_number: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Nak(ControlPacket):
    """Type 3: the receiver's loss report.

    ``losses`` holds inclusive ``(first, last)`` ranges of lost sequence numbers; a
    single loss is ``(n, n)``. On the wire a range is its first number with the top
    bit set followed by its last; a single loss is one word.
    """

    CONTROL_TYPE: ClassVar[int] = ControlType.NAK
    losses: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class CongestionWarning(ControlPacket):
    """Type 4: "one way packet delay is increasing". 4.11 understands it, never sends it."""

    CONTROL_TYPE: ClassVar[int] = ControlType.CONGESTION_WARNING


@dataclass(frozen=True, slots=True, kw_only=True)
class Shutdown(ControlPacket):
    """Type 5: the sender closed the connection."""

    CONTROL_TYPE: ClassVar[int] = ControlType.SHUTDOWN
    #: wavesync's extension: the sender aborted, so data it had accepted may never
    #: arrive. Carried as ``SHUTDOWN_ABORTED`` in the additional-info word, which
    #: libudt 4.11 writes as 0 and never reads; any other value means a plain close.
    aborted: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Ack2(ControlPacket):
    """Type 6: acknowledges the full ACK with ``ack_number``, so its sender can measure RTT."""

    CONTROL_TYPE: ClassVar[int] = ControlType.ACK2
    ack_number: int


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageDropRequest(ControlPacket):
    """Type 7: the sender gave up on a message (its time-to-live ran out).

    The receiver stops waiting for ``first``..``last``. libudt 4.11 puts the bare
    29-bit message number in the additional info and reads only those 29 bits.
    """

    CONTROL_TYPE: ClassVar[int] = ControlType.MESSAGE_DROP_REQUEST
    message_number: int
    first_sequence_number: int
    last_sequence_number: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorSignal(ControlPacket):
    """Type 8 (4.11 only): the peer failed locally; 4.11 sends it when ``recvfile`` fails."""

    CONTROL_TYPE: ClassVar[int] = ControlType.ERROR_SIGNAL
    #: Additional info; 4.11 sends 4000 and its receiver does not look at it.
    error_code: int


@dataclass(frozen=True, slots=True, kw_only=True)
class UserDefinedControl(ControlPacket):
    """Type 0x7FFF: an application's own control message (4.11 ``CCC::sendCustomMsg``).

    ``body`` is kept as raw wire bytes. libudt ``htonl``-converted each whole
    32-bit word of its sender's buffer, so a libudt peer's integers arrive
    big-endian; a libudt sender with no body sends four zero bytes.
    """

    CONTROL_TYPE: ClassVar[int] = ControlType.USER_DEFINED
    #: The low 16 bits of the first word.
    subtype: int
    additional_info: int = 0
    body: bytes = b""
