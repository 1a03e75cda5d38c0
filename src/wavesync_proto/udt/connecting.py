"""A UDT4 connection's connecting phase (UDT 4.11 core.cpp ``CUDT::connect``, both forms).

This module owns what a ``UdtConnection`` does while its handshake (``handshake.py``)
runs: it builds the handshake of a regular connect or of a rendezvous toward several
candidates, feeds it the peer's datagrams (any packet of the connection proves the peer
connected), keeps the peer's early datagrams and the application's early bytes, and
hands all of it over once established, with what the handshake still has to send. A
rendezvous handshake outlives that: it answers the peer's late requests (-2). It does
not know the connection's states and events, the data-transfer phase (``transfer.py``),
sockets or clocks. docs/protocol.md §4.6 and §4.8 describe the behaviour.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from ..addresses import Endpoint
from .connection_types import UdtConfig, UdtConnectionCounters
from .handshake import HandshakeEstablished, HandshakeFailed, HandshakeRole, UdtHandshake
from .packet_types import ControlType, KeepAlive, SocketType
from .packets import encode_packet

__all__ = [
    "HOLD_LIMIT",
    "ConnectingHandover",
    "UdtConnecting",
    "start_handshake",
]

#: Datagrams kept while the handshake is still finishing (a peer that completed
#: first and started sending); replayed once established, in order.
HOLD_LIMIT = 64

_HEADER = struct.Struct("!IIII")
_HANDSHAKE_WORD = 0x80000000 | ControlType.HANDSHAKE << 16

#: A datagram and where it came from (or goes to).
Datagram = tuple[bytes, Endpoint]


def start_handshake(
    role: HandshakeRole,
    candidates: Sequence[Endpoint],
    *,
    socket_id: int,
    isn: int,
    now: float,
    config: UdtConfig,
) -> UdtHandshake:
    """The handshake of a regular connect (CALLER, one candidate) or of a rendezvous."""
    return UdtHandshake(
        role=role,
        candidates=candidates,
        socket_id=socket_id,
        isn=isn,
        now=now,
        mss=config.mss,
        flow_window=config.flow_window,
        socket_type=config.socket_type,
        timeout=config.connect_timeout,
    )


@dataclass(frozen=True, kw_only=True)
class ConnectingHandover:
    """What the connecting phase hands the established connection, to take in this order."""

    established: HandshakeEstablished
    #: The rendezvous handshake, kept to answer the peer's late requests (a caller
    #: never answers them: None).
    handshake: UdtHandshake | None = None
    #: A rendezvous connection's -2, sent at once and before any data.
    answer: Datagram | None = None
    #: The caller's last handshake datagrams: sent after anything the connection queues.
    trailing: tuple[Datagram, ...] = ()
    #: Bytes ``send()`` took while connecting, each with its message deadline and its
    #: in-order bit (DGRAM; False for STREAM, whose packets carry 0).
    early: tuple[tuple[bytes, float | None, bool], ...] = ()
    #: The peer's datagrams that came before the handshake finished, in arrival order.
    held: tuple[Datagram, ...] = ()
    #: The datagram whose arrival proved the peer connected: taken after ``held``,
    #: unless one of those closed the connection.
    proof: Datagram | None = None


class UdtConnecting:
    """One connection's handshake, and what arrives or is sent before it finishes.

    ``receive_datagram`` and ``handle_timer`` answer with the handshake's outcome: a
    ``ConnectingHandover`` once established (the phase's buffers move into it; the
    phase is then done), a ``HandshakeFailed``, or None while it goes on.
    """

    def __init__(
        self,
        handshake: UdtHandshake,
        *,
        socket_id: int,
        config: UdtConfig,
        counters: UdtConnectionCounters,
    ) -> None:
        self._handshake = handshake
        self._socket_id = socket_id
        self._counters = counters
        self._send_buffer_bytes = config.send_buffer_bytes
        self._message_mode = config.socket_type is SocketType.DGRAM
        self._held: list[Datagram] = []
        self._early: list[tuple[bytes, float | None, bool]] = []
        self._early_bytes = 0
        # A keep-alive addressed to us: what we show the handshake when the peer's
        # traffic proves it is connected (4.11 accepts data/keep-alive as that proof).
        self._proof = encode_packet(KeepAlive(destination_socket_id=socket_id))

    @property
    def handshake(self) -> UdtHandshake:
        return self._handshake

    @property
    def send_space(self) -> int:
        """Bytes ``send()`` would accept now."""
        return max(self._send_buffer_bytes - self._early_bytes, 0)

    @property
    def buffered_bytes(self) -> int:
        """Bytes ``send()`` took, waiting for the handover."""
        return self._early_bytes

    def send(
        self, data: bytes | bytearray | memoryview, deadline: float | None, in_order: bool
    ) -> int:
        """Keep up to ``send_space`` bytes of ``data`` (DGRAM: all or nothing) until established."""
        size = len(data)
        space = self._send_buffer_bytes - self._early_bytes
        if size == 0 or space <= 0 or (self._message_mode and size > space):
            return 0
        size = min(size, space)
        self._early.append((bytes(data[:size]), deadline, in_order))
        self._early_bytes += size
        return size

    def get_timer(self) -> float | None:
        return self._handshake.get_timer()

    def handle_timer(self, now: float) -> ConnectingHandover | HandshakeFailed | None:
        self._handshake.handle_timer(now)
        return self._outcome(now, None)

    def receive_datagram(
        self, data: bytes, addr: Endpoint, now: float
    ) -> ConnectingHandover | HandshakeFailed | None:
        """Take one datagram from ``addr``. Never raises on what the peer sends."""
        handshake = self._handshake
        if len(data) < 16:
            self._counters.malformed += 1
            return None
        word0, _, _, destination = _HEADER.unpack_from(data)
        if word0 & 0xFFFF0000 == _HANDSHAKE_WORD:
            handshake.receive_datagram(data, addr, now)
            return self._outcome(now, None)
        if destination != self._socket_id:
            self._counters.wrong_destination += 1
            return None
        # Any packet of the connection, addressed to us, proves the peer connected (4.11
        # takes data and keep-alives as proof; we take any packet). The handshake
        # checks that it comes from the peer and that the peer's handshake was seen.
        handshake.receive_datagram(self._proof, addr, now)
        outcome = self._outcome(now, (data, addr))
        if outcome is None and len(self._held) < HOLD_LIMIT:
            self._held.append((data, addr))
            self._counters.held += 1
        return outcome

    def _outcome(
        self, now: float, proof: Datagram | None
    ) -> ConnectingHandover | HandshakeFailed | None:
        handshake = self._handshake
        event = handshake.next_event()
        if not isinstance(event, HandshakeEstablished):
            return event if isinstance(event, HandshakeFailed) else None
        kept: UdtHandshake | None = None
        answer: Datagram | None = None
        trailing: tuple[Datagram, ...] = ()
        if handshake.role is HandshakeRole.CALLER:
            # A caller never answers late handshakes; a rendezvous peer does (-2).
            trailing = tuple(handshake.datagrams_to_send(now))
        else:
            # 4.11's side that connects on the peer's -1 stays silent, and the peer
            # learns it is connected from the -2 that answers its next request, 250
            # ms later (§4.6.3). Sent at once, the -2 saves those 250 ms; a peer
            # already connected ignores it, so it cannot start a ping-pong.
            kept, answer = handshake, handshake.rendezvous_answer()
        handover = ConnectingHandover(
            established=event,
            handshake=kept,
            answer=answer,
            trailing=trailing,
            early=tuple(self._early),
            held=tuple(self._held),
            proof=proof,
        )
        self._early = []
        self._early_bytes = 0
        self._held = []
        return handover
