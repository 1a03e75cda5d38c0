"""The lossy network simulator (tests/netsim.py): each impairment, determinism, and the driver.

Everything runs in virtual time from fixed seeds, so the statistical
assertions are about counts from one reproducible run, with bounds wide enough
(several standard deviations) that they state the model rather than the seed.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest

from wavesync_proto.addresses import Endpoint

from .netsim import (
    Delivery,
    GilbertElliott,
    LinkConfig,
    Network,
    NoRouteError,
    SansIoEndpoint,
    SimulationError,
    StalledError,
    StepBudgetError,
    run_until,
)

A: Endpoint = ("192.0.2.1", 9000)
B: Endpoint = ("198.51.100.2", 9000)
C: Endpoint = ("2001:db8::3", 9000)
SEED = 4


def numbered(index: int, size: int = 8) -> bytes:
    return index.to_bytes(4, "big") + bytes(size - 4)


def number(data: bytes) -> int:
    return int.from_bytes(data[:4], "big")


def send_many(
    network: Network, count: int, *, size: int = 8, gap: float = 0.001, start: float = 0.0
) -> None:
    for index in range(count):
        network.send(A, B, numbered(index, size), start + index * gap)


def within(observed: int, trials: int, p: float, sigmas: float = 5.0) -> bool:
    """Whether a binomial count is within `sigmas` standard deviations of its mean."""
    return abs(observed - trials * p) <= sigmas * math.sqrt(trials * p * (1 - p))


def burst_lengths(lost: list[bool]) -> list[int]:
    runs: list[int] = []
    length = 0
    for gone in [*lost, False]:
        if gone:
            length += 1
        elif length:
            runs.append(length)
            length = 0
    return runs


# --- The toy endpoints that prove the driver ---------------------------------------


class Echo:
    """Answers every datagram to where it came from."""

    def __init__(self) -> None:
        self.outbox: list[tuple[bytes, Endpoint]] = []

    def receive_datagram(self, data: bytes, addr: Endpoint, now: float) -> None:
        self.outbox.append((data, addr))

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Endpoint]]:
        outbox, self.outbox = self.outbox, []
        return outbox

    def get_timer(self) -> float | None:
        return None

    def handle_timer(self, now: float) -> None:
        raise AssertionError("Echo has no timer")


class Pinger:
    """Sends `count` numbered pings every `interval` from its timer; notes each round trip."""

    def __init__(self, peer: Endpoint, count: int, interval: float, start: float = 0.0) -> None:
        self.peer = peer
        self.count = count
        self.interval = interval
        self.next_ping = start
        self.sent: list[float] = []
        self.rtts: dict[int, float] = {}
        self.outbox: list[tuple[bytes, Endpoint]] = []

    def receive_datagram(self, data: bytes, addr: Endpoint, now: float) -> None:
        assert addr == self.peer
        self.rtts.setdefault(number(data), now - self.sent[number(data)])

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Endpoint]]:
        outbox, self.outbox = self.outbox, []
        return outbox

    def get_timer(self) -> float | None:
        return self.next_ping if len(self.sent) < self.count else None

    def handle_timer(self, now: float) -> None:
        self.outbox.append((numbered(len(self.sent)), self.peer))
        self.sent.append(now)
        self.next_ping += self.interval


class StopAndWaitSender:
    """Sends `payload` one numbered chunk at a time, resending on a fixed timeout."""

    def __init__(self, peer: Endpoint, payload: bytes, *, chunk: int, timeout: float) -> None:
        self.peer = peer
        self.chunks = [payload[at : at + chunk] for at in range(0, len(payload), chunk)]
        self.timeout = timeout
        self.acked = 0
        self.deadline: float | None = 0.0  # the first send is a timer firing at once
        self.transmissions = 0
        self.outbox: list[tuple[bytes, Endpoint]] = []

    @property
    def done(self) -> bool:
        return self.acked == len(self.chunks)

    def receive_datagram(self, data: bytes, addr: Endpoint, now: float) -> None:
        if number(data) == self.acked and not self.done:
            self.acked += 1
            self.deadline = None
            if not self.done:
                self._transmit(now)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Endpoint]]:
        outbox, self.outbox = self.outbox, []
        return outbox

    def get_timer(self) -> float | None:
        return self.deadline

    def handle_timer(self, now: float) -> None:
        self._transmit(now)

    def _transmit(self, now: float) -> None:
        self.outbox.append((self.acked.to_bytes(4, "big") + self.chunks[self.acked], self.peer))
        self.transmissions += 1
        self.deadline = now + self.timeout


class StopAndWaitReceiver:
    """Keeps chunks in order and acknowledges every chunk it has, again if asked again."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.expected = 0
        self.outbox: list[tuple[bytes, Endpoint]] = []

    def receive_datagram(self, data: bytes, addr: Endpoint, now: float) -> None:
        index = number(data)
        if index == self.expected:
            self.received += data[4:]
            self.expected += 1
        if index < self.expected:
            self.outbox.append((numbered(index, 4), addr))

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Endpoint]]:
        outbox, self.outbox = self.outbox, []
        return outbox

    def get_timer(self) -> float | None:
        return None

    def handle_timer(self, now: float) -> None:
        raise AssertionError("the receiver has no timer")


class StuckTimer(Echo):
    """A timer that stays in the past however often it fires: the bug the budget catches."""

    def get_timer(self) -> float | None:
        return 1.0

    def handle_timer(self, now: float) -> None:
        pass


# --- The network, one impairment at a time ----------------------------------------


def test_a_perfect_link_delivers_everything_at_the_send_time_plus_delay() -> None:
    network = Network(SEED)
    network.link(A, B, LinkConfig(delay=0.025))
    network.send(A, B, b"one", 1.0)
    network.send(A, B, b"two", 1.0)
    assert network.next_delivery_time() == 1.025
    assert network.deliveries_until(1.02) == []
    assert network.deliveries_until(1.025) == [
        Delivery(A, B, b"one", 1.025),
        Delivery(A, B, b"two", 1.025),
    ]
    assert network.next_delivery_time() is None
    assert network.now == 1.025


def test_the_same_seed_gives_the_same_deliveries_and_another_seed_does_not() -> None:
    config = LinkConfig(
        delay=0.01, jitter=0.005, loss=0.1, duplicate=0.05, reorder=0.1, reorder_delay=0.02
    )

    def log(seed: int) -> list[Delivery]:
        network = Network(seed)
        network.link(A, B, config)
        send_many(network, 2_000)
        return network.drain()

    assert log(SEED) == log(SEED)
    assert log(SEED) != log(SEED + 1)


def test_a_new_link_does_not_change_what_another_link_does() -> None:
    config = LinkConfig(delay=0.01, jitter=0.01, loss=0.2, duplicate=0.1)
    alone = Network(SEED)
    alone.link(A, B, config)
    send_many(alone, 500)
    crowded = Network(SEED)
    crowded.link(A, C, config)
    crowded.link(A, B, config)
    for index in range(500):
        crowded.send(A, C, numbered(index), index * 0.001)
        crowded.send(A, B, numbered(index), index * 0.001)
    assert [d for d in crowded.drain() if d.destination == B] == alone.drain()


@pytest.mark.parametrize("loss", [0.05, 0.3])
def test_the_loss_rate_converges_to_the_configured_probability(loss: float) -> None:
    network = Network(SEED)
    forward, _ = network.link(A, B, LinkConfig(loss=loss))
    send_many(network, 100_000, gap=0.0)
    delivered = network.drain()
    assert within(forward.stats.lost, 100_000, loss)
    assert len(delivered) == forward.stats.delivered == 100_000 - forward.stats.lost


def test_duplicates_happen_are_counted_and_arrive_as_extra_copies() -> None:
    network = Network(SEED)
    forward, _ = network.link(A, B, LinkConfig(delay=0.01, jitter=0.002, duplicate=0.1))
    send_many(network, 10_000)
    copies = Counter(number(delivery.data) for delivery in network.drain())
    assert within(forward.stats.duplicated, 10_000, 0.1)
    assert sorted(set(copies.values())) == [1, 2]
    assert sum(1 for count in copies.values() if count == 2) == forward.stats.duplicated
    assert forward.stats.delivered == 10_000 + forward.stats.duplicated


def test_reordering_holds_back_a_fraction_and_later_datagrams_overtake_them() -> None:
    network = Network(SEED)
    forward, _ = network.link(A, B, LinkConfig(delay=0.01, reorder=0.1, reorder_delay=0.05))
    send_many(network, 10_000)
    order = [number(delivery.data) for delivery in network.drain()]
    assert sorted(order) == list(range(10_000))
    assert within(forward.stats.reordered, 10_000, 0.1)
    overtaken = sum(1 for before, after in itertools.pairwise(order) if after < before)
    assert overtaken > 0
    # A held-back datagram arrives after the ones sent during its extra delay
    # (here up to 50 of them), so it is out of order unless nothing overtook it.
    assert 0.9 * forward.stats.reordered <= forward.stats.out_of_order <= forward.stats.reordered


def test_jitter_varies_the_delay_but_keeps_the_order() -> None:
    network = Network(SEED)
    forward, _ = network.link(A, B, LinkConfig(delay=0.01, jitter=0.004))
    send_many(network, 1_000, gap=0.002)
    deliveries = network.drain()
    assert [number(delivery.data) for delivery in deliveries] == list(range(1_000))
    delays = [delivery.time - number(delivery.data) * 0.002 for delivery in deliveries]
    assert 0.01 - 1e-9 <= min(delays) < 0.0105
    assert 0.0135 < max(delays) <= 0.014 + 1e-9
    assert forward.stats.out_of_order == forward.stats.reordered == 0


def test_bandwidth_spaces_arrivals_by_the_serialization_delay() -> None:
    network = Network(SEED)
    network.link(A, B, LinkConfig(delay=0.05, bandwidth=10_000))
    for _ in range(5):  # a burst: 1,000 bytes each take 0.1 s on the wire
        network.send(A, B, bytes(1_000), 0.0)
    network.send(A, B, bytes(500), 2.0)  # the link idled: it starts at once
    times = [delivery.time for delivery in network.drain()]
    assert times == pytest.approx([0.15, 0.25, 0.35, 0.45, 0.55, 2.1])


def test_a_full_queue_tail_drops_until_it_drains() -> None:
    network = Network(SEED)
    forward, _ = network.link(A, B, LinkConfig(bandwidth=1_000, queue_limit=3_000))
    for index in range(5):
        network.send(A, B, numbered(index, 1_000), 0.0)
    assert forward.stats.queue_dropped == 2
    network.send(A, B, numbered(5, 1_000), 0.5)  # the first is still on the wire
    network.send(A, B, numbered(6, 1_000), 1.0)  # ... and now it is through
    network.send(A, B, numbered(7, 1_500), 1.0)  # 2,000 + 1,000 queued: no room
    deliveries = network.drain()
    assert [number(delivery.data) for delivery in deliveries] == [0, 1, 2, 6]
    assert [delivery.time for delivery in deliveries] == pytest.approx([1.0, 2.0, 3.0, 4.0])
    assert forward.stats.queue_dropped == 4
    assert forward.stats.lost == forward.stats.mtu_dropped == 0


def test_datagrams_over_the_mtu_are_dropped_and_counted() -> None:
    network = Network(SEED)
    forward, _ = network.link(A, B, LinkConfig(mtu=1_472))
    network.send(A, B, bytes(1_472), 0.0)
    network.send(A, B, bytes(1_473), 0.0)
    assert [len(delivery.data) for delivery in network.drain()] == [1_472]
    assert forward.stats.mtu_dropped == 1
    assert forward.stats.bytes_sent == 2_945
    assert forward.stats.bytes_delivered == 1_472


def test_each_direction_has_its_own_config_and_counters() -> None:
    network = Network(SEED)
    forward, backward = network.link(
        A, B, LinkConfig(delay=0.01), reverse=LinkConfig(delay=0.2, loss=0.5)
    )
    for index in range(1_000):
        network.send(A, B, numbered(index), 0.0)
        network.send(B, A, numbered(index), 0.0)
    deliveries = network.drain()
    to_b = [delivery for delivery in deliveries if delivery.destination == B]
    to_a = [delivery for delivery in deliveries if delivery.destination == A]
    assert len(to_b) == 1_000
    assert {delivery.time for delivery in to_b} == {0.01}
    assert {delivery.time for delivery in to_a} == {0.2}
    assert forward.stats.lost == 0
    assert within(backward.stats.lost, 1_000, 0.5)
    assert len(to_a) == backward.stats.delivered == 1_000 - backward.stats.lost


def test_the_reverse_direction_copies_the_config_when_not_given() -> None:
    network = Network(SEED)
    forward, backward = network.link(A, B, LinkConfig(delay=0.03, loss=0.1))
    assert backward.config == forward.config
    assert network.links[B, A] is backward


def test_burst_loss_comes_in_runs_of_the_configured_mean_length() -> None:
    burst = GilbertElliott(good_to_bad=0.01, bad_to_good=0.25)
    bursty = Network(SEED)
    bursty_link, _ = bursty.link(A, B, LinkConfig(burst=burst))
    independent = Network(SEED)
    independent_link, _ = independent.link(A, B, LinkConfig(loss=burst.stationary_loss))
    for network in (bursty, independent):
        send_many(network, 100_000, gap=0.0)
    runs = {}
    for name, network in (("bursty", bursty), ("independent", independent)):
        arrived = {number(delivery.data) for delivery in network.drain()}
        runs[name] = burst_lengths([index not in arrived for index in range(100_000)])
    assert burst.stationary_loss == pytest.approx(0.01 / 0.26)
    # Both lose about the same share, ...
    assert within(bursty_link.stats.lost, 100_000, burst.stationary_loss, sigmas=20)
    assert within(independent_link.stats.lost, 100_000, burst.stationary_loss)
    # ... but in runs of mean 1 / bad_to_good = 4 against 1 / (1 - p) = 1.04.
    assert 3.6 < sum(runs["bursty"]) / len(runs["bursty"]) < 4.4
    assert sum(runs["independent"]) / len(runs["independent"]) < 1.1


def test_burst_loss_and_independent_loss_add_up() -> None:
    burst = GilbertElliott(good_to_bad=0.02, bad_to_good=0.5, loss_in_good=0.01, loss_in_bad=0.5)
    network = Network(SEED)
    forward, _ = network.link(A, B, LinkConfig(burst=burst, loss=0.1))
    send_many(network, 100_000, gap=0.0)
    network.drain()
    expected = 1 - (1 - burst.stationary_loss) * (1 - 0.1)
    assert within(forward.stats.lost, 100_000, expected, sigmas=10)


def test_every_datagram_is_accounted_for() -> None:
    config = LinkConfig(
        delay=0.001,
        jitter=0.001,
        loss=0.1,
        burst=GilbertElliott(good_to_bad=0.01, bad_to_good=0.3),
        duplicate=0.1,
        reorder=0.1,
        reorder_delay=0.01,
        bandwidth=1_000_000,
        queue_limit=20_000,
        mtu=1_000,
    )
    network = Network(SEED)
    forward, _ = network.link(A, B, config)
    for index in range(5_000):
        network.send(A, B, numbered(index, 200 + index % 1_000), index * 0.0005)
    in_flight = forward.stats.in_flight
    assert in_flight == network.in_flight > 0
    assert len(network.drain()) == in_flight
    stats = forward.stats
    assert min(stats.lost, stats.duplicated, stats.reordered, stats.out_of_order) > 0
    assert min(stats.queue_dropped, stats.mtu_dropped) > 0
    assert stats.sent - stats.lost - stats.queue_dropped - stats.mtu_dropped + stats.duplicated == (
        stats.delivered
    )
    assert "queue_dropped=" in str(stats)
    assert "in_flight=0" in str(stats)


def test_a_link_can_be_reconfigured_mid_run() -> None:
    network = Network(SEED)
    forward, _ = network.link(A, B)
    network.send(A, B, b"before", 0.0)
    forward.config = LinkConfig(loss=1.0)
    network.send(A, B, b"during the outage", 1.0)
    forward.config = LinkConfig()
    network.send(A, B, b"after", 2.0)
    assert [delivery.data for delivery in network.drain()] == [b"before", b"after"]


def test_misuse_is_refused_with_a_clear_error() -> None:
    network = Network(SEED)
    network.link(A, B)
    with pytest.raises(NoRouteError, match=r"no link from 192\.0\.2\.1:9000 to \[2001:db8::3\]"):
        network.send(A, C, b"x", 0.0)
    with pytest.raises(ValueError, match="exists"):
        network.link(B, A)
    with pytest.raises(ValueError, match="two different endpoints"):
        network.link(C, C)
    network.deliveries_until(5.0)
    with pytest.raises(ValueError, match="time cannot go back"):
        network.send(A, B, b"x", 4.0)
    with pytest.raises(ValueError, match="time cannot go back"):
        network.deliveries_until(4.0)
    with pytest.raises(ValueError, match="time cannot go back"):
        network.send(A, B, b"x", math.nan)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"loss": 1.5}, "loss must be a probability"),
        ({"duplicate": -0.1}, "duplicate must be a probability"),
        ({"delay": -1.0}, "delay must be a finite number"),
        ({"jitter": math.inf}, "jitter must be a finite number"),
        ({"reorder": 0.1}, "needs a reorder_delay"),
        ({"bandwidth": 0.0}, "bandwidth must be > 0"),
        ({"queue_limit": 10_000}, "queue_limit needs a bandwidth"),
        ({"bandwidth": 1e6, "queue_limit": 0}, "queue_limit must be >= 1"),
        ({"mtu": 0}, "mtu must be >= 1"),
    ],
)
def test_a_config_that_makes_no_sense_is_refused(settings: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LinkConfig(**settings)  # type: ignore[arg-type]


def test_a_burst_model_that_makes_no_sense_is_refused() -> None:
    with pytest.raises(ValueError, match="bad_to_good must be a probability"):
        GilbertElliott(good_to_bad=0.1, bad_to_good=2.0)
    with pytest.raises(ValueError, match="cannot both be 0"):
        GilbertElliott(good_to_bad=0.0, bad_to_good=0.0)


# --- The driver --------------------------------------------------------------------


def test_ping_pong_measures_twice_the_one_way_delay() -> None:
    network = Network(SEED)
    network.link(A, B, LinkConfig(delay=0.03), reverse=LinkConfig(delay=0.07))
    pinger = Pinger(B, count=10, interval=1.0)
    assert run_until(network, {A: pinger, B: Echo()}) == pytest.approx(9.1)
    assert pinger.rtts == {index: pytest.approx(0.1) for index in range(10)}


def test_run_until_stops_at_the_time_limit_and_resumes_from_there() -> None:
    network = Network(SEED)
    network.link(A, B, LinkConfig(delay=0.03))
    pinger = Pinger(B, count=10, interval=1.0)
    endpoints: dict[Endpoint, SansIoEndpoint] = {A: pinger, B: Echo()}
    assert run_until(network, endpoints, 4.5) == 4.5
    assert network.now == 4.5
    assert sorted(pinger.rtts) == [0, 1, 2, 3, 4]
    assert run_until(network, endpoints, stop=lambda: len(pinger.rtts) == 10) == (
        pytest.approx(9.06)
    )
    with pytest.raises(ValueError, match="before the network's time"):
        run_until(network, endpoints, 1.0)


@pytest.mark.parametrize("loss", [0.0, 0.3])
def test_stop_and_wait_moves_100_kb_byte_exact(loss: float) -> None:
    payload = bytes(range(251)) * 400  # 100,400 bytes, no period matching the chunk size
    network = Network(SEED)
    forward, backward = network.link(
        A, B, LinkConfig(delay=0.02, jitter=0.005, loss=loss, duplicate=0.02, bandwidth=1e6)
    )
    sender = StopAndWaitSender(B, payload, chunk=1_456, timeout=0.1)
    receiver = StopAndWaitReceiver()
    run_until(network, {A: sender, B: receiver}, stop=lambda: sender.done, max_steps=10_000)
    assert bytes(receiver.received) == payload
    chunks = len(sender.chunks)
    if loss:
        # Each chunk goes through with probability 0.7 * 0.7 per attempt: about twice.
        assert forward.stats.lost > 0
        assert backward.stats.lost > 0
        assert 1.6 * chunks < sender.transmissions < 2.6 * chunks
    else:
        assert sender.transmissions == chunks


def test_the_same_seed_replays_a_driven_run_exactly() -> None:
    def transfer(seed: int) -> tuple[float, int, str]:
        network = Network(seed)
        forward, _ = network.link(A, B, LinkConfig(delay=0.01, jitter=0.01, loss=0.2))
        sender = StopAndWaitSender(B, bytes(20_000), chunk=1_000, timeout=0.1)
        end = run_until(network, {A: sender, B: StopAndWaitReceiver()}, stop=lambda: sender.done)
        return end, sender.transmissions, str(forward.stats)

    assert transfer(SEED) == transfer(SEED)
    assert transfer(SEED) != transfer(SEED + 1)


def test_a_timer_that_never_moves_uses_up_the_budget_and_says_where() -> None:
    network = Network(SEED)
    network.link(A, B)
    with pytest.raises(StepBudgetError) as caught:
        run_until(network, {A: StuckTimer(), B: Echo()}, max_steps=50)
    message = str(caught.value)
    assert "max_steps=50 used up at t=1.0" in message
    assert "192.0.2.1:9000 StuckTimer: timer 1.0" in message
    assert "198.51.100.2:9000 Echo: timer None" in message


def test_a_goal_that_cannot_be_reached_stalls_instead_of_hanging() -> None:
    network = Network(SEED)
    network.link(A, B, LinkConfig(loss=1.0))
    pinger = Pinger(B, count=3, interval=1.0)
    with pytest.raises(StalledError, match="nothing is in flight and no timer is set") as caught:
        run_until(network, {A: pinger, B: Echo()}, stop=lambda: bool(pinger.rtts))
    assert "lost=3" in str(caught.value)
    with pytest.raises(StalledError, match=r"the next event at 1\.0 is after until=0\.5"):
        run_until(Network(SEED), {A: Pinger(B, 3, 1.0, start=1.0)}, 0.5, stop=lambda: False)


def test_a_datagram_for_an_address_outside_the_run_is_an_error() -> None:
    network = Network(SEED)
    network.link(A, B)
    with pytest.raises(
        SimulationError,
        match=r"for 198\.51\.100\.2:9000 arrived at t=0\.0, which is not an endpoint",
    ):
        run_until(network, {A: Pinger(B, 1, 1.0)})
