"""ConnectRequest driven in memory: both copies, every way an answer can come or not come."""

from __future__ import annotations

import struct
import uuid
from typing import Literal

import pytest

from wavesync_proto.errors import LocalProtocolError
from wavesync_proto.mediator import (
    Connect,
    ConnectionPath,
    ConnectionResult,
    ConnectResponse,
    MediatorMethod,
)
from wavesync_proto.mediator.connect import (
    MAX_CONNECT_MESSAGE,
    PADDING_ATTRIBUTE,
    UDP_REQUEST_SIZE,
    ConnectEvent,
    ConnectFailed,
    ConnectRequest,
    ConnectSucceeded,
    connection_result_transaction,
)
from wavesync_proto.stun import (
    MAGIC_COOKIE,
    Message,
    MessageClass,
    RawAttribute,
    decode_message,
    encode_message,
)
from wavesync_proto.stun.transaction import TransactionTimedOut

SYSTEM = uuid.UUID("04f5a9ea-3cb8-44b0-bb62-401b420701de")
SERVER = uuid.UUID("9b2f4c0e-1d7a-4e63-8a55-0c3f6b1e2d44")
OTHER_SERVER = uuid.UUID("11111111-2222-4333-8444-555555555555")
SESSION_ID = b"\x01" * 16  # the first draw from CountingBytes
UDP_TID = b"\x02" * 12
TCP_TID = b"\x03" * 12
RESPONSE = ConnectResponse(
    server_id=SERVER,
    system_id=SYSTEM,
    forwarded_endpoints=(("198.51.100.4", 443),),
    local_endpoints=(("192.168.1.10", 8000),),
    udp_endpoints=(("203.0.113.7", 61000),),
    relay_urls=("https://relay.example/",),
    client_mapped=("198.51.100.9", 5000),
)


class CountingBytes:
    """A stand-in for os.urandom whose n-th call returns n repeated: every id is predictable."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, size: int) -> bytes:
        self.calls += 1
        return bytes([self.calls]) * size


def new_request(
    *, now: float = 0.0, timeout: float = 10.0, system: bool = False, rto: float = 0.5
) -> ConnectRequest:
    if system:
        return ConnectRequest(
            system_id=SYSTEM, now=now, timeout=timeout, rto=rto, random_bytes=CountingBytes()
        )
    return ConnectRequest(
        server_id=SERVER, now=now, timeout=timeout, rto=rto, random_bytes=CountingBytes()
    )


def request_message(transaction_id: bytes) -> Message:
    return Connect(connect_session_id=SESSION_ID, server_id=SERVER).to_stun(transaction_id)


def success(transaction_id: bytes, response: ConnectResponse = RESPONSE) -> bytes:
    return encode_message(response.to_stun(transaction_id))


def error(transaction_id: bytes, code: int = 404, reason: str = "Server Offline") -> bytes:
    return encode_message(request_message(transaction_id).error_response(code, reason))


def events(request: ConnectRequest) -> list[ConnectEvent]:
    found: list[ConnectEvent] = []
    for _ in range(2):  # one event per request: a second means a bug, a third is not looked for
        event = request.next_event()
        if event is None:
            break
        found.append(event)
    return found


def succeeded(
    request: ConnectRequest, response: ConnectResponse, via: Literal["udp", "tcp"], elapsed: float
) -> ConnectSucceeded:
    """The one event a request answered by ``response`` over ``via`` reports."""
    return ConnectSucceeded(
        response=response,
        via=via,
        elapsed=elapsed,
        connect_session_id=request.connect_session_id,
    )


def assert_finished(request: ConnectRequest, now: float) -> None:
    """A done request sends nothing more, wants no timer and ignores everything."""
    assert request.done
    assert request.get_timer() is None
    assert request.datagrams_to_send(now + 100.0) == []
    assert request.tcp_data_to_send() == b""
    request.datagram_received(success(UDP_TID), now)
    request.tcp_data_received(success(TCP_TID), now)
    request.tcp_connection_lost(now)
    request.handle_timer(now + 100.0)
    assert request.next_event() is None


# --- what is sent ------------------------------------------------------------------------


def test_the_udp_copy_is_padded_to_576_bytes_and_exact() -> None:
    request = new_request()
    assert request.connect_session_id == SESSION_ID
    (datagram,) = request.datagrams_to_send(0.0)
    assert len(datagram) == UDP_REQUEST_SIZE == 576
    unpadded = request_message(UDP_TID)
    filler = RawAttribute(PADDING_ATTRIBUTE, bytes(576 - len(encode_message(unpadded)) - 4))
    expected = Message(
        message_class=MessageClass.REQUEST,
        method=MediatorMethod.CONNECT,
        transaction_id=UDP_TID,
        attributes=(*unpadded.attributes, filler),
    )
    assert datagram == encode_message(expected)
    assert Connect.from_stun(decode_message(datagram)) == Connect(
        connect_session_id=SESSION_ID, server_id=SERVER
    )


def test_the_tcp_copy_is_the_same_request_unpadded_and_sent_once() -> None:
    request = new_request()
    assert request.tcp_data_to_send() == encode_message(request_message(TCP_TID))
    assert request.tcp_data_to_send() == b""


def test_a_system_id_request_is_padded_too() -> None:
    request = new_request(system=True)
    (datagram,) = request.datagrams_to_send(0.0)
    assert len(datagram) == 576
    assert Connect.from_stun(decode_message(datagram)) == Connect(
        connect_session_id=SESSION_ID, system_id=SYSTEM
    )


def test_the_udp_copy_follows_the_rfc_8489_schedule() -> None:
    request = new_request(timeout=60.0)
    sends: list[float] = []
    now = 0.0
    for _ in range(20):  # bounded: a timer that does not move must fail, not hang
        sends.extend(now for _ in request.datagrams_to_send(now))
        request.handle_timer(now)
        timer = request.get_timer()
        if timer is None:
            break
        now = timer
    assert request.done
    assert sends == [0.0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5]


# --- answers -----------------------------------------------------------------------------


def test_a_udp_answer_first_wins_and_the_tcp_answer_is_ignored() -> None:
    request = new_request(now=100.0)
    request.datagrams_to_send(100.0)
    request.tcp_data_to_send()
    request.datagram_received(success(UDP_TID), 100.25)
    assert events(request) == [succeeded(request, RESPONSE, "udp", 0.25)]
    assert_finished(request, 100.5)
    assert request.dropped_messages == 0


def test_a_tcp_answer_first_wins_and_the_udp_answer_is_ignored() -> None:
    request = new_request(now=100.0)
    answer = success(TCP_TID)
    request.tcp_data_received(answer[:7], 100.1)
    request.tcp_data_received(answer[7:30], 100.2)
    assert request.buffered == 30
    assert not request.done
    request.tcp_data_received(answer[30:], 100.5)
    assert events(request) == [succeeded(request, RESPONSE, "tcp", 0.5)]
    assert request.buffered == 0
    assert_finished(request, 101.0)


@pytest.mark.parametrize(
    ("code", "reason"),
    [(404, "Server Offline"), (404, "No Server Online"), (404, "Server Went Offline"),
     (400, "Bad Request"), (508, "Insufficient Capacity")],
)  # fmt: skip
@pytest.mark.parametrize("via", ["udp", "tcp"])
def test_an_error_on_either_transport_ends_the_request(code: int, reason: str, via: str) -> None:
    request = new_request()
    if via == "udp":
        request.datagram_received(error(UDP_TID, code, reason), 1.0)
    else:
        request.tcp_data_received(error(TCP_TID, code, reason), 1.0)
    assert events(request) == [ConnectFailed(code=code, reason=reason, elapsed=1.0)]
    assert_finished(request, 1.0)


def test_the_same_answer_on_both_transports_gives_one_event() -> None:
    request = new_request()
    request.tcp_data_received(error(TCP_TID), 1.0)
    request.datagram_received(error(UDP_TID), 1.1)
    assert events(request) == [ConnectFailed(code=404, reason="Server Offline", elapsed=1.0)]


def test_foreign_and_duplicate_responses_are_ignored() -> None:
    request = new_request()
    request.datagram_received(success(b"f" * 12), 0.1)  # nobody's transaction
    request.datagram_received(success(TCP_TID), 0.1)  # the TCP copy's id, over UDP
    request.datagram_received(encode_message(request_message(UDP_TID)), 0.1)  # our own request
    request.tcp_data_received(success(UDP_TID) + error(b"g" * 12), 0.1)
    assert request.dropped_messages == 5
    assert not request.done
    request.datagram_received(success(UDP_TID), 0.2)
    request.datagram_received(success(UDP_TID), 0.3)  # a retransmission's duplicate answer
    assert events(request) == [succeeded(request, RESPONSE, "udp", 0.2)]


def test_garbage_and_unusable_udp_answers_are_dropped_and_retransmission_goes_on() -> None:
    request = new_request()
    request.datagrams_to_send(0.0)
    bare_error = Message(
        message_class=MessageClass.ERROR, method=MediatorMethod.CONNECT, transaction_id=UDP_TID
    )
    missing_system = encode_message(request_message(UDP_TID).success_response())
    wrong_server = success(UDP_TID, ConnectResponse(server_id=OTHER_SERVER, system_id=SYSTEM))
    for datagram in (b"garbage", encode_message(bare_error), missing_system, wrong_server):
        request.datagram_received(datagram, 0.1)
    assert request.dropped_messages == 4
    assert not request.done
    assert len(request.datagrams_to_send(0.5)) == 1
    request.datagram_received(success(UDP_TID), 0.6)
    assert [type(e) for e in events(request)] == [ConnectSucceeded]


def test_a_system_id_request_accepts_any_server_of_that_system_only() -> None:
    request = new_request(system=True)
    other_system = ConnectResponse(server_id=OTHER_SERVER, system_id=OTHER_SERVER)
    request.datagram_received(success(UDP_TID, other_system), 0.1)
    assert request.dropped_messages == 1
    any_server = ConnectResponse(server_id=OTHER_SERVER, system_id=SYSTEM)
    request.datagram_received(success(UDP_TID, any_server), 0.2)
    assert events(request) == [succeeded(request, any_server, "udp", 0.2)]


# --- failures ----------------------------------------------------------------------------


def timeout_reason(request: ConnectRequest, now: float) -> ConnectFailed:
    request.handle_timer(now)
    (failed,) = events(request)
    assert isinstance(failed, ConnectFailed)
    assert failed.code is None
    return failed


def test_the_overall_timeout_says_what_happened_to_each_copy() -> None:
    request = new_request(timeout=10.0)
    now = 0.0
    for _ in range(20):  # bounded: a timer that does not move must fail, not hang
        request.datagrams_to_send(now)
        request.handle_timer(now)
        timer = request.get_timer()
        if timer is None or timer >= 10.0:
            break
        now = timer
    else:
        pytest.fail(f"the timer never reached the deadline: {request.get_timer()}")
    assert now == 7.5
    assert request.get_timer() == 10.0
    request.handle_timer(9.99)
    assert not request.done
    failed = timeout_reason(request, 10.0)
    assert failed == ConnectFailed(
        code=None,
        reason="timed out after 10.0 s (no answer over UDP after 5 requests; no answer over TCP)",
        elapsed=10.0,
    )
    assert_finished(request, 10.0)


def test_both_transports_failing_ends_the_request_before_the_timeout() -> None:
    request = new_request(timeout=60.0)
    request.tcp_connection_lost(1.0)
    assert not request.done
    assert request.tcp_data_to_send() == b""  # the copy has nowhere to go now
    now = 0.0
    for _ in range(20):  # bounded: a timer that does not move must fail, not hang
        request.datagrams_to_send(now)
        request.handle_timer(now)
        if (timer := request.get_timer()) is None:
            break
        now = timer
    assert request.done
    assert events(request) == [
        ConnectFailed(
            code=None,
            reason="no answer over UDP after 7 requests; TCP connection lost",
            elapsed=39.5,
        )
    ]


def test_tcp_lost_after_udp_gave_up_ends_the_request() -> None:
    request = new_request(timeout=60.0, rto=0.125)
    for now in (0.0, 0.125, 0.375, 0.875, 1.875, 3.875, 7.875):
        assert len(request.datagrams_to_send(now)) == 1
    request.handle_timer(9.875)
    assert not request.done  # TCP may still answer
    assert request.get_timer() == 60.0
    request.tcp_connection_lost(10.0)
    assert events(request) == [
        ConnectFailed(
            code=None,
            reason="no answer over UDP after 7 requests; TCP connection lost",
            elapsed=10.0,
        )
    ]


def test_a_late_udp_answer_after_the_udp_copy_gave_up_still_counts() -> None:
    request = new_request(timeout=60.0, rto=0.125)
    for now in (0.0, 0.125, 0.375, 0.875, 1.875, 3.875, 7.875):
        request.datagrams_to_send(now)
    request.handle_timer(9.875)
    request.datagram_received(success(UDP_TID), 10.0)
    assert [type(e) for e in events(request)] == [ConnectSucceeded]


def header(length: int) -> bytes:
    return struct.pack("!HHI12s", 0x0102, length, MAGIC_COOKIE, TCP_TID)


@pytest.mark.parametrize(
    ("stream", "why"),
    [
        (b"HTTP/1.1 403 Forbidden\r\n\r\n", "TCP: not STUN (the two leading bits"),
        (header(MAX_CONNECT_MESSAGE), f"TCP: a {MAX_CONNECT_MESSAGE + 20}-byte message is too"),
        (header(8) + b"\x40\x02\x00\x04abcd", "TCP: bad STUN message (SERVER-ID must be 16"),
        (
            encode_message(
                Message(
                    message_class=MessageClass.ERROR,
                    method=MediatorMethod.CONNECT,
                    transaction_id=TCP_TID,
                )
            ),
            "TCP: connect error response without ERROR-CODE",
        ),
        (
            encode_message(request_message(TCP_TID).success_response()),
            "TCP: malformed connect response (connect response is missing its ServerId",
        ),
    ],
)
def test_bad_tcp_bytes_fail_the_tcp_copy_only(stream: bytes, why: str) -> None:
    request = new_request(timeout=10.0)
    request.datagrams_to_send(0.0)
    request.tcp_data_received(stream, 0.1)
    assert not request.done
    assert request.buffered == 0
    request.tcp_data_received(success(TCP_TID), 0.2)  # the TCP copy is finished: ignored
    request.tcp_connection_lost(0.3)  # and losing it changes nothing more
    assert not request.done
    failed = timeout_reason(request, 10.0)
    assert failed.reason.startswith(
        "timed out after 10.0 s (no answer over UDP after 1 request; " + why
    )


def test_the_udp_copy_still_succeeds_after_the_tcp_copy_failed() -> None:
    request = new_request()
    request.tcp_data_received(b"\xff" * 20, 0.1)
    request.datagram_received(success(UDP_TID), 0.2)
    assert events(request) == [succeeded(request, RESPONSE, "udp", 0.2)]


def test_messages_that_are_not_our_answer_do_not_break_the_tcp_stream() -> None:
    request = new_request()
    indication = Message(
        message_class=MessageClass.INDICATION, method=0x103, transaction_id=TCP_TID
    )
    request.tcp_data_received(encode_message(indication) + success(TCP_TID), 0.4)
    assert request.dropped_messages == 1
    assert events(request) == [succeeded(request, RESPONSE, "tcp", 0.4)]


# --- connection_result and misuse --------------------------------------------------------


def test_connection_result_decodes_to_the_right_message() -> None:
    request = new_request()
    data = request.connection_result(ConnectionPath.UDP, 1234)
    message = decode_message(data)
    assert message.message_class is MessageClass.REQUEST
    assert message.transaction_id == b"\x04" * 12
    assert ConnectionResult.from_stun(message) == ConnectionResult(
        connect_session_id=SESSION_ID, path=ConnectionPath.UDP, duration_ms=1234
    )


def test_connection_result_refuses_what_it_cannot_encode() -> None:
    request = new_request()
    with pytest.raises(LocalProtocolError, match="unknown connection path"):
        request.connection_result(9, 1)
    with pytest.raises(LocalProtocolError, match="does not fit in 32 bits"):
        request.connection_result(ConnectionPath.TCP, -1)


@pytest.mark.parametrize(
    ("server_id", "system_id", "timings", "source", "message"),
    [
        (SERVER, SYSTEM, (10.0, 0.5), CountingBytes(), "exactly one"),
        (None, None, (10.0, 0.5), CountingBytes(), "exactly one"),
        (SERVER, None, (0.0, 0.5), CountingBytes(), "timeout must be positive"),
        (SERVER, None, (10.0, 0.0), CountingBytes(), "rto and ti must be positive"),
        (SERVER, None, (10.0, 0.5), lambda n: b"short", "wrong number of bytes"),
    ],
)
def test_misuse_is_refused_up_front(
    server_id: uuid.UUID | None,
    system_id: uuid.UUID | None,
    timings: tuple[float, float],
    source: CountingBytes,
    message: str,
) -> None:
    timeout, rto = timings
    with pytest.raises(LocalProtocolError, match=message):
        ConnectRequest(
            server_id=server_id,
            system_id=system_id,
            now=0.0,
            timeout=timeout,
            rto=rto,
            random_bytes=source,
        )


def test_the_connection_result_report_is_three_sends_given_up_at_two_and_a_half_seconds() -> None:
    session_id = bytes(range(16))
    transaction = connection_result_transaction(
        session_id, path=ConnectionPath.UDP, duration_ms=42, now=10.0
    )
    assert ConnectionResult.from_stun(decode_message(transaction.request)) == ConnectionResult(
        connect_session_id=session_id, path=ConnectionPath.UDP, duration_ms=42
    )
    sent_at = []
    now = 10.0
    while (timer := transaction.get_timer()) is not None:
        now = timer
        if transaction.messages_to_send(now):
            sent_at.append(now)
        transaction.handle_timer(now)
    assert sent_at == [10.0, 10.5, 11.5]
    assert isinstance(transaction.next_event(), TransactionTimedOut)
    assert now == 12.5
