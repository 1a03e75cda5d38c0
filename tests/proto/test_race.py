"""PathRace driven in memory with a hand-moved clock: every rule of the client's path race."""

from __future__ import annotations

import math
import uuid

import pytest

from wavesync_proto.addresses import Endpoint
from wavesync_proto.errors import LocalProtocolError
from wavesync_proto.mediator import ConnectResponse
from wavesync_proto.race import (
    ALL_PATHS,
    DEADLINE,
    EVERY_PATH_FAILED,
    NO_PATH_OFFERED,
    RELAY_GRACE,
    AskMediator,
    Attempt,
    AttemptFailure,
    CancelAttempt,
    PathKind,
    PathRace,
    RaceAction,
    RaceFailed,
    RaceWon,
    StartAttempt,
    StartLanSearch,
)

T0 = 100.0
SYSTEM = uuid.UUID("04f5a9ea-3cb8-44b0-bb62-401b420701de")
SERVER = uuid.UUID("9b2f4c0e-1d7a-4e63-8a55-0c3f6b1e2d44")
FORWARDED: Endpoint = ("198.51.100.4", 443)
LOCAL: Endpoint = ("10.0.0.5", 8080)
UDP_PUBLIC: Endpoint = ("1.2.3.4", 5000)
UDP_LOCAL: Endpoint = ("10.0.0.5", 5000)
RELAY = "http://r:3478"
OTHER_RELAY = "https://relay.example/"


def response(
    *,
    forwarded: tuple[Endpoint, ...] = (FORWARDED,),
    local: tuple[Endpoint, ...] = (LOCAL,),
    udp: tuple[Endpoint, ...] = (UDP_PUBLIC, UDP_LOCAL),
    relays: tuple[str, ...] = (RELAY,),
) -> ConnectResponse:
    return ConnectResponse(
        server_id=SERVER,
        system_id=SYSTEM,
        forwarded_endpoints=forwarded,
        local_endpoints=local,
        udp_endpoints=udp,
        relay_urls=relays,
    )


def started(actions: list[RaceAction]) -> list[Attempt]:
    return [a.attempt for a in actions if isinstance(a, StartAttempt)]


def cancelled(actions: list[RaceAction]) -> list[tuple[int, str]]:
    return [(a.attempt.attempt_id, a.reason) for a in actions if isinstance(a, CancelAttempt)]


def described(actions: list[RaceAction]) -> list[str]:
    return [attempt.describe() for attempt in started(actions)]


def failure(kind: PathKind | None, target: str, reason: str) -> AttemptFailure:
    return AttemptFailure(kind=kind, target=target, reason=reason)


def racing(**options: object) -> tuple[PathRace, list[Attempt]]:
    """A race at T0 with every source answered: LAN found nothing, the mediator gave RESPONSE."""
    race = PathRace(now=T0, **options)  # type: ignore[arg-type]
    if StartLanSearch() in race.actions():
        race.lan_search_finished(T0 + 0.1)
    race.offer_connect_response(response(), T0 + 0.2)
    return race, started(race.actions())


# --- starting --------------------------------------------------------------------------------


def test_the_full_race_asks_both_sources_and_every_known_relay_at_once() -> None:
    race = PathRace(now=T0, relays=(RELAY, OTHER_RELAY))
    actions = race.actions()
    assert actions[:2] == [StartLanSearch(), AskMediator()]
    assert described(actions) == [f"relay {RELAY}", f"relay {OTHER_RELAY}"]
    assert [a.attempt_id for a in started(actions)] == [1, 2]
    assert race.actions() == []
    assert race.started_at == T0
    assert not race.done
    assert race.winner is None
    assert race.next_event() is None
    assert race.get_timer() == T0 + 10.0


@pytest.mark.parametrize(
    ("paths", "lan", "mediator", "relays", "expected"),
    [
        (ALL_PATHS, True, True, (), [StartLanSearch(), AskMediator()]),
        (ALL_PATHS, False, True, (), [AskMediator()]),
        (frozenset({PathKind.LAN}), True, True, (), [StartLanSearch()]),
        (frozenset({PathKind.TCP}), True, True, (), [AskMediator()]),
        (frozenset({PathKind.UDP}), True, True, (RELAY,), [AskMediator()]),
        (frozenset({PathKind.RELAY}), True, True, (), [AskMediator()]),
        # Relays known up front: the relay path needs no mediator.
        (frozenset({PathKind.RELAY}), True, True, (RELAY,), []),
        (frozenset({PathKind.LAN, PathKind.TCP}), True, False, (), [StartLanSearch()]),
    ],
)
def test_which_sources_are_asked(
    paths: frozenset[PathKind],
    lan: bool,
    mediator: bool,
    relays: tuple[str, ...],
    expected: list[RaceAction],
) -> None:
    race = PathRace(now=T0, paths=paths, lan=lan, mediator=mediator, relays=relays)
    assert [a for a in race.actions() if not isinstance(a, StartAttempt)] == expected


def test_a_lan_answer_is_dialled_per_endpoint() -> None:
    race = PathRace(now=T0)
    race.actions()
    race.offer_lan([LOCAL, ("fd00::5", 8080)], T0 + 0.05)
    assert described(race.actions()) == ["lan 10.0.0.5:8080", "lan [fd00::5]:8080"]


def test_a_connect_response_starts_every_tcp_endpoint_one_udp_attempt_and_each_relay() -> None:
    _, attempts = racing()
    assert [a.describe() for a in attempts] == [
        "tcp 198.51.100.4:443",
        "tcp 10.0.0.5:8080",
        "udp 1.2.3.4:5000, 10.0.0.5:5000",
        "relay http://r:3478",
    ]
    udp = attempts[2]
    assert udp.udp_candidates == (UDP_PUBLIC, UDP_LOCAL)
    assert not udp.reuse
    assert [a.attempt_id for a in attempts] == [1, 2, 3, 4]


def test_only_the_kinds_asked_for_are_started() -> None:
    _, attempts = racing(paths=frozenset({PathKind.UDP}))
    assert [a.describe() for a in attempts] == ["udp 1.2.3.4:5000, 10.0.0.5:5000"]


# --- deduplication and the bound --------------------------------------------------------------


def test_an_endpoint_is_dialled_once_and_the_first_source_names_it() -> None:
    race = PathRace(now=T0, relays=(RELAY,))
    assert described(race.actions()) == ["relay http://r:3478"]
    race.offer_lan([LOCAL, LOCAL], T0 + 0.01)
    race.offer_connect_response(
        response(forwarded=(FORWARDED, FORWARDED), local=(LOCAL,), relays=(RELAY, OTHER_RELAY)),
        T0 + 0.2,
    )
    assert described(race.actions()) == [
        "lan 10.0.0.5:8080",
        "tcp 198.51.100.4:443",
        "udp 1.2.3.4:5000, 10.0.0.5:5000",
        "relay https://relay.example/",
    ]


def test_max_attempts_drops_extra_offers_and_says_so_in_the_report() -> None:
    race, attempts = racing(max_attempts=2, lan=False)
    assert [a.describe() for a in attempts] == ["tcp 198.51.100.4:443", "tcp 10.0.0.5:8080"]
    race.attempt_failed(1, "refused", T0 + 0.3)
    race.attempt_failed(2, "refused", T0 + 0.4)
    event = race.next_event()
    assert isinstance(event, RaceFailed)
    assert event.reason == EVERY_PATH_FAILED
    assert event.failures[-1] == failure(None, "race", "2 offered paths not tried (max_attempts=2)")


# --- start delays -------------------------------------------------------------------------------


def test_a_delayed_kind_is_held_until_its_delay_and_started_by_the_timer() -> None:
    race = PathRace(now=T0, start_delays={PathKind.UDP: 0.5, PathKind.RELAY: 2.0})
    race.actions()
    race.offer_connect_response(response(), T0 + 0.1)
    assert described(race.actions()) == ["tcp 198.51.100.4:443", "tcp 10.0.0.5:8080"]
    assert race.get_timer() == T0 + 0.5
    race.handle_timer(T0 + 0.4)  # early: nothing moves
    assert race.actions() == []
    race.handle_timer(T0 + 0.5)
    (udp,) = started(race.actions())
    assert udp.describe() == "udp 1.2.3.4:5000, 10.0.0.5:5000"
    assert udp.attempt_id == 3
    assert race.get_timer() == T0 + 2.0
    race.handle_timer(T0 + 2.0)
    assert described(race.actions()) == ["relay http://r:3478"]
    assert race.get_timer() == T0 + 10.0


def test_a_delayed_kind_offered_after_its_delay_starts_at_once() -> None:
    race = PathRace(now=T0, start_delays={PathKind.LAN: 0.3})
    race.actions()
    race.offer_lan([LOCAL], T0 + 0.5)
    assert described(race.actions()) == ["lan 10.0.0.5:8080"]


def test_a_held_attempt_keeps_the_race_from_failing() -> None:
    race = PathRace(
        now=T0, paths=frozenset({PathKind.TCP, PathKind.UDP}), start_delays={PathKind.UDP: 1.0}
    )
    race.actions()
    race.offer_connect_response(response(local=()), T0 + 0.1)
    assert described(race.actions()) == ["tcp 198.51.100.4:443"]
    race.attempt_failed(1, "refused", T0 + 0.2)  # the only running attempt
    assert not race.done
    race.handle_timer(T0 + 1.0)
    (udp,) = started(race.actions())
    race.attempt_verified(udp.attempt_id, T0 + 1.5)
    assert isinstance(race.next_event(), RaceWon)


# --- winning -------------------------------------------------------------------------------------


def test_the_first_verified_attempt_wins_and_the_others_are_cancelled() -> None:
    race, attempts = racing()
    race.attempt_failed(1, "connection refused", T0 + 0.3)
    race.attempt_connected(3, T0 + 0.35)
    race.attempt_connected(2, T0 + 0.4)
    race.attempt_verified(2, T0 + 0.5)
    assert race.done
    assert race.winner == attempts[1]
    assert race.next_event() == RaceWon(
        attempt=attempts[1],
        elapsed=0.5,
        failures=(
            failure(None, "lan search", "no server answered"),
            failure(PathKind.TCP, "198.51.100.4:443", "connection refused"),
        ),
        connected_elapsed=pytest.approx(0.4),  # type: ignore[arg-type]
    )
    assert race.next_event() is None
    won = "another path won: tcp 10.0.0.5:8080"
    assert cancelled(race.actions()) == [(3, won), (4, won)]
    assert race.get_timer() is None


def test_a_connected_transport_alone_never_wins() -> None:
    race, _ = racing()
    for attempt_id in (1, 2, 3, 4):
        race.attempt_connected(attempt_id, T0 + 0.3)
    race.handle_timer(T0 + 5.0)
    assert not race.done
    assert race.next_event() is None


def test_every_report_after_the_end_is_ignored() -> None:
    race, _ = racing(relay_grace=0.0)
    race.attempt_verified(4, T0 + 0.5)
    race.next_event()
    race.actions()
    race.attempt_verified(1, T0 + 0.6)
    race.attempt_failed(2, "cancelled", T0 + 0.6)
    race.attempt_connected(3, T0 + 0.7)
    race.handle_timer(T0 + 20.0)
    assert race.next_event() is None
    assert race.actions() == []
    assert race.winner is not None
    assert race.winner.describe() == "relay http://r:3478"


def test_a_failed_attempt_cannot_win_later() -> None:
    race, _ = racing()
    race.attempt_failed(1, "verification failed: wrong server key", T0 + 0.3)
    race.attempt_verified(1, T0 + 0.4)
    assert not race.done


def test_a_clock_that_steps_back_is_clamped() -> None:
    race, _ = racing()
    race.attempt_connected(1, T0 + 0.9)
    race.attempt_verified(1, T0 + 0.5)
    event = race.next_event()
    assert isinstance(event, RaceWon)
    assert event.elapsed == pytest.approx(0.9)


# --- misuse -------------------------------------------------------------------------------------


def test_a_report_for_an_attempt_never_started_raises() -> None:
    race, _ = racing(start_delays={PathKind.RELAY: 1.0})  # the relay attempt is only held
    with pytest.raises(LocalProtocolError, match="no attempt 4 was started"):
        race.attempt_verified(4, T0 + 0.5)
    race.attempt_verified(1, T0 + 0.5)
    with pytest.raises(LocalProtocolError, match="no attempt 99 was started"):
        race.attempt_failed(99, "late", T0 + 0.6)


def test_a_source_report_without_the_source_asked_raises() -> None:
    race = PathRace(now=T0, paths=frozenset({PathKind.RELAY}), relays=(RELAY,))
    with pytest.raises(LocalProtocolError, match=r"offer_lan\(\) without a StartLanSearch"):
        race.offer_lan([LOCAL], T0)
    with pytest.raises(LocalProtocolError, match="without a StartLanSearch"):
        race.lan_search_finished(T0)
    with pytest.raises(LocalProtocolError, match="without a AskMediator"):
        race.offer_connect_response(response(), T0)
    with pytest.raises(LocalProtocolError, match="without a AskMediator"):
        race.mediator_failed("timeout", T0)


@pytest.mark.parametrize(
    "options",
    [
        {"paths": frozenset()},
        {"deadline": 0.0},
        {"deadline": float("inf")},
        {"start_delays": {PathKind.UDP: -1.0}},
        {"start_delays": {PathKind.UDP: float("nan")}},
        {"max_attempts": 0},
        {"relays": ("",)},
        {"now": float("nan")},
    ],
)
def test_impossible_settings_are_refused(options: dict[str, object]) -> None:
    settings: dict[str, object] = {"now": T0, **options}
    with pytest.raises(LocalProtocolError):
        PathRace(**settings)  # type: ignore[arg-type]


def test_an_attempt_must_carry_the_fields_of_its_kind() -> None:
    with pytest.raises(LocalProtocolError):
        Attempt(attempt_id=1, kind=PathKind.TCP, relay_url=RELAY)
    with pytest.raises(LocalProtocolError):
        Attempt(attempt_id=1, kind=PathKind.RELAY, relay_url=RELAY, reuse=True)
    with pytest.raises(LocalProtocolError):
        Attempt(attempt_id=1, kind=PathKind.UDP)


# --- failing ------------------------------------------------------------------------------------


def test_the_race_fails_once_every_path_and_source_has_failed() -> None:
    race, _ = racing()
    race.attempt_failed(1, "connection refused", T0 + 0.3)
    race.attempt_failed(2, "timed out", T0 + 0.4)
    race.attempt_failed(3, "rendezvous timed out", T0 + 1.0)
    assert not race.done
    race.attempt_failed(4, "relay said 404: server not connected", T0 + 1.25)
    event = race.next_event()
    assert isinstance(event, RaceFailed)
    assert event.reason == EVERY_PATH_FAILED
    assert event.elapsed == 1.25
    assert event.describe() == (
        "no path to the server (every path failed, after 1.25 s):\n"
        "  lan search: no server answered\n"
        "  tcp 198.51.100.4:443: connection refused\n"
        "  tcp 10.0.0.5:8080: timed out\n"
        "  udp 1.2.3.4:5000, 10.0.0.5:5000: rendezvous timed out\n"
        "  relay http://r:3478: relay said 404: server not connected"
    )
    assert race.next_event() is None
    assert race.actions() == []  # nothing left to cancel


def test_the_race_waits_for_an_outstanding_source() -> None:
    race = PathRace(now=T0, relays=(RELAY,))
    race.actions()
    race.attempt_failed(1, "relay refused", T0 + 0.1)
    race.lan_search_finished(T0 + 0.2)
    assert not race.done  # the mediator has not answered yet
    race.mediator_failed("404 Server Offline", T0 + 0.3)
    event = race.next_event()
    assert isinstance(event, RaceFailed)
    assert event.failures == (
        failure(PathKind.RELAY, RELAY, "relay refused"),
        failure(None, "lan search", "no server answered"),
        failure(None, "mediator", "404 Server Offline"),
    )


def test_nothing_offered_fails_with_every_sources_reason() -> None:
    race = PathRace(now=T0)
    race.actions()
    race.mediator_failed("404 Server Offline", T0 + 0.2)
    race.lan_search_finished(T0 + 1.0)
    assert race.next_event() == RaceFailed(
        failures=(
            failure(None, "mediator", "404 Server Offline"),
            failure(None, "lan search", "no server answered"),
        ),
        reason=NO_PATH_OFFERED,
        elapsed=1.0,
    )


def test_a_forced_path_the_mediator_did_not_offer_fails_at_once() -> None:
    race = PathRace(now=T0, paths=frozenset({PathKind.UDP}))
    race.actions()
    race.offer_connect_response(response(udp=()), T0 + 0.2)
    event = race.next_event()
    assert isinstance(event, RaceFailed)
    assert event.reason == NO_PATH_OFFERED
    assert [f.describe() for f in event.failures] == ["udp: the mediator reported no UDP endpoint"]


def test_a_response_without_tcp_or_relay_is_noted_when_those_paths_are_wanted() -> None:
    race = PathRace(now=T0, paths=frozenset({PathKind.TCP, PathKind.RELAY}))
    race.actions()
    race.offer_connect_response(response(forwarded=(), local=(), relays=()), T0 + 0.2)
    event = race.next_event()
    assert isinstance(event, RaceFailed)
    assert [f.describe() for f in event.failures] == [
        "tcp: the mediator reported no TCP endpoint",
        "relay: the mediator reported no relay URL",
    ]


def test_a_path_with_no_source_at_all_fails_at_construction() -> None:
    race = PathRace(
        now=T0, paths=frozenset({PathKind.TCP, PathKind.LAN}), mediator=False, lan=False
    )
    assert race.actions() == []
    assert race.done
    event = race.next_event()
    assert isinstance(event, RaceFailed)
    assert event.reason == NO_PATH_OFFERED
    assert event.elapsed == 0.0
    assert [f.describe() for f in event.failures] == [
        "lan: LAN discovery is off",
        "tcp: no mediator configured",
    ]
    assert "nothing to try" not in event.describe()


def test_describe_says_when_nothing_was_tried() -> None:
    event = RaceFailed(failures=(), reason=NO_PATH_OFFERED, elapsed=0.0)
    assert (
        event.describe() == "no path to the server (no path offered, after 0 s):\n  nothing to try"
    )


# --- the deadline -------------------------------------------------------------------------------


def test_the_deadline_cancels_every_running_attempt_and_fails_the_race() -> None:
    race = PathRace(now=T0, deadline=3.0, start_delays={PathKind.RELAY: 5.0})
    race.actions()
    race.offer_connect_response(response(), T0 + 0.2)
    race.attempt_failed(1, "refused", T0 + 0.5)
    race.attempt_connected(3, T0 + 0.75)
    race.actions()
    assert race.get_timer() == T0 + 3.0
    race.handle_timer(T0 + 3.0)
    assert cancelled(race.actions()) == [(2, DEADLINE), (3, DEADLINE)]
    event = race.next_event()
    assert isinstance(event, RaceFailed)
    assert event.reason == DEADLINE
    assert event.elapsed == 3.0
    assert [f.describe() for f in event.failures] == [
        "tcp 198.51.100.4:443: refused",
        "tcp 10.0.0.5:8080: no answer by the deadline",
        "udp 1.2.3.4:5000, 10.0.0.5:5000: connected after 0.75 s, not verified by the deadline",
        "relay http://r:3478: its start delay outlasted the race",
        "lan search: still searching",
    ]
    assert race.get_timer() is None


def test_a_report_that_comes_after_the_deadline_finds_the_race_over() -> None:
    race, _ = racing(deadline=2.0)
    race.attempt_verified(1, T0 + 2.5)  # the adapter missed the timer: the deadline came first
    assert race.winner is None
    event = race.next_event()
    assert isinstance(event, RaceFailed)
    assert event.reason == DEADLINE
    assert event.elapsed == 2.5
    assert len(cancelled(race.actions())) == 4


def test_the_deadline_names_an_unanswered_mediator() -> None:
    race = PathRace(now=T0, paths=frozenset({PathKind.TCP}), deadline=1.0)
    race.actions()
    race.handle_timer(T0 + 1.0)
    event = race.next_event()
    assert isinstance(event, RaceFailed)
    assert event.failures == (failure(None, "mediator", "no answer by the deadline"),)


# --- hole reuse ----------------------------------------------------------------------------------


def test_an_existing_hole_is_tried_alone_and_wins_without_the_mediator() -> None:
    race = PathRace(now=T0, reuse=(UDP_PUBLIC,), start_delays={PathKind.UDP: 1.0})
    (action,) = race.actions()  # no LAN search, no mediator, no start delay
    assert isinstance(action, StartAttempt)
    assert action.attempt.reuse
    assert action.attempt.describe() == "udp 1.2.3.4:5000 (reused hole)"
    race.attempt_verified(action.attempt.attempt_id, T0 + 0.05)
    event = race.next_event()
    assert isinstance(event, RaceWon)
    assert event.failures == ()
    assert race.actions() == []


def test_a_dead_hole_falls_back_to_the_full_race_and_stays_in_the_report() -> None:
    race = PathRace(now=T0, reuse=(UDP_PUBLIC,))
    race.actions()
    race.attempt_failed(1, "no answer on the reused hole", T0 + 0.5)
    assert race.actions() == [StartLanSearch(), AskMediator()]
    race.offer_connect_response(response(local=()), T0 + 0.7)
    # The same address through a fresh rendezvous is a new path, not a repeat.
    assert described(race.actions()) == [
        "tcp 198.51.100.4:443",
        "udp 1.2.3.4:5000, 10.0.0.5:5000",
        "relay http://r:3478",
    ]
    race.attempt_verified(3, T0 + 0.9)
    event = race.next_event()
    assert isinstance(event, RaceWon)
    assert event.failures == (
        failure(PathKind.UDP, "1.2.3.4:5000 (reused hole)", "no answer on the reused hole"),
    )


def test_reuse_is_ignored_when_udp_is_not_wanted() -> None:
    race = PathRace(now=T0, reuse=(UDP_PUBLIC,), paths=frozenset({PathKind.TCP}))
    assert race.actions() == [AskMediator()]


def test_a_dead_hole_with_nothing_else_to_try_fails_the_race() -> None:
    race = PathRace(now=T0, reuse=(UDP_PUBLIC,), paths=frozenset({PathKind.UDP}), mediator=False)
    race.actions()
    race.attempt_failed(1, "no answer", T0 + 1.0)
    event = race.next_event()
    assert isinstance(event, RaceFailed)
    assert event.reason == EVERY_PATH_FAILED
    assert [f.describe() for f in event.failures] == [
        "udp 1.2.3.4:5000 (reused hole): no answer",
        "udp: no mediator configured",
    ]


# --- the relay's grace ------------------------------------------------------------------------


def test_a_verified_relay_waits_for_a_running_direct_path_which_then_wins() -> None:
    race, attempts = racing()
    assert [a.kind for a in attempts] == [PathKind.TCP, PathKind.TCP, PathKind.UDP, PathKind.RELAY]
    race.attempt_verified(4, T0 + 0.30)
    assert not race.done
    assert race.next_event() is None
    assert race.get_timer() == pytest.approx(T0 + 0.30 + RELAY_GRACE)
    race.attempt_verified(3, T0 + 0.35)
    event = race.next_event()
    assert isinstance(event, RaceWon)
    assert event.attempt.kind is PathKind.UDP
    # The verified relay is cancelled like any loser; the adapter closes its stream.
    assert [attempt_id for attempt_id, _ in cancelled(race.actions())] == [1, 2, 4]


def test_a_verified_relay_wins_when_its_grace_is_over() -> None:
    race, _ = racing()
    race.attempt_verified(4, T0 + 0.30)
    race.handle_timer(T0 + 0.30 + RELAY_GRACE / 2)
    assert race.next_event() is None
    race.handle_timer(T0 + 0.30 + RELAY_GRACE)
    event = race.next_event()
    assert isinstance(event, RaceWon)
    assert event.attempt.kind is PathKind.RELAY
    assert event.elapsed == pytest.approx(0.30 + RELAY_GRACE)
    assert sorted(attempt_id for attempt_id, _ in cancelled(race.actions())) == [1, 2, 3]


def test_a_verified_relay_wins_at_once_when_the_last_direct_path_fails() -> None:
    race, _ = racing()
    race.attempt_failed(1, "refused", T0 + 0.25)
    race.attempt_verified(4, T0 + 0.30)
    race.attempt_failed(2, "refused", T0 + 0.31)
    assert race.next_event() is None
    race.attempt_failed(3, "udt: timed out", T0 + 0.32)
    event = race.next_event()
    assert isinstance(event, RaceWon)
    assert event.attempt.kind is PathKind.RELAY
    assert event.elapsed == pytest.approx(0.32)


def test_a_verified_relay_without_any_direct_path_in_play_wins_at_once() -> None:
    race = PathRace(now=T0, paths=frozenset({PathKind.RELAY}), relays=(RELAY,))
    [attempt] = started(race.actions())
    race.attempt_verified(attempt.attempt_id, T0 + 0.01)
    assert isinstance(race.next_event(), RaceWon)


def test_a_relay_known_up_front_waits_for_the_mediators_answer_within_its_grace() -> None:
    race = PathRace(now=T0, lan=False, relays=(RELAY,))
    [relay] = started(race.actions())
    race.attempt_verified(relay.attempt_id, T0 + 0.02)
    assert race.next_event() is None
    race.mediator_failed("404 Server Offline", T0 + 0.05)
    event = race.next_event()
    assert isinstance(event, RaceWon)
    assert event.attempt == relay


def test_the_deadline_lets_a_waiting_relay_win_rather_than_fail() -> None:
    race, _ = racing(deadline=1.0, relay_grace=5.0)
    race.attempt_verified(4, T0 + 0.5)
    race.handle_timer(T0 + 1.0)
    event = race.next_event()
    assert isinstance(event, RaceWon)
    assert event.attempt.kind is PathKind.RELAY


def test_a_second_relay_verified_during_the_grace_does_not_restart_it() -> None:
    race = PathRace(now=T0, lan=False, relays=(RELAY, OTHER_RELAY))
    first, second = started(race.actions())
    race.offer_connect_response(response(relays=()), T0 + 0.01)
    race.actions()
    race.attempt_verified(first.attempt_id, T0 + 0.02)
    race.attempt_verified(second.attempt_id, T0 + 0.08)
    race.handle_timer(T0 + 0.02 + RELAY_GRACE)
    event = race.next_event()
    assert isinstance(event, RaceWon)
    assert event.attempt == first


@pytest.mark.parametrize("grace", [-0.1, math.inf, math.nan])
def test_a_bad_relay_grace_is_refused(grace: float) -> None:
    with pytest.raises(LocalProtocolError):
        PathRace(now=T0, relay_grace=grace)
