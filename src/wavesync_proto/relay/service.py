"""The relay service (docs/protocol.md §3): standby pools, pairing clients, and when to let go.

This module owns every decision the relay makes about a TCP connection: what
its request is, whether a standby request is authentic, fresh and new, which
standby connection a client gets, when a standby connection is pinged, aged
out or given up on, and when two connections become one spliced session. It
does not touch sockets or the clock: the adapter feeds connections, bytes and
``now`` in, and carries out the actions that come back (``service_types.py``).

Each connection has one role at a time:

    HANDSHAKING --standby request--> STANDBY (idle, pinged) --client paired--> OPENING
    HANDSHAKING --client request---> WAITING --standby found--> PAIRING
    OPENING + PAIRING --READY--> StartSplice (both forgotten)
    OPENING fails (timeout, close, not READY) --> the client goes back to WAITING

Every table is bounded by a limit or a timeout that ``handle_timer`` enforces.
"""

from __future__ import annotations

import enum
import os
import uuid
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

from ..addresses import Endpoint
from ..errors import RemoteProtocolError
from ..mediator.timeouts import TimeoutLane
from .pools import RelayPools
from .requests import (
    ClientRequest,
    RequestError,
    RequestReader,
    StandbyRequest,
    TunnelRequestSeen,
    error_response,
    switching_response,
)
from .service_types import (
    Action,
    CloseConnection,
    ConnectionHandle,
    HandOffTunnel,
    RelayCounters,
    RelayLimits,
    SendBytes,
    StartSplice,
)
from .wire import (
    HEADER_KEEPALIVE,
    HEADER_SERVER,
    HEADER_SESSION,
    HEADER_STANDBY_COUNT,
    Open,
    Ping,
    Ready,
    encode_control,
    parse_control,
    split_control_line,
)

__all__ = ["RelayService"]

_PING = encode_control(Ping())
_RETRY_AFTER = [("Retry-After", "1")]


class _Role(enum.Enum):
    HANDSHAKING = "handshaking"
    STANDBY = "standby"
    OPENING = "opening"
    WAITING = "waiting"
    PAIRING = "pairing"


@dataclass(slots=True, kw_only=True)
class _Connection:
    remote: Endpoint
    role: _Role
    reader: RequestReader | None
    #: A client's bytes that arrived before pairing; an opening standby's answer so far.
    buffer: bytearray = field(default_factory=bytearray)
    #: Standby connections: whose they are.
    server_id: uuid.UUID | None = None
    system_id: uuid.UUID | None = None
    #: Clients: what they asked for (exactly one is set).
    target_server: uuid.UUID | None = None
    target_system: uuid.UUID | None = None
    #: OPENING standby <-> PAIRING client, and their session.
    partner: ConnectionHandle | None = None
    session_id: bytes = b""


class RelayService:
    """Decides everything about the relay's connections; ``RelayLimits`` bounds it all."""

    def __init__(
        self,
        systems: Mapping[uuid.UUID, str],
        *,
        limits: RelayLimits | None = None,
        host_names: Collection[str] | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        """``systems``: system id → key. ``host_names``: when given, a standby request must
        be signed for one of these names (the Host header without port), so requests
        captured on their way to another relay are refused here."""
        self.limits = limits or RelayLimits()
        self.counters = RelayCounters()
        self._systems = dict(systems)
        self._host_names = None if host_names is None else {name.lower() for name in host_names}
        self._random_bytes = random_bytes
        self._connections: dict[ConnectionHandle, _Connection] = {}
        self._pools = RelayPools(known_server_ttl=self.limits.known_server_ttl)
        self._active_sessions: set[bytes] = set()
        self._pairing = 0
        limits_ = self.limits
        self._handshakes: TimeoutLane[ConnectionHandle] = TimeoutLane(limits_.handshake_timeout)
        self._pings: TimeoutLane[ConnectionHandle] = TimeoutLane(limits_.keepalive_interval)
        self._ages: TimeoutLane[ConnectionHandle] = TimeoutLane(limits_.standby_max_age)
        self._opens: TimeoutLane[ConnectionHandle] = TimeoutLane(limits_.open_timeout)
        self._waits: TimeoutLane[ConnectionHandle] = TimeoutLane(limits_.pair_timeout)
        # A nonce could be replayed while its request is still fresh: up to 2 x auth_window
        # after the relay first saw it (the request's time may be auth_window ahead).
        self._nonces: TimeoutLane[str] = TimeoutLane(2 * limits_.auth_window)

    # --- inputs -------------------------------------------------------------------------------

    def connection_made(
        self, connection: ConnectionHandle, remote: Endpoint, now: float
    ) -> list[Action]:
        """A TCP connection was accepted from ``remote``."""
        self.counters.connections += 1
        if len(self._handshakes) >= self.limits.max_handshaking:
            self.counters.connections_refused += 1
            return [CloseConnection(connection=connection, reason="too many handshakes at once")]
        reader = RequestReader(max_request_bytes=self.limits.max_request_bytes)
        self._connections[connection] = _Connection(
            remote=remote, role=_Role.HANDSHAKING, reader=reader
        )
        self._handshakes.touch(connection, now)
        return []

    def data_received(
        self, connection: ConnectionHandle, data: bytes, now: float, *, unix_time: float
    ) -> list[Action]:
        """Bytes from a connection the service still tracks (others are ignored).

        ``unix_time`` is the wall clock, for the freshness of standby signatures only;
        every timeout runs on ``now``.
        """
        state = self._connections.get(connection)
        if state is None or not data:
            return []
        role = state.role
        if role is _Role.HANDSHAKING:
            actions = self._on_handshake_data(connection, state, data, now, unix_time)
        elif role is _Role.OPENING:
            actions = self._on_opening_data(connection, state, data, now)
        elif role is _Role.STANDBY:
            # An idle standby connection speaks only after OPEN: anything else would end
            # up in front of some client's tunnel.
            self._drop_idle_standby(connection, state, now)
            self.counters.standby_lost += 1
            actions = [CloseConnection(connection=connection, reason="standby spoke before OPEN")]
        else:
            actions = self._on_early_client_data(connection, state, data, now)
        self._refresh_gauges()
        return actions

    def connection_lost(self, connection: ConnectionHandle, now: float) -> list[Action]:
        """The peer closed or reset a connection the service still tracks."""
        state = self._connections.pop(connection, None)
        if state is None:
            return []
        actions: list[Action] = []
        role = state.role
        if role is _Role.HANDSHAKING:
            self._handshakes.discard(connection)
        elif role is _Role.STANDBY:
            self._drop_idle_standby(connection, state, now)
            self.counters.standby_lost += 1
        elif role is _Role.OPENING:
            self._opens.discard(connection)
            self.counters.standby_open_failures += 1
            actions = self._rematch(state.partner, now)
        else:
            actions = self._release_client(connection, state, now, "its client went away")
        self._refresh_gauges()
        return actions

    def splice_ended(self, session_id: bytes, now: float) -> None:
        """The adapter closed both connections of a ``StartSplice``."""
        if session_id in self._active_sessions:
            self._active_sessions.discard(session_id)
            self.counters.sessions_ended += 1
            self._refresh_gauges()

    def get_timer(self) -> float | None:
        """When ``handle_timer`` must run next (None: nothing pending)."""
        deadlines = [
            lane.next_deadline()
            for lane in (
                self._handshakes,
                self._pings,
                self._ages,
                self._opens,
                self._waits,
                self._nonces,
            )
        ]
        deadlines.append(self._pools.next_deadline())
        pending = [deadline for deadline in deadlines if deadline is not None]
        return min(pending) if pending else None

    def handle_timer(self, now: float) -> list[Action]:
        """Ping, age out, time out and forget whatever is due at ``now``."""
        actions: list[Action] = []
        while (connection := self._handshakes.pop_expired(now)) is not None:
            self._connections.pop(connection, None)
            self.counters.handshake_timeouts += 1
            actions.append(CloseConnection(connection=connection, reason="handshake timed out"))
        while (connection := self._pings.pop_expired(now)) is not None:
            self._pings.touch(connection, now)
            self.counters.pings_sent += 1
            actions.append(SendBytes(connection=connection, data=_PING))
        while (connection := self._ages.pop_expired(now)) is not None:
            self._drop_idle_standby(connection, self._connections[connection], now)
            self.counters.standby_expired += 1
            actions.append(CloseConnection(connection=connection, reason="standby reached its age"))
        while (connection := self._opens.pop_expired(now)) is not None:
            actions += self._fail_open(connection, "no READY in time", now)
        while (connection := self._waits.pop_expired(now)) is not None:
            actions += self._give_up_pairing(connection, now)
        while self._nonces.pop_expired(now) is not None:
            pass
        self._pools.forget_faded(now)
        self._refresh_gauges()
        return actions

    # --- views --------------------------------------------------------------------------------

    def idle_standby(self, server_id: uuid.UUID) -> int:
        """How many idle standby connections the relay holds for ``server_id``."""
        return self._pools.idle_count(server_id)

    def connection_count(self) -> int:
        """Connections the service tracks (not yet spliced, not yet closed)."""
        return len(self._connections)

    # --- handshakes ---------------------------------------------------------------------------

    def _on_handshake_data(
        self,
        connection: ConnectionHandle,
        state: _Connection,
        data: bytes,
        now: float,
        unix_time: float,
    ) -> list[Action]:
        assert state.reader is not None
        try:
            request = state.reader.feed(data)
        except RequestError as refused:
            self.counters.bad_requests += 1
            return self._refuse(connection, refused.status, str(refused))
        if request is None:
            return []
        if isinstance(request, TunnelRequestSeen):
            del self._connections[connection]
            self._handshakes.discard(connection)
            self.counters.tunnels_handed_off += 1
            return [HandOffTunnel(connection=connection, received=request.received)]
        trailing = state.reader.trailing_data
        state.reader = None
        self._handshakes.discard(connection)
        if isinstance(request, StandbyRequest):
            return self._on_standby_request(
                connection, state, request, trailing=trailing, now=now, unix_time=unix_time
            )
        return self._on_client_request(connection, state, request, trailing, now)

    def _on_standby_request(
        self,
        connection: ConnectionHandle,
        state: _Connection,
        request: StandbyRequest,
        *,
        trailing: bytes,
        now: float,
        unix_time: float,
    ) -> list[Action]:
        credentials = request.credentials
        failure = self._authenticate(request, unix_time)
        if failure is not None:
            self.counters.standby_auth_failures += 1
            return self._refuse(connection, 401, failure)
        server_id, system_id = credentials.server_id, credentials.system_id
        owner = self._pools.system_of(server_id)
        if owner is not None and owner != system_id:
            self.counters.standby_auth_failures += 1
            return self._refuse(connection, 409, f"server {server_id} belongs to another system")
        limits = self.limits
        if len(self._nonces) >= limits.max_remembered_nonces:
            refusal = "too many standby requests; try again"
        elif self._pools.idle_count(server_id) >= limits.max_standby_per_server:
            refusal = f"server {server_id} already has {limits.max_standby_per_server} standby"
        elif self._pools.idle_total >= limits.max_standby_total:
            refusal = "the relay holds as many standby connections as it may"
        else:
            refusal = None
        if refusal is not None:
            self.counters.standby_refused_limits += 1
            return self._refuse(connection, 503, refusal, _RETRY_AFTER)
        if trailing:
            self.counters.bad_requests += 1
            return self._refuse(connection, 400, "a standby connection speaks only after OPEN")
        self._nonces.touch(credentials.nonce, now)
        self.counters.standby_accepted += 1
        state.role, state.server_id, state.system_id = _Role.STANDBY, server_id, system_id
        accepted = switching_response(
            [
                (HEADER_STANDBY_COUNT, str(limits.standby_count)),
                (HEADER_KEEPALIVE, str(limits.keepalive_interval)),
            ]
        )
        actions: list[Action] = [SendBytes(connection=connection, data=accepted)]
        client = self._pools.pop_waiting(server_id, system_id, now)
        if client is not None:
            actions += self._open(connection, state, client, now)
        else:
            self._pools.add_idle(server_id, system_id, connection)
            self._pings.touch(connection, now)
            self._ages.touch(connection, now)
        return actions

    def _authenticate(self, request: StandbyRequest, unix_time: float) -> str | None:
        """Why the standby request is not to be trusted, or None when it is."""
        credentials = request.credentials
        key = self._systems.get(credentials.system_id)
        if key is None:
            return f"unknown system {credentials.system_id}"
        host = request.host.lower()
        # "[v6]" and "[v6]:port" are bracketed: a plain rsplit on ":" would cut into "[v6]".
        bracketed = host.startswith("[")
        host_name = host[1:].partition("]")[0] if bracketed else host.rsplit(":", 1)[0]
        if self._host_names is not None and host_name not in self._host_names:
            return f"signed for {host_name!r}, which is not this relay"
        if not credentials.verify(key, request.host):
            return "bad signature (wrong key, or signed for another Host)"
        if abs(unix_time - credentials.unix_time) > self.limits.auth_window:
            return f"stale request: its time is {credentials.unix_time}, ours {int(unix_time)}"
        if credentials.nonce in self._nonces:
            return "replayed request"
        return None

    def _on_client_request(
        self,
        connection: ConnectionHandle,
        state: _Connection,
        request: ClientRequest,
        trailing: bytes,
        now: float,
    ) -> list[Action]:
        limits = self.limits
        # A waiting client becomes a session as soon as a standby connection comes, and
        # nothing stops it then: so it holds its place under the session limit from now on.
        claimed = len(self._active_sessions) + self._pairing + self._pools.waiting_total
        if claimed >= limits.max_active_sessions:
            self.counters.clients_refused_limits += 1
            return self._refuse(connection, 503, "the relay carries all it may", _RETRY_AFTER)
        if len(trailing) > limits.max_early_bytes:
            self.counters.clients_refused_limits += 1
            return self._refuse(connection, 413, "too many bytes before pairing")
        state.buffer += trailing
        state.role = _Role.WAITING
        state.target_server, state.target_system = request.server_id, request.system_id
        self._waits.touch(connection, now)
        return self._match(connection, state, now)

    # --- pairing ------------------------------------------------------------------------------

    def _match(self, client: ConnectionHandle, state: _Connection, now: float) -> list[Action]:
        """Give a WAITING client a standby connection, make it wait, or refuse it."""
        pools = self._pools
        if state.target_server is not None:
            standby = pools.take_for_server(state.target_server, now)
            known = pools.is_known_server(state.target_server)
            what = f"server {state.target_server}"
        else:
            assert state.target_system is not None
            taken = pools.take_for_system(state.target_system, now)
            standby = None if taken is None else taken[1]
            known = pools.is_known_system(state.target_system)
            what = f"system {state.target_system}"
        if standby is not None:
            self._pings.discard(standby)
            self._ages.discard(standby)
            standby_state = self._connections[standby]
            return self._open(standby, standby_state, client, now)
        if not known:
            self.counters.clients_not_found += 1
            return self._refuse(client, 404, f"{what} has no standby connection at this relay")
        if pools.waiting_total >= self.limits.max_waiting_clients:
            self.counters.clients_refused_limits += 1
            return self._refuse(client, 503, "too many clients waiting", _RETRY_AFTER)
        pools.add_waiting(client, state.target_server, state.target_system)
        return []

    def _open(
        self,
        standby: ConnectionHandle,
        standby_state: _Connection,
        client: ConnectionHandle,
        now: float,
    ) -> list[Action]:
        client_state = self._connections[client]
        session_id = self._random_bytes(16)
        standby_state.role, standby_state.partner = _Role.OPENING, client
        standby_state.session_id = session_id
        standby_state.buffer.clear()
        client_state.role, client_state.partner = _Role.PAIRING, standby
        client_state.session_id = session_id
        self._pairing += 1
        self._opens.touch(standby, now)
        line = encode_control(Open(session_id=session_id, client_address=client_state.remote))
        return [SendBytes(connection=standby, data=line)]

    def _on_opening_data(
        self, standby: ConnectionHandle, state: _Connection, data: bytes, now: float
    ) -> list[Action]:
        state.buffer += data
        try:
            line, rest = split_control_line(bytes(state.buffer))
            if line is None:
                return []
            answer = parse_control(line)
        except RemoteProtocolError as exc:
            return self._fail_open(standby, f"bad answer to OPEN: {exc}", now)
        if not isinstance(answer, Ready) or answer.session_id != state.session_id:
            return self._fail_open(standby, f"answered OPEN with {line[:40]!r}", now)
        client = state.partner
        assert client is not None
        client_state = self._connections.pop(client)
        del self._connections[standby]
        self._opens.discard(standby)
        self._waits.discard(client)
        self._pairing -= 1
        self._active_sessions.add(state.session_id)
        self.counters.clients_paired += 1
        paired = switching_response(
            [(HEADER_SESSION, state.session_id.hex()), (HEADER_SERVER, str(state.server_id))]
        )
        return [
            StartSplice(
                session_id=state.session_id,
                client=client,
                server=standby,
                to_client=paired + rest,
                to_server=bytes(client_state.buffer),
            )
        ]

    def _on_early_client_data(
        self, client: ConnectionHandle, state: _Connection, data: bytes, now: float
    ) -> list[Action]:
        state.buffer += data
        if len(state.buffer) <= self.limits.max_early_bytes:
            return []
        self.counters.clients_refused_limits += 1
        actions = self._release_client(client, state, now, "its client sent too much too early")
        return actions + self._refuse(client, 413, "too many bytes before pairing")

    def _fail_open(self, standby: ConnectionHandle, reason: str, now: float) -> list[Action]:
        """The standby connection did not become a tunnel: close it, find the client another."""
        state = self._connections.pop(standby)
        self._opens.discard(standby)
        self.counters.standby_open_failures += 1
        actions: list[Action] = [CloseConnection(connection=standby, reason=reason)]
        return actions + self._rematch(state.partner, now)

    def _rematch(self, client: ConnectionHandle | None, now: float) -> list[Action]:
        state = self._connections.get(client) if client is not None else None
        if state is None or state.role is not _Role.PAIRING:
            return []
        self._pairing -= 1
        state.role, state.partner, state.session_id = _Role.WAITING, None, b""
        return self._match(client, state, now)

    def _close_opening(self, standby: ConnectionHandle | None, reason: str) -> list[Action]:
        state = self._connections.pop(standby, None) if standby is not None else None
        if state is None:
            return []
        self._opens.discard(standby)
        return [CloseConnection(connection=standby, reason=reason)]

    def _give_up_pairing(self, client: ConnectionHandle, now: float) -> list[Action]:
        state = self._connections[client]
        self.counters.clients_timed_out += 1
        what = state.target_server if state.target_server is not None else state.target_system
        actions = self._release_client(client, state, now, "its client gave up waiting")
        return actions + self._refuse(
            client, 503, f"no standby connection of {what} within the wait", _RETRY_AFTER
        )

    def _release_client(
        self, client: ConnectionHandle, state: _Connection, now: float, reason: str
    ) -> list[Action]:
        """Undo a WAITING or PAIRING client's claims: its place in line, or its standby
        connection (which was told OPEN and is of no use to anybody else now)."""
        self._connections.pop(client, None)
        self._waits.discard(client)
        if state.role is _Role.WAITING:
            self._pools.remove_waiting(client, state.target_server, state.target_system, now)
            return []
        self._pairing -= 1
        return self._close_opening(state.partner, reason)

    # --- helpers ------------------------------------------------------------------------------

    def _drop_idle_standby(self, standby: ConnectionHandle, state: _Connection, now: float) -> None:
        self._connections.pop(standby, None)
        self._pings.discard(standby)
        self._ages.discard(standby)
        assert state.server_id is not None
        self._pools.remove_idle(state.server_id, standby, now)

    def _refuse(
        self,
        connection: ConnectionHandle,
        status: int,
        reason: str,
        headers: list[tuple[str, str]] | None = None,
    ) -> list[Action]:
        """Answer ``status`` and close; the connection is forgotten (whatever its role was
        has been undone by the caller, or is undone here for a fresh handshake)."""
        self._connections.pop(connection, None)
        self._handshakes.discard(connection)
        self._waits.discard(connection)
        return [
            SendBytes(connection=connection, data=error_response(status, reason, headers or ())),
            CloseConnection(connection=connection, reason=f"{status} {reason}"),
        ]

    def _refresh_gauges(self) -> None:
        counters = self.counters
        counters.standby_idle = self._pools.idle_total
        counters.clients_waiting = self._pools.waiting_total
        counters.sessions_active = len(self._active_sessions)
