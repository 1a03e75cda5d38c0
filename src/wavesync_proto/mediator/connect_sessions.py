"""The mediator's record of one brokered connect (docs/protocol.md §2.3, §2.6).

This module owns a connect session's states and transitions (one table), its
reply channels (one per transport the client's copies arrived on) and the
ever smaller forms its answer may take over UDP. It does not know the server
registry, the TCP peers or the clock: ``brokering.py`` drives it.

A client sends the same connect over UDP and TCP at once, so one session can
have two reply channels, each answered with its own transaction id and its
own observed address (``client_mapped``).
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace

from ..addresses import Endpoint
from ..errors import LocalProtocolError
from ..stun.attributes import Attribute
from ..stun.message import Message
from .answers import Origin, with_attributes
from .messages import ConnectResponse

__all__ = [
    "ConnectEvent",
    "ConnectSession",
    "ConnectState",
    "ErrorAnswer",
    "ReplyChannel",
    "connect_answer_variants",
]


class ConnectState(enum.Enum):
    """Where a connect session is."""

    #: connection_requested went to the server; waiting for its connection_ack.
    PENDING = "pending"
    #: The clients were answered; kept ``answered_ttl`` so late copies get the same answer.
    ANSWERED = "answered"


class ConnectEvent(enum.Enum):
    """What moves a connect session."""

    #: A connection_ack from the target server, verified.
    ACK = "ack"
    #: ``ack_timeout`` passed without one.
    ACK_TIMEOUT = "ack timeout"
    #: The target server's listen session ended.
    SERVER_LOST = "server lost"


# Every transition, in one place. Copies of the connect request do not move the
# session (they add or refresh a reply channel); expiry deletes it.
_TRANSITIONS: dict[tuple[ConnectState, ConnectEvent], ConnectState] = {
    (ConnectState.PENDING, ConnectEvent.ACK): ConnectState.ANSWERED,
    (ConnectState.PENDING, ConnectEvent.ACK_TIMEOUT): ConnectState.ANSWERED,
    (ConnectState.PENDING, ConnectEvent.SERVER_LOST): ConnectState.ANSWERED,
    # A retransmitted ack, or one that arrives after the timeout answer: only the
    # ack itself is answered (its first send may have been lost).
    (ConnectState.ANSWERED, ConnectEvent.ACK): ConnectState.ANSWERED,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplyChannel:
    """One transport a copy of the connect came on, and the newest copy's transaction id."""

    origin: Origin
    transaction_id: bytes
    #: Whether the request carried FINGERPRINT (the answer then carries one too).
    fingerprint: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorAnswer:
    """A connect session that ended in an error response."""

    code: int
    reason: str


@dataclass(eq=False, slots=True, kw_only=True)
class ConnectSession:
    """One connect session id: its target, its reply channels and, once decided, its answer."""

    session_id: bytes
    #: The target as the client named it (exactly one is set): later copies must match.
    named_server: uuid.UUID | None
    named_system: uuid.UUID | None
    #: The server chosen for it.
    server_id: uuid.UUID
    system_id: uuid.UUID
    state: ConnectState = ConnectState.PENDING
    udp: ReplyChannel | None = None
    tcp: ReplyChannel | None = None
    #: Whether the server has been told the client's UDP address.
    server_told_udp: bool = False
    #: The answer every channel gets (client_mapped is filled in per channel).
    answer: ConnectResponse | ErrorAnswer | None = None
    #: Where the server's verified ack came from.
    server_udp_endpoint: Endpoint | None = None
    #: The ConnectionPath the client reported, once it has.
    result_path: int | None = None

    def move(self, event: ConnectEvent) -> None:
        """Apply ``event``; one not in the table is a bug in the service."""
        next_state = _TRANSITIONS.get((self.state, event))
        if next_state is None:
            raise LocalProtocolError(
                f"connect session: no transition for {event.value} when {self.state.value}"
            )
        self.state = next_state

    def names(self, server_id: uuid.UUID | None, system_id: uuid.UUID | None) -> bool:
        """Whether a copy naming this target belongs to this session."""
        return self.named_server == server_id and self.named_system == system_id

    def channels(self) -> Iterator[ReplyChannel]:
        """The reply channels that exist, UDP first."""
        if self.udp is not None:
            yield self.udp
        if self.tcp is not None:
            yield self.tcp


# --- answers -------------------------------------------------------------------------------


def connect_answer_variants(
    answer: ConnectResponse, channel: ReplyChannel, *, software: tuple[Attribute, ...]
) -> Iterator[Message]:
    """The answer for one channel, then ever smaller versions of it for a tight UDP budget.

    SOFTWARE goes first, then local endpoints (only useful on the server's own
    LAN, which LAN discovery covers), then relay URLs (the client can be
    configured with them), then forwarded endpoints; the server and system ids,
    the punched UDP endpoint and the client's mapped address always stay.
    """
    transaction_id = channel.transaction_id
    response = replace(answer, client_mapped=channel.origin.observed)
    full = response.to_stun(transaction_id)
    if software:
        yield with_attributes(full, software)
    yield full
    if response.local_endpoints:
        response = replace(response, local_endpoints=())
        yield response.to_stun(transaction_id)
    if response.relay_urls:
        response = replace(response, relay_urls=())
        yield response.to_stun(transaction_id)
    if response.forwarded_endpoints:
        response = replace(response, forwarded_endpoints=())
        yield response.to_stun(transaction_id)
