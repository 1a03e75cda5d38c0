"""MediatorService connect: choosing the server, telling it, and the two copies of a request."""

from __future__ import annotations

import uuid

import pytest

from wavesync_proto.mediator.messages import (
    ConnectionRequested,
    ConnectionUpdate,
    ConnectResponse,
)
from wavesync_proto.mediator.service import MediatorLimits
from wavesync_proto.stun import MessageClass, decode_message, encode_message

from .helpers import (
    CLIENT_TCP,
    CLIENT_UDP,
    SERVER_1,
    SERVER_1_PUNCH,
    SERVER_2,
    SERVER_2_PUBLIC,
    SERVER_3,
    SYSTEM_A,
    SYSTEM_B,
    SYSTEM_UNKNOWN,
    Harness,
    ack_bytes,
    connect_bytes,
    error_of,
    sent_tcp,
    sent_udp,
    session_id,
    tid,
    typed,
)


def online_harness(limits: MediatorLimits | None = None) -> Harness:
    h = Harness.create(limits=limits)
    h.register("s1", SERVER_1)
    h.register("s2", SERVER_2, remote=SERVER_2_PUBLIC)
    h.connect_peer("c1", CLIENT_TCP)
    return h


def test_a_udp_copy_tells_the_server_the_client_udp_address() -> None:
    h = online_harness()
    data = connect_bytes(1, transaction_id=tid("c-udp"), server_id=SERVER_1, pad_to=576)
    actions = h.udp(data, CLIENT_UDP)
    [indication] = sent_tcp(actions, "s1")
    assert len(actions) == 1
    assert decode_message(indication).message_class is MessageClass.INDICATION
    assert typed(indication) == ConnectionRequested(
        connect_session_id=session_id(1), client_udp_endpoint=CLIENT_UDP
    )
    # The TCP copy adds a reply channel; the server already has the UDP address.
    assert h.tcp("c1", connect_bytes(1, transaction_id=tid("c-tcp"), server_id=SERVER_1)) == []
    counters = h.service.counters
    assert (counters.connects_received, counters.connects_answered, counters.connects_failed) == (
        1,
        0,
        0,
    )
    assert h.service.table_sizes()["connects_pending"] == 1


def test_a_tcp_copy_first_then_the_udp_copy_sends_connection_update() -> None:
    h = online_harness()
    actions = h.tcp("c1", connect_bytes(1, transaction_id=tid("c-tcp"), server_id=SERVER_1))
    assert [typed(d) for d in sent_tcp(actions, "s1")] == [
        ConnectionRequested(connect_session_id=session_id(1), client_tcp_endpoint=CLIENT_TCP)
    ]
    actions = h.udp(connect_bytes(1, transaction_id=tid("c-udp"), server_id=SERVER_1), CLIENT_UDP)
    [update] = sent_tcp(actions, "s1")
    assert len(actions) == 1
    assert decode_message(update).message_class is MessageClass.INDICATION
    assert typed(update) == ConnectionUpdate(
        connect_session_id=session_id(1), client_udp_endpoint=CLIENT_UDP
    )
    # A retransmitted UDP copy does not tell the server twice.
    assert (
        h.udp(connect_bytes(1, transaction_id=tid("c-udp2"), server_id=SERVER_1), CLIENT_UDP) == []
    )


def test_a_udp_copy_after_the_answer_still_reaches_the_server() -> None:
    h = online_harness()
    h.tcp("c1", connect_bytes(1, transaction_id=tid("c-tcp"), server_id=SERVER_1))
    h.udp(ack_bytes(1, SERVER_1, transaction_id=tid("ack")), SERVER_1_PUNCH)
    actions = h.udp(
        connect_bytes(1, transaction_id=tid("c-udp"), server_id=SERVER_1, pad_to=576), CLIENT_UDP
    )
    assert [typed(d) for d in sent_tcp(actions, "s1")] == [
        ConnectionUpdate(connect_session_id=session_id(1), client_udp_endpoint=CLIENT_UDP)
    ]
    [answer] = sent_udp(actions, CLIENT_UDP)
    assert typed(answer) == ConnectResponse(
        server_id=SERVER_1,
        system_id=SYSTEM_A,
        udp_endpoints=(SERVER_1_PUNCH,),
        client_mapped=CLIENT_UDP,
    )


def test_connect_by_system_goes_round_robin() -> None:
    h = online_harness()
    targets = []
    for number in range(1, 6):
        actions = h.udp(
            connect_bytes(number, transaction_id=tid(f"c{number}"), system_id=SYSTEM_A), CLIENT_UDP
        )
        [action] = actions
        targets.append(getattr(action, "peer", None))
    assert targets == ["s1", "s2", "s1", "s2", "s1"]


def test_round_robin_skips_a_server_that_left() -> None:
    h = online_harness()
    h.register("s3", SERVER_3, remote=("198.51.100.3", 1))
    h.tcp_closed("s2")
    targets = []
    for number in range(1, 5):
        [action] = h.udp(
            connect_bytes(number, transaction_id=tid(f"c{number}"), system_id=SYSTEM_A), CLIENT_UDP
        )
        targets.append(getattr(action, "peer", None))
    assert targets == ["s1", "s3", "s1", "s3"]


@pytest.mark.parametrize(
    ("server_id", "system_id", "reason"),
    [
        pytest.param(SERVER_3, None, "Server Offline", id="unknown server"),
        pytest.param(None, SYSTEM_UNKNOWN, "No Server Online", id="unknown system"),
        pytest.param(None, SYSTEM_B, "No Server Online", id="system with none online"),
    ],
)
def test_a_target_not_online_gets_404(
    server_id: uuid.UUID | None, system_id: uuid.UUID | None, reason: str
) -> None:
    h = online_harness()
    data = connect_bytes(1, transaction_id=tid("c-udp"), server_id=server_id, system_id=system_id)
    request = decode_message(data)
    assert sent_udp(h.udp(data, CLIENT_UDP), CLIENT_UDP) == [
        encode_message(request.error_response(404, reason))
    ]
    tcp_data = connect_bytes(
        1, transaction_id=tid("c-tcp"), server_id=server_id, system_id=system_id
    )
    assert error_of(sent_tcp(h.tcp("c1", tcp_data), "c1")[0]) == (404, reason)
    # Nothing is remembered for a refusal: each copy is one session refused.
    assert h.service.table_sizes()["connects_pending"] == 0
    assert (h.service.counters.connects_received, h.service.counters.connects_failed) == (2, 2)


def test_an_offline_server_looks_exactly_like_an_unknown_one() -> None:
    h = online_harness()
    h.tcp_closed("s2")
    offline = h.udp(connect_bytes(1, transaction_id=tid("c"), server_id=SERVER_2), CLIENT_UDP)
    unknown = h.udp(connect_bytes(2, transaction_id=tid("c"), server_id=SERVER_3), CLIENT_UDP)
    assert sent_udp(offline, CLIENT_UDP) == sent_udp(unknown, CLIENT_UDP)
    assert len(offline) == 1


def test_retransmissions_before_the_answer_are_silent_and_the_newest_id_is_answered() -> None:
    h = online_harness()
    h.udp(connect_bytes(1, transaction_id=tid("try-1"), server_id=SERVER_1), CLIENT_UDP)
    assert (
        h.udp(connect_bytes(1, transaction_id=tid("try-2"), server_id=SERVER_1), CLIENT_UDP) == []
    )
    actions = h.udp(ack_bytes(1, SERVER_1, transaction_id=tid("ack")), SERVER_1_PUNCH)
    [answer] = sent_udp(actions, CLIENT_UDP)
    assert decode_message(answer).transaction_id == tid("try-2")
    # After the answer, a retransmission gets the same answer under its own id.
    [again] = sent_udp(
        h.udp(connect_bytes(1, transaction_id=tid("try-3"), server_id=SERVER_1), CLIENT_UDP),
        CLIENT_UDP,
    )
    assert decode_message(again).transaction_id == tid("try-3")
    assert typed(again) == typed(answer)
    assert h.service.counters.connects_received == 1


def test_a_session_id_naming_another_target_is_a_bad_request() -> None:
    h = online_harness()
    h.udp(connect_bytes(1, transaction_id=tid("first"), server_id=SERVER_1), CLIENT_UDP)
    for server_id, system_id in ((SERVER_2, None), (None, SYSTEM_A)):
        data = connect_bytes(
            1, transaction_id=tid("second"), server_id=server_id, system_id=system_id
        )
        [answer] = sent_udp(h.udp(data, CLIENT_UDP), CLIENT_UDP)
        assert error_of(answer) == (400, "connect session id already names another target")
    assert h.service.counters.bad_requests == 2


def test_the_pending_table_is_bounded() -> None:
    h = online_harness(limits=MediatorLimits(max_pending_connects=2))
    h.udp(connect_bytes(1, transaction_id=tid("c1"), server_id=SERVER_1), CLIENT_UDP)
    h.udp(connect_bytes(2, transaction_id=tid("c2"), server_id=SERVER_1), CLIENT_UDP)
    third = connect_bytes(3, transaction_id=tid("c3"), server_id=SERVER_1)
    [answer] = sent_udp(h.udp(third, CLIENT_UDP), CLIENT_UDP)
    assert error_of(answer) == (508, "Insufficient Capacity")
    # Copies of sessions already pending are still welcome.
    assert h.tcp("c1", connect_bytes(2, transaction_id=tid("c2-tcp"), server_id=SERVER_1)) == []
    assert h.service.table_sizes()["connects_pending"] == 2


def test_a_closed_client_connection_loses_only_its_own_channel() -> None:
    h = online_harness()
    h.udp(connect_bytes(1, transaction_id=tid("c-udp"), server_id=SERVER_1), CLIENT_UDP)
    h.tcp("c1", connect_bytes(1, transaction_id=tid("c-tcp"), server_id=SERVER_1))
    assert h.tcp_closed("c1") == []
    actions = h.udp(ack_bytes(1, SERVER_1, transaction_id=tid("ack")), SERVER_1_PUNCH)
    assert sent_tcp(actions, "c1") == []
    assert len(sent_udp(actions, CLIENT_UDP)) == 1


def test_a_tcp_copy_from_a_new_connection_moves_the_channel() -> None:
    h = online_harness()
    h.tcp("c1", connect_bytes(1, transaction_id=tid("c-tcp"), server_id=SERVER_1))
    h.connect_peer("c2", CLIENT_UDP)
    assert h.tcp("c2", connect_bytes(1, transaction_id=tid("c-tcp2"), server_id=SERVER_1)) == []
    h.tcp_closed("c1")
    actions = h.udp(ack_bytes(1, SERVER_1, transaction_id=tid("ack")), SERVER_1_PUNCH)
    [answer] = sent_tcp(actions, "c2")
    assert decode_message(answer).transaction_id == tid("c-tcp2")
    assert typed(answer) == ConnectResponse(
        server_id=SERVER_1,
        system_id=SYSTEM_A,
        udp_endpoints=(SERVER_1_PUNCH,),
        client_mapped=CLIENT_UDP,
    )


def test_connect_answers_are_signed_by_nobody_and_mirror_fingerprint() -> None:
    h = online_harness()
    request = decode_message(connect_bytes(1, transaction_id=tid("fp"), server_id=SERVER_3))
    data = encode_message(request, fingerprint=True)
    [answer] = sent_udp(h.udp(data, CLIENT_UDP), CLIENT_UDP)
    assert answer == encode_message(request.error_response(404, "Server Offline"), fingerprint=True)
