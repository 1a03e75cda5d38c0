"""Hypothesis properties of MediatorService: garbage does no harm, valid traffic is consistent."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wavesync_proto.addresses import Endpoint
from wavesync_proto.mediator.attributes import ConnectionPath
from wavesync_proto.mediator.messages import ConnectionRequested
from wavesync_proto.mediator.service import (
    Action,
    CloseTcp,
    MediatorLimits,
    SendDatagram,
    SendTcp,
)
from wavesync_proto.stun import BINDING, Message, MessageClass, decode_message, encode_message

from .helpers import (
    SERVER_1,
    SERVER_2,
    SERVER_3,
    SYSTEM_A,
    SYSTEM_B,
    Harness,
    ack_bytes,
    connect_bytes,
    listen_message,
    result_bytes,
    session_id,
    tid,
    typed,
)

SMALL_LIMITS = MediatorLimits(
    max_servers=2,
    max_pending_connects=3,
    max_tcp_buffer=512,
    rate_limit_burst=6,
    max_rate_limited_sources=4,
)
FACTOR = SMALL_LIMITS.udp_amplification_factor
SERVERS = (SERVER_1, SERVER_2, SERVER_3)
SYSTEM_OF = {SERVER_1: SYSTEM_A, SERVER_2: SYSTEM_A, SERVER_3: SYSTEM_B}
SOURCES: tuple[Endpoint, ...] = (
    ("203.0.113.1", 1000),
    ("203.0.113.2", 2000),
    ("2001:db8::1", 3000),
    ("::ffff:203.0.113.1", 1000),
)


@dataclass
class Recorder:
    """Drives a harness and checks every action against the amplification bound."""

    h: Harness
    largest_from: dict[Endpoint, int] = field(default_factory=dict)
    connected: set[str] = field(default_factory=set)

    def check(self, actions: Iterable[Action]) -> list[Action]:
        actions = list(actions)
        for action in actions:
            if isinstance(action, SendDatagram):
                # Every datagram goes to an address that sent us one, and is at most
                # FACTOR times the largest it sent (answers to its newest copy are
                # bounded by that copy, which is no larger).
                assert len(action.data) <= FACTOR * self.largest_from[action.address]
            elif isinstance(action, SendTcp):
                assert action.peer in self.connected
            elif isinstance(action, CloseTcp):
                self.connected.discard(str(action.peer))
                # The adapter confirms the close later: nothing more happens then.
                assert self.h.tcp_closed(action.peer) == []
        return actions

    def udp(self, data: bytes, source: Endpoint) -> list[Action]:
        self.largest_from[source] = max(self.largest_from.get(source, 0), len(data))
        return self.check(self.h.udp(data, source))

    def tcp(self, peer: str, data: bytes) -> list[Action]:
        return self.check(self.h.tcp(peer, data))

    def connect_peer(self, peer: str, remote: Endpoint) -> None:
        self.connected.add(peer)
        assert self.h.connect_peer(peer, remote) == []

    def close(self, peer: str) -> list[Action]:
        self.connected.discard(peer)
        return self.check(self.h.tcp_closed(peer))

    def advance(self, seconds: float) -> list[Action]:
        actions = self.check(self.h.advance(seconds))
        deadline = self.h.service.get_timer()
        assert deadline is None or deadline > self.h.now
        return actions

    def check_tables(self) -> None:
        sizes = self.h.service.table_sizes()
        limits = self.h.service.limits
        assert sizes["servers"] <= limits.max_servers
        assert sizes["connects_pending"] <= limits.max_pending_connects
        assert sizes["rate_limited_sources"] <= limits.max_rate_limited_sources
        assert sizes["tcp_buffer_max"] <= limits.max_tcp_buffer
        assert sizes["tcp_peers"] == len(self.connected)
        assert sizes["tcp_reply_peers"] <= sizes["tcp_peers"]
        counters = self.h.service.counters
        assert counters.connects_received == (
            counters.connects_answered + counters.connects_failed + sizes["connects_pending"]
        )
        assert counters.servers_online == sizes["servers"] == len(self.h.service.online_servers())


# --- (a) garbage -----------------------------------------------------------------------------


def seed_messages() -> list[bytes]:
    binding = Message(message_class=MessageClass.REQUEST, method=BINDING, transaction_id=tid("b"))
    return [
        encode_message(binding),
        encode_message(binding, fingerprint=True),
        encode_message(listen_message(SERVER_1)),
        connect_bytes(1, transaction_id=tid("c"), server_id=SERVER_1),
        connect_bytes(2, transaction_id=tid("c"), system_id=SYSTEM_A, pad_to=576),
        ack_bytes(1, SERVER_1, transaction_id=tid("a")),
        result_bytes(1, ConnectionPath.UDP, transaction_id=tid("r")),
    ]


SEEDS = seed_messages()


def mutate(seed: bytes, flips: list[tuple[int, int]], cut: int | None) -> bytes:
    data = bytearray(seed)
    for position, value in flips:
        data[position % len(data)] = value
    return bytes(data[:cut] if cut is not None else data)


payloads = st.one_of(
    st.binary(max_size=96),
    st.sampled_from(SEEDS),
    st.builds(
        mutate,
        st.sampled_from(SEEDS),
        st.lists(st.tuples(st.integers(0, 600), st.integers(0, 255)), max_size=3),
        st.one_of(st.none(), st.integers(0, 600)),
    ),
)
sources = st.one_of(
    st.sampled_from(SOURCES),
    st.builds(lambda n: (f"198.18.0.{n}", 7), st.integers(1, 20)),
)
garbage_operations = st.one_of(
    st.tuples(st.just("udp"), payloads, sources),
    st.tuples(st.just("tcp"), st.integers(0, 2), payloads),
    st.tuples(st.just("close"), st.integers(0, 2), st.none()),
    st.tuples(st.just("advance"), st.floats(0.0, 30.0), st.none()),
)


@pytest.mark.property
@given(st.lists(garbage_operations, max_size=40))
def test_arbitrary_input_never_raises_amplifies_or_overflows(
    operations: list[tuple[str, object, object]],
) -> None:
    recorder = Recorder(Harness.create(limits=SMALL_LIMITS))
    # One registered server, so well-formed connects have somewhere to go.
    recorder.connected.add("server")
    recorder.check(recorder.h.register("server", SERVER_1))
    for kind, first, second in operations:
        if kind == "udp":
            assert isinstance(first, bytes)
            assert isinstance(second, tuple)
            recorder.udp(first, second)
        elif kind == "tcp":
            assert isinstance(first, int)
            assert isinstance(second, bytes)
            peer = f"peer-{first}"
            if peer not in recorder.connected:
                recorder.connect_peer(peer, SOURCES[first])
            recorder.tcp(peer, second)
        elif kind == "close":
            peer = f"peer-{first}"
            if peer in recorder.connected:
                recorder.close(peer)
        else:
            assert isinstance(first, float)
            recorder.advance(first)
        recorder.check_tables()


# --- (b) valid traffic -------------------------------------------------------------------------


@dataclass
class Model:
    recorder: Recorder
    #: Which peer holds each server's live listen session, as the actions told us.
    server_peer: dict[uuid.UUID, str] = field(default_factory=dict)
    generation: int = 0

    #: Which server each connect session was handed to (from connection_requested).
    routed: dict[bytes, uuid.UUID] = field(default_factory=dict)

    def apply(self, actions: list[Action]) -> None:
        by_peer = {p: s for s, p in self.server_peer.items()}
        for action in actions:
            if isinstance(action, SendTcp) and action.peer in by_peer:
                message = typed(action.data)
                if isinstance(message, ConnectionRequested):
                    self.routed[message.connect_session_id] = by_peer[action.peer]
        gone = {a.peer for a in actions if isinstance(a, CloseTcp)}
        self.server_peer = {s: p for s, p in self.server_peer.items() if p not in gone}

    def register(self, index: int) -> None:
        server_id = SERVERS[index]
        self.generation += 1
        peer = f"server-{index}-{self.generation}"
        self.recorder.connected.add(peer)
        actions = self.recorder.check(
            self.recorder.h.register(peer, server_id, system_id=SYSTEM_OF[server_id])
        )
        self.apply(actions)
        [answer] = [a.data for a in actions if isinstance(a, SendTcp) and a.peer == peer]
        if decode_message(answer).message_class is MessageClass.SUCCESS:
            self.server_peer[server_id] = peer

    def leave(self, index: int) -> None:
        peer = self.server_peer.pop(SERVERS[index], None)
        if peer is not None:
            self.apply(self.recorder.close(peer))

    def check(self) -> None:
        service = self.recorder.h.service
        assert {s: o.peer for s, o in service.online_servers().items()} == self.server_peer
        online = service.online_servers()
        for server_id in service.pending_connects().values():
            assert server_id in online
        self.recorder.check_tables()


CLIENT_ADDRESSES: tuple[Endpoint, ...] = (("203.0.113.50", 5000), ("2001:db8::50", 5000))
TARGETS: tuple[tuple[uuid.UUID | None, uuid.UUID | None], ...] = (
    (SERVER_1, None),
    (SERVER_2, None),
    (SERVER_3, None),
    (None, SYSTEM_A),
    (None, SYSTEM_B),
)
valid_operations = st.one_of(
    st.tuples(st.just("register"), st.integers(0, 2)),
    st.tuples(st.just("leave"), st.integers(0, 2)),
    st.tuples(st.just("keepalive"), st.integers(0, 2)),
    # Session n names TARGETS[n] (its copies agree), now and then TARGETS[n + 1] (a clash).
    st.tuples(
        st.just("connect"),
        st.integers(1, 4),
        st.booleans(),
        st.sampled_from((0, 0, 0, 0, 1)),
        st.integers(0, 1),
    ),
    # Mostly signed by the server the session went to; sometimes by server 0, 1 or 2.
    st.tuples(st.just("ack"), st.integers(1, 4), st.sampled_from((None, None, None, 0, 1, 2))),
    st.tuples(st.just("result"), st.integers(1, 4), st.sampled_from(sorted(ConnectionPath.NAMES))),
    st.tuples(st.just("advance"), st.floats(0.0, 40.0)),
)


def run_valid(model: Model, operation: tuple[object, ...]) -> None:
    recorder = model.recorder
    kind = operation[0]
    if kind == "register":
        assert isinstance(operation[1], int)
        model.register(operation[1])
    elif kind == "leave":
        assert isinstance(operation[1], int)
        model.leave(operation[1])
    elif kind == "keepalive":
        assert isinstance(operation[1], int)
        peer = model.server_peer.get(SERVERS[operation[1]])
        if peer is not None:
            keepalive = Message(
                message_class=MessageClass.INDICATION, method=BINDING, transaction_id=tid("k")
            )
            model.apply(recorder.tcp(peer, encode_message(keepalive)))
    elif kind == "connect":
        _, number, over_udp, clash, client = operation
        assert isinstance(number, int)
        assert isinstance(clash, int)
        assert isinstance(client, int)
        server_id, system_id = TARGETS[(number + clash) % len(TARGETS)]
        if over_udp:
            data = connect_bytes(
                number,
                transaction_id=tid(f"u{number}"),
                server_id=server_id,
                system_id=system_id,
                pad_to=576,
            )
            model.apply(recorder.udp(data, CLIENT_ADDRESSES[client]))
        else:
            peer = f"client-{client}"
            if peer not in recorder.connected:
                recorder.connect_peer(peer, CLIENT_ADDRESSES[client])
            data = connect_bytes(
                number, transaction_id=tid(f"t{number}"), server_id=server_id, system_id=system_id
            )
            model.apply(recorder.tcp(peer, data))
    elif kind == "ack":
        _, number, index = operation
        assert isinstance(number, int)
        assert index is None or isinstance(index, int)
        server_id = SERVERS[index or 0]
        if index is None:
            server_id = model.routed.get(session_id(number), server_id)
        data = ack_bytes(number, server_id, transaction_id=tid(f"a{number}"))
        model.apply(recorder.udp(data, ("198.51.100.77", 6000 + SERVERS.index(server_id))))
    elif kind == "result":
        _, number, path = operation
        assert isinstance(number, int)
        assert isinstance(path, int)
        data = result_bytes(number, path, transaction_id=tid(f"r{number}"))
        model.apply(recorder.udp(data, CLIENT_ADDRESSES[0]))
    else:
        assert isinstance(operation[1], float)
        model.apply(recorder.advance(operation[1]))


@pytest.mark.property
@given(st.lists(valid_operations, max_size=40))
def test_valid_interleavings_keep_the_registry_consistent(
    operations: list[tuple[object, ...]],
) -> None:
    model = Model(Recorder(Harness.create(limits=MediatorLimits(max_pending_connects=3))))
    for index in range(len(SERVERS)):
        model.register(index)
    for operation in operations:
        run_valid(model, operation)
        model.check()
    # However it ended, once every deadline has passed nothing is left pending.
    model.apply(model.recorder.advance(200.0))
    model.check()
    assert model.recorder.h.service.pending_connects() == {}
