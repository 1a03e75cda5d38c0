"""StandbyPool, driven by hand: a clock moved by the test, randomness from a fixed list."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable

import pytest

from wavesync_proto.errors import LocalProtocolError
from wavesync_proto.relay.standby_pool import OpenStandby, PoolState, StandbyPool


def draws(*values: float) -> Iterable[float]:
    """The values in turn, then the last one for ever."""
    return itertools.chain(values, itertools.repeat(values[-1]))


def make_pool(*values: float, **options: int | float) -> StandbyPool:
    """A pool whose random() returns ``values`` (0.0 for ever when none are given)."""
    source = iter(draws(*values)) if values else itertools.repeat(0.0)
    return StandbyPool(random=lambda: next(source), **options)  # type: ignore[arg-type]


def ids(opens: list[OpenStandby]) -> list[int]:
    return [action.attempt_id for action in opens]


def fill(pool: StandbyPool, now: float, *, standby_count: int | None = None) -> list[int]:
    """Open what the pool asks for and have the relay accept all of it."""
    opened = ids(pool.poll(now))
    for attempt_id in opened:
        pool.attempt_accepted(attempt_id, now, standby_count=standby_count)
    return opened


def state(pool: StandbyPool) -> PoolState:
    """The pool's state, read through a call so that mypy does not narrow it between steps."""
    return pool.state


def counts(pool: StandbyPool) -> tuple[int, int, int, int]:
    return pool.connecting, pool.idle, pool.tunnels, pool.total


# --- steady state --------------------------------------------------------------------


def test_a_new_pool_opens_seven_attempts_at_once() -> None:
    pool = make_pool()
    assert state(pool) is PoolState.ACTIVE
    assert pool.poll(0.0) == [OpenStandby(attempt_id=n) for n in range(1, 8)]
    assert counts(pool) == (7, 0, 0, 7)
    assert pool.poll(0.0) == []
    assert pool.get_timer() is None


def test_accepted_attempts_become_idle_and_nothing_more_opens() -> None:
    pool = make_pool()
    fill(pool, 0.0)
    assert counts(pool) == (0, 7, 0, 7)
    assert pool.poll(100.0) == []


def test_a_taken_standby_is_replaced_at_once_and_stays_counted_as_a_tunnel() -> None:
    pool = make_pool()
    first = fill(pool, 0.0)
    pool.standby_taken(first[0], 1.0)
    assert counts(pool) == (0, 6, 1, 7)
    assert ids(pool.poll(1.0)) == [8]
    assert counts(pool) == (1, 6, 1, 8)
    pool.tunnel_closed(first[0])
    assert counts(pool) == (1, 6, 0, 7)


def test_a_lost_standby_after_its_probation_is_replaced_without_back_off() -> None:
    pool = make_pool(probation=10.0)
    first = fill(pool, 0.0)
    pool.standby_lost(first[0], 600.0)  # the relay aged it out
    assert state(pool) is PoolState.ACTIVE
    assert pool.consecutive_failures == 0
    assert ids(pool.poll(600.0)) == [8]


def test_the_total_is_capped_with_tunnels_counted() -> None:
    pool = make_pool(target=3, max_target=3, max_total=4)
    first = fill(pool, 0.0)
    pool.standby_taken(first[0], 1.0)
    fill(pool, 1.0)  # the replacement: total 4
    pool.standby_taken(first[1], 2.0)
    assert pool.poll(2.0) == []  # a fifth connection would pass max_total
    assert counts(pool) == (0, 2, 2, 4)
    pool.tunnel_closed(first[0])
    assert len(pool.poll(2.0)) == 1
    assert pool.total == 4


# --- the relay's count -----------------------------------------------------------------


def test_the_relay_may_ask_for_more_standby_connections() -> None:
    pool = make_pool()
    first = ids(pool.poll(0.0))
    pool.attempt_accepted(first[0], 0.0, standby_count=10)
    assert pool.target == 10
    assert len(pool.poll(0.0)) == 3
    assert pool.connecting + pool.idle == 10


@pytest.mark.parametrize(
    ("asked", "target"), [(0, 1), (-5, 1), (1, 1), (64, 64), (65, 64), (10**9, 64)]
)
def test_the_relays_count_is_clamped(asked: int, target: int) -> None:
    pool = make_pool()
    pool.attempt_accepted(ids(pool.poll(0.0))[0], 0.0, standby_count=asked)
    assert pool.target == target


def test_no_count_in_the_answer_keeps_the_last_one() -> None:
    pool = make_pool()
    first = ids(pool.poll(0.0))
    pool.attempt_accepted(first[0], 0.0, standby_count=3)
    pool.attempt_accepted(first[1], 0.0, standby_count=None)
    assert pool.target == 3


def test_a_lower_count_drains_instead_of_closing() -> None:
    pool = make_pool(probation=0.0)
    first = fill(pool, 0.0)
    pool.standby_taken(first[0], 1.0)
    (eighth,) = ids(pool.poll(1.0))
    pool.attempt_accepted(eighth, 1.0, standby_count=3)
    assert (pool.idle, pool.target) == (7, 3)  # nothing closed
    for attempt_id in first[1:5]:
        pool.standby_lost(attempt_id, 2.0)
        assert pool.poll(2.0) == []  # nothing replaced while above the target
    assert pool.idle == 3
    pool.standby_lost(first[5], 2.0)
    assert len(pool.poll(2.0)) == 1


# --- back-off ------------------------------------------------------------------------------


def test_a_failed_connect_backs_off_then_probes_alone() -> None:
    pool = make_pool(0.0)
    first = ids(pool.poll(0.0))
    pool.attempt_failed(first[0], 1.0)
    assert state(pool) is PoolState.BACKING_OFF
    assert pool.consecutive_failures == 1
    assert pool.get_timer() == 1.25  # 0.5 s, times the jitter's 0.5 at a 0.0 draw
    pool.handle_timer(1.2)
    assert pool.poll(1.2) == []
    pool.handle_timer(1.25)
    assert state(pool) is PoolState.PROBING
    probe = ids(pool.poll(1.25))
    assert probe == [8]
    assert pool.poll(1.25) == []  # one probe at a time
    pool.attempt_accepted(probe[0], 1.5, standby_count=None)
    assert state(pool) is PoolState.ACTIVE
    assert pool.poll(1.5) == []  # 6 stragglers still connecting + the probe = target
    assert counts(pool) == (6, 1, 0, 7)


def test_back_off_doubles_up_to_the_maximum() -> None:
    pool = make_pool(0.0, target=1, max_target=1, max_total=1)
    now, delays = 0.0, []
    for _ in range(10):
        (attempt,) = ids(pool.poll(now))
        pool.attempt_failed(attempt, now)
        timer = pool.get_timer()
        assert timer is not None
        delays.append(timer - now)
        now = timer
    assert delays == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0, 15.0, 15.0]
    assert pool.consecutive_failures == 10


def test_the_jitter_spans_half_to_all_of_the_step() -> None:
    pool = make_pool(0.999, target=1, max_target=1, max_total=1, backoff_initial=2.0)
    (attempt,) = ids(pool.poll(0.0))
    pool.attempt_failed(attempt, 0.0)
    assert pool.get_timer() == pytest.approx(2.0 * (0.5 + 0.5 * 0.999))


def test_one_outage_costs_one_back_off_step_however_many_attempts_fail() -> None:
    pool = make_pool(0.0)
    for attempt_id in ids(pool.poll(0.0)):
        pool.attempt_failed(attempt_id, 0.5, status=503, retry_after=7.0)
    assert pool.consecutive_failures == 1
    assert pool.get_timer() == 0.5 + 7.0  # the first refusal's Retry-After
    assert counts(pool) == (0, 0, 0, 0)


def test_retry_after_is_a_floor() -> None:
    pool = make_pool(0.0)
    pool.attempt_failed(ids(pool.poll(0.0))[0], 10.0, status=503, retry_after=3.0)
    assert pool.get_timer() == 13.0


@pytest.mark.parametrize("retry_after", [0.0, -4.0, math.nan, 0.1])
def test_retry_after_below_the_jittered_delay_changes_nothing(retry_after: float) -> None:
    pool = make_pool(0.0)
    pool.attempt_failed(ids(pool.poll(0.0))[0], 10.0, status=503, retry_after=retry_after)
    assert pool.get_timer() == 10.25


@pytest.mark.parametrize("retry_after", [86400.0, math.inf])
def test_retry_after_is_capped_at_backoff_max(retry_after: float) -> None:
    pool = make_pool(0.0)
    pool.attempt_failed(ids(pool.poll(0.0))[0], 10.0, status=503, retry_after=retry_after)
    assert pool.get_timer() == 40.0


@pytest.mark.parametrize("status", [400, 401, 404, 409])
def test_a_refusal_that_retrying_cannot_fix_waits_the_longest_at_once(status: int) -> None:
    pool = make_pool(0.0)
    pool.attempt_failed(ids(pool.poll(0.0))[0], 10.0, status=status)
    assert pool.get_timer() == 10.0 + 15.0  # backoff_max, times the jitter's 0.5


@pytest.mark.parametrize("status", [429, 500, 502, 503, None])
def test_transient_refusals_back_off_exponentially(status: int | None) -> None:
    pool = make_pool(0.0)
    pool.attempt_failed(ids(pool.poll(0.0))[0], 10.0, status=status)
    assert pool.get_timer() == 10.25


def test_a_failed_probe_backs_off_further() -> None:
    pool = make_pool(0.0)
    pool.attempt_failed(ids(pool.poll(0.0))[0], 0.0)
    (probe,) = ids(pool.poll(0.25))
    pool.attempt_failed(probe, 1.0)
    assert state(pool) is PoolState.BACKING_OFF
    assert pool.consecutive_failures == 2
    assert pool.get_timer() == 1.5


def test_stragglers_fail_without_counting_and_a_straggler_accepted_keeps_the_wait() -> None:
    pool = make_pool(0.0)
    first = ids(pool.poll(0.0))
    pool.attempt_failed(first[0], 0.0)
    pool.attempt_failed(first[1], 0.1)
    pool.attempt_accepted(first[2], 0.1, standby_count=None)
    assert state(pool) is PoolState.BACKING_OFF
    assert pool.consecutive_failures == 1
    assert pool.poll(0.2) == []
    assert counts(pool) == (4, 1, 0, 5)
    # The probe is one attempt, even with room for two.
    assert len(pool.poll(0.25)) == 1


def test_a_straggler_accepted_while_probing_ends_the_probe() -> None:
    pool = make_pool(0.0)
    first = ids(pool.poll(0.0))
    pool.attempt_failed(first[0], 0.0)
    ids(pool.poll(0.25))
    pool.attempt_accepted(first[1], 0.3, standby_count=None)
    assert state(pool) is PoolState.ACTIVE


def test_a_straggler_failing_while_probing_does_not_start_another_back_off() -> None:
    pool = make_pool(0.0)
    first = ids(pool.poll(0.0))
    pool.attempt_failed(first[0], 0.0)
    (probe,) = ids(pool.poll(0.25))
    pool.attempt_failed(first[1], 0.3, status=503, retry_after=20.0)
    assert state(pool) is PoolState.PROBING
    assert pool.consecutive_failures == 1
    assert pool.poll(0.3) == []  # the probe is still out
    pool.attempt_accepted(probe, 0.4, standby_count=None)
    assert state(pool) is PoolState.ACTIVE


def test_random_out_of_range_is_the_callers_bug() -> None:
    pool = make_pool(1.0)
    with pytest.raises(LocalProtocolError, match=r"random\(\) must return"):
        pool.attempt_failed(ids(pool.poll(0.0))[0], 0.0)


# --- a relay that accepts and drops ------------------------------------------------------------


def test_a_standby_lost_during_probation_is_a_failure() -> None:
    pool = make_pool(0.0, probation=10.0)
    first = fill(pool, 0.0)
    pool.standby_lost(first[0], 9.9)
    assert state(pool) is PoolState.BACKING_OFF
    assert pool.consecutive_failures == 1


def test_a_relay_that_accepts_and_drops_cannot_make_the_pool_spin() -> None:
    pool = make_pool(0.0, probation=10.0)
    now, opened = 0.0, 0
    for _ in range(40):
        timer = pool.get_timer()
        now = max(now, timer if timer is not None else now)
        batch = fill(pool, now)
        opened += len(batch)
        for attempt_id in batch:
            pool.standby_lost(attempt_id, now + 0.1)
    # One back-off step per round: the delays reach the 15 s floor of a 30 s maximum.
    assert pool.consecutive_failures == 40
    timer = pool.get_timer()
    assert timer is not None
    assert timer - (now + 0.1) == pytest.approx(15.0)
    assert opened == 7 + 39  # the first fill, then one probe per round


def test_a_standby_that_lives_past_probation_resets_the_failures() -> None:
    pool = make_pool(0.0, probation=10.0)
    for attempt_id in ids(pool.poll(0.0)):
        pool.attempt_failed(attempt_id, 0.0)
    for _ in range(2):
        now = pool.get_timer()
        assert now is not None
        (probe,) = ids(pool.poll(now))
        pool.attempt_failed(probe, now)
    assert pool.consecutive_failures == 3
    now = pool.get_timer()
    assert now is not None
    (probe,) = ids(pool.poll(now))
    pool.attempt_accepted(probe, now, standby_count=None)
    assert state(pool) is PoolState.ACTIVE
    rest = ids(pool.poll(now))
    assert len(rest) == 6
    pool.handle_timer(now + 9.9)
    assert pool.consecutive_failures == 3  # accepted is not yet proof
    pool.handle_timer(now + 10.0)
    assert pool.consecutive_failures == 0
    # The next failure starts the back-off from the beginning again.
    pool.attempt_failed(rest[0], now + 11.0)
    assert pool.get_timer() == now + 11.0 + 0.25


def test_a_taken_standby_proves_the_relay() -> None:
    pool = make_pool(0.0, probation=10.0)
    pool.attempt_failed(ids(pool.poll(0.0))[0], 0.0)
    (probe,) = ids(pool.poll(0.25))
    pool.attempt_accepted(probe, 0.5, standby_count=None)
    pool.standby_taken(probe, 0.6)
    assert pool.consecutive_failures == 0


# --- stop ------------------------------------------------------------------------------------


def test_stop_hands_back_standby_connections_and_keeps_tunnels() -> None:
    pool = make_pool()
    first = fill(pool, 0.0)
    pool.standby_taken(first[0], 1.0)
    replacement = ids(pool.poll(1.0))
    assert pool.stop() == sorted(first[1:] + replacement)
    assert state(pool) is PoolState.STOPPED
    assert counts(pool) == (0, 0, 1, 1)
    assert pool.poll(2.0) == []
    assert pool.get_timer() is None
    # News about what it handed back may still arrive: it is ignored.
    pool.attempt_accepted(replacement[0], 2.0, standby_count=50)
    pool.standby_lost(first[1], 2.0)
    assert pool.target == 7
    pool.tunnel_closed(first[0])
    assert counts(pool) == (0, 0, 0, 0)
    assert pool.stop() == []


def test_stop_while_backing_off_opens_nothing_later() -> None:
    pool = make_pool(0.0)
    pool.attempt_failed(ids(pool.poll(0.0))[0], 0.0)
    assert len(pool.stop()) == 6
    assert pool.get_timer() is None
    pool.handle_timer(100.0)
    assert pool.poll(100.0) == []


# --- misuse --------------------------------------------------------------------------------


def test_an_id_the_pool_never_gave_out_is_refused() -> None:
    pool = make_pool()
    with pytest.raises(LocalProtocolError, match="attempt 1 is not in the pool"):
        pool.attempt_accepted(1, 0.0, standby_count=None)
    pool.stop()
    with pytest.raises(LocalProtocolError, match="attempt 99 is not in the pool"):
        pool.standby_lost(99, 0.0)


def test_each_attempt_finishes_once() -> None:
    pool = make_pool()
    first = ids(pool.poll(0.0))
    pool.attempt_failed(first[0], 0.0)
    with pytest.raises(LocalProtocolError, match="attempt_failed: attempt 1 is not in the pool"):
        pool.attempt_failed(first[0], 0.0)


@pytest.mark.parametrize(
    ("phase", "report", "message"),
    [
        ("connecting", "taken", "standby_taken: attempt 1 is connecting"),
        ("connecting", "lost", "standby_lost: attempt 1 is connecting"),
        ("connecting", "closed", "tunnel_closed: attempt 1 is connecting"),
        ("idle", "accepted", "attempt_accepted: attempt 1 is idle"),
        ("idle", "failed", "attempt_failed: attempt 1 is idle"),
        ("idle", "closed", "tunnel_closed: attempt 1 is idle"),
        ("tunnel", "taken", "standby_taken: attempt 1 is tunnel"),
        ("tunnel", "lost", "standby_lost: attempt 1 is tunnel"),
        ("tunnel", "failed", "attempt_failed: attempt 1 is tunnel"),
    ],
)
def test_a_report_out_of_order_is_refused(phase: str, report: str, message: str) -> None:
    pool = make_pool()
    (attempt, *_) = ids(pool.poll(0.0))
    if phase in ("idle", "tunnel"):
        pool.attempt_accepted(attempt, 0.0, standby_count=None)
    if phase == "tunnel":
        pool.standby_taken(attempt, 0.0)
    reports: dict[str, Callable[[], None]] = {
        "accepted": lambda: pool.attempt_accepted(attempt, 1.0, standby_count=None),
        "failed": lambda: pool.attempt_failed(attempt, 1.0),
        "taken": lambda: pool.standby_taken(attempt, 1.0),
        "lost": lambda: pool.standby_lost(attempt, 1.0),
        "closed": lambda: pool.tunnel_closed(attempt),
    }
    before = counts(pool)
    with pytest.raises(LocalProtocolError, match=message):
        reports[report]()
    assert counts(pool) == before


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"target": 0}, "target must be a positive int"),
        ({"target": True}, "target must be a positive int"),
        ({"target": 2.0}, "target must be a positive int"),
        ({"max_target": 0}, "max_target must be a positive int"),
        ({"target": 8, "max_target": 7}, "need target <= max_target <= max_total"),
        ({"max_total": 63}, "need target <= max_target <= max_total"),
        ({"max_total": 128.0}, "max_total must be an int"),
        ({"backoff_initial": 0.0}, "need 0 < backoff_initial <= backoff_max"),
        ({"backoff_initial": 31.0}, "need 0 < backoff_initial <= backoff_max"),
        ({"backoff_initial": math.nan}, "need 0 < backoff_initial <= backoff_max"),
        ({"backoff_max": math.inf}, "need 0 < backoff_initial <= backoff_max"),
        ({"probation": -1.0}, "probation must be"),
        ({"probation": math.nan}, "probation must be"),
    ],
)
def test_nonsense_settings_are_refused(options: dict[str, object], message: str) -> None:
    with pytest.raises(LocalProtocolError, match=message):
        StandbyPool(random=lambda: 0.0, **options)  # type: ignore[arg-type]
