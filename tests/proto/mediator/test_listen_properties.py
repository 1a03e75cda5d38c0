"""Hypothesis properties of ListenSession: framing, garbage, back-off bounds and timers that move.

Every loop here is bounded: a session whose timer does not move must fail a test, not hang it.
"""

from __future__ import annotations

import itertools
import random
import struct
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wavesync_proto.mediator import ConnectionRequested, ConnectionUpdate, ListenResponse
from wavesync_proto.mediator.listen import (
    MAX_LISTEN_MESSAGE,
    ClientUdpEndpointLearned,
    ConnectionRequestReceived,
    ListenEvent,
    ListenSession,
    ListenState,
    Registered,
    RegistrationRefused,
    SessionLost,
)
from wavesync_proto.stun import (
    BINDING,
    MAGIC_COOKIE,
    Message,
    MessageClass,
    Username,
    decode_message,
    encode_message,
    stream_message_length,
)

from .test_listen import (
    FORWARDED,
    KEY,
    LISTEN,
    LOCAL,
    PUBLIC,
    SERVER,
    SESSION_ID,
    SYSTEM,
    SYSTEM_KEY,
    CountingBytes,
    accept,
    binding,
    challenge,
    error_with,
    events,
    indication,
    new_session,
    registered_session,
    stale,
    state_of,
    tid,
)

CONNECTED = (ListenState.CHALLENGING, ListenState.AUTHENTICATING, ListenState.REGISTERED)
# Relative slack for comparing a float delay with its bounds (now + x - now need not be x).
SLACK = 1e-9
NOT_STUN = "the mediator sent bytes that are not STUN"


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in itertools.pairwise([0, *points, len(data)])]


def framed(message_type: int, transaction_id: bytes, body: bytes) -> bytes:
    """A STUN header that frames correctly around an arbitrary (padded) body."""
    body += bytes(-len(body) % 4)
    return struct.pack("!HHI12s", message_type, len(body), MAGIC_COOKIE, transaction_id) + body


# Bytes that reach past the framing into decoding and dispatch, not only the header check.
STUN_ISH = st.builds(
    framed,
    st.sampled_from([0x0111, 0x0101, 0x0115, 0x0103, 0x0105, 0x0001]) | st.integers(0, 0x3FFF),
    st.sampled_from([tid(1), tid(2), tid(3), b"x" * 12]),
    st.binary(max_size=80),
)
GARBAGE = st.binary(max_size=64) | STUN_ISH


def messages_in(data: bytes) -> list[Message]:
    """Every message in what the session queued for the TCP connection (well framed)."""
    found = []
    for _ in range(len(data)):  # at least 20 bytes a message: the loop ends before this
        if not data:
            break
        length = stream_message_length(data)
        assert length is not None
        assert len(data) >= length
        found.append(decode_message(data[:length]))
        data = data[length:]
    assert data == b""
    return found


# --- framing -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """Everything a session shows after reading a stream, and after then losing the connection."""

    events: list[ListenEvent]
    state: ListenState
    rest: tuple[object, ...]


def same_cause(event: ListenEvent) -> ListenEvent:
    """``event`` without the STUN decoder's detail of why bytes are not STUN.

    The decoder refuses a header as early as it can (the leading bits from the first byte,
    the cookie from the fifth), so the detail names what the bytes seen so far broke.
    """
    if isinstance(event, SessionLost) and NOT_STUN in event.reason:
        return SessionLost(reason=NOT_STUN, retry_at=event.retry_at)
    return event


def outcome(chunks: list[bytes]) -> Outcome:
    session = new_session()
    session.connection_made(0.0)
    for chunk in chunks:
        session.data_received(chunk, 0.0)
    found, state = events(session), state_of(session)
    rest = (
        session.data_to_send(),
        session.dropped_messages,
        session.buffered,
        session.get_timer(),
        session.should_close(),
    )
    session.connection_lost(1.0)  # SessionLost says why the session gave up, if it did
    return Outcome(found, state, (*rest, [same_cause(e) for e in events(session)]))


@pytest.mark.property
@given(cuts=st.lists(st.integers(min_value=0), max_size=30))
def test_any_chunking_of_a_valid_stream_gives_the_same_events(cuts: list[int]) -> None:
    # The mediator's side of a whole session; CountingBytes makes the ids match.
    stream = (
        challenge(LISTEN.to_stun(tid(1)))
        + accept(LISTEN.to_stun(tid(2)))
        + indication(ConnectionRequested(connect_session_id=SESSION_ID, client_udp_endpoint=PUBLIC))
        + binding(9, MessageClass.SUCCESS)  # a stray answer: dropped either way
        + indication(ConnectionUpdate(connect_session_id=SESSION_ID, client_udp_endpoint=LOCAL))
    )
    whole = outcome([stream])
    kinds = [Registered, ConnectionRequestReceived, ClientUdpEndpointLearned]
    assert [type(e) for e in whole.events] == kinds
    assert whole.state is ListenState.REGISTERED
    assert outcome(split(stream, cuts)) == whole


# What a mediator (or something posing as one) might put on the stream, in any order:
# the real answers to the ids CountingBytes hands out, and everything else.
PIECES = (
    st.sampled_from(
        [
            challenge(LISTEN.to_stun(tid(1))),
            stale(LISTEN.to_stun(tid(2))),
            accept(LISTEN.to_stun(tid(2))),
            accept(LISTEN.to_stun(tid(3))),
            accept(LISTEN.to_stun(tid(2)), key=None),
            error_with(500, "Server Error")(LISTEN.to_stun(tid(2))),
            indication(ConnectionUpdate(connect_session_id=SESSION_ID, client_udp_endpoint=LOCAL)),
            binding(3, MessageClass.SUCCESS),
            binding(4, MessageClass.ERROR),
        ]
    )
    | STUN_ISH
    | st.binary(max_size=40)
)


@pytest.mark.property
@given(pieces=st.lists(PIECES, max_size=8), cuts=st.lists(st.integers(min_value=0), max_size=30))
def test_any_chunking_of_any_stream_gives_the_same_events_and_state(
    pieces: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(pieces)
    assert outcome(split(stream, cuts)) == outcome([stream])


# --- garbage -----------------------------------------------------------------------------


@pytest.mark.property
@given(registered=st.booleans(), chunks=st.lists(GARBAGE, max_size=20))
def test_arbitrary_bytes_never_raise_and_the_buffer_stays_bounded(
    registered: bool, chunks: list[bytes]
) -> None:
    session = registered_session() if registered else new_session()
    if not registered:
        session.connection_made(0.0)
    for now, chunk in enumerate(chunks):
        session.data_received(chunk, float(now))
        assert session.buffered < MAX_LISTEN_MESSAGE
        session.handle_timer(float(now))
        session.data_to_send()
        events(session)
        if session.should_close():
            session.connection_lost(float(now))
            assert isinstance(events(session)[-1], SessionLost)
            break


@pytest.mark.property
@given(registered=st.booleans(), chunks=st.lists(GARBAGE, min_size=1, max_size=20))
def test_garbage_then_silence_ends_in_a_clean_give_up(
    registered: bool, chunks: list[bytes]
) -> None:
    session = registered_session(now=0.0) if registered else new_session()
    if not registered:
        session.connection_made(0.0)
    for chunk in chunks:
        session.data_received(chunk, 1.0)
        assert session.buffered < MAX_LISTEN_MESSAGE
    # The mediator says nothing more: a handshake or keep-alive timeout must end it.
    now = 1.0
    for _ in range(10):
        if session.should_close():
            break
        deadline = session.get_timer()
        assert deadline is not None, f"connected but no timer while {state_of(session)}"
        now = max(now, deadline)
        session.handle_timer(now)
    else:
        pytest.fail(f"still {state_of(session)} after 10 timer firings of silence")
    assert session.buffered == 0
    assert session.data_to_send() == b""
    assert session.get_timer() is None
    assert not any(isinstance(e, Registered) for e in events(session))
    session.connection_lost(now)
    (lost,) = events(session)
    assert isinstance(lost, SessionLost)
    assert lost.retry_at > now
    assert state_of(session) is ListenState.BACKING_OFF


# --- an adapter running the session against a scripted mediator ----------------------------

# What the mediator does with the requests waiting on the connection, or what the adapter does.
ACTIONS = st.sampled_from(
    [
        "answer",
        "answer",
        "silent",
        "stale",
        "refuse",
        "error",
        "fire",
        "wait",
        "lose",
        "unreachable",
    ]
)


@dataclass
class Adapter:
    """Plays the adapter and a mediator, and checks every back-off against DESIGN §4."""

    session: ListenSession
    now: float
    initial: float
    maximum: float
    keepalive_timeout: float
    keepalive_interval: int = 30
    failures: int = 0  # consecutive losses since the last registration, as the design says
    auth_failed: bool = False
    pending: list[Message] = field(default_factory=list)  # requests the mediator has not seen

    def take_events(self) -> list[ListenEvent]:
        found = events(self.session)
        for event in found:
            if isinstance(event, Registered):
                self.failures = 0
            elif isinstance(event, RegistrationRefused):
                self.auth_failed = event.code in (401, 438)
            elif isinstance(event, SessionLost):
                base = self.maximum
                if not self.auth_failed:
                    base = min(self.maximum, self.initial * 2.0**self.failures)
                delay = event.retry_at - self.now
                assert event.retry_at > self.now
                assert 0.5 * base * (1 - SLACK) <= delay <= base * (1 + SLACK)
                self.failures += 1
                self.auth_failed = False
        self.pending += messages_in(self.session.data_to_send())
        return found

    def lose(self) -> None:
        self.session.connection_lost(self.now)
        self.pending.clear()
        self.take_events()

    def fire(self) -> None:
        """Fire the next timer exactly when it falls due: it must then move past ``now``."""
        deadline = self.session.get_timer()
        if deadline is None:
            return
        self.now = max(self.now, deadline)
        before = state_of(self.session)
        self.session.handle_timer(self.now)
        after = self.session.get_timer()
        assert after is None or after > self.now, (
            f"handle_timer({self.now}) left the timer at {after} ({before.value} -> "
            f"{state_of(self.session).value}): an adapter would fire it forever"
        )

    def reply(self, request: Message, behaviour: str) -> bytes:
        if request.method == BINDING:
            return encode_message(request.success_response())
        if request.get(Username) is None:
            return challenge(request)  # the unsigned listen: always the 401 challenge
        if behaviour == "stale":
            return stale(request)
        if behaviour == "refuse":
            return error_with(401, "Unauthorized")(request)
        if behaviour == "error":
            return error_with(500, "Server Error")(request)
        response = ListenResponse(
            public_endpoint=PUBLIC, keepalive_interval=self.keepalive_interval
        )
        return encode_message(response.to_stun(request.transaction_id), integrity_sha256_key=KEY)

    def answer(self, behaviour: str) -> None:
        """The mediator answers (or, when silent, drops) every request it has been sent."""
        requests, self.pending = self.pending, []
        for request in requests:
            if behaviour != "silent":
                self.session.data_received(self.reply(request, behaviour), self.now)

    def duties(self, action: str) -> None:
        """Close what the session gave up on; connect (or fail to) when it asks."""
        if self.session.should_close():
            self.lose()
        if self.session.should_connect(self.now):
            if action == "unreachable":
                self.lose()
            else:
                self.session.connection_made(self.now)
        self.take_events()

    def step(self, action: str, dt: float = 0.0) -> None:
        session = self.session
        self.duties(action)
        if action == "fire":
            self.fire()
        elif action == "wait":
            self.now += dt  # an adapter that wakes late, without firing the timer
        elif action == "lose":
            if state_of(session) in (*CONNECTED, ListenState.CLOSING):
                self.lose()
        elif state_of(session) in CONNECTED:
            self.answer(action)
        self.take_events()
        self.duties(action)
        assert session.buffered == 0
        assert session.registered == (state_of(session) is ListenState.REGISTERED)


def adapter_for(
    *, start: float, initial: float, factor: float, handshake: float, keepalive: float, seed: int
) -> Adapter:
    maximum = initial * factor
    session = ListenSession(
        system_id=SYSTEM,
        server_id=SERVER,
        system_key=SYSTEM_KEY,
        local_endpoints=[LOCAL],
        forwarded_endpoints=[FORWARDED],
        now=start,
        rng=random.Random(seed),  # noqa: S311 - back-off jitter, not a secret
        random_bytes=CountingBytes(),
        backoff_initial=initial,
        backoff_max=maximum,
        handshake_timeout=handshake,
        keepalive_response_timeout=keepalive,
    )
    return Adapter(
        session, now=start, initial=initial, maximum=maximum, keepalive_timeout=keepalive
    )


ADAPTERS = st.builds(
    adapter_for,
    start=st.floats(0.0, 1e6),
    initial=st.floats(0.001, 10.0),
    factor=st.floats(1.0, 1000.0),
    handshake=st.floats(0.001, 100.0),
    keepalive=st.floats(0.001, 100.0),
    seed=st.integers(0, 2**32 - 1),
)


@pytest.mark.property
@given(
    adapter=ADAPTERS,
    interval=st.integers(1, 3600),
    script=st.lists(st.tuples(ACTIONS, st.floats(0.0, 100.0)), min_size=1, max_size=60),
)
def test_timers_move_and_back_off_stays_within_its_jittered_bounds(
    adapter: Adapter, interval: int, script: list[tuple[str, float]]
) -> None:
    adapter.keepalive_interval = interval
    for action, dt in script:
        adapter.step(action, dt)
    # Whatever happened, a mediator that answers gets the server registered again,
    # after at most: a back-off to wait out, a connect, the challenge and the answer.
    for _ in range(10):
        if adapter.session.registered:
            break
        adapter.step("answer" if adapter.pending else "fire")
    else:
        pytest.fail(f"not registered again: {state_of(adapter.session)}")
    adapter.lose()  # the registration reset the back-off: the model checks the next delay
    assert state_of(adapter.session) is ListenState.BACKING_OFF


@pytest.mark.property
@given(
    adapter=ADAPTERS,
    interval=st.integers(1, 3600),
    delays=st.lists(st.floats(0.0, 0.99), min_size=1, max_size=12),
)
def test_answered_keepalives_keep_the_session_and_follow_the_interval(
    adapter: Adapter, interval: int, delays: list[float]
) -> None:
    adapter.keepalive_interval = interval
    adapter.step("answer")  # connect, and the challenge is answered
    adapter.step("answer")  # the signed listen is accepted
    session = adapter.session
    assert session.registered
    assert adapter.pending == []
    due = adapter.now + interval
    for delay in delays:
        assert session.get_timer() == due
        woke = adapter.now
        adapter.fire()
        # Sent when due, or at once if the last answer came after that.
        assert adapter.now == max(woke, due)
        (keepalive,) = messages_in(session.data_to_send())
        assert keepalive.method == BINDING
        assert keepalive.message_class is MessageClass.REQUEST
        sent_at = adapter.now
        assert session.get_timer() == sent_at + adapter.keepalive_timeout
        adapter.now += delay * adapter.keepalive_timeout  # before the answer's deadline
        session.data_received(encode_message(keepalive.success_response()), adapter.now)
        assert session.registered
        due = sent_at + interval  # an interval after the last keep-alive went out
    assert events(session) == []
    assert session.dropped_messages == 0
