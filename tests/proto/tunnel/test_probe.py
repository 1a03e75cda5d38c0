"""TunnelProbe and TunnelMemory, driven by hand: a clock moved by the test, reports by the test."""

from __future__ import annotations

import pytest

from wavesync_proto.errors import LocalProtocolError
from wavesync_proto.tunnel import (
    CancelAttempt,
    ProbeAction,
    ProbeChosen,
    ProbeFailed,
    ProbeState,
    StartAttempt,
    TunnelKind,
    TunnelLocation,
    TunnelMemory,
    TunnelMethod,
    TunnelProbe,
)

UPGRADE = TunnelKind(method=TunnelMethod.UPGRADE)
WEBSOCKET = TunnelKind(method=TunnelMethod.WEBSOCKET)
CONNECT = TunnelKind(method=TunnelMethod.CONNECT)
GETPOST = TunnelKind(method=TunnelMethod.GETPOST)
SSL_GETPOST = TunnelKind(method=TunnelMethod.GETPOST, tls=True)
#: Cheapest first: a raw CONNECT, a raw upgrade, websocket framing, two connections.
KINDS = [CONNECT, UPGRADE, WEBSOCKET, GETPOST]
HERE = TunnelLocation(proxy="proxy.example:3128", target="mediator.example:8080")
ELSEWHERE = TunnelLocation(proxy=None, target="mediator.example:8080")


def starts(actions: list[ProbeAction]) -> list[tuple[int, TunnelKind]]:
    return [(a.attempt_id, a.kind) for a in actions if isinstance(a, StartAttempt)]


def cancels(actions: list[ProbeAction]) -> list[int]:
    return [a.attempt_id for a in actions if isinstance(a, CancelAttempt)]


def probe(
    memory: TunnelMemory | None = None, location: TunnelLocation = HERE, **options: float
) -> TunnelProbe:
    return TunnelProbe(
        location=location,
        kinds=KINDS,
        memory=memory if memory is not None else TunnelMemory(),
        **options,
    )


def state(machine: TunnelProbe) -> ProbeState:
    """Read through a call so that mypy does not narrow it between steps."""
    return machine.state


def test_without_a_stagger_every_method_starts_at_once() -> None:
    machine = probe()
    assert starts(machine.start(0.0)) == [(1, CONNECT), (2, UPGRADE), (3, WEBSOCKET), (4, GETPOST)]
    assert state(machine) is ProbeState.PROBING
    assert machine.get_timer() == 10.0  # the attempts' timeout comes before the deadline


def test_the_first_validated_wins_and_the_rest_are_cancelled() -> None:
    memory = TunnelMemory()
    machine = probe(memory)
    machine.start(0.0)
    assert machine.failed(1, "403 from the proxy", 0.1) == []
    actions = machine.validated(4, 0.5)
    assert cancels(actions) == [2, 3]
    assert actions[-1] == ProbeChosen(attempt_id=4, kind=GETPOST)
    assert machine.result == actions[-1]
    assert state(machine) is ProbeState.CHOSEN
    assert machine.get_timer() is None
    # Late news from the losers changes nothing.
    assert machine.validated(2, 0.6) == []
    assert machine.failed(3, "late", 0.7) == []
    assert memory.winner(HERE) is GETPOST
    assert memory.demoted(HERE, 0.7) == {CONNECT: "403 from the proxy"}


def test_a_stagger_starts_cheapest_first_and_the_next_early_when_all_running_failed() -> None:
    machine = probe(stagger=0.25)
    assert starts(machine.start(0.0)) == [(1, CONNECT)]
    assert machine.get_timer() == 0.25
    assert machine.handle_timer(0.2) == []
    assert starts(machine.handle_timer(0.25)) == [(2, UPGRADE)]
    # Both running attempts fail: the next one need not wait for its stagger slot.
    assert machine.failed(1, "403", 0.3) == []
    assert starts(machine.failed(2, "426", 0.31)) == [(3, WEBSOCKET)]
    assert starts(machine.handle_timer(0.56)) == [(4, GETPOST)]


def test_the_remembered_winner_goes_first_and_alone() -> None:
    memory = TunnelMemory()
    first = probe(memory)
    first.start(0.0)
    first.validated(3, 1.0)  # websocket
    again = probe(memory)
    assert starts(again.start(100.0)) == [(1, WEBSOCKET)]
    assert again.get_timer() == 110.0
    assert again.handle_timer(105.0) == []
    # Only when it fails do the others start (at once, without a stagger).
    assert starts(again.failed(1, "proxy changed", 106.0)) == [
        (2, CONNECT),
        (3, UPGRADE),
        (4, GETPOST),
    ]


def test_demoted_methods_go_last_and_only_after_the_others_failed() -> None:
    memory = TunnelMemory(demotion=600.0)
    memory.record_failed(HERE, CONNECT, "403", 0.0)
    memory.record_failed(HERE, UPGRADE, "426", 0.0)
    machine = probe(memory)
    assert starts(machine.start(10.0)) == [(1, WEBSOCKET), (2, GETPOST)]
    machine.failed(1, "426", 11.0)
    assert starts(machine.failed(2, "timeout", 12.0)) == [(3, CONNECT), (4, UPGRADE)]


def test_demotion_lasts_a_while() -> None:
    memory = TunnelMemory(demotion=600.0)
    memory.record_failed(HERE, CONNECT, "403", 0.0)
    assert memory.demoted(HERE, 599.0) == {CONNECT: "403"}
    assert memory.demoted(HERE, 600.0) == {}
    assert starts(probe(memory).start(600.0))[0] == (1, CONNECT)


def test_an_attempt_that_takes_too_long_fails_and_is_cancelled() -> None:
    memory = TunnelMemory()
    machine = probe(memory, attempt_timeout=2.0, stagger=5.0)
    machine.start(0.0)
    assert machine.get_timer() == 2.0
    actions = machine.handle_timer(2.0)
    assert cancels(actions) == [1]
    assert starts(actions) == [(2, UPGRADE)]  # nothing left running: no need to wait
    assert memory.demoted(HERE, 2.0) == {CONNECT: "not validated within 2 s"}


def test_when_every_method_fails_the_result_says_why_for_each() -> None:
    machine = probe()
    machine.start(0.0)
    machine.failed(1, "CONNECT refused: 403 Forbidden", 0.1)
    machine.failed(2, "upgrade refused: 426 Upgrade Required", 0.2)
    machine.failed(3, "websocket refused: 426", 0.3)
    actions = machine.failed(4, "echo garbled", 0.4)
    assert actions == [
        ProbeFailed(
            reasons=(
                (CONNECT, "CONNECT refused: 403 Forbidden"),
                (UPGRADE, "upgrade refused: 426 Upgrade Required"),
                (WEBSOCKET, "websocket refused: 426"),
                (GETPOST, "echo garbled"),
            )
        )
    ]
    assert state(machine) is ProbeState.FAILED
    assert str(actions[0]).startswith("connect: CONNECT refused: 403 Forbidden; upgrade: ")


def test_the_deadline_ends_the_round_and_names_what_never_ran() -> None:
    machine = probe(stagger=4.0, attempt_timeout=100.0, deadline=6.0)
    machine.start(0.0)
    machine.handle_timer(4.0)
    assert machine.get_timer() == 6.0
    actions = machine.handle_timer(6.0)
    assert cancels(actions) == [1, 2]
    assert actions[-1] == ProbeFailed(
        reasons=(
            (CONNECT, "the probe's deadline passed first"),
            (UPGRADE, "the probe's deadline passed first"),
            (WEBSOCKET, "not started before the deadline"),
            (GETPOST, "not started before the deadline"),
        )
    )
    assert machine.get_timer() is None


def test_a_failed_round_can_be_retried_with_fresh_ids() -> None:
    machine = probe()
    machine.start(0.0)
    for attempt_id in (1, 2, 3, 4):
        machine.failed(attempt_id, "no", 0.0)
    assert state(machine) is ProbeState.FAILED
    # Everything is demoted now, so all are in the last tier together.
    assert [i for i, _ in starts(machine.retry(1.0))] == [5, 6, 7, 8]
    assert machine.failed(1, "stale", 1.0) == []  # an id of the old round


def test_the_chosen_method_failing_in_use_is_demoted_and_the_rest_reprobed() -> None:
    memory = TunnelMemory()
    machine = probe(memory)
    machine.start(0.0)
    machine.validated(2, 0.5)  # upgrade
    actions = machine.chosen_failed("the proxy dropped the connection", 60.0)
    assert state(machine) is ProbeState.PROBING
    assert starts(actions) == [(5, CONNECT), (6, WEBSOCKET), (7, GETPOST)]
    assert memory.winner(HERE) is None
    assert memory.demoted(HERE, 60.0) == {UPGRADE: "the proxy dropped the connection"}
    actions = machine.validated(7, 61.0)
    assert actions[-1] == ProbeChosen(attempt_id=7, kind=GETPOST)
    assert memory.winner(HERE) is GETPOST


def test_locations_are_remembered_apart_and_the_memory_is_an_lru() -> None:
    memory = TunnelMemory(capacity=2)
    memory.record_validated(HERE, GETPOST)
    memory.record_validated(ELSEWHERE, CONNECT)
    assert memory.winner(HERE) is GETPOST
    assert memory.winner(ELSEWHERE) is CONNECT
    memory.record_failed(HERE, UPGRADE, "426", 0.0)  # HERE is the most recent now
    third = TunnelLocation(proxy=None, target="relay.example:7000")
    memory.record_validated(third, SSL_GETPOST)
    assert len(memory) == 2
    assert memory.winner(ELSEWHERE) is None  # evicted
    assert memory.winner(HERE) is GETPOST
    assert memory.winner(third) == SSL_GETPOST


def test_a_validated_method_is_no_longer_demoted() -> None:
    memory = TunnelMemory()
    memory.record_failed(HERE, GETPOST, "timeout", 0.0)
    memory.record_validated(HERE, GETPOST)
    assert memory.demoted(HERE, 1.0) == {}


def test_ssl_kinds_are_kinds_of_their_own() -> None:
    assert str(SSL_GETPOST) == "ssl+getpost"
    assert str(GETPOST) == "getpost"
    assert SSL_GETPOST != GETPOST
    machine = TunnelProbe(location=HERE, kinds=[GETPOST, SSL_GETPOST], memory=TunnelMemory())
    assert starts(machine.start(0.0)) == [(1, GETPOST), (2, SSL_GETPOST)]


def test_misuse_raises() -> None:
    with pytest.raises(LocalProtocolError):
        TunnelProbe(location=HERE, kinds=[], memory=TunnelMemory())
    with pytest.raises(LocalProtocolError):
        TunnelProbe(location=HERE, kinds=[GETPOST, GETPOST], memory=TunnelMemory())
    with pytest.raises(LocalProtocolError):
        probe(stagger=-1.0)
    with pytest.raises(LocalProtocolError):
        probe(deadline=float("inf"))
    with pytest.raises(LocalProtocolError):
        TunnelMemory(capacity=0)
    machine = probe()
    with pytest.raises(LocalProtocolError):
        machine.retry(0.0)
    machine.start(0.0)
    with pytest.raises(LocalProtocolError):
        machine.start(0.0)
    with pytest.raises(LocalProtocolError):
        machine.validated(99, 0.0)
    with pytest.raises(LocalProtocolError):
        machine.chosen_failed("nothing was chosen", 0.0)
