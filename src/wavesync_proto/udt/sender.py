"""The sending half of a UDT connection (UDT 4.11 buffer.cpp ``CSndBuffer``, core.cpp ``packData``).

This module owns what has been given to ``send()`` and not yet acknowledged: the
packets cut from it, the sender's loss list, the flow window's arithmetic and the
pacing of data packets (retransmissions first, then new data, one every
``packet_send_period``, every 16th new packet followed at once by the next as a
probing pair). It does not own timers, RTT estimation or the congestion control's
rules (the connection's and ``congestion.py``'s), and it never reads a clock.

Sequence numbers are kept *unwrapped*: plain ints that start at the ISN and
count on past 2**31; the wire value is ``n & SEQ_MAX``. A number from the peer is
unwrapped relative to the oldest unacknowledged packet, so nothing inside has
to compare round the circle. docs/protocol.md §4.8 describes the behaviour.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Sequence

from .congestion import CongestionControl
from .loss_list import LossList
from .packet_types import Boundary
from .seqnum import MSG_MAX, SEQ_MAX

__all__ = ["MAX_BURST_TIME", "UdtSender", "unwrap"]

#: A late ``datagrams_to_send`` may catch up on at most this much missed pacing
#: (or two send periods, if those are longer): an adapter whose timer fired 50 ms
#: late sends a 2 ms burst, not 50 ms of packets back to back. 2 ms at 1456-byte
#: packets and 62,500 packets/s (91 MB/s) is 125 packets, a few socket writes.
MAX_BURST_TIME = 0.002

_DATA_HEADER = struct.Struct("!IIII")
_HALF = 1 << 30
_SPAN = 1 << 31
_FIRST = Boundary.FIRST << 30
_LAST = Boundary.LAST << 30
_SOLO = Boundary.SOLO << 30


def unwrap(wire: int, reference: int) -> int:
    """The unwrapped number nearest to ``reference`` whose wire value is ``wire``."""
    offset = (wire - reference) & SEQ_MAX
    if offset >= _HALF:
        offset -= _SPAN
    return reference + offset


class UdtSender:
    """Send buffer, sender loss list and pacing of one connection.

    ``last_ack`` is the oldest unacknowledged packet (4.11 ``m_iSndLastAck``),
    ``next_seq`` the next new one (``m_iSndCurrSeqNo + 1``); every number in
    between is in the buffer until an ACK passes it.
    """

    __slots__ = (
        "_buffered",
        "_capacity",
        "_message",
        "_payload_size",
        "_pending",
        "_unacked",
        "bytes_sent",
        "last_ack",
        "last_data_ack",
        "loss",
        "next_seq",
        "packets_retransmitted",
        "packets_sent",
        "slot",
    )

    def __init__(self, *, isn: int, payload_size: int, capacity_bytes: int) -> None:
        self.next_seq = isn
        self.last_ack = isn
        #: The last full ACK that acknowledged new data (4.11 ``m_iSndLastDataAck``):
        #: only a full ACK beyond it reaches the congestion control.
        self.last_data_ack = isn
        self.loss = LossList()
        #: The pacing clock: when the next data packet may go.
        self.slot = float("-inf")
        self.packets_sent = 0
        self.packets_retransmitted = 0
        self.bytes_sent = 0
        self._payload_size = payload_size
        self._capacity = capacity_bytes
        # Sent, unacknowledged: unwrapped sequence number -> (second header word, payload).
        self._unacked: dict[int, tuple[int, bytes]] = {}
        # Cut into packets, not sent yet: (second header word, payload).
        self._pending: deque[tuple[int, bytes]] = deque()
        self._buffered = 0
        # 4.11's message numbers start at 1 and go from MSG_MAX - 1 back to 1.
        self._message = 1

    # --- queries ---------------------------------------------------------------------------

    @property
    def buffered_bytes(self) -> int:
        """Payload bytes unacknowledged plus unsent."""
        return self._buffered

    @property
    def send_space(self) -> int:
        """Bytes ``write`` would accept now."""
        return max(self._capacity - self._buffered, 0)

    @property
    def outstanding(self) -> int:
        """Packets sent and not acknowledged."""
        return self.next_seq - self.last_ack

    @property
    def pending_packets(self) -> int:
        return len(self._pending)

    @property
    def unacked_packets(self) -> int:
        return len(self._unacked)

    def is_idle(self) -> bool:
        """Nothing unsent and nothing unacknowledged."""
        return self._buffered == 0 and self.next_seq == self.last_ack

    def wants_to_send(self, window: int) -> bool:
        """Whether a data packet could go if pacing allowed it."""
        return bool(self.loss) or (bool(self._pending) and self.next_seq - self.last_ack < window)

    # --- the application's side -----------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview, *, whole: bool) -> int:
        """Cut up to ``send_space`` bytes of ``data`` into packets; return how many were taken.

        One message number per call (4.11 ``addBuffer``): its packets are marked FIRST,
        middle and LAST, or SOLO when it fits in one. ``whole`` (message mode) takes all
        of ``data`` or nothing.
        """
        size = len(data)
        space = self._capacity - self._buffered
        if size == 0 or space <= 0:
            return 0
        if size > space:
            if whole:
                return 0
            size = space
        chunk = self._payload_size
        raw = data if type(data) is bytes else bytes(data)
        if size < len(raw):
            raw = raw[:size]
        message = self._message
        self._message = 1 if message + 1 >= MSG_MAX else message + 1
        append = self._pending.append
        if size <= chunk:
            append((_SOLO | message, raw))
        else:
            append((_FIRST | message, raw[:chunk]))
            end = size - chunk
            position = chunk
            while position < end:
                append((message, raw[position : position + chunk]))
                position += chunk
            append((_LAST | message, raw[position:]))
        self._buffered += size
        return size

    # --- the peer's side ---------------------------------------------------------------------

    def acknowledge(self, wire_seq: int) -> int:
        """The peer has everything before ``wire_seq``: free it. Return how many packets that freed.

        -1: ``wire_seq`` is beyond anything sent (a hostile or broken ACK; 4.11 breaks the
        connection, this only refuses the ACK). 0: nothing new.
        """
        seq = unwrap(wire_seq, self.last_ack)
        if seq > self.next_seq:
            return -1
        first = self.last_ack
        if seq <= first:
            return 0
        unacked = self._unacked
        freed = 0
        for number in range(first, seq):
            freed += len(unacked.pop(number)[1])
        self._buffered -= freed
        self.last_ack = seq
        self.loss.remove_below(seq)
        return seq - first

    def add_losses(self, losses: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
        """Put the NAK's ``losses`` in the loss list; return the part in flight (unwrapped).

        Ranges are clipped to what is unacknowledged: a NAK for data never sent, or
        already acknowledged, changes nothing.
        """
        low = self.last_ack
        high = self.next_seq - 1
        accepted: list[tuple[int, int]] = []
        for first, last in losses:
            start = unwrap(first, low)
            end = start + ((last - first) & SEQ_MAX)
            start = max(start, low)
            end = min(end, high)
            if start > end:
                continue
            self.loss.insert(start, end)
            accepted.append((start, end))
        return accepted

    def timeout(self) -> int:
        """EXP expired: resend everything unacknowledged, unless losses are already queued.

        Returns how many packets went into the loss list (4.11 ``checkTimers``).
        """
        if self.next_seq == self.last_ack or self.loss:
            return 0
        return self.loss.insert(self.last_ack, self.next_seq - 1)

    def clear(self) -> None:
        """Drop everything (abort)."""
        self._unacked.clear()
        self._pending.clear()
        self.loss.clear()
        self._buffered = 0
        self.last_ack = self.last_data_ack = self.next_seq

    # --- pacing --------------------------------------------------------------------------------

    def emit(
        self,
        out: list[bytes],
        *,
        now: float,
        timestamp: int,
        destination: int,
        window: int,
        congestion: CongestionControl,
    ) -> None:
        """Append to ``out`` every data packet pacing allows by ``now``.

        Lost packets go first, then new ones while fewer than ``window`` are
        outstanding. After each packet the next slot moves on by the congestion
        control's period, except after a new packet whose sequence number is a
        multiple of 16: the next one follows at once, a probing pair from which the
        receiver measures the link capacity (4.11 ``packData``).
        """
        period = congestion.packet_send_period
        slot = self.slot
        floor = now - (MAX_BURST_TIME if 2 * period < MAX_BURST_TIME else 2 * period)
        slot = max(slot, floor)
        if slot > now:
            return
        pack = _DATA_HEADER.pack
        unacked = self._unacked
        pending = self._pending
        loss = self.loss
        on_sent = congestion.on_packet_sent
        sent = 0
        retransmitted = 0
        sent_bytes = 0
        while slot <= now:
            if loss:
                seq = loss.pop_first()
                assert seq is not None
                item = unacked.get(seq)
                if item is None:  # pragma: no cover - the list holds unacknowledged numbers only
                    continue
                retransmitted += 1
                probe = False
            elif pending and self.next_seq - self.last_ack < window:
                item = pending.popleft()
                seq = self.next_seq
                self.next_seq = seq + 1
                unacked[seq] = item
                probe = not seq & 0xF
            else:
                break
            wire = seq & SEQ_MAX
            payload = item[1]
            out.append(pack(wire, item[0], timestamp, destination) + payload)
            on_sent(sequence_number=wire, now=now)
            sent += 1
            sent_bytes += len(payload)
            if not probe:
                slot += congestion.packet_send_period
        self.slot = slot
        self.packets_sent += sent
        self.packets_retransmitted += retransmitted
        self.bytes_sent += sent_bytes
