"""The mediator service's boundary types: the actions it emits, its limits, its counters.

This module owns the shapes an adapter sees around ``MediatorService``: what
to do (``SendTcp``, ``CloseTcp``, ``SendDatagram``), which bounds the service
enforces, and what it counted. It does not know how any of them is decided:
that is ``service.py``'s and ``brokering.py``'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..addresses import Endpoint
from ..errors import LocalProtocolError
from ..stun.message import HEADER_LENGTH
from .attributes import ConnectionPath
from .registry import PeerHandle

__all__ = [
    "Action",
    "CloseTcp",
    "MediatorCounters",
    "MediatorLimits",
    "PeerHandle",
    "SendDatagram",
    "SendTcp",
]


@dataclass(frozen=True, kw_only=True)
class SendTcp:
    """Write ``data`` to the TCP peer ``peer``."""

    peer: PeerHandle
    data: bytes


@dataclass(frozen=True, kw_only=True)
class CloseTcp:
    """Close the TCP peer ``peer``; the service has already forgotten it.

    ``reason`` is for the log. A later ``tcp_closed`` or ``tcp_data_received``
    for this peer is ignored.
    """

    peer: PeerHandle
    reason: str


@dataclass(frozen=True, kw_only=True)
class SendDatagram:
    """Send ``data`` from the mediator's UDP socket to ``address``."""

    address: Endpoint
    data: bytes


Action = SendTcp | CloseTcp | SendDatagram


@dataclass(frozen=True, kw_only=True)
class MediatorLimits:
    """Every bound the service enforces (DESIGN.md §6: bounded everything)."""

    #: Registered servers; a listen beyond this gets 508.
    max_servers: int = 100_000
    #: Connect sessions waiting for an ack; a connect beyond this gets 508.
    max_pending_connects: int = 10_000
    #: Bytes one TCP peer may have buffered, which is also the largest message accepted
    #: over TCP (STUN over TCP is framed by its length field: a longer one is refused
    #: as soon as its header is in).
    max_tcp_buffer: int = 65_536
    #: A TCP peer that is not a registered server is closed this long after its last
    #: complete message, so a slow-loris connection cannot pin memory.
    client_idle_timeout: float = 10.0
    #: Seconds between a server's keep-alives, told to it in ListenResponse.
    keepalive_interval: int = 25
    #: A server session with no complete message for this many intervals is dead.
    dead_after_intervals: float = 3.0
    #: How long to wait for connection_ack before answering without UDP endpoints.
    ack_timeout: float = 2.0
    #: How long an answered connect session is kept for late and duplicate copies.
    answered_ttl: float = 30.0
    #: Token-bucket refill, in unauthenticated requests per second per source.
    rate_limit_per_second: float = 20.0
    rate_limit_burst: int = 40
    #: Sources the rate limiter remembers; the least recently seen is evicted.
    max_rate_limited_sources: int = 65_536
    #: A UDP answer to an unauthenticated request is at most this many times its size.
    udp_amplification_factor: int = 3
    #: How long a listen NONCE stays fresh (an older one gets 438 and a new one).
    nonce_lifetime: float = 600.0

    def __post_init__(self) -> None:
        positive = (
            "max_servers",
            "max_pending_connects",
            "client_idle_timeout",
            "keepalive_interval",
            "dead_after_intervals",
            "ack_timeout",
            "answered_ttl",
            "rate_limit_per_second",
            "rate_limit_burst",
            "max_rate_limited_sources",
            "udp_amplification_factor",
            "nonce_lifetime",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise LocalProtocolError(f"MediatorLimits.{name} must be positive")
        if self.max_tcp_buffer < HEADER_LENGTH:
            raise LocalProtocolError("MediatorLimits.max_tcp_buffer must hold a STUN header")


def _path_counts() -> dict[str, int]:
    return dict.fromkeys(ConnectionPath.NAMES.values(), 0)


@dataclass
class MediatorCounters:
    """What the service did, for logs, metrics and tests."""

    servers_online: int = 0
    listens_accepted: int = 0
    #: Listens without credentials, answered with the 401 challenge (the normal first step).
    listen_challenges: int = 0
    #: Listens whose credentials failed (bad key, unknown system, stale nonce, ...).
    auth_failures: int = 0
    servers_replaced: int = 0
    servers_timed_out: int = 0
    #: Connect sessions (distinct session ids): each is answered, failed or still pending.
    connects_received: int = 0
    #: Sessions answered with connect_response (with or without a UDP endpoint).
    connects_answered: int = 0
    connects_answered_with_udp: int = 0
    #: Sessions answered with an error: target not online, no capacity, server went offline.
    connects_failed: int = 0
    acks_accepted: int = 0
    acks_rejected: int = 0
    #: connection_result reports, at most one per session, by ConnectionPath name.
    results_by_path: dict[str, int] = field(default_factory=_path_counts)
    bindings_answered: int = 0
    #: Binding indications on TCP sessions (RFC 8489 §6.3.2 keep-alives).
    keepalives: int = 0
    #: Requests dropped silently by the per-source rate limit.
    rate_limited: int = 0
    #: Input that is not a STUN request, or does not decode.
    malformed: int = 0
    #: Well-formed requests answered 400 or 420.
    bad_requests: int = 0
    #: UDP answers not sent because even their smallest form broke the amplification bound.
    udp_answers_suppressed: int = 0
    #: TCP peers the service closed (idle, dead, replaced, garbage, oversized).
    peers_closed: int = 0
