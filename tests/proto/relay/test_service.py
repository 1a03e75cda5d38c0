"""RelayService: pairing clients with standby connections, keep-alives, and losing either side."""

from __future__ import annotations

import pytest

from wavesync_proto.relay import (
    UPGRADE_PROTOCOL,
    CloseConnection,
    RelayLimits,
    SendBytes,
    StartSplice,
)
from wavesync_proto.relay.wire import Open

from .helpers import (
    CLIENT_ADDRESS,
    CLIENT_V6_ADDRESS,
    PATIENT,
    SERVER_1,
    SERVER_2,
    SERVER_3,
    SERVER_UNKNOWN,
    SYSTEM_A,
    SYSTEM_B,
    SYSTEM_UNKNOWN,
    Harness,
    connect_request,
    control_lines,
    parse_answer,
    ready_line,
    session_id,
    splice_answer,
)


def server_of(splice: StartSplice) -> str:
    return splice_answer(splice).headers["wavesync-server"]


# --- pairing ----------------------------------------------------------------------------------


def test_a_standby_connection_is_accepted_with_the_pool_size_and_keepalive() -> None:
    h = Harness.create()
    actions = h.standby("s1", SERVER_1)
    assert [type(a) for a in actions] == [SendBytes]
    answer = h.answer("s1")
    assert answer.status == 101
    assert answer.headers["upgrade"] == UPGRADE_PROTOCOL
    assert answer.headers["connection"] == "Upgrade"
    assert answer.headers["wavesync-standby-count"] == "7"
    assert answer.headers["wavesync-keepalive"] == "20"
    assert answer.trailing == b""
    assert h.service.idle_standby(SERVER_1) == 1
    assert h.service.counters.standby_accepted == 1
    assert h.service.counters.standby_idle == 1
    assert h.service.connection_count() == 1


def test_a_client_is_paired_through_open_and_ready() -> None:
    h = Harness.create()
    h.idle_standby("s1", SERVER_1)
    # The client's first tunnel bytes come in the same read as its request.
    actions = h.client("c1", SERVER_1, early=b"client hello")
    # The relay tells the standby connection who is coming, and answers the client only
    # after READY, so a dead standby connection never becomes the client's tunnel.
    session = session_id(1).hex().encode()
    assert actions == [
        SendBytes(connection="s1", data=b"OPEN " + session + b" 203.0.113.9:61001\r\n")
    ]
    assert h.read("c1") == b""
    assert h.service.counters.standby_idle == 0
    assert h.service.idle_standby(SERVER_1) == 0
    # The server's first tunnel bytes come in the same read as READY.
    actions = h.send("s1", b"READY " + session + b"\r\nserver hello")
    [splice] = actions
    assert isinstance(splice, StartSplice)
    assert (splice.session_id, splice.client, splice.server) == (session_id(1), "c1", "s1")
    assert splice.to_server == b"client hello"
    answer = parse_answer(splice.to_client)
    assert answer.status == 101
    assert answer.headers["upgrade"] == UPGRADE_PROTOCOL
    assert answer.headers["wavesync-session"] == session.decode()
    assert answer.headers["wavesync-server"] == str(SERVER_1)
    assert answer.trailing == b"server hello"
    # Both connections belong to the adapter's splice now.
    assert h.service.connection_count() == 0
    counters = h.service.counters
    assert (counters.clients_paired, counters.sessions_active, counters.clients_waiting) == (
        1,
        1,
        0,
    )


def test_the_open_line_carries_an_ipv6_client_address() -> None:
    h = Harness.create()
    h.idle_standby("s1", SERVER_1)
    h.client("c1", SERVER_1, remote=CLIENT_V6_ADDRESS)
    assert h.read("s1") == b"OPEN " + session_id(1).hex().encode() + b" [2001:db8::9]:61002\r\n"


def test_the_client_address_in_open_is_the_clients_not_the_servers() -> None:
    h = Harness.create()
    h.idle_standby("s1", SERVER_1)
    h.client("c1", SERVER_1, remote=("192.0.2.77", 1234))
    assert h.opened("s1") == Open(session_id=session_id(1), client_address=("192.0.2.77", 1234))


def test_ready_split_over_many_reads_still_pairs() -> None:
    h = Harness.create()
    h.idle_standby("s1", SERVER_1)
    h.client("c1", SERVER_1)
    data = ready_line(h.opened("s1").session_id) + b"tail"
    for index in range(len(data) - 5):
        assert h.send("s1", data[index : index + 1]) == []
    [splice] = h.send("s1", data[-5:])
    assert isinstance(splice, StartSplice)
    assert splice_answer(splice).trailing == b"tail"


def test_a_splice_without_early_bytes_carries_only_the_101() -> None:
    h = Harness.create()
    h.idle_standby("s1", SERVER_1)
    h.client("c1", SERVER_1)
    splice = h.ready("s1")
    assert splice.to_server == b""
    assert splice_answer(splice).trailing == b""


def test_session_ids_are_fresh_for_every_open() -> None:
    h = Harness.create(PATIENT)
    for number in range(1, 4):
        h.idle_standby(f"s{number}", SERVER_1)
    for number in range(1, 4):
        h.client(f"c{number}", SERVER_1)
    sessions = {h.opened(f"s{number}").session_id for number in range(1, 4)}
    assert sessions == {session_id(1), session_id(2), session_id(3)}


# --- bytes on either side of the handshake ----------------------------------------------------


def test_client_bytes_sent_in_separate_reads_before_pairing_all_reach_the_server() -> None:
    h = Harness.create(PATIENT)
    h.idle_standby("other", SERVER_2)  # keeps system A known; SERVER_1 must be known too
    h.idle_standby("s0", SERVER_1)
    h.client("c0", SERVER_1)
    h.ready("s0")  # SERVER_1 is known and has no idle connection now
    # The request's last byte and the first early bytes in one read, more in later ones.
    request = connect_request(SERVER_1)
    h.connect("c1")
    assert h.send("c1", request[:-1]) == []
    assert h.send("c1", request[-1:] + b"one,") == []
    assert h.send("c1", b"two,") == []
    assert h.service.counters.clients_waiting == 1
    h.standby("s1", SERVER_1)  # opened at once for the waiting client
    [line] = control_lines(h.answer("s1").trailing)
    assert isinstance(line, Open)
    assert h.send("c1", b"three") == []  # while the standby connection is opening
    splice = h.ready("s1", session=line.session_id)
    assert splice.to_server == b"one,two,three"
    assert splice.client == "c1"


def test_empty_reads_and_reads_on_unknown_connections_are_ignored() -> None:
    h = Harness.create()
    h.connect("c1")
    assert h.send("c1", b"") == []
    assert h.service.data_received("never-made", b"GET", h.now, unix_time=h.unix_time) == []
    assert h.service.connection_lost("never-made", h.now) == []
    # The empty read did not end the request (h11 would take b"" for end of stream).
    h.send("c1", connect_request(SERVER_UNKNOWN))
    assert h.refused("c1").status == 404


# --- pools drain and refill -------------------------------------------------------------------


def test_the_newest_standby_connection_is_taken_first() -> None:
    h = Harness.create(PATIENT)
    h.idle_standby("old", SERVER_1)
    h.advance(5.0)
    h.idle_standby("new", SERVER_1)
    h.client("c1", SERVER_1)
    assert h.read("old") == b""
    assert isinstance(h.opened("new"), Open)


def test_a_pool_drains_then_clients_wait_then_a_new_standby_is_opened_at_once() -> None:
    h = Harness.create(PATIENT)
    h.idle_standby("s1", SERVER_1)
    h.idle_standby("s2", SERVER_1)
    h.client("c1", SERVER_1)
    h.client("c2", SERVER_1)
    assert h.service.idle_standby(SERVER_1) == 0
    h.client("c3", SERVER_1)
    h.client("c4", SERVER_1)
    assert h.service.counters.clients_waiting == 2
    assert h.read("c3") == h.read("c4") == b""
    # The agent refills its pool: each new connection goes straight to the longest waiter.
    h.standby("s3", SERVER_1)
    answer = h.answer("s3")
    assert answer.status == 101
    [line] = control_lines(answer.trailing)
    assert isinstance(line, Open)
    assert h.service.counters.clients_waiting == 1
    assert h.service.idle_standby(SERVER_1) == 0
    assert h.send("s3", ready_line(line.session_id)) != []
    assert h.splices[line.session_id].client == "c3"
    h.standby("s4", SERVER_1)
    [line] = control_lines(h.answer("s4").trailing)
    assert isinstance(line, Open)
    h.send("s4", ready_line(line.session_id))
    assert h.splices[line.session_id].client == "c4"
    # No one waits now: the next standby connection stays idle.
    h.idle_standby("s5", SERVER_1)
    assert h.service.idle_standby(SERVER_1) == 1
    assert h.service.counters.clients_waiting == 0


def test_clients_that_named_the_server_go_before_clients_that_named_its_system() -> None:
    h = Harness.create(PATIENT)
    h.idle_standby("s0", SERVER_1)
    h.client("c0", SERVER_1)
    h.ready("s0")
    h.client("by-system", system_id=SYSTEM_A)
    h.client("by-server", SERVER_1)
    h.standby("s1", SERVER_1)
    h.send("s1", ready_line(session_id(2)))
    assert h.splices[session_id(2)].client == "by-server"
    h.standby("s2", SERVER_1)
    h.send("s2", ready_line(session_id(3)))
    assert h.splices[session_id(3)].client == "by-system"


def test_a_new_server_of_a_system_serves_the_clients_waiting_for_the_system() -> None:
    h = Harness.create(PATIENT)
    h.idle_standby("s1", SERVER_1)
    h.client("c1", system_id=SYSTEM_A)
    h.ready("s1")
    h.client("c2", system_id=SYSTEM_A)  # system A is known: c2 waits
    assert h.service.counters.clients_waiting == 1
    # SERVER_2, never seen before, joins system A: its first standby connection is
    # the one c2 is waiting for.
    h.standby("s2", SERVER_2)
    [line] = control_lines(h.answer("s2").trailing)
    assert isinstance(line, Open)
    assert h.service.counters.clients_waiting == 0
    h.send("s2", ready_line(line.session_id))
    assert h.splices[line.session_id].client == "c2"
    assert server_of(h.splices[line.session_id]) == str(SERVER_2)


def test_a_server_whose_connections_all_go_to_waiting_clients_stays_known() -> None:
    # Its pool is never idle, but it keeps offering connections: it is alive, not fading.
    h = Harness.create(RelayLimits(known_server_ttl=60.0, pair_timeout=5.0, open_timeout=5.0))
    h.idle_standby("s0", SERVER_1)
    h.client("c0", system_id=SYSTEM_A)
    h.ready("s0")
    for round_ in range(1, 10):
        h.advance(10.0)
        h.client(f"c{round_}", system_id=SYSTEM_A)
        h.standby(f"s{round_}", SERVER_1)
        [line] = control_lines(h.answer(f"s{round_}").trailing)
        assert isinstance(line, Open)
        h.ready(f"s{round_}", session=line.session_id)
    h.client("by-id", SERVER_1)
    assert h.read("by-id") == b""  # waits for the next one rather than 404
    assert h.service.counters.clients_waiting == 1


# --- targeting --------------------------------------------------------------------------------


def test_clients_of_a_system_go_round_robin_over_its_servers() -> None:
    h = Harness.create(PATIENT)
    names = []
    for index in range(3):
        h.idle_standby(f"one-{index}", SERVER_1)
        h.idle_standby(f"two-{index}", SERVER_2)
        names += [f"one-{index}", f"two-{index}"]
    h.idle_standby("three", SERVER_3)  # system B: never chosen for system A
    for index in range(6):
        h.client(f"c{index}", system_id=SYSTEM_A)
    opened = {h.opened(name).session_id: name for name in names}
    order = [opened[session_id(number)].split("-")[0] for number in range(1, 7)]
    assert order == ["one", "two", "one", "two", "one", "two"]
    assert h.service.idle_standby(SERVER_3) == 1
    # The 101 names the server each client got.
    for session, name in opened.items():
        h.send(name, ready_line(session))
        expected = SERVER_1 if name.startswith("one") else SERVER_2
        assert server_of(h.splices[session]) == str(expected)


def test_round_robin_skips_a_server_with_no_idle_connection() -> None:
    h = Harness.create(PATIENT)
    h.idle_standby("one", SERVER_1)
    h.idle_standby("two-a", SERVER_2)
    h.idle_standby("two-b", SERVER_2)
    for index in range(3):
        h.client(f"c{index}", system_id=SYSTEM_A)
    assert [bool(h.outbox[name]) for name in ("one", "two-a", "two-b")] == [True, True, True]


def test_a_client_of_a_system_only_gets_that_systems_servers() -> None:
    h = Harness.create(PATIENT)
    h.idle_standby("three", SERVER_3)
    h.client("c1", system_id=SYSTEM_A)
    assert h.refused("c1").status == 404
    h.client("c2", system_id=SYSTEM_B)
    assert isinstance(h.opened("three"), Open)


@pytest.mark.parametrize(
    ("server_id", "system_id"),
    [(SERVER_UNKNOWN, None), (None, SYSTEM_UNKNOWN), (None, SYSTEM_B)],
)
def test_an_unknown_server_or_system_is_404(server_id: object, system_id: object) -> None:
    h = Harness.create()
    h.idle_standby("s1", SERVER_1)
    h.client("c1", server_id, system_id)  # type: ignore[arg-type]
    answer = h.refused("c1")
    assert answer.status == 404
    assert b"no standby connection at this relay" in answer.body
    assert h.service.counters.clients_not_found == 1
    assert h.service.idle_standby(SERVER_1) == 1  # untouched


def test_a_known_server_with_no_standby_makes_the_client_wait_until_it_is_forgotten() -> None:
    limits = RelayLimits(known_server_ttl=60.0, pair_timeout=5.0)
    h = Harness.create(limits)
    h.idle_standby("s1", SERVER_1)
    h.advance(1.0)
    h.lose("s1")
    h.advance(10.0)
    h.client("c1", SERVER_1)
    assert h.read("c1") == b""
    assert h.service.counters.clients_waiting == 1
    h.advance(5.0)
    answer = h.refused("c1")
    assert answer.status == 503
    assert answer.headers["retry-after"] == "1"
    # 60 s after its last standby connection went, the server is forgotten: 404.
    h.advance(60.0 - 15.0)
    h.client("c2", SERVER_1)
    assert h.refused("c2").status == 404


def test_a_server_is_forgotten_on_time_however_often_clients_ask_for_it() -> None:
    # Clients retrying a dead server must not keep it "known" (and themselves waiting
    # instead of moving on to another path) forever.
    limits = RelayLimits(known_server_ttl=60.0, pair_timeout=5.0)
    h = Harness.create(limits)
    h.idle_standby("s1", SERVER_1)
    h.lose("s1")
    statuses = []
    for attempt in range(40):
        h.client(f"c{attempt}", SERVER_1)
        h.advance(6.0)
        statuses.append(h.refused(f"c{attempt}").status)
    assert statuses[:10] == [503] * 10
    assert statuses[-10:] == [404] * 10
    # Forgotten within one wait after the ttl: the first 404 comes at 66 s at the latest.
    assert statuses.index(404) <= 11


# --- either side going away -------------------------------------------------------------------


def test_an_idle_standby_connection_that_speaks_is_closed() -> None:
    h = Harness.create()
    h.idle_standby("s1", SERVER_1)
    actions = h.send("s1", b"READY " + b"0" * 32 + b"\r\n")
    assert actions == [CloseConnection(connection="s1", reason="standby spoke before OPEN")]
    assert h.service.idle_standby(SERVER_1) == 0
    assert h.service.counters.standby_lost == 1
    assert h.service.counters.standby_idle == 0


def test_an_idle_standby_connection_lost_leaves_the_pool() -> None:
    h = Harness.create()
    h.idle_standby("s1", SERVER_1)
    h.idle_standby("s2", SERVER_1)
    assert h.lose("s1") == []
    assert h.service.idle_standby(SERVER_1) == 1
    assert h.service.counters.standby_lost == 1
    h.client("c1", SERVER_1)
    assert isinstance(h.opened("s2"), Open)


def test_a_standby_lost_while_opening_hands_its_client_to_another() -> None:
    h = Harness.create(PATIENT)
    h.idle_standby("s1", SERVER_1)
    h.idle_standby("s2", SERVER_1)
    h.client("c1", SERVER_1, early=b"hello")
    first = h.opened("s2")
    [action] = h.lose("s2")
    assert isinstance(action, SendBytes)
    assert action.connection == "s1"
    second = h.opened("s1")
    assert second.session_id != first.session_id
    assert second.client_address == CLIENT_ADDRESS
    assert h.service.counters.standby_open_failures == 1
    splice = h.ready("s1", session=second.session_id)
    assert splice.client == "c1"
    assert splice.to_server == b"hello"
    assert splice_answer(splice).headers["wavesync-session"] == second.session_id.hex()


def test_a_client_whose_standby_was_lost_waits_for_the_next_or_gives_up() -> None:
    h = Harness.create(RelayLimits(pair_timeout=5.0, open_timeout=2.0))
    h.idle_standby("s1", SERVER_1)
    h.client("c1", SERVER_1)
    h.client("c2", SERVER_1)  # waits from the start
    h.advance(1.0)
    h.lose("s1")
    assert h.read("c1") == b""
    assert h.service.counters.clients_waiting == 2
    # c1 went back in line behind c2, who has waited longer for a standby connection.
    h.standby("s2", SERVER_1)
    [line] = control_lines(h.answer("s2").trailing)
    assert isinstance(line, Open)
    h.send("s2", ready_line(line.session_id))
    assert h.splices[line.session_id].client == "c2"
    # c1's wait ends pair_timeout after its request, not after the loss.
    h.advance(3.5)
    assert "c1" not in h.closed
    h.advance(0.5)
    other = "c1"
    assert h.refused(other).status == 503
    assert h.service.counters.clients_timed_out == 1
    assert h.service.counters.clients_waiting == 0


def test_a_standby_that_does_not_answer_open_in_time_is_replaced() -> None:
    h = Harness.create(RelayLimits(open_timeout=2.0, pair_timeout=5.0))
    h.idle_standby("s1", SERVER_1)
    h.idle_standby("s2", SERVER_1)
    h.client("c1", SERVER_1)
    assert isinstance(h.opened("s2"), Open)
    h.advance(1.5)
    assert "s2" not in h.closed
    h.advance(0.5)
    assert h.closed["s2"] == "no READY in time"
    assert isinstance(h.opened("s1"), Open)
    assert h.service.counters.standby_open_failures == 1
    # The second one is silent too; then no standby is left and c1 waits out its time.
    h.advance(2.0)
    assert h.closed["s1"] == "no READY in time"
    assert h.service.counters.clients_waiting == 1
    h.advance(1.0)
    assert h.refused("c1").status == 503


@pytest.mark.parametrize(
    "answer",
    [
        ready_line(session_id(99)),
        b"PING\r\n",
        b"OPEN " + session_id(1).hex().encode() + b" 1.2.3.4:5\r\n",
        b"READY\r\n",
        b"HTTP/1.1 200 OK\r\n",
        b"\xff\xfe\r\n",
        b"x" * 200,
    ],
)
def test_a_wrong_answer_to_open_closes_the_standby_and_rematches_the_client(
    answer: bytes,
) -> None:
    h = Harness.create(PATIENT)
    h.idle_standby("s1", SERVER_1)
    h.idle_standby("s2", SERVER_1)
    h.client("c1", SERVER_1, early=b"early")
    h.opened("s2")
    actions = h.send("s2", answer)
    assert "s2" in h.closed
    assert isinstance(actions[0], CloseConnection)
    assert h.service.counters.standby_open_failures == 1
    splice = h.ready("s1")
    assert (splice.client, splice.to_server) == ("c1", b"early")


def test_a_client_gone_while_pairing_closes_its_opened_standby() -> None:
    h = Harness.create(PATIENT)
    h.idle_standby("s1", SERVER_1)
    h.idle_standby("s2", SERVER_1)
    h.client("c1", SERVER_1)
    h.opened("s2")
    actions = h.lose("c1")
    # The standby connection was told OPEN: it is of no use to another client now.
    assert actions == [CloseConnection(connection="s2", reason="its client went away")]
    assert h.service.idle_standby(SERVER_1) == 1
    assert h.service.connection_count() == 1
    # Its late READY finds nothing (the adapter closed it).
    assert h.service.data_received("s2", ready_line(session_id(1)), h.now, unix_time=0) == []
    # The next client still works, with the connection left.
    h.client("c2", SERVER_1)
    assert h.ready("s1").client == "c2"


def test_a_client_gone_while_waiting_leaves_the_line() -> None:
    h = Harness.create(PATIENT)
    h.idle_standby("s0", SERVER_1)
    h.client("c0", SERVER_1)
    h.ready("s0")
    h.client("c1", SERVER_1)
    h.client("c2", system_id=SYSTEM_A)
    assert h.service.counters.clients_waiting == 2
    assert h.lose("c1") == []
    assert h.lose("c2") == []
    assert h.service.counters.clients_waiting == 0
    h.idle_standby("s1", SERVER_1)  # nobody to open it for
    assert h.service.idle_standby(SERVER_1) == 1


def test_a_connection_lost_while_handshaking_is_forgotten() -> None:
    h = Harness.create()
    h.connect("c1")
    h.send("c1", b"GET /wavesync")
    assert h.lose("c1") == []
    assert h.service.connection_count() == 0
    h.advance(100.0)
    assert h.service.counters.handshake_timeouts == 0


# --- sessions ---------------------------------------------------------------------------------


def test_splice_ended_ends_the_session_once() -> None:
    h = Harness.create(PATIENT)
    for index in range(2):
        h.idle_standby(f"s{index}", SERVER_1)
        h.client(f"c{index}", SERVER_1)
        h.ready(f"s{index}")
    assert h.service.counters.sessions_active == 2
    h.end_splice(session_id(1))
    assert (h.service.counters.sessions_active, h.service.counters.sessions_ended) == (1, 1)
    h.end_splice(session_id(1))  # a second report of the same end
    h.end_splice(session_id(42))  # a session that never was
    assert (h.service.counters.sessions_active, h.service.counters.sessions_ended) == (1, 1)
    h.end_splice(session_id(2))
    assert (h.service.counters.sessions_active, h.service.counters.sessions_ended) == (0, 2)


def test_counters_add_up_over_a_busy_run() -> None:
    h = Harness.create(RelayLimits(pair_timeout=5.0, open_timeout=2.0))
    for index in range(3):
        h.idle_standby(f"a{index}", SERVER_1)
    h.idle_standby("b0", SERVER_2)
    h.client("c0", SERVER_1)  # paired with a2
    h.client("c1", system_id=SYSTEM_A)  # round robin: SERVER_1 first, a1
    h.client("c2", system_id=SYSTEM_A)  # then SERVER_2: b0
    h.client("c3", SERVER_UNKNOWN)  # 404
    h.ready("a2")
    h.ready("b0")
    h.lose("a1")  # c1 rematched to a0
    h.ready("a0")
    h.client("c4", SERVER_2)  # waits, then gives up
    h.advance(5.0)
    h.end_splice(session_id(1))
    counters = h.service.counters
    assert counters.connections == 9
    assert counters.standby_accepted == 4
    assert counters.standby_open_failures == 1
    assert counters.clients_paired == 3
    assert counters.clients_not_found == 1
    assert counters.clients_timed_out == 1
    assert counters.sessions_active == 2
    assert counters.sessions_ended == 1
    assert counters.standby_idle == counters.clients_waiting == 0
    assert h.service.connection_count() == 0
    assert len(h.splices) == 3
