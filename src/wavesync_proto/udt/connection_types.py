"""What a UDT data-transfer connection is configured with, reports and counts.

This module owns the vocabulary of ``UdtConnection`` (``connection.py``): its
configuration, its states, its events (frozen keyword-only dataclasses under one
base, as wsproto's and h2's) and its counters. It knows nothing of how the
connection works; docs/protocol.md §4.8 describes that.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, fields

from ..addresses import Endpoint
from ..errors import LocalProtocolError
from .congestion import CongestionControl
from .handshake import DEFAULT_FLOW_WINDOW, DEFAULT_MSS, MIN_MSS
from .packet_types import HEADER_LENGTH, SocketType

__all__ = [
    "UDP_IP_OVERHEAD",
    "CloseReason",
    "ConnectionClosed",
    "ConnectionEstablished",
    "ConnectionState",
    "DataReceived",
    "UdtConfig",
    "UdtConnectionCounters",
    "UdtEvent",
    "payload_size",
]

#: IPv4 + UDP headers: 4.11's MSS counts them, its payload size is MSS - 28 - 16
#: (core.cpp ``m_iPayloadSize = m_iPktSize - CPacket::m_iPktHdrSize``).
UDP_IP_OVERHEAD = 28


def payload_size(mss: int) -> int:
    """Bytes of data in a full data packet for ``mss`` (1456 for the default 1500)."""
    return mss - UDP_IP_OVERHEAD - HEADER_LENGTH


@dataclass(frozen=True, slots=True, kw_only=True)
class UdtConfig:
    """Settings of one connection; the defaults are libudt 4.11's where it has one."""

    mss: int = DEFAULT_MSS
    """Largest packet, bytes, including the IP and UDP headers; payload = mss - 28 - 16."""
    flow_window: int = DEFAULT_FLOW_WINDOW
    """Packets we announce in the handshake: how many the peer may have unacknowledged."""
    send_buffer_bytes: int = 8 * 1024 * 1024
    """``send()`` accepts no more than this many bytes unacknowledged plus unsent."""
    receive_buffer_packets: int = 8192
    """Packets the receive side holds: out-of-order ones plus delivered bytes whose
    ``DataReceived`` nobody has taken yet. An ACK's available buffer is what is free."""
    socket_type: SocketType = SocketType.STREAM
    """STREAM: a byte stream. DGRAM: every ``send()`` is one message, delivered whole."""
    idle_timeout: float = 10.0
    """Nothing heard from the peer for this long: ``ConnectionClosed(TIMEOUT)``."""
    linger: float = 180.0
    """``close()`` waits at most this long for the send buffer to be acknowledged."""
    connect_timeout: float | None = None
    """Seconds a connect or a rendezvous may take; None: 4.11's, 3 s for a regular
    connect and 30 s for a rendezvous. A server agent punching for a client that raced
    other paths shortens its rendezvous to the client's race deadline."""
    max_bandwidth: int | None = None
    """Bytes per second the sender never exceeds, UDP and IP headers included (4.11's
    ``UDT_MAXBW``, which counts whole MSS-sized packets); None: no cap. It bounds the
    pacing, whatever the congestion control allows: a user's uplink left room."""
    congestion: Callable[..., CongestionControl] | None = None
    """Called with ``initial_sequence_number``, ``max_flow_window``, ``random``, ``now``
    and ``mss``; None means ``DeliveryRateCongestion``, the loss-tolerant control
    (``UdtNativeCongestion`` is UDT 4.11's DAIMD; docs/protocol.md §4.7.4 says why the
    default is not 4.11's)."""

    def __post_init__(self) -> None:
        if not MIN_MSS <= self.mss <= 0xFFFF:
            raise LocalProtocolError(f"MSS {self.mss} is outside {MIN_MSS}..65535")
        if not 2 <= self.flow_window <= 1 << 20:
            raise LocalProtocolError(f"flow window {self.flow_window} is outside 2..2**20")
        if self.send_buffer_bytes < payload_size(self.mss):
            raise LocalProtocolError(
                f"send buffer of {self.send_buffer_bytes} bytes cannot hold one packet"
            )
        if not 2 <= self.receive_buffer_packets <= 1 << 20:
            raise LocalProtocolError(
                f"receive buffer of {self.receive_buffer_packets} packets is outside 2..2**20"
            )
        if not 0.0 < self.idle_timeout < float("inf"):
            raise LocalProtocolError(f"idle timeout {self.idle_timeout!r} is not positive")
        if not 0.0 <= self.linger < float("inf"):
            raise LocalProtocolError(f"linger {self.linger!r} is not a duration")
        if self.max_bandwidth is not None and self.max_bandwidth <= 0:
            raise LocalProtocolError(f"max bandwidth {self.max_bandwidth!r} is not positive")
        if self.connect_timeout is not None and not 0.0 < self.connect_timeout < float("inf"):
            raise LocalProtocolError(f"connect timeout {self.connect_timeout!r} is not positive")


class ConnectionState(enum.Enum):
    """Where a connection is. Only forward: CONNECTING -> CONNECTED -> CLOSING -> CLOSED."""

    #: The handshake is running; ``send()`` already buffers.
    CONNECTING = "connecting"
    #: Data flows both ways.
    CONNECTED = "connected"
    #: ``close()`` was called: no more ``send()``; waiting for the peer's ACK of everything.
    CLOSING = "closing"
    #: Over; ``ConnectionClosed`` says why.
    CLOSED = "closed"


class CloseReason(enum.Enum):
    """Why a connection ended."""

    #: ``close()``: everything sent was acknowledged, Shutdown sent.
    LOCAL_CLOSE = "local close"
    #: The peer sent Shutdown with nothing missing: every byte it sent arrived.
    PEER_CLOSED = "peer closed"
    #: The peer sent Shutdown saying it aborted (wavesync's flag), or with data
    #: still missing here: the stream is cut short.
    PEER_ABORTED = "peer aborted"
    #: Nothing heard from the peer for ``UdtConfig.idle_timeout``.
    TIMEOUT = "timeout"
    #: The handshake failed (timeout, refusal, incompatible peer).
    HANDSHAKE_FAILED = "handshake failed"
    #: ``abort()``, or ``close()`` whose linger ran out with data unacknowledged.
    ABORTED = "aborted"


@dataclass(frozen=True, slots=True, kw_only=True)
class UdtEvent:
    """Base class of everything ``UdtConnection.next_event()`` returns."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionEstablished(UdtEvent):
    """The handshake finished; data may flow (whatever ``send()`` buffered goes now)."""

    peer_address: Endpoint
    """Where the peer is: for a rendezvous, the candidate address that answered first."""
    peer_socket_id: int
    """The peer's socket id (the destination id of everything we send)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DataReceived(UdtEvent):
    """Bytes from the peer, each exactly once: in order, except a DGRAM message sent
    with ``in_order=False``, which may come ahead of earlier messages still missing
    packets (docs/protocol.md §4.8.4)."""

    data: bytes
    """Contiguous stream bytes (STREAM), or a whole message (DGRAM)."""
    message_complete: bool = False
    """DGRAM: True, ``data`` is one whole message. STREAM: always False (no boundaries)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionClosed(UdtEvent):
    """The connection is over: always the last event, exactly once."""

    reason: CloseReason
    """Why."""
    detail: str
    """What happened, for a log line."""


@dataclass(slots=True)
class UdtConnectionCounters:
    """What a connection did: for a log line, a benchmark, or a test's assertion.

    Data packets count payload bytes only. Every dropped datagram is counted once,
    under its cause.
    """

    packets_sent: int = 0
    """Data packets sent, first transmissions and retransmissions."""
    bytes_sent: int = 0
    """Payload bytes of those."""
    packets_retransmitted: int = 0
    """Data packets sent again (after a NAK or an EXP timeout)."""
    packets_received: int = 0
    """Data packets that arrived and were new."""
    bytes_received: int = 0
    """Payload bytes of those."""
    packets_duplicate: int = 0
    """Data packets that had arrived before."""
    packets_out_of_window: int = 0
    """Data packets beyond the receive buffer (or from before the window), dropped."""
    packets_lost: int = 0
    """Sequence numbers the receive side found missing (gaps)."""
    losses_reported: int = 0
    """Sequence numbers the peer's NAKs (or our EXP timeouts) put in the send loss list."""
    acks_sent: int = 0
    """Full ACKs (16 or 24 bytes) sent."""
    light_acks_sent: int = 0
    """Light ACKs (4 bytes) sent."""
    acks_received: int = 0
    """ACKs of any form received and accepted."""
    ack2s_sent: int = 0
    ack2s_received: int = 0
    naks_sent: int = 0
    naks_received: int = 0
    timeouts: int = 0
    """EXP expirations with unacknowledged data (everything unacknowledged resent)."""
    tail_probes: int = 0
    """Last packets resent because nothing answered them (a tail loss probe)."""
    keepalives_sent: int = 0
    drop_requests_sent: int = 0
    """Messages given up on (their time-to-live ran out): the peer was told to skip them."""
    drop_requests_received: int = 0
    packets_discarded: int = 0
    """DGRAM packets of messages that could not be delivered whole (dropped by the
    sender, or broken by the peer), thrown away."""
    malformed: int = 0
    """Datagrams that are not UDT packets (or not well-formed ones)."""
    wrong_source: int = 0
    """From an address other than the peer's."""
    wrong_destination: int = 0
    """Addressed to another socket id."""
    invalid: int = 0
    """Well-formed packets that make no sense here (an ACK of data never sent, a NAK
    outside what is in flight, an ACK2 for an unknown ACK...), ignored."""
    held: int = 0
    """Packets that came before the handshake finished and were kept for after."""

    def as_dict(self) -> dict[str, int]:
        """Every counter by name (for a log line)."""
        return {field.name: getattr(self, field.name) for field in fields(self)}
