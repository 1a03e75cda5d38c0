"""A loss-tolerant, model-based rate control for UDT: pace at the measured delivery rate.

This module owns ``DeliveryRateCongestion``, a second ``CongestionControl`` next to
4.11's native DAIMD (``congestion.py``): a model of the path (the bottleneck
delivery rate and the minimum round-trip time) and the two outputs derived from
it. It does not own RTT smoothing, loss lists, retransmission or timers (the
connection's). Congestion control is sender-local in UDT: the peer, libudt
included, never sees which control runs.

The ideas, not the code, are BBR's (Cardwell, Cheng, Gunn, Hassas Yeganeh,
Jacobson, "BBR: Congestion-Based Congestion Control", ACM Queue 14(5), 2016; IETF
draft-cardwell-iccrg-bbr-congestion-control): a delivery-rate sample is packets
delivered over the longer of the send and the delivery interval; the bottleneck
rate is the windowed maximum of the samples over 10 rounds, the propagation delay
the windowed minimum of the RTT over 10 s; STARTUP paces at 2/ln 2 times the rate
until it stops growing by 25 % per round for 3 rounds, DRAIN at the inverse until
the queue it built is gone, PROBE_BW cycles the gains 1.25, 0.75, 1 x 6. The
heavy-loss ceiling is BBRv2's idea (a loss rate above a threshold in a round
bounds the rate, by 0.7), with a far looser threshold; the window's pipe
accounting is RFC 6675's (what the receiver is known to hold is not in flight).

UDT has no SACK: the sender learns the receiver's highest sequence number from
NAKs (sent the moment the packet after a gap arrives) and from cumulative ACKs.
What the receiver got is that highest number less the reported losses not yet
repaired. Loss below the heavy threshold does not move the rate: the model only
reacts to what the deliveries show. docs/protocol.md §4.7.4 has the rules and
the figures. Time comes in as ``now``; nothing here reads a clock.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence

from ..errors import LocalProtocolError
from .congestion import (
    MAX_PACKET_SEND_PERIOD,
    MIN_CONGESTION_WINDOW,
    SYN_INTERVAL,
    CongestionControl,
    check_settings,
)
from .seqnum import SEQ_MAX

__all__ = ["HEAVY_LOSS_FRACTION", "DeliveryRateCongestion"]

#: A round in which more than this share of the packets sent in the round before
#: is reported lost counts as congestion (and at least ``_HEAVY_LOSS_MIN_PACKETS``).
HEAVY_LOSS_FRACTION = 0.2
# BBRv2's count of loss events before a round may count as lossy (8): with 5 %
# random loss, 4 of a 16-40 packet round are lost by chance once in 10-100 rounds,
# and a heavy round in STARTUP ends it at a rate it never regains quickly.
_HEAVY_LOSS_MIN_PACKETS = 8
# A heavy-loss round multiplies the rate ceiling by this (BBRv2's beta)...
_LOSS_BETA = 0.7
# ...and each round without heavy loss raises it by this, until it is lifted once
# above twice the bottleneck estimate.
_CEILING_GROWTH = 1.25
# BBR: 2/ln 2, the smallest gain that doubles the delivery rate every round.
_STARTUP_GAIN = 2.0 / math.log(2.0)
_DRAIN_GAIN = 1.0 / _STARTUP_GAIN
_PROBE_GAINS = (1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
_CWND_GAIN = 2.0
_FULL_BW_GROWTH = 1.25
_FULL_BW_ROUNDS = 3
_BW_FILTER_ROUNDS = 10
_MIN_RTT_WINDOW = 10.0
# 4.11's initial window, and its headroom outside slow start.
_INITIAL_WINDOW = 16
_WINDOW_HEADROOM = 16
# The sender sends every 16th new packet's successor at once (a probing pair),
# so 16 packets take 15 periods: the period is stretched by 16/15 to compensate.
_PROBE_PAIR_STRETCH = 16.0 / 15.0
# Neither a loss nor a timeout takes the rate below this many packets per RTT + SYN.
_MIN_PACKETS_PER_ROUND = 4.0
_MIN_PERIOD = 1e-6
# A send-time snapshot at most every millisecond; bounded memory for snapshots
# and for the reported losses not yet repaired.
_SNAPSHOT_SPACING = 0.001
_MAX_SNAPSHOTS = 4096
_MAX_LOSS_RANGES = 4096
_MAX_MARKS = 64
_MAX_MAXIMA = 1024
_HALF = 1 << 30

_STARTUP, _DRAIN, _PROBE_BW = "startup", "drain", "probe_bw"

# (seq, sent count, sent at, anchor sent count, anchor sent at, delivered count, known at)
_Snapshot = tuple[int, int, float, int, float, int, float]


class DeliveryRateCongestion(CongestionControl):
    """Pace at gain x the windowed-max delivery rate; window 2 x BDP + a SYN + 16 packets.

    Takes the same keywords as ``UdtNativeCongestion`` (``UdtConfig.congestion``).
    ``random`` picks where the gain cycle starts (BBR randomises it so that flows
    sharing a bottleneck do not probe in step); it must return a float in [0, 1].
    """

    def __init__(
        self,
        *,
        initial_sequence_number: int,
        max_flow_window: int,
        random: Callable[[], float],
        now: float,
        mss: int = 1500,
    ) -> None:
        check_settings(initial_sequence_number, max_flow_window, mss)
        self._max_flow_window = max_flow_window
        self._random = random
        # Unwrapped sequence numbers: the ISN as given, counting on past 2**31.
        self._largest_sent = initial_sequence_number - 1
        self._last_ack = initial_sequence_number  # the first unacknowledged
        # The highest number the receiver is known to hold; the reported losses below
        # it not yet acknowledged (unwrapped inclusive ranges) and how many.
        self._highest = initial_sequence_number - 1
        self._lost_ranges: deque[list[int]] = deque()
        self._unrepaired = 0
        self._lost_total = 0
        # Retransmissions known delivered (a reported loss the cumulative ACK passed),
        # and per delivered new packet, averaged over rounds.
        self._repaired_total = 0
        self._repair_ratio = 0.0
        self._repair_recent = 0.0
        self._repair_mark = (self._highest, 0)
        self._loss_frontier = self._largest_sent
        # Recent exact (delivered count, time) and (sent count, time) pairs: the starts
        # of a snapshot's intervals, the newest at least a SYN before it (see _mark).
        # No delivery mark before the first ACK: an interval from the start would time
        # the handshake, or an EXP expiry that resent a lost first window.
        self._delivery_marks: deque[tuple[int, float]] = deque()
        self._send_marks: deque[tuple[int, float]] = deque([(0, now)])
        # Send-time snapshots of new packets. The anchor is the newest snapshot
        # delivered when the packet left, the delivery point the exact one then: the
        # starts of the send and the delivery interval the packet's delivery ends.
        self._snapshots: deque[_Snapshot] = deque()
        self._sent_count = 0  # every data packet sent, new or retransmitted
        self._last_snapshot = -math.inf
        # Bottleneck rate (packets/s): per-round maxima (round, rate, time) of the last
        # 10 rounds, and at least of the last gain cycle (see _sample).
        self._round_maxima: deque[tuple[int, float, float]] = deque()
        self._min_rtt = math.inf
        self._min_rtt_stamp = now
        self._round = 0
        self._round_end = self._largest_sent
        self._round_packets = 0
        self._lost_in_round = 0
        self._heavy_round = False
        self._ceiling = math.inf
        self._timeout_window = False
        self._full_bw = 0.0
        self._full_bw_rounds = 0
        self._full_bw_time = now
        self._state = _STARTUP
        self._state_start = now
        self._cycle_index = 0
        self._cycle_start = now
        self._period = _MIN_PERIOD
        self._window = float(min(_INITIAL_WINDOW, max_flow_window))

    # --- outputs ---------------------------------------------------------------------------

    @property
    def packet_send_period(self) -> float:
        """Seconds between packets; 1 µs (the window alone limits) before any sample."""
        return self._period

    @property
    def congestion_window(self) -> float:
        return self._window

    @property
    def in_slow_start(self) -> bool:
        return self._state == _STARTUP

    @property
    def bottleneck_rate(self) -> float:
        """The windowed-max delivery rate, packets per second (0 before any sample)."""
        return max((rate for _, rate, _ in self._round_maxima), default=0.0)

    @property
    def min_rtt(self) -> float:
        """The windowed-min round-trip time, seconds (inf before any)."""
        return self._min_rtt

    @property
    def state(self) -> str:
        """``startup``, ``drain`` or ``probe_bw``."""
        return self._state

    # --- hooks -----------------------------------------------------------------------------

    def on_packet_sent(self, *, sequence_number: int, now: float) -> None:
        self._sent_count += 1
        ahead = (sequence_number - self._largest_sent) & SEQ_MAX
        if ahead == 0 or ahead >= _HALF:
            return  # a retransmission: only new packets are snapshotted
        seq = self._largest_sent = self._largest_sent + ahead
        if (now - self._last_snapshot >= _SNAPSHOT_SPACING or now < self._last_snapshot) and len(
            self._snapshots
        ) < _MAX_SNAPSHOTS:
            self._last_snapshot = now
            count = self._sent_count
            sent_from = _mark(self._send_marks, count, now)
            delivered_from = _mark(self._delivery_marks, None, now)
            self._snapshots.append((seq, count, now, *sent_from, *delivered_from))

    def on_ack(
        self,
        *,
        sequence_number: int,
        rtt: float,
        rtt_variance: float,
        receive_rate: int,
        link_capacity: int,
        now: float,
    ) -> None:
        if rtt > 0.0:
            self._note_rtt(rtt, now)
        ahead = (sequence_number - self._last_ack) & SEQ_MAX
        if 0 < ahead < _HALF:
            ack = self._last_ack = self._last_ack + ahead
            self._largest_sent = max(self._largest_sent, ack - 1)
            self._highest = max(self._highest, ack - 1)
            # Losses below the ACK were repaired (their retransmissions arrived).
            ranges = self._lost_ranges
            while ranges and ranges[0][0] < ack:
                first = ranges[0]
                repaired = first[1] - first[0] + 1 if first[1] < ack else ack - first[0]
                self._unrepaired -= repaired
                self._repaired_total += repaired
                if first[1] < ack:
                    ranges.popleft()
                else:
                    first[0] = ack
            # No loss reported beyond the ACK: the receiver holds nothing past it.
            self._delivered(now, exact=self._loss_frontier < ack)
        self._update(now)

    def on_loss(self, *, losses: Sequence[tuple[int, int]], now: float) -> None:
        # Only what lies beyond every loss seen before (and was sent) is news: count
        # each lost number once.
        base = self._last_ack
        lost = 0
        for first, last in losses:
            start = max(base + _signed(first - base), self._loss_frontier + 1, base)
            end = min(base + _signed(last - base), self._largest_sent - 1)
            if end < start:
                continue
            lost += end - start + 1
            self._loss_frontier = end
            self._highest = max(self._highest, end + 1)
            if len(self._lost_ranges) >= _MAX_LOSS_RANGES:  # count the oldest as repaired
                oldest = self._lost_ranges.popleft()
                self._unrepaired -= oldest[1] - oldest[0] + 1
            self._lost_ranges.append([start, end])
        if not lost:
            return
        self._lost_total += lost
        self._unrepaired += lost
        # A NAK leaves the moment the packet after the gap arrives: exact. It may start
        # a round; its losses are of packets sent in the round before, as are the others
        # this round hears of.
        self._delivered(now, exact=True)
        self._lost_in_round += lost
        # Before the first round ends there is no round before: the basis is what
        # this one has sent so far (not zero, which made any 4 losses heavy).
        basis = self._round_packets if self._round else self._largest_sent - self._round_end
        if (
            not self._heavy_round
            and self._lost_in_round >= _HEAVY_LOSS_MIN_PACKETS
            and self._lost_in_round > HEAVY_LOSS_FRACTION * basis
        ):
            # Congestion, or a path too lossy to fill: cap the rate, once per round.
            self._heavy_round = True
            self._ceiling = max(_LOSS_BETA * self._bandwidth(), self._floor_rate())
            if self._state == _STARTUP:
                self._state = _DRAIN
                self._state_start = now
        self._update(now)

    def on_timeout(self, *, now: float) -> None:
        # Everything in flight may be gone: hold the window at the initial one until a
        # round completes and, once the pipe was found, halve the rate ceiling. In
        # STARTUP the estimate is still far below the path's (a lost tail of the first
        # windows, with nothing after it to make the receiver NAK): it keeps growing.
        if self._state != _STARTUP:
            self._ceiling = max(0.5 * self._bandwidth(), self._floor_rate())
        self._timeout_window = True
        self._round_end = self._largest_sent
        self._update(now)

    def on_ack_timer(self, *, now: float) -> None:
        self._update(now)

    # --- the model -------------------------------------------------------------------------

    def _note_rtt(self, rtt: float, now: float) -> None:
        if rtt <= self._min_rtt or not 0.0 <= now - self._min_rtt_stamp <= _MIN_RTT_WINDOW:
            self._min_rtt = rtt
            self._min_rtt_stamp = now

    def _delivered(self, now: float, *, exact: bool) -> None:
        """The receiver's highest number moved: take a rate sample, maybe end the round.

        A packet counts as delivered once the receiver's highest number passes it;
        the delivered count is that number less the reported losses not repaired
        yet. It is exact after a NAK or an ACK with no loss reported beyond it
        (other ACKs give a lower bound), and only exact points start an interval:
        the cumulative ACK alone would credit, when a hole is filled, packets that
        arrived a round trip before.
        """
        if exact:
            marks = self._delivery_marks
            point = (self._highest - self._lost_total, now)
            if marks and 0.0 <= now - marks[-1][1] < _SNAPSHOT_SPACING:
                marks[-1] = point  # at most one a millisecond: the newest
            else:
                marks.append(point)
                if len(marks) > _MAX_MARKS:
                    marks.popleft()
        highest = self._highest
        snapshots = self._snapshots
        newest = None
        while snapshots and snapshots[0][0] <= highest:
            newest = snapshots.popleft()
        if newest is not None:
            self._sample(newest, now)
        if highest > self._round_end:
            self._end_round(now)

    def _sample(self, newest: _Snapshot, now: float) -> None:
        _, count, sent, anchor_count, anchor_sent, delivered_from, known_at = newest
        # Its own RTT: an upper bound on the path's (an ACK waits up to a SYN).
        if now > sent:
            self._note_rtt(now - sent, now)
        # The packets sent since the anchor (retransmissions too) left at one rate and
        # the delivered count moved at another: the slower of the two is the delivery
        # rate (BBR's max of the send and the ACK interval).
        sent_for = sent - anchor_sent
        delivered_for = now - known_at
        delivered = self._highest - self._lost_total - delivered_from
        if count <= anchor_count or delivered <= 0 or delivered_for <= 0.0 or sent_for < 0.0:
            return
        # Retransmissions are delivered too, but credited only when the cumulative ACK
        # passes them, a round trip late and in bursts; they are added at the average
        # rate of the recent rounds instead.
        repairs = min(self._repair_ratio, self._repair_recent)
        rate = delivered * (1.0 + repairs) / delivered_for
        if sent_for > 0.0:
            rate = min(rate, (count - anchor_count) / sent_for)
        maxima = self._round_maxima
        if maxima and maxima[-1][0] == self._round:
            if rate > maxima[-1][1]:
                maxima[-1] = (self._round, rate, now)
        else:
            maxima.append((self._round, rate, now))
        # BBR's 10 rounds hold the 1.25 phase's sample through a gain cycle because a
        # phase lasts one round. Here a phase lasts min RTT + 2 SYN: on a sub-ms path
        # that is dozens of rounds, and 10 rounds would let the 0.75 phase (and, under
        # loss, every phase: a sample is the deliveries, below the sending rate) pull
        # the estimate down cycle after cycle. The filter spans a whole cycle too.
        rtt = self._min_rtt if self._min_rtt < math.inf else 0.0
        span = (len(_PROBE_GAINS) + 1) * (rtt + 2 * SYN_INTERVAL)
        while maxima and (
            len(maxima) > _MAX_MAXIMA
            or (maxima[0][0] <= self._round - _BW_FILTER_ROUNDS and now - maxima[0][2] > span)
        ):
            maxima.popleft()

    def _end_round(self, now: float) -> None:
        """The receiver got past a packet sent after the round began: a new round.

        Its packets are those sent during the round just ended: the ones whose ACKs
        and NAKs arrive in the new one.
        """
        self._round += 1
        self._round_packets = self._largest_sent - self._round_end
        self._round_end = self._largest_sent
        self._timeout_window = False
        heavy, self._heavy_round = self._heavy_round, False
        self._lost_in_round = 0
        first = self._highest - self._lost_total
        mark_first, mark_repaired = self._repair_mark
        if first > mark_first:
            ratio = min((self._repaired_total - mark_repaired) / (first - mark_first), 1.0)
            self._repair_ratio += (ratio - self._repair_ratio) / 8.0
            self._repair_recent = ratio
            self._repair_mark = (first, self._repaired_total)
        bandwidth = self.bottleneck_rate
        if not heavy and self._ceiling < math.inf:
            self._ceiling *= _CEILING_GROWTH
            if self._ceiling > 2.0 * bandwidth:
                self._ceiling = math.inf
        if self._state == _STARTUP:
            # A round is one look at the growth in BBR, where rounds last an RTT and a
            # sample spans one. Here a sample spans a SYN or more: on a sub-ms path
            # three rounds pass before a sample shows what STARTUP's gain did, and it
            # would end with a tenth of the rate. A look needs min RTT + 2 SYN.
            rtt = self._min_rtt if self._min_rtt < math.inf else 0.0
            if not 0.0 <= now - self._full_bw_time < rtt + 2 * SYN_INTERVAL:
                self._full_bw_time = now
            else:
                return
            if bandwidth >= self._full_bw * _FULL_BW_GROWTH:
                self._full_bw = bandwidth
                self._full_bw_rounds = 0
            else:
                self._full_bw_rounds += 1
            if self._full_bw_rounds >= _FULL_BW_ROUNDS:
                self._state = _DRAIN
                self._state_start = now

    def _update(self, now: float) -> None:
        """Move the state machine on by the clock, then derive the two outputs."""
        bandwidth = self._bandwidth()
        rtt = self._min_rtt if self._min_rtt < math.inf else 0.0
        in_network = self._largest_sent - self._highest
        if self._state == _DRAIN and (
            in_network <= bandwidth * rtt + _WINDOW_HEADROOM
            or not 0.0 <= now - self._state_start <= rtt + SYN_INTERVAL
        ):
            # The queue STARTUP built is gone (or a round of draining has passed). The
            # cycle starts anywhere but in its draining phase (index 1).
            draw = self._random()
            if not 0.0 <= draw <= 1.0:
                raise LocalProtocolError(f"the random source returned {draw!r}, not [0, 1]")
            choice = min(int(draw * (len(_PROBE_GAINS) - 1)), len(_PROBE_GAINS) - 2)
            self._state = _PROBE_BW
            self._cycle_index = choice + 1 if choice else 0
            self._cycle_start = now
        if self._state == _PROBE_BW and not 0.0 <= now - self._cycle_start < rtt + 2 * SYN_INTERVAL:
            self._cycle_index = (self._cycle_index + 1) % len(_PROBE_GAINS)
            self._cycle_start = now
        if self._state == _STARTUP:
            gain, window_gain = _STARTUP_GAIN, _STARTUP_GAIN
        elif self._state == _DRAIN:
            gain, window_gain = _DRAIN_GAIN, _STARTUP_GAIN
        else:
            gain, window_gain = _PROBE_GAINS[self._cycle_index], _CWND_GAIN
        if bandwidth <= 0.0:
            return  # no sample yet: the initial window alone limits
        period = _PROBE_PAIR_STRETCH / (gain * bandwidth)
        self._period = min(max(period, _MIN_PERIOD), MAX_PACKET_SEND_PERIOD)
        # gain x BDP, the BDP counted over RTT + SYN: a full ACK comes once a SYN.
        window = window_gain * bandwidth * (rtt + SYN_INTERVAL) + _WINDOW_HEADROOM
        if self._state == _STARTUP:
            window = max(window, _INITIAL_WINDOW)
        if self._timeout_window:
            window = min(window, _INITIAL_WINDOW)
        # The connection counts everything from the cumulative ACK on as outstanding;
        # what the receiver is known to hold beyond a hole is out of the network.
        window += max(self._highest - self._last_ack + 1 - self._unrepaired, 0)
        self._window = min(max(window, MIN_CONGESTION_WINDOW), self._max_flow_window)

    def _bandwidth(self) -> float:
        return min(self.bottleneck_rate, self._ceiling)

    def _floor_rate(self) -> float:
        rtt = self._min_rtt if self._min_rtt < math.inf else 0.0
        return _MIN_PACKETS_PER_ROUND / (rtt + SYN_INTERVAL)


def _mark(marks: deque[tuple[int, float]], count: int | None, now: float) -> tuple[int, float]:
    """The newest mark at least a SYN old (or the oldest); append ``(count, now)`` if given.

    Intervals shorter than a SYN would time a full ACK's worth of packets by the
    jitter of when ACKs and NAKs are read (an adapter reads a batch at one ``now``).
    """
    if not marks:
        return (0, math.inf)  # no interval: no sample
    while len(marks) > 1 and (marks[1][1] <= now - SYN_INTERVAL or len(marks) > _MAX_MARKS):
        marks.popleft()
    head = marks[0]
    if count is not None:
        marks.append((count, now))
    return head


def _signed(difference: int) -> int:
    """A difference of two sequence numbers, the short way round the circle."""
    offset = difference & SEQ_MAX
    return offset - (1 << 31) if offset >= _HALF else offset
