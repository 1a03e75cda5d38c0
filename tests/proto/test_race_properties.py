"""Hypothesis properties of PathRace: random offers, reports and clock moves, checked step by step.

A driver plays the adapter: it runs whatever the race asks for and reports back in any order,
late, twice, or for attempts already cancelled. Every loop is bounded: a race whose timer does
not move must fail a test, not hang it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wavesync_proto.addresses import Endpoint
from wavesync_proto.errors import LocalProtocolError
from wavesync_proto.mediator import ConnectResponse
from wavesync_proto.race import (
    DEADLINE,
    NO_PATH_OFFERED,
    AskMediator,
    Attempt,
    CancelAttempt,
    PathKind,
    PathRace,
    RaceFailed,
    RaceWon,
    StartAttempt,
    StartLanSearch,
)

SYSTEM = uuid.UUID("04f5a9ea-3cb8-44b0-bb62-401b420701de")
SERVER = uuid.UUID("9b2f4c0e-1d7a-4e63-8a55-0c3f6b1e2d44")
# Small pools, so that sources offer the same address or URL often.
TCP_POOL: list[Endpoint] = [("10.0.0.5", 8080), ("198.51.100.4", 443), ("fd00::5", 8080)]
UDP_POOL: list[Endpoint] = [("1.2.3.4", 5000), ("10.0.0.5", 5000)]
RELAY_POOL = ["http://r:3478", "https://relay.example/", "http://r2:80"]

TCPS = st.lists(st.sampled_from(TCP_POOL), max_size=4)
RESPONSES = st.builds(
    ConnectResponse,
    server_id=st.just(SERVER),
    system_id=st.just(SYSTEM),
    forwarded_endpoints=TCPS.map(tuple),
    local_endpoints=TCPS.map(tuple),
    udp_endpoints=st.lists(st.sampled_from(UDP_POOL), max_size=3).map(tuple),
    relay_urls=st.lists(st.sampled_from(RELAY_POOL), max_size=3).map(tuple),
)
STEPS = st.one_of(
    st.tuples(st.just("lan"), TCPS),
    st.tuples(st.sampled_from(["lan_done", "mediator_failed", "fire", "stranger"]), st.none()),
    st.tuples(st.just("response"), RESPONSES),
    st.tuples(st.sampled_from(["connected", "verified", "failed"]), st.integers(0, 20)),
    st.tuples(st.just("wait"), st.floats(0.0, 5.0)),
    # A report stamped earlier than the last one: a clock read before a lock, say.
    st.tuples(st.just("skew"), st.floats(0.0, 1.0)),
)
KIND_SETS = st.frozensets(st.sampled_from(list(PathKind)), min_size=1)


@dataclass
class Adapter:
    """What the driver saw of one race, and the checks every step must pass."""

    race: PathRace
    paths: frozenset[PathKind]
    deadline_at: float
    max_attempts: int
    now: float
    lan_asked: bool = False
    mediator_asked: bool = False
    started: list[Attempt] = field(default_factory=list)
    cancelled: set[int] = field(default_factory=set)
    failed: set[int] = field(default_factory=set)  # failure reports that counted
    verified: set[int] = field(default_factory=set)  # every verified report
    events: list[RaceWon | RaceFailed] = field(default_factory=list)
    dialled: set[Endpoint] = field(default_factory=set)
    relays: set[str] = field(default_factory=set)
    udp_sets: set[tuple[bool, frozenset[Endpoint]]] = field(default_factory=set)

    def check(self, was_done: bool) -> None:
        actions = self.race.actions()
        if was_done:
            assert actions == [], "a race that is over does nothing more"
        for action in actions:
            if isinstance(action, StartLanSearch):
                assert not self.lan_asked
                assert PathKind.LAN in self.paths
                self.lan_asked = True
            elif isinstance(action, AskMediator):
                assert not self.mediator_asked
                self.mediator_asked = True
            elif isinstance(action, StartAttempt):
                self.start(action.attempt)
            else:
                assert isinstance(action, CancelAttempt)
                attempt_id = action.attempt.attempt_id
                assert action.attempt == self.started[attempt_id - 1]
                assert attempt_id not in self.cancelled | self.failed
                self.cancelled.add(attempt_id)
        while (event := self.race.next_event()) is not None:
            self.events.append(event)
        assert len(self.events) == (1 if self.race.done else 0)
        timer = self.race.get_timer()
        assert (timer is None) == self.race.done
        assert timer is None or timer <= self.deadline_at

    def start(self, attempt: Attempt) -> None:
        assert attempt.kind in self.paths
        assert attempt.attempt_id == len(self.started) + 1
        self.started.append(attempt)
        assert len(self.started) <= self.max_attempts
        if attempt.tcp_endpoint is not None:
            assert attempt.tcp_endpoint not in self.dialled
            self.dialled.add(attempt.tcp_endpoint)
        elif attempt.relay_url is not None:
            assert attempt.relay_url not in self.relays
            self.relays.add(attempt.relay_url)
        else:
            key = (attempt.reuse, frozenset(attempt.udp_candidates))
            assert key not in self.udp_sets
            self.udp_sets.add(key)

    def source(self, asked: bool, call: object, *args: object) -> None:
        if asked:
            call(*args, self.now)  # type: ignore[operator]
        else:
            with pytest.raises(LocalProtocolError):
                call(*args, self.now)  # type: ignore[operator]

    def step(self, kind: str, value: object) -> None:
        race = self.race
        if kind == "lan":
            self.source(self.lan_asked, race.offer_lan, value)
        elif kind == "lan_done":
            self.source(self.lan_asked, race.lan_search_finished)
        elif kind == "response":
            self.source(self.mediator_asked, race.offer_connect_response, value)
        elif kind == "mediator_failed":
            self.source(self.mediator_asked, race.mediator_failed, "404 Server Offline")
        elif kind == "wait":
            assert isinstance(value, float)
            self.now += value
        elif kind == "fire":
            timer = race.get_timer()
            if timer is not None:
                self.now = max(self.now, timer)
                race.handle_timer(self.now)
        else:
            self.report(kind, value)

    def report(self, kind: str, value: object) -> None:
        """A report about an attempt: any started one (running or not), or a stranger."""
        race = self.race
        if kind == "stranger":
            with pytest.raises(LocalProtocolError):
                race.attempt_failed(len(self.started) + 1, "never started", self.now)
            return
        if not self.started:
            return
        assert isinstance(value, float | int)
        if kind == "skew":
            race.attempt_connected(1, self.now - value)
            return
        attempt_id = int(value) % len(self.started) + 1
        counts = not race.done and self.now < self.deadline_at
        running = attempt_id not in self.cancelled | self.failed
        if kind == "connected":
            race.attempt_connected(attempt_id, self.now)
        elif kind == "verified":
            self.verified.add(attempt_id)
            race.attempt_verified(attempt_id, self.now)
        else:
            race.attempt_failed(attempt_id, f"failure of {attempt_id}", self.now)
            if counts and running:
                self.failed.add(attempt_id)


def new_adapter(
    start: float, paths: frozenset[PathKind], deadline: float, options: dict[str, object]
) -> Adapter:
    race = PathRace(now=start, paths=paths, deadline=deadline, **options)  # type: ignore[arg-type]
    max_attempts = options["max_attempts"]
    assert isinstance(max_attempts, int)
    adapter = Adapter(race, paths, start + deadline, max_attempts, now=start)
    adapter.check(was_done=False)
    return adapter


OPTIONS = st.fixed_dictionaries(
    {
        "start_delays": st.dictionaries(st.sampled_from(list(PathKind)), st.floats(0.0, 40.0)),
        "lan": st.booleans(),
        "mediator": st.booleans(),
        "relays": st.lists(st.sampled_from(RELAY_POOL), max_size=3),
        "reuse": st.lists(st.sampled_from(UDP_POOL), max_size=2).map(tuple),
        "max_attempts": st.integers(1, 10),
    }
)


@pytest.mark.property
@given(
    start=st.floats(0.0, 1e6),
    paths=KIND_SETS,
    deadline=st.floats(0.1, 30.0),
    options=OPTIONS,
    steps=st.lists(STEPS, max_size=40),
)
def test_any_run_ends_once_with_every_attempt_accounted_for(
    start: float,
    paths: frozenset[PathKind],
    deadline: float,
    options: dict[str, object],
    steps: list[tuple[str, object]],
) -> None:
    adapter = new_adapter(start, paths, deadline, options)
    race = adapter.race
    for kind, value in steps:
        was_done = race.done
        adapter.step(kind, value)
        adapter.check(was_done)
    # Whatever happened, firing the timers ends the race, by its deadline at the latest.
    for _ in range(len(PathKind) + 2):
        if race.done:
            break
        timer = race.get_timer()
        assert timer is not None
        adapter.now = max(adapter.now, timer)
        race.handle_timer(adapter.now)
        adapter.check(was_done=False)
    else:
        pytest.fail(f"not done after {len(PathKind) + 2} timer firings: {race.get_timer()}")
    (event,) = adapter.events
    limit = adapter.deadline_at - start  # rounded the way the race rounds elapsed values
    if isinstance(event, RaceFailed) and event.reason == DEADLINE:
        assert event.elapsed >= limit
    else:
        assert event.elapsed < limit
    # Every attempt started is the winner, failed, or was cancelled: exactly one of them.
    winner = {race.winner.attempt_id} if race.winner else set()
    assert isinstance(event, RaceWon) == bool(winner)
    assert winner <= adapter.verified  # a transport that only came up never wins
    every = {attempt.attempt_id for attempt in adapter.started}
    assert every == winner | adapter.failed | adapter.cancelled
    assert not winner & adapter.failed
    assert not winner & adapter.cancelled
    # The report names every attempt that failed.
    reported = {(f.kind, f.target) for f in event.failures}
    for attempt_id in adapter.failed:
        attempt = adapter.started[attempt_id - 1]
        assert (attempt.kind, attempt.target) in reported


@pytest.mark.property
@given(
    start=st.floats(0.0, 1e6),
    paths=KIND_SETS,
    deadline=st.floats(0.1, 30.0),
    options=OPTIONS,
)
def test_a_silent_adapter_sees_the_race_end_at_the_deadline_or_at_once(
    start: float, paths: frozenset[PathKind], deadline: float, options: dict[str, object]
) -> None:
    """Nothing ever answers: nothing to wait for ends the race at once, else the deadline does."""
    adapter = new_adapter(start, paths, deadline, options)
    race = adapter.race
    at_once = race.done
    for _ in range(len(PathKind) + 2):
        if race.done:
            break
        timer = race.get_timer()
        assert timer is not None
        adapter.now = timer
        race.handle_timer(timer)
        adapter.check(was_done=False)
    (event,) = adapter.events
    assert isinstance(event, RaceFailed)
    if at_once:
        assert event.reason == NO_PATH_OFFERED
        assert event.elapsed == 0.0
        assert adapter.started == []
    else:
        assert event.reason == DEADLINE
        assert adapter.now == adapter.deadline_at
        assert adapter.cancelled == {attempt.attempt_id for attempt in adapter.started}
