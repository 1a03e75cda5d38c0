"""Hypothesis properties of the lossy network simulator over random links and traffic.

Each example builds one network of two endpoints with random configs for each
direction, then plays a random schedule of sends and polls in rising virtual
time. Every datagram carries its own number, so each delivery can be traced
back to the send it came from.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wavesync_proto.addresses import Endpoint

from .netsim import Delivery, GilbertElliott, LinkConfig, Network

A: Endpoint = ("192.0.2.1", 9000)
B: Endpoint = ("2001:db8::2", 9000)
LARGEST = 1_600

probabilities = st.floats(0.0, 1.0)
durations = st.floats(0.0, 0.5)
bursts = st.builds(
    GilbertElliott,
    good_to_bad=st.floats(0.001, 1.0),
    bad_to_good=probabilities,
    loss_in_good=probabilities,
    loss_in_bad=probabilities,
)


@st.composite
def link_configs(draw: st.DrawFn) -> LinkConfig:
    reorder = draw(st.sampled_from([0.0, 0.1, 1.0]) | probabilities)
    bandwidth = draw(st.none() | st.floats(1e3, 1e9))
    return LinkConfig(
        delay=draw(durations),
        jitter=draw(st.sampled_from([0.0]) | durations),
        loss=draw(st.sampled_from([0.0]) | probabilities),
        burst=draw(st.none() | bursts),
        duplicate=draw(st.sampled_from([0.0]) | probabilities),
        reorder=reorder,
        reorder_delay=draw(st.floats(0.001, 0.5)) if reorder else 0.0,
        bandwidth=bandwidth,
        queue_limit=draw(st.none() | st.integers(1, 20_000)) if bandwidth else None,
        mtu=draw(st.none() | st.integers(1, LARGEST)),
    )


def perfect(config: LinkConfig) -> LinkConfig:
    """The same link without anything that loses or copies a datagram."""
    return replace(config, loss=0.0, burst=None, duplicate=0.0, queue_limit=None, mtu=None)


def in_order(config: LinkConfig) -> LinkConfig:
    return replace(config, reorder=0.0, reorder_delay=0.0)


@dataclass(frozen=True)
class Burst:
    """One step of a schedule: wait, send a burst from each side, then maybe poll."""

    wait: float
    from_a: int
    from_b: int
    gap: float
    """Seconds between the burst's sends, which alternate A, B, A, B, ..."""
    sizes: list[int]
    """Datagram sizes, used in turn."""
    poll: str
    """"none"; "now": poll at the burst's end; "next": poll at the next arrival, the
    instant the driver picks (so arrivals at exactly the poll time get exercised)."""


bursts_of_traffic = st.builds(
    Burst,
    wait=st.sampled_from([0.0]) | st.floats(0.0, 0.5),
    from_a=st.integers(0, 60),
    from_b=st.integers(0, 60),
    gap=st.sampled_from([0.0]) | st.floats(0.0, 0.01),
    sizes=st.lists(st.integers(4, LARGEST), min_size=1, max_size=6),
    poll=st.sampled_from(["none", "now", "next"]),
)
schedules = st.lists(bursts_of_traffic, max_size=12)
seeds = st.integers(0, 2**32)


@dataclass
class Run:
    network: Network
    sent: list[tuple[Endpoint, float, int]]
    """Per datagram number: where it was sent from, when, and how many polls came before."""
    polls: list[tuple[float, list[Delivery]]]
    """Each poll's time and what it handed out; the final drain is last."""

    @property
    def deliveries(self) -> list[Delivery]:
        return [delivery for _, delivered in self.polls for delivery in delivered]


def play(seed: int, forward: LinkConfig, backward: LinkConfig, schedule: list[Burst]) -> Run:
    network = Network(seed)
    network.link(A, B, forward, reverse=backward)
    run = Run(network, [], [])
    now = 0.0
    for burst in schedule:
        now += burst.wait
        pairs = itertools.zip_longest([A] * burst.from_a, [B] * burst.from_b)
        sources = [source for pair in pairs for source in pair if source is not None]
        for size, source in zip(itertools.cycle(burst.sizes), sources, strict=False):
            data = len(run.sent).to_bytes(4, "big") + bytes(size - 4)
            run.sent.append((source, now, len(run.polls)))
            network.send(source, B if source == A else A, data, now)
            now += burst.gap
        upcoming = network.next_delivery_time()
        if burst.poll == "next" and upcoming is not None:
            now = max(now, upcoming)
        if burst.poll != "none":
            run.polls.append((now, network.deliveries_until(now)))
    drained = network.drain()
    run.polls.append((network.now, drained))
    return run


def number(delivery: Delivery) -> int:
    return int.from_bytes(delivery.data[:4], "big")


@pytest.mark.property
@given(seeds, link_configs(), link_configs(), schedules)
def test_without_loss_or_duplication_every_datagram_arrives_exactly_once(
    seed: int,
    forward: LinkConfig,
    backward: LinkConfig,
    schedule: list[Burst],
) -> None:
    run = play(seed, perfect(forward), perfect(backward), schedule)
    assert Counter(number(delivery) for delivery in run.deliveries) == Counter(range(len(run.sent)))
    for delivery in run.deliveries:
        assert delivery.source == run.sent[number(delivery)][0]
        assert delivery.destination != delivery.source


@pytest.mark.property
@given(seeds, link_configs(), link_configs(), schedules)
def test_nothing_arrives_before_its_send_time_plus_the_base_delay(
    seed: int,
    forward: LinkConfig,
    backward: LinkConfig,
    schedule: list[Burst],
) -> None:
    run = play(seed, forward, backward, schedule)
    for delivery in run.deliveries:
        source, sent_at, _ = run.sent[number(delivery)]
        delay = (forward if source == A else backward).delay
        assert delivery.time >= sent_at + delay


@pytest.mark.property
@given(seeds, link_configs(), link_configs(), schedules)
def test_deliveries_come_out_in_time_order_and_each_at_its_poll(
    seed: int,
    forward: LinkConfig,
    backward: LinkConfig,
    schedule: list[Burst],
) -> None:
    run = play(seed, forward, backward, schedule)
    times = [delivery.time for delivery in run.deliveries]
    assert times == sorted(times)
    for poll, (polled_at, delivered) in enumerate(run.polls):
        for delivery in delivered:
            # Handed out by the first poll at or after its arrival: not later,
            # unless it was sent after the poll before (at that same instant).
            assert delivery.time <= polled_at
            if poll > 0 and run.sent[number(delivery)][2] < poll:
                assert delivery.time > run.polls[poll - 1][0]


@pytest.mark.property
@given(seeds, link_configs(), link_configs(), schedules)
def test_without_reordering_each_direction_keeps_its_send_order(
    seed: int,
    forward: LinkConfig,
    backward: LinkConfig,
    schedule: list[Burst],
) -> None:
    """FIFO per direction, jitter or not: only `reorder` lets a datagram overtake another."""
    run = play(seed, in_order(forward), in_order(backward), schedule)
    for source in (A, B):
        numbers = [number(delivery) for delivery in run.deliveries if delivery.source == source]
        assert all(earlier <= later for earlier, later in itertools.pairwise(numbers))
        assert run.network.links[source, A if source == B else B].stats.out_of_order == 0


@pytest.mark.property
@given(seeds, link_configs(), link_configs(), schedules)
def test_a_seed_replays_a_run_and_every_datagram_is_accounted_for(
    seed: int,
    forward: LinkConfig,
    backward: LinkConfig,
    schedule: list[Burst],
) -> None:
    run = play(seed, forward, backward, schedule)
    assert play(seed, forward, backward, schedule).polls == run.polls
    for link in run.network.links.values():
        stats = link.stats
        assert stats.in_flight == 0
        dropped = stats.lost + stats.queue_dropped + stats.mtu_dropped
        assert stats.delivered == stats.sent - dropped + stats.duplicated
        assert stats.out_of_order <= stats.delivered
    assert len(run.deliveries) == sum(link.stats.delivered for link in run.network.links.values())
