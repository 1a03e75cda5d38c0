"""Hypothesis properties of UDT 4.11's native congestion control under any event sequence."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wavesync_proto.udt.congestion import (
    MAX_PACKET_SEND_PERIOD,
    MIN_CONGESTION_WINDOW,
    UdtNativeCongestion,
)
from wavesync_proto.udt.seqnum import SEQ_MAX, seq_inc


@dataclass(frozen=True)
class Sent:
    sequence_number: int


@dataclass(frozen=True)
class Acked:
    sequence_number: int
    rtt: float
    rtt_variance: float
    receive_rate: int
    link_capacity: int


@dataclass(frozen=True)
class Lost:
    losses: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class TimedOut:
    pass


@dataclass(frozen=True)
class Ticked:
    pass


Event = Sent | Acked | Lost | TimedOut | Ticked

i32 = st.integers(-(1 << 31), (1 << 31) - 1)
seqs = st.integers(0, SEQ_MAX) | st.sampled_from([0, 1, SEQ_MAX, 0x3FFFFFFF, 0x40000000])
# Estimates as an ACK can carry them (int32, µs), plus the realistic ones more often.
rtts = st.floats(-10.0, 100.0, allow_nan=False) | st.sampled_from([0.0, 0.0001, 0.1, 30.0])
rates = i32 | st.integers(0, 200_000) | st.sampled_from([0, 1, 2, 16])
loss_ranges = st.builds(lambda first, n: (first, seq_inc(first, n)), seqs, st.integers(0, 1000))
# Clock steps, seconds: whole SYNs, less, much more, and a little backwards.
steps = st.floats(-0.05, 5.0, allow_nan=False) | st.sampled_from([0.0, 0.01, 0.009999, 0.02])

events: st.SearchStrategy[Event] = st.one_of(
    st.builds(Sent, seqs),
    st.builds(Acked, seqs, rtts, rtts, rates, rates),
    st.builds(Lost, st.lists(loss_ranges, max_size=3).map(tuple)),
    st.just(TimedOut()),
    st.just(Ticked()),
)
controls = st.builds(
    lambda isn, window, mss, rtt, rate, capacity, draws: (
        UdtNativeCongestion(
            initial_sequence_number=isn,
            max_flow_window=window,
            random=lambda: draws.pop(0) if draws else 0.5,
            now=0.0,
            mss=mss,
            rtt=rtt,
            receive_rate=rate,
            link_capacity=capacity,
        ),
        window,
    ),
    seqs,
    st.integers(MIN_CONGESTION_WINDOW, 1 << 20) | st.sampled_from([2, 16, 8192, 25600]),
    st.integers(1, 65535) | st.just(1500),
    rtts,
    rates,
    rates,
    st.lists(st.floats(0.0, 1.0), max_size=20),
)


def apply(cc: UdtNativeCongestion, event: Event, now: float) -> None:
    if isinstance(event, Sent):
        cc.on_packet_sent(sequence_number=event.sequence_number, now=now)
    elif isinstance(event, Acked):
        cc.on_ack(
            sequence_number=event.sequence_number,
            rtt=event.rtt,
            rtt_variance=event.rtt_variance,
            receive_rate=event.receive_rate,
            link_capacity=event.link_capacity,
            now=now,
        )
    elif isinstance(event, Lost):
        cc.on_loss(losses=event.losses, now=now)
    elif isinstance(event, TimedOut):
        cc.on_timeout(now=now)
    else:
        cc.on_ack_timer(now=now)


@pytest.mark.property
@given(controls, st.lists(st.tuples(steps, events), max_size=60))
def test_period_stays_finite_and_window_within_bounds(
    control: tuple[UdtNativeCongestion, int], timeline: list[tuple[float, Event]]
) -> None:
    cc, max_flow_window = control
    now = 0.0
    for step, event in timeline:
        now += step
        apply(cc, event, now)
        period = cc.packet_send_period
        assert math.isfinite(period)
        assert 0.0 <= period <= MAX_PACKET_SEND_PERIOD
        assert MIN_CONGESTION_WINDOW <= cc.congestion_window <= max_flow_window


@pytest.mark.property
@given(controls, st.lists(st.tuples(steps, events), max_size=60))
def test_after_slow_start_acks_only_raise_the_rate_and_losses_only_lower_it(
    control: tuple[UdtNativeCongestion, int], timeline: list[tuple[float, Event]]
) -> None:
    # The DAIMD directions: once slow start is over, an ACK may only shorten
    # the period, a NAK may only lengthen it, nothing else moves it, and slow
    # start never comes back.
    cc, _ = control
    now = 0.0
    for step, event in timeline:
        now += step
        was_slow, before = cc.in_slow_start, cc.packet_send_period
        apply(cc, event, now)
        after = cc.packet_send_period
        if not was_slow:
            assert not cc.in_slow_start
            if isinstance(event, Acked):
                assert after <= before
            elif isinstance(event, Lost):
                assert after >= before
            else:
                assert after == before
