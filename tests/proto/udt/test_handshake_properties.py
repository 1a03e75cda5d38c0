"""Hypothesis properties of the UDT handshake: loss, duplication and reordering never
produce two ends that disagree, and no datagram makes a machine raise."""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wavesync_proto.addresses import Endpoint
from wavesync_proto.udt import Handshake, encode_packet
from wavesync_proto.udt.handshake import (
    FailureReason,
    HandshakeEstablished,
    HandshakeFailed,
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
SECRET = b"0123456789abcdef"
HORIZON = 40.0  # past the rendezvous timeout, so every attempt has ended


@dataclass
class LossyNetwork:
    """Datagrams in flight, each lost, duplicated or delayed (so reordered) at random."""

    rng: random.Random
    loss: float
    duplication: float
    max_delay: float
    in_flight: list[tuple[float, int, bytes, Endpoint, Endpoint]] = field(default_factory=list)
    sequence: int = 0

    def send(self, data: bytes, source: Endpoint, destination: Endpoint, now: float) -> None:
        copies = 2 if self.rng.random() < self.duplication else 1
        for _ in range(copies):
            if self.rng.random() < self.loss:
                continue
            self.sequence += 1
            arrival = now + self.rng.uniform(0.0, self.max_delay)
            heapq.heappush(self.in_flight, (arrival, self.sequence, data, source, destination))

    def next_arrival(self) -> float | None:
        return self.in_flight[0][0] if self.in_flight else None

    def pop_due(self, now: float) -> list[tuple[bytes, Endpoint, Endpoint]]:
        due = []
        while self.in_flight and self.in_flight[0][0] <= now:
            _, _, data, source, destination = heapq.heappop(self.in_flight)
            due.append((data, source, destination))
        return due


networks = st.builds(
    LossyNetwork,
    rng=st.randoms(use_true_random=False),
    loss=st.sampled_from([0.0, 0.1, 0.3, 0.6, 0.9]),
    duplication=st.sampled_from([0.0, 0.2, 0.5]),
    max_delay=st.sampled_from([0.001, 0.1, 0.4, 1.5]),
)
# Start anywhere, including a few ms before a cookie bucket ends.
starts = st.one_of(st.floats(0, 10_000), st.integers(1, 100).map(lambda n: n * 60.0 - 0.01))
socket_ids = st.integers(1, 0x7FFFFFFF)
isns = st.integers(0, 0x7FFFFFFF)
mss_values = st.integers(76, 9000)
windows = st.integers(1, 100_000)


def next_time(now: float, *timers: float | None) -> float:
    pending = [t for t in timers if t is not None]
    return max(now, min(pending)) if pending else HORIZON + now


@pytest.mark.property
@given(
    network=networks,
    start=starts,
    caller_id=socket_ids,
    isn=isns,
    caller_mss=mss_values,
    listener_mss=mss_values,
    caller_window=windows,
    listener_window=windows,
    accepted_ids=st.lists(socket_ids, min_size=4, max_size=4),
)
def test_regular_connect_never_ends_mismatched(
    *,
    network: LossyNetwork,
    start: float,
    caller_id: int,
    isn: int,
    caller_mss: int,
    listener_mss: int,
    caller_window: int,
    listener_window: int,
    accepted_ids: list[int],
) -> None:
    caller = UdtHandshake.caller(
        SERVER, socket_id=caller_id, isn=isn, now=start, mss=caller_mss, flow_window=caller_window
    )
    listener = UdtListener(secret=SECRET, mss=listener_mss, flow_window=listener_window)
    accepted: dict[tuple[Endpoint, int, int], AcceptedHandshake] = {}
    now = start
    while now < start + HORIZON:
        caller.handle_timer(now)
        for data, destination in caller.datagrams_to_send(now):
            network.send(data, CLIENT, destination, now)
        for data, source, destination in network.pop_due(now):
            if destination == CLIENT:
                caller.receive_datagram(data, source, now)
                continue
            outcome = listener.receive_datagram(data, source, now)
            if isinstance(outcome, ListenerReply):
                network.send(outcome.datagram, SERVER, outcome.destination, now)
            elif isinstance(outcome, ConnectionRequest):
                known = accepted.get(outcome.key)
                if known is None:
                    known = listener.accept(outcome, socket_id=accepted_ids[len(accepted) % 4])
                    accepted[outcome.key] = known
                network.send(known.response, SERVER, known.destination, now)
        if caller.result is not None and network.next_arrival() is None:
            break
        now = next_time(now, caller.get_timer(), network.next_arrival())

    result = caller.result
    assert result is not None
    assert len(accepted) <= 1, "a repeated request made a second connection"
    if network.loss == 0.0 and network.max_delay < 0.25:
        assert isinstance(result, HandshakeEstablished)
    if isinstance(result, HandshakeFailed):
        assert result.reason is FailureReason.TIMEOUT
        assert result == caller.next_event()
        return
    assert isinstance(result, HandshakeEstablished)
    assert len(accepted) == 1
    (server_side,) = (entry.established for entry in accepted.values())
    assert result.mss == server_side.mss == min(caller_mss, listener_mss)
    assert result.peer_isn == server_side.local_isn
    assert server_side.peer_isn == result.local_isn == isn
    assert result.peer_socket_id == server_side.local_socket_id
    assert server_side.peer_socket_id == result.local_socket_id == caller_id
    assert result.flow_window == listener_window
    assert server_side.flow_window == caller_window
    assert (result.peer_address, server_side.peer_address) == (SERVER, CLIENT)


def check_rendezvous(
    a: UdtHandshake,
    b: UdtHandshake,
    *,
    lossless: bool,
    mss_pair: tuple[int, int],
    ids: tuple[int, int],
) -> None:
    if lossless:
        assert isinstance(a.result, HandshakeEstablished)
        assert isinstance(b.result, HandshakeEstablished)
    for machine in (a, b):
        assert isinstance(machine.result, HandshakeEstablished | HandshakeFailed)
        if isinstance(machine.result, HandshakeFailed):
            assert machine.result.reason is FailureReason.TIMEOUT
    ea, eb = a.result, b.result
    if isinstance(ea, HandshakeEstablished) and isinstance(eb, HandshakeEstablished):
        assert ea.mss == eb.mss == min(mss_pair)
        assert (ea.peer_isn, eb.peer_isn) == (eb.local_isn, ea.local_isn)
        assert (ea.peer_socket_id, eb.peer_socket_id) == (eb.local_socket_id, ea.local_socket_id)
    # Even when only one end made it, it made it with the other's real socket id.
    for machine, other_id in ((a, ids[1]), (b, ids[0])):
        if isinstance(machine.result, HandshakeEstablished):
            assert machine.result.peer_socket_id == other_id
    assert a.peer_address in (None, PEER_B)


@pytest.mark.property
@given(
    network=networks,
    start=starts,
    ids=st.tuples(socket_ids, socket_ids),
    isn_pair=st.tuples(isns, isns),
    mss_pair=st.tuples(mss_values, mss_values),
    window_pair=st.tuples(windows, windows),
    b_starts_late=st.floats(0, 5),
)
def test_rendezvous_never_ends_mismatched(
    *,
    network: LossyNetwork,
    start: float,
    ids: tuple[int, int],
    isn_pair: tuple[int, int],
    mss_pair: tuple[int, int],
    window_pair: tuple[int, int],
    b_starts_late: float,
) -> None:
    a = UdtHandshake.rendezvous(
        [("10.0.0.9", 1), PEER_B],
        socket_id=ids[0],
        isn=isn_pair[0],
        now=start,
        mss=mss_pair[0],
        flow_window=window_pair[0],
    )
    b: UdtHandshake | None = None
    now = start
    while now < start + HORIZON:
        if b is None and now >= start + b_starts_late:
            b = UdtHandshake.rendezvous(
                [PEER_A],
                socket_id=ids[1],
                isn=isn_pair[1],
                now=now,
                mss=mss_pair[1],
                flow_window=window_pair[1],
            )
        sides = [(a, PEER_A)] + ([(b, PEER_B)] if b is not None else [])
        for machine, address in sides:
            machine.handle_timer(now)
            for data, destination in machine.datagrams_to_send(now):
                network.send(data, address, destination, now)
        for data, source, destination in network.pop_due(now):
            if destination == PEER_A:
                a.receive_datagram(data, source, now)
            elif destination == PEER_B and b is not None:
                b.receive_datagram(data, source, now)
        done = b is not None and a.result is not None and b.result is not None
        if done and network.next_arrival() is None:
            break
        timers = [machine.get_timer() for machine, _ in sides]
        late_start = start + b_starts_late if b is None else None
        now = next_time(now, *timers, network.next_arrival(), late_start)

    assert b is not None
    check_rendezvous(a, b, lossless=network.loss == 0.0, mss_pair=mss_pair, ids=ids)
    assert (a.result, b.result) != (None, None)
    for machine, other_isn in ((a, isn_pair[1]), (b, isn_pair[0])):
        if isinstance(machine.result, HandshakeEstablished):
            assert machine.result.peer_isn == other_isn
    if isinstance(a.result, HandshakeEstablished) and isinstance(b.result, HandshakeEstablished):
        assert (a.result.flow_window, b.result.flow_window) == (window_pair[1], window_pair[0])


handshake_fields = st.builds(
    Handshake,
    destination_socket_id=st.sampled_from([0, 5, 111]) | st.integers(0, 2**32 - 1),
    version=st.sampled_from([0, 4]) | st.integers(0, 2**32 - 1),
    socket_type=st.sampled_from([1, 2]) | st.integers(0, 2**32 - 1),
    initial_sequence_number=st.sampled_from([1000]) | st.integers(0, 0x7FFFFFFF),
    mss=st.integers(0, 2**32 - 1),
    flow_window=st.integers(0, 2**32 - 1),
    request_type=st.sampled_from([1, 0, -1, -2, 1002]) | st.integers(-(2**31), 2**31 - 1),
    socket_id=st.integers(0, 2**32 - 1),
    cookie=st.integers(0, 2**32 - 1),
    peer_ip=st.binary(min_size=16, max_size=16),
)
datagrams = st.one_of(st.binary(max_size=80), handshake_fields.map(encode_packet))
sources = st.sampled_from([SERVER, CLIENT, PEER_A, PEER_B, ("::1", 1)])


@pytest.mark.property
@settings(max_examples=300)
@given(inputs=st.lists(st.tuples(datagrams, sources, st.floats(0, 50)), max_size=30))
def test_arbitrary_datagrams_never_raise(inputs: list[tuple[bytes, Endpoint, float]]) -> None:
    caller = UdtHandshake.caller(SERVER, socket_id=111, isn=1000, now=0.0)
    rendezvous = UdtHandshake.rendezvous([PEER_B, SERVER], socket_id=5, isn=50, now=0.0)
    listener = UdtListener(secret=SECRET)
    now = 0.0
    for data, source, delay in inputs:
        now += delay
        for machine in (caller, rendezvous):
            machine.receive_datagram(data, source, now)
            machine.handle_timer(now)
            for out, _ in machine.datagrams_to_send(now):
                assert isinstance(out, bytes)
        outcome = listener.receive_datagram(data, source, now)
        if isinstance(outcome, ConnectionRequest):
            accepted = listener.accept(outcome, socket_id=9)
            assert accepted.established.peer_address == source
        else:
            assert outcome is None or isinstance(outcome, ListenerReply)
    for machine in (caller, rendezvous):
        events = [machine.next_event(), machine.next_event()]
        assert events[1] is None
        assert events[0] == machine.result
