"""RelayService: who may offer standby connections, how long they live, and every bound."""

from __future__ import annotations

import pytest

from wavesync_proto.relay import CloseConnection, RelayLimits, StartSplice
from wavesync_proto.relay.wire import Open, Ping

from .helpers import (
    KEY_A,
    KEY_B,
    PATIENT,
    RELAY_HOST,
    SERVER_1,
    SERVER_2,
    SERVER_3,
    SYSTEM_A,
    SYSTEM_B,
    SYSTEM_UNKNOWN,
    Harness,
    connect_request,
    control_lines,
    request_bytes,
    standby_request,
)


def refused_standby(h: Harness, handle: str, status: int) -> str:
    """The body of the ``status`` refusal ``handle`` got; no standby connection was added."""
    answer = h.refused(handle)
    assert answer.status == status, answer
    return answer.body.decode()


# --- authentication ---------------------------------------------------------------------------


def test_an_unknown_system_is_refused() -> None:
    h = Harness.create()
    h.standby("s1", SERVER_1, system_id=SYSTEM_UNKNOWN, key=KEY_A)
    assert "unknown system" in refused_standby(h, "s1", 401)
    assert h.service.counters.standby_auth_failures == 1
    assert h.service.counters.standby_accepted == 0
    assert h.service.idle_standby(SERVER_1) == 0


def test_a_signature_made_with_another_key_is_refused() -> None:
    h = Harness.create()
    h.standby("s1", SERVER_1, system_id=SYSTEM_A, key=KEY_B)
    assert "bad signature" in refused_standby(h, "s1", 401)
    assert h.service.counters.standby_auth_failures == 1


def test_a_request_signed_for_another_host_is_refused() -> None:
    h = Harness.create()
    h.standby("s1", SERVER_1, signed_host="relay-2.example:8443")
    assert "bad signature" in refused_standby(h, "s1", 401)


def test_a_host_idna_cannot_encode_is_refused_not_raised() -> None:
    h = Harness.create()
    h.connect("s1")
    data = standby_request(SERVER_1, nonce=h.next_nonce(), signed_host="relay", host="a..b")
    h.send("s1", data)
    assert "bad signature" in refused_standby(h, "s1", 401)


@pytest.mark.parametrize("skew", [-121, 121, -10_000, 10**11])
def test_a_stale_request_is_refused(skew: int) -> None:
    h = Harness.create(RelayLimits(auth_window=120.0))
    h.standby("s1", SERVER_1, unix_time=int(h.unix_time) + skew)
    assert "stale request" in refused_standby(h, "s1", 401)
    assert h.service.counters.standby_auth_failures == 1


@pytest.mark.parametrize("skew", [-120, 120, 0])
def test_a_request_within_the_window_is_fresh(skew: int) -> None:
    h = Harness.create(RelayLimits(auth_window=120.0))
    h.idle_standby("s1", SERVER_1, unix_time=int(h.unix_time) + skew)


def test_the_window_is_checked_against_the_wall_clock_the_adapter_passes() -> None:
    h = Harness.create(RelayLimits(auth_window=120.0))
    h.connect("s1")
    data = standby_request(SERVER_1, nonce=h.next_nonce(), unix_time=5_000)
    h.send("s1", data, unix_time=5_000 + 121.0)
    assert "stale" in refused_standby(h, "s1", 401)
    h.connect("s2")
    data = standby_request(SERVER_1, nonce=h.next_nonce(), unix_time=5_000)
    h.send("s2", data, unix_time=5_000 + 119.5)
    assert h.answer("s2").status == 101


def test_a_replayed_request_is_refused() -> None:
    h = Harness.create()
    h.connect("s1")
    data = standby_request(SERVER_1, nonce=h.next_nonce(), unix_time=int(h.unix_time))
    h.send("s1", data)
    assert h.answer("s1").status == 101
    # An eavesdropper sends the same bytes on another connection, a minute later.
    h.advance(60.0)
    h.connect("copy", ("192.0.2.66", 6666))
    h.send("copy", data)
    assert "replayed" in refused_standby(h, "copy", 401)
    assert h.service.idle_standby(SERVER_1) == 1
    # Long after, the nonce is forgotten, but the copy's time is stale by then.
    h.advance(300.0)
    h.connect("late-copy", ("192.0.2.66", 6667))
    h.send("late-copy", data)
    assert "stale" in refused_standby(h, "late-copy", 401)


def test_the_same_nonce_at_another_time_is_still_a_replay() -> None:
    h = Harness.create()
    nonce = h.next_nonce()
    h.idle_standby("s1", SERVER_1, nonce=nonce)
    h.standby("s2", SERVER_1, nonce=nonce, unix_time=int(h.unix_time) + 1)
    assert "replayed" in refused_standby(h, "s2", 401)


def test_a_refused_request_does_not_burn_its_nonce() -> None:
    # A request refused by a limit may be sent again as it is.
    h = Harness.create(RelayLimits(max_standby_per_server=1))
    h.idle_standby("s1", SERVER_1)
    h.connect("s2")
    data = standby_request(SERVER_1, nonce=h.next_nonce(), unix_time=int(h.unix_time))
    h.send("s2", data)
    assert refused_standby(h, "s2", 503)
    h.lose("s1")
    h.connect("s3")
    h.send("s3", data)
    assert h.answer("s3").status == 101


@pytest.mark.parametrize(
    ("host", "accepted"),
    [
        (RELAY_HOST, True),
        ("relay.example", True),
        ("RELAY.Example:443", True),
        ("relay-2.example:8443", False),
        ("[2001:db8::1]:8443", True),
        ("[2001:db8::1]", True),
        ("[2001:DB8::1]", True),
        ("[2001:db8::2]:8443", False),
        ("2001:db8::1", False),  # not a valid Host: IPv6 needs brackets
    ],
)
def test_with_host_names_only_requests_for_this_relay_are_accepted(
    host: str, accepted: bool
) -> None:
    h = Harness.create(host_names=["relay.example", "2001:db8::1"])
    # Correctly signed for the Host it carries: the Host itself must name this relay.
    h.standby("s1", SERVER_1, host=host)
    if accepted:
        assert h.answer("s1").status == 101
    else:
        assert "which is not this relay" in refused_standby(h, "s1", 401)


def test_a_server_id_held_by_another_system_is_a_conflict() -> None:
    h = Harness.create(RelayLimits(known_server_ttl=60.0))
    h.idle_standby("s1", SERVER_1)
    h.standby("s2", SERVER_1, system_id=SYSTEM_B, key=KEY_B)
    assert "belongs to another system" in refused_standby(h, "s2", 409)
    assert h.service.counters.standby_auth_failures == 1
    # Once system A's server is forgotten, the id is free.
    h.lose("s1")
    h.advance(60.0)
    h.idle_standby("s3", SERVER_1, system_id=SYSTEM_B, key=KEY_B)
    h.client("c1", system_id=SYSTEM_B)
    assert len(control_lines(h.read("s3"))) == 1


# --- handshakes -------------------------------------------------------------------------------


def test_a_slow_handshake_times_out() -> None:
    h = Harness.create(RelayLimits(handshake_timeout=10.0))
    h.connect("silent")
    h.connect("trickle")
    request = connect_request(SERVER_1)
    # A byte a second does not keep a handshake alive: its deadline is fixed at accept.
    for index in range(9):
        assert h.send("trickle", request[index : index + 1]) == []
        h.advance(1.0)
    h.advance(0.5)
    assert h.closed == {}
    actions = h.advance(0.5)
    assert sorted(a.connection for a in actions if isinstance(a, CloseConnection)) == [  # type: ignore[type-var]
        "silent",
        "trickle",
    ]
    assert h.closed["silent"] == "handshake timed out"
    assert h.service.counters.handshake_timeouts == 2
    assert h.service.connection_count() == 0
    assert h.read("silent") == h.read("trickle") == b""


def test_a_finished_handshake_is_not_timed_out() -> None:
    h = Harness.create(RelayLimits(handshake_timeout=10.0))
    h.idle_standby("s1", SERVER_1)
    h.advance(30.0)
    assert "s1" not in h.closed
    assert h.service.counters.handshake_timeouts == 0


def test_too_many_handshakes_at_once_are_closed_at_once() -> None:
    h = Harness.create(RelayLimits(max_handshaking=2))
    h.connect("c1")
    h.connect("c2")
    actions = h.connect("c3")
    assert actions == [CloseConnection(connection="c3", reason="too many handshakes at once")]
    assert h.service.counters.connections_refused == 1
    assert h.service.connection_count() == 2
    # Once one finishes its handshake, another may start.
    h.send("c1", connect_request(SERVER_1))  # 404: nothing known
    assert h.connect("c4") == []


def test_bad_requests_are_answered_and_counted() -> None:
    h = Harness.create()
    cases = {
        "garbage": (b"\x16\x03\x01 hello\r\n\r\n", 400),
        "path": (request_bytes("/", []), 404),
        "method": (request_bytes("/wavesync/relay/v1/connect", [], method="POST"), 405),
        "upgrade": (request_bytes("/wavesync/relay/v1/connect", [], upgrade=False), 426),
        "big": (request_bytes("/", [("X-Pad", "p" * 9000)]), 431),
    }
    for handle, (data, status) in cases.items():
        h.connect(handle)
        h.send(handle, data)
        assert h.refused(handle).status == status
    assert h.service.counters.bad_requests == len(cases)
    assert h.service.connection_count() == 0


def test_a_standby_request_followed_by_bytes_is_refused() -> None:
    h = Harness.create()
    h.connect("s1")
    h.send("s1", standby_request(SERVER_1, nonce=h.next_nonce(), unix_time=int(h.unix_time)) + b"x")
    assert "speaks only after OPEN" in refused_standby(h, "s1", 400)
    assert h.service.idle_standby(SERVER_1) == 0


# --- pool and session limits ------------------------------------------------------------------


def test_a_server_may_hold_only_so_many_standby_connections() -> None:
    h = Harness.create(RelayLimits(max_standby_per_server=2))
    h.idle_standby("s1", SERVER_1)
    h.idle_standby("s2", SERVER_1)
    h.standby("s3", SERVER_1)
    answer = h.refused("s3")
    assert answer.status == 503
    assert answer.headers["retry-after"] == "1"
    assert b"already has 2 standby" in answer.body
    assert h.service.counters.standby_refused_limits == 1
    h.idle_standby("other", SERVER_2)  # another server has its own room
    h.client("c1", SERVER_1)  # one leaves the pool: room for one more
    h.idle_standby("s4", SERVER_1)


def test_the_relay_holds_only_so_many_standby_connections() -> None:
    h = Harness.create(RelayLimits(max_standby_total=2))
    h.idle_standby("s1", SERVER_1)
    h.idle_standby("s2", SERVER_2)
    h.standby("s3", SERVER_3)
    assert "as many standby connections as it may" in refused_standby(h, "s3", 503)
    h.lose("s1")
    h.idle_standby("s4", SERVER_3)


def test_the_relay_remembers_only_so_many_nonces() -> None:
    h = Harness.create(RelayLimits(max_remembered_nonces=2, auth_window=120.0))
    h.idle_standby("s1", SERVER_1)
    h.idle_standby("s2", SERVER_1)
    h.standby("s3", SERVER_1)
    assert "too many standby requests" in refused_standby(h, "s3", 503)
    h.advance(240.0)  # both nonces are past any replay
    h.lose("s1")
    h.lose("s2")
    h.idle_standby("s4", SERVER_1)


def test_sessions_are_bounded() -> None:
    h = Harness.create(RelayLimits(max_active_sessions=2, pair_timeout=100.0, open_timeout=100.0))
    for index in range(4):
        h.idle_standby(f"s{index}", SERVER_1)
    h.client("c1", SERVER_1)
    h.ready("s3")
    h.client("c2", SERVER_1)  # pairing counts too
    h.client("c3", SERVER_1)
    answer = h.refused("c3")
    assert answer.status == 503
    assert answer.headers["retry-after"] == "1"
    assert h.service.counters.clients_refused_limits == 1
    h.ready("s2")
    assert h.service.counters.sessions_active == 2
    h.end_splice(h.splices[max(h.splices)].session_id)
    h.client("c4", SERVER_1)
    h.ready("s1")
    assert h.service.counters.sessions_active == 2


def test_waiting_clients_count_against_the_session_limit() -> None:
    # However many standby connections arrive later, no more sessions start than allowed.
    h = Harness.create(RelayLimits(max_active_sessions=2, pair_timeout=100.0, open_timeout=100.0))
    h.idle_standby("s0", SERVER_1)
    h.lose("s0")  # SERVER_1 known, with no standby connection
    h.client("c1", SERVER_1)
    h.client("c2", SERVER_1)
    h.client("c3", SERVER_1)
    assert h.refused("c3").status == 503
    for index in range(1, 4):
        h.standby(f"s{index}", SERVER_1)
    for index in range(1, 3):
        [line] = control_lines(h.answer(f"s{index}").trailing)
        h.ready(f"s{index}", session=line.session_id)  # type: ignore[union-attr]
    assert h.service.counters.sessions_active == 2
    assert h.service.idle_standby(SERVER_1) == 1


def test_waiting_clients_are_bounded() -> None:
    h = Harness.create(RelayLimits(max_waiting_clients=2))
    h.idle_standby("s0", SERVER_1)
    h.lose("s0")
    h.client("c1", SERVER_1)
    h.client("c2", system_id=SYSTEM_A)
    h.client("c3", SERVER_1)
    answer = h.refused("c3")
    assert (answer.status, answer.body) == (503, b"too many clients waiting\n")
    assert h.service.counters.clients_waiting == 2
    assert h.service.counters.clients_refused_limits == 1


def test_early_bytes_beyond_the_limit_in_the_request_read_are_413() -> None:
    h = Harness.create(RelayLimits(max_early_bytes=100))
    h.idle_standby("s1", SERVER_1)
    h.client("c1", SERVER_1, early=b"e" * 101)
    answer = h.refused("c1")
    assert answer.status == 413
    assert h.service.counters.clients_refused_limits == 1
    assert h.service.idle_standby(SERVER_1) == 1  # never taken
    h.client("c2", SERVER_1, early=b"e" * 100)  # exactly the limit is fine
    assert h.ready("s1").to_server == b"e" * 100


def test_early_bytes_beyond_the_limit_while_waiting_are_413() -> None:
    h = Harness.create(RelayLimits(max_early_bytes=100))
    h.idle_standby("s0", SERVER_1)
    h.lose("s0")
    h.client("c1", SERVER_1, early=b"e" * 60)
    assert h.send("c1", b"e" * 40) == []
    h.send("c1", b"e")
    assert h.refused("c1").status == 413
    assert h.service.counters.clients_waiting == 0


def test_early_bytes_beyond_the_limit_while_pairing_are_413_and_close_the_standby() -> None:
    h = Harness.create(RelayLimits(max_early_bytes=100))
    h.idle_standby("s1", SERVER_1)
    h.client("c1", SERVER_1)
    actions = h.send("c1", b"e" * 101)
    assert CloseConnection(connection="s1", reason="its client sent too much too early") in actions
    assert h.refused("c1").status == 413
    assert h.service.connection_count() == 0
    # Its READY, had it come, finds nothing.
    assert not any(isinstance(a, StartSplice) for a in h.actions)


# --- waiting ----------------------------------------------------------------------------------


def test_a_waiting_client_gets_503_after_pair_timeout() -> None:
    h = Harness.create(RelayLimits(pair_timeout=5.0))
    h.idle_standby("s0", SERVER_2)
    h.lose("s0")
    h.client("c1", system_id=SYSTEM_A)
    h.advance(4.5)
    assert h.read("c1") == b""
    h.advance(0.5)
    answer = h.refused("c1")
    assert answer.status == 503
    assert answer.headers["retry-after"] == "1"
    assert str(SYSTEM_A).encode() in answer.body
    assert h.service.counters.clients_timed_out == 1
    assert h.service.counters.clients_waiting == 0


def test_a_pairing_client_whose_wait_runs_out_closes_its_standby() -> None:
    # The wait runs from the request: a client paired late may run out while opening.
    h = Harness.create(RelayLimits(pair_timeout=5.0, open_timeout=2.0))
    h.idle_standby("s0", SERVER_1)
    h.lose("s0")
    h.client("c1", SERVER_1)
    h.advance(4.0)
    h.standby("s1", SERVER_1)
    h.read("s1")
    actions = h.advance(1.0)
    assert CloseConnection(connection="s1", reason="its client gave up waiting") in actions
    assert h.refused("c1").status == 503
    assert h.service.connection_count() == 0


# --- keep-alives and age ----------------------------------------------------------------------


def test_idle_standby_connections_are_pinged_every_keepalive_interval() -> None:
    h = Harness.create(PATIENT)
    h.idle_standby("s1", SERVER_1)
    h.advance(19.5)
    assert h.read("s1") == b""
    h.advance(0.5)
    assert h.lines("s1") == [Ping()]
    h.advance(60.0)
    assert h.lines("s1") == [Ping(), Ping(), Ping()]
    assert h.service.counters.pings_sent == 4


def test_only_idle_standby_connections_are_pinged() -> None:
    h = Harness.create(PATIENT)
    h.idle_standby("idle", SERVER_1)
    h.idle_standby("opening", SERVER_1)
    h.client("c1", SERVER_1)  # takes the newest: "opening"
    assert isinstance(h.opened("opening"), Open)
    h.client("waiting", SERVER_1)  # takes "idle"
    assert isinstance(h.opened("idle"), Open)
    h.client("c3", SERVER_1)  # waits
    h.advance(100.0)
    assert h.read("opening") == h.read("idle") == b""
    assert h.read("c1") == h.read("waiting") == h.read("c3") == b""
    assert h.service.counters.pings_sent == 0


def test_a_spliced_standby_connection_is_not_pinged() -> None:
    h = Harness.create()
    h.idle_standby("s1", SERVER_1)
    h.advance(15.0)
    h.client("c1", SERVER_1)
    h.ready("s1")
    h.advance(100.0)  # the harness fails any write to a spliced connection
    assert h.service.counters.pings_sent == 0
    assert h.service.get_timer() is not None  # the nonce and the fading server remain


def test_standby_connections_are_closed_at_their_max_age() -> None:
    h = Harness.create(RelayLimits(standby_max_age=600.0))
    h.idle_standby("s1", SERVER_1)
    h.advance(300.0)
    h.idle_standby("s2", SERVER_1)
    h.advance(299.5)
    assert "s1" not in h.closed
    h.advance(0.5)
    assert h.closed["s1"] == "standby reached its age"
    assert "s2" not in h.closed
    assert h.service.counters.standby_expired == 1
    assert h.service.counters.standby_idle == 1
    h.advance(300.0)
    assert h.closed["s2"] == "standby reached its age"
    assert h.service.idle_standby(SERVER_1) == 0
    assert h.service.counters.standby_idle == 0
    # The agent replaces expired connections: the server is still known meanwhile.
    h.client("c1", SERVER_1)
    assert h.read("c1") == b""
    assert h.service.counters.clients_waiting == 1
