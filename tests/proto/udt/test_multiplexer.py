"""UdtMultiplexer: routing by socket id, the listener, rendezvous by address, hole reuse.

Two multiplexers, each standing for one UDP socket, talk through the seeded in-memory
network of tests/netsim.py on a hand-moved clock.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from typing import Any

import pytest

from wavesync_proto.addresses import Endpoint
from wavesync_proto.errors import LocalProtocolError
from wavesync_proto.udt import encode_packet
from wavesync_proto.udt.connection import UdtConnection
from wavesync_proto.udt.connection_types import (
    CloseReason,
    ConnectionClosed,
    ConnectionEstablished,
    ConnectionState,
    DataReceived,
    UdtConfig,
)
from wavesync_proto.udt.multiplexer import ConnectionAccepted, UdtMultiplexer
from wavesync_proto.udt.packet_types import Handshake, KeepAlive, RequestType, SocketType

from ...netsim import LinkConfig, Network, run_until

CLIENT: Endpoint = ("192.0.2.1", 4000)
SERVER: Endpoint = ("198.51.100.2", 5000)
NOWHERE: Endpoint = ("203.0.113.9", 6000)
SECRET = b"0123456789abcdef"


def make_mux(seed: int, *, max_connections: int = 1024) -> UdtMultiplexer:
    rng = random.Random(seed)  # noqa: S311 - reproducible ids for a test, not secrets
    return UdtMultiplexer(
        now=0.0,
        random_bits=rng.getrandbits,
        cookie_secret=SECRET,
        max_connections=max_connections,
    )


def make_network(seed: int = 1) -> Network:
    network = Network(seed)
    config = LinkConfig(delay=0.005)
    network.link(CLIENT, SERVER, config)
    network.link(CLIENT, NOWHERE, config)
    return network


def drain(connection: UdtConnection) -> tuple[bytes, list[object]]:
    """The bytes received so far and every other event, in order."""
    data = bytearray()
    others: list[object] = []
    while (event := connection.next_event()) is not None:
        if isinstance(event, DataReceived):
            data += event.data
        else:
            others.append(event)
    return bytes(data), others


def accepted(mux: UdtMultiplexer) -> list[UdtConnection]:
    found = []
    while (event := mux.next_event()) is not None:
        assert isinstance(event, ConnectionAccepted)
        found.append(event.connection)
    return found


def test_a_connect_reaches_the_listener_and_carries_bytes_both_ways() -> None:
    network = make_network()
    client, server = make_mux(1), make_mux(2)
    server.listen()
    endpoints = {CLIENT: client, SERVER: server}
    outgoing = client.connect(SERVER, network.now)
    run_until(network, endpoints, stop=lambda: outgoing.state is ConnectionState.CONNECTED)
    (incoming,) = accepted(server)
    assert incoming.state is ConnectionState.CONNECTED
    assert incoming.peer_socket_id == outgoing.socket_id
    assert outgoing.peer_socket_id == incoming.socket_id
    assert server.counters.accepted == 1

    up, down = bytes(range(256)) * 400, b"pong" * 10_000
    assert outgoing.send(up) == len(up)
    assert incoming.send(down) == len(down)
    received_up = bytearray()
    received_down = bytearray()

    def both_arrived() -> bool:
        received_up.extend(drain(incoming)[0])
        received_down.extend(drain(outgoing)[0])
        return len(received_up) == len(up) and len(received_down) == len(down)

    run_until(network, endpoints, until=network.now + 30, stop=both_arrived)
    assert bytes(received_up) == up
    assert bytes(received_down) == down


def test_several_connections_share_one_socket_each_with_its_own_bytes() -> None:
    network = make_network()
    client, server = make_mux(3), make_mux(4)
    server.listen()
    endpoints = {CLIENT: client, SERVER: server}
    outgoing = [client.connect(SERVER, network.now) for _ in range(5)]
    assert len({c.socket_id for c in outgoing}) == 5
    run_until(
        network,
        endpoints,
        stop=lambda: all(c.state is ConnectionState.CONNECTED for c in outgoing),
    )
    incoming = {c.peer_socket_id: c for c in accepted(server)}
    assert set(incoming) == {c.socket_id for c in outgoing}
    for index, connection in enumerate(outgoing):
        connection.send(bytes([index]) * 50_000)
    received: dict[int, bytearray] = {c.socket_id: bytearray() for c in outgoing}

    def all_arrived() -> bool:
        for socket_id, connection in incoming.items():
            assert socket_id is not None
            received[socket_id].extend(drain(connection)[0])
        return all(len(data) == 50_000 for data in received.values())

    run_until(network, endpoints, until=network.now + 30, stop=all_arrived)
    for index, connection in enumerate(outgoing):
        assert bytes(received[connection.socket_id]) == bytes([index]) * 50_000


def test_a_repeated_request_gets_the_same_response_not_a_second_connection() -> None:
    # The server's first response is lost: the caller repeats its cookie response and
    # the multiplexer answers from the connection it already made.
    client, server = make_mux(5), make_mux(6)
    server.listen()
    outgoing = client.connect(SERVER, 0.0)
    # Hand-route: request -> challenge -> cookie response -> (response lost) -> repeat.
    for data, destination in client.datagrams_to_send(0.0):
        assert destination == SERVER
        assert server.receive_datagram(data, CLIENT, 0.0)
    for data, _ in server.datagrams_to_send(0.0):
        client.receive_datagram(data, SERVER, 0.0)
    for data, _ in client.datagrams_to_send(0.0):
        server.receive_datagram(data, CLIENT, 0.0)
    first_response = server.datagrams_to_send(0.0)
    assert len(accepted(server)) == 1
    timer = client.get_timer()
    assert timer is not None
    client.handle_timer(timer)
    repeats = client.datagrams_to_send(timer)
    assert repeats
    for data, _ in repeats:
        server.receive_datagram(data, CLIENT, timer)
    second_response = [d for d in server.datagrams_to_send(timer) if d in first_response]
    assert second_response
    assert server.counters.repeated_requests >= 1
    assert accepted(server) == []
    assert len(server.connections) == 1
    for data, _ in second_response:
        client.receive_datagram(data, SERVER, timer)
    assert outgoing.state is ConnectionState.CONNECTED


def test_rendezvous_finds_the_right_candidate_and_a_second_one_reuses_the_hole() -> None:
    network = make_network(seed=7)
    left, right = make_mux(8), make_mux(9)
    endpoints = {CLIENT: left, SERVER: right}
    first_left = left.rendezvous([NOWHERE, SERVER], network.now)
    first_right = right.rendezvous([CLIENT], network.now)
    run_until(
        network,
        {**endpoints, NOWHERE: _Sink()},
        stop=lambda: (
            first_left.state is ConnectionState.CONNECTED
            and first_right.state is ConnectionState.CONNECTED
        ),
    )
    assert first_left.peer_address == SERVER
    assert first_left.peer_socket_id == first_right.socket_id

    # Hole reuse: both ends start another rendezvous on the same sockets while the
    # first connection lives on; each pairs with its own counterpart.
    second_left = left.rendezvous([SERVER], network.now)
    second_right = right.rendezvous([CLIENT], network.now)
    run_until(
        network,
        {**endpoints, NOWHERE: _Sink()},
        until=network.now + 5,
        stop=lambda: (
            second_left.state is ConnectionState.CONNECTED
            and second_right.state is ConnectionState.CONNECTED
        ),
    )
    assert second_left.peer_socket_id == second_right.socket_id
    assert second_right.peer_socket_id == second_left.socket_id
    first_left.send(b"first" * 1000)
    second_left.send(b"second" * 1000)
    got_first, got_second = bytearray(), bytearray()

    def arrived() -> bool:
        got_first.extend(drain(first_right)[0])
        got_second.extend(drain(second_right)[0])
        return len(got_first) == 5000 and len(got_second) == 6000

    run_until(network, {**endpoints, NOWHERE: _Sink()}, until=network.now + 10, stop=arrived)
    assert bytes(got_first) == b"first" * 1000
    assert bytes(got_second) == b"second" * 1000


def test_a_stun_datagram_is_handed_back_and_short_ones_too() -> None:
    mux = make_mux(10)
    fingerprint = struct.pack("!HHI", 0x8028, 4, 0)  # any attribute: only the framing counts
    stun = struct.pack("!HH", 0x0001, len(fingerprint)) + b"\x21\x12\xa4\x42" + bytes(12)
    stun += fingerprint
    assert mux.receive_datagram(stun, SERVER, 0.0) is False
    assert mux.receive_datagram(b"\x00" * 15, SERVER, 0.0) is False
    assert mux.counters.not_udt == 2


def test_datagrams_for_unknown_ids_and_unsolicited_requests_are_counted_and_dropped() -> None:
    mux = make_mux(11)
    keep_alive = encode_packet(KeepAlive(destination_socket_id=12345))
    assert mux.receive_datagram(keep_alive, SERVER, 0.0) is True
    request = encode_packet(
        Handshake(
            socket_type=SocketType.STREAM,
            initial_sequence_number=1,
            mss=1500,
            flow_window=8192,
            request_type=RequestType.REGULAR,
            socket_id=77,
        )
    )
    assert mux.receive_datagram(request, SERVER, 0.0) is True  # not listening
    assert mux.counters.unknown_destination == 1
    assert mux.counters.unrouted_handshakes == 1
    assert mux.datagrams_to_send(0.0) == []
    mux.listen()
    mux.receive_datagram(request, SERVER, 0.0)
    ((challenge, destination),) = mux.datagrams_to_send(0.0)  # a cookie challenge, no state
    assert destination == SERVER
    assert mux.connections == {}
    assert challenge != request


def test_a_full_listener_refuses_and_the_caller_fails_with_a_reason() -> None:
    network = make_network()
    client, server = make_mux(12), make_mux(13, max_connections=1)
    server.listen()
    endpoints = {CLIENT: client, SERVER: server}
    first = client.connect(SERVER, network.now)
    run_until(network, endpoints, stop=lambda: first.state is ConnectionState.CONNECTED)
    second = client.connect(SERVER, network.now)
    run_until(
        network,
        endpoints,
        until=network.now + 10,
        stop=lambda: second.state is ConnectionState.CLOSED,
    )
    _, events = drain(second)
    assert isinstance(events[-1], ConnectionClosed)
    assert events[-1].reason is CloseReason.HANDSHAKE_FAILED
    assert server.counters.rejected >= 1
    with pytest.raises(LocalProtocolError, match="already has 1 connections"):
        server.connect(CLIENT, network.now)


def test_closed_connections_are_forgotten() -> None:
    network = make_network()
    client, server = make_mux(14), make_mux(15)
    server.listen()
    endpoints = {CLIENT: client, SERVER: server}
    outgoing = client.connect(SERVER, network.now)
    run_until(network, endpoints, stop=lambda: outgoing.state is ConnectionState.CONNECTED)
    (incoming,) = accepted(server)
    _, events = drain(outgoing)
    assert any(isinstance(e, ConnectionEstablished) for e in events)
    outgoing.close(network.now)
    run_until(
        network,
        endpoints,
        until=network.now + 10,
        stop=lambda: not client.connections and not server.connections,
    )
    assert incoming.state is ConnectionState.CLOSED
    _, events = drain(incoming)
    assert isinstance(events[-1], ConnectionClosed)
    assert events[-1].reason is CloseReason.PEER_CLOSED


class _Sink:
    """An address that swallows everything (a candidate nobody answers on)."""

    def receive_datagram(self, data: bytes, addr: Endpoint, now: float) -> None:
        pass

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Endpoint]]:
        return []

    def get_timer(self) -> float | None:
        return None

    def handle_timer(self, now: float) -> None:
        pass


def test_a_late_rendezvous_request_reaches_the_connection_it_belongs_to() -> None:
    # The right side's first request (to id 0) is held back until both sides are
    # connected: the left side never routed a request of that peer by address, and
    # the late request must still reach its connection (which answers it with -2).
    left, right = make_mux(16), make_mux(17)
    outgoing = left.rendezvous([SERVER], 0.0)
    late = right.rendezvous([CLIENT], 0.0)
    held_back = right.datagrams_to_send(0.0)
    now = 0.0
    while ConnectionState.CONNECTING in (outgoing.state, late.state):
        assert now < 2.0, "the rendezvous did not complete"
        for data, _ in left.datagrams_to_send(now):
            right.receive_datagram(data, CLIENT, now)
        for data, _ in right.datagrams_to_send(now):
            left.receive_datagram(data, SERVER, now)
        now += 0.05
        left.handle_timer(now)
        right.handle_timer(now)
    assert outgoing.peer_socket_id == late.socket_id
    left.datagrams_to_send(now)
    for data, _ in held_back:
        assert left.receive_datagram(data, SERVER, now)
    assert left.counters.unrouted_handshakes == 0
    assert [address for _, address in left.datagrams_to_send(now)] == [SERVER]


# --- a turn costs O(active connections): the timer heap and the ready set ---------------


class _Calls:
    """Which connections the multiplexer asked for their timer, datagrams or timer run."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.by_id: dict[int, int] = {}
        for name in ("get_timer", "handle_timer", "datagrams_to_send"):
            original = getattr(UdtConnection, name)
            monkeypatch.setattr(UdtConnection, name, self._counting(original))

    def _counting(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def counted(connection: UdtConnection, *args: Any) -> Any:
            self.by_id[connection.socket_id] = self.by_id.get(connection.socket_id, 0) + 1
            return original(connection, *args)

        return counted


def _idle_and_busy(
    idle: int,
) -> tuple[Network, dict[Endpoint, UdtMultiplexer], UdtConnection, UdtConnection]:
    """``idle`` established connections and one more, the busy one, between two sockets."""
    network = make_network()
    client, server = make_mux(30, max_connections=idle + 1), make_mux(31)
    server.listen()
    endpoints: dict[Endpoint, UdtMultiplexer] = {CLIENT: client, SERVER: server}
    outgoing = [client.connect(SERVER, network.now) for _ in range(idle + 1)]
    run_until(
        network,
        endpoints,
        stop=lambda: all(c.state is ConnectionState.CONNECTED for c in outgoing),
    )
    busy = outgoing[-1]
    (busy_server,) = (c for c in server.connections.values() if c.peer_socket_id == busy.socket_id)
    for mux in (client, server):
        accepted(mux)
        for connection in mux.connections.values():
            drain(connection)
        mux.get_timer()  # reads the timers the events taken may have moved, once
    return network, endpoints, busy, busy_server


def test_a_bulk_transfer_beside_1000_idle_connections_looks_at_the_busy_one_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    network, endpoints, busy, busy_server = _idle_and_busy(1000)
    started = network.now
    client, server = endpoints[CLIENT], endpoints[SERVER]
    # Idle connections sleep until their keep-alive, a second after they last sent:
    # in the half second measured here none of them is due.
    assert (
        min(c.get_timer() or 0.0 for c in client.connections.values() if c is not busy)
        > started + 0.5
    )
    calls = _Calls(monkeypatch)
    payload = random.Random(3).randbytes(200_000)  # noqa: S311 - test data, not secrets
    assert busy.send(payload) == len(payload)
    received = bytearray()

    def delivered() -> bool:
        received.extend(drain(busy_server)[0])
        return len(received) == len(payload)

    run_until(network, endpoints, until=started + 0.5, stop=delivered)
    assert bytes(received) == payload
    # Hundreds of turns; each asked the busy connection (and its peer) alone.
    assert calls.by_id[busy.socket_id] > 100
    assert set(calls.by_id) == {busy.socket_id, busy_server.socket_id}
    # Once due, every idle connection's keep-alive still runs, untouched as it was.
    run_until(network, endpoints, until=started + 1.5)
    assert all(c.state is ConnectionState.CONNECTED for c in client.connections.values())
    assert len(calls.by_id) == len(client.connections) + len(server.connections)
    assert len(server.connections) == 1001


def test_the_timer_heap_stays_bounded_while_one_connection_reschedules_every_turn() -> None:
    network, endpoints, busy, busy_server = _idle_and_busy(3)
    busy.send(bytes(300_000))
    run_until(
        network,
        endpoints,
        stop=lambda: busy.send_buffer_bytes == 0 and drain(busy_server) is not None,
    )
    for mux in endpoints.values():
        # Stale entries are dropped or compacted: a few per live connection at most.
        assert len(mux._heap) <= 4 * len(mux.connections) + 64


def test_a_send_the_multiplexer_never_heard_of_is_still_served_at_the_old_deadline() -> None:
    network, endpoints, busy, busy_server = _idle_and_busy(0)
    client = endpoints[CLIENT]
    now = network.now
    deadline = client.get_timer()
    assert deadline is not None
    assert deadline > now + 0.5  # only the keep-alive is pending
    # The base class's send(): the multiplexer's notice is bypassed (as if forgotten).
    assert UdtConnection.send(busy, b"late but whole") == 14
    assert client.get_timer() == deadline
    client.handle_timer(now)
    assert client.datagrams_to_send(now) == []  # latency: nobody told the multiplexer
    client.handle_timer(deadline)
    sent = client.datagrams_to_send(deadline)
    assert any(data.endswith(b"late but whole") for data, _ in sent)
    for data, _ in sent:
        endpoints[SERVER].receive_datagram(data, CLIENT, deadline + 0.005)
    assert drain(busy_server)[0] == b"late but whole"


def test_touch_makes_a_change_count_at_once() -> None:
    network, endpoints, busy, _ = _idle_and_busy(0)
    client = endpoints[CLIENT]
    now = network.now
    UdtConnection.send(busy, b"now")
    client.touch(busy)
    assert client.get_timer() == pytest.approx(now, abs=0.02)
    client.handle_timer(now + 0.02)
    assert any(data.endswith(b"now") for data, _ in client.datagrams_to_send(now + 0.02))
    client.touch(UdtConnection.connect(SERVER, socket_id=7, isn=1, now=now, random=float))


def test_ready_connections_name_those_that_did_something_once() -> None:
    network, endpoints, busy, busy_server = _idle_and_busy(5)
    server = endpoints[SERVER]
    assert {c.socket_id for c in server.ready_connections()} == set(server.connections)
    assert server.ready_connections() == []
    busy.send(b"hello")
    run_until(network, endpoints, stop=lambda: busy_server.receive_buffer_packets > 0)
    assert server.ready_connections() == [busy_server]
    assert drain(busy_server)[0] == b"hello"
    # A closed connection is named once more, with its ConnectionClosed waiting, then forgotten.
    busy.abort(network.now)
    run_until(network, endpoints, stop=lambda: busy_server.state is ConnectionState.CLOSED)
    assert busy_server in server.ready_connections()
    assert busy_server.socket_id not in server.connections
    assert any(isinstance(e, ConnectionClosed) for e in drain(busy_server)[1])


def test_a_quiet_connections_message_lives_from_the_latest_turn_not_its_last_touch() -> None:
    config = UdtConfig(socket_type=SocketType.DGRAM)
    network = make_network()
    client, server = (
        UdtMultiplexer(
            now=0.0,
            random_bits=random.Random(seed).getrandbits,  # noqa: S311 - not secrets
            cookie_secret=SECRET,
            config=config,
        )
        for seed in (40, 41)
    )
    server.listen()
    endpoints = {CLIENT: client, SERVER: server}
    quiet = client.connect(SERVER, network.now)
    run_until(network, endpoints, stop=lambda: quiet.state is ConnectionState.CONNECTED)
    client.datagrams_to_send(network.now)
    later = network.now + 0.5  # turns for other connections; this one is not due
    client.handle_timer(later)
    assert client.datagrams_to_send(later) == []
    quiet.send(b"short-lived", ttl=0.1)
    # White-box: the time-to-live starts at the latest now any turn was given, as when
    # every turn touched every connection (connection.py: deadline = _now + ttl).
    assert quiet._now == later
