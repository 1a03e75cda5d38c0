"""How many standby connections a server agent keeps to one relay (docs/protocol.md §3).

This module owns the pool *policy*: how many idle standby connections to hold
(``target``, 7 unless configured or the relay's 101 asks for another count), when
to open one, the cap on all connections to the relay, and the jittered
exponential back-off after the relay is unreachable, refuses, or accepts and
drops. It does not know how a connection speaks (``standby.py`` does), reads no
clock and draws no randomness of its own: ``now`` and ``random`` come from the
adapter, which opens and closes what the pool names and reports what happened.

Every connection the pool asks for is an *attempt*, named by an id it hands out
once. An attempt moves through ``_ATTEMPT_TRANSITIONS``; the pool as a whole
through ``_TRANSITIONS``:

    ACTIVE --counted failure--> BACKING_OFF --retry time--> PROBING --accepted--> ACTIVE
    PROBING --counted failure--> BACKING_OFF        any --stop()--> STOPPED

A failure is *counted* only for an attempt opened since the last counted
failure, so one outage costs one back-off step however many attempts were in
flight when it began; after the wait one attempt (the probe) goes out alone,
and the pool fills up again only once the relay has accepted it.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import LocalProtocolError

__all__ = ["OpenStandby", "PoolState", "StandbyPool"]


@dataclass(frozen=True, kw_only=True)
class OpenStandby:
    """Open a standby connection to the relay; report its fate under ``attempt_id``."""

    attempt_id: int


class PoolState(enum.Enum):
    """Where the pool is; the adapter may log it, ``_TRANSITIONS`` decides it."""

    ACTIVE = "active"  # keeps ``target`` connections idle or connecting
    BACKING_OFF = "backing off"  # opens nothing until the retry time
    PROBING = "probing"  # one attempt out; the rest wait for its answer
    STOPPED = "stopped"  # opens nothing, ever again


class _Input(enum.Enum):
    FAILURE = "counted failure"
    BACKOFF_ELAPSED = "back-off elapsed"
    ACCEPTED = "attempt accepted"
    STOP = "stop"


_S, _I = PoolState, _Input
_TRANSITIONS: dict[tuple[PoolState, _Input], PoolState] = {
    (_S.ACTIVE, _I.FAILURE): _S.BACKING_OFF,
    (_S.PROBING, _I.FAILURE): _S.BACKING_OFF,
    (_S.BACKING_OFF, _I.BACKOFF_ELAPSED): _S.PROBING,
    (_S.PROBING, _I.ACCEPTED): _S.ACTIVE,
    (_S.ACTIVE, _I.ACCEPTED): _S.ACTIVE,
    # A straggler from before the failure got in: the relay named a retry time
    # (or the jitter did), and the wait is at most ``backoff_max``, so keep it.
    (_S.BACKING_OFF, _I.ACCEPTED): _S.BACKING_OFF,
    **{(state, _I.STOP): _S.STOPPED for state in (_S.ACTIVE, _S.BACKING_OFF, _S.PROBING)},
}
# (BACKING_OFF, FAILURE) is absent on purpose: entering BACKING_OFF starts a new
# round and nothing is opened while backing off, so no failure can count there.


class _Phase(enum.Enum):
    CONNECTING = "connecting"  # asked for; no answer from the relay yet
    IDLE = "idle"  # the relay answered 101; waiting for a client
    TUNNEL = "tunnel"  # a client took it; counts toward ``max_total`` until closed


class _Report(enum.Enum):
    ACCEPTED = "attempt_accepted"
    FAILED = "attempt_failed"
    TAKEN = "standby_taken"
    LOST = "standby_lost"
    CLOSED = "tunnel_closed"


_P, _R = _Phase, _Report
#: None: the attempt is finished and forgotten; its id is never valid again.
_ATTEMPT_TRANSITIONS: dict[tuple[_Phase, _Report], _Phase | None] = {
    (_P.CONNECTING, _R.ACCEPTED): _P.IDLE,
    (_P.CONNECTING, _R.FAILED): None,
    (_P.IDLE, _R.TAKEN): _P.TUNNEL,
    (_P.IDLE, _R.LOST): None,
    (_P.TUNNEL, _R.CLOSED): None,
}


@dataclass(slots=True)
class _Attempt:
    phase: _Phase
    #: The pool's failure round when the attempt was opened; only the current round counts.
    round: int
    accepted_at: float = 0.0
    #: Lived ``probation`` seconds idle, or was taken: proof the relay is healthy.
    proven: bool = False


class StandbyPool:
    """The policy for one relay's standby connections: what to open, when, and how many."""

    def __init__(
        self,
        *,
        random: Callable[[], float],
        target: int = 7,
        max_target: int = 64,
        max_total: int = 128,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        probation: float = 10.0,
    ) -> None:
        """``random`` returns a float in [0, 1) (``random.Random().random`` will do).

        ``target``: idle connections to keep until the relay asks for another count,
        which is clamped to [1, ``max_target``]. ``max_total``: connections to this
        relay of every kind, tunnels included, so a burst of clients cannot make the
        agent open sockets without end. ``probation``: a connection lost sooner than
        this after its 101 counts as a failure, so a relay that accepts and drops
        cannot make the agent spin.
        """
        for name, value in (("target", target), ("max_target", max_target)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LocalProtocolError(f"{name} must be a positive int, not {value!r}")
        if isinstance(max_total, bool) or not isinstance(max_total, int):
            raise LocalProtocolError(f"max_total must be an int, not {max_total!r}")
        if not target <= max_target <= max_total:
            raise LocalProtocolError("need target <= max_target <= max_total")
        if not (math.isfinite(backoff_max) and 0 < backoff_initial <= backoff_max):
            raise LocalProtocolError("need 0 < backoff_initial <= backoff_max, both finite")
        if not (math.isfinite(probation) and probation >= 0):
            raise LocalProtocolError("probation must be a finite number of seconds >= 0")
        self._random = random
        self._max_target = max_target
        self._max_total = max_total
        self._backoff_initial = float(backoff_initial)
        self._backoff_max = float(backoff_max)
        self._probation = float(probation)

        self._state = PoolState.ACTIVE
        self._target = target
        self._attempts: dict[int, _Attempt] = {}
        self._next_id = 1
        self._round = 0
        self._failures = 0
        self._retry_at = 0.0

    # --- read-only views, for logs and tests -----------------------------------------

    @property
    def state(self) -> PoolState:
        return self._state

    @property
    def target(self) -> int:
        """Idle connections the pool aims for: the relay's last ask (clamped), else configured."""
        return self._target

    @property
    def connecting(self) -> int:
        return self._count(_Phase.CONNECTING)

    @property
    def idle(self) -> int:
        return self._count(_Phase.IDLE)

    @property
    def tunnels(self) -> int:
        """Connections a client took that the adapter has not yet reported closed."""
        return self._count(_Phase.TUNNEL)

    @property
    def total(self) -> int:
        """Every connection the pool tracks; never more than ``max_total``."""
        return len(self._attempts)

    @property
    def consecutive_failures(self) -> int:
        """Counted failures since the relay last proved healthy (as of the last ``now``)."""
        return self._failures

    # --- what to do ------------------------------------------------------------------

    def poll(self, now: float) -> list[OpenStandby]:
        """The connections to open now (moves time first, as ``handle_timer`` does).

        Call it after every report and when the timer fires; each id it returns is new.
        """
        self.handle_timer(now)
        if self._state not in (PoolState.ACTIVE, PoolState.PROBING):
            return []
        room = min(
            self._target - self.connecting - self.idle,
            self._max_total - self.total,
        )
        if self._state is PoolState.PROBING:
            probes = sum(
                1
                for attempt in self._attempts.values()
                if attempt.phase is _Phase.CONNECTING and attempt.round == self._round
            )
            room = min(room, 1 - probes)
        opens: list[OpenStandby] = []
        for _ in range(max(room, 0)):
            attempt_id, self._next_id = self._next_id, self._next_id + 1
            self._attempts[attempt_id] = _Attempt(phase=_Phase.CONNECTING, round=self._round)
            opens.append(OpenStandby(attempt_id=attempt_id))
        return opens

    def get_timer(self) -> float | None:
        """When the back-off ends (absolute, the caller's clock), or None."""
        return self._retry_at if self._state is PoolState.BACKING_OFF else None

    def handle_timer(self, now: float) -> None:
        """Move time: end a back-off that is due, note connections past their probation."""
        if self._state is PoolState.STOPPED:
            return
        if self._state is PoolState.BACKING_OFF and now >= self._retry_at:
            self._move(_Input.BACKOFF_ELAPSED)
        for attempt in self._attempts.values():
            if (
                attempt.phase is _Phase.IDLE
                and not attempt.proven
                and now - attempt.accepted_at >= self._probation
            ):
                self._proven(attempt)

    def stop(self) -> list[int]:
        """Open nothing more; the ids of the standby connections (connecting or idle) to close.

        Tunnels are the application's and stay counted until ``tunnel_closed``. Later
        reports about the returned ids are ignored: they may already be on their way.
        """
        if self._state is PoolState.STOPPED:
            return []
        self._move(_Input.STOP)
        closing = sorted(
            attempt_id
            for attempt_id, attempt in self._attempts.items()
            if attempt.phase is not _Phase.TUNNEL
        )
        for attempt_id in closing:
            del self._attempts[attempt_id]
        return closing

    # --- what happened ---------------------------------------------------------------

    def attempt_accepted(self, attempt_id: int, now: float, *, standby_count: int | None) -> None:
        """The relay answered 101; ``standby_count`` is its Wavesync-Standby-Count, if any.

        The count becomes the target, clamped to [1, ``max_target``]. A lower target
        opens nothing until the idle ones drain below it (taken, lost, aged out): closing
        healthy connections would only make relays that disagree oscillate.
        """
        attempt = self._report(attempt_id, _Report.ACCEPTED, now)
        if attempt is None:
            return
        attempt.accepted_at = now
        if standby_count is not None:
            self._target = min(max(standby_count, 1), self._max_target)
        self._move(_Input.ACCEPTED)

    def attempt_failed(
        self,
        attempt_id: int,
        now: float,
        *,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        """No standby connection: ``status`` is the relay's refusal (None: no answer at all).

        ``retry_after`` is the refusal's Retry-After in seconds; the next attempt waits
        at least that long (at most ``backoff_max``: a relay cannot park us for a day).
        """
        attempt = self._report(attempt_id, _Report.FAILED, now)
        if attempt is not None and attempt.round == self._round:
            self._fail(now, status=status, retry_after=retry_after)

    def standby_taken(self, attempt_id: int, now: float) -> None:
        """A client took the connection (OPEN): it is a tunnel now; a replacement is due."""
        attempt = self._report(attempt_id, _Report.TAKEN, now)
        if attempt is not None:
            self._proven(attempt)

    def standby_lost(self, attempt_id: int, now: float) -> None:
        """An idle connection ended (closed, aged out, keep-alives missed): replace it.

        Lost within ``probation`` of its 101, it counts as a failure as well.
        """
        attempt = self._report(attempt_id, _Report.LOST, now)
        if attempt is not None and not attempt.proven and attempt.round == self._round:
            self._fail(now, status=None, retry_after=None)

    def tunnel_closed(self, attempt_id: int) -> None:
        """A tunnel the pool handed over has closed: it no longer counts toward ``max_total``."""
        self._report(attempt_id, _Report.CLOSED, None)

    # --- internals -------------------------------------------------------------------

    def _report(self, attempt_id: int, report: _Report, now: float | None) -> _Attempt | None:
        """Apply ``report`` to the attempt; None when the pool has stopped caring about it."""
        if now is not None:
            self.handle_timer(now)
        attempt = self._attempts.get(attempt_id)
        if attempt is None:
            if self._state is PoolState.STOPPED and 0 < attempt_id < self._next_id:
                return None  # stop() handed it back for closing; its news is moot
            raise LocalProtocolError(f"{report.value}: attempt {attempt_id} is not in the pool")
        if (attempt.phase, report) not in _ATTEMPT_TRANSITIONS:
            raise LocalProtocolError(
                f"{report.value}: attempt {attempt_id} is {attempt.phase.value}"
            )
        phase = _ATTEMPT_TRANSITIONS[attempt.phase, report]
        if phase is None:
            del self._attempts[attempt_id]
        else:
            attempt.phase = phase
        return None if self._state is PoolState.STOPPED else attempt

    def _fail(self, now: float, *, status: int | None, retry_after: float | None) -> None:
        self._failures += 1
        if status is not None and 400 <= status < 500 and status != 429:
            # 401 (key, clock), 409 (server id of another system), 400/404 (our request):
            # asking again soon cannot help, so wait the longest at once, as ListenSession does.
            base = self._backoff_max
        else:
            # 2.0 ** a capped exponent: an int power would be exact but overflow the float.
            base = min(
                self._backoff_max, self._backoff_initial * 2.0 ** min(self._failures - 1, 64)
            )
        draw = self._random()
        if not 0.0 <= draw < 1.0:
            raise LocalProtocolError(f"random() must return a float in [0, 1), not {draw!r}")
        # Jitter in [0.5, 1] spreads a fleet of agents that lost the relay at once, and
        # (unlike full jitter) never retries at once on an unlucky draw.
        delay = base * (0.5 + 0.5 * draw)
        if retry_after is not None and retry_after > 0:  # NaN compares False: ignored
            delay = max(delay, min(retry_after, self._backoff_max))
        self._retry_at = now + delay
        self._round += 1
        self._move(_Input.FAILURE)

    def _proven(self, attempt: _Attempt) -> None:
        attempt.proven = True
        self._failures = 0

    def _count(self, phase: _Phase) -> int:
        return sum(1 for attempt in self._attempts.values() if attempt.phase is phase)

    def _move(self, event: _Input) -> None:
        next_state = _TRANSITIONS.get((self._state, event))
        if next_state is None:
            # Every input is derived inside the pool: a missing pair is a bug here.
            raise AssertionError(f"{event.value} while {self._state.value}")
        self._state = next_state
