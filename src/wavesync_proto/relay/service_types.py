"""The relay service's boundary types: the actions it emits, its limits, its counters.

This module owns the shapes an adapter sees around ``RelayService``: what to
do with a connection (``SendBytes``, ``CloseConnection``, ``StartSplice``),
which bounds the service enforces, and what it counted. How any of them is
decided is ``service.py``'s.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

from ..errors import LocalProtocolError

__all__ = [
    "Action",
    "CloseConnection",
    "ConnectionHandle",
    "HandOffTunnel",
    "RelayCounters",
    "RelayLimits",
    "SendBytes",
    "StartSplice",
]

ConnectionHandle = Hashable
"""The adapter's id for one accepted TCP connection (an int, the stream object, ...)."""


@dataclass(frozen=True, kw_only=True)
class SendBytes:
    """Write ``data`` to ``connection``."""

    connection: ConnectionHandle
    data: bytes


@dataclass(frozen=True, kw_only=True)
class CloseConnection:
    """Write what is queued for ``connection``, then close it; the service has forgotten it.

    ``reason`` is for the log. Later input for this connection is ignored.
    """

    connection: ConnectionHandle
    reason: str


@dataclass(frozen=True, kw_only=True)
class StartSplice:
    """Pair two connections: from now on every byte from one goes to the other.

    First write ``to_client`` to ``client`` and ``to_server`` to ``server``
    (the end of the handshake and any bytes that arrived with it: nothing is
    lost), then copy both ways until both directions end, then close both and
    call ``RelayService.splice_ended(session_id, now)``. The service no longer
    tracks either connection; a half-close on one side is passed on as a
    half-close (shutdown of writing) on the other.
    """

    session_id: bytes
    client: ConnectionHandle
    server: ConnectionHandle
    to_client: bytes
    to_server: bytes


@dataclass(frozen=True, kw_only=True)
class HandOffTunnel:
    """``connection`` opens an HTTP tunnel (docs/tunnel.md): give it to the tunnel server,
    which reads its request again from ``received``, then stop reading it. The service
    has forgotten it. Each stream the tunnel carries comes back to the service as a
    new connection (``connection_made``), which speaks the relay protocol inside it."""

    connection: ConnectionHandle
    received: bytes


Action = SendBytes | CloseConnection | StartSplice | HandOffTunnel


@dataclass(frozen=True, kw_only=True)
class RelayLimits:
    """Every bound the relay enforces (DESIGN.md §6: bounded everything)."""

    #: Connections that have not finished their handshake; more are closed at once.
    max_handshaking: int = 20_000
    #: A request (head and any body) must be complete within this many seconds.
    handshake_timeout: float = 10.0
    #: The largest request head accepted; a longer one gets 431.
    max_request_bytes: int = 8192
    #: Idle standby connections one server may hold; one more gets 503.
    max_standby_per_server: int = 64
    #: Idle standby connections over all servers.
    max_standby_total: int = 100_000
    #: Spliced sessions at once, counting clients waiting or being paired (each may
    #: become one); a client beyond this gets 503.
    max_active_sessions: int = 10_000
    #: Clients waiting for a standby connection at once.
    max_waiting_clients: int = 10_000
    #: How many standby connections the relay asks each server to keep (told in the 101).
    standby_count: int = 7
    #: Seconds between PINGs on an idle standby connection (told in the 101).
    keepalive_interval: int = 20
    #: An idle standby connection is closed after this long, so the server replaces it
    #: with a fresh one (a NAT may have forgotten an old one without telling anybody).
    standby_max_age: float = 600.0
    #: How long a standby connection may take to answer OPEN with READY.
    open_timeout: float = 2.0
    #: How long a client waits for a standby connection of a known server.
    pair_timeout: float = 5.0
    #: A server with no standby connection left is still "known" (clients wait for it
    #: rather than getting 404) for this long after its last one went.
    known_server_ttl: float = 60.0
    #: A standby request's unix time may differ from the relay's by this many seconds.
    auth_window: float = 120.0
    #: Standby nonces remembered to refuse replays (2 x auth_window worth of them).
    max_remembered_nonces: int = 200_000
    #: Bytes a client may send before it is paired; more gets 413.
    max_early_bytes: int = 65_536

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not value > 0:
                raise LocalProtocolError(f"RelayLimits.{name} must be positive")


@dataclass
class RelayCounters:
    """What the relay did, for logs, metrics and tests."""

    connections: int = 0
    #: Connections closed at once because ``max_handshaking`` were already handshaking.
    connections_refused: int = 0
    handshake_timeouts: int = 0
    #: Requests that were not valid HTTP/1.1 or not one of ours (400, 404, 405, 426, 431).
    bad_requests: int = 0
    standby_accepted: int = 0
    #: Standby requests refused: bad or stale signature, unknown system, replay.
    standby_auth_failures: int = 0
    #: Standby requests refused by a limit (per server, total, remembered nonces).
    standby_refused_limits: int = 0
    #: Idle standby connections (a gauge).
    standby_idle: int = 0
    #: Standby connections closed because they reached ``standby_max_age``.
    standby_expired: int = 0
    #: Standby connections that went away while idle.
    standby_lost: int = 0
    #: Standby connections that did not answer OPEN with READY in time, or closed instead.
    standby_open_failures: int = 0
    pings_sent: int = 0
    clients_paired: int = 0
    #: Clients answered 404: the relay does not hold the server or system.
    clients_not_found: int = 0
    #: Clients answered 503 after waiting ``pair_timeout`` for a standby connection.
    clients_timed_out: int = 0
    #: Clients refused by a limit (active sessions, waiting clients, early bytes).
    clients_refused_limits: int = 0
    #: Clients waiting for a standby connection (a gauge).
    clients_waiting: int = 0
    #: Connections handed to the tunnel server (HTTP tunnel requests on the relay's port).
    tunnels_handed_off: int = 0
    #: Spliced sessions running (a gauge) and ended.
    sessions_active: int = 0
    sessions_ended: int = 0
