"""A server agent's persistent registration with the mediator (DESIGN §1, §4, §6; RFC 8489 §9.2).

Everything that moves a ``ListenSession`` between states lives in ``_TRANSITIONS`` below.
This module owns the listen handshake (RFC 8489 §9.2 challenge), keep-alives and back-off;
it does not know how bytes travel, what time it is, or what the server does with a connection.

The adapter owns the TCP connection and reports on it; the session answers with bytes,
whether to (re)connect or close, a timer and events. Registering: an unsigned listen draws
a 401 with REALM and NONCE; the retry is signed (MESSAGE-INTEGRITY-SHA256 under the key
``SHA-256(server_id ":" realm ":" system_key)``), and a 438 Stale Nonce earns one more retry.
The success response must be signed with the same key, or the connection is dropped as an
attack. Once registered, a Binding request goes out every ``keepalive_interval`` seconds;
one unanswered for ``keepalive_response_timeout`` seconds means the connection is dead.
After any loss the session waits ``backoff_initial * 2**failures`` seconds (at most
``backoff_max``, and ``backoff_max`` at once after an authentication failure) times a
jitter factor in [0.5, 1] before it asks for a new connection.
"""

from __future__ import annotations

import enum
import os
import random
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..addresses import Endpoint
from ..errors import LocalProtocolError
from ..stun.attributes import Nonce, PasswordAlgorithmId, PasswordAlgorithms, Realm
from ..stun.credentials import saslprep
from ..stun.errors import StunDecodeError
from ..stun.message import (
    BINDING,
    Message,
    MessageClass,
    decode_message,
    encode_message,
    new_transaction_id,
    stream_message_length,
    verify_integrity_sha256,
)
from ..stun.transaction import ClientTransaction
from .auth import credential_key, sign_ack, sign_listen
from .messages import (
    ConnectionAck,
    ConnectionAckResponse,
    ConnectionUpdate,
    Listen,
    ListenResponse,
    MediatorMessageError,
    MediatorMethod,
)
from .messages import ConnectionRequested as ConnectionRequestedMessage

__all__ = [
    "MAX_LISTEN_MESSAGE",
    "MAX_PENDING_EVENTS",
    "ClientUdpEndpointLearned",
    "ConnectionRequestReceived",
    "ListenEvent",
    "ListenSession",
    "ListenState",
    "Registered",
    "RegistrationRefused",
    "SessionLost",
]

# The mediator sends a listen response or an indication on this session, each under
# 200 bytes; 8 KiB leaves room for SOFTWARE and future attributes while a bogus length
# field cannot make us hold the 64 KiB a STUN header allows.
MAX_LISTEN_MESSAGE = 8192
# Connection requests pile up only if the application stops reading events; past this
# many the newest are dropped (and counted) rather than growing without bound.
MAX_PENDING_EVENTS = 1024


# --- events ------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ListenEvent:
    """Base class of what a ``ListenSession`` reports."""


@dataclass(frozen=True, kw_only=True)
class Registered(ListenEvent):
    """The mediator accepted the server's key: it is online and reachable."""

    public_endpoint: Endpoint
    """The server's public TCP address as the mediator saw the session."""
    keepalive_interval: int
    """Seconds between keep-alives, as the mediator asked."""


@dataclass(frozen=True, kw_only=True)
class ConnectionRequestReceived(ListenEvent):
    """A client wants this server: punch from a UDP socket and send ``connection_ack``."""

    connect_session_id: bytes
    """The 16-byte id naming this connect attempt; pass it to ``connection_ack``."""
    client_udp_endpoint: Endpoint | None
    """The client's UDP address, None until the UDP copy of its connect arrives."""
    client_tcp_endpoint: Endpoint | None
    """The client's TCP source address, when its TCP copy of connect arrived."""


@dataclass(frozen=True, kw_only=True)
class ClientUdpEndpointLearned(ListenEvent):
    """The mediator learned a client's UDP address after it announced the request."""

    connect_session_id: bytes
    """The connect attempt this address belongs to."""
    client_udp_endpoint: Endpoint
    """The client's UDP address as the mediator saw it."""


@dataclass(frozen=True, kw_only=True)
class RegistrationRefused(ListenEvent):
    """The mediator said no; the session closes and keeps retrying with back-off."""

    code: int
    """The STUN error code (401 after a signed listen means the system key is wrong)."""
    reason: str
    """The mediator's reason phrase, or why its answer could not be used."""


@dataclass(frozen=True, kw_only=True)
class SessionLost(ListenEvent):
    """The TCP session ended; ``should_connect`` turns True again at ``retry_at``."""

    reason: str
    """Why: the cause the session found, or that the connection went away."""
    retry_at: float
    """When the next connection attempt is due (the caller's clock)."""


# --- the state table ---------------------------------------------------------------------


class ListenState(enum.Enum):
    """Where the session is; the adapter may log it, the table below decides it."""

    BACKING_OFF = "backing off"  # disconnected, waiting until the retry time
    IDLE = "idle"  # disconnected, the adapter should connect
    CHALLENGING = "challenging"  # unsigned listen sent, expecting the 401 challenge
    AUTHENTICATING = "authenticating"  # signed listen sent
    REGISTERED = "registered"
    CLOSING = "closing"  # asked the adapter to close; waiting for connection_lost


class _Input(enum.Enum):
    BACKOFF_ELAPSED = "back-off elapsed"
    CONNECTION_MADE = "connection_made"
    CHALLENGED = "401/438 to the unsigned listen"
    NONCE_STALE = "438 to the signed listen"
    ACCEPTED = "verified listen response"
    GIVE_UP = "give up on this connection"
    CONNECTION_LOST = "connection_lost"


_S, _I = ListenState, _Input
_CONNECTED = (_S.CHALLENGING, _S.AUTHENTICATING, _S.REGISTERED)
_TRANSITIONS: dict[tuple[ListenState, _Input], ListenState] = {
    (_S.BACKING_OFF, _I.BACKOFF_ELAPSED): _S.IDLE,
    (_S.IDLE, _I.CONNECTION_MADE): _S.CHALLENGING,
    # The adapter's connect attempt failed: that is a loss like any other.
    (_S.IDLE, _I.CONNECTION_LOST): _S.BACKING_OFF,
    (_S.CHALLENGING, _I.CHALLENGED): _S.AUTHENTICATING,
    (_S.AUTHENTICATING, _I.NONCE_STALE): _S.AUTHENTICATING,
    (_S.AUTHENTICATING, _I.ACCEPTED): _S.REGISTERED,
    **{(state, _I.GIVE_UP): _S.CLOSING for state in _CONNECTED},
    **{(state, _I.CONNECTION_LOST): _S.BACKING_OFF for state in (*_CONNECTED, _S.CLOSING)},
}

_LOST_REASONS = {
    _S.IDLE: "could not connect to the mediator",
    _S.CHALLENGING: "connection to the mediator lost during registration",
    _S.AUTHENTICATING: "connection to the mediator lost during registration",
    _S.REGISTERED: "connection to the mediator lost",
}


class ListenSession:
    """A server agent's registration with the mediator over one TCP session at a time."""

    def __init__(
        self,
        *,
        system_id: uuid.UUID,
        server_id: uuid.UUID,
        system_key: str,
        local_endpoints: Sequence[Endpoint] = (),
        forwarded_endpoints: Sequence[Endpoint] = (),
        now: float,
        rng: random.Random,
        random_bytes: Callable[[int], bytes] = os.urandom,
        backoff_initial: float = 1.0,
        backoff_max: float = 60.0,
        handshake_timeout: float = 10.0,
        keepalive_response_timeout: float = 10.0,
    ) -> None:
        if not 0 < backoff_initial <= backoff_max:
            raise LocalProtocolError("need 0 < backoff_initial <= backoff_max")
        if handshake_timeout <= 0 or keepalive_response_timeout <= 0:
            raise LocalProtocolError("timeouts must be positive")
        saslprep(system_key)  # a key SASLprep refuses is the caller's bug: say so now
        self._listen = Listen(
            system_id=system_id,
            server_id=server_id,
            local_endpoints=tuple(local_endpoints),
            forwarded_endpoints=tuple(forwarded_endpoints),
        )
        encode_message(self._listen.to_stun(bytes(12)))  # bad addresses fail here, not later
        self._username = str(server_id)
        self._system_key = system_key
        self._rng = rng
        self._random_bytes = random_bytes
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._handshake_timeout = handshake_timeout
        self._keepalive_timeout = keepalive_response_timeout

        self._state = ListenState.IDLE
        self._retry_at = now
        self._failures = 0  # consecutive losses since the last registration
        self._inbound = bytearray()
        self._outbound = bytearray()
        self._events: deque[ListenEvent] = deque()
        #: Messages from the mediator that were malformed, unexpected or not ours.
        self.dropped_messages = 0
        # Handshake: the outstanding listen's transaction id, its deadline, the challenge.
        self._pending_tid = b""
        self._deadline = 0.0
        self._realm = self._nonce = ""
        self._stale_retried = False
        self._attempt_key = b""
        # Why this connection is being given up, and whether the key was refused.
        self._close_reason = ""
        self._auth_failed = False
        # The key the mediator last proved it shares (it signed a listen response with it).
        self._key: bytes | None = None
        self._public_endpoint: Endpoint | None = None
        self._keepalive_interval = self._next_keepalive = 0.0
        self._keepalive_tid: bytes | None = None

    # --- queries -----------------------------------------------------------------------

    @property
    def state(self) -> ListenState:
        """The current state (for logs; decisions are the session's)."""
        return self._state

    @property
    def registered(self) -> bool:
        """True while the mediator holds this server as online."""
        return self._state is ListenState.REGISTERED

    @property
    def public_endpoint(self) -> Endpoint | None:
        """The public TCP address the mediator saw, while registered."""
        return self._public_endpoint if self.registered else None

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete message from the mediator held so far."""
        return len(self._inbound)

    def should_connect(self, now: float) -> bool:
        """True while disconnected and the back-off has elapsed: open a TCP connection."""
        return self._state is ListenState.IDLE or (
            self._state is ListenState.BACKING_OFF and now >= self._retry_at
        )

    def should_close(self) -> bool:
        """True once the session gave up on this connection; close it, then ``connection_lost``."""
        return self._state is ListenState.CLOSING

    def get_timer(self) -> float | None:
        """The next deadline: retry, handshake timeout, keep-alive send or answer timeout."""
        state = self._state
        if state is ListenState.BACKING_OFF:
            return self._retry_at
        if state in (ListenState.CHALLENGING, ListenState.AUTHENTICATING):
            return self._deadline
        if state is ListenState.REGISTERED:
            return self._deadline if self._keepalive_tid is not None else self._next_keepalive
        return None

    def next_event(self) -> ListenEvent | None:
        """The oldest event not yet taken, or None."""
        return self._events.popleft() if self._events else None

    def data_to_send(self) -> bytes:
        """Bytes for the TCP connection (empty when there is nothing to send)."""
        data = bytes(self._outbound)
        self._outbound.clear()
        return data

    # --- inputs from the adapter -------------------------------------------------------

    def connection_made(self, now: float) -> None:
        """The TCP connection is up: queue the first (unsigned) listen."""
        self._expire_backoff(now)
        self._move(_Input.CONNECTION_MADE)
        self._deadline = now + self._handshake_timeout
        self._stale_retried = False
        self._send_listen(signed=False)

    def connection_lost(self, now: float) -> None:
        """The TCP connection closed or could not be made: schedule the next attempt."""
        self._expire_backoff(now)
        previous = self._state
        self._move(_Input.CONNECTION_LOST)
        reason = self._close_reason or _LOST_REASONS[previous]
        base = self._backoff_max
        if not self._auth_failed:
            # 2.0 ** a capped exponent: an int power would be exact but overflow the float.
            base = min(self._backoff_max, self._backoff_initial * 2.0 ** min(self._failures, 64))
        self._failures += 1
        # Jitter in [0.5, 1] spreads a fleet of servers that lost the mediator at once.
        self._retry_at = now + base * self._rng.uniform(0.5, 1.0)
        self._close_reason, self._auth_failed = "", False
        self._inbound.clear()
        self._outbound.clear()
        self._keepalive_tid = None
        self._events.append(SessionLost(reason=reason, retry_at=self._retry_at))

    def data_received(self, data: bytes, now: float) -> None:
        """Bytes from the mediator; any chunking of the stream gives the same events."""
        if self._state is ListenState.CLOSING:
            return  # already leaving; nothing the mediator says now changes that
        if self._state not in _CONNECTED:
            raise LocalProtocolError(f"data_received while {self._state.value}: no connection")
        self._inbound += data
        while self._state in _CONNECTED:
            try:
                length = stream_message_length(self._inbound)
            except StunDecodeError as error:
                self._give_up(f"the mediator sent bytes that are not STUN: {error}")
                return
            if length is None:
                return
            if length > MAX_LISTEN_MESSAGE:
                self._give_up(
                    f"the mediator announced a {length}-byte message; at most"
                    f" {MAX_LISTEN_MESSAGE} are expected"
                )
                return
            if len(self._inbound) < length:
                return
            frame = bytes(self._inbound[:length])
            del self._inbound[:length]
            self._handle_frame(frame, now)

    def handle_timer(self, now: float) -> None:
        """Move time: back-off expiry, handshake and keep-alive timeouts, keep-alive sends."""
        state = self._state
        if state is ListenState.BACKING_OFF:
            self._expire_backoff(now)
        elif state in (ListenState.CHALLENGING, ListenState.AUTHENTICATING):
            if now >= self._deadline:
                self._give_up(f"no answer to listen within {self._handshake_timeout} s")
        elif state is ListenState.REGISTERED:
            if self._keepalive_tid is not None:
                if now >= self._deadline:
                    self._give_up(f"no keep-alive answer within {self._keepalive_timeout} s")
            elif now >= self._next_keepalive:
                self._send_keepalive(now)

    # --- connection_ack (UDP, driven by the adapter) -------------------------------------

    def connection_ack(self, connect_session_id: bytes, now: float) -> ClientTransaction:
        """A signed connection_ack for the adapter to send from its punching UDP socket.

        Uses the key of the last successful registration, so an ack for a request
        that arrived just before the TCP session dropped still goes out.
        """
        if self._key is None:
            raise LocalProtocolError("connection_ack before the first successful registration")
        ack = ConnectionAck(connect_session_id=connect_session_id, server_id=self._listen.server_id)
        request = ack.to_stun(new_transaction_id(self._random_bytes))
        signed = sign_ack(request, username=self._username, key=self._key)
        return ClientTransaction(signed, now=now)

    def ack_response(self, message: Message) -> ConnectionAckResponse | None:
        """The mediator's answer to a ``connection_ack`` transaction, if signed with our key.

        The adapter passes the ``ResponseReceived.message`` here; None means an
        error response, a forgery or a malformed answer (nothing to act on).
        """
        if (
            self._key is None
            or message.method != MediatorMethod.CONNECTION_ACK
            or message.message_class is not MessageClass.SUCCESS
            or not verify_integrity_sha256(message, self._key)
        ):
            return None
        try:
            return ConnectionAckResponse.from_stun(message)
        except MediatorMessageError:
            return None

    # --- internals ---------------------------------------------------------------------

    def _move(self, event: _Input) -> None:
        next_state = _TRANSITIONS.get((self._state, event))
        if next_state is None:
            raise LocalProtocolError(f"{event.value} is not allowed while {self._state.value}")
        self._state = next_state

    def _expire_backoff(self, now: float) -> None:
        if self._state is ListenState.BACKING_OFF and now >= self._retry_at:
            self._move(_Input.BACKOFF_ELAPSED)

    def _give_up(self, reason: str, *, auth_failed: bool = False) -> None:
        self._move(_Input.GIVE_UP)
        self._close_reason = reason
        self._auth_failed = auth_failed
        self._inbound.clear()
        self._outbound.clear()

    def _refuse(self, code: int, reason: str, *, auth_failed: bool) -> None:
        self._events.append(RegistrationRefused(code=code, reason=reason))
        self._give_up(f"registration refused: {code} {reason}", auth_failed=auth_failed)

    def _send_listen(self, *, signed: bool) -> None:
        self._pending_tid = new_transaction_id(self._random_bytes)
        request = self._listen.to_stun(self._pending_tid)
        if signed:
            self._outbound += sign_listen(
                request,
                username=self._username,
                realm=self._realm,
                nonce=self._nonce,
                key=self._attempt_key,
            )
        else:
            self._outbound += encode_message(request)

    def _send_keepalive(self, now: float) -> None:
        self._keepalive_tid = new_transaction_id(self._random_bytes)
        binding = Message(
            message_class=MessageClass.REQUEST, method=BINDING, transaction_id=self._keepalive_tid
        )
        self._outbound += encode_message(binding)
        self._deadline = now + self._keepalive_timeout
        self._next_keepalive = now + self._keepalive_interval

    def _handle_frame(self, frame: bytes, now: float) -> None:
        try:
            message = decode_message(frame)
        except StunDecodeError:
            self.dropped_messages += 1  # framing held, so the stream goes on past the bad message
            return
        answer = message.message_class in (MessageClass.SUCCESS, MessageClass.ERROR)
        if self._state is not ListenState.REGISTERED:
            if (
                answer
                and message.method == MediatorMethod.LISTEN
                and message.transaction_id == self._pending_tid
            ):
                self._handle_listen_answer(message, now)
            else:
                self.dropped_messages += 1
        elif answer and message.method == BINDING and message.transaction_id == self._keepalive_tid:
            self._keepalive_tid = None  # alive; the next send is already scheduled
        elif message.message_class is MessageClass.INDICATION:
            self._handle_indication(message)
        else:
            self.dropped_messages += 1

    def _handle_listen_answer(self, message: Message, now: float) -> None:
        if message.message_class is MessageClass.SUCCESS:
            self._handle_listen_success(message, now)
            return
        error = message.error_code
        if error is None:
            self._give_up("listen error response without ERROR-CODE")
        elif self._state is ListenState.CHALLENGING and error.code in (401, 438):
            # RFC 8489 §9.2.5: an unsigned request is answered with a challenge (438 only
            # happens if the mediator expired a nonce we never sent; it carries one too).
            self._answer_challenge(message, error.code, error.reason)
        elif error.code == 438 and not self._stale_retried:
            self._stale_retried = True
            self._answer_challenge(message, error.code, error.reason)
        else:
            # A 401 to a signed listen is the mediator rejecting the key; a second 438 in a
            # row means its nonces cannot be met. Both need someone to fix a configuration.
            self._refuse(error.code, error.reason, auth_failed=error.code in (401, 438))

    def _answer_challenge(self, message: Message, code: int, reason: str) -> None:
        realm, nonce = message.get(Realm), message.get(Nonce)
        algorithms = message.get(PasswordAlgorithms)
        if realm is None or nonce is None:
            self._refuse(code, f"{reason} (challenge without REALM and NONCE)", auth_failed=True)
            return
        if algorithms is not None and all(
            algorithm != PasswordAlgorithmId.SHA256 for algorithm, _ in algorithms.algorithms
        ):
            # RFC 8489 §9.2.5: never fall back to a weaker algorithm than we sign with.
            self._refuse(code, f"{reason} (no SHA-256 password algorithm)", auth_failed=True)
            return
        try:
            key = credential_key(self._username, realm.value, self._system_key)
        except LocalProtocolError:
            # The realm is the mediator's text; one SASLprep refuses is its error, not ours.
            self._refuse(code, f"{reason} (realm not usable: {realm.value!r})", auth_failed=True)
            return
        if self._state is ListenState.CHALLENGING:
            self._move(_Input.CHALLENGED)
        else:
            self._move(_Input.NONCE_STALE)
        self._realm, self._nonce, self._attempt_key = realm.value, nonce.value, key
        self._send_listen(signed=True)

    def _handle_listen_success(self, message: Message, now: float) -> None:
        if self._state is ListenState.CHALLENGING:
            # Nothing authenticated yet, so nothing can vouch for this answer.
            self._give_up("listen success without authentication: the mediator must challenge")
            return
        if not verify_integrity_sha256(message, self._attempt_key):
            self._give_up("the listen response failed its MESSAGE-INTEGRITY-SHA256 check")
            return
        try:
            response = ListenResponse.from_stun(message)
        except MediatorMessageError as error:
            self._give_up(f"malformed listen response: {error}")
            return
        self._move(_Input.ACCEPTED)
        self._key = self._attempt_key
        self._failures = 0
        self._public_endpoint = response.public_endpoint
        self._keepalive_interval = float(response.keepalive_interval)
        self._next_keepalive = now + self._keepalive_interval
        self._keepalive_tid = None
        self._events.append(
            Registered(
                public_endpoint=response.public_endpoint,
                keepalive_interval=response.keepalive_interval,
            )
        )

    def _handle_indication(self, message: Message) -> None:
        event: ListenEvent
        try:
            if message.method == MediatorMethod.CONNECTION_REQUESTED:
                requested = ConnectionRequestedMessage.from_stun(message)
                event = ConnectionRequestReceived(
                    connect_session_id=requested.connect_session_id,
                    client_udp_endpoint=requested.client_udp_endpoint,
                    client_tcp_endpoint=requested.client_tcp_endpoint,
                )
            elif message.method == MediatorMethod.CONNECTION_UPDATE:
                update = ConnectionUpdate.from_stun(message)
                event = ClientUdpEndpointLearned(
                    connect_session_id=update.connect_session_id,
                    client_udp_endpoint=update.client_udp_endpoint,
                )
            else:
                self.dropped_messages += 1
                return
        except MediatorMessageError:
            self.dropped_messages += 1
            return
        if len(self._events) >= MAX_PENDING_EVENTS:
            self.dropped_messages += 1
            return
        self._events.append(event)
