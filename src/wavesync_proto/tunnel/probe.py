"""Choosing a tunnel method per location (docs/tunnel.md §6): probe, validate, remember, demote.

This module owns the decisions of probing: which methods to start and when
(all at once, or cheapest first with a stagger), when an attempt has taken too
long, which validated method wins, and what a location remembers about its
methods (the last winner; failures, demoted for a while) in an LRU of bounded
size. It opens nothing and validates nothing itself: the adapter builds each
tunnel, runs the short echo through it, and reports. It reads no clock.

    PROBING --validated--> CHOSEN --chosen_failed--> PROBING (the loser demoted)
    PROBING --all failed / deadline--> FAILED --retry--> PROBING
"""

from __future__ import annotations

import enum
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import LocalProtocolError
from .wire import TunnelMethod

__all__ = [
    "ALL_KINDS",
    "CancelAttempt",
    "ProbeAction",
    "ProbeChosen",
    "ProbeFailed",
    "ProbeState",
    "StartAttempt",
    "TunnelKind",
    "TunnelLocation",
    "TunnelMemory",
    "TunnelProbe",
]


@dataclass(frozen=True, kw_only=True)
class TunnelKind:
    """A method, optionally over TLS (the ``ssl`` variants): what the probe chooses among."""

    method: TunnelMethod
    tls: bool = False

    def __str__(self) -> str:
        return f"ssl+{self.method.value}" if self.tls else self.method.value


#: Every kind, cheapest first (per MB and in round trips): the probe's default order.
ALL_KINDS: tuple[TunnelKind, ...] = tuple(
    TunnelKind(method=method, tls=tls)
    for tls in (False, True)
    for method in (
        TunnelMethod.CONNECT,
        TunnelMethod.UPGRADE,
        TunnelMethod.WEBSOCKET,
        TunnelMethod.GETPOST,
    )
)


@dataclass(frozen=True, kw_only=True)
class TunnelLocation:
    """Where a choice holds: the proxy (``host:port``, None for none) and the target."""

    proxy: str | None
    target: str


@dataclass(frozen=True, kw_only=True)
class StartAttempt:
    """Build a tunnel of ``kind``, validate it, report as ``attempt_id``."""

    attempt_id: int
    kind: TunnelKind


@dataclass(frozen=True, kw_only=True)
class CancelAttempt:
    """Stop and close the attempt (it lost, timed out, or the probe ended)."""

    attempt_id: int
    kind: TunnelKind


@dataclass(frozen=True, kw_only=True)
class ProbeChosen:
    """``kind`` validated first: use the tunnel of ``attempt_id``."""

    attempt_id: int
    kind: TunnelKind


@dataclass(frozen=True, kw_only=True)
class ProbeFailed:
    """No method validated; ``reasons`` says why, for every method, in probe order."""

    reasons: tuple[tuple[TunnelKind, str], ...]

    def __str__(self) -> str:
        return "; ".join(f"{kind}: {reason}" for kind, reason in self.reasons)


ProbeAction = StartAttempt | CancelAttempt | ProbeChosen | ProbeFailed


# --- memory per location ---------------------------------------------------------------


@dataclass(slots=True)
class _Record:
    winner: TunnelKind | None = None
    #: kind → (demoted until, why it failed).
    demoted: dict[TunnelKind, tuple[float, str]] = field(default_factory=dict)


class TunnelMemory:
    """What each location taught: its last winner and its recent failures (LRU, bounded)."""

    def __init__(self, *, capacity: int = 1024, demotion: float = 600.0) -> None:
        """``capacity``: locations kept (the least recently used goes first);
        ``demotion``: seconds a failed method is tried only after the others."""
        if capacity < 1:
            raise LocalProtocolError("capacity must be at least 1")
        if not (math.isfinite(demotion) and demotion >= 0):
            raise LocalProtocolError("demotion must be a finite number of seconds >= 0")
        self.capacity = capacity
        self.demotion = float(demotion)
        self._records: OrderedDict[TunnelLocation, _Record] = OrderedDict()

    def __len__(self) -> int:
        return len(self._records)

    def winner(self, location: TunnelLocation) -> TunnelKind | None:
        record = self._records.get(location)
        return None if record is None else record.winner

    def demoted(self, location: TunnelLocation, now: float) -> dict[TunnelKind, str]:
        """The methods demoted at ``location`` as of ``now``, with why they failed."""
        record = self._records.get(location)
        if record is None:
            return {}
        for kind in [kind for kind, (until, _) in record.demoted.items() if until <= now]:
            del record.demoted[kind]
        return {kind: reason for kind, (_, reason) in record.demoted.items()}

    def record_validated(self, location: TunnelLocation, kind: TunnelKind) -> None:
        record = self._touch(location)
        record.winner = kind
        record.demoted.pop(kind, None)

    def record_failed(
        self, location: TunnelLocation, kind: TunnelKind, reason: str, now: float
    ) -> None:
        record = self._touch(location)
        record.demoted[kind] = (now + self.demotion, reason)
        if record.winner == kind:
            record.winner = None

    def _touch(self, location: TunnelLocation) -> _Record:
        record = self._records.get(location)
        if record is None:
            record = self._records[location] = _Record()
            while len(self._records) > self.capacity:
                self._records.popitem(last=False)
        self._records.move_to_end(location)
        return record


# --- one location's probe ---------------------------------------------------------------


class ProbeState(enum.Enum):
    PROBING = "probing"
    CHOSEN = "chosen"
    FAILED = "failed"


class _Input(enum.Enum):
    VALIDATED = "validated"
    EXHAUSTED = "exhausted"  # every method failed, or the deadline passed
    CHOSEN_FAILED = "chosen failed"
    RETRY = "retry"


_S, _I = ProbeState, _Input
_TRANSITIONS: dict[tuple[ProbeState, _Input], ProbeState] = {
    (_S.PROBING, _I.VALIDATED): _S.CHOSEN,
    (_S.PROBING, _I.EXHAUSTED): _S.FAILED,
    (_S.CHOSEN, _I.CHOSEN_FAILED): _S.PROBING,
    (_S.FAILED, _I.RETRY): _S.PROBING,
}

#: Tiers of the start order: the location's last winner, fresh methods, demoted methods.
_WINNER, _FRESH, _DEMOTED = 0, 1, 2


@dataclass(slots=True)
class _Attempt:
    kind: TunnelKind
    tier: int
    attempt_id: int = 0  # 0: not started
    started_at: float = 0.0
    outcome: str | None = None  # why it failed; None while pending or running


class TunnelProbe:
    """Probes the tunnel methods for one location and keeps the choice until it fails."""

    def __init__(
        self,
        *,
        location: TunnelLocation,
        kinds: Sequence[TunnelKind],
        memory: TunnelMemory,
        stagger: float = 0.0,
        attempt_timeout: float = 10.0,
        deadline: float = 30.0,
    ) -> None:
        """``kinds`` in order of cost, cheapest first. ``stagger`` 0 starts every method at
        once; above 0 the next starts that long after the previous (at once when nothing is
        left running). A method the location remembers as its winner goes first, alone; the
        others follow only if it fails. Demoted methods go last, once every other failed.
        ``attempt_timeout`` bounds one attempt, ``deadline`` the whole round."""
        if not kinds or len(set(kinds)) != len(kinds):
            raise LocalProtocolError("kinds must be a non-empty list without repeats")
        for name, value in (("attempt_timeout", attempt_timeout), ("deadline", deadline)):
            if not (math.isfinite(value) and value > 0):
                raise LocalProtocolError(f"{name} must be a positive finite number of seconds")
        if not (math.isfinite(stagger) and stagger >= 0):
            raise LocalProtocolError("stagger must be a finite number of seconds >= 0")
        self.location = location
        self._kinds = tuple(kinds)
        self._memory = memory
        self._stagger = float(stagger)
        self._attempt_timeout = float(attempt_timeout)
        self._deadline_after = float(deadline)
        self._state = ProbeState.FAILED  # start() moves it, as retry() does
        self._next_id = 1
        self._round_first_id = 1
        self._attempts: list[_Attempt] = []
        self._deadline = 0.0
        self._last_start = 0.0
        self._started = False
        self.result: ProbeChosen | ProbeFailed | None = None

    @property
    def state(self) -> ProbeState:
        return self._state

    # --- inputs ----------------------------------------------------------------------

    def start(self, now: float) -> list[ProbeAction]:
        """The first round's first attempts."""
        if self._started:
            raise LocalProtocolError("start() once; retry() after a failed round")
        self._started = True
        return self._new_round(now, _Input.RETRY)

    def retry(self, now: float) -> list[ProbeAction]:
        """After ``ProbeFailed``: a new round (demoted methods still go last)."""
        if not self._started or self._state is not ProbeState.FAILED:
            raise LocalProtocolError("retry() follows a failed round")
        return self._new_round(now, _Input.RETRY)

    def chosen_failed(self, reason: str, now: float) -> list[ProbeAction]:
        """The chosen tunnel broke in use: demote its method and probe again."""
        if self._state is not ProbeState.CHOSEN or not isinstance(self.result, ProbeChosen):
            raise LocalProtocolError("chosen_failed() needs a chosen method")
        self._memory.record_failed(self.location, self.result.kind, reason, now)
        return self._new_round(now, _Input.CHOSEN_FAILED)

    def validated(self, attempt_id: int, now: float) -> list[ProbeAction]:
        """The echo through attempt ``attempt_id``'s tunnel came back intact."""
        attempt = self._running(attempt_id)
        if attempt is None:
            return []
        self._move(_Input.VALIDATED)
        self._memory.record_validated(self.location, attempt.kind)
        self.result = ProbeChosen(attempt_id=attempt_id, kind=attempt.kind)
        actions: list[ProbeAction] = self._cancel_running(except_id=attempt_id)
        actions.append(self.result)
        return actions

    def failed(self, attempt_id: int, reason: str, now: float) -> list[ProbeAction]:
        """Attempt ``attempt_id`` failed (refused, closed, garbled echo, ...)."""
        attempt = self._running(attempt_id)
        if attempt is None:
            return []
        self._attempt_failed(attempt, reason, now)
        return self.handle_timer(now)

    def get_timer(self) -> float | None:
        """When ``handle_timer`` must run next (absolute, the caller's clock)."""
        if self._state is not ProbeState.PROBING:
            return None
        times = [self._deadline]
        times += [a.started_at + self._attempt_timeout for a in self._attempts if self._live(a)]
        following = self._next_pending()
        if following is not None and self._stagger and self._same_tier_running(following):
            times.append(self._last_start + self._stagger)
        return min(times)

    def handle_timer(self, now: float) -> list[ProbeAction]:
        """Move time: time attempts out, start what is due, end the round when it is over."""
        if self._state is not ProbeState.PROBING:
            return []
        actions: list[ProbeAction] = []
        if now >= self._deadline:
            return self._exhaust("the probe's deadline passed first")
        for attempt in self._attempts:
            if self._live(attempt) and now >= attempt.started_at + self._attempt_timeout:
                actions.append(CancelAttempt(attempt_id=attempt.attempt_id, kind=attempt.kind))
                self._attempt_failed(
                    attempt, f"not validated within {self._attempt_timeout:g} s", now
                )
        while (following := self._next_pending()) is not None:
            running = any(self._live(attempt) for attempt in self._attempts)
            due = self._same_tier_running(following) and now >= self._last_start + self._stagger
            if running and not due:
                break
            following.attempt_id, self._next_id = self._next_id, self._next_id + 1
            following.started_at = self._last_start = now
            actions.append(StartAttempt(attempt_id=following.attempt_id, kind=following.kind))
        if all(attempt.outcome is not None for attempt in self._attempts):
            actions += self._exhaust("")
        return actions

    # --- internals -------------------------------------------------------------------

    def _new_round(self, now: float, event: _Input) -> list[ProbeAction]:
        self._move(event)
        self.result = None
        winner = self._memory.winner(self.location)
        demoted = self._memory.demoted(self.location, now)
        self._attempts = []
        for kind in self._kinds:
            tier = _WINNER if kind == winner else _DEMOTED if kind in demoted else _FRESH
            self._attempts.append(_Attempt(kind=kind, tier=tier))
        # A stable sort keeps the caller's cost order inside each tier.
        self._attempts.sort(key=lambda attempt: attempt.tier)
        self._round_first_id = self._next_id
        self._deadline = now + self._deadline_after
        self._last_start = now
        return self.handle_timer(now)

    def _running(self, attempt_id: int) -> _Attempt | None:
        if not 0 < attempt_id < self._next_id:
            raise LocalProtocolError(f"no attempt {attempt_id} was started")
        if attempt_id < self._round_first_id or self._state is not ProbeState.PROBING:
            return None  # from an earlier round, or after the choice: its news is moot
        for attempt in self._attempts:
            if attempt.attempt_id == attempt_id:
                return attempt if attempt.outcome is None else None
        return None  # pragma: no cover - every id of this round names one of its attempts

    @staticmethod
    def _live(attempt: _Attempt) -> bool:
        return attempt.attempt_id != 0 and attempt.outcome is None

    def _next_pending(self) -> _Attempt | None:
        return next((a for a in self._attempts if a.attempt_id == 0), None)

    def _same_tier_running(self, following: _Attempt) -> bool:
        """Whether ``following`` may join the running attempts on the stagger alone."""
        started = [a for a in self._attempts if a.attempt_id != 0]
        return bool(started) and started[-1].tier == following.tier

    def _attempt_failed(self, attempt: _Attempt, reason: str, now: float) -> None:
        attempt.outcome = reason
        self._memory.record_failed(self.location, attempt.kind, reason, now)

    def _cancel_running(self, *, except_id: int = 0) -> list[ProbeAction]:
        actions: list[ProbeAction] = []
        for attempt in self._attempts:
            if self._live(attempt) and attempt.attempt_id != except_id:
                attempt.outcome = "cancelled"
                actions.append(CancelAttempt(attempt_id=attempt.attempt_id, kind=attempt.kind))
        return actions

    def _exhaust(self, unfinished: str) -> list[ProbeAction]:
        actions = self._cancel_running()
        reasons = []
        for attempt in self._attempts:
            if attempt.attempt_id == 0:
                reason = "not started before the deadline"
            elif attempt.outcome == "cancelled":
                reason = unfinished
            else:
                reason = attempt.outcome or unfinished
            reasons.append((attempt.kind, reason))
        self._move(_Input.EXHAUSTED)
        self.result = ProbeFailed(reasons=tuple(reasons))
        actions.append(self.result)
        return actions

    def _move(self, event: _Input) -> None:
        next_state = _TRANSITIONS.get((self._state, event))
        if next_state is None:
            raise LocalProtocolError(f"{event.value} while {self._state.value}")
        self._state = next_state
