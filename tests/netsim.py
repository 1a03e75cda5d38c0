"""A deterministic lossy datagram network in memory, and a driver for sans-I/O endpoints.

Issue 4 (UDT4) asks for bulk transfers proven byte-exact through loss,
reordering, duplication, delay and a rate limit, reproducibly from a seed. This
module is that network. It owns virtual time and the links between endpoints;
it knows nothing of UDT or any other protocol it carries. Nothing here reads a
clock or sleeps: time moves only when the caller says so.

Each direction of a link is independent and runs this pipeline per datagram::

    send -> MTU check -> bottleneck queue (tail drop) + serialization at `bandwidth`
         -> loss (Gilbert-Elliott burst, then independent) -> propagation `delay`
         + `jitter` (order-preserving) + `reorder` hold-back -> arrival
                                          \\-> `duplicate` copy, delayed on its own

Every random draw of a direction comes from its own ``random.Random`` seeded from
the network seed and the two addresses, so a seed reproduces a run exactly and
adding a link never changes what another link does.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, fields
from heapq import heappop, heappush
from types import MappingProxyType
from typing import NamedTuple, Protocol

from wavesync_proto.addresses import Endpoint, format_endpoint

__all__ = [
    "Delivery",
    "GilbertElliott",
    "Link",
    "LinkConfig",
    "LinkStats",
    "Network",
    "NoRouteError",
    "SansIoEndpoint",
    "SimulationError",
    "StalledError",
    "StepBudgetError",
    "run_until",
]


class SimulationError(Exception):
    """The simulation cannot go on as asked; the message carries the network's state."""


class NoRouteError(SimulationError):
    """A datagram was sent between two addresses that no link joins."""


class StepBudgetError(SimulationError):
    """`run_until` used up `max_steps`: something loops (a timer that never moves?)."""


class StalledError(SimulationError):
    """`run_until` has nothing left to do, or reached `until`, before `stop()` became true."""


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], not {value!r}")


def _check_duration(name: str, value: float) -> None:
    if not 0.0 <= value < math.inf:
        raise ValueError(f"{name} must be a finite number of seconds >= 0, not {value!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class GilbertElliott:
    """Burst loss: a two-state Markov chain stepped once per datagram that reaches the wire.

    The classic Gilbert-Elliott channel: in the good state a datagram is lost
    with `loss_in_good`, in the bad state with `loss_in_bad`. With the defaults
    (0 and 1) losses come in runs whose mean length is ``1 / bad_to_good``.
    """

    good_to_bad: float
    """Probability of moving from the good to the bad state before a datagram."""
    bad_to_good: float
    """Probability of moving from the bad to the good state before a datagram."""
    loss_in_good: float = 0.0
    """Loss probability while in the good state."""
    loss_in_bad: float = 1.0
    """Loss probability while in the bad state."""

    def __post_init__(self) -> None:
        for field in fields(self):
            _check_probability(field.name, getattr(self, field.name))
        if self.good_to_bad + self.bad_to_good == 0.0:
            raise ValueError("good_to_bad and bad_to_good cannot both be 0")

    @property
    def stationary_loss(self) -> float:
        """The long-run loss rate: each state's loss weighted by the time spent in it."""
        in_bad = self.good_to_bad / (self.good_to_bad + self.bad_to_good)
        return in_bad * self.loss_in_bad + (1.0 - in_bad) * self.loss_in_good


@dataclass(frozen=True, kw_only=True, slots=True)
class LinkConfig:
    """How one direction of a link treats datagrams. The defaults are a perfect wire."""

    delay: float = 0.0
    """Base one-way propagation delay, seconds. No datagram arrives sooner than this."""
    jitter: float = 0.0
    """Extra delay, uniform in [0, jitter] seconds. It does not reorder: a datagram
    never overtakes one sent before it on the link (a path's queues are FIFO), so
    jitter shorter than the packet spacing varies delay and longer jitter bunches
    datagrams up. Reordering is `reorder`'s job."""
    loss: float = 0.0
    """Independent loss probability per datagram (after the burst model, if any)."""
    burst: GilbertElliott | None = None
    """Optional burst loss, applied before the independent `loss`."""
    duplicate: float = 0.0
    """Probability that a datagram that survived loss arrives twice; the copy is
    made past the bottleneck and gets its own jitter and reorder draw."""
    reorder: float = 0.0
    """Fraction of datagrams held back by an extra delay uniform in (0, reorder_delay],
    so datagrams sent after them may arrive first."""
    reorder_delay: float = 0.0
    """Largest extra delay of a held-back datagram, seconds."""
    bandwidth: float | None = None
    """Bottleneck rate, bytes per second: a datagram of n bytes occupies the link
    for n / bandwidth seconds after the one before it. None: infinitely fast."""
    queue_limit: int | None = None
    """Bytes the bottleneck may hold (waiting plus being serialized); a datagram
    that does not fit is tail-dropped. None: unbounded. Needs `bandwidth`."""
    mtu: int | None = None
    """Largest datagram (UDP payload bytes) the link carries; larger ones are
    dropped and counted. None: no limit."""

    def __post_init__(self) -> None:
        for name in ("loss", "duplicate", "reorder"):
            _check_probability(name, getattr(self, name))
        for name in ("delay", "jitter", "reorder_delay"):
            _check_duration(name, getattr(self, name))
        if self.reorder > 0.0 and self.reorder_delay == 0.0:
            raise ValueError("reorder > 0 needs a reorder_delay > 0 to hold datagrams back by")
        if self.bandwidth is not None and not 0.0 < self.bandwidth < math.inf:
            raise ValueError(f"bandwidth must be > 0 bytes/s or None, not {self.bandwidth!r}")
        if self.queue_limit is not None:
            if self.bandwidth is None:
                raise ValueError(
                    "queue_limit needs a bandwidth: an infinitely fast link never queues"
                )
            if self.queue_limit < 1:
                raise ValueError(f"queue_limit must be >= 1 byte, not {self.queue_limit!r}")
        if self.mtu is not None and self.mtu < 1:
            raise ValueError(f"mtu must be >= 1 byte, not {self.mtu!r}")


@dataclass(slots=True)
class LinkStats:
    """Counters of one direction of a link. Every datagram offered is counted once
    as sent and then at most once as mtu_dropped, queue_dropped or lost."""

    sent: int = 0
    """Datagrams offered to the link."""
    delivered: int = 0
    """Datagrams handed out by `Network.deliveries_until` (copies included)."""
    lost: int = 0
    """Datagrams lost on the wire (burst model or independent loss)."""
    duplicated: int = 0
    """Extra copies made."""
    reordered: int = 0
    """Copies held back by the `reorder` rule (the cause of reordering)."""
    out_of_order: int = 0
    """Deliveries that came after a datagram sent later on this link (the effect)."""
    queue_dropped: int = 0
    """Datagrams tail-dropped because the bottleneck queue was full."""
    mtu_dropped: int = 0
    """Datagrams dropped for being larger than the MTU."""
    bytes_sent: int = 0
    """Bytes offered to the link."""
    bytes_delivered: int = 0
    """Bytes handed out, copies included."""

    @property
    def in_flight(self) -> int:
        """Copies scheduled for delivery and not yet handed out."""
        carried = self.sent - self.lost - self.queue_dropped - self.mtu_dropped
        return carried + self.duplicated - self.delivered

    def __str__(self) -> str:
        counts = ", ".join(f"{field.name}={getattr(self, field.name)}" for field in fields(self))
        return f"{counts}, in_flight={self.in_flight}"


class Delivery(NamedTuple):
    """A datagram arriving at `destination` at virtual `time`."""

    source: Endpoint
    destination: Endpoint
    data: bytes
    time: float


# What the event heap holds: (arrival time, tie-break order, link, data, send index).
# The order is unique, so comparison never reaches the link.
_Event = tuple[float, int, "Link", bytes, int]


class Link:
    """One direction of a link: its config (replaceable mid-run), counters and state."""

    __slots__ = (
        "_bad",
        "_busy_until",
        "_floor",
        "_heap",
        "_highest_delivered",
        "_order",
        "_queue",
        "_queued_bytes",
        "_rng",
        "config",
        "destination",
        "source",
        "stats",
    )

    def __init__(
        self,
        source: Endpoint,
        destination: Endpoint,
        config: LinkConfig,
        *,
        rng: random.Random,
        heap: list[_Event],
        order: Iterator[int],
    ) -> None:
        self.source = source
        self.destination = destination
        self.config = config
        """Replace it to change the link mid-run (a partition is ``LinkConfig(loss=1.0)``)."""
        self.stats = LinkStats()
        self._rng = rng
        self._heap = heap
        self._order = order
        self._busy_until = -math.inf  # when the bottleneck finishes serializing
        self._queue: deque[tuple[float, int]] = deque()  # (serialized by, size) in the queue
        self._queued_bytes = 0
        self._bad = False  # Gilbert-Elliott state
        self._floor = -math.inf  # latest arrival of a datagram not held back
        self._highest_delivered = 0

    def __repr__(self) -> str:
        return (
            f"Link({format_endpoint(self.source)} -> {format_endpoint(self.destination)}: "
            f"{self.stats})"
        )

    def _offer(self, data: bytes, now: float) -> None:
        config = self.config
        stats = self.stats
        size = len(data)
        stats.sent += 1
        stats.bytes_sent += size
        index = stats.sent
        if config.mtu is not None and size > config.mtu:
            stats.mtu_dropped += 1
            return
        departure = now
        bandwidth = config.bandwidth
        if bandwidth is not None:
            limit = config.queue_limit
            if limit is not None:
                queue = self._queue
                while queue and queue[0][0] <= now:
                    self._queued_bytes -= queue.popleft()[1]
                if self._queued_bytes + size > limit:
                    stats.queue_dropped += 1
                    return
            start = self._busy_until if self._busy_until > now else now
            departure = self._busy_until = start + size / bandwidth
            if limit is not None:
                self._queue.append((departure, size))
                self._queued_bytes += size
        rng = self._rng
        burst = config.burst
        if burst is not None:
            if self._bad:
                self._bad = rng.random() >= burst.bad_to_good
            else:
                self._bad = rng.random() < burst.good_to_bad
            chance = burst.loss_in_bad if self._bad else burst.loss_in_good
            if chance and rng.random() < chance:
                stats.lost += 1
                return
        if config.loss and rng.random() < config.loss:
            stats.lost += 1
            return
        self._schedule(data, departure + config.delay, index)
        if config.duplicate and rng.random() < config.duplicate:
            stats.duplicated += 1
            self._schedule(data, departure + config.delay, index)

    def _schedule(self, data: bytes, arrival: float, index: int) -> None:
        config = self.config
        if config.jitter:
            arrival += config.jitter * self._rng.random()
        if config.reorder and self._rng.random() < config.reorder:
            # 1 - random() is in (0, 1]: a held-back datagram is really held back.
            arrival += config.reorder_delay * (1.0 - self._rng.random())
            self.stats.reordered += 1
        else:
            arrival = max(arrival, self._floor)
            self._floor = arrival
        heappush(self._heap, (arrival, next(self._order), self, data, index))

    def _arrive(self, size: int, index: int) -> None:
        stats = self.stats
        stats.delivered += 1
        stats.bytes_delivered += size
        if index < self._highest_delivered:
            stats.out_of_order += 1
        else:
            self._highest_delivered = index


class Network:
    """Links between endpoints and the datagrams in flight on them, in virtual time.

    Time is whatever the caller says it is, but it never goes backwards: `send`
    and `deliveries_until` reject a `now` older than the latest one seen.
    """

    def __init__(self, seed: int | str) -> None:
        self.seed = seed
        self._links: dict[tuple[Endpoint, Endpoint], Link] = {}
        self._heap: list[_Event] = []
        self._order = itertools.count()
        self._now = 0.0

    @property
    def now(self) -> float:
        """The latest virtual time the network has been told about (starts at 0)."""
        return self._now

    @property
    def links(self) -> Mapping[tuple[Endpoint, Endpoint], Link]:
        """Every direction, keyed by ``(source, destination)``."""
        return MappingProxyType(self._links)

    def link(
        self,
        a: Endpoint,
        b: Endpoint,
        config: LinkConfig | None = None,
        *,
        reverse: LinkConfig | None = None,
    ) -> tuple[Link, Link]:
        """Join `a` and `b`; return the ``(a -> b, b -> a)`` directions.

        `config` is the a -> b direction (default: a perfect wire); `reverse` is
        b -> a, the same as `config` when omitted. The two directions share
        nothing but their settings: each has its own queue, state and random stream.
        """
        if a == b:
            raise ValueError(
                f"a link needs two different endpoints, not {format_endpoint(a)} twice"
            )
        for key in ((a, b), (b, a)):
            if key in self._links:
                raise ValueError(f"{format_endpoint(key[0])} -> {format_endpoint(key[1])} exists")
        forward = config if config is not None else LinkConfig()
        return (
            self._make_link(a, b, forward),
            self._make_link(b, a, reverse if reverse is not None else forward),
        )

    def _make_link(self, source: Endpoint, destination: Endpoint, config: LinkConfig) -> Link:
        # str seeds are hashed with SHA-512 (random.seed version 2): stable across
        # runs and PYTHONHASHSEED, and distinct per direction.
        seed = f"{self.seed!r}|{format_endpoint(source)}|{format_endpoint(destination)}"
        link = Link(
            source,
            destination,
            config,
            rng=random.Random(seed),  # noqa: S311 - a simulation, not a secret
            heap=self._heap,
            order=self._order,
        )
        self._links[source, destination] = link
        return link

    def send(self, source: Endpoint, destination: Endpoint, data: bytes, now: float) -> None:
        """Offer a datagram to the link from `source` to `destination` at `now`."""
        if not self._now <= now < math.inf:
            raise ValueError(f"send at {now!r}: time cannot go back from {self._now!r}")
        self._now = now
        link = self._links.get((source, destination))
        if link is None:
            raise NoRouteError(
                f"no link from {format_endpoint(source)} to {format_endpoint(destination)}; "
                f"links: {', '.join(self._link_names()) or 'none'}"
            )
        link._offer(data, now)

    def next_delivery_time(self) -> float | None:
        """When the earliest datagram in flight arrives; None when nothing is in flight."""
        return self._heap[0][0] if self._heap else None

    @property
    def in_flight(self) -> int:
        """Copies scheduled for delivery and not yet handed out, over all links."""
        return len(self._heap)

    def deliveries_until(self, now: float) -> list[Delivery]:
        """Move the clock to `now` and hand out every datagram arriving by then.

        They come in arrival-time order; ties go in the order they were
        scheduled, which a seed fixes.
        """
        if not self._now <= now < math.inf:
            raise ValueError(f"deliveries_until({now!r}): time cannot go back from {self._now!r}")
        self._now = now
        heap = self._heap
        delivered: list[Delivery] = []
        while heap and heap[0][0] <= now:
            time, _, link, data, index = heappop(heap)
            link._arrive(len(data), index)
            delivered.append(Delivery(link.source, link.destination, data, time))
        return delivered

    def drain(self) -> list[Delivery]:
        """Hand out everything in flight; the clock moves to the last arrival."""
        if not self._heap:
            return []
        return self.deliveries_until(max(self._now, *(event[0] for event in self._heap)))

    def describe(self) -> str:
        """The state in a few lines, for error messages."""
        upcoming = self.next_delivery_time()
        lines = [
            f"network seed={self.seed!r} now={self._now!r}: {len(self._heap)} in flight, "
            f"next delivery at {upcoming!r}"
        ]
        lines.extend(f"  {link!r}" for link in self._links.values())
        return "\n".join(lines)

    def _link_names(self) -> Iterable[str]:
        for source, destination in self._links:
            yield f"{format_endpoint(source)} -> {format_endpoint(destination)}"


class SansIoEndpoint(Protocol):
    """The datagram boundary of a sans-I/O machine (DESIGN.md §3), as `run_until` drives it.

    Parameters are positional-only and the return values of `receive_datagram`
    and `handle_timer` are ignored, so a machine may name its parameters as it
    likes and return events from those calls.
    """

    def receive_datagram(self, data: bytes, addr: Endpoint, now: float, /) -> object: ...

    def datagrams_to_send(self, now: float, /) -> Iterable[tuple[bytes, Endpoint]]: ...

    def get_timer(self) -> float | None: ...

    def handle_timer(self, now: float, /) -> object: ...


def run_until(
    network: Network,
    endpoints: Mapping[Endpoint, SansIoEndpoint],
    until: float = math.inf,
    *,
    stop: Callable[[], bool] | None = None,
    max_steps: int = 1_000_000,
) -> float:
    """Drive `endpoints` over `network` in virtual time; return the time reached.

    Each step moves the clock to the earliest of the next delivery and every
    endpoint's timer, feeds that moment's deliveries to `receive_datagram`,
    fires each timer that is due, then sends what every endpoint has to send
    from its own address (its key in `endpoints`).

    Without `stop` it runs until `until` (events at exactly `until` included;
    the clock ends there) or, with the default infinite `until`, until nothing
    is in flight and no timer is set. With `stop` it returns as soon as
    ``stop()`` is true, and raises `StalledError` if `until` or quiet comes
    first. A run needing more than `max_steps` steps raises `StepBudgetError`,
    so a test can never hang; both errors describe the network and every timer.
    """
    if until < network.now:
        raise ValueError(f"until={until!r} is before the network's time {network.now!r}")
    now = network.now
    _send_all(network, endpoints, now)
    for step in range(max_steps + 1):
        if stop is not None and stop():
            return now
        upcoming = _next_event(network, endpoints)
        if upcoming is None or upcoming > until:
            if stop is not None:
                reason = (
                    "nothing is in flight and no timer is set"
                    if upcoming is None
                    else f"the next event at {upcoming!r} is after until={until!r}"
                )
                raise StalledError(
                    f"stop() is still false after {step} steps at t={now!r}: {reason}\n"
                    + _state(network, endpoints)
                )
            if until == math.inf:
                return now
            network.deliveries_until(until)
            return until
        if step == max_steps:
            break
        now = max(now, upcoming)
        for delivery in network.deliveries_until(now):
            receiver = endpoints.get(delivery.destination)
            if receiver is None:
                raise SimulationError(
                    f"a datagram for {format_endpoint(delivery.destination)} arrived at t={now!r}, "
                    "which is not an endpoint of this run\n" + _state(network, endpoints)
                )
            receiver.receive_datagram(delivery.data, delivery.source, now)
        for endpoint in endpoints.values():
            deadline = endpoint.get_timer()
            if deadline is not None and deadline <= now:
                endpoint.handle_timer(now)
        _send_all(network, endpoints, now)
    raise StepBudgetError(
        f"max_steps={max_steps} used up at t={now!r} (until={until!r}); "
        "a timer that does not move, or a budget too small for the run?\n"
        + _state(network, endpoints)
    )


def _send_all(network: Network, endpoints: Mapping[Endpoint, SansIoEndpoint], now: float) -> None:
    for address, endpoint in endpoints.items():
        for data, destination in endpoint.datagrams_to_send(now):
            network.send(address, destination, data, now)


def _next_event(network: Network, endpoints: Mapping[Endpoint, SansIoEndpoint]) -> float | None:
    upcoming = network.next_delivery_time()
    for endpoint in endpoints.values():
        deadline = endpoint.get_timer()
        if deadline is not None and (upcoming is None or deadline < upcoming):
            upcoming = deadline
    return upcoming


def _state(network: Network, endpoints: Mapping[Endpoint, SansIoEndpoint]) -> str:
    timers = "\n".join(
        f"  {format_endpoint(address)} {type(endpoint).__name__}: timer {endpoint.get_timer()!r}"
        for address, endpoint in endpoints.items()
    )
    return f"{network.describe()}\nendpoints:\n{timers}"
