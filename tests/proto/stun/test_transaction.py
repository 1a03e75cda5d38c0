"""ClientTransaction driven by a hand-moved clock: the RFC 8489 §6.2 schedules."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wavesync_proto.errors import LocalProtocolError
from wavesync_proto.stun import (
    BINDING,
    ClientTransaction,
    Message,
    MessageClass,
    ResponseReceived,
    TransactionTimedOut,
    XorMappedAddress,
    encode_message,
)

TID = bytes(range(12))
REQUEST = Message(message_class=MessageClass.REQUEST, method=BINDING, transaction_id=TID)
REQUEST_BYTES = encode_message(REQUEST)


def run_to_completion(transaction: ClientTransaction) -> tuple[list[float], float]:
    """Jump the clock from timer to timer; return the send times and the failure time."""
    sends: list[float] = []
    now = 0.0
    while True:
        sends.extend(now for _ in transaction.messages_to_send(now))
        transaction.handle_timer(now)
        event = transaction.next_event()
        if event is not None:
            assert isinstance(event, TransactionTimedOut)
            return sends, now
        timer = transaction.get_timer()
        assert timer is not None
        now = timer


def test_udp_schedule_matches_the_rfc_worked_example() -> None:
    # RFC 8489 §6.2.1: "a request would be sent at times 0 ms, 500 ms, 1500 ms, 3500 ms,
    # 7500 ms, 15500 ms, and 31500 ms. If the client has not received a response after
    # 39500 ms, the client will consider the transaction to have timed out."
    sends, failed_at = run_to_completion(ClientTransaction(REQUEST_BYTES, now=0.0))
    assert [round(t * 1000) for t in sends] == [0, 500, 1500, 3500, 7500, 15500, 31500]
    assert round(failed_at * 1000) == 39500


def test_tcp_sends_once_and_fails_after_ti() -> None:
    sends, failed_at = run_to_completion(ClientTransaction(REQUEST_BYTES, now=0.0, reliable=True))
    assert sends == [0.0]
    assert failed_at == 39.5


def test_timeout_event_counts_attempts_and_elapsed_time() -> None:
    transaction = ClientTransaction(REQUEST_BYTES, now=100.0, rto=0.1, rc=3, rm=2)
    for now in (100.0, 100.1, 100.3):
        assert transaction.messages_to_send(now) == [REQUEST_BYTES]
    assert transaction.get_timer() == pytest.approx(100.5)
    transaction.handle_timer(100.49)
    assert transaction.next_event() is None
    transaction.handle_timer(100.5)
    event = transaction.next_event()
    assert isinstance(event, TransactionTimedOut)
    assert event.attempts == 3
    assert event.elapsed == pytest.approx(0.5)
    assert transaction.done
    assert transaction.get_timer() is None
    assert transaction.next_event() is None


def test_nothing_is_sent_before_its_time() -> None:
    transaction = ClientTransaction(REQUEST_BYTES, now=0.0)
    assert transaction.messages_to_send(0.0) == [REQUEST_BYTES]
    assert transaction.messages_to_send(0.0) == []
    assert transaction.messages_to_send(0.499) == []
    assert transaction.messages_to_send(0.5) == [REQUEST_BYTES]
    assert transaction.attempts == 2


def test_a_late_caller_gets_one_send_and_the_schedule_keeps_its_end() -> None:
    transaction = ClientTransaction(REQUEST_BYTES, now=0.0)
    transaction.messages_to_send(0.0)
    # Waking at 4 s: the 0.5, 1.5 and 3.5 s slots are all due; send once, not three times.
    assert transaction.messages_to_send(4.0) == [REQUEST_BYTES]
    assert transaction.attempts == 4
    assert transaction.get_timer() == 7.5


def test_a_response_ends_the_transaction() -> None:
    transaction = ClientTransaction(REQUEST_BYTES, now=10.0)
    transaction.messages_to_send(10.0)
    transaction.messages_to_send(10.5)
    response = REQUEST.success_response(XorMappedAddress(("192.0.2.1", 4000)))
    assert transaction.receive_response(response, 10.7)
    event = transaction.next_event()
    assert isinstance(event, ResponseReceived)
    assert (event.message, event.attempts) == (response, 2)
    assert event.elapsed == pytest.approx(0.7)
    assert transaction.get_timer() is None
    assert transaction.messages_to_send(11.5) == []
    # A duplicate (a retransmission's answer) no longer counts.
    assert not transaction.receive_response(response, 10.8)
    assert transaction.next_event() is None


def test_error_responses_end_the_transaction_too() -> None:
    transaction = ClientTransaction(REQUEST_BYTES, now=0.0)
    transaction.messages_to_send(0.0)
    response = REQUEST.error_response(400, "Bad Request")
    assert transaction.receive_response(response, 0.1)
    event = transaction.next_event()
    assert isinstance(event, ResponseReceived)
    assert event.message.error_code is not None
    assert event.message.error_code.code == 400


@pytest.mark.parametrize(
    "message",
    [
        Message(message_class=MessageClass.SUCCESS, method=BINDING, transaction_id=bytes(12)),
        Message(message_class=MessageClass.REQUEST, method=BINDING, transaction_id=TID),
        Message(message_class=MessageClass.INDICATION, method=BINDING, transaction_id=TID),
    ],
    ids=["other transaction", "request", "indication"],
)
def test_messages_that_are_not_our_response_are_refused(message: Message) -> None:
    transaction = ClientTransaction(REQUEST_BYTES, now=0.0)
    assert not transaction.receive_response(message, 0.1)
    assert not transaction.done
    assert transaction.next_event() is None


def test_a_response_after_the_timeout_is_refused() -> None:
    transaction = ClientTransaction(REQUEST_BYTES, now=0.0, rc=1, rm=1)
    transaction.messages_to_send(0.0)
    transaction.handle_timer(0.5)
    assert not transaction.receive_response(REQUEST.success_response(), 0.6)
    assert isinstance(transaction.next_event(), TransactionTimedOut)


@pytest.mark.parametrize(
    ("request_bytes", "options", "error"),
    [
        (b"not stun", {}, "needs an encoded STUN request"),
        (encode_message(REQUEST.success_response()), {}, "needs an encoded STUN request"),
        (REQUEST_BYTES, {"rto": 0.0}, "rto and ti must be positive"),
        (REQUEST_BYTES, {"ti": -1.0}, "rto and ti must be positive"),
        (REQUEST_BYTES, {"rc": 0}, "rc and rm must be at least 1"),
        (REQUEST_BYTES, {"rm": 0}, "rc and rm must be at least 1"),
    ],
)
def test_misuse_is_a_local_error(
    request_bytes: bytes, options: dict[str, float], error: str
) -> None:
    with pytest.raises(LocalProtocolError, match=error):
        ClientTransaction(request_bytes, now=0.0, **options)  # type: ignore[arg-type]


@pytest.mark.property
@given(
    rto=st.floats(min_value=0.001, max_value=10.0),
    rc=st.integers(min_value=1, max_value=12),
    rm=st.integers(min_value=1, max_value=32),
    start=st.floats(min_value=0.0, max_value=1e6),
)
def test_schedule_shape_for_any_parameters(rto: float, rc: int, rm: int, start: float) -> None:
    transaction = ClientTransaction(REQUEST_BYTES, now=start, rto=rto, rc=rc, rm=rm)
    sends: list[float] = []
    now = start
    while not transaction.done:
        sends.extend(now for _ in transaction.messages_to_send(now))
        transaction.handle_timer(now)
        timer = transaction.get_timer()
        if timer is not None:
            assert timer >= now  # time never runs backwards
            now = timer
    assert len(sends) == rc
    gaps = [b - a for a, b in itertools.pairwise(sends)]
    for k, gap in enumerate(gaps):
        assert gap == pytest.approx(rto * 2**k, rel=1e-6, abs=1e-6)
    assert now - sends[-1] == pytest.approx(rm * rto, rel=1e-6, abs=1e-6)
