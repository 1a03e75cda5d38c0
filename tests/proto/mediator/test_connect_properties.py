"""Hypothesis properties of ConnectRequest: one event, nothing after it, and a bounded end.

Every loop here is bounded: a request whose timer does not move must fail a test, not hang it.
"""

from __future__ import annotations

import itertools
import struct
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wavesync_proto.mediator import ConnectResponse, MediatorMethod
from wavesync_proto.mediator.connect import (
    MAX_CONNECT_MESSAGE,
    ConnectEvent,
    ConnectFailed,
    ConnectRequest,
    ConnectSucceeded,
)
from wavesync_proto.stun import (
    MAGIC_COOKIE,
    Message,
    MessageClass,
    encode_message,
    peek_header,
)
from wavesync_proto.stun.transaction import DEFAULT_RC, DEFAULT_RM

from .test_connect import (
    OTHER_SERVER,
    SERVER,
    SYSTEM,
    TCP_TID,
    UDP_TID,
    CountingBytes,
    error,
    events,
    new_request,
    request_message,
    success,
)

FOREIGN_TIDS = (b"x" * 12, b"\x04" * 12, b"\x00" * 12)
NOT_STUN = "TCP: not STUN"


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in itertools.pairwise([0, *points, len(data)])]


def framed(message_type: int, transaction_id: bytes, body: bytes) -> bytes:
    """A STUN header that frames correctly around an arbitrary (padded) body."""
    body += bytes(-len(body) % 4)
    return struct.pack("!HHI12s", message_type, len(body), MAGIC_COOKIE, transaction_id) + body


MESSAGE_TYPES = st.sampled_from([0x0112, 0x0102, 0x0103]) | st.integers(0, 0x3FFF)
STUN_ISH = st.builds(
    framed,
    MESSAGE_TYPES,
    st.sampled_from([UDP_TID, TCP_TID, *FOREIGN_TIDS]),
    st.binary(max_size=80),
)
# Well-framed messages with somebody else's transaction id: never an answer to us.
FOREIGN = st.builds(framed, MESSAGE_TYPES, st.sampled_from(FOREIGN_TIDS), st.binary(max_size=80))
BARE_ERROR = encode_message(
    Message(message_class=MessageClass.ERROR, method=MediatorMethod.CONNECT, transaction_id=TCP_TID)
)
# Every kind of answer a TCP copy can get: good, refused, unusable.
TCP_ANSWERS = st.sampled_from(
    [
        success(TCP_TID),
        error(TCP_TID),
        error(TCP_TID, 508, "Insufficient Capacity"),
        success(TCP_TID, ConnectResponse(server_id=OTHER_SERVER, system_id=SYSTEM)),
        encode_message(request_message(TCP_TID).success_response()),
        BARE_ERROR,
    ]
)


def same_cause(event: ConnectEvent) -> ConnectEvent:
    """``event`` without the STUN decoder's detail of why the TCP bytes are not STUN.

    The decoder refuses a header as early as it can (the leading bits from the first byte,
    the cookie from the fifth), so the detail names what the bytes seen so far broke.
    """
    if isinstance(event, ConnectFailed) and NOT_STUN in event.reason:
        head, _, tail = event.reason.partition(NOT_STUN)
        return ConnectFailed(
            code=event.code, reason=head + NOT_STUN + tail[tail.index(")") :], elapsed=event.elapsed
        )
    return event


def tcp_outcome(chunks: list[bytes]) -> tuple[object, ...]:
    """All a request shows after reading ``chunks`` over TCP, and after its timeout."""
    request = new_request(timeout=10.0)
    request.datagrams_to_send(0.0)
    for chunk in chunks:
        request.tcp_data_received(chunk, 1.0)
    seen = (events(request), request.done, request.dropped_messages, request.buffered)
    request.handle_timer(10.0)  # the timeout names what happened to the TCP copy, if it failed
    return (*seen, [same_cause(e) for e in events(request)])


# --- chunking ----------------------------------------------------------------------------


@pytest.mark.property
@given(cuts=st.lists(st.integers(min_value=0), max_size=20), answer_ok=st.booleans())
def test_any_chunking_of_the_tcp_answer_gives_the_same_event(
    cuts: list[int], answer_ok: bool
) -> None:
    foreign = Message(message_class=MessageClass.INDICATION, method=0x105, transaction_id=TCP_TID)
    answer = success(TCP_TID) if answer_ok else error(TCP_TID)
    stream = encode_message(foreign) + answer
    whole = new_request()
    whole.tcp_data_received(stream, 1.0)
    chunked = new_request()
    for chunk in split(stream, cuts):
        chunked.tcp_data_received(chunk, 1.0)
    expected = events(whole)
    assert len(expected) == 1
    assert events(chunked) == expected
    assert chunked.dropped_messages == whole.dropped_messages == 1


@pytest.mark.property
@given(
    before=st.lists(FOREIGN | STUN_ISH | st.binary(max_size=30), max_size=5),
    answer=TCP_ANSWERS,
    after=st.lists(TCP_ANSWERS | st.binary(max_size=30), max_size=3),
    cuts=st.lists(st.integers(min_value=0), max_size=30),
)
def test_any_chunking_of_any_tcp_stream_gives_the_same_outcome(
    before: list[bytes], answer: bytes, after: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join([*before, answer, *after])
    whole = tcp_outcome([stream])
    assert tcp_outcome(split(stream, cuts)) == whole
    # Exactly one event in all: the answer, a failure of the TCP copy, or the timeout.
    first, _, _, _, last = whole
    assert len(first) + len(last) == 1  # type: ignore[arg-type]


# --- garbage -----------------------------------------------------------------------------


@pytest.mark.property
@given(
    inputs=st.lists(
        st.tuples(
            st.sampled_from(["udp", "tcp", "time", "lost"]), st.binary(max_size=64) | STUN_ISH
        ),
        max_size=30,
    )
)
def test_arbitrary_input_never_raises_and_gives_at_most_one_event(
    inputs: list[tuple[str, bytes]],
) -> None:
    request = new_request()
    now = 0.0
    for kind, data in inputs:
        now += 0.5
        if kind == "udp":
            request.datagram_received(data, now)
        elif kind == "tcp":
            request.tcp_data_received(data, now)
        elif kind == "lost":
            request.tcp_connection_lost(now)
        else:
            request.handle_timer(now)
        request.datagrams_to_send(now)
        assert request.buffered < MAX_CONNECT_MESSAGE
    assert len(events(request)) == (1 if request.done else 0)


def not_ours(datagram: bytes) -> bool:
    header = peek_header(datagram)
    return header is None or header[2] != UDP_TID


@pytest.mark.property
@given(
    datagrams=st.lists(
        FOREIGN | st.binary(max_size=600).filter(not_ours) | st.sampled_from([success(TCP_TID)]),
        max_size=30,
    ),
    system=st.booleans(),
)
def test_datagrams_that_are_not_our_answer_never_end_the_request(
    datagrams: list[bytes], system: bool
) -> None:
    request = new_request(system=system)
    request.datagrams_to_send(0.0)
    for datagram in datagrams:
        request.datagram_received(datagram, 0.5)
    assert not request.done
    assert events(request) == []
    assert request.dropped_messages == len(datagrams)
    assert request.buffered == 0
    assert request.get_timer() == 0.5  # the retransmission schedule is untouched
    # The real answer still gets through.
    request.datagram_received(success(UDP_TID), 0.75)
    (event,) = events(request)
    assert isinstance(event, ConnectSucceeded)
    assert event.via == "udp"


# --- one event, then silence ---------------------------------------------------------------

UDP_DATA = st.sampled_from([success(UDP_TID), error(UDP_TID), success(TCP_TID)]) | STUN_ISH
TCP_DATA = TCP_ANSWERS | STUN_ISH | st.binary(max_size=30)
STEPS = st.one_of(
    st.tuples(st.just("udp"), UDP_DATA),
    st.tuples(st.just("tcp"), TCP_DATA),
    st.tuples(st.sampled_from(["lost", "fire", "send", "send_tcp"]), st.just(b"")),
    st.tuples(st.just("wait"), st.floats(0.0, 5.0).map(lambda dt: struct.pack("!d", dt))),
)


@pytest.mark.property
@given(
    start=st.floats(0.0, 1e6),
    timeout=st.floats(0.01, 60.0),
    steps=st.lists(STEPS, max_size=40),
)
def test_exactly_one_event_and_nothing_is_sent_after_it(
    start: float, timeout: float, steps: list[tuple[str, bytes]]
) -> None:
    request = ConnectRequest(
        server_id=SERVER, now=start, timeout=timeout, random_bytes=CountingBytes()
    )
    now, seen, done_at = start, list[ConnectEvent](), None

    def check() -> None:
        nonlocal done_at
        seen.extend(events(request))
        assert len(seen) == (1 if request.done else 0)
        if request.done:
            done_at = now if done_at is None else done_at
            event = seen[0]
            assert isinstance(event, ConnectSucceeded | ConnectFailed)
            assert event.elapsed == done_at - start
            assert request.get_timer() is None
            assert request.datagrams_to_send(now + 1e3) == []
            assert request.tcp_data_to_send() == b""
            assert request.buffered == 0

    for kind, data in steps:
        if kind == "udp":
            request.datagram_received(data, now)
        elif kind == "tcp":
            request.tcp_data_received(data, now)
        elif kind == "lost":
            request.tcp_connection_lost(now)
        elif kind == "send":
            request.datagrams_to_send(now)
        elif kind == "send_tcp":
            request.tcp_data_to_send()
        elif kind == "wait":
            now += struct.unpack("!d", data)[0]
        elif (deadline := request.get_timer()) is not None:  # fire
            now = max(now, deadline)
            request.handle_timer(now)
        check()
    # Whatever happened, firing the timers ends the request, with its one event.
    for _ in range(DEFAULT_RC + 3):
        if request.done:
            break
        deadline = request.get_timer()
        assert deadline is not None
        now = max(now, deadline)
        request.datagrams_to_send(now)
        request.handle_timer(now)
        check()
    else:
        pytest.fail(f"not done after {DEFAULT_RC + 3} timer firings: {request.get_timer()}")
    assert len(seen) == 1


# --- the timers end the request by its timeout ---------------------------------------------


@pytest.mark.property
@given(
    start=st.floats(0.0, 1e6),
    timeout=st.floats(0.01, 120.0),
    rto=st.floats(0.01, 5.0),
    tcp_lost_after=st.none() | st.floats(0.0, 130.0),
)
def test_firing_the_timers_ends_the_request_by_its_timeout(
    start: float, timeout: float, rto: float, tcp_lost_after: float | None
) -> None:
    request = ConnectRequest(
        system_id=SYSTEM, now=start, timeout=timeout, rto=rto, random_bytes=CountingBytes()
    )
    deadline = start + timeout
    lost_at = None if tcp_lost_after is None else start + tcp_lost_after
    # When the UDP copy gives up, computed as ClientTransaction does (RFC 8489 §6.2.1).
    udp_gives_up = start + rto * (2 ** (DEFAULT_RC - 1) - 1) + DEFAULT_RM * rto
    now, sends = start, 0
    # Rc sends, the UDP give-up, the TCP loss and the deadline: a few firings at most.
    for _ in range(DEFAULT_RC + 4):
        if lost_at is not None and now >= lost_at:
            request.tcp_connection_lost(now)
            lost_at = None
        sends += len(request.datagrams_to_send(now))
        request.handle_timer(now)  # exactly at the deadline: that must be enough
        if request.done:
            break
        timer = request.get_timer()
        assert timer is not None
        assert timer > now, f"the timer stays at {timer} after handle_timer({now})"
        assert timer <= deadline
        now = timer if lost_at is None else min(timer, lost_at)
    else:
        pytest.fail(f"not done after {DEFAULT_RC + 4} firings; timer {request.get_timer()}")
    (failed,) = events(request)
    assert isinstance(failed, ConnectFailed)
    assert failed.code is None
    assert now <= deadline
    assert failed.elapsed == now - start
    assert 1 <= sends <= DEFAULT_RC
    # Both copies failed: the request ends when the later of them did, or at the deadline.
    lost = None if tcp_lost_after is None else start + tcp_lost_after
    assert now == (deadline if lost is None else min(deadline, max(lost, udp_gives_up)))
    if now < deadline:
        assert failed.reason.endswith("; TCP connection lost")
    elif lost is None or lost > deadline:  # (a loss at the deadline itself may come first)
        assert failed.reason.startswith(f"timed out after {timeout} s")


IDS = st.sampled_from([SERVER, SYSTEM, OTHER_SERVER]) | st.uuids()


@pytest.mark.property
@given(server_id=IDS, system_id=IDS, system=st.booleans(), via_tcp=st.booleans())
def test_only_the_server_or_system_asked_for_is_accepted(
    server_id: uuid.UUID, system_id: uuid.UUID, system: bool, via_tcp: bool
) -> None:
    request = new_request(system=system)
    answer = ConnectResponse(server_id=server_id, system_id=system_id)
    if via_tcp:
        request.tcp_data_received(success(TCP_TID, answer), 0.5)
    else:
        request.datagram_received(success(UDP_TID, answer), 0.5)
    wanted = system_id == SYSTEM if system else server_id == SERVER
    assert request.done == wanted
    assert [type(e) for e in events(request)] == ([ConnectSucceeded] if wanted else [])
