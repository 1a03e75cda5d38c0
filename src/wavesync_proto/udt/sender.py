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
from .packet_types import Boundary, MessageDropRequest
from .packets import encode_packet
from .seqnum import MSG_MAX, SEQ_MAX

__all__ = ["IN_ORDER_BIT", "MAX_BURST_TIME", "UdtSender", "unwrap"]

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
#: Bit 2 of the second header word: the receiver must deliver the message in order.
IN_ORDER_BIT = 1 << 29


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
        "_expiry",
        "_message",
        "_min_period",
        "_payload_size",
        "_pending",
        "_unacked",
        "bytes_sent",
        "drop_requests_sent",
        "last_ack",
        "last_data_ack",
        "loss",
        "next_seq",
        "packets_retransmitted",
        "packets_sent",
        "slot",
    )

    def __init__(
        self, *, isn: int, payload_size: int, capacity_bytes: int, min_period: float = 0.0
    ) -> None:
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
        self.drop_requests_sent = 0
        self._payload_size = payload_size
        self._capacity = capacity_bytes
        #: The shortest time between packets whatever the congestion control says: a
        #: bandwidth cap (``UdtConfig.max_bandwidth``, 4.11 ``UDT_MAXBW``); 0: none.
        self._min_period = min_period
        # Sent, unacknowledged: unwrapped sequence number -> (second header word, payload).
        self._unacked: dict[int, tuple[int, bytes]] = {}
        # Cut into packets, not sent yet: (second header word, payload).
        self._pending: deque[tuple[int, bytes]] = deque()
        self._buffered = 0
        # 4.11's message numbers start at 1 and go from MSG_MAX - 1 back to 1.
        self._message = 1
        # Messages with a time-to-live: message number -> deadline (until acknowledged).
        self._expiry: dict[int, float] = {}

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

    def write(
        self,
        data: bytes | bytearray | memoryview,
        *,
        whole: bool,
        deadline: float | None = None,
        in_order: bool = False,
    ) -> int:
        """Cut up to ``send_space`` bytes of ``data`` into packets; return how many were taken.

        One message number per call (4.11 ``addBuffer``): its packets are marked FIRST,
        middle and LAST, or SOLO when it fits in one. ``whole`` (message mode) takes all
        of ``data`` or nothing. After ``deadline`` the message is not retransmitted any
        more: the peer gets a message drop request instead (4.11 ``sendmsg`` with a TTL).
        ``in_order`` sets the in-order bit on every packet of the message (4.11
        ``sendmsg(..., inorder)``); the word is kept, so retransmissions carry it too.
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
        if deadline is not None:
            self._expiry[message] = deadline
        word = message | IN_ORDER_BIT if in_order else message
        append = self._pending.append
        if size <= chunk:
            append((_SOLO | word, raw))
        else:
            append((_FIRST | word, raw[:chunk]))
            end = size - chunk
            position = chunk
            while position < end:
                append((word, raw[position : position + chunk]))
                position += chunk
            append((_LAST | word, raw[position:]))
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
        expiry = self._expiry
        if expiry:
            # A message whose packets are all acknowledged (or dropped and skipped by
            # the peer) needs its deadline no more.
            finished: set[int] = set()
            for number in range(first, seq):
                word, payload = unacked.pop(number)
                freed += len(payload)
                finished.add(word & MSG_MAX)
            following = unacked.get(seq) or (self._pending[0] if self._pending else None)
            if following is not None:
                finished.discard(following[0] & MSG_MAX)
            for message in finished:
                expiry.pop(message, None)
        else:
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
        self._expiry.clear()
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
        min_period = self._min_period
        period = max(congestion.packet_send_period, min_period)
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
                if self._expiry and self._expired(item[0], now):
                    self._drop_message(seq, item[0], out, destination)
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
                period = congestion.packet_send_period
                slot += period if period > min_period else min_period
        if sent:
            # Only a send moves the clock: a call that sent nothing (window full, nothing
            # to send) must not clamp it to that moment's floor, or how much a sender
            # may catch up would depend on how often it was asked, not on the time.
            self.slot = slot
        self.packets_sent += sent
        self.packets_retransmitted += retransmitted
        self.bytes_sent += sent_bytes

    # --- message time-to-live --------------------------------------------------------------

    def _expired(self, word: int, now: float) -> bool:
        deadline = self._expiry.get(word & MSG_MAX)
        return deadline is not None and now > deadline

    def _drop_message(self, seq: int, word: int, out: list[bytes], destination: int) -> None:
        """Give up on the message ``seq`` belongs to: a drop request instead of a resend.

        4.11 ``packData``: a retransmission whose message outlived its TTL becomes a
        message drop request (4.11 names the last number one too far; here it is the
        message's real last packet) and the message's losses are forgotten. Its unsent
        rest, if any, is not sent at all.
        """
        message = word & MSG_MAX
        unacked = self._unacked
        first = last = seq
        while first - 1 >= self.last_ack and unacked[first - 1][0] & MSG_MAX == message:
            first -= 1
        while last + 1 < self.next_seq and unacked[last + 1][0] & MSG_MAX == message:
            last += 1
        pending = self._pending
        while pending and pending[0][0] & MSG_MAX == message:
            self._buffered -= len(pending.popleft()[1])
        # The deadline stays until the peer acknowledges past the message: a NAK for it
        # gets another drop request, never a resend.
        self.loss.remove_range(first, last)
        out.append(
            encode_packet(
                MessageDropRequest(
                    destination_socket_id=destination,
                    message_number=message,
                    first_sequence_number=first & SEQ_MAX,
                    last_sequence_number=last & SEQ_MAX,
                )
            )
        )
        self.drop_requests_sent += 1
