"""Hypothesis properties of LAN discovery: no input makes either side raise or amplify.

Every loop here is bounded: a search whose timer does not move must fail a test, not hang it.
"""

from __future__ import annotations

import struct
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wavesync_proto.addresses import Endpoint
from wavesync_proto.discovery import (
    AMPLIFICATION_FACTOR,
    MAX_ENDPOINTS,
    DiscoveryResponder,
    DiscoverySearch,
    SearchAnswer,
    SearchFinished,
    SearchRequest,
    ServerFound,
    answer_size,
    encode_search_request,
)
from wavesync_proto.mediator import MediatorMethod
from wavesync_proto.stun import (
    MAGIC_COOKIE,
    Message,
    MessageClass,
    RawAttribute,
    decode_message,
    encode_message,
)

from .test_discovery import AGENT, CLIENT, ENDPOINTS, SERVER, SYSTEM, TID, answer, events


def framed(message_type: int, transaction_id: bytes, body: bytes) -> bytes:
    """A STUN header that frames correctly around an arbitrary (padded) body."""
    body += bytes(-len(body) % 4)
    return struct.pack("!HHI12s", message_type, len(body), MAGIC_COOKIE, transaction_id) + body


# 0x0408 search request, 0x0508 search success, 0x0518 search error, 0x0418 indication.
MESSAGE_TYPES = st.sampled_from([0x0408, 0x0508, 0x0518, 0x0418]) | st.integers(0, 0x3FFF)
TIDS = st.sampled_from([TID, b"\x00" * 12]) | st.binary(min_size=12, max_size=12)
STUN_ISH = st.builds(framed, MESSAGE_TYPES, TIDS, st.binary(max_size=120))
IPV4 = st.ip_addresses(v=4).map(str)
IPV6 = st.ip_addresses(v=6).map(str)
ENDPOINT = st.tuples(IPV4 | IPV6, st.integers(1, 65535))
ENDPOINT_LISTS = st.lists(ENDPOINT, max_size=MAX_ENDPOINTS)
DATAGRAMS = (
    st.binary(max_size=700)
    | STUN_ISH
    | st.sampled_from(
        [
            answer(),
            answer(endpoints=()),
            encode_search_request(SearchRequest(server_id=SERVER), TID),
        ]
    )
)


@pytest.mark.property
@given(datagrams=st.lists(DATAGRAMS, max_size=20), system=st.booleans())
def test_the_search_never_raises_on_arbitrary_datagrams(
    datagrams: list[bytes], system: bool
) -> None:
    if system:
        search = DiscoverySearch(system_id=SYSTEM, transaction_id=TID, now=0.0)
    else:
        search = DiscoverySearch(server_id=SERVER, transaction_id=TID, now=0.0)
    for index, datagram in enumerate(datagrams):
        search.receive_datagram(datagram, AGENT, index * 0.01)
    found = events(search)
    # Time stays before the deadline: only a search by server id can have finished, on the
    # one answer that counts.
    assert search.done == (not system and len(found) == 2)
    if search.done:
        assert isinstance(found[-1], SearchFinished)
        found = found[:-1]
    for event in found:
        assert isinstance(event, ServerFound)
        assert event.endpoints
        assert (event.server_id, event.system_id) == (SERVER, SYSTEM)


@pytest.mark.property
@given(datagrams=st.lists(DATAGRAMS, max_size=20))
def test_the_responder_never_raises_on_arbitrary_datagrams(datagrams: list[bytes]) -> None:
    responder = DiscoveryResponder(system_id=SYSTEM, server_id=SERVER, endpoints=ENDPOINTS)
    for datagram in datagrams:
        for data, destination in responder.receive_datagram(datagram, CLIENT, 0.0):
            assert destination == CLIENT
            assert len(data) <= AMPLIFICATION_FACTOR * len(datagram)
    counters = responder.counters
    total = (
        counters.answered
        + counters.rate_limited
        + counters.malformed
        + counters.ignored
        + counters.not_for_us
        + counters.no_endpoints
    )
    assert total == len(datagrams)  # every datagram is accounted for exactly once


@pytest.mark.property
@given(
    server_id=st.uuids(),
    system_id=st.uuids(),
    endpoints=ENDPOINT_LISTS,
    transaction_id=st.binary(min_size=12, max_size=12),
    by_system=st.booleans(),
)
def test_requests_and_answers_round_trip(
    server_id: uuid.UUID,
    system_id: uuid.UUID,
    endpoints: list[Endpoint],
    transaction_id: bytes,
    by_system: bool,
) -> None:
    request = (
        SearchRequest(system_id=system_id) if by_system else SearchRequest(server_id=server_id)
    )
    sent = decode_message(encode_search_request(request, transaction_id))
    assert sent.transaction_id == transaction_id
    assert SearchRequest.from_stun(sent) == request
    found = SearchAnswer(server_id=server_id, system_id=system_id, endpoints=tuple(endpoints))
    data = encode_message(found.to_stun(transaction_id))
    assert len(data) == answer_size(endpoints)
    assert SearchAnswer.from_stun(decode_message(data)) == found


def request_with(extra: int, padding: int | None, by_system: bool) -> bytes:
    """A search request with ``extra`` bytes of an unknown optional attribute, maybe padded."""
    request = SearchRequest(system_id=SYSTEM) if by_system else SearchRequest(server_id=SERVER)
    if padding is not None:
        return encode_search_request(request, TID)
    message = request.to_stun(TID)
    attributes = message.attributes
    if extra:
        attributes = (*attributes, RawAttribute(0xC0FF, bytes(extra)))
    return encode_message(
        Message(
            message_class=MessageClass.REQUEST,
            method=MediatorMethod.SEARCH,
            transaction_id=TID,
            attributes=attributes,
        )
    )


@pytest.mark.property
@given(
    endpoints=ENDPOINT_LISTS.filter(bool),
    extra=st.integers(0, 400),
    padded=st.booleans(),
    by_system=st.booleans(),
)
def test_the_responder_never_answers_more_than_3x_the_request(
    endpoints: list[Endpoint], extra: int, padded: bool, by_system: bool
) -> None:
    responder = DiscoveryResponder(system_id=SYSTEM, server_id=SERVER, endpoints=endpoints)
    request = request_with(extra, 0 if padded else None, by_system)
    ((data, _),) = responder.receive_datagram(request, CLIENT, 0.0)
    assert len(data) <= AMPLIFICATION_FACTOR * len(request)
    sent = SearchAnswer.from_stun(decode_message(data)).endpoints
    # The endpoints sent are the most preferred ones: a prefix, never empty, and the
    # longest prefix that fits.
    assert sent == tuple(endpoints[: len(sent)])
    assert sent
    if len(sent) < len(endpoints):
        assert answer_size(endpoints[: len(sent) + 1]) > AMPLIFICATION_FACTOR * len(request)
    if padded:
        assert len(sent) == len(endpoints)


STEPS = st.one_of(
    st.tuples(st.just("datagram"), DATAGRAMS),
    st.tuples(st.sampled_from(["fire", "send"]), st.just(b"")),
    st.tuples(st.just("wait"), st.floats(0.0, 0.5).map(lambda dt: struct.pack("!d", dt))),
)


@pytest.mark.property
@given(
    start=st.floats(0.0, 1e6),
    timeout=st.floats(0.01, 10.0),
    steps=st.lists(STEPS, max_size=30),
    system=st.booleans(),
)
def test_one_search_finished_last_and_by_the_timeout(
    start: float, timeout: float, steps: list[tuple[str, bytes]], system: bool
) -> None:
    if system:
        search = DiscoverySearch(system_id=SYSTEM, transaction_id=TID, now=start, timeout=timeout)
    else:
        search = DiscoverySearch(server_id=SERVER, transaction_id=TID, now=start, timeout=timeout)
    now, seen, sends = start, list[ServerFound | SearchFinished](), 0
    for kind, data in steps:
        if kind == "datagram":
            search.receive_datagram(data, AGENT, now)
        elif kind == "send":
            sends += len(search.datagrams_to_send(now))
        elif kind == "wait":
            now += struct.unpack("!d", data)[0]
        elif (deadline := search.get_timer()) is not None:  # fire
            now = max(now, deadline)
            search.handle_timer(now)
        seen.extend(events(search))
    for _ in range(6):  # four sends and the deadline at most
        if search.done:
            break
        deadline = search.get_timer()
        assert deadline is not None
        assert deadline <= start + timeout
        now = max(now, deadline)
        sends += len(search.datagrams_to_send(now))
        search.handle_timer(now)
    else:
        pytest.fail(f"not done after six timer firings: {search.get_timer()}")
    seen.extend(events(search))
    finished = [e for e in seen if isinstance(e, SearchFinished)]
    assert len(finished) == 1
    assert seen[-1] is finished[0]
    assert finished[0].found == len(seen) - 1
    deadline_after = (start + timeout) - start
    if finished[0].found and not system:  # found early
        assert finished[0].elapsed < deadline_after
    else:
        assert finished[0].elapsed >= deadline_after
    assert sends <= 4
    assert search.get_timer() is None
    assert search.datagrams_to_send(now + 100.0) == []
