"""A client's request to be connected to a server, sent over UDP and TCP at once (DESIGN §1 step 2).

This module owns the connect race between the two copies of one request: what each carries,
when the UDP copy is resent, which answer counts and when the whole request has failed.
It does not know how bytes travel, what time it is, or what the client does with the answer.

Both copies go to the same mediator, so the first valid answer on either
transport decides: a ``ConnectResponse`` succeeds, an error response (404
"Server Offline", 400, 508, ...) fails the request with the mediator's code.
A transport that breaks only stops its own copy; the request fails without a
mediator code once both copies have failed or the overall timeout has passed.
"""

from __future__ import annotations

import enum
import os
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from ..errors import LocalProtocolError
from ..stun.attributes import RawAttribute
from ..stun.errors import StunDecodeError
from ..stun.message import (
    Message,
    MessageClass,
    decode_message,
    encode_message,
    new_transaction_id,
    stream_message_length,
)
from ..stun.transaction import DEFAULT_RTO, ClientTransaction, TransactionTimedOut
from .messages import (
    Connect,
    ConnectionResult,
    ConnectResponse,
    MediatorMessageError,
    MediatorMethod,
)

__all__ = [
    "MAX_CONNECT_MESSAGE",
    "PADDING_ATTRIBUTE",
    "RESULT_REPORTS_WAIT",
    "UDP_REQUEST_SIZE",
    "ConnectEvent",
    "ConnectFailed",
    "ConnectRequest",
    "ConnectSucceeded",
    "connection_result_transaction",
]

# The mediator answers an unauthenticated UDP request with at most 3x its size (no
# amplification, DESIGN §6). A connect_response with every endpoint and relay URL
# runs past 1 KB, so the UDP copy is padded to 576 bytes, the datagram size every
# IPv4 host must accept (RFC 791), which lets 1728 bytes of answer through.
UDP_REQUEST_SIZE = 576
# An optional (0xC000-0xFFFF) attribute: a mediator that does not know it ignores it.
PADDING_ATTRIBUTE = 0xC005
# A connect_response with the most endpoints and relay URLs the parser accepts is
# about 5.4 KB; a TCP length field asking for more is not a mediator's answer.
MAX_CONNECT_MESSAGE = 8192


# --- events ------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ConnectEvent:
    """Base class of what a ``ConnectRequest`` reports (exactly one event per request)."""


@dataclass(frozen=True, kw_only=True)
class ConnectSucceeded(ConnectEvent):
    """The mediator found the server and told it to punch: here is every way to reach it."""

    response: ConnectResponse
    """The mediator's connect_response: the server's endpoints and relay URLs."""
    via: Literal["udp", "tcp"]
    """The transport whose copy was answered first."""
    elapsed: float
    """Seconds from the request's start to the answer."""
    connect_session_id: bytes
    """The request's session id: the client's tunnel_syn on a punched stream names it."""


@dataclass(frozen=True, kw_only=True)
class ConnectFailed(ConnectEvent):
    """No connect_response: the mediator refused, or no copy got an answer."""

    code: int | None
    """The mediator's STUN error code (404 server offline, ...), None if it never answered."""
    reason: str
    """The mediator's reason phrase, or what happened to each copy."""
    elapsed: float
    """Seconds from the request's start to the failure."""


class _State(enum.Enum):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


#: connection_result is a metric: sent three times over 1.5 s (RFC 8489's 500 ms RTO
#: doubling), then given up 1 s after the last, so the client holds its punching
#: socket at most 2.5 s for it.
RESULT_SENDS = 3
RESULT_FINAL_WAIT_RTOS = 2
#: How long a client that is leaving normally waits for reports still in flight: each
#: gives up 2.5 s after it began, so this bounds the wait without cutting one short.
RESULT_REPORTS_WAIT = 3.0


def connection_result_transaction(
    connect_session_id: bytes,
    *,
    path: int,
    duration_ms: int,
    now: float,
    random_bytes: Callable[[int], bytes] = os.urandom,
) -> ClientTransaction:
    """The client's report of which ``ConnectionPath`` won, after how long, as a short
    UDP transaction to the mediator (docs/protocol.md §2.1, 0x106)."""
    result = ConnectionResult(
        connect_session_id=connect_session_id, path=path, duration_ms=max(0, duration_ms)
    )
    request = encode_message(result.to_stun(new_transaction_id(random_bytes)))
    return ClientTransaction(request, now=now, rc=RESULT_SENDS, rm=RESULT_FINAL_WAIT_RTOS)


def _padded(message: Message) -> bytes:
    # A connect is 60 bytes, so this is 512 zero bytes after the attribute's 4-byte header.
    filler = UDP_REQUEST_SIZE - len(encode_message(message)) - 4
    padding = RawAttribute(PADDING_ATTRIBUTE, bytes(filler))
    return encode_message(
        Message(
            message_class=message.message_class,
            method=message.method,
            transaction_id=message.transaction_id,
            attributes=(*message.attributes, padding),
        )
    )


def _is_answer(message: Message, transaction_id: bytes) -> bool:
    return (
        message.transaction_id == transaction_id
        and message.method == MediatorMethod.CONNECT
        and message.message_class in (MessageClass.SUCCESS, MessageClass.ERROR)
    )


class ConnectRequest:
    """One connect attempt: the same request over UDP (retransmitted) and TCP (once)."""

    def __init__(
        self,
        *,
        server_id: uuid.UUID | None = None,
        system_id: uuid.UUID | None = None,
        now: float,
        timeout: float = 10.0,
        random_bytes: Callable[[int], bytes] = os.urandom,
        rto: float = DEFAULT_RTO,
    ) -> None:
        if timeout <= 0:
            raise LocalProtocolError("the connect timeout must be positive")
        session_id = random_bytes(16)
        if len(session_id) != 16:
            raise LocalProtocolError("the random source returned the wrong number of bytes")
        #: 128 random bits naming this attempt end to end (the server's ack carries them).
        self.connect_session_id = session_id
        # Connect() checks that exactly one of server_id and system_id is given.
        self._connect = Connect(
            connect_session_id=session_id, server_id=server_id, system_id=system_id
        )
        self._random_bytes = random_bytes
        self._udp = ClientTransaction(
            _padded(self._connect.to_stun(new_transaction_id(random_bytes))), now=now, rto=rto
        )
        self._tcp_tid = new_transaction_id(random_bytes)
        self._tcp_request = encode_message(self._connect.to_stun(self._tcp_tid))
        self._tcp_sent = False
        self._start = now
        self._timeout = timeout
        self._deadline = now + timeout
        self._state = _State.PENDING
        self._udp_failure: str | None = None
        self._tcp_failure: str | None = None
        self._inbound = bytearray()
        self._events: deque[ConnectEvent] = deque()
        #: Datagrams and TCP messages that were garbage, malformed or not an answer to us.
        self.dropped_messages = 0

    # --- queries -----------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """True once the request succeeded or failed; nothing is sent after that."""
        return self._state is not _State.PENDING

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete TCP message held so far."""
        return len(self._inbound)

    def get_timer(self) -> float | None:
        """The next UDP retransmission or timeout, or the overall deadline."""
        if self.done:
            return None
        udp_timer = self._udp.get_timer()
        return self._deadline if udp_timer is None else min(udp_timer, self._deadline)

    def next_event(self) -> ConnectEvent | None:
        """``ConnectSucceeded`` or ``ConnectFailed``, once."""
        return self._events.popleft() if self._events else None

    # --- sending -----------------------------------------------------------------------

    def datagrams_to_send(self, now: float) -> list[bytes]:
        """The padded UDP copy whenever the RFC 8489 schedule says so; nothing once done."""
        if self.done:
            return []
        return self._udp.messages_to_send(now)

    def tcp_data_to_send(self) -> bytes:
        """The TCP copy, once; empty after that or once done."""
        if self.done or self._tcp_sent or self._tcp_failure is not None:
            return b""
        self._tcp_sent = True
        return self._tcp_request

    def connection_result(self, path: int, duration_ms: int) -> bytes:
        """An encoded connection_result: which ``ConnectionPath`` won, after how long."""
        result = ConnectionResult(
            connect_session_id=self.connect_session_id, path=path, duration_ms=duration_ms
        )
        return encode_message(result.to_stun(new_transaction_id(self._random_bytes)))

    # --- receiving ---------------------------------------------------------------------

    def datagram_received(self, data: bytes, now: float) -> None:
        """A datagram from the mediator; garbage and strangers are counted and dropped."""
        if self.done:
            return
        try:
            message = decode_message(data)
        except StunDecodeError:
            self.dropped_messages += 1
            return
        if not _is_answer(message, self._udp.transaction_id):
            self.dropped_messages += 1
        elif self._answer(message, "udp", now):
            # A UDP answer is unsigned and spoofable: a bad one must not end the request
            # when the mediator's real answer may still follow.
            self.dropped_messages += 1

    def tcp_data_received(self, data: bytes, now: float) -> None:
        """Bytes of the TCP connection; bytes that break STUN framing fail the TCP copy only."""
        if self.done or self._tcp_failure is not None:
            return
        self._inbound += data
        while not self.done and self._tcp_failure is None:
            try:
                length = stream_message_length(self._inbound)
            except StunDecodeError as error:
                self._tcp_failed(f"TCP: not STUN ({error})", now)
                return
            if length is not None and length > MAX_CONNECT_MESSAGE:
                self._tcp_failed(f"TCP: a {length}-byte message is too long", now)
                return
            if length is None or len(self._inbound) < length:
                return
            frame = bytes(self._inbound[:length])
            del self._inbound[:length]
            try:
                message = decode_message(frame)
            except StunDecodeError as error:
                self._tcp_failed(f"TCP: bad STUN message ({error})", now)
                return
            if not _is_answer(message, self._tcp_tid):
                self.dropped_messages += 1  # not ours; the stream itself is still sound
                continue
            problem = self._answer(message, "tcp", now)
            if problem:
                self._tcp_failed(f"TCP: {problem}", now)

    def tcp_connection_lost(self, now: float) -> None:
        """The TCP connection closed or never opened: the UDP copy carries on alone."""
        if not self.done and self._tcp_failure is None:
            self._tcp_failed("TCP connection lost", now)

    def handle_timer(self, now: float) -> None:
        """Move time: UDP retransmission timeout, then the overall deadline."""
        if self.done:
            return
        self._udp.handle_timer(now)
        if isinstance(self._udp.next_event(), TransactionTimedOut):
            self._udp_failure = self._udp_status()
            self._fail_if_both_failed(now)
        if not self.done and now >= self._deadline:
            udp = self._udp_failure or self._udp_status()
            tcp = self._tcp_failure or "no answer over TCP"
            self._finish(
                ConnectFailed(
                    code=None,
                    reason=f"timed out after {self._timeout} s ({udp}; {tcp})",
                    elapsed=now - self._start,
                )
            )

    def _udp_status(self) -> str:
        sends = self._udp.attempts
        return f"no answer over UDP after {sends} request{'' if sends == 1 else 's'}"

    # --- transitions: every change of ``_state`` happens below ---------------------------

    def _answer(self, message: Message, via: Literal["udp", "tcp"], now: float) -> str:
        """Decide on an answer to one of our copies; return why it is unusable, or ''."""
        elapsed = now - self._start
        if message.message_class is MessageClass.ERROR:
            error = message.error_code
            if error is None:
                return "connect error response without ERROR-CODE"
            self._finish(ConnectFailed(code=error.code, reason=error.reason, elapsed=elapsed))
            return ""
        try:
            response = ConnectResponse.from_stun(message)
        except MediatorMessageError as error:
            return f"malformed connect response ({error})"
        wanted = self._connect
        if (wanted.server_id is not None and response.server_id != wanted.server_id) or (
            wanted.system_id is not None and response.system_id != wanted.system_id
        ):
            return "connect response for a server we did not ask for"
        self._finish(
            ConnectSucceeded(
                response=response,
                via=via,
                elapsed=elapsed,
                connect_session_id=self.connect_session_id,
            )
        )
        return ""

    def _tcp_failed(self, reason: str, now: float) -> None:
        self._tcp_failure = reason
        self._inbound.clear()
        self._fail_if_both_failed(now)

    def _fail_if_both_failed(self, now: float) -> None:
        if self._udp_failure is not None and self._tcp_failure is not None:
            reason = f"{self._udp_failure}; {self._tcp_failure}"
            self._finish(ConnectFailed(code=None, reason=reason, elapsed=now - self._start))

    def _finish(self, event: ConnectFailed | ConnectSucceeded) -> None:
        self._state = _State.SUCCEEDED if isinstance(event, ConnectSucceeded) else _State.FAILED
        self._inbound.clear()
        self._events.append(event)
