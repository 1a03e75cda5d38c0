"""UDT 4.11's native congestion control, driven by hand with a clock moved by hand."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import pytest

from wavesync_proto.errors import LocalProtocolError
from wavesync_proto.udt.congestion import (
    MAX_PACKET_SEND_PERIOD,
    SYN_INTERVAL,
    CongestionControl,
    UdtNativeCongestion,
)
from wavesync_proto.udt.seqnum import SEQ_MAX, seq_inc

ISN = 1000
US = 1e-6  # one microsecond, in seconds


def native(
    *,
    isn: int = ISN,
    window: int = 8192,
    random: Callable[[], float] = lambda: 0.5,
    now: float = 0.0,
    mss: int = 1500,
    rtt: float = 0.1,
    receive_rate: int = 16,
) -> UdtNativeCongestion:
    return UdtNativeCongestion(
        initial_sequence_number=isn,
        max_flow_window=window,
        random=random,
        now=now,
        mss=mss,
        rtt=rtt,
        receive_rate=receive_rate,
    )


def ack(
    cc: CongestionControl,
    sequence_number: int,
    now: float,
    *,
    rtt: float = 0.05,
    rate: int = 1000,
    capacity: int = 1,
) -> None:
    cc.on_ack(
        sequence_number=sequence_number,
        rtt=rtt,
        rtt_variance=rtt / 2,
        receive_rate=rate,
        link_capacity=capacity,
        now=now,
    )


def nak(cc: CongestionControl, first: int, now: float = 0.0) -> None:
    cc.on_loss(losses=((first, first),), now=now)


def sent(cc: CongestionControl, last: int) -> None:
    cc.on_packet_sent(sequence_number=last, now=0.0)


def after_slow_start(
    *, rate: int = 1000, window: int = 8192, random: Callable[[], float] = lambda: 0.5
) -> UdtNativeCongestion:
    """A control that left slow start on a timeout: period 1/rate, nothing else moved."""
    cc = native(window=window, random=random, receive_rate=rate)
    cc.on_timeout(now=0.0)
    assert not cc.in_slow_start
    return cc


def period_us(cc: CongestionControl) -> float:
    """The period in µs, without the float noise of the conversion from seconds."""
    return round(cc.packet_send_period * 1_000_000, 6)


# -- the interface ------------------------------------------------------------------


def test_the_interface_is_abstract_and_the_timer_hook_optional() -> None:
    with pytest.raises(TypeError):
        CongestionControl()  # type: ignore[abstract]
    cc = native()
    assert isinstance(cc, CongestionControl)
    cc.on_ack_timer(now=0.01)  # the native control has no use for it
    assert (cc.packet_send_period, cc.congestion_window, cc.in_slow_start) == (US, 16, True)


def test_syn_interval_is_4_11s_ten_milliseconds() -> None:
    assert SYN_INTERVAL == 0.01


# -- slow start (ccc.cpp CUDTCC::init, onACK) -----------------------------------------


def test_starts_like_cudtcc_init() -> None:
    cc = native()
    assert cc.in_slow_start
    assert cc.congestion_window == 16
    assert cc.packet_send_period == 1 * US  # the window alone paces slow start


def test_slow_start_grows_the_window_by_acknowledged_packets_once_per_syn() -> None:
    cc = native()
    sent(cc, 1049)
    ack(cc, 1010, now=0.005)  # less than a SYN since init: no rate control at all
    assert cc.congestion_window == 16
    ack(cc, 1010, now=0.010)
    # seqlen(ISN - 1, 1010) counts both ends: 12 for 10 acknowledged packets.
    assert cc.congestion_window == 16 + 12
    ack(cc, 1040, now=0.015)  # within the same SYN: ignored, the next one counts from 1010
    assert cc.congestion_window == 28
    ack(cc, 1050, now=0.020)
    assert cc.congestion_window == 28 + 41
    assert cc.in_slow_start
    assert cc.packet_send_period == 1 * US


def test_slow_start_counts_across_the_sequence_wrap() -> None:
    cc = native(isn=SEQ_MAX - 4)
    ack(cc, 5, now=0.01)  # from SEQ_MAX - 5 up to 5: six numbers either side of the wrap
    assert cc.congestion_window == 16 + 12


def test_float_clock_values_do_not_skip_a_syn() -> None:
    cc = native(now=0.1)
    ack(cc, 1010, now=0.1 + SYN_INTERVAL)  # 0.11000000000000001 s
    assert cc.congestion_window == 28


def test_slow_start_ends_when_the_window_passes_the_flow_window() -> None:
    cc = native(window=28)
    ack(cc, 1010, now=0.01)
    assert cc.in_slow_start  # 28 is not past 28
    ack(cc, 1020, now=0.02, rate=800)
    assert not cc.in_slow_start
    # Period 1/receive rate (1250 µs), then the same SYN's increase by the
    # minimum 0.01 packet (capacity 1 leaves no spare): 1250e4 / (12.5 + 1e4).
    assert period_us(cc) == pytest.approx(1250 * 10_000 / (1250 * 0.01 + 10_000))
    assert cc.congestion_window == 28  # 4.11's own window overshoots to 39


def test_slow_start_without_a_receive_rate_uses_one_window_per_rtt_plus_syn() -> None:
    cc = native(window=20)
    ack(cc, 1010, now=0.01, rtt=0.09, rate=0)
    # (RTT + SYN) / window = 100000 µs / 28, then the minimum increase.
    start = 100_000 / 28
    assert period_us(cc) == pytest.approx(start * 10_000 / (start * 0.01 + 10_000))


# -- rate increase every SYN (ccc.cpp onACK) -------------------------------------------


def test_rate_increases_by_the_minimum_when_the_link_has_no_spare_capacity() -> None:
    cc = after_slow_start(rate=1000)  # 1000 µs: 1000 packets/s
    ack(cc, 1010, now=0.01, capacity=1)
    # inc = 0.01 packet per SYN: one packet per second more, 1001 packets/s.
    assert 1 / cc.packet_send_period == pytest.approx(1001)
    ack(cc, 1020, now=0.02, capacity=1)
    assert 1 / cc.packet_send_period == pytest.approx(1002)


def test_rate_increase_is_sized_by_a_ninth_of_the_link_until_the_last_decrease_rate() -> None:
    cc = after_slow_start(rate=1000)
    ack(cc, 1010, now=0.01, capacity=100_000)
    # B = 100000 - 1000 = 99000, but the period (1000 µs) is above the one of the
    # last decrease (1 µs at start), so B = 100000 / 9 = 11111 packets/s.
    # 11111 * 1500 * 8 = 1.33e8 bits/s: 10^9 * 1.5e-6 / 1500 = 1 packet per SYN,
    # 100 packets/s more.
    assert 1 / cc.packet_send_period == pytest.approx(1100)


def test_rate_increase_uses_the_whole_spare_capacity_above_the_last_decrease_rate() -> None:
    cc = after_slow_start(rate=1000)
    nak(cc, ISN)  # decrease at 1000 µs: the next increases are measured against it
    assert period_us(cc) == 1125
    rates = []
    for syn in range(1, 5):
        ack(cc, 1010, now=syn * SYN_INTERVAL, capacity=100_000)
        rates.append(1 / cc.packet_send_period)
    # SYN 1 is frozen by the loss. SYN 2 and 3: below the rate of the last
    # decrease, B = 100000 / 9 = 11111, 1 packet per SYN. SYN 4: above it, all of
    # B = 100000 - 1089 = 98911 packets/s; 98911 * 1500 * 8 = 1.19e9 bits/s, so
    # 10^10 * 1.5e-6 / 1500 = 10 packets per SYN, 1000 packets/s more.
    assert rates == pytest.approx(
        [1e6 / 1125, 1e6 / 1125 + 100, 1e6 / 1125 + 200, 1e6 / 1125 + 1200]
    )


def test_window_after_slow_start_is_receive_rate_times_rtt_plus_syn_plus_16() -> None:
    cc = after_slow_start()
    ack(cc, 1010, now=0.01, rtt=0.05, rate=1000)
    assert cc.congestion_window == pytest.approx(1000 * (0.05 + 0.01) + 16)
    ack(cc, 1020, now=0.02, rtt=0.2, rate=0)
    assert cc.congestion_window == 16


def test_acks_within_one_syn_change_nothing_after_slow_start() -> None:
    cc = after_slow_start()
    ack(cc, 1010, now=0.01)
    before = (cc.packet_send_period, cc.congestion_window)
    ack(cc, 1020, now=0.019999, rate=5000, capacity=10**6)
    assert (cc.packet_send_period, cc.congestion_window) == before


# -- loss (ccc.cpp onLoss) -------------------------------------------------------------


def test_loss_in_slow_start_sets_the_receive_rate_and_decreases_nothing() -> None:
    cc = native(receive_rate=2000)
    nak(cc, ISN)
    assert not cc.in_slow_start
    assert period_us(cc) == 500  # 1 / 2000 packets/s, not 500 * 1.125
    ack(cc, 1010, now=0.01, rate=2000)  # and no freeze: 4.11 returns before m_bLoss
    assert period_us(cc) < 500


def test_loss_in_slow_start_without_a_receive_rate_decreases_from_the_window() -> None:
    cc = native(receive_rate=0, rtt=0.1)
    nak(cc, ISN)
    # (RTT + SYN) / window = 110000 / 16 = 6875 µs, then ceil(6875 * 1.125).
    assert period_us(cc) == 7735


def test_a_new_epoch_decreases_once_by_an_eighth_rounded_up_to_a_microsecond() -> None:
    cc = after_slow_start(rate=3000)  # 333.33 µs
    sent(cc, 1099)
    nak(cc, 1050)
    assert period_us(cc) == math.ceil(1e6 / 3000 * 1.125) == 375


def test_the_sending_rate_is_frozen_for_one_syn_after_a_loss() -> None:
    cc = after_slow_start(rate=1000)
    nak(cc, ISN)
    ack(cc, 1010, now=0.01, rate=2000, rtt=0.05)
    assert period_us(cc) == 1125
    assert cc.congestion_window == pytest.approx(2000 * 0.06 + 16)  # the window still moves
    ack(cc, 1020, now=0.02)
    assert period_us(cc) < 1125


def test_even_a_nak_that_decreases_nothing_freezes_the_next_syn() -> None:
    cc = after_slow_start(rate=1000)
    sent(cc, 1099)
    for _ in range(6):
        nak(cc, 1050)  # a new epoch, four more decreases, then the budget is spent
    spent = period_us(cc)
    ack(cc, 1010, now=0.01)  # unfreezes
    ack(cc, 1020, now=0.02)
    increased = period_us(cc)
    assert increased < spent
    nak(cc, 1050)  # no decrease left in this epoch...
    assert period_us(cc) == increased
    ack(cc, 1030, now=0.03)  # ...yet m_bLoss holds the rate for a SYN
    assert period_us(cc) == increased


def test_at_most_five_decreases_per_epoch_with_a_random_threshold_of_one() -> None:
    cc = after_slow_start(rate=1000)
    sent(cc, 1099)
    periods = []
    for _ in range(7):
        nak(cc, 1050)  # never after the last decrease's largest sent number
        periods.append(period_us(cc))
    # 1000 -> 1125 -> 1266 -> 1425 -> 1604 -> 1805, then no more: 0.875^5 = 0.51.
    assert periods == [1125, 1266, 1425, 1604, 1805, 1805, 1805]


def test_a_loss_after_the_last_decrease_starts_a_new_epoch() -> None:
    cc = after_slow_start(rate=1000)
    sent(cc, 1099)
    for _ in range(6):
        nak(cc, 1050)  # epoch spent at 1805 µs; last decrease at largest sent 1099
    sent(cc, 1199)
    nak(cc, 1099)  # not after 1099: same epoch
    assert period_us(cc) == 1805
    nak(cc, 1100)  # sent after the last decrease: new epoch
    assert period_us(cc) == math.ceil(1805 * 1.125)


def test_a_retransmission_does_not_move_the_last_decrease_sequence_back() -> None:
    cc = after_slow_start(rate=1000)
    sent(cc, 1099)
    sent(cc, 1050)  # a retransmission
    for _ in range(6):
        nak(cc, 1010)
    spent = period_us(cc)
    nak(cc, 1080)  # before 1099, so the spent epoch still holds
    assert period_us(cc) == spent


def test_the_random_threshold_spaces_decreases_by_the_average_nak_count() -> None:
    draws = iter([0.5, 0.5, 0.9])
    cc = after_slow_start(rate=1000, random=lambda: next(draws))
    largest = ISN
    # Epochs of five NAKs each: the average NAK count goes 0 -> 1 -> 2
    # (ceil(avg * 0.875 + naks * 0.125)); the NAK counter stops at five.
    for _ in range(2):
        largest = seq_inc(largest, 100)
        sent(cc, largest)
        for _ in range(5):
            nak(cc, seq_inc(largest, -10))
    largest = seq_inc(largest, 100)
    sent(cc, largest)
    before = period_us(cc)
    periods = []
    for _ in range(5):
        nak(cc, seq_inc(largest, -10))
        periods.append(period_us(cc))
    # The third epoch draws 0.9: ceil(2 * 0.9) = 2, so after the epoch's first
    # decrease only every second NAK decreases (NAK 2 and 4).
    first = math.ceil(before * 1.125)
    second = math.ceil(first * 1.125)
    third = math.ceil(second * 1.125)
    assert periods == [first, second, second, third, third]


def test_a_zero_draw_still_decreases_on_every_nak() -> None:
    cc = after_slow_start(rate=1000, random=lambda: 0.0)
    sent(cc, 1099)
    nak(cc, 1050)
    nak(cc, 1050)
    assert period_us(cc) == math.ceil(1125 * 1.125)


def test_a_nak_range_reacts_to_its_first_sequence_number() -> None:
    cc = after_slow_start(rate=1000)
    sent(cc, 1099)
    for _ in range(6):
        nak(cc, 1010)
    spent = period_us(cc)
    cc.on_loss(losses=((1090, 1150), (1160, 1160)), now=0.0)
    assert period_us(cc) == spent  # 1090 is before 1099; the ranges after it do not count


def test_an_empty_loss_list_is_ignored() -> None:
    cc = native()
    cc.on_loss(losses=(), now=0.0)
    assert cc.in_slow_start


# -- timeout (ccc.cpp onTimeout) -------------------------------------------------------


def test_timeout_leaves_slow_start_at_the_receive_rate() -> None:
    cc = native(receive_rate=4000)
    cc.on_timeout(now=1.0)
    assert not cc.in_slow_start
    assert period_us(cc) == 250


def test_timeout_without_a_receive_rate_uses_one_window_per_rtt_plus_syn() -> None:
    cc = native(receive_rate=0, rtt=0.07)
    cc.on_timeout(now=1.0)
    assert period_us(cc) == pytest.approx(80_000 / 16)


def test_timeout_after_slow_start_changes_nothing() -> None:
    # 4.11 has the doubling of the period commented out in onTimeout.
    cc = after_slow_start(rate=1000)
    before = (cc.packet_send_period, cc.congestion_window, cc.in_slow_start)
    cc.on_timeout(now=1.0)
    cc.on_timeout(now=2.0)
    assert (cc.packet_send_period, cc.congestion_window, cc.in_slow_start) == before


# -- bounds -----------------------------------------------------------------------------


def test_window_is_capped_at_the_flow_window() -> None:
    cc = after_slow_start(window=100)
    ack(cc, 1010, now=0.01, rate=1_000_000, rtt=1.0)
    assert cc.congestion_window == 100


def test_window_never_reports_below_two_packets() -> None:
    cc = native(window=2)
    assert cc.congestion_window == 2


def test_period_stops_at_one_second() -> None:
    cc = after_slow_start(rate=2)  # 500000 µs
    largest = ISN
    for _ in range(10):
        largest = seq_inc(largest, 10)
        sent(cc, largest)
        nak(cc, largest)
    assert cc.packet_send_period == MAX_PACKET_SEND_PERIOD


def test_hostile_estimates_count_as_none() -> None:
    cc = native(window=20)
    ack(cc, 1010, now=0.01, rtt=-1.0, rate=-5, capacity=-7)
    assert not cc.in_slow_start
    assert math.isfinite(cc.packet_send_period)
    assert cc.packet_send_period > 0
    nak(cc, 1005)
    ack(cc, 1020, now=0.02, rtt=-0.01, rate=-1, capacity=-(2**31))
    ack(cc, 1030, now=0.03, rtt=-0.01, rate=-1, capacity=-(2**31))
    assert math.isfinite(cc.packet_send_period)
    assert cc.packet_send_period > 0
    assert cc.congestion_window == 16


# -- caller errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("isn", "window", "mss", "message"),
    [
        (-1, 8192, 1500, "initial sequence number -1 is not a 31-bit number"),
        (SEQ_MAX + 1, 8192, 1500, "initial sequence number 2147483648 is not a 31-bit number"),
        (ISN, 1, 1500, "flow window 1 is below 2 packets"),
        (ISN, 8192, 0, "MSS 0 is not positive"),
    ],
)
def test_constructor_refuses_impossible_settings(
    isn: int, window: int, mss: int, message: str
) -> None:
    with pytest.raises(LocalProtocolError, match=f"^{re.escape(message)}$"):
        native(isn=isn, window=window, mss=mss)


@pytest.mark.parametrize("draw", [-0.1, 1.5, math.nan])
def test_a_random_source_outside_zero_to_one_is_a_caller_error(draw: float) -> None:
    cc = after_slow_start(random=lambda: draw)
    with pytest.raises(LocalProtocolError, match=r"^the random source returned"):
        nak(cc, ISN)


# -- against libudt 4.11 -----------------------------------------------------------------

# Printed by a throw-away C++ program that drove the CUDTCC object code of Debian's
# libudt 4.11 (ccc.o from libudt-dev 4.11+dfsg1-1+b1's libudt.a), linked with a
# stub clock and a stub rand(): the setters core.cpp calls (setRTT, setRcvRate,
# setBandwidth, setSndCurrSeqNo), then onACK / onLoss / onTimeout, and after each
# event m_bSlowStart, m_dPktSndPeriod (µs) and m_dCWndSize. Times are µs; "rand"
# sets what rand() returns (of RAND_MAX = 2**31 - 1). Initial values: ISN 1000,
# MSS 1500, flow window 100, RTT 100 ms, receive rate 16, capacity 1.
# The same program agreed with UdtNativeCongestion, bit for bit, over 2000 random
# event sequences (rates > 0, as 4.11's connection always has them).
RAND_MAX = 2**31 - 1
LIBUDT_TRACE: list[tuple[str, tuple[int, ...], bool, float, float]] = [
    ("sent", (1019,), True, 1, 16),
    ("ack", (5000, 1010, 60000, 800, 1), True, 1, 16),
    ("ack", (10000, 1010, 60000, 800, 1), True, 1, 28),
    ("sent", (1059,), True, 1, 28),
    ("ack", (20000, 1040, 55000, 900, 20000), True, 1, 59),
    ("sent", (1099,), True, 1, 59),
    ("ack", (30000, 1080, 52000, 950, 20000), True, 1, 100),
    ("ack", (40000, 1100, 50000, 1000, 20000), False, 990.09900990099015, 121),
    ("sent", (1199,), False, 990.09900990099015, 121),
    ("ack", (50000, 1150, 50000, 1000, 20000), False, 980.3921568627452, 76),
    ("rand", (1073741823,), False, 980.3921568627452, 76),
    ("loss", (52000, 1160), False, 1103, 76),
    ("ack", (60000, 1170, 50000, 1000, 20000), False, 1103, 76),
    ("ack", (70000, 1190, 50000, 1000, 20000), False, 1090.9666379830471, 76),
    ("loss", (71000, 1195), False, 1228, 76),
    ("loss", (72000, 1196), False, 1382, 76),
    ("sent", (1299,), False, 1382, 76),
    ("loss", (73000, 1197), False, 1555, 76),
    ("loss", (74000, 1198), False, 1750, 76),
    ("loss", (75000, 1199), False, 1750, 76),
    ("loss", (76000, 1199), False, 1750, 76),
    ("ack", (80000, 1250, 50000, 1000, 20000), False, 1750, 76),
    ("loss", (81000, 1260), False, 1750, 76),
    ("ack", (90000, 1280, 50000, 1000, 20000), False, 1750, 76),
    ("ack", (100000, 1300, 50000, 1000, 20000), False, 1719.9017199017198, 76),
    ("sent", (1399,), False, 1719.9017199017198, 76),
    ("rand", (1932735282,), False, 1719.9017199017198, 76),
    ("loss", (101000, 1350), False, 1935, 76),
    ("loss", (102000, 1351), False, 2177, 76),
    ("loss", (103000, 1352), False, 2450, 76),
    ("loss", (104000, 1353), False, 2757, 76),
    ("loss", (105000, 1354), False, 3102, 76),
    ("ack", (110000, 1360, 50000, 1000, 20000), False, 3102, 76),
    ("sent", (1499,), False, 3102, 76),
    ("loss", (111000, 1450), False, 3490, 76),
    ("loss", (112000, 1451), False, 3927, 76),
    ("loss", (113000, 1452), False, 3927, 76),
    ("loss", (114000, 1453), False, 4418, 76),
    ("loss", (115000, 1454), False, 4418, 76),
    ("timeout", (120000,), False, 4418, 76),
    ("ack", (130000, 1470, 50000, 1000, 20000), False, 4418, 76),
    ("ack", (140000, 1490, 50000, 1000, 20000), False, 4231.0712712367604, 76),
]


def test_matches_libudt_4_11_event_for_event() -> None:
    draw = [0.0]
    cc = native(window=100, random=lambda: draw[0])
    for event, args, slow_start, expected_period_us, window in LIBUDT_TRACE:
        if event == "sent":
            sent(cc, args[0])
        elif event == "rand":
            draw[0] = args[0] / RAND_MAX
        elif event == "ack":
            now, seq, rtt, rate, capacity = args
            ack(cc, seq, now * US, rtt=rtt * US, rate=rate, capacity=capacity)
        elif event == "loss":
            nak(cc, args[1], now=args[0] * US)
        else:
            cc.on_timeout(now=args[0] * US)
        assert cc.in_slow_start is slow_start, (event, args)
        assert cc.packet_send_period == expected_period_us / 1e6, (event, args)
        assert cc.congestion_window == min(window, 100), (event, args)
