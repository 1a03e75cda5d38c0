"""Hypothesis properties of StandbyPool: any history keeps the invariants, a healthy relay heals.

The state machine plays the adapter and a relay that does anything a relay
may do, in any order: accept (asking for any count), refuse (any status, any
Retry-After), fail to answer, drop, hand connections to clients; time moves by
hand. After every step the pool's counts match what the adapter was told, and
the pool's promises hold. At the end the relay turns healthy and the pool must
settle on exactly its target.
"""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from wavesync_proto.relay.standby_pool import PoolState, StandbyPool

pytestmark = pytest.mark.property

statuses = st.none() | st.sampled_from([400, 401, 404, 409, 429, 500, 502, 503])
#: Float rounding in ``now + delay - now`` (times stay below ~10^5 s here).
SLACK = 1e-9
retry_afters = st.none() | st.floats(min_value=-5, max_value=100) | st.just(math.nan)


class PoolMachine(RuleBasedStateMachine):
    """The adapter's view of every attempt, next to the pool's own."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.connecting: set[int] = set()
        self.idle: set[int] = set()
        self.tunnels: set[int] = set()
        self.seen: set[int] = set()
        self.stopped = False
        self.level_before = 0
        #: Whether an attempt was opened since the last back-off began (or ever).
        self.opened_since_backoff = False
        self.pool = StandbyPool(random=lambda: 0.0)  # replaced by setup

    @initialize(
        configured=st.integers(1, 8),
        extra_target=st.integers(0, 8),
        extra_total=st.integers(0, 8),
        backoff_initial=st.floats(0.01, 5.0),
        extra_backoff=st.floats(0.0, 60.0),
        probation=st.floats(0.0, 20.0),
        draws=st.lists(st.floats(0.0, 1.0, exclude_max=True), min_size=1, max_size=8),
    )
    def setup(
        self,
        *,
        configured: int,
        extra_target: int,
        extra_total: int,
        backoff_initial: float,
        extra_backoff: float,
        probation: float,
        draws: list[float],
    ) -> None:
        self.max_target = configured + extra_target
        self.max_total = self.max_target + extra_total
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_initial + extra_backoff
        self.probation = probation
        source = itertools.cycle(draws)
        self.pool = StandbyPool(
            random=lambda: next(source),
            target=configured,
            max_target=self.max_target,
            max_total=self.max_total,
            backoff_initial=backoff_initial,
            backoff_max=self.backoff_max,
            probation=probation,
        )

    # --- the steps --------------------------------------------------------------------

    def before(self) -> tuple[PoolState, float | None]:
        self.level_before = self.pool.connecting + self.pool.idle
        return self.pool.state, self.pool.get_timer()

    def after_report(self, state: PoolState, timer: float | None) -> float | None:
        """The delay of the back-off this report started (None: it started none).

        It lies within [backoff_initial / 2, backoff_max], and no back-off starts
        while one is running: one step per round of attempts.
        """
        new_timer = self.pool.get_timer()
        if new_timer is None or (state is PoolState.BACKING_OFF and new_timer == timer):
            return None
        assert state is not PoolState.BACKING_OFF
        # A failure counts once per round: no new attempt, no new back-off step.
        assert self.opened_since_backoff
        self.opened_since_backoff = False
        delay = new_timer - self.now
        assert self.backoff_initial / 2 - SLACK <= delay <= self.backoff_max + SLACK
        return delay

    @rule(seconds=st.floats(0.0, 40.0))
    def advance(self, seconds: float) -> None:
        self.before()
        self.now += seconds
        self.pool.handle_timer(self.now)

    @rule()
    def wake_at_the_timer(self) -> None:
        self.before()
        timer = self.pool.get_timer()
        if timer is not None:
            self.now = max(self.now, timer)
            self.pool.handle_timer(self.now)
            assert self.pool.state is PoolState.PROBING

    @rule()
    def poll(self) -> None:
        state, timer = self.before()
        if state is PoolState.BACKING_OFF:
            assert timer is not None
            waiting = self.now < timer
        else:
            waiting = False
        opened = [action.attempt_id for action in self.pool.poll(self.now)]
        if opened:
            assert not self.stopped
            assert not waiting
            assert self.pool.connecting + self.pool.idle <= self.pool.target
        if self.pool.state is PoolState.PROBING:
            assert len(opened) <= 1
        for attempt_id in opened:
            assert attempt_id not in self.seen
            self.seen.add(attempt_id)
            self.opened_since_backoff = True
            self.connecting.add(attempt_id)

    @precondition(lambda self: self.connecting)
    @rule(data=st.data(), count=st.none() | st.integers(-3, 100))
    def accept(self, data: st.DataObject, count: int | None) -> None:
        state, timer = self.before()
        attempt_id = data.draw(st.sampled_from(sorted(self.connecting)))
        self.pool.attempt_accepted(attempt_id, self.now, standby_count=count)
        self.connecting.discard(attempt_id)
        self.idle.add(attempt_id)
        if count is not None:
            assert self.pool.target == min(max(count, 1), self.max_target)
        self.after_report(state, timer)

    @precondition(lambda self: self.connecting)
    @rule(data=st.data(), status=statuses, retry_after=retry_afters)
    def fail(self, data: st.DataObject, status: int | None, retry_after: float | None) -> None:
        state, timer = self.before()
        attempt_id = data.draw(st.sampled_from(sorted(self.connecting)))
        self.pool.attempt_failed(attempt_id, self.now, status=status, retry_after=retry_after)
        self.connecting.discard(attempt_id)
        started = self.after_report(state, timer)
        if started is not None and retry_after is not None and retry_after > 0:
            # Retry-After is a floor, capped at backoff_max.
            assert started >= min(retry_after, self.backoff_max) - SLACK

    @precondition(lambda self: self.idle)
    @rule(data=st.data())
    def take(self, data: st.DataObject) -> None:
        state, timer = self.before()
        attempt_id = data.draw(st.sampled_from(sorted(self.idle)))
        self.pool.standby_taken(attempt_id, self.now)
        self.idle.discard(attempt_id)
        if not self.stopped:
            self.tunnels.add(attempt_id)
        self.after_report(state, timer)

    @precondition(lambda self: self.idle)
    @rule(data=st.data())
    def lose(self, data: st.DataObject) -> None:
        state, timer = self.before()
        attempt_id = data.draw(st.sampled_from(sorted(self.idle)))
        self.pool.standby_lost(attempt_id, self.now)
        self.idle.discard(attempt_id)
        self.after_report(state, timer)

    @precondition(lambda self: self.tunnels)
    @rule(data=st.data())
    def close_tunnel(self, data: st.DataObject) -> None:
        self.before()
        attempt_id = data.draw(st.sampled_from(sorted(self.tunnels)))
        self.pool.tunnel_closed(attempt_id)
        self.tunnels.discard(attempt_id)

    @precondition(lambda self: not self.stopped)
    @rule(weight=st.integers(0, 9))
    def stop(self, weight: int) -> None:
        # Stopping ends all the interesting behaviour: do it in one run of ten.
        if weight:
            return
        self.before()
        closing = self.pool.stop()
        assert set(closing) == self.connecting | self.idle
        self.stopped = True
        # The adapter may still report on them (a race with the close): the pool ignores it.
        for attempt_id in sorted(self.connecting)[:1]:
            self.pool.attempt_accepted(attempt_id, self.now, standby_count=1)
        for attempt_id in sorted(self.idle)[:1]:
            self.pool.standby_lost(attempt_id, self.now)
        self.connecting.clear()
        self.idle.clear()

    # --- what holds after every step -----------------------------------------------------

    @invariant()
    def counts_match_the_adapters_view(self) -> None:
        pool = self.pool
        assert (pool.connecting, pool.idle, pool.tunnels) == (
            len(self.connecting),
            len(self.idle),
            len(self.tunnels),
        )
        assert pool.total == len(self.connecting) + len(self.idle) + len(self.tunnels)

    @invariant()
    def the_total_is_capped(self) -> None:
        assert self.pool.total <= self.max_total

    @invariant()
    def standby_connections_stay_within_the_target(self) -> None:
        # Above the target only when the relay lowered it, and then the level only falls.
        level = self.pool.connecting + self.pool.idle
        assert level <= max(self.pool.target, self.level_before)
        assert 1 <= self.pool.target <= self.max_target

    @invariant()
    def a_stopped_pool_stays_stopped(self) -> None:
        if self.stopped:
            assert self.pool.state is PoolState.STOPPED
            assert self.pool.get_timer() is None
            assert self.pool.connecting + self.pool.idle == 0

    @invariant()
    def a_timer_exactly_while_backing_off(self) -> None:
        assert (self.pool.get_timer() is not None) == (self.pool.state is PoolState.BACKING_OFF)

    def teardown(self) -> None:
        """A relay that turns healthy (accepts, ages out extras) leads to exactly the target."""
        if self.stopped:
            return
        pool = self.pool
        for _ in range(100):
            timer = pool.get_timer()
            self.now = max(self.now + self.probation + 1.0, timer or 0.0)
            for attempt_id in sorted(self.idle)[: max(0, pool.idle - pool.target)]:
                pool.standby_lost(attempt_id, self.now)  # the relay's age limit drains extras
                self.idle.discard(attempt_id)
            for action in pool.poll(self.now):
                self.connecting.add(action.attempt_id)
            for attempt_id in sorted(self.connecting):
                pool.attempt_accepted(attempt_id, self.now, standby_count=None)
                self.idle.add(attempt_id)
            self.connecting.clear()
        room = self.max_total - pool.tunnels
        # PROBING with a full pool is fine: the next attempt, when one is due, is a probe.
        assert pool.state in (PoolState.ACTIVE, PoolState.PROBING)
        assert pool.connecting == 0
        assert pool.idle == min(pool.target, room)
        assert pool.consecutive_failures == 0


TestStandbyPool = PoolMachine.TestCase


@given(
    configured=st.integers(1, 8),
    backoff_initial=st.floats(0.01, 5.0),
    extra_backoff=st.floats(0.0, 60.0),
    probation=st.floats(0.01, 20.0),
    drop_at=st.floats(0.0, 0.99),  # well inside: now + drop rounds, and must not reach it
    draws=st.lists(st.floats(0.0, 1.0, exclude_max=True), min_size=1, max_size=8),
)
def test_a_relay_that_accepts_and_drops_is_backed_off_from(
    *,
    configured: int,
    backoff_initial: float,
    extra_backoff: float,
    probation: float,
    drop_at: float,
    draws: list[float],
) -> None:
    """Every round costs one back-off step, each at least half the doubled step before."""
    source = itertools.cycle(draws)
    backoff_max = backoff_initial + extra_backoff
    pool = StandbyPool(
        random=lambda: next(source),
        target=configured,
        backoff_initial=backoff_initial,
        backoff_max=backoff_max,
        probation=probation,
    )
    now, opened, rounds = 0.0, 0, 30
    for round_ in range(1, rounds + 1):
        now = max(now, pool.get_timer() or now)
        batch = [action.attempt_id for action in pool.poll(now)]
        opened += len(batch)
        for attempt_id in batch:
            pool.attempt_accepted(attempt_id, now, standby_count=None)
        now += drop_at * probation  # the relay drops them before their probation ends
        for attempt_id in batch:
            pool.standby_lost(attempt_id, now)
        timer = pool.get_timer()
        assert timer is not None
        step = min(backoff_max, backoff_initial * 2.0 ** (round_ - 1))
        assert step / 2 - SLACK <= timer - now <= backoff_max + SLACK
        assert pool.consecutive_failures == round_
    assert opened == configured + rounds - 1  # the first fill, then one probe per round
