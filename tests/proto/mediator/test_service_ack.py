"""MediatorService connection_ack, the ack timeout, server loss and connection_result."""

from __future__ import annotations

from wavesync_proto.mediator.attributes import ConnectionPath
from wavesync_proto.mediator.messages import (
    ConnectionAckResponse,
    ConnectionRequested,
    ConnectResponse,
)
from wavesync_proto.stun import decode_message, encode_message, verify_integrity_sha256

from .helpers import (
    CLIENT_TCP,
    CLIENT_UDP,
    FORWARDED,
    KEY_B,
    LOCAL,
    PADDED_CONNECT_SIZE,
    RELAYS,
    SERVER_1,
    SERVER_1_PUBLIC,
    SERVER_1_PUNCH,
    SERVER_2,
    SERVER_2_PUBLIC,
    SYSTEM_A,
    Harness,
    ack_bytes,
    closed,
    connect_bytes,
    error_of,
    result_bytes,
    sent_tcp,
    sent_udp,
    server_key,
    session_id,
    tid,
    typed,
)


def pending_connect() -> Harness:
    """Server 1 online with endpoints; session 1 asked for over UDP and TCP."""
    h = Harness.create(relay_urls=RELAYS)
    h.register("s1", SERVER_1, local=LOCAL, forwarded=FORWARDED)
    h.register("s2", SERVER_2, remote=SERVER_2_PUBLIC)
    h.connect_peer("c1", CLIENT_TCP)
    udp_copy = connect_bytes(
        1, transaction_id=tid("c-udp"), server_id=SERVER_1, pad_to=PADDED_CONNECT_SIZE
    )
    h.udp(udp_copy, CLIENT_UDP)
    h.tcp("c1", connect_bytes(1, transaction_id=tid("c-tcp"), server_id=SERVER_1))
    return h


def full_answer(*, client_mapped: tuple[str, int], udp: bool = True) -> ConnectResponse:
    return ConnectResponse(
        server_id=SERVER_1,
        system_id=SYSTEM_A,
        forwarded_endpoints=FORWARDED,
        local_endpoints=LOCAL,
        udp_endpoints=(SERVER_1_PUNCH,) if udp else (),
        relay_urls=RELAYS,
        client_mapped=client_mapped,
    )


def test_an_ack_answers_both_channels_each_with_its_own_id_and_address() -> None:
    h = pending_connect()
    key = server_key(SERVER_1)
    actions = h.udp(ack_bytes(1, SERVER_1, transaction_id=tid("ack")), SERVER_1_PUNCH)
    [ack_answer] = sent_udp(actions, SERVER_1_PUNCH)
    assert ack_answer == encode_message(
        ConnectionAckResponse(server_udp_endpoint=SERVER_1_PUNCH).to_stun(tid("ack")),
        integrity_sha256_key=key,
    )
    assert verify_integrity_sha256(decode_message(ack_answer), key)
    assert sent_udp(actions, CLIENT_UDP) == [
        encode_message(full_answer(client_mapped=CLIENT_UDP).to_stun(tid("c-udp")))
    ]
    assert sent_tcp(actions, "c1") == [
        encode_message(full_answer(client_mapped=CLIENT_TCP).to_stun(tid("c-tcp")))
    ]
    assert len(actions) == 3
    counters = h.service.counters
    assert (
        counters.acks_accepted,
        counters.connects_answered,
        counters.connects_answered_with_udp,
    ) == (1, 1, 1)
    assert h.service.table_sizes()["connects_pending"] == 0


def test_a_retransmitted_ack_gets_the_same_ack_answer_and_nothing_more() -> None:
    h = pending_connect()
    first = h.udp(ack_bytes(1, SERVER_1, transaction_id=tid("ack-1")), SERVER_1_PUNCH)
    again = h.udp(ack_bytes(1, SERVER_1, transaction_id=tid("ack-2")), SERVER_1_PUNCH)
    assert len(again) == 1
    assert typed(sent_udp(again, SERVER_1_PUNCH)[0]) == typed(sent_udp(first, SERVER_1_PUNCH)[0])
    assert decode_message(sent_udp(again, SERVER_1_PUNCH)[0]).transaction_id == tid("ack-2")
    assert h.service.counters.acks_accepted == 1


def test_an_ack_with_a_bad_signature_is_401_and_changes_nothing() -> None:
    h = pending_connect()
    forged = ack_bytes(1, SERVER_1, transaction_id=tid("forged"), key=server_key(SERVER_1, KEY_B))
    [answer] = sent_udp(h.udp(forged, SERVER_1_PUNCH), SERVER_1_PUNCH)
    assert answer == encode_message(decode_message(forged).error_response(401, "Unauthorized"))
    wrong_user = ack_bytes(1, SERVER_1, transaction_id=tid("user"), username=str(SERVER_2))
    assert error_of(sent_udp(h.udp(wrong_user, SERVER_1_PUNCH), SERVER_1_PUNCH)[0]) == (
        401,
        "Unauthorized",
    )
    assert h.service.counters.acks_rejected == 2
    assert h.service.table_sizes()["connects_pending"] == 1


def test_an_ack_from_an_offline_server_is_401() -> None:
    h = pending_connect()
    h.tcp_closed("s2")
    data = ack_bytes(1, SERVER_2, transaction_id=tid("ack"))
    assert error_of(sent_udp(h.udp(data, SERVER_1_PUNCH), SERVER_1_PUNCH)[0]) == (
        401,
        "Unauthorized",
    )


def test_an_ack_by_another_server_or_for_an_unknown_session_is_404() -> None:
    h = pending_connect()
    other = ack_bytes(1, SERVER_2, transaction_id=tid("other"))
    assert error_of(sent_udp(h.udp(other, SERVER_1_PUNCH), SERVER_1_PUNCH)[0]) == (
        404,
        "Unknown Session",
    )
    unknown = ack_bytes(99, SERVER_1, transaction_id=tid("unknown"))
    assert error_of(sent_udp(h.udp(unknown, SERVER_1_PUNCH), SERVER_1_PUNCH)[0]) == (
        404,
        "Unknown Session",
    )
    assert h.service.counters.acks_rejected == 2
    assert h.service.table_sizes()["connects_pending"] == 1


def test_an_ack_over_tcp_is_refused() -> None:
    h = pending_connect()
    [answer] = sent_tcp(h.tcp("s1", ack_bytes(1, SERVER_1, transaction_id=tid("ack"))), "s1")
    assert error_of(answer) == (400, "Connection Ack Requires UDP")
    assert h.service.table_sizes()["connects_pending"] == 1


def test_without_an_ack_the_clients_are_answered_without_udp_endpoints() -> None:
    h = pending_connect()
    assert h.advance(1.99) == []
    actions = h.advance(0.02)
    assert sent_udp(actions, CLIENT_UDP) == [
        encode_message(full_answer(client_mapped=CLIENT_UDP, udp=False).to_stun(tid("c-udp")))
    ]
    assert sent_tcp(actions, "c1") == [
        encode_message(full_answer(client_mapped=CLIENT_TCP, udp=False).to_stun(tid("c-tcp")))
    ]
    counters = h.service.counters
    assert (counters.connects_answered, counters.connects_answered_with_udp) == (1, 0)
    # A late ack is still answered (the server stops retrying), and copies from now on
    # learn the punched endpoint.
    late = h.udp(ack_bytes(1, SERVER_1, transaction_id=tid("late")), SERVER_1_PUNCH)
    assert [typed(d) for d in sent_udp(late, SERVER_1_PUNCH)] == [
        ConnectionAckResponse(server_udp_endpoint=SERVER_1_PUNCH)
    ]
    assert len(late) == 1
    copy = h.udp(
        connect_bytes(1, transaction_id=tid("c-udp-3"), server_id=SERVER_1, pad_to=576), CLIENT_UDP
    )
    assert typed(sent_udp(copy, CLIENT_UDP)[0]) == full_answer(client_mapped=CLIENT_UDP)


def test_losing_the_server_mid_connect_answers_404_at_once() -> None:
    h = pending_connect()
    actions = h.tcp_closed("s1")
    udp_request = decode_message(connect_bytes(1, transaction_id=tid("c-udp"), server_id=SERVER_1))
    assert sent_udp(actions, CLIENT_UDP) == [
        encode_message(udp_request.error_response(404, "Server Went Offline"))
    ]
    assert error_of(sent_tcp(actions, "c1")[0]) == (404, "Server Went Offline")
    assert decode_message(sent_tcp(actions, "c1")[0]).transaction_id == tid("c-tcp")
    assert h.service.counters.connects_failed == 1
    # Late copies get the same 404; the server coming back cannot ack the dead session.
    again = h.udp(connect_bytes(1, transaction_id=tid("c-udp-2"), server_id=SERVER_1), CLIENT_UDP)
    assert error_of(sent_udp(again, CLIENT_UDP)[0]) == (404, "Server Went Offline")
    h.register("s1-again", SERVER_1)
    late_ack = ack_bytes(1, SERVER_1, transaction_id=tid("ack"))
    assert error_of(sent_udp(h.udp(late_ack, SERVER_1_PUNCH), SERVER_1_PUNCH)[0]) == (
        404,
        "Unknown Session",
    )
    # Timers of the settled session do not fire an answer again.
    assert [a for a in h.advance(5.0) if not closed([a])] == []


def test_a_keepalive_timeout_mid_connect_answers_404_too() -> None:
    h = Harness.create()
    h.register("s1", SERVER_1)
    h.advance(74.0)
    h.udp(connect_bytes(1, transaction_id=tid("c"), server_id=SERVER_1), CLIENT_UDP)
    actions = h.advance(1.5)
    assert closed(actions) == {"s1": "keep-alive timeout: silent for 75 s"}
    assert error_of(sent_udp(actions, CLIENT_UDP)[0]) == (404, "Server Went Offline")


def test_a_replaced_server_session_keeps_its_pending_connects() -> None:
    h = pending_connect()
    actions = h.register(
        "s1-new", SERVER_1, remote=SERVER_1_PUBLIC, local=LOCAL, forwarded=FORWARDED
    )
    assert closed(actions) == {"s1": "replaced by a new listen session"}
    assert sent_udp(actions, CLIENT_UDP) == []
    actions = h.udp(ack_bytes(1, SERVER_1, transaction_id=tid("ack")), SERVER_1_PUNCH)
    assert typed(sent_udp(actions, CLIENT_UDP)[0]) == full_answer(client_mapped=CLIENT_UDP)
    # New sessions are announced on the new connection.
    actions = h.tcp("c1", connect_bytes(2, transaction_id=tid("c2"), server_id=SERVER_1))
    assert [typed(d) for d in sent_tcp(actions, "s1-new")] == [
        ConnectionRequested(connect_session_id=session_id(2), client_tcp_endpoint=CLIENT_TCP)
    ]
    assert len(actions) == 1


def test_connection_results_are_counted_once_per_known_session() -> None:
    h = pending_connect()
    data = result_bytes(1, ConnectionPath.UDP, transaction_id=tid("result"))
    [answer] = sent_udp(h.udp(data, CLIENT_UDP), CLIENT_UDP)
    assert answer == encode_message(decode_message(data).success_response())
    h.udp(result_bytes(1, ConnectionPath.UDP, transaction_id=tid("result-2")), CLIENT_UDP)
    [over_tcp] = sent_tcp(
        h.tcp("c1", result_bytes(1, ConnectionPath.TCP, transaction_id=tid("r-tcp"))), "c1"
    )
    assert over_tcp == encode_message(
        decode_message(result_bytes(1, 2, transaction_id=tid("r-tcp"))).success_response()
    )
    assert h.service.counters.results_by_path == {
        "failed": 0,
        "lan": 0,
        "tcp": 0,
        "udp": 1,
        "relay": 0,
    }
    unknown = result_bytes(2, ConnectionPath.RELAY, transaction_id=tid("unknown"))
    assert error_of(sent_udp(h.udp(unknown, CLIENT_UDP), CLIENT_UDP)[0]) == (404, "Unknown Session")


def test_answered_sessions_are_forgotten_after_their_ttl() -> None:
    h = pending_connect()
    h.udp(ack_bytes(1, SERVER_1, transaction_id=tid("ack")), SERVER_1_PUNCH)
    h.advance(29.9)
    # Still remembered: a copy gets the cached answer, a result is counted.
    copy = connect_bytes(1, transaction_id=tid("late"), server_id=SERVER_1, pad_to=576)
    assert typed(sent_udp(h.udp(copy, CLIENT_UDP), CLIENT_UDP)[0]) == full_answer(
        client_mapped=CLIENT_UDP
    )
    h.advance(0.2)
    assert h.service.table_sizes()["connects_answered"] == 0
    result = result_bytes(1, ConnectionPath.LAN, transaction_id=tid("result"))
    assert error_of(sent_udp(h.udp(result, CLIENT_UDP), CLIENT_UDP)[0]) == (404, "Unknown Session")
    # The id is free again: a new copy starts a new session.
    actions = h.udp(copy, CLIENT_UDP)
    assert [typed(d) for d in sent_tcp(actions, "s1")] == [
        ConnectionRequested(connect_session_id=session_id(1), client_udp_endpoint=CLIENT_UDP)
    ]
    assert h.service.counters.connects_received == 2


def test_an_expired_session_lets_go_of_a_live_tcp_connection() -> None:
    h = pending_connect()
    h.udp(ack_bytes(1, SERVER_1, transaction_id=tid("ack")), SERVER_1_PUNCH)
    assert h.service.table_sizes()["tcp_reply_peers"] == 1
    report = result_bytes(1, ConnectionPath.UDP, transaction_id=tid("report"))
    for _ in range(7):
        h.advance(5.0)
        assert len(sent_tcp(h.tcp("c1", report), "c1")) == 1
    assert h.service.table_sizes()["connects_answered"] == 0
    assert h.service.table_sizes()["tcp_reply_peers"] == 0
    assert h.service.table_sizes()["tcp_peers"] == 3
