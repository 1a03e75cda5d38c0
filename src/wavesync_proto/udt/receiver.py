"""The receiving half of a UDT connection (UDT 4.11 core.cpp ``processData``, ``sendCtrl``;
buffer.cpp ``CRcvBuffer``; window.cpp ``CACKWindow``, ``CPktTimeWindow``).

This module owns what has arrived and what is missing: the receive buffer (packets
out of order, and in-order bytes not yet handed out), the receiver's loss list,
what goes into ACKs, light ACKs and NAKs, the ACK history that ACK2s are matched
against, and the two estimates the receiver reports: the packet arrival speed
and the link capacity. It does not own timers or RTT smoothing (the connection
calls it on each tick and passes the RTT in), and it never reads a clock.

Sequence numbers are unwrapped, as in ``sender.py``: ints that count on past
2**31, the wire value being ``n & SEQ_MAX``. docs/protocol.md §4.8 has the rules.
"""

from __future__ import annotations

import math

from .loss_list import LossList

# The private word constants moved with the message assembly; kept importable from here.
from .message_assembly import _DROPPED, _FIRST_BIT, _LAST_BIT, MessageAssembly  # noqa: F401
from .packet_types import Ack, LightAck, Nak
from .packets import encode_packet
from .sender import IN_ORDER_BIT, unwrap
from .seqnum import SEQ_MAX, ack_inc

__all__ = [
    "ACK_HISTORY",
    "LIGHT_ACK_INTERVAL",
    "MIN_AVAILABLE_BUFFER",
    "UdtReceiver",
]

#: A light ACK goes every this many packets between two timer ACKs
#: (core.cpp ``m_iSelfClockInterval``).
LIGHT_ACK_INTERVAL = 64
#: ACKs remembered for matching ACK2s (window.h ``CACKWindow`` default size).
ACK_HISTORY = 1024
#: 4.11 never announces less: "a minimum flow window of 2 is used, even if buffer
#: is full, to break potential deadlock".
MIN_AVAILABLE_BUFFER = 2
#: Intervals kept for the arrival speed and the link capacity (window.h
#: ``CPktTimeWindow``: 16 each).
_WINDOW = 16
_HALF = 1 << 30
_SYN = 0.01


class UdtReceiver(MessageAssembly):
    """Receive buffer, receiver loss list and ACK/NAK generation of one connection.

    ``contig`` is the first sequence number not received (everything before it has
    been handed to the ready list); ``highest`` the largest received
    (4.11 ``m_iRcvCurrSeqNo``). Control packets it decides to send are appended,
    encoded, to ``out``.
    """

    __slots__ = (
        "_ack_history",
        "_arrival_index",
        "_arrivals",
        "_batch_gap",
        "_batch_index",
        "_batch_size",
        "_capacity",
        "_last_arrival",
        "_light_ack_at",
        "_message_mode",
        "_ooo",
        "_payload_size",
        "_peer_socket_id",
        "_probe_index",
        "_probe_seq",
        "_probe_time",
        "_probes",
        "_ready",
        "ack_now",
        "ack_number",
        "acks_sent",
        "bytes_received",
        "duplicates",
        "last_ack_sent",
        "last_ack_time",
        "last_ackack",
        "last_available",
        "light_acks_sent",
        "loss",
        "naks_sent",
        "out",
        "out_of_window",
        "packets_received",
        "packets_since_ack",
        "undelivered_packets",
        "window_update",
    )

    def __init__(
        self,
        *,
        isn: int,
        capacity_packets: int,
        payload_size: int,
        peer_socket_id: int,
        message_mode: bool,
        out: list[bytes],
        now: float,
    ) -> None:
        self.out = out
        self.contig = isn
        self.highest = isn - 1
        self.loss = LossList()
        self._capacity = capacity_packets
        self._payload_size = payload_size
        self._peer_socket_id = peer_socket_id
        self._message_mode = message_mode
        # Out of order: unwrapped sequence number -> payload (and, for messages, word 1).
        self._ooo: dict[int, bytes] = {}
        self._words: dict[int, int] = {}
        # In order, not yet turned into an event: payloads (STREAM) or whole messages.
        self._ready: list[bytes] = []
        self.ready_packets = 0
        # Packets in events the application has not taken yet (the connection keeps it).
        self.undelivered_packets = 0
        self._partial: list[bytes] = []
        self._partial_packets = 0
        self._partial_open = False
        # DGRAM: packets in ``_ooo`` whose message was handed out ahead (markers only).
        self._ahead = 0
        #: DGRAM packets thrown away: parts of messages that cannot be delivered whole.
        self.discarded = 0
        # CPktTimeWindow: the last 16 inter-arrival and probing-pair intervals, seconds.
        # 4.11 starts both windows full of placeholders (1 s and 1 ms), so its first
        # ACKs report about 1 packet/s, which its sender takes as the rate to leave slow
        # start at. These windows start empty and report nothing until they have real
        # samples.
        self._arrivals: list[float] = []
        self._arrival_index = 0
        self._last_arrival = float("-inf")  # the first gap is unknown: infinite, filtered out
        self._batch_gap = 0.0
        self._batch_index = 0
        self._batch_size = 0
        self._probes: list[float] = []
        self._probe_index = 0
        self._probe_time = now
        self._probe_seq = -1
        # ACK state (4.11 m_iRcvLastAck, m_iRcvLastAckAck, m_iAckSeqNo, m_ullLastAckTime).
        self.last_ack_sent = isn
        self.last_ackack = isn
        self.ack_number = 0
        self.last_ack_time = float("-inf")
        self.last_available = capacity_packets
        self._ack_history: dict[int, tuple[int, float]] = {}
        self.packets_since_ack = 0
        self._light_ack_at = LIGHT_ACK_INTERVAL
        #: A short packet arrived (the end of a write): ACK at once, as 4.11 does.
        self.ack_now = False
        #: The application freed buffer after we announced little: ACK even if nothing new.
        self.window_update = False
        self.packets_received = 0
        self.bytes_received = 0
        self.duplicates = 0
        self.out_of_window = 0
        self.lost = 0
        self.naks_sent = 0
        self.acks_sent = 0
        self.light_acks_sent = 0

    # --- queries -------------------------------------------------------------------------

    @property
    def occupied(self) -> int:
        """Packets held: out of order, ready, and in events not taken yet."""
        return (
            len(self._ooo)
            - self._ahead
            + self.ready_packets
            + self.undelivered_packets
            + self._partial_packets
        )

    @property
    def available(self) -> int:
        """Free receive buffer, packets: what an ACK announces (never below 2)."""
        return max(self._capacity - self.occupied, MIN_AVAILABLE_BUFFER)

    @property
    def buffered_out_of_order(self) -> int:
        return len(self._ooo) - self._ahead

    def needs_tick(self) -> bool:
        """Whether the SYN timer has something to do: an ACK to (re)send or losses to NAK."""
        return (
            self.contig != self.last_ackack or bool(self.loss) or self.window_update or self.ack_now
        )

    def has_ready(self) -> bool:
        return self.ready_packets > 0

    def take_ready(self) -> tuple[list[bytes], int]:
        """The in-order payloads (STREAM) or whole messages (DGRAM) and their packet count."""
        ready, packets = self._ready, self.ready_packets
        self._ready = []
        self.ready_packets = 0
        return ready, packets

    # --- data ------------------------------------------------------------------------------

    def on_data(  # noqa: PLR0912, PLR0915 - one flat function: this is the per-packet hot path
        self, data: bytes, seq_wire: int, word: int, now: float
    ) -> None:
        """One data packet (already checked to be from the peer, for us)."""
        # CPktTimeWindow::onPktArrival, probe1Arrival, probe2Arrival (by sequence number:
        # the sender sends the packet after each multiple of 16 back to back).
        if now != self._last_arrival:
            arrivals = self._arrivals
            self._batch_gap = now - self._last_arrival
            self._batch_size = 1
            if len(arrivals) < _WINDOW:
                self._batch_index = len(arrivals)
                arrivals.append(self._batch_gap)
            else:
                index = self._batch_index = self._arrival_index
                arrivals[index] = self._batch_gap
                self._arrival_index = (index + 1) & 0xF
            self._last_arrival = now
        else:
            # Several datagrams with one timestamp: an adapter that reads a batch per
            # clock reading. 4.11 would record intervals of 0 and its median filter would
            # then report nothing (or nonsense); here the batch is one entry, its gap
            # shared by its packets.
            self._batch_size += 1
            self._arrivals[self._batch_index] = self._batch_gap / self._batch_size
        low = seq_wire & 0xF
        if low == 0:
            self._probe_time = now
            self._probe_seq = seq_wire
        elif low == 1 and self._probe_seq == seq_wire - 1:
            probes = self._probes
            if len(probes) < _WINDOW:
                probes.append(now - self._probe_time)
            else:
                probes[self._probe_index] = now - self._probe_time
                self._probe_index = (self._probe_index + 1) & 0xF
            self._probe_seq = -1

        contig = self.contig
        offset = (seq_wire - contig) & SEQ_MAX
        if offset >= _HALF:
            self.duplicates += 1  # before the window: delivered already
            return
        room = (
            self._capacity - self.ready_packets - self.undelivered_packets - self._partial_packets
        )
        # DGRAM: numbers whose message was handed out ahead are counted once, as held
        # packets, not again as window they take (checked only past the plain room, so a
        # byte stream's path pays nothing for it).
        if offset >= room and offset >= room + self._ahead:
            self.out_of_window += 1
            return
        payload = data[16:]
        self.packets_received += 1
        self.bytes_received += len(payload)
        if len(payload) != self._payload_size:
            # core.cpp processData: "an irregular sized packet usually indicates the end
            # of a message, so send an ACK immediately".
            self.ack_now = True
        self.packets_since_ack += 1
        if self.packets_since_ack >= self._light_ack_at:
            self._light_ack_at += LIGHT_ACK_INTERVAL
            self._light_ack(contig)
        if offset == 0:
            if contig <= self.highest:
                self.loss.remove(contig)  # a retransmission filled the first hole
            else:
                self.highest = contig
            if self._message_mode:
                self._words[contig] = word
                self._ooo[contig] = payload
                self._release_messages()
                return
            ready = self._ready
            ready.append(payload)
            released = 1
            seq = contig + 1
            ooo = self._ooo
            if ooo:
                pop = ooo.pop
                following = pop(seq, None)
                while following is not None:
                    ready.append(following)
                    released += 1
                    seq += 1
                    following = pop(seq, None)
            self.ready_packets += released
            self.contig = seq
            return
        seq = contig + offset
        ooo = self._ooo
        if seq in ooo:
            self.packets_received -= 1
            self.bytes_received -= len(payload)
            self.duplicates += 1
            return
        highest = self.highest
        if seq > highest:
            if seq > highest + 1:
                self._gap(highest + 1, seq - 1, now)
            self.highest = seq
        elif not self.loss.remove(seq):
            pass  # pragma: no cover - a number at or below highest, not held, is a loss
        ooo[seq] = payload
        if self._message_mode:
            self._words[seq] = word
            # A LAST packet, or one filling a hole, may complete a message that need
            # not wait for the packets missing before it.
            if not word & IN_ORDER_BIT and (word & _LAST_BIT or seq < highest):
                self._deliver_ahead(seq)

    def _gap(self, first: int, last: int, now: float) -> None:
        # core.cpp processData: "If loss found, insert them to the receiver loss list"
        # and "Generate loss report immediately".
        self.lost += self.loss.insert(first, last, now)
        self.out.append(
            encode_packet(
                Nak(
                    destination_socket_id=self._peer_socket_id,
                    losses=((first & SEQ_MAX, last & SEQ_MAX),),
                )
            )
        )
        self.naks_sent += 1

    def _light_ack(self, ack: int) -> None:
        if ack == self.last_ackack:
            return
        self.out.append(
            encode_packet(
                LightAck(destination_socket_id=self._peer_socket_id, sequence_number=ack & SEQ_MAX)
            )
        )
        self.light_acks_sent += 1

    # --- timer-driven control packets ------------------------------------------------------

    def full_ack(
        self, now: float, rtt: float, rtt_variance: float, *, repeat_after: float | None = None
    ) -> bool:
        """The ACK timer (4.11 ``sendCtrl(2)``): send an ACK if there is news; True if sent.

        News: packets acknowledged for the first time; or, when ``repeat_after`` (by
        default ``rtt + 4 * rtt_variance``) has passed without the peer's ACK2, the same
        ACK again; or buffer the application freed. Every SYN at most one ACK carries the
        receive rate and link capacity (24 bytes); one sooner after it has 16 bytes.
        """
        self.packets_since_ack = 0
        self._light_ack_at = LIGHT_ACK_INTERVAL
        self.ack_now = False
        ack = self.contig
        forced = self.window_update
        self.window_update = False
        if ack == self.last_ackack and not forced:
            return False
        if ack > self.last_ack_sent:
            self.last_ack_sent = ack
        elif not forced and now - self.last_ack_time < (
            rtt + 4 * rtt_variance if repeat_after is None else repeat_after
        ):
            return False
        self.ack_number = ack_inc(self.ack_number)
        available = self.available
        self.last_available = available
        receive_rate: int | None = None
        capacity: int | None = None
        if now - self.last_ack_time > _SYN:
            receive_rate = self.receive_rate()
            capacity = self.link_capacity()
            self.last_ack_time = now
        self.out.append(
            encode_packet(
                Ack(
                    destination_socket_id=self._peer_socket_id,
                    ack_number=self.ack_number,
                    sequence_number=ack & SEQ_MAX,
                    rtt=min(round(rtt * 1e6), 0xFFFFFFFF),
                    rtt_variance=min(round(rtt_variance * 1e6), 0xFFFFFFFF),
                    available_buffer=available,
                    receive_rate=receive_rate,
                    link_capacity=capacity,
                )
            )
        )
        self.acks_sent += 1
        history = self._ack_history
        history[self.ack_number] = (ack, now)
        if len(history) > ACK_HISTORY:
            del history[next(iter(history))]
        return True

    def on_ack2(self, ack_number: int, now: float) -> float | None:
        """The peer got our ACK ``ack_number``: return the round trip it took (None: unknown)."""
        entry = self._ack_history.pop(ack_number, None)
        if entry is None:
            return None
        seq, sent = entry
        self.last_ackack = max(self.last_ackack, seq)
        return now - sent

    def periodic_nak(self, now: float, interval: float) -> bool:
        """Report again the losses not reported for ``interval``; True if a NAK went out."""
        if not self.loss:
            return False
        # A NAK fits in one packet: at most payload_size / 4 words (core.cpp sendCtrl(3)),
        # two words per range.
        ranges = self.loss.due(now, interval, max(self._payload_size // 8, 1))
        if not ranges:
            return False
        self.out.append(
            encode_packet(
                Nak(
                    destination_socket_id=self._peer_socket_id,
                    losses=tuple((first & SEQ_MAX, last & SEQ_MAX) for first, last in ranges),
                )
            )
        )
        self.naks_sent += 1
        return True

    def unwrap(self, wire: int) -> int:
        return unwrap(wire, self.contig)

    def clear(self) -> None:
        self._ooo.clear()
        self._words.clear()
        self._ready = []
        self.ready_packets = 0
        self._partial = []
        self._partial_packets = 0
        self._partial_open = False
        self._ahead = 0
        self.loss.clear()

    # --- estimates (window.cpp CPktTimeWindow) --------------------------------------------

    def receive_rate(self) -> int:
        """Packets per second from the last 16 inter-arrival intervals; 0 when unknown.

        ``getPktRcvSpeed``: keep the intervals within (median / 8, median * 8), and
        answer only if more than 8 of them are.
        """
        values = self._arrivals
        if len(values) <= _WINDOW // 2:
            return 0
        median = sorted(values)[len(values) // 2]
        upper = median * 8
        lower = median / 8
        count = 0
        total = 0.0
        for value in values:
            if lower < value < upper:
                count += 1
                total += value
        if count <= _WINDOW // 2 or total <= 0.0:
            return 0
        return min(math.ceil(count / total), 0x7FFFFFFF)

    def link_capacity(self) -> int:
        """Packets per second from the last 16 probing-pair intervals; 0 when unknown.

        ``getBandwidth``: the same median filter, the median counted once more; here
        only once 8 pairs have been measured.
        """
        values = self._probes
        if len(values) < _WINDOW // 2:
            return 0
        median = sorted(values)[len(values) // 2]
        upper = median * 8
        lower = median / 8
        count = 1
        total = median
        for value in values:
            if lower < value < upper:
                count += 1
                total += value
        if total <= 0.0:
            return 0
        return min(math.ceil(count / total), 0x7FFFFFFF)
