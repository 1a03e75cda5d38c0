"""A STUN client transaction: when to (re)send a request and when to give up (RFC 8489 §6.2).

This module owns the retransmission schedule and response matching of one
request. It does not know how bytes travel or what time it is: the caller
passes ``now`` and sends what ``messages_to_send(now)`` returns.

Over UDP (§6.2.1) the request is sent at 0, RTO, 3·RTO, 7·RTO, ... (the RTO
doubles after each send) for Rc sends in all, and the transaction fails Rm·RTO
after the last one. With RTO = 500 ms, Rc = 7, Rm = 16 that is the RFC's worked
example: sends at 0, 500, 1500, 3500, 7500, 15500, 31500 ms, failure at 39500 ms.
Over TCP (§6.2.2) the request is sent once and fails after Ti = 39.5 s.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..errors import LocalProtocolError
from .message import Message, MessageClass, peek_header

__all__ = [
    "DEFAULT_RC",
    "DEFAULT_RM",
    "DEFAULT_RTO",
    "DEFAULT_TI",
    "ClientTransaction",
    "ResponseReceived",
    "TransactionEvent",
    "TransactionTimedOut",
]

DEFAULT_RTO = 0.5  # seconds; RFC 8489 §6.2.1 "SHOULD be greater than 500 ms"
DEFAULT_RC = 7  # sends in all
DEFAULT_RM = 16  # multiples of the initial RTO to wait after the last send
DEFAULT_TI = 39.5  # seconds; TCP transaction timeout, §6.2.2


@dataclass(frozen=True, kw_only=True)
class TransactionEvent:
    """Base class of what a transaction reports; at most one per transaction."""


@dataclass(frozen=True, kw_only=True)
class ResponseReceived(TransactionEvent):
    """A success or error response with our transaction id arrived."""

    #: The response (check ``message.message_class`` / ``message.error_code``).
    message: Message
    #: How many times the request had been sent when the response arrived.
    attempts: int
    #: Seconds from the first send to the response.
    elapsed: float


@dataclass(frozen=True, kw_only=True)
class TransactionTimedOut(TransactionEvent):
    """No response: every send went unanswered and the final wait ran out."""

    #: How many times the request was sent.
    attempts: int
    #: Seconds from the first send to the failure.
    elapsed: float


class _State(enum.Enum):
    WAITING = "waiting"
    ANSWERED = "answered"
    TIMED_OUT = "timed out"


class ClientTransaction:
    """The retransmission schedule and response matching of one STUN request."""

    def __init__(
        self,
        request: bytes,
        *,
        now: float,
        reliable: bool = False,
        rto: float = DEFAULT_RTO,
        rc: int = DEFAULT_RC,
        rm: int = DEFAULT_RM,
        ti: float = DEFAULT_TI,
    ) -> None:
        header = peek_header(request)
        if header is None or header[0] is not MessageClass.REQUEST:
            raise LocalProtocolError("a client transaction needs an encoded STUN request")
        if rto <= 0 or ti <= 0:
            raise LocalProtocolError("rto and ti must be positive")
        if rc < 1 or rm < 1:
            raise LocalProtocolError("rc and rm must be at least 1")
        self.request = request
        self.transaction_id: bytes = header[2]
        self.reliable = reliable
        self._start = now
        if reliable:
            self._send_times = [now]
            self._deadline = now + ti
        else:
            self._send_times = [now + rto * (2**k - 1) for k in range(rc)]
            self._deadline = self._send_times[-1] + rm * rto
        self._sent = 0
        self._state = _State.WAITING
        self._events: list[TransactionEvent] = []

    @property
    def attempts(self) -> int:
        """How many times the request has been handed out for sending."""
        return self._sent

    @property
    def done(self) -> bool:
        """True once a response arrived or the transaction timed out."""
        return self._state is not _State.WAITING

    def messages_to_send(self, now: float) -> list[bytes]:
        """The request, if a send is due at ``now``; otherwise nothing.

        A caller that wakes late gets one send, not a burst: the missed slots
        are counted as spent, so the schedule keeps its shape (and its end).
        """
        if self._state is not _State.WAITING or self._sent >= len(self._send_times):
            return []
        if now < self._send_times[self._sent]:
            return []
        while self._sent < len(self._send_times) and self._send_times[self._sent] <= now:
            self._sent += 1
        return [self.request]

    def get_timer(self) -> float | None:
        """The next moment something happens: a retransmission or the failure deadline."""
        if self._state is not _State.WAITING:
            return None
        if self._sent < len(self._send_times):
            return self._send_times[self._sent]
        return self._deadline

    def handle_timer(self, now: float) -> None:
        """Move time forward; fails the transaction once its deadline has passed."""
        if self._state is _State.WAITING and now >= self._deadline:
            self._state = _State.TIMED_OUT
            self._events.append(TransactionTimedOut(attempts=self._sent, elapsed=now - self._start))

    def receive_response(self, message: Message, now: float) -> bool:
        """Offer a decoded message; True if it answered this transaction.

        Only the first success or error response with our transaction id counts;
        requests, indications, strangers and late duplicates are not ours.
        """
        if (
            self._state is not _State.WAITING
            or message.transaction_id != self.transaction_id
            or message.message_class not in (MessageClass.SUCCESS, MessageClass.ERROR)
        ):
            return False
        self._state = _State.ANSWERED
        self._events.append(
            ResponseReceived(message=message, attempts=self._sent, elapsed=now - self._start)
        )
        return True

    def next_event(self) -> TransactionEvent | None:
        """The outcome, once: ``ResponseReceived`` or ``TransactionTimedOut``."""
        return self._events.pop(0) if self._events else None
