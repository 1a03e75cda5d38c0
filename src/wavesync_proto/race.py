"""The client's path race (DESIGN §1 steps 1-7): every path at once, the first verified wins.

This module owns every decision of one client connect: which sources to ask (LAN search,
mediator), which attempts to start from what they offer, when a delayed attempt may start,
which attempt wins, what to cancel, and when and why the race has failed.
It does not know how a dial, a rendezvous or a relay session is made, or what time it is:
the adapter runs the actions (``actions()``) and reports back with ``now``.

There is no preference between TCP and UDP: an attempt starts as soon as a source offers it
(unless a per-kind ``start_delays`` entry holds it back), and the first attempt whose server
proved itself (``attempt_verified``) wins. One preference only: a verified relay stream waits
up to ``relay_grace`` (100 ms) for a direct path still under way (a running TCP, LAN or UDP
attempt, or a source that may still offer one) before it wins, because a relay carries every
byte through a third host and a punched or direct path, once up, is the better one to keep.
Without it a relay on a fast link beats a hole punch by a millisecond or two every time.
A transport that merely came up
(``attempt_connected``) wins nothing: a stray UDT peer or a wrong TCP listener must not.

A punched hole that already exists for this server (``reuse``, DESIGN §1 step 7) is tried
alone first, since it needs no mediator; only when it fails does the full race start.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType

from .addresses import Endpoint, format_endpoint
from .errors import LocalProtocolError
from .mediator.attributes import ConnectionPath
from .mediator.messages import ConnectResponse

__all__ = [
    "ALL_PATHS",
    "DEADLINE",
    "EVERY_PATH_FAILED",
    "NO_PATH_OFFERED",
    "RELAY_GRACE",
    "RESULT_PATHS",
    "AskMediator",
    "Attempt",
    "AttemptFailure",
    "CancelAttempt",
    "PathKind",
    "PathRace",
    "RaceAction",
    "RaceEvent",
    "RaceFailed",
    "RaceWon",
    "StartAttempt",
    "StartLanSearch",
]

# The reasons a RaceFailed carries.
EVERY_PATH_FAILED = "every path failed"
DEADLINE = "deadline"
NO_PATH_OFFERED = "no path offered"

#: How long a verified relay stream waits for a direct path still under way (seconds).
RELAY_GRACE = 0.1


class PathKind(enum.Enum):
    """How an attempt reaches the server."""

    LAN = "lan"
    """Direct TCP to an address a LAN search answer gave."""
    TCP = "tcp"
    """Direct TCP to a forwarded or local address the mediator gave."""
    UDP = "udp"
    """UDT rendezvous through a punched hole (or a new connection on an existing one)."""
    RELAY = "relay"
    """A relay session."""


#: The ``ConnectionPath`` connection_result (0x106) reports for each kind of winning path.
RESULT_PATHS: Mapping[PathKind, int] = MappingProxyType(
    {
        PathKind.LAN: ConnectionPath.LAN,
        PathKind.TCP: ConnectionPath.TCP,
        PathKind.UDP: ConnectionPath.UDP,
        PathKind.RELAY: ConnectionPath.RELAY,
    }
)

ALL_PATHS: frozenset[PathKind] = frozenset(PathKind)


@dataclass(frozen=True, kw_only=True)
class Attempt:
    """One way to reach the server, as the adapter is told to try it."""

    attempt_id: int
    """Names the attempt in every report about it; unique within one race."""
    kind: PathKind
    tcp_endpoint: Endpoint | None = None
    """LAN and TCP attempts: the address to dial."""
    udp_candidates: tuple[Endpoint, ...] = ()
    """UDP attempts: rendezvous toward all of these at once (the first to answer is it)."""
    reuse: bool = False
    """UDP only: a new regular UDT connect over an already punched hole, no rendezvous."""
    relay_url: str | None = None
    """RELAY attempts: the relay to ask for the server."""

    def __post_init__(self) -> None:
        direct = self.kind in (PathKind.LAN, PathKind.TCP)
        if (
            (self.tcp_endpoint is not None) != direct
            or bool(self.udp_candidates) != (self.kind is PathKind.UDP)
            or (self.relay_url is not None) != (self.kind is PathKind.RELAY)
            or (self.reuse and self.kind is not PathKind.UDP)
        ):
            raise LocalProtocolError(f"a {self.kind.value} attempt with the wrong fields: {self}")

    @property
    def target(self) -> str:
        """Where the attempt goes, without its kind: ``10.0.0.5:8080``, ``http://r:3478``."""
        if self.tcp_endpoint is not None:
            return format_endpoint(self.tcp_endpoint)
        if self.relay_url is not None:
            return self.relay_url
        candidates = ", ".join(format_endpoint(e) for e in self.udp_candidates)
        return f"{candidates} (reused hole)" if self.reuse else candidates

    def describe(self) -> str:
        """``tcp 10.0.0.5:8080``, ``udp 1.2.3.4:5000, 10.0.0.5:5000``, ``relay http://r:3478``."""
        return f"{self.kind.value} {self.target}"


# --- actions (what the adapter must do now) ------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class RaceAction:
    """Base class of what ``PathRace.actions()`` tells the adapter to do, in order."""


@dataclass(frozen=True, kw_only=True)
class StartLanSearch(RaceAction):
    """Run LAN discovery now; report ``offer_lan()`` per answer and ``lan_search_finished()``."""


@dataclass(frozen=True, kw_only=True)
class AskMediator(RaceAction):
    """Send the connect request now; report ``offer_connect_response/mediator_failed()``."""


@dataclass(frozen=True, kw_only=True)
class StartAttempt(RaceAction):
    """Start this attempt; report ``attempt_connected/verified/failed`` with its id."""

    attempt: Attempt


@dataclass(frozen=True, kw_only=True)
class CancelAttempt(RaceAction):
    """Stop this attempt and close whatever it opened; later reports about it are ignored."""

    attempt: Attempt
    reason: str
    """``another path won: <winner>`` or ``deadline``."""


# --- events (the outcome, exactly one) ----------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class AttemptFailure:
    """Why one path did not work: an attempt, a source, or a path nothing offered."""

    kind: PathKind | None
    """The path's kind; None for a source (``lan search``, ``mediator``)."""
    target: str
    """The attempt's target, the source's name, or '' for a kind as a whole."""
    reason: str

    def describe(self) -> str:
        """``tcp 10.0.0.5:8080: refused``, ``mediator: 404 Server Offline``, ``udp: ...``."""
        if self.kind is None:
            return f"{self.target}: {self.reason}"
        where = f"{self.kind.value} {self.target}" if self.target else self.kind.value
        return f"{where}: {self.reason}"


@dataclass(frozen=True, kw_only=True)
class RaceEvent:
    """Base class of the one event a race ends with."""


@dataclass(frozen=True, kw_only=True)
class RaceWon(RaceEvent):
    """An attempt reached the server and the server proved itself; the rest are cancelled."""

    attempt: Attempt
    elapsed: float
    """Seconds from the race's start to the verification."""
    failures: tuple[AttemptFailure, ...]
    """What failed before the winner won (a failed hole reuse, refused dials, ...)."""
    connected_elapsed: float | None = None
    """Seconds from the race's start until the winner's transport was up, if reported."""


@dataclass(frozen=True, kw_only=True)
class RaceFailed(RaceEvent):
    """No path worked: every path and source that failed, and why."""

    failures: tuple[AttemptFailure, ...]
    reason: str
    """``every path failed``, ``deadline`` or ``no path offered``."""
    elapsed: float

    def describe(self) -> str:
        """Several lines naming every path and source and why each failed."""
        lines = [f"no path to the server ({self.reason}, after {self.elapsed:.3g} s):"]
        lines += [f"  {failure.describe()}" for failure in self.failures] or ["  nothing to try"]
        return "\n".join(lines)


def _failure(kind: PathKind | None, target: str, reason: str) -> AttemptFailure:
    return AttemptFailure(kind=kind, target=target, reason=reason)


# --- the machine --------------------------------------------------------------------------


class _Source(enum.Enum):
    IDLE = "idle"  # not asked (yet)
    ASKED = "asked"  # its answer is outstanding
    ENDED = "ended"  # answered or failed; later reports are ignored


class _Status(enum.Enum):
    RUNNING = "running"
    FAILED = "failed"
    CANCELLED = "cancelled"
    WON = "won"


class PathRace:
    """One client connect: which attempts to run, when, and which one wins."""

    def __init__(
        self,
        *,
        now: float,
        paths: frozenset[PathKind] = ALL_PATHS,
        deadline: float = 10.0,
        start_delays: Mapping[PathKind, float] | None = None,
        lan: bool = True,
        mediator: bool = True,
        relays: Sequence[str] = (),
        reuse: tuple[Endpoint, ...] = (),
        max_attempts: int = 64,
        relay_grace: float = RELAY_GRACE,
    ) -> None:
        if not paths or not all(isinstance(kind, PathKind) for kind in paths):
            raise LocalProtocolError("paths must name at least one PathKind")
        if not math.isfinite(now):
            raise LocalProtocolError("now must be a finite number of seconds")
        if not (math.isfinite(deadline) and deadline > 0):
            raise LocalProtocolError("the race deadline must be a positive number of seconds")
        delays = dict(start_delays or {})
        for kind, delay in delays.items():
            if not isinstance(kind, PathKind) or not (math.isfinite(delay) and delay >= 0):
                raise LocalProtocolError(f"bad start delay {kind!r}: {delay!r}")
        if max_attempts < 1:
            raise LocalProtocolError("max_attempts must be at least 1")
        if not (math.isfinite(relay_grace) and relay_grace >= 0):
            raise LocalProtocolError("relay_grace must be a non-negative number of seconds")
        if any(not isinstance(url, str) or not url for url in relays):
            raise LocalProtocolError("relay URLs must be non-empty strings")
        #: The caller's clock at the start; every elapsed value counts from here.
        self.started_at = now
        self._now = now
        self._deadline_at = now + deadline
        self._paths = frozenset(paths)
        self._delays = delays
        self._lan_available = lan
        self._mediator_available = mediator
        self._relays = tuple(relays)
        self._max_attempts = max_attempts
        self._relay_grace = relay_grace
        #: A verified relay attempt waiting (until the time given) for a direct path.
        self._waiting_relay: tuple[float, Attempt] | None = None
        self._lan = _Source.IDLE
        self._mediator = _Source.IDLE
        self._lan_answers = 0
        self._full_race = False
        # Every offer taken (started or held), so no address or URL is tried twice.
        self._tried: set[tuple[object, ...]] = set()
        self._dropped = 0
        self._held: list[tuple[float, Attempt]] = []  # (not before, attempt with id 0)
        self._attempts: dict[int, Attempt] = {}
        self._status: dict[int, _Status] = {}
        self._connected: dict[int, float] = {}
        self._failures: list[AttemptFailure] = []
        self._actions: list[RaceAction] = []
        self._events: deque[RaceWon | RaceFailed] = deque()
        self._winner: Attempt | None = None
        self._done = False
        if reuse and PathKind.UDP in self._paths:
            candidates = tuple(dict.fromkeys(reuse))
            self._offer(
                Attempt(attempt_id=0, kind=PathKind.UDP, udp_candidates=candidates, reuse=True)
            )
        else:
            self._start_full_race()
        self._settle()

    # --- queries -----------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """True once the race is won or failed; every later report is ignored."""
        return self._done

    @property
    def winner(self) -> Attempt | None:
        """The attempt that won, once there is one."""
        return self._winner

    def actions(self) -> list[RaceAction]:
        """What to do now, in order; each action is returned once."""
        actions, self._actions = self._actions, []
        return actions

    def next_event(self) -> RaceWon | RaceFailed | None:
        """``RaceWon`` or ``RaceFailed``, once."""
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        """The next held attempt's start or the race's deadline; None once done."""
        if self._done:
            return None
        times = [self._deadline_at, *(not_before for not_before, _ in self._held)]
        if self._waiting_relay is not None:
            times.append(self._waiting_relay[0])
        return min(times)

    # --- what the sources offer -----------------------------------------------------------

    def offer_lan(self, endpoints: Sequence[Endpoint], now: float) -> None:
        """A LAN search answer: the server's TCP endpoints, each dialled as a LAN attempt."""
        if self._source_report(self._lan, "offer_lan", "StartLanSearch", now):
            self._lan_answers += 1
            for endpoint in endpoints:
                self._offer(Attempt(attempt_id=0, kind=PathKind.LAN, tcp_endpoint=endpoint))
            self._settle()

    def lan_search_finished(self, now: float) -> None:
        """The LAN search is over; no more ``offer_lan`` follows."""
        if self._source_report(self._lan, "lan_search_finished", "StartLanSearch", now):
            self._lan = _Source.ENDED
            if not self._lan_answers:
                self._failures.append(_failure(None, "lan search", "no server answered"))
            self._settle()

    def offer_connect_response(self, response: ConnectResponse, now: float) -> None:
        """The mediator's answer: a TCP attempt per endpoint, one UDP attempt, a relay per URL."""
        if not self._source_report(self._mediator, "offer_connect_response", "AskMediator", now):
            return
        self._mediator = _Source.ENDED
        if PathKind.TCP in self._paths:
            direct = (*response.forwarded_endpoints, *response.local_endpoints)
            if not direct:
                self._note(PathKind.TCP, "the mediator reported no TCP endpoint")
            for endpoint in direct:
                self._offer(Attempt(attempt_id=0, kind=PathKind.TCP, tcp_endpoint=endpoint))
        if PathKind.UDP in self._paths:
            if not response.udp_endpoints:
                self._note(PathKind.UDP, "the mediator reported no UDP endpoint")
            else:
                candidates = tuple(dict.fromkeys(response.udp_endpoints))
                self._offer(Attempt(attempt_id=0, kind=PathKind.UDP, udp_candidates=candidates))
        if PathKind.RELAY in self._paths:
            if not response.relay_urls and not self._relays:
                self._note(PathKind.RELAY, "the mediator reported no relay URL")
            for url in response.relay_urls:
                self._offer(Attempt(attempt_id=0, kind=PathKind.RELAY, relay_url=url))
        self._settle()

    def mediator_failed(self, reason: str, now: float) -> None:
        """No connect_response: the mediator refused (``404 Server Offline``) or never answered."""
        if self._source_report(self._mediator, "mediator_failed", "AskMediator", now):
            self._mediator = _Source.ENDED
            self._failures.append(_failure(None, "mediator", reason))
            self._settle()

    # --- what attempts report -----------------------------------------------------------

    def attempt_connected(self, attempt_id: int, now: float) -> None:
        """The attempt's transport is up and verification runs: recorded for timing only."""
        if self._running(attempt_id, now) is not None:
            self._connected.setdefault(attempt_id, self._now - self.started_at)

    def attempt_verified(self, attempt_id: int, now: float) -> None:
        """The server proved itself over this attempt: the first one wins the race."""
        attempt = self._running(attempt_id, now)
        if attempt is None:
            return
        if attempt.kind is PathKind.RELAY and self._relay_grace > 0 and self._direct_pending():
            if self._waiting_relay is None:  # a later relay is no better than the first
                self._waiting_relay = (self._now + self._relay_grace, attempt)
            return
        self._win(attempt)

    def attempt_failed(self, attempt_id: int, reason: str, now: float) -> None:
        """The attempt failed (including a failed verification); a failed reuse starts the race."""
        attempt = self._running(attempt_id, now)
        if attempt is None:
            return
        self._status[attempt_id] = _Status.FAILED
        self._failures.append(_failure(attempt.kind, attempt.target, reason))
        if attempt.reuse and not self._full_race:
            self._start_full_race()
        self._settle()

    def handle_timer(self, now: float) -> None:
        """Move time: the deadline ends the race; held attempts whose delay is over start."""
        self._clock(now)
        if self._done:
            return
        if self._waiting_relay is not None and self._waiting_relay[0] <= self._now:
            self._win(self._waiting_relay[1])
            return
        due = sorted(
            (item for item in self._held if item[0] <= self._now), key=lambda item: item[0]
        )
        self._held = [item for item in self._held if item[0] > self._now]
        for _, attempt in due:
            self._start(attempt)
        self._settle()

    # --- helpers ------------------------------------------------------------------------

    def _clock(self, now: float) -> None:
        """Move to ``now``; a report that comes after the deadline finds the race over."""
        # A caller's clock that steps back is clamped: elapsed values never shrink.
        self._now = max(self._now, now)
        if not self._done and self._now >= self._deadline_at:
            if self._waiting_relay is not None:
                self._win(self._waiting_relay[1])  # a verified relay beats failing
            else:
                self._fail_at_deadline()

    def _source_report(self, source: _Source, call: str, action: str, now: float) -> bool:
        """Check a source's report: True when it still counts (asked, not ended, race on)."""
        if source is _Source.IDLE:
            raise LocalProtocolError(f"{call}() without a {action} action")
        self._clock(now)
        return not self._done and source is _Source.ASKED

    def _running(self, attempt_id: int, now: float) -> Attempt | None:
        """The attempt a report names, if it is still running and the race still on."""
        attempt = self._attempts.get(attempt_id)
        if attempt is None:
            raise LocalProtocolError(f"no attempt {attempt_id} was started")
        self._clock(now)
        if self._done or self._status[attempt_id] is not _Status.RUNNING:
            return None  # late results of cancelled or failed attempts are normal
        return attempt

    def _direct_pending(self) -> bool:
        """A direct (TCP, LAN or UDP) attempt runs, or a source may still offer one."""
        if _Source.ASKED in (self._lan, self._mediator):
            return True
        return any(
            status is _Status.RUNNING and self._attempts[attempt_id].kind is not PathKind.RELAY
            for attempt_id, status in self._status.items()
        )

    def _note(self, kind: PathKind, reason: str) -> None:
        self._failures.append(_failure(kind, "", reason))

    def _unavailable(self) -> list[AttemptFailure]:
        """Why a wanted kind had no source at all (only worth saying when the race fails)."""
        if not self._full_race:
            return []
        notes = []
        if PathKind.LAN in self._paths and not self._lan_available:
            notes.append(_failure(PathKind.LAN, "", "LAN discovery is off"))
        if not self._mediator_available:
            for kind in (PathKind.TCP, PathKind.UDP):
                if kind in self._paths:
                    notes.append(_failure(kind, "", "no mediator configured"))
            if PathKind.RELAY in self._paths and not self._relays:
                reason = "no relay URL known and no mediator configured"
                notes.append(_failure(PathKind.RELAY, "", reason))
        if self._dropped:
            reason = f"{self._dropped} offered paths not tried (max_attempts={self._max_attempts})"
            notes.append(_failure(None, "race", reason))
        return notes

    # --- transitions: every start, end and outcome happens below ----------------------------

    def _start_full_race(self) -> None:
        self._full_race = True
        if PathKind.LAN in self._paths and self._lan_available:
            self._lan = _Source.ASKED
            self._actions.append(StartLanSearch())
        relay_from_mediator = PathKind.RELAY in self._paths and not self._relays
        wants_mediator = bool({PathKind.TCP, PathKind.UDP} & self._paths) or relay_from_mediator
        if self._mediator_available and wants_mediator:
            self._mediator = _Source.ASKED
            self._actions.append(AskMediator())
        if PathKind.RELAY in self._paths:
            for url in self._relays:
                self._offer(Attempt(attempt_id=0, kind=PathKind.RELAY, relay_url=url))

    def _offer(self, attempt: Attempt) -> None:
        """Take an offered path (id still 0): drop a repeat, hold it, or start it."""
        key: tuple[object, ...]
        if attempt.tcp_endpoint is not None:
            key = ("dial", attempt.tcp_endpoint)  # LAN and TCP dial the same way
        elif attempt.relay_url is not None:
            key = ("relay", attempt.relay_url)
        else:
            # A dead reused hole says nothing about a fresh rendezvous to the same address.
            key = ("udp", attempt.reuse, frozenset(attempt.udp_candidates))
        if key in self._tried:
            return  # the first source's offer already covers it
        if len(self._tried) >= self._max_attempts:
            self._dropped += 1
            return
        self._tried.add(key)
        # The reused hole needs no mediator and nothing competes with it: no start delay.
        delay = 0.0 if attempt.reuse else self._delays.get(attempt.kind, 0.0)
        if self.started_at + delay <= self._now:
            self._start(attempt)
        else:
            self._held.append((self.started_at + delay, attempt))

    def _start(self, attempt: Attempt) -> None:
        started = replace(attempt, attempt_id=len(self._attempts) + 1)
        self._attempts[started.attempt_id] = started
        self._status[started.attempt_id] = _Status.RUNNING
        self._actions.append(StartAttempt(attempt=started))

    def _cancel_running(self, reason: str) -> list[Attempt]:
        cancelled = [
            self._attempts[attempt_id]
            for attempt_id, status in self._status.items()
            if status is _Status.RUNNING
        ]
        for attempt in cancelled:
            self._status[attempt.attempt_id] = _Status.CANCELLED
            self._actions.append(CancelAttempt(attempt=attempt, reason=reason))
        return cancelled

    def _win(self, attempt: Attempt) -> None:
        self._done = True
        self._winner = attempt
        self._status[attempt.attempt_id] = _Status.WON
        self._held.clear()
        self._cancel_running(f"another path won: {attempt.describe()}")
        self._events.append(
            RaceWon(
                attempt=attempt,
                elapsed=self._now - self.started_at,
                failures=tuple(self._failures),
                connected_elapsed=self._connected.get(attempt.attempt_id),
            )
        )

    def _fail_at_deadline(self) -> None:
        for attempt in self._cancel_running(DEADLINE):
            connected = self._connected.get(attempt.attempt_id)
            reason = (
                "no answer by the deadline"
                if connected is None
                else f"connected after {connected:.3g} s, not verified by the deadline"
            )
            self._failures.append(_failure(attempt.kind, attempt.target, reason))
        for _, attempt in self._held:
            self._failures.append(
                _failure(attempt.kind, attempt.target, "its start delay outlasted the race")
            )
        self._held.clear()
        if self._lan is _Source.ASKED:
            self._failures.append(_failure(None, "lan search", "still searching"))
        if self._mediator is _Source.ASKED:
            self._failures.append(_failure(None, "mediator", "no answer by the deadline"))
        self._fail(DEADLINE)

    def _settle(self) -> None:
        """End the race once nothing is running, held or outstanding and nothing won; a
        waiting relay wins once no direct path can come any more."""
        if self._done:
            return
        if self._waiting_relay is not None and not self._direct_pending():
            self._win(self._waiting_relay[1])
            return
        if self._held or _Source.ASKED in (self._lan, self._mediator):
            return
        if _Status.RUNNING in self._status.values():
            return
        self._fail(EVERY_PATH_FAILED if self._attempts else NO_PATH_OFFERED)

    def _fail(self, reason: str) -> None:
        self._done = True
        failures = (*self._failures, *self._unavailable())
        self._events.append(
            RaceFailed(failures=failures, reason=reason, elapsed=self._now - self.started_at)
        )
