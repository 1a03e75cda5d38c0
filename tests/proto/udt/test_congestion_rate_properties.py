"""Hypothesis properties of the delivery-rate control under any sequence of hooks."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wavesync_proto.udt.congestion import MAX_PACKET_SEND_PERIOD, MIN_CONGESTION_WINDOW
from wavesync_proto.udt.congestion_rate import DeliveryRateCongestion

from .test_congestion_properties import (
    Acked,
    Event,
    Lost,
    Sent,
    apply,
    events,
    rtts,
    seqs,
    steps,
)


def controls() -> st.SearchStrategy[tuple[DeliveryRateCongestion, int]]:
    return st.builds(
        lambda isn, window, draw: (
            DeliveryRateCongestion(
                initial_sequence_number=isn, max_flow_window=window, random=lambda: draw, now=0.0
            ),
            window,
        ),
        seqs,
        st.integers(MIN_CONGESTION_WINDOW, 1 << 20) | st.sampled_from([2, 16, 8192]),
        st.floats(0.0, 1.0),
    )


# Runs of new packets, then an ACK or NAK of some of them: closer to what a connection
# does than independent numbers, so the model's paths (rounds, samples) are reached.
@st.composite
def flows(draw: st.DrawFn) -> list[tuple[float, Event]]:
    start = draw(seqs)
    timeline: list[tuple[float, Event]] = []
    sent = acked = 0
    for _ in range(draw(st.integers(0, 40))):
        kind = draw(st.sampled_from(["send", "ack", "nak", "other"]))
        step = draw(steps)
        if kind == "send":
            for _ in range(draw(st.integers(1, 50))):
                timeline.append((0.0, Sent((start + sent) & 0x7FFFFFFF)))
                sent += 1
            timeline[-1] = (step, timeline[-1][1])
        elif kind == "ack" and sent > acked:
            acked = draw(st.integers(acked + 1, sent))
            rtt = draw(rtts)
            timeline.append((step, Acked((start + acked) & 0x7FFFFFFF, rtt, rtt / 2, 0, 0)))
        elif kind == "nak" and sent > acked + 1:
            first = draw(st.integers(acked, sent - 2))
            last = draw(st.integers(first, sent - 2))
            losses = (((start + first) & 0x7FFFFFFF, (start + last) & 0x7FFFFFFF),)
            timeline.append((step, Lost(losses)))
        else:
            timeline.append((step, draw(events)))
    return timeline


def check(cc: DeliveryRateCongestion, window: int) -> None:
    period = cc.packet_send_period
    assert math.isfinite(period)
    assert 0.0 < period <= MAX_PACKET_SEND_PERIOD
    assert MIN_CONGESTION_WINDOW <= cc.congestion_window <= window
    assert math.isfinite(cc.bottleneck_rate)
    assert cc.bottleneck_rate >= 0.0


@pytest.mark.property
@given(controls(), st.lists(st.tuples(steps, events), max_size=60))
def test_any_hooks_keep_the_outputs_finite_positive_and_bounded(
    control: tuple[DeliveryRateCongestion, int], timeline: list[tuple[float, Event]]
) -> None:
    cc, window = control
    now = 0.0
    for step, event in timeline:
        now += step
        apply(cc, event, now)  # type: ignore[arg-type]
        check(cc, window)


@pytest.mark.property
@given(controls(), flows())
def test_plausible_flows_keep_the_outputs_finite_positive_and_bounded(
    control: tuple[DeliveryRateCongestion, int], timeline: list[tuple[float, Event]]
) -> None:
    cc, window = control
    now = 0.0
    for step, event in timeline:
        now += step
        apply(cc, event, now)  # type: ignore[arg-type]
        check(cc, window)
