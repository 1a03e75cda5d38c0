"""ListenSession once registered: keep-alives, loss and back-off, connection requests, acks."""

from __future__ import annotations

import pytest

from wavesync_proto.errors import LocalProtocolError
from wavesync_proto.mediator import (
    ConnectionAck,
    ConnectionAckResponse,
    ConnectionRequested,
    ConnectionUpdate,
    MediatorMethod,
    credential_key,
)
from wavesync_proto.mediator.auth import verify_ack
from wavesync_proto.mediator.listen import (
    MAX_PENDING_EVENTS,
    ClientUdpEndpointLearned,
    ConnectionRequestReceived,
    SessionLost,
)
from wavesync_proto.stun import (
    ErrorCode,
    Message,
    MessageClass,
    TransactionTimedOut,
    XorMappedAddress,
    decode_message,
    encode_message,
)

from .test_listen import (
    KEY,
    LISTEN,
    PUBLIC,
    REALM,
    SERVER,
    SESSION_ID,
    accept,
    binding,
    challenge,
    drive,
    events,
    indication,
    jitter,
    new_session,
    registered_session,
    sent_one,
    stun,
    tid,
)

# --- keep-alives, loss and back-off -----------------------------------------------------


def test_keepalives_follow_the_interval_and_any_answer_keeps_the_session() -> None:
    session = registered_session(now=100.0)
    assert session.get_timer() == 130.0
    session.handle_timer(129.9)
    assert session.data_to_send() == b""
    session.handle_timer(130.0)
    assert session.data_to_send() == binding(3)
    assert session.get_timer() == 140.0  # the answer's deadline
    session.data_received(binding(3, MessageClass.SUCCESS, XorMappedAddress(PUBLIC)), 131.0)
    assert session.get_timer() == 160.0
    session.handle_timer(160.0)
    assert session.data_to_send() == binding(4)
    # An error response is still the mediator answering: the session is alive.
    session.data_received(binding(4, MessageClass.ERROR, ErrorCode(400, "Bad Request")), 161.0)
    session.handle_timer(190.0)
    assert session.data_to_send() == binding(5)
    assert session.registered
    assert session.dropped_messages == 0


def test_a_missed_keepalive_answer_loses_the_session_and_reconnects_with_back_off() -> None:
    session = registered_session(now=100.0)
    session.handle_timer(130.0)
    assert session.data_to_send() == binding(3)
    session.data_received(binding(9, MessageClass.SUCCESS), 131.0)  # not our keep-alive
    assert session.dropped_messages == 1
    session.handle_timer(139.9)
    assert not session.should_close()
    session.handle_timer(140.0)
    assert session.should_close()
    session.connection_lost(140.5)
    retry_at = 140.5 + 1.0 * jitter(1)[0]  # the registration reset the back-off
    assert events(session) == [
        SessionLost(reason="no keep-alive answer within 10.0 s", retry_at=retry_at)
    ]
    assert session.public_endpoint is None
    with pytest.raises(LocalProtocolError, match="no connection"):
        session.data_received(binding(3, MessageClass.SUCCESS), 140.6)  # too late: it is gone
    assert session.get_timer() == retry_at
    session.handle_timer(retry_at)
    assert session.should_connect(retry_at)
    session.connection_made(retry_at)
    assert sent_one(session) == decode_message(encode_message(LISTEN.to_stun(tid(4))))


def test_connect_failures_back_off_exponentially_with_jitter_up_to_the_cap() -> None:
    session = new_session(initial=1.0, max=10.0)
    now, delays = 0.0, []
    for _ in range(6):
        assert session.should_connect(now)
        session.connection_lost(now)  # the adapter could not connect
        (lost,) = events(session)
        assert isinstance(lost, SessionLost)
        assert lost.reason == "could not connect to the mediator"
        delays.append(lost.retry_at - now)
        now = lost.retry_at
    bases = [1, 2, 4, 8, 10, 10]
    assert delays == [pytest.approx(b * j) for b, j in zip(bases, jitter(6), strict=True)]


def test_a_successful_registration_resets_the_back_off() -> None:
    session = new_session()
    now = 0.0
    for _ in range(3):
        session.connection_lost(now)
        (lost,) = events(session)
        assert isinstance(lost, SessionLost)
        now = lost.retry_at
    drive(session, challenge, accept, now=now)
    session.connection_lost(now + 50.0)
    assert events(session)[-1] == SessionLost(
        reason="connection to the mediator lost", retry_at=now + 50.0 + jitter(4)[3]
    )


# --- connection requests ----------------------------------------------------------------


def test_connection_requested_and_updated_become_events() -> None:
    session = registered_session()
    client_tcp, client_udp = ("198.51.100.9", 5555), ("2001:db8::9", 7)
    requested = ConnectionRequested(connect_session_id=SESSION_ID, client_tcp_endpoint=client_tcp)
    update = ConnectionUpdate(connect_session_id=SESSION_ID, client_udp_endpoint=client_udp)
    session.data_received(indication(requested) + indication(update), 1.0)
    assert events(session) == [
        ConnectionRequestReceived(
            connect_session_id=SESSION_ID, client_udp_endpoint=None, client_tcp_endpoint=client_tcp
        ),
        ClientUdpEndpointLearned(connect_session_id=SESSION_ID, client_udp_endpoint=client_udp),
    ]


def test_unusable_messages_on_a_registered_session_are_counted_and_dropped() -> None:
    session = registered_session()
    ack = ConnectionAck(connect_session_id=SESSION_ID, server_id=SERVER)
    broken = bytearray(encode_message(ack.to_stun(tid(9))))
    broken[-20:-16] = b"\x40\x02\x00\x0c"  # SERVER-ID claims 12 bytes: framed, but undecodable
    session.data_received(
        encode_message(stun(MessageClass.INDICATION, MediatorMethod.CONNECTION_REQUESTED, tid(9)))
        + encode_message(stun(MessageClass.INDICATION, 0x1FF, tid(9)))  # an unknown indication
        + encode_message(LISTEN.to_stun(tid(9)))  # a request, which a server is never sent
        + bytes(broken),
        1.0,
    )
    assert session.dropped_messages == 4
    assert events(session) == []
    assert session.registered
    # Events pile up only while nobody reads them, and then only up to a bound.
    update = indication(ConnectionUpdate(connect_session_id=SESSION_ID, client_udp_endpoint=PUBLIC))
    session.data_received(update * (MAX_PENDING_EVENTS + 3), 1.0)
    assert session.dropped_messages == 4 + 3
    assert len(events(session)) == MAX_PENDING_EVENTS


def signed_ack_answer(*, key: bytes | None = KEY, method: int = 0x104) -> Message:
    answer = stun(MessageClass.SUCCESS, method, tid(3), XorMappedAddress(("203.0.113.7", 61000)))
    return decode_message(encode_message(answer, integrity_sha256_key=key))


def test_connection_ack_is_signed_verifiable_and_outlives_the_session() -> None:
    session = registered_session()
    transaction = session.connection_ack(SESSION_ID, 5.0)
    (datagram,) = transaction.messages_to_send(5.0)
    assert transaction.messages_to_send(5.4) == []
    assert transaction.messages_to_send(5.5) == [datagram]  # RFC 8489 retransmission
    request = decode_message(datagram)
    assert request.transaction_id == tid(3)
    assert verify_ack(request, key_for=lambda name: KEY if name == str(SERVER) else None) == KEY
    assert ConnectionAck.from_stun(request) == ConnectionAck(
        connect_session_id=SESSION_ID, server_id=SERVER
    )
    answer = signed_ack_answer()
    assert transaction.receive_response(answer, 5.6)
    expected = ConnectionAckResponse(server_udp_endpoint=("203.0.113.7", 61000))
    assert session.ack_response(answer) == expected
    # An ack for a request that came just before the session dropped still goes out.
    session.connection_lost(6.0)
    late = session.connection_ack(SESSION_ID, 7.0)
    assert verify_ack(decode_message(late.request), key_for=lambda _: KEY) == KEY
    late.handle_timer(7.0 + 39.5)
    assert isinstance(late.next_event(), TransactionTimedOut)


def test_ack_answers_that_are_not_signed_successes_are_refused() -> None:
    fresh = new_session()
    with pytest.raises(LocalProtocolError, match="before the first successful registration"):
        fresh.connection_ack(SESSION_ID, 0.0)
    assert fresh.ack_response(signed_ack_answer()) is None  # no key to check it with
    session = registered_session()
    error = stun(MessageClass.ERROR, 0x104, tid(3), ErrorCode(404, "Unknown Session"))
    empty = stun(MessageClass.SUCCESS, 0x104, tid(3))
    for message in (
        signed_ack_answer(key=credential_key("x", REALM, "y")),
        signed_ack_answer(key=None),
        signed_ack_answer(method=MediatorMethod.LISTEN),
        decode_message(encode_message(error, integrity_sha256_key=KEY)),
        decode_message(encode_message(empty, integrity_sha256_key=KEY)),
    ):
        assert session.ack_response(message) is None
