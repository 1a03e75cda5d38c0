"""ListenSession's handshake and misuse, driven in memory with hand-built mediator answers.

The helpers here (sessions with predictable ids and jitter, the mediator's answers) are
shared by test_listen_registered.py (keep-alives, back-off, connection requests and acks)
and test_listen_properties.py (hypothesis).
"""

from __future__ import annotations

import random
import struct
import uuid
from collections.abc import Callable

import pytest

from wavesync_proto.errors import LocalProtocolError
from wavesync_proto.mediator import (
    ConnectionRequested,
    ConnectionUpdate,
    Listen,
    ListenResponse,
    MediatorMethod,
    NonceIssuer,
    credential_key,
)
from wavesync_proto.mediator.auth import challenge_attributes, verify_listen
from wavesync_proto.mediator.listen import (
    MAX_LISTEN_MESSAGE,
    MAX_PENDING_EVENTS,
    ClientUdpEndpointLearned,
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
    Attribute,
    Message,
    MessageClass,
    Nonce,
    PasswordAlgorithmId,
    PasswordAlgorithms,
    Realm,
    Username,
    XorMappedAddress,
    decode_message,
    encode_message,
    stream_message_length,
)

SYSTEM = uuid.UUID("04f5a9ea-3cb8-44b0-bb62-401b420701de")
SERVER = uuid.UUID("9b2f4c0e-1d7a-4e63-8a55-0c3f6b1e2d44")
SYSTEM_KEY = "the-system-key"
REALM = "wavesync"
KEY = credential_key(str(SERVER), REALM, SYSTEM_KEY)
NONCES = NonceIssuer(secret=b"n" * 32, lifetime=600.0)
NONCE, FRESH_NONCE = NONCES.issue(0.0), NONCES.issue(500.0)
LOCAL, FORWARDED, PUBLIC = ("192.168.1.10", 8000), ("198.51.100.4", 443), ("203.0.113.7", 40000)
LISTEN = Listen(
    system_id=SYSTEM, server_id=SERVER, local_endpoints=(LOCAL,), forwarded_endpoints=(FORWARDED,)
)
SESSION_ID = bytes(range(16))
SEED = 7
Answer = Callable[[Message], bytes]  # what the mediator answers to a given request


class CountingBytes:
    """A stand-in for os.urandom whose n-th call returns n repeated: every id is predictable."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, size: int) -> bytes:
        self.calls += 1
        return bytes([self.calls]) * size


def seeded() -> random.Random:
    return random.Random(SEED)  # noqa: S311 - back-off jitter, not a secret


def jitter(count: int) -> list[float]:
    """The first ``count`` jitter factors a session seeded with SEED draws."""
    rng = seeded()
    return [rng.uniform(0.5, 1.0) for _ in range(count)]


def tid(n: int) -> bytes:
    """The transaction id of the n-th id the session draws from CountingBytes."""
    return bytes([n]) * 12


def stun(cls: MessageClass, method: int, transaction_id: bytes, *attributes: Attribute) -> Message:
    return Message(
        message_class=cls, method=method, transaction_id=transaction_id, attributes=attributes
    )


def new_session(
    *, now: float = 0.0, system_key: str = SYSTEM_KEY, **backoff: float
) -> ListenSession:
    return ListenSession(
        system_id=SYSTEM,
        server_id=SERVER,
        system_key=system_key,
        local_endpoints=[LOCAL],
        forwarded_endpoints=[FORWARDED],
        now=now,
        rng=seeded(),
        random_bytes=CountingBytes(),
        backoff_initial=backoff.get("initial", 1.0),
        backoff_max=backoff.get("max", 60.0),
    )


def sent_one(session: ListenSession) -> Message:
    """Decode the one message the session queued for the TCP connection."""
    data = session.data_to_send()
    assert stream_message_length(data) == len(data)
    return decode_message(data)


def events(session: ListenSession) -> list[ListenEvent]:
    found: list[ListenEvent] = []
    for _ in range(MAX_PENDING_EVENTS + 8):  # the queue is bounded, so is this loop
        event = session.next_event()
        if event is None:
            return found
        found.append(event)
    pytest.fail("more events queued than MAX_PENDING_EVENTS allows")


def state_of(session: ListenSession) -> ListenState:
    # A call, not the property: mypy would keep the property narrowed by an earlier assert.
    return session.state


# --- the mediator's answers ------------------------------------------------------------


def error_with(code: int, reason: str, *attributes: Attribute) -> Answer:
    return lambda request: encode_message(request.error_response(code, reason, *attributes))


challenge = error_with(401, "Unauthorized", *challenge_attributes(REALM, NONCE))
stale = error_with(438, "Stale Nonce", *challenge_attributes(REALM, FRESH_NONCE))


def accept(request: Message, *, key: bytes | None = KEY) -> bytes:
    response = ListenResponse(public_endpoint=PUBLIC, keepalive_interval=30)
    return encode_message(response.to_stun(request.transaction_id), integrity_sha256_key=key)


def challenge_with(*attributes: Attribute) -> Answer:
    return error_with(401, "Unauthorized", *attributes)


def constant(data: bytes) -> Answer:
    return lambda request: data


def indication(message: ConnectionRequested | ConnectionUpdate) -> bytes:
    return encode_message(message.to_stun(b"indication12"))


def binding(n: int, cls: MessageClass = MessageClass.REQUEST, *attributes: Attribute) -> bytes:
    return encode_message(stun(cls, BINDING, tid(n), *attributes))


def drive(session: ListenSession, *answers: Answer, now: float = 0.0) -> None:
    """Connect, then answer each request the session sends with the next answer."""
    session.connection_made(now)
    for answer in answers:
        session.data_received(answer(sent_one(session)), now)


def registered_session(now: float = 0.0) -> ListenSession:
    session = new_session(now=now)
    drive(session, challenge, accept, now=now)
    assert [type(e) for e in events(session)] == [Registered]
    return session


# --- the handshake ---------------------------------------------------------------------


def test_full_registration_handshake() -> None:
    session = new_session(now=5.0)
    assert state_of(session) is ListenState.IDLE
    assert session.should_connect(5.0)
    assert session.get_timer() is None
    assert not session.should_close()
    assert not session.registered
    assert session.public_endpoint is None
    assert session.data_to_send() == b""
    session.connection_made(5.0)
    first = session.data_to_send()
    assert first == encode_message(LISTEN.to_stun(tid(1)))
    assert session.data_to_send() == b""
    assert state_of(session) is ListenState.CHALLENGING
    assert not session.should_connect(5.0)
    assert session.get_timer() == 15.0  # the handshake timeout
    session.data_received(challenge(decode_message(first)), 5.0)
    assert state_of(session) is ListenState.AUTHENTICATING
    signed = sent_one(session)
    assert signed.transaction_id == tid(2)
    assert signed.get(Username) == Username(str(SERVER))
    assert signed.get(Realm) == Realm(REALM)
    assert signed.get(Nonce) == Nonce(NONCE)
    assert verify_listen(signed, realm=REALM, nonces=NONCES, now=1.0, key_for=lambda _: KEY) == KEY
    session.data_received(accept(signed), 5.25)
    assert events(session) == [Registered(public_endpoint=PUBLIC, keepalive_interval=30)]
    assert session.registered
    assert state_of(session) is ListenState.REGISTERED
    assert session.public_endpoint == PUBLIC
    assert session.get_timer() == 35.25  # the first keep-alive
    assert session.dropped_messages == 0


def test_a_wrong_key_is_refused_and_retried_after_the_maximum_back_off() -> None:
    session = new_session(system_key="not-the-key")
    drive(session, challenge)
    signed = sent_one(session)
    assert verify_listen(signed, realm=REALM, nonces=NONCES, now=1.0, key_for=lambda _: KEY) != KEY
    session.data_received(challenge(signed), 1.0)  # what the mediator answers a bad HMAC
    assert events(session) == [RegistrationRefused(code=401, reason="Unauthorized")]
    assert session.should_close()
    assert session.get_timer() is None
    session.connection_lost(2.0)
    retry_at = 2.0 + 60.0 * jitter(1)[0]
    assert events(session) == [
        SessionLost(reason="registration refused: 401 Unauthorized", retry_at=retry_at)
    ]
    # Still retrying: the key may be fixed on the mediator's side.
    assert session.get_timer() == retry_at
    session.handle_timer(retry_at - 0.01)
    assert state_of(session) is ListenState.BACKING_OFF
    assert not session.should_connect(retry_at - 0.01)
    assert session.should_connect(retry_at)
    session.handle_timer(retry_at)
    assert state_of(session) is ListenState.IDLE
    assert session.get_timer() is None


@pytest.mark.parametrize("first", [challenge, stale], ids=["401-then-438", "438-first"])
def test_a_stale_nonce_gets_a_retry_with_the_fresh_nonce(first: Answer) -> None:
    session = new_session()
    drive(session, first)
    if first is challenge:
        session.data_received(stale(sent_one(session)), 0.0)
    retry = sent_one(session)
    assert retry.get(Nonce) == Nonce(FRESH_NONCE)
    assert verify_listen(retry, realm=REALM, nonces=NONCES, now=501.0, key_for=lambda _: KEY) == KEY
    session.data_received(accept(retry), 0.0)
    assert [type(e) for e in events(session)] == [Registered]


MD5_ONLY = PasswordAlgorithms(((PasswordAlgorithmId.MD5, b""),))
NO_CHALLENGE = "Unauthorized (challenge without REALM and NONCE)"
NO_SHA256 = "Unauthorized (no SHA-256 password algorithm)"
BAD_REALM = "Unauthorized (realm not usable: 'bad\\x07realm')"


@pytest.mark.parametrize(
    ("answers", "code", "reason", "backoff"),
    [
        ((challenge, stale, stale), 438, "Stale Nonce", 60.0),
        ((challenge, error_with(500, "Server Error")), 500, "Server Error", 1.0),
        ((challenge_with(Realm(REALM)),), 401, NO_CHALLENGE, 60.0),
        ((challenge_with(Nonce(NONCE)),), 401, NO_CHALLENGE, 60.0),
        ((challenge_with(Realm(REALM), Nonce(NONCE), MD5_ONLY),), 401, NO_SHA256, 60.0),
        ((challenge_with(Realm("bad\u0007realm"), Nonce(NONCE)),), 401, BAD_REALM, 60.0),
    ],
)
def test_refusals_close_the_connection_and_back_off(
    answers: tuple[Answer, ...], code: int, reason: str, backoff: float
) -> None:
    session = new_session()
    drive(session, *answers)
    assert events(session) == [RegistrationRefused(code=code, reason=reason)]
    assert session.should_close()
    assert session.data_to_send() == b""
    session.connection_lost(3.0)
    assert events(session) == [
        SessionLost(
            reason=f"registration refused: {code} {reason}", retry_at=3.0 + backoff * jitter(1)[0]
        )
    ]


GUESSED_KEY = credential_key(str(SERVER), REALM, "a guess")
BARE_ERROR = encode_message(stun(MessageClass.ERROR, MediatorMethod.LISTEN, tid(1)))
NO_INTERVAL = stun(MessageClass.SUCCESS, MediatorMethod.LISTEN, tid(2), XorMappedAddress(PUBLIC))
TOO_LONG = struct.pack("!HHI12s", 0x0101, MAX_LISTEN_MESSAGE, MAGIC_COOKIE, tid(9))
INTEGRITY = "the listen response failed its MESSAGE-INTEGRITY-SHA256 check"
UNCHALLENGED = "listen success without authentication: the mediator must challenge"
MALFORMED = "malformed listen response: listen response is missing its KeepaliveInterval attribute"
NOT_STUN = "the mediator sent bytes that are not STUN: the two leading bits of a STUN message"
LONG = f"the mediator announced a {MAX_LISTEN_MESSAGE + 20}-byte message; at most 8192 are"


@pytest.mark.parametrize(
    ("answers", "reason"),
    [
        ((challenge, lambda request: accept(request, key=GUESSED_KEY)), INTEGRITY),
        ((challenge, lambda request: accept(request, key=None)), INTEGRITY),
        ((accept,), UNCHALLENGED),
        ((challenge, constant(encode_message(NO_INTERVAL, integrity_sha256_key=KEY))), MALFORMED),
        ((constant(BARE_ERROR),), "listen error response without ERROR-CODE"),
        ((constant(b"HTTP/1.1 400 Bad Request\r\n\r\n"),), NOT_STUN),
        ((constant(TOO_LONG),), LONG),
    ],
)
def test_answers_that_cannot_be_trusted_drop_the_connection(
    answers: tuple[Answer, ...], reason: str
) -> None:
    session = new_session()
    drive(session, *answers)
    assert session.should_close()
    assert session.buffered == 0
    # Closing: nothing the mediator says and no timer changes anything any more.
    session.data_received(challenge(LISTEN.to_stun(tid(1))), 1.0)
    session.handle_timer(1000.0)
    assert session.get_timer() is None
    assert session.data_to_send() == b""
    assert events(session) == []
    session.connection_lost(2.0)
    (lost,) = events(session)
    assert isinstance(lost, SessionLost)
    assert lost.reason.startswith(reason)
    assert lost.retry_at == 2.0 + jitter(1)[0]


def test_no_answer_to_listen_times_out_and_a_loss_during_the_handshake_is_reported() -> None:
    session = new_session()
    session.connection_made(0.0)
    session.handle_timer(9.99)
    assert not session.should_close()
    session.handle_timer(10.0)
    assert session.should_close()
    session.connection_lost(10.5)
    first, second = jitter(2)
    assert events(session) == [
        SessionLost(reason="no answer to listen within 10.0 s", retry_at=10.5 + first)
    ]
    session.connection_made(20.0)
    session.connection_lost(21.0)
    lost = "connection to the mediator lost during registration"
    assert events(session) == [SessionLost(reason=lost, retry_at=21.0 + 2.0 * second)]


def test_answers_to_other_transactions_during_the_handshake_are_dropped() -> None:
    session = new_session()
    session.connection_made(0.0)
    request = sent_one(session)
    session.data_received(challenge(LISTEN.to_stun(b"x" * 12)), 0.0)
    update = ConnectionUpdate(connect_session_id=SESSION_ID, client_udp_endpoint=PUBLIC)
    session.data_received(indication(update), 0.0)
    assert session.dropped_messages == 2
    assert state_of(session) is ListenState.CHALLENGING
    session.data_received(challenge(request), 0.0)
    assert state_of(session) is ListenState.AUTHENTICATING


# --- framing and misuse -----------------------------------------------------------------


def test_tcp_framing_survives_any_chunk_boundary_one_byte_at_a_time() -> None:
    session = new_session()
    session.connection_made(0.0)
    for byte in challenge(sent_one(session)):
        session.data_received(bytes([byte]), 0.0)
    update = ConnectionUpdate(connect_session_id=SESSION_ID, client_udp_endpoint=PUBLIC)
    for byte in accept(sent_one(session)) + indication(update):
        session.data_received(bytes([byte]), 0.0)
    assert [type(e) for e in events(session)] == [Registered, ClientUdpEndpointLearned]
    assert session.buffered == 0


def test_caller_misuse_raises_local_protocol_error() -> None:
    session = new_session()
    with pytest.raises(LocalProtocolError, match="no connection"):
        session.data_received(b"x", 0.0)
    session.connection_made(0.0)
    with pytest.raises(LocalProtocolError, match="connection_made is not allowed while challeng"):
        session.connection_made(0.0)
    session.connection_lost(0.0)
    (lost,) = events(session)
    assert isinstance(lost, SessionLost)
    with pytest.raises(LocalProtocolError, match="while backing off"):
        session.connection_made(lost.retry_at - 0.1)
    with pytest.raises(LocalProtocolError, match="while backing off"):
        session.connection_lost(lost.retry_at - 0.1)
    # Once the back-off has elapsed, connection_made works without a handle_timer first.
    session.connection_made(lost.retry_at)
    assert state_of(session) is ListenState.CHALLENGING


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"backoff_initial": 0.0}, "backoff_initial"),
        ({"backoff_initial": 5.0, "backoff_max": 1.0}, "backoff_initial"),
        ({"handshake_timeout": 0.0}, "timeouts"),
        ({"keepalive_response_timeout": -1.0}, "timeouts"),
        ({"system_key": "bad\u0007key"}, "SASLprep"),
        ({"local_endpoints": [("not-an-ip", 1)]}, "not an IP address"),
    ],
)
def test_bad_configuration_is_refused_up_front(options: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {
        "system_id": SYSTEM,
        "server_id": SERVER,
        "system_key": SYSTEM_KEY,
        "now": 0.0,
        "rng": seeded(),
        **options,
    }
    with pytest.raises(LocalProtocolError, match=message):
        ListenSession(**arguments)  # type: ignore[arg-type]
