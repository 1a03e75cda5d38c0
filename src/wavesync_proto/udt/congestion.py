"""UDT congestion control (UDT 4.11 ccc.h, ccc.cpp): the hooks a connection calls, and native DAIMD.

This module owns the sender's two pacing numbers, how long to wait between data
packets (``packet_send_period``) and how many packets may be unacknowledged
(``congestion_window``), and the rules that move them. It does not own RTT or
rate estimation (the connection folds each ACK's fields into its estimates, as
4.11's core.cpp does), loss lists, retransmission, timers, the window the peer
advertises, or a ``UDT_MAXBW`` cap (4.11 applies that in ``CUDT::CCUpdate``,
outside the congestion control).

``CongestionControl`` is 4.11's ``CCC`` callback set with keyword-only hooks, in
the shape of aioquic's ``quic/congestion/base.py``. ``UdtNativeCongestion`` is
4.11's ``CUDTCC``: slow start on the window, then AIMD on the sending rate with
an increase sized by the spare link capacity and a randomised decrease. Each rule
below names the line of ccc.cpp it follows; the arithmetic was checked against
the ``CUDTCC`` object code in Debian's libudt.a (4.11+dfsg1-1+b1), and
docs/protocol.md §4.7 lists the rules, their sources and the few differences.

Time comes in as ``now`` (float seconds). 4.11 counts microseconds in integers,
and its decrease rounds the period up to a whole microsecond, so the native
control keeps its state in microseconds and converts at the edges.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Sequence

from ..errors import LocalProtocolError
from .seqnum import SEQ_MAX, seq_cmp, seq_dec, seq_len

__all__ = [
    "MAX_PACKET_SEND_PERIOD",
    "MIN_CONGESTION_WINDOW",
    "SYN_INTERVAL",
    "CongestionControl",
    "UdtNativeCongestion",
]

#: UDT's SYN interval, seconds: the ACK timer and the rate-control period
#: (``CUDT::m_iSYNInterval`` = 10000 µs).
SYN_INTERVAL = 0.01
#: Smallest window ``congestion_window`` reports, packets: with fewer, one loss
#: stalls the sender until the EXP timer.
MIN_CONGESTION_WINDOW = 2
#: Largest period the native control reaches, seconds (one packet a second).
#: 4.11 has no ceiling; without one, thousands of loss epochs in a row would
#: overflow the float. A sender this slow is left to the EXP timer anyway.
MAX_PACKET_SEND_PERIOD = 1.0

_SYN_US = 10_000
_US_PER_S = 1_000_000.0
_MAX_PERIOD_US = MAX_PACKET_SEND_PERIOD * _US_PER_S
# ccc.cpp onACK: "The minimum increase parameter is increased from 1.0 / m_iMSS
# to 0.01 because the original was too small" (note of 1/24/2012, in 4.11).
_MIN_INCREASE = 0.01
# ccc.cpp onACK: inc = 10^ceil(log10(B * MSS * 8)) * Beta / MSS, Beta = 1.5e-6.
_BETA = 0.0000015
# ccc.cpp onLoss: each decrease multiplies the period by 1.125 (rate * 8/9).
_DECREASE_FACTOR = 1.125
# ccc.cpp onLoss: "0.875^5 = 0.51, rate should not be decreased by more than
# half within a congestion period": the first decrease plus four more.
_MAX_DECREASES_PER_EPOCH = 5
# ccc.cpp onACK: the window outside slow start is rate * (RTT + SYN) + 16.
_WINDOW_HEADROOM = 16


def check_settings(initial_sequence_number: int, max_flow_window: int, mss: int) -> None:
    """Refuse what no control can start from (every control's constructor calls this)."""
    if not 0 <= initial_sequence_number <= SEQ_MAX:
        raise LocalProtocolError(
            f"initial sequence number {initial_sequence_number} is not a 31-bit number"
        )
    if max_flow_window < MIN_CONGESTION_WINDOW:
        raise LocalProtocolError(
            f"flow window {max_flow_window} is below {MIN_CONGESTION_WINDOW} packets"
        )
    if mss <= 0:
        raise LocalProtocolError(f"MSS {mss} is not positive")


class CongestionControl(abc.ABC):
    """What a UDT connection asks of a congestion control, and tells it.

    4.11's ``CCC`` calls, mapped to hooks (core.cpp): ``onPktSent`` and
    ``setSndCurrSeqNo`` in ``packData``; ``onACK`` in ``processCtrl`` for a full
    ACK that acknowledges new data (not a light ACK, not a repeated ACK);
    ``onLoss`` in ``processCtrl`` for each NAK; ``onTimeout`` in ``checkTimers``
    when the EXP timer fires with unacknowledged data. After every hook the
    connection reads ``packet_send_period`` and ``congestion_window`` again, as
    4.11's ``CCUpdate`` does. Every hook is keyword-only.
    """

    __slots__ = ()

    @property
    @abc.abstractmethod
    def packet_send_period(self) -> float:
        """Seconds between two data packets; 0 means the rate does not limit sending."""

    @property
    @abc.abstractmethod
    def congestion_window(self) -> float:
        """Packets that may be sent and not yet acknowledged.

        The connection sends new data while fewer than ``min(flow window,
        int(congestion_window))`` packets are outstanding (core.cpp ``packData``).
        """

    @property
    @abc.abstractmethod
    def in_slow_start(self) -> bool:
        """Whether the window is still growing by acknowledged packets."""

    @abc.abstractmethod
    def on_packet_sent(self, *, sequence_number: int, now: float) -> None:
        """A data packet went out, new or retransmitted."""

    @abc.abstractmethod
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
        """A full ACK acknowledged new data: every packet before ``sequence_number`` arrived.

        The other arguments are the connection's estimates after folding this ACK
        in, not the ACK's raw fields: ``rtt`` and ``rtt_variance`` in seconds,
        ``receive_rate`` and ``link_capacity`` in packets per second (a 16-byte ACK
        carries no rates; the estimates from earlier ACKs stand).
        """

    @abc.abstractmethod
    def on_loss(self, *, losses: Sequence[tuple[int, int]], now: float) -> None:
        """A NAK reported ``losses``: inclusive ``(first, last)`` ranges, as ``Nak.losses``."""

    @abc.abstractmethod
    def on_timeout(self, *, now: float) -> None:
        """The EXP timer fired while sent data was unacknowledged."""

    def on_ack_timer(self, *, now: float) -> None:  # noqa: B027 - an optional hook
        """The connection's SYN tick (every ``SYN_INTERVAL``), when it checks its ACK timer.

        4.11 runs ``CCUpdate`` on every tick of ``checkTimers`` but has no hook for
        it; a control that needs a clock without ACKs overrides this one.
        """


class UdtNativeCongestion(CongestionControl):
    """UDT 4.11's native control, ``CUDTCC``: slow start, then DAIMD on the sending rate.

    ``random`` returns a float in [0, 1]; it spreads the decreases of flows that
    lose packets together (4.11 draws ``rand()`` after ``srand(m_iLastDecSeq)``).
    ``rtt``, ``receive_rate`` and ``link_capacity`` are the estimates before the
    first ACK: 4.11 starts a connection with 100 ms, 16 and 1 (``CUDT::open``).
    """

    __slots__ = (
        "_average_nak_count",
        "_decrease_count",
        "_decrease_random",
        "_largest_sent",
        "_last_ack",
        "_last_decrease_period_us",
        "_last_decrease_seq",
        "_last_rate_control_us",
        "_link_capacity",
        "_loss",
        "_max_flow_window",
        "_mss",
        "_nak_count",
        "_period_us",
        "_random",
        "_receive_rate",
        "_rtt_us",
        "_slow_start",
        "_window",
    )

    def __init__(
        self,
        *,
        initial_sequence_number: int,
        max_flow_window: int,
        random: Callable[[], float],
        now: float,
        mss: int = 1500,
        rtt: float = 0.1,
        receive_rate: int = 16,
        link_capacity: int = 1,
    ) -> None:
        check_settings(initial_sequence_number, max_flow_window, mss)
        self._mss = mss
        self._max_flow_window = max_flow_window
        self._random = random
        # The connection's estimates; on_ack refreshes them (CCC::setRTT etc.).
        self._rtt_us = max(round(rtt * _US_PER_S), 0)
        self._receive_rate = max(receive_rate, 0)
        self._link_capacity = max(link_capacity, 0)
        # core.cpp connect: m_iSndCurrSeqNo = m_iISN - 1 until the first packet goes.
        self._largest_sent = seq_dec(initial_sequence_number)
        # ccc.cpp CUDTCC::init, field by field.
        self._last_rate_control_us = round(now * _US_PER_S)
        self._slow_start = True
        self._last_ack = self._largest_sent
        self._loss = False
        self._last_decrease_seq = seq_dec(self._last_ack)
        self._last_decrease_period_us = 1.0
        self._average_nak_count = 0
        self._nak_count = 0
        self._decrease_random = 1
        # Zeroed by the constructor and not by init(): the first epoch sets it.
        self._decrease_count = 0
        self._window = 16.0
        self._period_us = 1.0

    @property
    def packet_send_period(self) -> float:
        """Seconds between data packets; 4.11 starts at 1 µs, i.e. the window alone limits."""
        return self._period_us / _US_PER_S

    @property
    def congestion_window(self) -> float:
        """The window in packets, within [``MIN_CONGESTION_WINDOW``, the flow window].

        4.11's own value overshoots the flow window when slow start ends and can
        exceed it afterwards; the connection takes the smaller of the two anyway.
        """
        return min(max(self._window, MIN_CONGESTION_WINDOW), self._max_flow_window)

    @property
    def in_slow_start(self) -> bool:
        return self._slow_start

    def on_packet_sent(self, *, sequence_number: int, now: float) -> None:
        # 4.11 records only new packets (setSndCurrSeqNo); a retransmission is
        # behind the largest sent number, so keeping the maximum is the same.
        if seq_cmp(sequence_number, self._largest_sent) > 0:
            self._largest_sent = sequence_number

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
        # A negative value here is a hostile ACK the connection let through;
        # 4.11 would divide by it, here it counts as "no estimate".
        self._rtt_us = max(round(rtt * _US_PER_S), 0)
        self._receive_rate = max(receive_rate, 0)
        self._link_capacity = max(link_capacity, 0)

        # onACK: at most one rate control per SYN, however many ACKs arrive.
        # (4.11 subtracts unsigned, so a clock going backwards would pass.)
        now_us = round(now * _US_PER_S)
        if now_us - self._last_rate_control_us < _SYN_US:
            return
        self._last_rate_control_us = now_us

        if self._slow_start:
            # onACK: the window grows by CSeqNo::seqlen(m_iLastAck, ack), which
            # counts both ends, so one more than the packets acknowledged.
            self._window += seq_len(self._last_ack, sequence_number)
            self._last_ack = sequence_number
            if self._window > self._max_flow_window:
                self._leave_slow_start()
            else:
                return  # "During Slow Start, no rate increase"
        else:
            self._window = (
                self._receive_rate / _US_PER_S * (self._rtt_us + _SYN_US) + _WINDOW_HEADROOM
            )

        # onACK: the SYN after a loss keeps the decreased rate (m_bLoss).
        if self._loss:
            self._loss = False
            return
        self._period_us = self._increased(self._period_us)

    def on_loss(self, *, losses: Sequence[tuple[int, int]], now: float) -> None:
        if not losses:
            return  # the codec refuses an empty NAK; nothing was reported lost
        if self._slow_start:
            self._leave_slow_start()
            # onLoss: with a measured receive rate, sending at that rate is the
            # whole reaction; without one the decrease below follows.
            if self._receive_rate > 0:
                return
        self._loss = True

        # onLoss: losslist[0] & 0x7FFFFFFF, the first sequence number reported.
        if seq_cmp(losses[0][0], self._last_decrease_seq) > 0:
            # A loss of a packet sent after the last decrease: a new congestion
            # epoch. Decrease once, and draw how many NAKs the next decreases of
            # this epoch wait for, from the average NAK count per epoch.
            self._last_decrease_period_us = self._period_us
            self._period_us = self._decreased(self._period_us)
            self._average_nak_count = math.ceil(
                self._average_nak_count * 0.875 + self._nak_count * 0.125
            )
            self._nak_count = 1
            self._decrease_count = 1
            self._last_decrease_seq = self._largest_sent
            draw = self._random()
            if not 0.0 <= draw <= 1.0:
                raise LocalProtocolError(f"the random source returned {draw!r}, not [0, 1]")
            self._decrease_random = max(math.ceil(self._average_nak_count * draw), 1)
        else:
            # onLoss: (m_iDecCount++ < 5) && (0 == ++m_iNAKCount % m_iDecRandom):
            # the count always rises, the NAK count only while decreases are left.
            self._decrease_count += 1
            if self._decrease_count > _MAX_DECREASES_PER_EPOCH:
                return
            self._nak_count += 1
            if self._nak_count % self._decrease_random == 0:
                self._period_us = self._decreased(self._period_us)
                self._last_decrease_seq = self._largest_sent

    def on_timeout(self, *, now: float) -> None:
        # onTimeout: leaves slow start like onLoss. After slow start 4.11 does
        # nothing: its period doubling is commented out in ccc.cpp.
        if self._slow_start:
            self._leave_slow_start()

    def _leave_slow_start(self) -> None:
        self._slow_start = False
        if self._receive_rate > 0:
            self._period_us = min(_US_PER_S / self._receive_rate, _MAX_PERIOD_US)
        else:
            # onACK's formula, one window per RTT + SYN. 4.11's onLoss and
            # onTimeout divide the other way round (packets per µs as µs); its
            # connection never reaches them, as its receive rate starts at 16.
            self._period_us = min((self._rtt_us + _SYN_US) / self._window, _MAX_PERIOD_US)

    def _increased(self, period_us: float) -> float:
        """onACK: the period after one SYN of additive rate increase."""
        capacity = self._link_capacity
        # B, the spare capacity in packets/s; int64_t truncates toward zero.
        spare = int(capacity - _US_PER_S / period_us)
        # Until the rate is back above where the last decrease happened, aim at
        # no more than a ninth of the link.
        if period_us > self._last_decrease_period_us and capacity // 9 < spare:
            spare = capacity // 9
        if spare <= 0:
            increase = _MIN_INCREASE
        else:
            # Packets per SYN to add: 1.5e-6 of the spare capacity's decimal
            # order of magnitude in bits, in packets.
            magnitude = 10.0 ** math.ceil(math.log10(spare * self._mss * 8.0))
            increase = max(magnitude * _BETA / self._mss, _MIN_INCREASE)
        return period_us * _SYN_US / (period_us * increase + _SYN_US)

    @staticmethod
    def _decreased(period_us: float) -> float:
        """onLoss: ceil(m_dPktSndPeriod * 1.125), whole microseconds, capped."""
        return min(float(math.ceil(period_us * _DECREASE_FACTOR)), _MAX_PERIOD_US)
