"""LAN discovery driven in memory: the search's schedule and filters, the responder's answers."""

from __future__ import annotations

import uuid

import pytest

from wavesync_proto.addresses import Endpoint
from wavesync_proto.discovery import (
    DEFAULT_GROUP,
    MAX_SERVERS_FOUND,
    SEARCH_REQUEST_SIZE,
    DiscoveryResponder,
    DiscoverySearch,
    ResponderCounters,
    SearchAnswer,
    SearchFinished,
    SearchRequest,
    ServerFound,
    answer_size,
    encode_search_request,
)
from wavesync_proto.errors import LocalProtocolError
from wavesync_proto.mediator import MediatorMessageError, MediatorMethod
from wavesync_proto.mediator.attributes import LocalEndpoint, ServerId, SystemId
from wavesync_proto.mediator.connect import PADDING_ATTRIBUTE
from wavesync_proto.stun import Message, MessageClass, RawAttribute, decode_message, encode_message

SYSTEM = uuid.UUID("04f5a9ea-3cb8-44b0-bb62-401b420701de")
OTHER_SYSTEM = uuid.UUID("5d0c7e31-8a4f-4b2e-9c61-7f3e2a1b0c9d")
SERVER = uuid.UUID("9b2f4c0e-1d7a-4e63-8a55-0c3f6b1e2d44")
SERVER_B = uuid.UUID("2c9d8e7f-6a5b-4c3d-8e2f-1a0b9c8d7e6f")
OTHER_SERVER = uuid.UUID("11111111-2222-4333-8444-555555555555")
TID = b"\x07" * 12
OTHER_TID = b"\x08" * 12
CLIENT: Endpoint = ("192.168.1.20", 50000)
AGENT: Endpoint = ("192.168.1.10", DEFAULT_GROUP[1])
AGENT_B: Endpoint = ("192.168.1.11", DEFAULT_GROUP[1])
ENDPOINTS: tuple[Endpoint, ...] = (("192.168.1.10", 8000), ("fd00::10", 8000))
ANY_V4 = "0.0.0.0"  # noqa: S104 - an answered endpoint, never bound here


def new_search(
    *, system: bool = False, timeout: float = 1.0, now: float = 0.0, tid: bytes = TID
) -> DiscoverySearch:
    if system:
        return DiscoverySearch(system_id=SYSTEM, transaction_id=tid, now=now, timeout=timeout)
    return DiscoverySearch(server_id=SERVER, transaction_id=tid, now=now, timeout=timeout)


def answer(
    *,
    server_id: uuid.UUID = SERVER,
    system_id: uuid.UUID = SYSTEM,
    endpoints: tuple[Endpoint, ...] = ENDPOINTS,
    tid: bytes = TID,
) -> bytes:
    found = SearchAnswer(server_id=server_id, system_id=system_id, endpoints=endpoints)
    return encode_message(found.to_stun(tid))


def events(search: DiscoverySearch) -> list[ServerFound | SearchFinished]:
    found: list[ServerFound | SearchFinished] = []
    for _ in range(MAX_SERVERS_FOUND + 2):  # bounded: more than that is a bug, not a wait
        event = search.next_event()
        if event is None:
            break
        found.append(event)
    return found


def assert_finished(search: DiscoverySearch, now: float) -> None:
    """A finished search sends nothing, wants no timer and ignores even a good answer."""
    assert search.done
    assert search.get_timer() is None
    assert search.datagrams_to_send(now + 100.0) == []
    search.receive_datagram(answer(server_id=SERVER_B), AGENT_B, now)
    search.handle_timer(now + 100.0)
    assert search.next_event() is None


def new_responder(*, per_source_rate: float = 10.0, burst: int = 20) -> DiscoveryResponder:
    return DiscoveryResponder(
        system_id=SYSTEM,
        server_id=SERVER,
        endpoints=ENDPOINTS,
        per_source_rate=per_source_rate,
        burst=burst,
    )


def search_datagram(
    *, server_id: uuid.UUID | None = SERVER, system_id: uuid.UUID | None = None
) -> bytes:
    return encode_search_request(SearchRequest(server_id=server_id, system_id=system_id), TID)


# --- messages ------------------------------------------------------------------------------


def test_the_request_is_padded_to_576_bytes_and_exact() -> None:
    datagram = search_datagram()
    assert len(datagram) == SEARCH_REQUEST_SIZE == 576
    expected = Message(
        message_class=MessageClass.REQUEST,
        method=MediatorMethod.SEARCH,
        transaction_id=TID,
        # 20 header + 20 SERVER-ID + 4 PADDING header = 44; the rest is zero filler.
        attributes=(ServerId(SERVER), RawAttribute(PADDING_ATTRIBUTE, bytes(576 - 44))),
    )
    assert datagram == encode_message(expected)
    assert datagram[:2] == b"\x04\x08"  # method 0x108, class request (RFC 8489 §5)
    assert SearchRequest.from_stun(decode_message(datagram)) == SearchRequest(server_id=SERVER)
    by_system = decode_message(search_datagram(server_id=None, system_id=SYSTEM))
    assert SearchRequest.from_stun(by_system) == SearchRequest(system_id=SYSTEM)


def test_a_request_names_exactly_one_target() -> None:
    with pytest.raises(LocalProtocolError, match="exactly one"):
        SearchRequest()
    with pytest.raises(LocalProtocolError, match="exactly one"):
        SearchRequest(server_id=SERVER, system_id=SYSTEM)
    for attributes in ((), (ServerId(SERVER), SystemId(SYSTEM))):
        message = Message(
            message_class=MessageClass.REQUEST,
            method=MediatorMethod.SEARCH,
            transaction_id=TID,
            attributes=attributes,
        )
        with pytest.raises(MediatorMessageError, match="exactly one of SERVER-ID and SYSTEM-ID"):
            SearchRequest.from_stun(message)


def test_the_answer_round_trips_and_is_exact() -> None:
    data = answer()
    assert data[:2] == b"\x05\x08"  # method 0x108, class success
    assert len(data) == answer_size(ENDPOINTS) == 20 + 20 + 20 + 12 + 24
    assert SearchAnswer.from_stun(decode_message(data)) == SearchAnswer(
        server_id=SERVER, system_id=SYSTEM, endpoints=ENDPOINTS
    )


def test_parsers_name_what_is_wrong() -> None:
    def message(
        attributes: tuple[object, ...], message_class: MessageClass = MessageClass.SUCCESS
    ) -> Message:
        return Message(
            message_class=message_class,
            method=MediatorMethod.SEARCH,
            transaction_id=TID,
            attributes=attributes,  # type: ignore[arg-type]
        )

    with pytest.raises(MediatorMessageError, match="must carry SERVER-ID and SYSTEM-ID"):
        SearchAnswer.from_stun(message((ServerId(SERVER),)))
    many = tuple(LocalEndpoint(("10.0.0.1", 1000 + i)) for i in range(17))
    with pytest.raises(MediatorMessageError, match="17 LOCAL-ENDPOINTs, at most 16"):
        SearchAnswer.from_stun(message((ServerId(SERVER), SystemId(SYSTEM), *many)))
    with pytest.raises(MediatorMessageError, match="expected method 0x108 SUCCESS, got 0x108 REQ"):
        SearchAnswer.from_stun(message((ServerId(SERVER), SystemId(SYSTEM)), MessageClass.REQUEST))
    unknown = (ServerId(SERVER), RawAttribute(0x7F00, b"x"))
    with pytest.raises(MediatorMessageError, match=r"unknown comprehension-required .* 0x7f00"):
        SearchRequest.from_stun(message(unknown, MessageClass.REQUEST))
    with pytest.raises(LocalProtocolError, match="at most 16 endpoints"):
        SearchAnswer(server_id=SERVER, system_id=SYSTEM, endpoints=(("10.0.0.1", 1),) * 17)


# --- the search's schedule -----------------------------------------------------------------


def run_schedule(search: DiscoverySearch, start: float) -> tuple[list[float], float]:
    """Follow the timers as an adapter does; return the send times and the finish time."""
    sends: list[float] = []
    now = start
    for _ in range(10):
        for datagram, destination in search.datagrams_to_send(now):
            assert destination == DEFAULT_GROUP
            assert len(datagram) == SEARCH_REQUEST_SIZE
            sends.append(round(now - start, 9))
        search.handle_timer(now)
        timer = search.get_timer()
        if timer is None:
            return sends, now
        assert timer > now
        now = timer
    pytest.fail("the search did not finish in ten timer firings")


def test_sends_at_0_100_300_700_ms_and_finishes_at_the_timeout() -> None:
    search = new_search(now=50.0)
    sends, finished_at = run_schedule(search, 50.0)
    assert sends == [0.0, 0.1, 0.3, 0.7]
    assert finished_at == 51.0
    assert events(search) == [SearchFinished(found=0, elapsed=1.0)]
    assert_finished(search, finished_at)


def test_a_short_search_sends_only_what_fits_before_its_timeout() -> None:
    search = new_search(timeout=0.3)
    sends, finished_at = run_schedule(search, 0.0)
    assert sends == [0.0, 0.1]
    assert finished_at == 0.3
    longer = new_search(timeout=5.0)
    assert run_schedule(longer, 0.0) == ([0.0, 0.1, 0.3, 0.7], 5.0)


def test_a_late_caller_gets_one_copy_for_every_send_it_missed() -> None:
    search = new_search()
    assert search.datagrams_to_send(0.5) != []  # the sends due at 0 and 0.1 and 0.3
    assert search.datagrams_to_send(0.5) == []
    assert search.get_timer() == 0.7
    assert len(search.datagrams_to_send(0.9)) == 1
    assert search.get_timer() == 1.0


def test_the_constructor_refuses_misuse() -> None:
    with pytest.raises(LocalProtocolError, match="exactly one"):
        DiscoverySearch(transaction_id=TID, now=0.0)
    with pytest.raises(LocalProtocolError, match="timeout must be positive"):
        DiscoverySearch(server_id=SERVER, transaction_id=TID, now=0.0, timeout=0.0)
    with pytest.raises(LocalProtocolError, match="timeout must be positive"):
        DiscoverySearch(server_id=SERVER, transaction_id=TID, now=0.0, timeout=float("nan"))
    with pytest.raises(LocalProtocolError, match="12 bytes"):
        DiscoverySearch(server_id=SERVER, transaction_id=b"short", now=0.0)
    with pytest.raises(LocalProtocolError, match="not an IP address"):
        DiscoverySearch(server_id=SERVER, transaction_id=TID, now=0.0, group=("lan", 1))


# --- what the search accepts ---------------------------------------------------------------


def test_a_search_by_server_id_finishes_as_soon_as_the_server_answers() -> None:
    search = new_search()
    search.datagrams_to_send(0.0)
    search.receive_datagram(answer(), AGENT, 0.02)
    assert events(search) == [
        ServerFound(
            server_id=SERVER, system_id=SYSTEM, endpoints=ENDPOINTS, source=AGENT, elapsed=0.02
        ),
        SearchFinished(found=1, elapsed=0.02),
    ]
    assert_finished(search, 0.02)


def test_a_search_by_system_id_collects_every_server_once_until_the_timeout() -> None:
    search = new_search(system=True)
    search.datagrams_to_send(0.0)
    search.receive_datagram(answer(), AGENT, 0.01)
    search.receive_datagram(answer(), AGENT, 0.11)  # the answer to the second copy
    b_endpoints = (("192.168.1.11", 9000),)
    search.receive_datagram(answer(server_id=SERVER_B, endpoints=b_endpoints), AGENT_B, 0.2)
    assert not search.done
    assert search.dropped_datagrams == 1
    search.handle_timer(0.999)
    assert not search.done
    search.handle_timer(1.0)
    assert events(search) == [
        ServerFound(
            server_id=SERVER, system_id=SYSTEM, endpoints=ENDPOINTS, source=AGENT, elapsed=0.01
        ),
        ServerFound(
            server_id=SERVER_B,
            system_id=SYSTEM,
            endpoints=b_endpoints,
            source=AGENT_B,
            elapsed=0.2,
        ),
        SearchFinished(found=2, elapsed=1.0),
    ]
    assert_finished(search, 1.0)


def _request_from_elsewhere() -> bytes:
    return search_datagram(server_id=SERVER)


def _error_answer() -> bytes:
    request = SearchRequest(server_id=SERVER).to_stun(TID)
    return encode_message(request.error_response(404, "Not Here"))


def _indication() -> bytes:
    message = Message(
        message_class=MessageClass.INDICATION,
        method=MediatorMethod.SEARCH,
        transaction_id=TID,
        attributes=(ServerId(SERVER), SystemId(SYSTEM), LocalEndpoint(ENDPOINTS[0])),
    )
    return encode_message(message)


def _other_method() -> bytes:
    message = Message(
        message_class=MessageClass.SUCCESS,
        method=MediatorMethod.CONNECT,
        transaction_id=TID,
        attributes=(ServerId(SERVER), SystemId(SYSTEM), LocalEndpoint(ENDPOINTS[0])),
    )
    return encode_message(message)


def _without_system_id() -> bytes:
    message = Message(
        message_class=MessageClass.SUCCESS,
        method=MediatorMethod.SEARCH,
        transaction_id=TID,
        attributes=(ServerId(SERVER), LocalEndpoint(ENDPOINTS[0])),
    )
    return encode_message(message)


IGNORED = {
    "not STUN": lambda: b"hello, is anybody there?",
    "truncated STUN": lambda: answer()[:-4],
    "empty": lambda: b"",
    "our own request, looped back": lambda: encode_search_request(
        SearchRequest(server_id=SERVER), TID
    ),
    "another client's search": _request_from_elsewhere,
    "another transaction": lambda: answer(tid=OTHER_TID),
    "another server": lambda: answer(server_id=OTHER_SERVER),
    "no endpoints": lambda: answer(endpoints=()),
    "only port 0": lambda: answer(endpoints=(("192.168.1.10", 0),)),
    "an error response": _error_answer,
    "an indication": _indication,
    "another method": _other_method,
    "missing SYSTEM-ID": _without_system_id,
}


@pytest.mark.parametrize("name", sorted(IGNORED))
def test_the_search_ignores_anything_but_a_fitting_answer(name: str) -> None:
    search = new_search()
    search.datagrams_to_send(0.0)
    search.receive_datagram(IGNORED[name](), AGENT, 0.05)
    assert search.dropped_datagrams == 1
    assert events(search) == []
    assert not search.done
    assert search.get_timer() == 0.1  # the schedule is untouched
    search.receive_datagram(answer(), AGENT, 0.06)  # and the real answer still counts
    assert [type(e) for e in events(search)] == [ServerFound, SearchFinished]


def test_a_search_by_system_ignores_answers_of_another_system() -> None:
    search = new_search(system=True)
    search.receive_datagram(answer(system_id=OTHER_SYSTEM), AGENT, 0.05)
    assert search.dropped_datagrams == 1
    search.handle_timer(1.0)
    assert events(search) == [SearchFinished(found=0, elapsed=1.0)]


def test_an_answer_at_the_deadline_is_too_late() -> None:
    search = new_search()
    search.receive_datagram(answer(), AGENT, 1.0)
    assert events(search) == [SearchFinished(found=0, elapsed=1.0)]


def test_wildcard_endpoints_become_the_answers_source_address() -> None:
    search = new_search()
    sent = (
        (ANY_V4, 8000),
        ("::", 8001),
        ("192.168.1.10", 8000),  # the same as the first once that is filled in
        ("fd00::10", 0),  # nothing listens on port 0
        ("fd00::10", 8002),
    )
    search.receive_datagram(answer(endpoints=sent), AGENT, 0.01)
    found = events(search)[0]
    assert isinstance(found, ServerFound)
    assert found.endpoints == (
        ("192.168.1.10", 8000),
        ("192.168.1.10", 8001),
        ("fd00::10", 8002),
    )


def test_the_found_set_is_bounded() -> None:
    search = new_search(system=True)
    for index in range(MAX_SERVERS_FOUND + 5):
        server = uuid.UUID(int=index + 1)
        search.receive_datagram(answer(server_id=server), AGENT, 0.01)
    assert search.dropped_datagrams == 5
    search.handle_timer(1.0)
    seen = events(search)
    assert len(seen) == MAX_SERVERS_FOUND + 1
    assert seen[-1] == SearchFinished(found=MAX_SERVERS_FOUND, elapsed=1.0)


# --- the responder ---------------------------------------------------------------------------


def test_the_responder_answers_a_search_for_its_server_or_its_system() -> None:
    responder = new_responder()
    for datagram in (search_datagram(), search_datagram(server_id=None, system_id=SYSTEM)):
        ((data, destination),) = responder.receive_datagram(datagram, CLIENT, 0.0)
        assert destination == CLIENT
        message = decode_message(data)
        assert message.transaction_id == TID
        assert SearchAnswer.from_stun(message) == SearchAnswer(
            server_id=SERVER, system_id=SYSTEM, endpoints=ENDPOINTS
        )
    assert responder.counters == ResponderCounters(answered=2)


def test_the_responder_ignores_searches_for_others() -> None:
    responder = new_responder()
    assert responder.receive_datagram(search_datagram(server_id=OTHER_SERVER), CLIENT, 0.0) == []
    other_system = search_datagram(server_id=None, system_id=OTHER_SYSTEM)
    assert responder.receive_datagram(other_system, CLIENT, 0.0) == []
    assert responder.counters == ResponderCounters(not_for_us=2)


def test_the_responder_ignores_everything_that_is_not_a_search_request() -> None:
    responder = new_responder()
    ((own_answer, _),) = responder.receive_datagram(search_datagram(), CLIENT, 0.0)
    for datagram in (own_answer, _error_answer(), _indication(), _other_method()):
        assert responder.receive_datagram(datagram, CLIENT, 0.0) == []
    assert responder.counters == ResponderCounters(answered=1, ignored=4)
    both = Message(
        message_class=MessageClass.REQUEST,
        method=MediatorMethod.SEARCH,
        transaction_id=TID,
        attributes=(ServerId(SERVER), SystemId(SYSTEM)),
    )
    for datagram in (b"", b"\x00" * 19, b"GET / HTTP/1.1\r\n\r\n", encode_message(both)):
        assert responder.receive_datagram(datagram, CLIENT, 0.0) == []
    assert responder.counters == ResponderCounters(answered=1, ignored=4, malformed=4)


def test_no_endpoints_no_answer_until_they_are_set() -> None:
    responder = DiscoveryResponder(system_id=SYSTEM, server_id=SERVER)
    assert responder.receive_datagram(search_datagram(), CLIENT, 0.0) == []
    assert responder.counters == ResponderCounters(no_endpoints=1)
    responder.set_endpoints([(ANY_V4, 8000)])
    ((data, _),) = responder.receive_datagram(search_datagram(), CLIENT, 0.0)
    assert SearchAnswer.from_stun(decode_message(data)).endpoints == ((ANY_V4, 8000),)


def test_set_endpoints_refuses_what_cannot_be_dialled() -> None:
    responder = new_responder()
    with pytest.raises(LocalProtocolError, match="not an IP address"):
        responder.set_endpoints([("server.lan", 8000)])
    with pytest.raises(LocalProtocolError, match=r"1\.\.65535"):
        responder.set_endpoints([("10.0.0.1", 0)])
    with pytest.raises(LocalProtocolError, match="at most 16"):
        responder.set_endpoints([("10.0.0.1", 1000 + i) for i in range(17)])
    assert responder.endpoints == ENDPOINTS  # unchanged by the refusals


def test_the_responder_rate_limits_each_source() -> None:
    responder = new_responder(per_source_rate=1.0, burst=2)
    datagram = search_datagram()
    assert len(responder.receive_datagram(datagram, CLIENT, 0.0)) == 1
    assert len(responder.receive_datagram(datagram, CLIENT, 0.0)) == 1
    assert responder.receive_datagram(datagram, CLIENT, 0.0) == []
    assert len(responder.receive_datagram(datagram, ("192.168.1.21", 50000), 0.0)) == 1
    assert responder.receive_datagram(datagram, CLIENT, 0.5) == []
    assert len(responder.receive_datagram(datagram, CLIENT, 1.0)) == 1  # one token a second
    assert responder.counters == ResponderCounters(answered=4, rate_limited=2)
    # Searches for others spend no tokens.
    for _ in range(5):
        responder.receive_datagram(search_datagram(server_id=OTHER_SERVER), CLIENT, 2.0)
    assert len(responder.receive_datagram(datagram, CLIENT, 2.0)) == 1


def test_a_padded_search_gets_every_endpoint_even_sixteen_ipv6() -> None:
    endpoints = tuple((f"fd00::{i + 1:x}", 8000 + i) for i in range(16))
    responder = DiscoveryResponder(system_id=SYSTEM, server_id=SERVER, endpoints=endpoints)
    ((data, _),) = responder.receive_datagram(search_datagram(), CLIENT, 0.0)
    assert len(data) == answer_size(endpoints) == 444 <= 3 * SEARCH_REQUEST_SIZE
    assert SearchAnswer.from_stun(decode_message(data)).endpoints == endpoints
    assert responder.counters == ResponderCounters(answered=1)


@pytest.mark.parametrize(
    ("host", "fits"),
    [("10.0.0.1", 5), ("fd00::1", 2)],  # 120-byte budget: 60 for the ids, then 12 or 24 each
)
def test_an_unpadded_search_gets_only_the_endpoints_that_fit_3x(host: str, fits: int) -> None:
    endpoints = tuple((host, 8000 + i) for i in range(16))
    responder = DiscoveryResponder(system_id=SYSTEM, server_id=SERVER, endpoints=endpoints)
    bare = encode_message(SearchRequest(server_id=SERVER).to_stun(TID))
    assert len(bare) == 40
    ((data, _),) = responder.receive_datagram(bare, CLIENT, 0.0)
    assert len(data) <= 3 * len(bare)
    assert SearchAnswer.from_stun(decode_message(data)).endpoints == endpoints[:fits]
    assert responder.counters == ResponderCounters(answered=1, truncated=1)


def test_search_and_two_responders_in_memory() -> None:
    agents = {
        AGENT: new_responder(),
        AGENT_B: DiscoveryResponder(
            system_id=SYSTEM, server_id=SERVER_B, endpoints=[(ANY_V4, 9000)]
        ),
        ("192.168.1.12", DEFAULT_GROUP[1]): DiscoveryResponder(
            system_id=OTHER_SYSTEM, server_id=OTHER_SERVER, endpoints=[("192.168.1.12", 1)]
        ),
    }
    search = new_search(system=True)
    now = 0.0
    while not search.done:
        for datagram, group in search.datagrams_to_send(now):
            assert group == DEFAULT_GROUP
            search.receive_datagram(datagram, CLIENT, now)  # multicast loop: our own copy
            for address, responder in agents.items():
                for data, destination in responder.receive_datagram(datagram, CLIENT, now):
                    assert destination == CLIENT
                    search.receive_datagram(data, address, now + 0.001)
        timer = search.get_timer()
        assert timer is not None
        now = timer
        search.handle_timer(now)
    found = events(search)
    assert [(e.server_id, e.endpoints) for e in found if isinstance(e, ServerFound)] == [
        (SERVER, ENDPOINTS),
        (SERVER_B, (("192.168.1.11", 9000),)),
    ]
    assert found[-1] == SearchFinished(found=2, elapsed=1.0)
    # Four copies each: the first answers count, the three repeats and our own copies do not.
    assert search.dropped_datagrams == 4 + 2 * 3
    assert [agents[a].counters.answered for a in agents] == [4, 4, 0]
