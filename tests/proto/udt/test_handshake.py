"""UdtHandshake and UdtListener driven in memory with a clock moved by hand."""

from __future__ import annotations

import pytest

from wavesync_proto.addresses import Endpoint
from wavesync_proto.errors import LocalProtocolError
from wavesync_proto.udt import (
    DataPacket,
    Handshake,
    KeepAlive,
    RequestType,
    Shutdown,
    SocketType,
    decode_packet,
    encode_packet,
    pack_peer_ip,
)
from wavesync_proto.udt.handshake import (
    CONNECT_RETRY_INTERVAL,
    REGULAR_CONNECT_TIMEOUT,
    RENDEZVOUS_CONNECT_TIMEOUT,
    FailureReason,
    HandshakeEstablished,
    HandshakeFailed,
    HandshakeState,
    UdtHandshake,
)
from wavesync_proto.udt.listener import (
    AcceptedHandshake,
    ConnectionRequest,
    ListenerReply,
    UdtListener,
)

CLIENT: Endpoint = ("198.51.100.7", 40000)
SERVER: Endpoint = ("203.0.113.5", 9000)
PEER_A: Endpoint = ("192.0.2.1", 5000)
PEER_B: Endpoint = ("192.0.2.2", 6000)
STALE: Endpoint = ("10.9.9.9", 6000)
SECRET = b"0123456789abcdef"
T0 = 1000.0  # a point inside one cookie bucket


def handshake(data: bytes) -> Handshake:
    packet = decode_packet(data)
    assert isinstance(packet, Handshake)
    return packet


def only(datagrams: list[tuple[bytes, Endpoint]]) -> tuple[Handshake, Endpoint]:
    assert len(datagrams) == 1
    data, destination = datagrams[0]
    return handshake(data), destination


def reply(outcome: ListenerReply | ConnectionRequest | None) -> Handshake:
    assert isinstance(outcome, ListenerReply)
    return handshake(outcome.datagram)


def request_bytes(**fields: int) -> bytes:
    values: dict[str, int] = {
        "socket_type": SocketType.STREAM,
        "initial_sequence_number": 77,
        "mss": 1500,
        "flow_window": 8192,
        "request_type": RequestType.REGULAR,
        "socket_id": 4242,
    }
    values.update(fields)
    return encode_packet(Handshake(**values))  # type: ignore[arg-type]


class Regular:
    """A caller and a listener with the multiplexer's table of accepted connections."""

    def __init__(self, *, caller_mss: int = 1500, listener_mss: int = 1500) -> None:
        self.caller = UdtHandshake.caller(
            SERVER, socket_id=111, isn=1000, now=T0, mss=caller_mss, flow_window=5000
        )
        self.listener = UdtListener(secret=SECRET, mss=listener_mss, flow_window=7000)
        self.accepted: dict[tuple[Endpoint, int, int], AcceptedHandshake] = {}
        self.next_id = 900

    def to_listener(self, data: bytes, now: float) -> bytes | None:
        outcome = self.listener.receive_datagram(data, CLIENT, now)
        if isinstance(outcome, ListenerReply):
            return outcome.datagram
        if isinstance(outcome, ConnectionRequest):
            known = self.accepted.get(outcome.key)
            if known is None:
                self.next_id += 1
                known = self.listener.accept(outcome, socket_id=self.next_id)
                self.accepted[outcome.key] = known
            return known.response
        return None

    def run(self, until: float, *, drop: set[int] | None = None) -> None:
        """Move every datagram at once, dropping those whose running number is in ``drop``."""
        drop = drop or set()
        count = 0
        now = T0
        while now < until and self.caller.state not in (
            HandshakeState.ESTABLISHED,
            HandshakeState.FAILED,
        ):
            for data, destination in self.caller.datagrams_to_send(now):
                assert destination == SERVER
                count += 1
                answer = None if count in drop else self.to_listener(data, now)
                count += 1
                if answer is not None and count not in drop:
                    self.caller.receive_datagram(answer, SERVER, now)
            self.caller.handle_timer(now)
            timer = self.caller.get_timer()
            if timer is None:
                break
            now = max(now, timer)


# --- regular connect ---------------------------------------------------------------------


def test_regular_connect_round_trip_with_cookie() -> None:
    listener = UdtListener(secret=SECRET, flow_window=7000)
    caller = UdtHandshake.caller(SERVER, socket_id=111, isn=1000, now=T0, flow_window=5000)

    first, destination = only(caller.datagrams_to_send(T0))
    assert destination == SERVER
    assert first.request_type == RequestType.REGULAR
    assert (first.cookie, first.destination_socket_id, first.socket_id) == (0, 0, 111)
    assert (first.version, first.socket_type, first.initial_sequence_number) == (4, 1, 1000)
    assert first.peer_ip == pack_peer_ip(SERVER[0])

    challenge = listener.receive_datagram(encode_packet(first), CLIENT, T0)
    assert isinstance(challenge, ListenerReply)
    assert challenge.destination == CLIENT
    cookie_hs = handshake(challenge.datagram)
    assert cookie_hs.request_type == RequestType.REGULAR
    assert cookie_hs.destination_socket_id == 111
    assert cookie_hs.cookie == listener.cookie(CLIENT, T0) != 0
    assert cookie_hs.initial_sequence_number == 1000

    caller.receive_datagram(challenge.datagram, SERVER, T0 + 0.01)
    assert caller.state is HandshakeState.CONFIRMING
    second, _ = only(caller.datagrams_to_send(T0 + 0.01))  # at once, not after 250 ms
    assert second.request_type == RequestType.RESPONSE
    assert second.cookie == cookie_hs.cookie
    assert second.destination_socket_id == 0

    request = listener.receive_datagram(encode_packet(second), CLIENT, T0 + 0.02)
    assert isinstance(request, ConnectionRequest)
    assert request.key == (CLIENT, 111, 1000)
    accepted = listener.accept(request, socket_id=222)
    response = handshake(accepted.response)
    assert response.request_type == RequestType.RESPONSE
    assert (response.destination_socket_id, response.socket_id) == (111, 222)
    assert response.initial_sequence_number == 1000  # the caller's ISN, echoed
    assert response.peer_ip == pack_peer_ip(CLIENT[0])

    caller.receive_datagram(accepted.response, SERVER, T0 + 0.03)
    event = caller.next_event()
    assert event == HandshakeEstablished(
        local_socket_id=111,
        peer_socket_id=222,
        local_isn=1000,
        peer_isn=1000,
        mss=1500,
        flow_window=7000,
        peer_address=SERVER,
        reported_ip=pack_peer_ip(CLIENT[0]),
    )
    assert accepted.established == HandshakeEstablished(
        local_socket_id=222,
        peer_socket_id=111,
        local_isn=1000,
        peer_isn=1000,
        mss=1500,
        flow_window=5000,
        peer_address=CLIENT,
        reported_ip=pack_peer_ip(SERVER[0]),
    )
    assert caller.next_event() is None
    assert caller.get_timer() is None
    assert caller.datagrams_to_send(T0 + 1) == []


def test_listener_keeps_no_state_for_first_requests() -> None:
    listener = UdtListener(secret=SECRET)
    assert not hasattr(listener, "__dict__")  # slots: secret, settings, counters only
    for port in range(1000, 1500):
        outcome = listener.receive_datagram(request_bytes(), ("198.51.100.1", port), T0)
        assert isinstance(outcome, ListenerReply)
    # Another listener with the same secret (a restart, a second worker) accepts the cookie.
    cookie = reply(listener.receive_datagram(request_bytes(), CLIENT, T0)).cookie
    other = UdtListener(secret=SECRET)
    confirmed = request_bytes(request_type=RequestType.RESPONSE, cookie=cookie)
    assert isinstance(other.receive_datagram(confirmed, CLIENT, T0 + 1), ConnectionRequest)


def test_cookie_depends_on_address_secret_and_bucket() -> None:
    listener = UdtListener(secret=SECRET)
    base = listener.cookie(CLIENT, T0)
    assert listener.cookie(("198.51.100.7", 40001), T0) != base
    assert UdtListener(secret=b"another secret!!").cookie(CLIENT, T0) != base
    assert listener.cookie(CLIENT, T0 + 60) != base
    assert listener.cookie(CLIENT, T0 + 60, previous=True) == base


@pytest.mark.parametrize("later", [0.0, 59.0, 60.0, 119.0])
def test_cookie_of_the_current_or_previous_bucket_is_accepted(later: float) -> None:
    listener = UdtListener(secret=SECRET)
    start = 960.0  # the start of a bucket
    cookie = listener.cookie(CLIENT, start)
    data = request_bytes(request_type=RequestType.RESPONSE, cookie=cookie)
    assert isinstance(listener.receive_datagram(data, CLIENT, start + later), ConnectionRequest)


@pytest.mark.parametrize(
    ("cookie_source", "at"),
    [(CLIENT, T0 + 120.0), (("198.51.100.8", 40000), T0), (CLIENT, T0 - 120.0)],
    ids=["expired", "other-address", "future"],
)
def test_wrong_or_expired_cookie_is_challenged_again(cookie_source: Endpoint, at: float) -> None:
    listener = UdtListener(secret=SECRET)
    stale = listener.cookie(cookie_source, T0)
    data = request_bytes(request_type=RequestType.RESPONSE, cookie=stale)
    challenge = reply(listener.receive_datagram(data, CLIENT, at))
    assert challenge.request_type == RequestType.REGULAR
    assert challenge.cookie == listener.cookie(CLIENT, at) != stale
    assert listener.counters.wrong_peer == 1


def test_caller_recovers_from_a_stale_cookie() -> None:
    # A caller repeating an expired cookie is re-challenged and completes (4.11 would not).
    net = Regular()
    caller = net.caller
    caller.datagrams_to_send(T0)
    caller.receive_datagram(
        request_bytes(
            destination_socket_id=111,
            initial_sequence_number=1000,
            cookie=12345,
            socket_id=111,
        ),
        SERVER,
        T0,
    )
    assert caller.state is HandshakeState.CONFIRMING
    net.run(T0 + 3)
    assert isinstance(caller.result, HandshakeEstablished)


def test_listener_ignores_what_is_not_a_request() -> None:
    listener = UdtListener(secret=SECRET)
    assert listener.receive_datagram(b"\x80\x00", CLIENT, T0) is None
    assert listener.receive_datagram(encode_packet(KeepAlive()), CLIENT, T0) is None
    assert listener.receive_datagram(request_bytes(destination_socket_id=5), CLIENT, T0) is None
    rendezvous = request_bytes(request_type=RequestType.RENDEZVOUS)
    assert listener.receive_datagram(rendezvous, CLIENT, T0) is None
    counters = listener.counters
    assert (counters.malformed, counters.not_handshake) == (1, 1)
    assert (counters.wrong_destination, counters.unexpected) == (1, 1)


def test_dgram_peer_is_refused_with_1002() -> None:
    listener = UdtListener(secret=SECRET)
    caller = UdtHandshake.caller(
        SERVER, socket_id=111, isn=1000, now=T0, socket_type=SocketType.DGRAM
    )
    first, _ = only(caller.datagrams_to_send(T0))
    challenge = listener.receive_datagram(encode_packet(first), CLIENT, T0)
    assert isinstance(challenge, ListenerReply)  # 4.11 hands out the cookie first
    caller.receive_datagram(challenge.datagram, SERVER, T0)
    second, _ = only(caller.datagrams_to_send(T0))
    refusal = listener.receive_datagram(encode_packet(second), CLIENT, T0)
    refused = reply(refusal)
    assert refused.request_type == RequestType.REJECTED
    assert refused.destination_socket_id == 111
    assert isinstance(refusal, ListenerReply)
    caller.receive_datagram(refusal.datagram, SERVER, T0)
    event = caller.next_event()
    assert isinstance(event, HandshakeFailed)
    assert event.reason is FailureReason.REJECTED


def test_full_backlog_is_refused_with_1002() -> None:
    listener = UdtListener(secret=SECRET)
    cookie = listener.cookie(CLIENT, T0)
    request = listener.receive_datagram(
        request_bytes(request_type=RequestType.RESPONSE, cookie=cookie), CLIENT, T0
    )
    assert isinstance(request, ConnectionRequest)
    assert handshake(listener.reject(request).datagram).request_type == RequestType.REJECTED


def test_retransmission_schedule_and_timeout() -> None:
    caller = UdtHandshake.caller(SERVER, socket_id=111, isn=1000, now=T0)
    sent: list[float] = []
    now = T0
    while caller.result is None:
        sent += [now for _ in caller.datagrams_to_send(now)]
        caller.handle_timer(now)
        timer = caller.get_timer()
        if timer is None:
            break
        now = timer
    assert sent == pytest.approx([T0 + i * CONNECT_RETRY_INTERVAL for i in range(12)])
    assert now == pytest.approx(T0 + REGULAR_CONNECT_TIMEOUT)
    event = caller.next_event()
    assert isinstance(event, HandshakeFailed)
    assert event.reason is FailureReason.TIMEOUT
    assert caller.datagrams_to_send(now + 1) == []


def test_nothing_is_sent_before_its_time() -> None:
    caller = UdtHandshake.caller(SERVER, socket_id=111, isn=1000, now=T0)
    assert len(caller.datagrams_to_send(T0)) == 1
    assert caller.datagrams_to_send(T0 + 0.2) == []
    assert caller.get_timer() == pytest.approx(T0 + 0.25)
    caller.handle_timer(T0 + 0.2)
    assert caller.result is None


@pytest.mark.parametrize("lost", [{1}, {2}, {3}, {4}, {1, 3, 5}, {2, 4}, {1, 2, 3, 4, 6}])
def test_lost_handshakes_are_recovered_by_retransmission(lost: set[int]) -> None:
    net = Regular()
    net.run(T0 + 3, drop=lost)
    assert isinstance(net.caller.result, HandshakeEstablished)
    assert len(net.accepted) == 1
    (accepted,) = net.accepted.values()
    assert net.caller.result.peer_socket_id == accepted.established.local_socket_id


def test_repeated_request_gets_the_same_response_not_a_new_connection() -> None:
    net = Regular()
    net.run(T0 + 3, drop={4})  # the listener's response is lost: the caller repeats
    assert len(net.accepted) == 1
    (key,) = net.accepted
    request = net.listener.receive_datagram(
        request_bytes(
            request_type=RequestType.RESPONSE,
            cookie=net.listener.cookie(CLIENT, T0),
            socket_id=111,
            initial_sequence_number=1000,
        ),
        CLIENT,
        T0 + 1,
    )
    assert isinstance(request, ConnectionRequest)
    assert request.key == key


def test_established_caller_ignores_late_duplicates() -> None:
    net = Regular()
    net.run(T0 + 3)
    (accepted,) = net.accepted.values()
    net.caller.receive_datagram(accepted.response, SERVER, T0 + 1)
    assert net.caller.next_event() is not None
    assert net.caller.next_event() is None
    assert net.caller.datagrams_to_send(T0 + 1) == []
    assert net.caller.counters.unexpected == 1


@pytest.mark.parametrize(
    ("caller_mss", "listener_mss", "agreed"), [(1500, 1400, 1400), (1300, 1500, 1300)]
)
def test_mss_is_the_smaller_and_each_side_gets_the_others_window(
    caller_mss: int, listener_mss: int, agreed: int
) -> None:
    net = Regular(caller_mss=caller_mss, listener_mss=listener_mss)
    net.run(T0 + 3)
    assert isinstance(net.caller.result, HandshakeEstablished)
    (accepted,) = net.accepted.values()
    assert net.caller.result.mss == accepted.established.mss == agreed
    assert net.caller.result.flow_window == 7000  # the listener's announcement
    assert accepted.established.flow_window == 5000  # the caller's


def test_caller_drops_replies_that_are_not_for_it() -> None:
    caller = UdtHandshake.caller(SERVER, socket_id=111, isn=1000, now=T0)
    challenge = request_bytes(destination_socket_id=111, initial_sequence_number=1000, cookie=9)
    caller.receive_datagram(challenge, ("203.0.113.6", 9000), T0)
    caller.receive_datagram(request_bytes(destination_socket_id=112, cookie=9), SERVER, T0)
    caller.receive_datagram(request_bytes(destination_socket_id=0, cookie=9), SERVER, T0)
    wrong_isn = request_bytes(destination_socket_id=111, initial_sequence_number=999, cookie=9)
    caller.receive_datagram(wrong_isn, SERVER, T0)
    caller.receive_datagram(b"junk", SERVER, T0)
    caller.receive_datagram(encode_packet(Shutdown(destination_socket_id=111)), SERVER, T0)
    early = request_bytes(
        destination_socket_id=111, initial_sequence_number=1000, request_type=-1, socket_id=5
    )
    caller.receive_datagram(early, SERVER, T0)  # a response before any challenge
    counters = caller.counters
    assert counters.wrong_source == 1
    assert counters.wrong_destination == 2
    assert counters.wrong_peer == 1
    assert (counters.malformed, counters.not_handshake, counters.unexpected) == (1, 1, 1)
    assert caller.state is HandshakeState.REQUESTING


def test_bad_settings_are_refused() -> None:
    with pytest.raises(LocalProtocolError):
        UdtHandshake.caller(SERVER, socket_id=0, isn=1, now=T0)
    with pytest.raises(LocalProtocolError):
        UdtHandshake.caller(SERVER, socket_id=1, isn=1 << 31, now=T0)
    with pytest.raises(LocalProtocolError):
        UdtHandshake.caller(SERVER, socket_id=1, isn=1, now=T0, mss=75)
    with pytest.raises(LocalProtocolError):
        UdtHandshake.rendezvous([], socket_id=1, isn=1, now=T0)
    with pytest.raises(LocalProtocolError):
        UdtListener(secret=b"short")


# --- rendezvous ----------------------------------------------------------------------------


def rendezvous_pair(*, a_mss: int = 1500, b_mss: int = 1500) -> tuple[UdtHandshake, UdtHandshake]:
    a = UdtHandshake.rendezvous([PEER_B], socket_id=5, isn=50, now=T0, mss=a_mss)
    b = UdtHandshake.rendezvous([PEER_A], socket_id=6, isn=60, now=T0, mss=b_mss, flow_window=300)
    return a, b


def deliver(datagrams: list[tuple[bytes, Endpoint]], to: UdtHandshake, source: Endpoint) -> int:
    for data, _ in datagrams:
        to.receive_datagram(data, source, T0)
    return len(datagrams)


def exchange(a: UdtHandshake, b: UdtHandshake, start: float, *, rounds: int = 3) -> None:
    """Both sides send what is due and receive it, every 250 ms."""
    for step in range(rounds):
        now = start + step * CONNECT_RETRY_INTERVAL
        for data, _ in a.datagrams_to_send(now):
            b.receive_datagram(data, PEER_A, now)
        for data, _ in b.datagrams_to_send(now):
            a.receive_datagram(data, PEER_B, now)


def assert_matched(a: UdtHandshake, b: UdtHandshake) -> None:
    ea, eb = a.result, b.result
    assert isinstance(ea, HandshakeEstablished)
    assert isinstance(eb, HandshakeEstablished)
    assert (ea.peer_socket_id, eb.peer_socket_id) == (eb.local_socket_id, ea.local_socket_id)
    assert (ea.peer_isn, eb.peer_isn) == (eb.local_isn, ea.local_isn) == (60, 50)
    assert ea.mss == eb.mss
    assert (ea.peer_address, eb.peer_address) == (PEER_B, PEER_A)
    assert ea.flow_window == 300


def test_rendezvous_one_side_heard_first() -> None:
    a, b = rendezvous_pair()
    a_first, _ = only(a.datagrams_to_send(T0))
    assert a_first.request_type == RequestType.RENDEZVOUS
    assert a_first.destination_socket_id == 0
    b.datagrams_to_send(T0)  # b's type 0 is lost
    b.receive_datagram(encode_packet(a_first), PEER_A, T0)
    assert b.state is HandshakeState.AGREEING
    b_answer, _ = only(b.datagrams_to_send(T0))  # at once
    assert b_answer.request_type == RequestType.RESPONSE
    assert b_answer.destination_socket_id == 5
    a.receive_datagram(encode_packet(b_answer), PEER_B, T0)
    # 4.11: a still says 0 itself, so it turns to -1 and is not connected yet.
    assert a.state is HandshakeState.AGREEING
    deliver(a.datagrams_to_send(T0), b, PEER_A)
    assert isinstance(b.result, HandshakeEstablished)
    assert b.datagrams_to_send(T0) == []
    # a's next -1 (after 250 ms) gets b's -2 answer, which completes a.
    assert a.datagrams_to_send(T0 + 0.1) == []
    a_again, _ = only(a.datagrams_to_send(T0 + 0.25))
    b.receive_datagram(encode_packet(a_again), PEER_A, T0 + 0.25)
    b_late, _ = only(b.datagrams_to_send(T0 + 0.25))
    assert b_late.request_type == RequestType.RENDEZVOUS_RESPONSE
    assert b_late.destination_socket_id == 5
    a.receive_datagram(encode_packet(b_late), PEER_B, T0 + 0.25)
    assert_matched(a, b)


@pytest.mark.parametrize("first", ["a", "b"])
def test_rendezvous_either_order(first: str) -> None:
    a, b = rendezvous_pair()
    sides = {"a": (a, PEER_A, b), "b": (b, PEER_B, a)}
    order = [sides[first], sides["b" if first == "a" else "a"]]
    now = T0
    while a.result is None or b.result is None:
        for me, my_address, other in order:
            for data, _ in me.datagrams_to_send(now):
                other.receive_datagram(data, my_address, now)
        now += 0.05
        assert now < T0 + 2
    assert_matched(a, b)


def test_rendezvous_requests_cross_in_flight() -> None:
    a, b = rendezvous_pair()
    a_zero = a.datagrams_to_send(T0)
    b_zero = b.datagrams_to_send(T0)
    deliver(a_zero, b, PEER_A)
    deliver(b_zero, a, PEER_B)
    a_minus, b_minus = a.datagrams_to_send(T0), b.datagrams_to_send(T0)
    assert deliver(a_minus, b, PEER_A) == deliver(b_minus, a, PEER_B) == 1
    assert_matched(a, b)


def test_rendezvous_keep_alive_completes_a_waiting_peer() -> None:
    a, b = rendezvous_pair()
    deliver(b.datagrams_to_send(T0), a, PEER_B)
    assert a.state is HandshakeState.AGREEING
    a.receive_datagram(encode_packet(KeepAlive(destination_socket_id=5)), PEER_B, T0)
    assert isinstance(a.result, HandshakeEstablished)
    assert a.result.peer_isn == 60


def test_rendezvous_data_before_any_handshake_is_ignored() -> None:
    a, _ = rendezvous_pair()
    data = DataPacket(destination_socket_id=5, sequence_number=60, message_number=1)
    a.receive_datagram(encode_packet(data), PEER_B, T0)
    assert a.state is HandshakeState.WAVING
    assert a.counters.not_handshake == 1


def test_rendezvous_ignores_a_regular_request() -> None:
    a, _ = rendezvous_pair()
    a.receive_datagram(request_bytes(), PEER_B, T0)
    assert a.state is HandshakeState.WAVING
    assert a.counters.unexpected == 1


def test_rendezvous_with_a_dgram_peer_fails_as_incompatible() -> None:
    a, _ = rendezvous_pair()
    a.receive_datagram(
        request_bytes(request_type=RequestType.RENDEZVOUS, socket_type=SocketType.DGRAM),
        PEER_B,
        T0,
    )
    event = a.next_event()
    assert isinstance(event, HandshakeFailed)
    assert event.reason is FailureReason.INCOMPATIBLE


def test_rendezvous_times_out_after_thirty_seconds() -> None:
    a, _ = rendezvous_pair()
    a.handle_timer(T0 + RENDEZVOUS_CONNECT_TIMEOUT - 0.001)
    assert a.result is None
    a.handle_timer(T0 + RENDEZVOUS_CONNECT_TIMEOUT)
    assert isinstance(a.result, HandshakeFailed)


@pytest.mark.parametrize(("a_mss", "b_mss"), [(1500, 1400), (1200, 1500)])
def test_rendezvous_mss_is_the_smaller(a_mss: int, b_mss: int) -> None:
    a, b = rendezvous_pair(a_mss=a_mss, b_mss=b_mss)
    exchange(a, b, T0)
    assert_matched(a, b)
    assert isinstance(a.result, HandshakeEstablished)
    assert a.result.mss == min(a_mss, b_mss)


def test_rendezvous_candidates_first_responder_wins() -> None:
    a = UdtHandshake.rendezvous([STALE, PEER_B, ("::1", 7000)], socket_id=5, isn=50, now=T0)
    b = UdtHandshake.rendezvous([PEER_A], socket_id=6, isn=60, now=T0, flow_window=300)
    first = a.datagrams_to_send(T0)
    assert [destination for _, destination in first] == [STALE, PEER_B, ("::1", 7000)]
    assert [handshake(data).peer_ip for data, _ in first] == [
        pack_peer_ip("10.9.9.9"),
        pack_peer_ip("192.0.2.2"),
        pack_peer_ip("::1"),
    ]
    deliver(b.datagrams_to_send(T0), a, PEER_B)
    assert a.peer_address == PEER_B
    # Once locked, the others get nothing and are not listened to.
    assert [destination for _, destination in a.datagrams_to_send(T0)] == [PEER_B]
    impostor = UdtHandshake.rendezvous([PEER_A], socket_id=66, isn=600, now=T0)
    deliver(impostor.datagrams_to_send(T0), a, STALE)
    assert a.counters.wrong_source == 1
    exchange(a, b, T0 + 0.25)
    assert_matched(a, b)


def test_rendezvous_ignores_another_socket_from_the_locked_address() -> None:
    a, b = rendezvous_pair()
    deliver(b.datagrams_to_send(T0), a, PEER_B)
    other = UdtHandshake.rendezvous([PEER_A], socket_id=77, isn=70, now=T0)
    deliver(other.datagrams_to_send(T0), a, PEER_B)
    assert a.counters.wrong_peer == 1
    assert a.state is HandshakeState.AGREEING


def test_the_rendezvous_answer_is_the_late_answer_and_only_once_established() -> None:
    a, b = rendezvous_pair()
    with pytest.raises(LocalProtocolError, match="only an established rendezvous"):
        a.rendezvous_answer()
    ((late, _),) = a.datagrams_to_send(T0)  # a's first type 0, delivered only at the end
    exchange(a, b, T0 + CONNECT_RETRY_INTERVAL)
    assert_matched(a, b)
    answer, destination = b.rendezvous_answer()
    assert destination == PEER_A
    # The same -2 that answers a late handshake of the peer.
    b.receive_datagram(late, PEER_A, T0 + 1)
    assert b.datagrams_to_send(T0 + 1) == [(answer, PEER_A)]
    assert handshake(answer).request_type == RequestType.RENDEZVOUS_RESPONSE
    caller = UdtHandshake.caller(PEER_B, socket_id=7, isn=70, now=T0)
    with pytest.raises(LocalProtocolError, match="only an established rendezvous"):
        caller.rendezvous_answer()
