"""UdtConnection driven by hand: events, timers (ACK, EXP, keep-alive, idle, linger), close,
abort, and what it does with a hostile or broken peer."""

from __future__ import annotations

import re
import struct
from collections.abc import Callable

import pytest

from wavesync_proto.addresses import Endpoint
from wavesync_proto.errors import LocalProtocolError
from wavesync_proto.udt import (
    Ack,
    Ack2,
    ControlPacket,
    DataPacket,
    Handshake,
    KeepAlive,
    LightAck,
    MessageDropRequest,
    Nak,
    RequestType,
    Shutdown,
    SocketType,
    decode_packet,
    encode_packet,
)
from wavesync_proto.udt.connection import (
    KEEPALIVE_INTERVAL,
    MIN_EXP_INTERVAL,
    SHUTDOWN_COPIES,
    UdtConnection,
)
from wavesync_proto.udt.connection_types import (
    CloseReason,
    ConnectionClosed,
    ConnectionEstablished,
    ConnectionState,
    DataReceived,
    UdtConfig,
    UdtEvent,
)
from wavesync_proto.udt.listener import ConnectionRequest, UdtListener

from .connection_helpers import SECRET, FixedRate, seeded

A: Endpoint = ("192.0.2.1", 1000)
B: Endpoint = ("192.0.2.2", 2000)
A_ID, B_ID = 1111, 2222
A_ISN, B_ISN = 100, 5000
Filter = Callable[[bytes], bool]


def kind(data: bytes) -> str:
    packet = decode_packet(data)
    return type(packet).__name__


class Pair:
    """Two connections wired back to back, datagrams moved by hand, clock moved by hand."""

    def __init__(self, a: UdtConnection, b: UdtConnection | None = None) -> None:
        self.a = a
        self.b = b
        self.now = 0.0
        self.drop_ab: Filter = lambda _: False
        self.drop_ba: Filter = lambda _: False
        self.sent_ab: list[bytes] = []
        self.sent_ba: list[bytes] = []
        #: ``advance(t)`` goes to ``origin + t``: tests count time from establishment.
        self.origin = 0.0

    def exchange(self, rounds: int = 1) -> None:
        """Move everything due now, both ways, ``rounds`` times."""
        for _ in range(rounds):
            for data, addr in self.a.datagrams_to_send(self.now):
                assert addr == B
                self.sent_ab.append(data)
                if self.b is not None and not self.drop_ab(data):
                    self.b.receive_datagram(data, A, self.now)
            if self.b is not None:
                for data, addr in self.b.datagrams_to_send(self.now):
                    assert addr == A
                    self.sent_ba.append(data)
                    if not self.drop_ba(data):
                        self.a.receive_datagram(data, B, self.now)

    def advance(self, offset: float) -> None:
        """Fire every timer up to ``origin + offset``, exchanging after each."""
        until = self.origin + offset
        assert until >= self.now
        while True:
            timers = [
                t for c in (self.a, self.b) if c is not None if (t := c.get_timer()) is not None
            ]
            if not timers or min(timers) > until:
                break
            self.now = max(self.now, min(timers))
            for connection in (self.a, self.b):
                if connection is not None:
                    timer = connection.get_timer()
                    if timer is not None and timer <= self.now:
                        connection.handle_timer(self.now)
            self.exchange()
        self.now = until
        self.exchange()


def state(connection: UdtConnection) -> ConnectionState:
    """The state, read through a call (so that mypy does not narrow it across calls)."""
    return connection.state


def peer_of(connection: UdtConnection) -> Endpoint | None:
    return connection.peer_address


def events(connection: UdtConnection) -> list[UdtEvent]:
    result = []
    while (event := connection.next_event()) is not None:
        result.append(event)
    return result


def received(connection: UdtConnection) -> bytes:
    return b"".join(e.data for e in events(connection) if isinstance(e, DataReceived))


def rendezvous_pair(config: UdtConfig = UdtConfig()) -> Pair:  # noqa: B008 - frozen
    a = UdtConnection.rendezvous(
        [B], socket_id=A_ID, isn=A_ISN, now=0.0, random=seeded(1).random, config=config
    )
    b = UdtConnection.rendezvous(
        [A], socket_id=B_ID, isn=B_ISN, now=0.0, random=seeded(2).random, config=config
    )
    pair = Pair(a, b)
    # b hears a's first request before sending its own: b is connected by a's -1, and
    # a by the -2 b sends as it connects (4.11 would wait for a's next request).
    pair.exchange(3)
    assert state(a) is ConnectionState.CONNECTED
    assert state(b) is ConnectionState.CONNECTED
    return pair


def connected(config: UdtConfig = UdtConfig()) -> Pair:  # noqa: B008 - frozen
    pair = rendezvous_pair(config)
    assert isinstance(events(pair.a)[0], ConnectionEstablished)
    assert pair.b is not None
    assert isinstance(events(pair.b)[0], ConnectionEstablished)
    pair.origin = pair.now
    return pair


def lone(config: UdtConfig = UdtConfig()) -> UdtConnection:  # noqa: B008 - frozen
    """A connected connection whose peer is played by the test with raw datagrams."""
    connection = UdtConnection.rendezvous(
        [B], socket_id=A_ID, isn=A_ISN, now=0.0, random=seeded(1).random, config=config
    )
    connection.datagrams_to_send(0.0)
    peer = Handshake(
        destination_socket_id=A_ID,
        socket_type=config.socket_type,
        initial_sequence_number=B_ISN,
        mss=1500,
        flow_window=8192,
        request_type=RequestType.RESPONSE,
        socket_id=B_ID,
    )
    connection.receive_datagram(encode_packet(peer), B, 0.0)  # WAVING -> AGREEING
    connection.receive_datagram(
        encode_packet(
            Handshake(
                destination_socket_id=A_ID,
                socket_type=config.socket_type,
                initial_sequence_number=B_ISN,
                mss=1500,
                flow_window=8192,
                request_type=RequestType.RENDEZVOUS_RESPONSE,
                socket_id=B_ID,
            )
        ),
        B,
        0.0,
    )
    assert state(connection) is ConnectionState.CONNECTED
    connection.datagrams_to_send(0.0)
    events(connection)
    return connection


def data_packet(seq: int, payload: bytes = b"x", destination: int = A_ID) -> bytes:
    return encode_packet(
        DataPacket(
            destination_socket_id=destination,
            sequence_number=seq,
            message_number=1,
            payload=payload,
        )
    )


def control(packet: ControlPacket) -> bytes:
    return encode_packet(packet)


# --- establishment and events ---------------------------------------------------------------


def test_regular_connect_through_a_listener() -> None:
    listener = UdtListener(secret=SECRET)
    a = UdtConnection.connect(B, socket_id=A_ID, isn=A_ISN, now=0.0, random=seeded(1).random)
    assert state(a) is ConnectionState.CONNECTING
    assert a.peer_address is None
    (request, _), *_ = a.datagrams_to_send(0.0)
    reply = listener.receive_datagram(request, A, 0.0)
    assert reply is not None
    assert not isinstance(reply, ConnectionRequest)
    a.receive_datagram(reply.datagram, B, 0.01)
    (confirm, _), *_ = a.datagrams_to_send(0.01)
    confirmed = listener.receive_datagram(confirm, A, 0.02)
    assert isinstance(confirmed, ConnectionRequest)
    accepted = listener.accept(confirmed, socket_id=B_ID)
    b = UdtConnection.accepted(accepted, now=0.02, random=seeded(2).random)
    assert state(b) is ConnectionState.CONNECTED
    assert events(b) == [ConnectionEstablished(peer_address=A, peer_socket_id=A_ID)]
    a.receive_datagram(accepted.response, B, 0.03)
    assert state(a) is ConnectionState.CONNECTED
    assert (peer_of(a), a.peer_socket_id, a.socket_id) == (B, B_ID, A_ID)
    assert events(a) == [ConnectionEstablished(peer_address=B, peer_socket_id=B_ID)]
    pair = Pair(a, b)
    pair.now = 0.03
    a.send(b"hello")
    pair.exchange(2)
    assert received(b) == b"hello"


def test_data_sent_while_connecting_goes_once_established() -> None:
    a = UdtConnection.rendezvous([B], socket_id=A_ID, isn=A_ISN, now=0.0, random=seeded(1).random)
    b = UdtConnection.rendezvous([A], socket_id=B_ID, isn=B_ISN, now=0.0, random=seeded(2).random)
    assert a.send_space == UdtConfig().send_buffer_bytes
    assert a.send(b"early ") == 6
    assert a.send(memoryview(b"bird")) == 4
    pair = Pair(a, b)
    pair.advance(0.3)
    assert received(b) == b"early bird"
    assert isinstance(events(a)[0], ConnectionEstablished)


def test_data_events_are_coalesced() -> None:
    pair = connected()
    pair.a.send(b"x" * 100_000)
    pair.advance(0.5)
    assert pair.b is not None
    data_events = [e for e in events(pair.b) if isinstance(e, DataReceived)]
    assert b"".join(e.data for e in data_events) == b"x" * 100_000
    assert len(data_events) < 5  # one per batch of packets, not 69


def test_handshake_failure_closes_with_its_reason() -> None:
    a = UdtConnection.connect(B, socket_id=A_ID, isn=A_ISN, now=0.0, random=seeded(1).random)
    a.send(b"lost")
    pair = Pair(a)
    pair.advance(4.0)
    (closed,) = events(a)
    assert isinstance(closed, ConnectionClosed)
    assert closed.reason is CloseReason.HANDSHAKE_FAILED
    assert "timeout" in closed.detail
    assert state(a) is ConnectionState.CLOSED
    assert a.get_timer() is None
    with pytest.raises(LocalProtocolError):
        a.send(b"more")


def test_a_rendezvous_gives_up_at_the_configured_connect_timeout() -> None:
    # 4.11 waits 30 s for a rendezvous peer; a server punching for a client that raced
    # other paths gives up at that client's deadline instead.
    config = UdtConfig(connect_timeout=10.0)
    a = UdtConnection.rendezvous(
        [B], socket_id=A_ID, isn=A_ISN, now=0.0, random=seeded(1).random, config=config
    )
    pair = Pair(a)
    pair.advance(9.9)
    assert state(a) is ConnectionState.CONNECTING
    pair.advance(10.1)
    (closed,) = events(a)
    assert isinstance(closed, ConnectionClosed)
    assert closed.reason is CloseReason.HANDSHAKE_FAILED


def test_a_connect_timeout_must_be_positive() -> None:
    with pytest.raises(LocalProtocolError, match="connect timeout"):
        UdtConfig(connect_timeout=0.0)


def test_a_late_rendezvous_handshake_is_answered_with_minus_two() -> None:
    pair = connected()
    late = Handshake(
        destination_socket_id=A_ID,
        socket_type=SocketType.STREAM,
        initial_sequence_number=B_ISN,
        mss=1500,
        flow_window=8192,
        request_type=RequestType.RESPONSE,
        socket_id=B_ID,
    )
    pair.a.receive_datagram(encode_packet(late), B, 1.0)
    (answer,) = [decode_packet(d) for d, _ in pair.a.datagrams_to_send(1.0)]
    assert isinstance(answer, Handshake)
    assert answer.request_type == RequestType.RENDEZVOUS_RESPONSE


def test_the_caller_holds_data_that_beats_the_handshake_response() -> None:
    listener = UdtListener(secret=SECRET)
    a = UdtConnection.connect(B, socket_id=A_ID, isn=A_ISN, now=0.0, random=seeded(1).random)
    (request, _), *_ = a.datagrams_to_send(0.0)
    reply = listener.receive_datagram(request, A, 0.0)
    assert reply is not None
    assert not isinstance(reply, ConnectionRequest)
    a.receive_datagram(reply.datagram, B, 0.0)
    (confirm, _), *_ = a.datagrams_to_send(0.0)
    request2 = listener.receive_datagram(confirm, A, 0.0)
    assert isinstance(request2, ConnectionRequest)
    accepted = listener.accept(request2, socket_id=B_ID)
    b = UdtConnection.accepted(accepted, now=0.0, random=seeded(2).random)
    b.send(b"server speaks first")
    # The response is lost; b's data arrives at a, still waiting for it.
    for data, _ in b.datagrams_to_send(0.0):
        a.receive_datagram(data, B, 0.01)
    assert state(a) is ConnectionState.CONNECTING
    assert a.counters.held == 1
    a.receive_datagram(accepted.response, B, 0.3)  # the multiplexer resends it
    assert state(a) is ConnectionState.CONNECTED
    assert received(a) == b"server speaks first"


# --- timers -----------------------------------------------------------------------------------


def test_exp_resends_everything_unacknowledged_with_backoff() -> None:
    config = UdtConfig(congestion=FixedRate.factory())
    pair = connected(config)
    pair.drop_ab = lambda _: True  # nothing reaches b
    pair.a.send(b"y" * 3000)
    pair.exchange()
    assert [kind(d) for d in pair.sent_ab].count("DataPacket") == 3
    # core.cpp: the n-th expiry comes n * (RTT + 4 RTTVar) + SYN after the last (at
    # least n * 300 ms); with no ACK the estimates are still 100 ms and 50 ms.
    first = 0.1 + 4 * 0.05 + 0.01
    second = first + 2 * (0.1 + 4 * 0.05) + 0.01
    pair.advance(first - 0.001)
    assert pair.a.counters.timeouts == 0
    pair.advance(first + 0.001)
    assert pair.a.counters.timeouts == 1
    assert pair.a.counters.packets_retransmitted == 3
    assert [kind(d) for d in pair.sent_ab].count("DataPacket") == 6
    pair.advance(second - 0.001)
    assert pair.a.counters.timeouts == 1
    pair.advance(second + 0.001)
    assert pair.a.counters.timeouts == 2
    assert first > MIN_EXP_INTERVAL
    congestion = pair.a.congestion
    assert isinstance(congestion, FixedRate)
    assert congestion.timeouts == 2
    pair.drop_ab = lambda _: False
    pair.advance(3.0)
    assert pair.b is not None
    assert received(pair.b) == b"y" * 3000


def test_keep_alive_after_a_second_of_silence_and_none_while_busy() -> None:
    pair = connected()
    pair.sent_ab.clear()
    pair.advance(KEEPALIVE_INTERVAL * 0.9)
    assert pair.sent_ab == []
    pair.advance(KEEPALIVE_INTERVAL * 1.1)
    assert [kind(d) for d in pair.sent_ab] == ["KeepAlive"]
    assert pair.a.counters.keepalives_sent == 1
    pair.advance(20.0)  # keep-alives both ways: neither side idles out
    assert state(pair.a) is ConnectionState.CONNECTED
    assert pair.b is not None
    assert state(pair.b) is ConnectionState.CONNECTED


def test_idle_timeout_when_the_peer_falls_silent() -> None:
    pair = connected(UdtConfig(idle_timeout=3.0))
    pair.drop_ba = lambda _: True
    pair.advance(2.9)
    assert state(pair.a) is ConnectionState.CONNECTED
    pair.advance(3.1)
    (closed,) = events(pair.a)
    assert closed == ConnectionClosed(
        reason=CloseReason.TIMEOUT, detail="nothing heard from the peer for 3 s"
    )


def test_acks_every_syn_and_ack2_measures_the_rtt() -> None:
    pair = connected()
    pair.a.send(b"r" * 50_000)
    for step in range(1, 40):
        pair.advance(step * 0.005)
    assert pair.b is not None
    assert received(pair.b) == b"r" * 50_000
    assert pair.b.counters.acks_sent >= 1
    assert pair.b.counters.ack2s_received >= 1
    # Datagrams cross instantly here: the RTT estimate falls from 100 ms toward 0.
    assert pair.b.rtt < 0.1


def test_a_sender_takes_the_peers_first_measured_rtt_and_folds_the_rest() -> None:
    # A pure sender gets no ACK2 of its own: its RTT is what the receiver's ACKs report.
    # Folded into the 100 ms placeholder at 1/8 an ACK, a 0.2 ms path still read 7 ms
    # after half a second, and EXP waited on it.
    c = lone(UdtConfig(congestion=FixedRate.factory()))
    c.send(b"s" * 5000)
    c.datagrams_to_send(0.0)

    def ack(number: int, sequence: int, rtt_us: int, variance_us: int) -> bytes:
        return control(
            Ack(
                destination_socket_id=A_ID,
                ack_number=number,
                sequence_number=A_ISN + sequence,
                rtt=rtt_us,
                rtt_variance=variance_us,
                available_buffer=100,
            )
        )

    c.receive_datagram(ack(1, 1, 100_000, 50_000), B, 0.01)  # the peer's placeholders
    assert c.rtt == pytest.approx(0.1)
    c.receive_datagram(ack(2, 2, 200, 100), B, 0.02)
    assert c.rtt == pytest.approx(0.0002)
    assert c.rtt_variance == pytest.approx(0.0001)
    c.receive_datagram(ack(3, 3, 1000, 100), B, 0.03)
    assert c.rtt == pytest.approx((7 * 200 + 1000) // 8 / 1e6)


def test_a_sender_folds_a_first_reported_rtt_longer_than_the_placeholder() -> None:
    # A peer cannot stretch our timers at once: only a shorter first report replaces.
    c = lone(UdtConfig(congestion=FixedRate.factory()))
    c.send(b"s" * 5000)
    c.datagrams_to_send(0.0)
    slow = Ack(
        destination_socket_id=A_ID,
        ack_number=1,
        sequence_number=A_ISN + 1,
        rtt=900_000,
        rtt_variance=1000,
        available_buffer=100,
    )
    c.receive_datagram(control(slow), B, 0.01)
    assert c.rtt == pytest.approx((7 * 100_000 + 900_000) // 8 / 1e6)


# --- close and abort ----------------------------------------------------------------------


def test_close_waits_for_the_ack_of_everything_then_sends_shutdown() -> None:
    pair = connected()
    pair.a.send(b"z" * 5000)
    pair.a.close(pair.now)
    assert state(pair.a) is ConnectionState.CLOSING
    with pytest.raises(LocalProtocolError):
        pair.a.send(b"no")
    assert pair.a.send_space == 0
    pair.advance(0.1)
    assert events(pair.a) == [ConnectionClosed(reason=CloseReason.LOCAL_CLOSE, detail="closed")]
    assert pair.b is not None
    b_events = events(pair.b)
    assert b"".join(e.data for e in b_events if isinstance(e, DataReceived)) == b"z" * 5000
    assert b_events[-1] == ConnectionClosed(
        reason=CloseReason.PEER_CLOSED, detail="the peer sent Shutdown"
    )
    assert pair.a.get_timer() is None
    assert pair.b.get_timer() is None


def test_close_gives_up_after_the_linger() -> None:
    pair = connected(UdtConfig(linger=2.0, idle_timeout=60.0))
    pair.drop_ab = lambda data: kind(data) == "DataPacket"
    pair.a.send(b"never" * 100)
    pair.a.close(pair.now)
    pair.advance(1.9)
    assert state(pair.a) is ConnectionState.CLOSING
    pair.advance(2.1)
    (closed,) = events(pair.a)
    assert isinstance(closed, ConnectionClosed)
    assert closed.reason is CloseReason.ABORTED
    assert "linger of 2 s expired with 500 bytes unacknowledged" in closed.detail
    assert pair.b is not None
    assert events(pair.b)[-1] == ConnectionClosed(
        reason=CloseReason.PEER_ABORTED, detail="the peer aborted"
    )


def test_close_while_connecting_ends_at_once() -> None:
    a = UdtConnection.connect(B, socket_id=A_ID, isn=A_ISN, now=0.0, random=seeded(1).random)
    a.close(0.1)
    a.close(0.2)  # idempotent
    assert events(a) == [
        ConnectionClosed(
            reason=CloseReason.LOCAL_CLOSE, detail="closed before the handshake finished"
        )
    ]
    assert a.datagrams_to_send(0.2) == []


def test_abort_sends_shutdown_and_drops_the_buffers() -> None:
    pair = connected()
    pair.drop_ab = lambda data: kind(data) == "DataPacket"
    pair.a.send(b"a" * 10_000)
    pair.exchange()
    pair.a.abort(pair.now)
    pair.a.abort(pair.now)  # idempotent
    assert pair.a.send_buffer_bytes == 0
    assert events(pair.a) == [ConnectionClosed(reason=CloseReason.ABORTED, detail="aborted")]
    pair.exchange()
    assert pair.b is not None
    # The peer learns that the stream was cut short (wavesync's flag in the Shutdown).
    assert events(pair.b)[-1] == ConnectionClosed(
        reason=CloseReason.PEER_ABORTED, detail="the peer aborted"
    )


def test_a_repeated_shutdown_after_an_abort_still_says_aborted() -> None:
    pair = connected()
    pair.drop_ab = lambda data: kind(data) == "Shutdown"
    pair.a.abort(pair.now)
    pair.exchange()
    pair.drop_ab = lambda _: False
    pair.advance(KEEPALIVE_INTERVAL * 1.5)  # b's keep-alive reaches the aborted a
    assert pair.b is not None
    assert events(pair.b)[-1] == ConnectionClosed(
        reason=CloseReason.PEER_ABORTED, detail="the peer aborted"
    )


def test_a_closed_connection_repeats_its_shutdown_to_a_peer_that_missed_it() -> None:
    pair = connected()
    pair.drop_ab = lambda data: kind(data) == "Shutdown"
    pair.a.close(pair.now)
    pair.exchange()
    assert pair.b is not None
    assert state(pair.b) is ConnectionState.CONNECTED
    pair.drop_ab = lambda _: False
    pair.advance(KEEPALIVE_INTERVAL * 1.5)  # b's keep-alive reaches the closed a
    assert state(pair.b) is ConnectionState.CLOSED
    assert events(pair.b)[-1].reason is CloseReason.PEER_CLOSED  # type: ignore[attr-defined]
    shutdowns = [d for d in pair.sent_ab if kind(d) == "Shutdown"]
    assert len(shutdowns) == 2 * SHUTDOWN_COPIES  # at the close, and in answer


def test_a_graceful_close_survives_the_loss_of_two_shutdowns() -> None:
    pair = connected()
    assert SHUTDOWN_COPIES >= 3
    lost = [True, True]  # the first two Shutdowns
    pair.drop_ab = lambda data: kind(data) == "Shutdown" and bool(lost) and lost.pop()
    pair.a.send(b"all of it" * 100)
    pair.a.close(pair.now)
    pair.advance(0.5)
    assert not lost
    assert pair.b is not None
    assert state(pair.b) is ConnectionState.CLOSED  # long before the idle timeout
    received = events(pair.b)
    assert b"".join(e.data for e in received if isinstance(e, DataReceived)) == b"all of it" * 100
    assert received[-1] == ConnectionClosed(
        reason=CloseReason.PEER_CLOSED, detail="the peer sent Shutdown"
    )


def test_peer_shutdown_delivers_the_data_before_it() -> None:
    c = lone()
    c.receive_datagram(data_packet(B_ISN, b"last words"), B, 0.1)
    c.receive_datagram(control(Shutdown(destination_socket_id=A_ID)), B, 0.1)
    assert events(c) == [
        DataReceived(data=b"last words"),
        ConnectionClosed(reason=CloseReason.PEER_CLOSED, detail="the peer sent Shutdown"),
    ]


def test_a_peer_shutdown_with_packets_missing_is_an_abort_not_a_close() -> None:
    # libudt sends no abort flag; a Shutdown that leaves a hole can only mean the
    # stream was cut short, and the bytes before the hole must not pass for all.
    c = lone()
    c.receive_datagram(data_packet(B_ISN, b"first"), B, 0.1)
    c.receive_datagram(data_packet(B_ISN + 2, b"third"), B, 0.1)
    c.receive_datagram(control(Shutdown(destination_socket_id=A_ID)), B, 0.1)
    assert events(c) == [
        DataReceived(data=b"first"),
        ConnectionClosed(
            reason=CloseReason.PEER_ABORTED, detail="the peer closed with 1 packets still missing"
        ),
    ]


# --- a hostile or broken peer -----------------------------------------------------------------


def test_an_ack_of_data_never_sent_changes_nothing() -> None:
    c = lone(UdtConfig(congestion=FixedRate.factory()))
    c.send(b"k" * 3000)
    c.datagrams_to_send(0.0)
    sender = c.sender
    assert sender is not None
    before = (sender.last_ack, sender.next_seq, sender.buffered_bytes)
    hostile = Ack(
        destination_socket_id=A_ID,
        ack_number=1,
        sequence_number=A_ISN + 500,
        rtt=1,
        rtt_variance=1,
        available_buffer=10**9,
    )
    c.receive_datagram(control(hostile), B, 0.1)
    assert (sender.last_ack, sender.next_seq, sender.buffered_bytes) == before
    assert c.counters.invalid == 1
    light = LightAck(destination_socket_id=A_ID, sequence_number=A_ISN + 500)
    c.receive_datagram(control(light), B, 0.1)
    assert c.counters.invalid == 2
    good = Ack(
        destination_socket_id=A_ID,
        ack_number=2,
        sequence_number=A_ISN + 3,
        rtt=0xFFFFFFFF,  # absurd: counts as MAX_RTT
        rtt_variance=0,
        available_buffer=100,
        receive_rate=0xFFFFFFFF,  # negative for 4.11's int32: ignored
        link_capacity=0,
    )
    c.receive_datagram(control(good), B, 0.2)
    assert sender.is_idle()
    assert c.rtt <= 10.0 / 8 + 0.1


def test_a_nak_of_nothing_in_flight_is_ignored() -> None:
    c = lone(UdtConfig(congestion=FixedRate.factory()))
    c.receive_datagram(control(Nak(destination_socket_id=A_ID, losses=((1, 1000),))), B, 0.1)
    assert c.counters.invalid == 1
    assert c.datagrams_to_send(0.1) == []
    congestion = c.congestion
    assert isinstance(congestion, FixedRate)
    assert congestion.losses == []


def test_packets_from_elsewhere_or_for_others_or_malformed_are_counted_and_dropped() -> None:
    c = lone()
    c.receive_datagram(data_packet(B_ISN), ("203.0.113.9", 1), 0.1)
    c.receive_datagram(data_packet(B_ISN, destination=999), B, 0.1)
    c.receive_datagram(b"\x80\x00", B, 0.1)
    c.receive_datagram(b"\xff" * 40, B, 0.1)  # control type 0x7fff with junk: user-defined
    c.receive_datagram(b"\x80\x03" + bytes(10) + struct.pack("!I", A_ID), B, 0.1)  # empty NAK
    c.receive_datagram(control(Ack2(destination_socket_id=A_ID, ack_number=77)), B, 0.1)
    drop = MessageDropRequest(
        destination_socket_id=A_ID,
        message_number=1,
        first_sequence_number=B_ISN,
        last_sequence_number=B_ISN + 5,
    )
    c.receive_datagram(control(drop), B, 0.1)
    counters = c.counters
    assert counters.wrong_source == 1
    assert counters.wrong_destination == 2  # 0xffffffff is not our id either
    assert counters.malformed == 2
    assert counters.invalid == 1  # the ACK2 of an ACK never sent
    assert counters.drop_requests_received == 1
    assert events(c) == []
    assert state(c) is ConnectionState.CONNECTED


def test_data_far_outside_the_window_is_dropped() -> None:
    c = lone(UdtConfig(receive_buffer_packets=16))
    c.receive_datagram(data_packet(B_ISN + 16), B, 0.1)
    c.receive_datagram(data_packet(B_ISN - 1), B, 0.1)
    c.receive_datagram(data_packet((B_ISN + 2**30 - 1) & 0x7FFFFFFF), B, 0.1)
    assert c.counters.packets_out_of_window == 2
    assert c.counters.packets_duplicate == 1
    assert c.receive_buffer_packets == 0


def test_keep_alive_and_heard_packets_postpone_the_idle_timeout() -> None:
    c = lone(UdtConfig(idle_timeout=2.0))
    for step in range(1, 10):
        now = step * 1.5
        c.receive_datagram(control(KeepAlive(destination_socket_id=A_ID)), B, now)
        c.handle_timer(now)
        c.datagrams_to_send(now)
    assert state(c) is ConnectionState.CONNECTED


# --- configuration and misuse -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"mss": 75}, "MSS 75 is outside 76..65535"),
        ({"flow_window": 1}, "flow window 1 is outside 2..2**20"),
        ({"send_buffer_bytes": 100}, "send buffer of 100 bytes cannot hold one packet"),
        ({"receive_buffer_packets": 1}, "receive buffer of 1 packets is outside 2..2**20"),
        ({"idle_timeout": 0.0}, "idle timeout 0.0 is not positive"),
        ({"linger": -1.0}, "linger -1.0 is not a duration"),
    ],
)
def test_impossible_settings_are_refused(settings: dict[str, float], message: str) -> None:
    with pytest.raises(LocalProtocolError, match=f"^{re.escape(message)}$"):
        UdtConfig(**settings)  # type: ignore[arg-type]


def test_a_time_to_live_needs_message_mode() -> None:
    c = lone()
    with pytest.raises(LocalProtocolError, match="needs a DGRAM connection"):
        c.send(b"x", ttl=1.0)
    dgram = lone(UdtConfig(socket_type=SocketType.DGRAM))
    assert dgram.send(b"x", ttl=1.0) == 1


def test_a_message_too_big_for_the_send_buffer_is_refused_whole() -> None:
    c = lone(UdtConfig(socket_type=SocketType.DGRAM, send_buffer_bytes=3000))
    assert c.send(b"m" * 3001) == 0
    assert c.send(b"m" * 3000) == 3000
    assert c.send_space == 0


def test_a_lost_first_ack_is_repeated_within_a_syn_until_the_rtt_is_measured() -> None:
    # A libudt caller drops what arrives just after its connect() returns: often the
    # first ACK. 4.11 would repeat it after RTT + 4 RTTVar = 300 ms (placeholders).
    pair = connected()
    acks = 0

    def drop_first_ack(data: bytes) -> bool:
        nonlocal acks
        if kind(data) == "Ack":
            acks += 1
            return acks == 1
        return False

    pair.drop_ba = drop_first_ack
    pair.a.send(b"q" * 1000)
    pair.advance(0.0)
    assert acks == 1
    pair.advance(0.011)
    assert acks == 2  # repeated one SYN later
    assert pair.a.send_buffer_bytes == 0
    # Measured now (the ACK2 came back): later repeats wait RTT + 4 RTTVar again.
    assert pair.b is not None
    assert pair.b.counters.ack2s_received == 1


def test_a_rendezvous_peer_is_connected_by_the_others_data_when_the_answer_is_lost() -> None:
    a = UdtConnection.rendezvous([B], socket_id=A_ID, isn=A_ISN, now=0.0, random=seeded(1).random)
    b = UdtConnection.rendezvous([A], socket_id=B_ID, isn=B_ISN, now=0.0, random=seeded(2).random)
    b.send(b"first words")
    pair = Pair(a, b)
    minus_two = RequestType.RENDEZVOUS_RESPONSE

    def drop_answer(data: bytes) -> bool:
        packet = decode_packet(data)
        return isinstance(packet, Handshake) and packet.request_type == minus_two

    pair.drop_ba = drop_answer
    pair.exchange(3)
    # b connected on a's -1 and sent its -2 (lost) and its data: the data connected a.
    assert state(b) is ConnectionState.CONNECTED
    assert state(a) is ConnectionState.CONNECTED
    assert pair.now == 0.0  # not a's next request, 250 ms later
    assert received(a) == b"first words"
    assert b.counters.packets_retransmitted == 0
