"""tunnel_syn (method 0x109): the first exchange on every new stream from a client to a server.

This module owns both ends of that exchange: what the request and its answer carry, which
answer proves the far end is the server asked for, which request a server accepts, and the
bounds (one message of at most ``MAX_SYN_MESSAGE`` bytes, one deadline) that keep either
side from waiting on a peer that speaks something else. It does not know which path the
stream took (punched UDT, direct TCP, LAN TCP, relay), how bytes travel or what time it is.

The client sends one STUN request naming its target (SERVER-ID or SYSTEM-ID) and, when it
has one, the CONNECT-SESSION-ID of the connect attempt (DESIGN.md §6). The server answers
before any application byte: a success echoing its own ids and the session id, or an error
(400 malformed, 403 "Unknown Session", 404 "Unknown Server", 420 unknown attribute). Over a
stream, STUN messages delimit themselves by their length field (RFC 8489 §6.2.2), so the
bytes after the message belong to the application and are handed over as ``leftover``.
"""

from __future__ import annotations

import enum
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Generic, Self, TypeVar

from .errors import LocalProtocolError
from .mediator.attributes import ConnectSessionId, ServerId, SystemId
from .mediator.messages import (
    MediatorMessage,
    MediatorMessageError,
    MediatorMethod,
    check_target,
    read_target,
    target_attribute,
)
from .stun.attributes import Attribute, UnknownAttributes
from .stun.errors import StunDecodeError
from .stun.message import (
    Message,
    MessageClass,
    decode_message,
    encode_message,
    peek_header,
    stream_message_length,
)

__all__ = [
    "MAX_SYN_MESSAGE",
    "SynAccepted",
    "SynAnswered",
    "SynEvent",
    "SynFailed",
    "SynRejected",
    "TunnelSyn",
    "TunnelSynAnswer",
    "TunnelSynInitiator",
    "TunnelSynResponder",
]

# A request is at most 60 bytes (header, target id, session id) and an answer 80 (both
# ids); an error answer with a 127-character phrase (at most 763 bytes of UTF-8, RFC 8489
# §14.8) and 16 unknown attribute types still fits. A length field asking for more is not
# a wavesync peer, and nothing longer is ever buffered.
MAX_SYN_MESSAGE = 1024
# How many of a foreign peer's first bytes a failure quotes: enough to recognise
# "HTTP/1.1 400 Bad" or an SSH banner, short enough for a log line.
_QUOTED_BYTES = 16
# RFC 8489 §14.8: the reason phrase is "fewer than 128 characters".
_MAX_REASON_CHARS = 127
_MAX_UNKNOWN_LISTED = 16


def _check_session_id(session_id: bytes | None) -> None:
    if session_id is not None and len(session_id) != 16:
        raise LocalProtocolError("a connect session id is 16 bytes")


# --- messages ------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class TunnelSyn(MediatorMessage):
    """tunnel_syn (request, client → server, the first bytes of a new stream).

    Names the server the client means to reach by ``server_id`` (that server) or
    ``system_id`` (any server of that system); exactly one of the two.
    """

    METHOD: ClassVar[int] = MediatorMethod.TUNNEL_SYN
    CLASS: ClassVar[MessageClass] = MessageClass.REQUEST
    server_id: uuid.UUID | None = None
    system_id: uuid.UUID | None = None
    #: The connect attempt's 16 random bytes, when the client made one through the mediator.
    connect_session_id: bytes | None = None

    def __post_init__(self) -> None:
        _check_session_id(self.connect_session_id)
        check_target("tunnel_syn", self.server_id, self.system_id)

    def stun_attributes(self) -> tuple[Attribute, ...]:
        target = target_attribute(self.server_id, self.system_id)
        session = (
            () if self.connect_session_id is None else (ConnectSessionId(self.connect_session_id),)
        )
        return (target, *session)

    @classmethod
    def from_stun(cls, message: Message) -> Self:
        server_id, system_id = read_target(message, "tunnel_syn")
        session = message.get(ConnectSessionId)
        return cls(
            server_id=server_id,
            system_id=system_id,
            connect_session_id=session.value if session else None,
        )


@dataclass(frozen=True, kw_only=True)
class TunnelSynAnswer(MediatorMessage):
    """tunnel_syn success (server → client, same transaction id): who answered."""

    METHOD: ClassVar[int] = MediatorMethod.TUNNEL_SYN
    CLASS: ClassVar[MessageClass] = MessageClass.SUCCESS
    server_id: uuid.UUID
    system_id: uuid.UUID
    #: The request's session id, echoed; None when the request carried none.
    connect_session_id: bytes | None = None

    def __post_init__(self) -> None:
        _check_session_id(self.connect_session_id)

    def stun_attributes(self) -> tuple[Attribute, ...]:
        session = (
            () if self.connect_session_id is None else (ConnectSessionId(self.connect_session_id),)
        )
        return (ServerId(self.server_id), SystemId(self.system_id), *session)

    @classmethod
    def from_stun(cls, message: Message) -> Self:
        server, system = message.get(ServerId), message.get(SystemId)
        if server is None or system is None:
            raise MediatorMessageError("tunnel_syn answer must carry SERVER-ID and SYSTEM-ID")
        session = message.get(ConnectSessionId)
        return cls(
            server_id=server.value,
            system_id=system.value,
            connect_session_id=session.value if session else None,
        )


# --- events --------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SynEvent:
    """Base class of what either end reports (exactly one event per exchange)."""


@dataclass(frozen=True, kw_only=True)
class SynAnswered(SynEvent):
    """Initiator: the far end is the server asked for; the stream is the application's now."""

    server_id: uuid.UUID
    """The id of the server that answered."""
    system_id: uuid.UUID
    """The system it belongs to."""
    leftover: bytes
    """Bytes that came after the answer (the service may speak first): the stream's first data."""
    elapsed: float
    """Seconds from the initiator's start to the answer."""


@dataclass(frozen=True, kw_only=True)
class SynFailed(SynEvent):
    """Initiator: no proof that this stream reaches the server; it must not be used."""

    reason: str
    """The server's reason phrase, or what was wrong (not a wavesync server, timeout, EOF...)."""
    code: int | None
    """The server's STUN error code (403, 404, ...), None when it sent no error response."""
    elapsed: float
    """Seconds from the initiator's start to the failure."""


@dataclass(frozen=True, kw_only=True)
class SynAccepted(SynEvent):
    """Responder: a client that asked for us; the success answer is in ``data_to_send``."""

    connect_session_id: bytes | None
    """The session id the client sent (checked only with ``require_session``), or None."""
    target_was_system: bool
    """True when the client named our system rather than this server."""
    leftover: bytes
    """Bytes that came after the request (a pipelining client): the stream's first data."""


@dataclass(frozen=True, kw_only=True)
class SynRejected(SynEvent):
    """Responder: the stream is not a client of ours; close it once ``data_to_send`` is sent."""

    reason: str
    """What was wrong with the peer's bytes, or the timeout or EOF."""
    code: int | None
    """The STUN error code answered (in ``data_to_send``), None when nothing is answered."""


# --- framing -------------------------------------------------------------------------------


class _FramingError(Exception):
    """The buffered bytes cannot be, or cannot become, one acceptable tunnel_syn message."""

    def __init__(self, reason: str, *, foreign: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        #: True when the bytes cannot start any STUN message at all.
        self.foreign = foreign


def _take_message(buffer: bytearray) -> tuple[bytes, bytes] | None:
    """``(message, rest)`` once a whole message is buffered, None while it is incomplete.

    Refuses as soon as the bytes so far cannot start a STUN message, or the length field
    asks for more than ``MAX_SYN_MESSAGE``, so neither end waits for (or stores) more.
    """
    try:
        length = stream_message_length(buffer)
    except StunDecodeError:
        quoted = bytes(buffer[:_QUOTED_BYTES])
        raise _FramingError(repr(quoted), foreign=True) from None
    if length is not None and length > MAX_SYN_MESSAGE:
        raise _FramingError(
            f"a {length}-byte message is longer than {MAX_SYN_MESSAGE} bytes", foreign=False
        )
    if length is None or len(buffer) < length:
        return None
    return bytes(buffer[:length]), bytes(buffer[length:])


@dataclass(frozen=True, slots=True)
class _ErrorAnswer:
    """An error response the responder decided on: code, reason phrase, and why (for the event)."""

    code: int
    phrase: str
    reason: str
    attributes: tuple[Attribute, ...] = ()


class _State(enum.Enum):
    WAITING = "waiting"
    DONE = "done"


# --- initiator -----------------------------------------------------------------------------


_E = TypeVar("_E", bound=SynEvent)


class _SynEnd(Generic[_E]):
    """What both ends share: one message in, one event out, one deadline."""

    def __init__(self, *, now: float, timeout: float) -> None:
        if timeout <= 0:
            raise LocalProtocolError("the tunnel_syn timeout must be positive")
        self._timeout = timeout
        self._deadline = now + timeout
        self._state = _State.WAITING
        self._inbound = bytearray()
        self._events: deque[_E] = deque()

    @property
    def done(self) -> bool:
        """True once the exchange has its one event; no input counts after that."""
        return self._state is _State.DONE

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete message held so far (never more than ``MAX_SYN_MESSAGE``)."""
        return len(self._inbound)

    def get_timer(self) -> float | None:
        """The deadline for the peer's message, None once done."""
        return None if self.done else self._deadline

    def next_event(self) -> _E | None:
        """The exchange's one event, once."""
        return self._events.popleft() if self._events else None

    def _finish(self, event: _E) -> None:
        self._state = _State.DONE
        self._inbound.clear()
        self._events.append(event)


class TunnelSynInitiator(_SynEnd[SynAnswered | SynFailed]):
    """The client's end: sends tunnel_syn, then checks that the answer comes from the target."""

    def __init__(
        self,
        *,
        server_id: uuid.UUID | None = None,
        system_id: uuid.UUID | None = None,
        connect_session_id: bytes | None = None,
        transaction_id: bytes,
        now: float,
        timeout: float = 5.0,
    ) -> None:
        super().__init__(now=now, timeout=timeout)
        if len(transaction_id) != 12:
            raise LocalProtocolError("a transaction id is 12 bytes")
        # TunnelSyn checks the target and the session id.
        self._request = TunnelSyn(
            server_id=server_id, system_id=system_id, connect_session_id=connect_session_id
        )
        self._transaction_id = transaction_id
        self._outbound = encode_message(self._request.to_stun(transaction_id))
        self._start = now

    def data_to_send(self) -> bytes:
        """The request, once (empty after that, or once done)."""
        data, self._outbound = self._outbound, b""
        return b"" if self.done else data

    def receive_data(self, data: bytes, now: float) -> None:
        """Bytes from the stream; the answer is checked as soon as it is whole."""
        if self.done:
            return
        self._inbound += data
        try:
            taken = _take_message(self._inbound)
        except _FramingError as refusal:
            reason = (
                f"not a wavesync server: {refusal.reason}" if refusal.foreign else refusal.reason
            )
            self._fail(reason, None, now)
            return
        if taken is not None:
            self._answer(*taken, now)

    def eof_received(self, now: float) -> None:
        """The far end closed its side before answering."""
        if not self.done:
            held = f" after {len(self._inbound)} bytes" if self._inbound else ""
            self._fail(f"the stream closed before the tunnel_syn answer{held}", None, now)

    def handle_timer(self, now: float) -> None:
        """Move time: at the deadline, fail."""
        if not self.done and now >= self._deadline:
            self._fail(f"no tunnel_syn answer within {self._timeout} s", None, now)

    # --- transitions: every change of ``_state`` happens below ---------------------------

    def _answer(self, frame: bytes, leftover: bytes, now: float) -> None:
        try:
            message = decode_message(frame)
        except StunDecodeError as error:
            self._fail(f"malformed tunnel_syn answer ({error})", None, now)
            return
        if message.method != MediatorMethod.TUNNEL_SYN or message.message_class not in (
            MessageClass.SUCCESS,
            MessageClass.ERROR,
        ):
            kind = f"method 0x{message.method:03x} {message.message_class.name}"
            self._fail(f"not a tunnel_syn answer: {kind}", None, now)
            return
        if message.transaction_id != self._transaction_id:
            self._fail("a tunnel_syn answer to another transaction", None, now)
            return
        if message.message_class is MessageClass.ERROR:
            error_code = message.error_code
            if error_code is None:
                self._fail("tunnel_syn error response without ERROR-CODE", None, now)
            else:
                self._fail(error_code.reason, error_code.code, now)
            return
        try:
            answer = TunnelSynAnswer.from_stun(message)
        except MediatorMessageError as error:
            self._fail(f"malformed tunnel_syn answer ({error})", None, now)
            return
        problem = self._mismatch(answer)
        if problem:
            self._fail(problem, None, now)
            return
        self._finish(
            SynAnswered(
                server_id=answer.server_id,
                system_id=answer.system_id,
                leftover=leftover,
                elapsed=now - self._start,
            )
        )

    def _mismatch(self, answer: TunnelSynAnswer) -> str:
        """Why ``answer`` does not prove the far end is our target, or ''."""
        wanted = self._request
        if wanted.server_id is not None and answer.server_id != wanted.server_id:
            return f"answered by server {answer.server_id}, not {wanted.server_id}"
        if wanted.system_id is not None and answer.system_id != wanted.system_id:
            return f"answered by a server of system {answer.system_id}, not {wanted.system_id}"
        if answer.connect_session_id != wanted.connect_session_id:
            if wanted.connect_session_id is None:
                return "the answer carries a connect session id the request did not"
            if answer.connect_session_id is None:
                return "the answer does not echo our connect session id"
            return "the answer echoes another connect session id"
        return ""

    def _fail(self, reason: str, code: int | None, now: float) -> None:
        self._finish(SynFailed(reason=reason, code=code, elapsed=now - self._start))


# --- responder -----------------------------------------------------------------------------


class TunnelSynResponder(_SynEnd[SynAccepted | SynRejected]):
    """The server's end: reads tunnel_syn, answers it, and says whether the stream is a client."""

    def __init__(
        self,
        *,
        system_id: uuid.UUID,
        server_id: uuid.UUID,
        now: float,
        timeout: float = 5.0,
        require_session: bool = False,
        known_session: Callable[[bytes], bool] | None = None,
    ) -> None:
        super().__init__(now=now, timeout=timeout)
        if require_session and known_session is None:
            raise LocalProtocolError("require_session needs known_session to check the id")
        self._system_id = system_id
        self._server_id = server_id
        self._require_session = require_session
        self._known_session = known_session
        self._outbound = b""

    def data_to_send(self) -> bytes:
        """The answer (success or error), once it is decided; empty otherwise."""
        data, self._outbound = self._outbound, b""
        return data

    def receive_data(self, data: bytes, now: float) -> None:
        """Bytes from the stream; the request is answered as soon as it is whole."""
        if self.done:
            return
        self._inbound += data
        try:
            taken = _take_message(self._inbound)
        except _FramingError as refusal:
            if refusal.foreign:
                # Not STUN at all: nothing we could send would mean anything to it.
                self._reject(f"not a tunnel_syn: {refusal.reason}")
            else:
                self._refuse_header(bytes(self._inbound), refusal.reason)
            return
        if taken is not None:
            self._request(*taken)

    def eof_received(self, now: float) -> None:
        """The client closed its side before its request was whole."""
        if not self.done:
            held = f" after {len(self._inbound)} bytes" if self._inbound else ""
            self._reject(f"the stream closed before the tunnel_syn request{held}")

    def handle_timer(self, now: float) -> None:
        """Move time: at the deadline, reject without an answer (a slow-loris gets nothing)."""
        if not self.done and now >= self._deadline:
            self._reject(f"no tunnel_syn request within {self._timeout} s")

    # --- transitions: every change of ``_state`` happens below ---------------------------

    def _request(self, frame: bytes, leftover: bytes) -> None:
        try:
            message = decode_message(frame)
        except StunDecodeError as error:
            self._refuse_header(frame, f"malformed tunnel_syn: {error}")
            return
        if message.message_class is not MessageClass.REQUEST:
            # Only a request has a response (RFC 8489 §6.3): refuse silently.
            self._reject(
                f"not a request: method 0x{message.method:03x} {message.message_class.name}"
            )
            return
        checked = self._check(message)
        if isinstance(checked, _ErrorAnswer):
            self._answer_error(
                message, checked.code, checked.phrase, checked.reason, *checked.attributes
            )
            return
        session = checked.connect_session_id
        answer = TunnelSynAnswer(
            server_id=self._server_id, system_id=self._system_id, connect_session_id=session
        )
        self._outbound = encode_message(answer.to_stun(message.transaction_id))
        self._finish(
            SynAccepted(
                connect_session_id=session,
                target_was_system=checked.system_id is not None,
                leftover=leftover,
            )
        )

    def _check(self, message: Message) -> TunnelSyn | _ErrorAnswer:
        """The request ``message`` carries if we accept it, else the error to answer."""
        if message.method != MediatorMethod.TUNNEL_SYN:
            return _ErrorAnswer(
                400, "Unsupported Method", f"a request of method 0x{message.method:03x}"
            )
        unknown = message.unknown_comprehension_required
        if unknown:
            # RFC 8489 §6.3.1: "the server MUST generate an error response with an error
            # code of 420 (Unknown Attribute)" listing them.
            listed = UnknownAttributes(unknown[:_MAX_UNKNOWN_LISTED])
            return _ErrorAnswer(420, "Unknown Attribute", "unknown attributes", (listed,))
        try:
            request = TunnelSyn.from_stun(message)
        except MediatorMessageError as error:
            return _ErrorAnswer(400, str(error), str(error))
        if request.server_id not in (None, self._server_id) or request.system_id not in (
            None,
            self._system_id,
        ):
            return _ErrorAnswer(404, "Unknown Server", "the request names another server")
        session = request.connect_session_id
        if self._require_session:
            assert self._known_session is not None  # checked in __init__
            if session is None or not self._known_session(session):
                why = "no connect session id" if session is None else "an unknown one"
                return _ErrorAnswer(403, "Unknown Session", f"the request carries {why}")
        return request

    def _refuse_header(self, data: bytes, reason: str) -> None:
        """A message that cannot be read: answer 400 if its header shows a request, else nothing."""
        header = peek_header(data)
        if header is None or header[0] is not MessageClass.REQUEST:
            self._reject(reason)
            return
        _, method, transaction_id = header
        request = Message(
            message_class=MessageClass.REQUEST, method=method, transaction_id=transaction_id
        )
        self._answer_error(request, 400, reason, reason)

    def _answer_error(
        self, request: Message, code: int, phrase: str, reason: str, *attributes: Attribute
    ) -> None:
        error = request.error_response(code, phrase[:_MAX_REASON_CHARS], *attributes)
        self._outbound = encode_message(error)
        self._finish(SynRejected(reason=reason, code=code))

    def _reject(self, reason: str) -> None:
        self._finish(SynRejected(reason=reason, code=None))
