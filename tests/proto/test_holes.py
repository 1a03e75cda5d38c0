"""wavesync_proto.holes: when a punched socket may close, and eviction at the cap."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wavesync_proto.errors import LocalProtocolError
from wavesync_proto.holes import PunchedSocket, PunchSockets, select_eviction

LINGER = 30.0
RENDEZVOUS_TIMEOUT = 10.0


def agent_socket(now: float = 0.0) -> PunchedSocket:
    return PunchedSocket(linger=LINGER, unproven_linger=RENDEZVOUS_TIMEOUT, idle_since=now)


def test_an_unused_socket_waits_for_the_clients_address_then_closes() -> None:
    punched = agent_socket()
    assert punched.close_deadline(0.0) == RENDEZVOUS_TIMEOUT
    assert punched.poll_interval(9.5) == pytest.approx(0.5)
    assert punched.poll_interval(RENDEZVOUS_TIMEOUT) == 0.0


def test_a_failed_rendezvous_closes_the_socket_at_once() -> None:
    punched = agent_socket()
    punched.rendezvous_started()
    assert punched.close_deadline(1.0) is None  # busy while the rendezvous runs
    punched.rendezvous_ended(connected=False)
    assert punched.close_deadline(4.0) == 1.0  # idle since the last busy poll, linger 0
    assert punched.poll_interval(4.0) == 0.0


def test_a_proven_hole_lingers_after_its_last_stream() -> None:
    punched = agent_socket()
    punched.rendezvous_started()
    punched.rendezvous_ended(connected=True)
    punched.stream_started()
    assert punched.close_deadline(5.0) is None
    punched.stream_ended(now=12.0)
    assert punched.close_deadline(13.0) == 12.0 + LINGER
    assert punched.poll_interval(13.0) == 1.0  # polled at most a second apart
    assert punched.poll_interval(12.0 + LINGER) == 0.0


def test_a_stream_too_short_for_any_poll_still_keeps_the_hole() -> None:
    punched = agent_socket()
    punched.connection_proven()
    assert punched.close_deadline(0.0) == LINGER
    punched.stream_started()
    punched.stream_ended(now=25.0)  # opened and ended between two polls
    assert punched.close_deadline(26.0) == 25.0 + LINGER


def test_open_connections_the_streams_do_not_count_yet_keep_it_busy() -> None:
    punched = agent_socket()
    punched.connection_proven()
    assert punched.close_deadline(50.0, open_connections=1) is None
    assert punched.close_deadline(51.0) == 50.0 + LINGER


def test_a_connectors_unproven_socket_closes_when_idle() -> None:
    punched = PunchedSocket(linger=20.0, unproven_linger=0.0, idle_since=3.0, tried=True)
    assert punched.close_deadline(3.0) == 3.0


def test_misuse_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        PunchedSocket(linger=-1.0, unproven_linger=0.0, idle_since=0.0)
    punched = agent_socket()
    with pytest.raises(LocalProtocolError):
        punched.rendezvous_ended(connected=True)
    with pytest.raises(LocalProtocolError):
        punched.stream_ended(now=1.0)
    with pytest.raises(LocalProtocolError):
        PunchSockets[str](limit=0)


def test_below_the_cap_every_request_gets_a_socket() -> None:
    table = PunchSockets[str](limit=2)
    assert table.admit() == (True, None)
    table.add("a", agent_socket())
    assert table.admit() == (True, None)
    table.add("b", agent_socket())
    with pytest.raises(LocalProtocolError):
        table.add("b", agent_socket())
    assert len(table) == 2


def test_at_the_cap_the_oldest_unproven_socket_gives_way_once() -> None:
    table = PunchSockets[str](limit=2)
    table.add("proven", agent_socket())
    table.sockets["proven"].connection_proven()
    table.add("stale", agent_socket())
    assert table.admit() == (True, "stale")
    assert table.sockets["stale"].evicted
    # Until it is removed it still counts, but it is not evicted twice.
    assert table.admit() == (False, None)
    table.remove("stale")
    assert table.admit() == (True, None)


def test_at_the_cap_with_every_socket_carrying_a_connection_the_request_is_refused() -> None:
    table = PunchSockets[int](limit=1)
    table.add(1, agent_socket())
    table.sockets[1].rendezvous_started()
    table.sockets[1].rendezvous_ended(connected=True)
    assert table.admit() == (False, None)


@pytest.mark.property
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["start", "end_ok", "end_fail", "open", "close", "poll"]),
            st.floats(min_value=0.0, max_value=5.0),
        ),
        max_size=60,
    )
)
def test_a_socket_never_closes_while_used_and_always_closes_once_idle(
    steps: list[tuple[str, float]],
) -> None:
    punched = agent_socket()
    now = 0.0
    for op, advance in steps:
        now += advance
        if op == "start":
            punched.rendezvous_started()
        elif op == "end_ok" and punched.pending_rendezvous:
            punched.rendezvous_ended(connected=True)
        elif op == "end_fail" and punched.pending_rendezvous:
            punched.rendezvous_ended(connected=False)
        elif op == "open":
            punched.stream_started()
        elif op == "close" and punched.active:
            punched.stream_ended(now)
        deadline = punched.close_deadline(now)
        busy = punched.pending_rendezvous or punched.active
        assert (deadline is None) == bool(busy)
        if deadline is not None:
            assert deadline <= now + max(LINGER, RENDEZVOUS_TIMEOUT)
            assert math.isfinite(deadline)
    while punched.pending_rendezvous:
        punched.rendezvous_ended(connected=False)
    while punched.active:
        punched.stream_ended(now)
    deadline = punched.close_deadline(now)
    assert deadline is not None
    assert punched.poll_interval(deadline) == 0.0


@pytest.mark.property
@given(st.lists(st.tuples(st.booleans(), st.booleans()), max_size=10))
def test_eviction_picks_the_first_unproven_live_socket(flags: list[tuple[bool, bool]]) -> None:
    sockets = []
    for index, (proven, evicted) in enumerate(flags):
        punched = agent_socket()
        punched.proven, punched.evicted = proven, evicted
        sockets.append((index, punched))
    expected = next((i for i, (p, e) in enumerate(flags) if not p and not e), None)
    assert select_eviction(sockets) == expected
