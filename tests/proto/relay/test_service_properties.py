"""Hypothesis properties of RelayService: garbage does no harm or leaks; pairing is exact."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from wavesync_proto.addresses import Endpoint
from wavesync_proto.relay import (
    CONNECT_PATH,
    STANDBY_PATH,
    Action,
    ConnectionHandle,
    RelayLimits,
    SendBytes,
    StartSplice,
)
from wavesync_proto.relay.wire import Open, parse_control

from .helpers import (
    SERVER_1,
    SERVER_2,
    SERVER_3,
    SERVER_UNKNOWN,
    SYSTEM_A,
    SYSTEM_B,
    SYSTEM_OF,
    SYSTEM_UNKNOWN,
    Harness,
    connect_request,
    parse_answer,
    ready_line,
    request_bytes,
    session_id,
    standby_request,
)

#: Small bounds, so that every limit is reached by a few dozen operations.
SMALL_LIMITS = RelayLimits(
    max_handshaking=4,
    handshake_timeout=10.0,
    max_request_bytes=1024,
    max_standby_per_server=2,
    max_standby_total=4,
    max_active_sessions=2,
    max_waiting_clients=2,
    keepalive_interval=20,
    standby_max_age=100.0,
    open_timeout=2.0,
    pair_timeout=5.0,
    known_server_ttl=30.0,
    auth_window=120.0,
    max_remembered_nonces=6,
    max_early_bytes=64,
)
#: Longer than every timeout and memory of SMALL_LIMITS (nonces last 2 x auth_window).
FOREVER = 1000.0
SERVERS = (SERVER_1, SERVER_2, SERVER_3)
TARGETS: tuple[tuple[uuid.UUID | None, uuid.UUID | None], ...] = (
    (SERVER_1, None),
    (SERVER_2, None),
    (SERVER_3, None),
    (SERVER_UNKNOWN, None),
    (None, SYSTEM_A),
    (None, SYSTEM_B),
    (None, SYSTEM_UNKNOWN),
)
#: The targets of well-behaved clients: ones the relay may know (404s are the garbage test's).
KNOWN_TARGETS = tuple(
    target for target in TARGETS if SERVER_UNKNOWN not in target and SYSTEM_UNKNOWN not in target
)
REMOTES: tuple[Endpoint, ...] = (
    ("203.0.113.9", 61001),
    ("2001:db8::9", 61002),
    ("::ffff:203.0.113.10", 1),
    ("198.51.100.1", 40001),
)


@dataclass
class Driver:
    """A harness plus what an adapter and a test can know from the outside."""

    h: Harness
    handles: list[str] = field(default_factory=list)
    #: The session of the OPEN each connection got (a connection gets at most one).
    opens: dict[ConnectionHandle, Open] = field(default_factory=dict)
    ended: set[bytes] = field(default_factory=set)

    def new_handle(self) -> str:
        handle = f"n{len(self.handles)}"
        self.handles.append(handle)
        return handle

    def pick(self, index: int) -> str | None:
        """A live connection, chosen by ``index`` among those ever made; None if none is."""
        live = [handle for handle in self.handles if handle in self.h.live]
        return live[index % len(live)] if live else None

    def note(self, actions: list[Action]) -> list[Action]:
        for action in actions:
            if isinstance(action, SendBytes) and action.data.startswith(b"OPEN "):
                line = parse_control(action.data[:-2])
                assert isinstance(line, Open)
                assert action.connection not in self.opens, "a second OPEN on one connection"
                self.opens[action.connection] = line
        self.check()
        return actions

    def check(self) -> None:
        service, h = self.h.service, self.h
        counters = service.counters
        # The service tracks exactly the connections the adapter holds for it.
        assert service.connection_count() == len(h.live)
        assert counters.standby_idle == sum(service.idle_standby(s) for s in SERVERS)
        assert counters.standby_idle <= service.limits.max_standby_total
        for server_id in SERVERS:
            assert service.idle_standby(server_id) <= service.limits.max_standby_per_server
        assert counters.clients_waiting <= service.limits.max_waiting_clients
        assert counters.sessions_active == len(set(h.splices) - self.ended)
        assert counters.sessions_active <= service.limits.max_active_sessions
        assert counters.sessions_ended == len(self.ended)
        assert counters.clients_paired == len(h.splices)
        deadline = service.get_timer()
        assert deadline is None or deadline > h.now

    def advance(self, seconds: float) -> None:
        self.note(self.h.advance(seconds))

    def end_splice(self, index: int) -> None:
        running = sorted(set(self.h.splices) - self.ended)
        if running:
            session = running[index % len(running)]
            self.ended.add(session)
            self.h.end_splice(session)
            self.check()

    def wind_down(self) -> None:
        """Every peer goes away, every splice ends, and time passes every deadline."""
        for handle in list(self.handles):
            if handle in self.h.live:
                self.note(self.h.lose(handle))
        for session in set(self.h.splices) - self.ended:
            self.ended.add(session)
            self.h.end_splice(session)
        self.advance(FOREVER)
        service, counters = self.h.service, self.h.service.counters
        assert service.connection_count() == 0
        assert counters.standby_idle == counters.clients_waiting == counters.sessions_active == 0
        assert all(service.idle_standby(server_id) == 0 for server_id in SERVERS)
        # Every lane (handshakes, pings, ages, opens, waits, nonces, known servers) is empty.
        assert service.get_timer() is None


# --- (1) garbage at every stage --------------------------------------------------------------


def seed_payloads() -> list[bytes]:
    return [
        connect_request(SERVER_1),
        connect_request(system_id=SYSTEM_A),
        connect_request(SERVER_UNKNOWN),
        connect_request(SERVER_1) + b"early bytes",
        standby_request(SERVER_1, nonce=bytes(16)),  # stale: signed for 1.7e9, long ago
        request_bytes(STANDBY_PATH, [("Wavesync-Server", str(SERVER_1))]),
        request_bytes(CONNECT_PATH, [], method="POST"),
        request_bytes("/", []),
        b"GET /wavesync/relay/v1/connect HTTP/1.1\r\nHost: relay\r\n",
        b"PING\r\n",
        b"READY " + session_id(1).hex().encode() + b"\r\n",
        b"READY " + session_id(2).hex().encode() + b"\r\nraw",
        b"OPEN " + session_id(1).hex().encode() + b" 1.2.3.4:5\r\n",
        b"\r\n" * 70,
        b"x" * 200,
    ]


SEEDS = seed_payloads()


def mutate(seed: bytes, flips: list[tuple[int, int]], cut: int | None) -> bytes:
    data = bytearray(seed)
    for position, value in flips:
        data[position % len(data)] = value
    return bytes(data[:cut] if cut is not None else data)


payloads = st.one_of(
    st.binary(max_size=80),
    st.sampled_from(SEEDS),
    st.builds(
        mutate,
        st.sampled_from(SEEDS),
        st.lists(st.tuples(st.integers(0, 600), st.integers(0, 255)), max_size=3),
        st.one_of(st.none(), st.integers(0, 600)),
    ),
)
garbage_operations = st.one_of(
    # A new connection that sends anything at all (or nothing).
    st.tuples(st.just("fresh"), payloads, st.integers(0, 3)),
    # A well-formed, freshly signed standby request, now and then damaged.
    st.tuples(
        st.just("standby"),
        st.integers(0, 2),
        st.lists(st.tuples(st.integers(0, 600), st.integers(0, 255)), max_size=1),
    ),
    # A standby request with any Host header (signed for another, so never accepted).
    st.tuples(
        st.just("host"),
        st.one_of(
            st.text("a.:[]1-", min_size=1, max_size=80),  # empty and odd labels, brackets
            st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=80),
        ),
        st.integers(0, 2),
    ),
    # A client request for any target, with any early bytes.
    st.tuples(st.just("client"), st.integers(0, len(TARGETS) - 1), st.binary(max_size=80)),
    # Anything to a live connection, whatever stage it is at.
    st.tuples(st.just("bytes"), st.integers(0, 50), payloads),
    # The right READY (and any tail) from a connection that got OPEN.
    st.tuples(st.just("ready"), st.integers(0, 50), st.binary(max_size=20)),
    st.tuples(st.just("lose"), st.integers(0, 50), st.none()),
    st.tuples(st.just("end"), st.integers(0, 50), st.none()),
    st.tuples(st.just("advance"), st.floats(0.0, 40.0), st.none()),
)


def run_garbage(driver: Driver, operation: tuple[object, object, object]) -> None:
    kind, first, second = operation
    if kind in ("fresh", "standby", "host", "client"):
        new_connection(driver, kind, first, second)
    elif kind in ("bytes", "ready", "lose"):
        assert isinstance(first, int)
        to_a_connection(driver, kind, first, second)
    elif kind == "end":
        assert isinstance(first, int)
        driver.end_splice(first)
    else:
        assert isinstance(first, float)
        driver.advance(first)


def new_connection(driver: Driver, kind: object, first: object, second: object) -> None:
    h = driver.h
    handle = driver.new_handle()
    if kind == "fresh":
        assert isinstance(first, bytes)
        assert isinstance(second, int)
        remote, data = REMOTES[second], first
    elif kind == "standby":
        assert isinstance(first, int)
        assert isinstance(second, list)
        signed = standby_request(SERVERS[first], nonce=h.next_nonce(), unix_time=int(h.unix_time))
        remote, data = REMOTES[3], mutate(signed, second, None)
    elif kind == "host":
        assert isinstance(first, str)
        assert isinstance(second, int)
        nonce = h.next_nonce()
        signed = standby_request(
            SERVERS[second],
            nonce=nonce,
            host=first,
            signed_host="relay",
            unix_time=int(h.unix_time),
        )
        remote, data = REMOTES[3], signed
    else:
        assert isinstance(first, int)
        assert isinstance(second, bytes)
        remote, data = REMOTES[first % 3], connect_request(*TARGETS[first]) + second
    driver.note(h.connect(handle, remote))
    if handle in h.live and data:
        driver.note(h.send(handle, data))


def to_a_connection(driver: Driver, kind: object, index: int, data: object) -> None:
    h = driver.h
    assert data is None or isinstance(data, bytes)
    if kind == "ready":
        opened = [s for s in driver.opens if s in h.live]
        if opened:
            standby = opened[index % len(opened)]
            session = driver.opens[standby].session_id
            driver.note(h.send(standby, ready_line(session) + (data or b"")))
        return
    picked = driver.pick(index)
    if picked is None:
        return
    if kind == "lose":
        driver.note(h.lose(picked))
    elif data:
        driver.note(h.send(picked, data))


@pytest.mark.property
@given(st.lists(garbage_operations, min_size=5, max_size=40))
def test_arbitrary_input_never_raises_and_never_leaks(
    operations: list[tuple[object, object, object]],
) -> None:
    driver = Driver(Harness.create(SMALL_LIMITS))
    # Standby connections of every server, so that well-formed clients get somewhere.
    for index in (0, 0, 1, 2):
        run_garbage(driver, ("standby", index, []))
    for operation in operations:
        run_garbage(driver, operation)
    driver.wind_down()


# --- (2) valid interleavings pair exactly ----------------------------------------------------


@dataclass
class Model:
    """What the test asked of every connection, to check each splice against."""

    driver: Driver
    standby_server: dict[ConnectionHandle, uuid.UUID] = field(default_factory=dict)
    client_target: dict[ConnectionHandle, tuple[uuid.UUID | None, uuid.UUID | None]] = field(
        default_factory=dict
    )
    client_remote: dict[ConnectionHandle, Endpoint] = field(default_factory=dict)
    client_early: dict[ConnectionHandle, bytes] = field(default_factory=dict)

    def apply(self, actions: list[Action]) -> list[Action]:
        self.driver.note(actions)
        h = self.driver.h
        for action in actions:
            if isinstance(action, StartSplice):
                self.check_splice(action)
            elif isinstance(action, SendBytes) and action.connection in self.client_target:
                # A client hears nothing but its refusal before its splice, then is closed.
                assert action.connection in h.closed
                assert parse_answer(action.data).status in {404, 413, 503}
            elif isinstance(action, SendBytes):
                # A standby connection hears its 101, PINGs, OPEN: nothing else.
                assert action.connection in self.standby_server
                if not action.data.startswith(b"HTTP/1.1 "):
                    parse_control(action.data[:-2])
        return actions

    def check_splice(self, splice: StartSplice) -> None:
        # One client with one standby connection of the server or system it asked for.
        server_id = self.standby_server[splice.server]
        wanted_server, wanted_system = self.client_target[splice.client]
        if wanted_server is not None:
            assert server_id == wanted_server
        else:
            assert SYSTEM_OF[server_id] == wanted_system
        # The session is the one the standby connection was told, for this client.
        opened = self.driver.opens[splice.server]
        assert opened.session_id == splice.session_id
        assert opened.client_address == self.client_remote[splice.client]
        answer = parse_answer(splice.to_client)
        assert answer.status == 101
        assert answer.headers["wavesync-session"] == splice.session_id.hex()
        assert answer.headers["wavesync-server"] == str(server_id)
        # Every byte the client sent before pairing goes to the server, in order.
        assert splice.to_server == self.client_early[splice.client]

    def standby(self, index: int) -> None:
        h = self.driver.h
        handle = self.driver.new_handle()
        self.standby_server[handle] = SERVERS[index]
        self.apply(h.connect(handle, REMOTES[3]))
        if handle in h.live:
            data = standby_request(SERVERS[index], nonce=h.next_nonce(), unix_time=int(h.unix_time))
            self.apply(h.send(handle, data))

    def client(self, target: int, remote: int, early: bytes) -> None:
        h = self.driver.h
        handle = self.driver.new_handle()
        self.client_target[handle] = KNOWN_TARGETS[target]
        self.client_remote[handle] = REMOTES[remote]
        self.client_early[handle] = early
        self.apply(h.connect(handle, REMOTES[remote]))
        if handle in h.live:
            self.apply(h.send(handle, connect_request(*KNOWN_TARGETS[target]) + early))

    def early(self, index: int, data: bytes) -> None:
        clients = [c for c in self.client_target if c in self.driver.h.live]
        if clients and data:
            client = clients[index % len(clients)]
            self.client_early[client] += data
            self.apply(self.driver.h.send(client, data))

    def ready(self, index: int, wrong: bool, tail: bytes) -> None:
        h = self.driver.h
        opened = [s for s in self.driver.opens if s in h.live]
        if not opened:
            return
        standby = opened[index % len(opened)]
        session = self.driver.opens[standby].session_id
        if wrong:
            session = bytes(16 - len(session)) + bytes(b ^ 0xFF for b in session)
        actions = self.apply(h.send(standby, ready_line(session) + tail))
        splices = [a for a in actions if isinstance(a, StartSplice)]
        if wrong:
            assert splices == []
            assert standby in h.closed
        else:
            [splice] = splices
            assert splice.server == standby
            assert parse_answer(splice.to_client).trailing == tail

    def lose(self, index: int) -> None:
        handle = self.driver.pick(index)
        if handle is not None:
            self.apply(self.driver.h.lose(handle))


standby_operations = st.tuples(st.just("standby"), st.integers(0, 2))
client_operations = st.tuples(
    st.just("client"),
    st.integers(0, len(KNOWN_TARGETS) - 1),
    st.integers(0, 2),
    st.binary(max_size=30),
)
ready_operations = st.tuples(
    st.just("ready"),
    st.integers(0, 50),
    st.sampled_from((False, False, False, False, True)),
    st.binary(max_size=10),
)
# Weighted towards what makes sessions (offers, requests, answers); flatmap over a
# sampled list weighs where one_of would draw its branches about evenly.
valid_operations = st.sampled_from(
    [
        standby_operations,
        standby_operations,
        client_operations,
        client_operations,
        client_operations,
        ready_operations,
        ready_operations,
        ready_operations,
        st.tuples(st.just("early"), st.integers(0, 50), st.binary(min_size=1, max_size=30)),
        st.tuples(st.just("lose"), st.integers(0, 50)),
        st.tuples(st.just("end"), st.integers(0, 50)),
        st.tuples(
            st.just("advance"), st.sampled_from((0.5, 1.0, 2.0, 3.0, 5.0, 20.0, 35.0, 100.0))
        ),
    ]
).flatmap(lambda operations: operations)


def run_valid(model: Model, operation: tuple[object, ...]) -> None:
    kind = operation[0]
    if kind == "standby":
        _, index = operation
        assert isinstance(index, int)
        model.standby(index)
    elif kind == "client":
        _, target, remote, early = operation
        assert isinstance(target, int)
        assert isinstance(remote, int)
        assert isinstance(early, bytes)
        model.client(target, remote, early)
    elif kind == "early":
        _, index, data = operation
        assert isinstance(index, int)
        assert isinstance(data, bytes)
        model.early(index, data)
    elif kind == "ready":
        _, index, wrong, tail = operation
        assert isinstance(index, int)
        assert isinstance(wrong, bool)
        assert isinstance(tail, bytes)
        model.ready(index, wrong, tail)
    elif kind == "lose":
        assert isinstance(operation[1], int)
        model.lose(operation[1])
    elif kind == "end":
        assert isinstance(operation[1], int)
        model.driver.end_splice(operation[1])
    else:
        assert isinstance(operation[1], float)
        model.apply(model.driver.h.advance(operation[1]))


@pytest.mark.property
@given(st.lists(valid_operations, min_size=10, max_size=60))
# Rarely drawn at the default budget: one session running, two clients waiting for an
# empty pool, then two standby connections for them (three sessions if waiters were free).
@example(
    [
        ("client", 0, 0, b""),
        ("ready", 0, False, b""),
        ("client", 0, 0, b"a"),
        ("client", 0, 1, b"b"),
        ("standby", 0),
        ("standby", 0),
        ("ready", 0, False, b""),
        ("ready", 0, False, b""),
        ("advance", 1.0),
        ("end", 0),
        ("advance", 100.0),
    ]
)
def test_valid_interleavings_pair_each_client_with_one_standby_of_its_target(
    operations: list[tuple[object, ...]],
) -> None:
    model = Model(Driver(Harness.create(SMALL_LIMITS)))
    for index in (0, 1, 2):
        model.standby(index)
    for operation in operations:
        run_valid(model, operation)
    spliced = [handle for s in model.driver.h.splices.values() for handle in (s.client, s.server)]
    assert len(spliced) == len(set(spliced))
    model.driver.wind_down()
