"""Connect brokering (docs/protocol.md §2.3): connect, connection_ack, connection_result.

This module owns the connect sessions: resolving a target, telling the server
(connection_requested / connection_update), matching its signed ack, answering
every client reply channel, the ack timeout and the answered-session memory.
It does not know TCP framing, listen or the clock: ``service.py`` passes
decoded requests, their origin and ``now``, and tells it when peers and
servers go away.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Sequence

from ..stun.attributes import Fingerprint
from ..stun.message import Message, encode_message, new_transaction_id
from .answers import Origin, Replier
from .attributes import ConnectionPath
from .auth import verify_ack
from .connect_sessions import (
    ConnectEvent,
    ConnectSession,
    ConnectState,
    ErrorAnswer,
    ReplyChannel,
    connect_answer_variants,
)
from .messages import (
    Connect,
    ConnectionAck,
    ConnectionAckResponse,
    ConnectionRequested,
    ConnectionResult,
    ConnectionUpdate,
    ConnectResponse,
    MediatorMessageError,
    MediatorMethod,
)
from .registry import PeerHandle, ServerRegistry, ServerSession
from .service_types import Action, MediatorCounters, MediatorLimits, SendTcp
from .timeouts import TimeoutLane

__all__ = ["ConnectBroker"]

_SERVER_OFFLINE = ErrorAnswer(code=404, reason="Server Offline")
_NO_SERVER_ONLINE = ErrorAnswer(code=404, reason="No Server Online")
_SERVER_WENT_OFFLINE = ErrorAnswer(code=404, reason="Server Went Offline")
_NO_CAPACITY = ErrorAnswer(code=508, reason="Insufficient Capacity")
_NO_SERVER = uuid.UUID(int=0)


class ConnectBroker:
    """Every connect session the mediator is brokering or has just answered."""

    def __init__(
        self,
        *,
        registry: ServerRegistry,
        limits: MediatorLimits,
        counters: MediatorCounters,
        replier: Replier,
        relay_urls: Sequence[str],
        random_bytes: Callable[[int], bytes],
    ) -> None:
        self._registry = registry
        self._max_pending = limits.max_pending_connects
        self._counters = counters
        self._replier = replier
        self._relay_urls = tuple(relay_urls)
        self._random_bytes = random_bytes
        self._sessions: dict[bytes, ConnectSession] = {}
        # Pending sessions all wait ack_timeout and answered ones all live answered_ttl,
        # so each lane is ordered by deadline already (see timeouts.py). Answered
        # sessions stay bounded: they enter at most as fast as pending ones leave.
        self._pending: TimeoutLane[bytes] = TimeoutLane(limits.ack_timeout)
        self._answered: TimeoutLane[bytes] = TimeoutLane(limits.answered_ttl)
        # TCP peer -> ids of the sessions with a reply channel on it, so a closed
        # peer is detached without a scan and a reused handle gets nobody's answer.
        self._tcp_channels: dict[PeerHandle, set[bytes]] = {}

    # --- introspection ---------------------------------------------------------------------

    @property
    def pending_count(self) -> int:
        """Sessions waiting for the server's ack."""
        return len(self._pending)

    @property
    def answered_count(self) -> int:
        """Answered sessions still remembered for late copies."""
        return len(self._answered)

    @property
    def tcp_reply_peers(self) -> int:
        """TCP peers that some remembered session would answer on."""
        return len(self._tcp_channels)

    def sessions(self) -> Iterable[ConnectSession]:
        """Every remembered session (for consistency checks)."""
        return self._sessions.values()

    # --- connect ---------------------------------------------------------------------------

    def on_connect(self, message: Message, origin: Origin, now: float) -> list[Action]:
        """A copy of a connect request, over UDP or TCP."""
        connect = Connect.from_stun(message)
        channel = ReplyChannel(
            origin=origin,
            transaction_id=message.transaction_id,
            fingerprint=message.get(Fingerprint) is not None,
        )
        session = self._sessions.get(connect.connect_session_id)
        if session is None:
            return self._open(connect, channel, now)
        if not session.names(connect.server_id, connect.system_id):
            raise MediatorMessageError("connect session id already names another target")
        return self._attach(session, channel)

    def _open(self, connect: Connect, channel: ReplyChannel, now: float) -> list[Action]:
        self._counters.connects_received += 1
        server: ServerSession | None
        if connect.server_id is not None:
            # Unknown and offline look the same: the answer must not reveal which ids exist.
            server, refusal = self._registry.get(connect.server_id), _SERVER_OFFLINE
        else:
            assert connect.system_id is not None  # Connect names exactly one
            server, refusal = self._registry.pick(connect.system_id), _NO_SERVER_ONLINE
        if server is not None and len(self._pending) >= self._max_pending:
            refusal = _NO_CAPACITY
        elif server is not None:
            return self._request_server(connect, channel, server, now)
        self._counters.connects_failed += 1
        # A refusal is not remembered: it holds no state, so each copy is refused afresh.
        refused = ConnectSession(
            session_id=connect.connect_session_id,
            named_server=connect.server_id,
            named_system=connect.system_id,
            server_id=_NO_SERVER,
            system_id=_NO_SERVER,
            answer=refusal,
        )
        return self._answer_channel(refused, channel)

    def _request_server(
        self, connect: Connect, channel: ReplyChannel, server: ServerSession, now: float
    ) -> list[Action]:
        info = server.info
        session_id = connect.connect_session_id
        over_udp = channel.origin.peer is None
        session = ConnectSession(
            session_id=session_id,
            named_server=connect.server_id,
            named_system=connect.system_id,
            server_id=info.server_id,
            system_id=info.system_id,
            server_told_udp=over_udp,
        )
        self._sessions[session_id] = session
        self._pending.touch(session_id, now)
        server.pending.add(session_id)
        self._set_channel(session, channel)
        observed = channel.origin.observed
        requested = ConnectionRequested(
            connect_session_id=session_id,
            client_udp_endpoint=observed if over_udp else None,
            client_tcp_endpoint=None if over_udp else observed,
        )
        return [self._indication(info.peer, requested.to_stun(self._transaction_id()))]

    def _attach(self, session: ConnectSession, channel: ReplyChannel) -> list[Action]:
        """A later copy: a new reply channel, or a retransmission on an existing one."""
        self._set_channel(session, channel)
        actions: list[Action] = []
        server = self._registry.get(session.server_id)
        if (
            channel.origin.peer is None
            and not session.server_told_udp
            and not isinstance(session.answer, ErrorAnswer)
            and server is not None
        ):
            # The server punches towards the client's UDP address and has only heard of
            # the TCP copy. Worth telling even after the answer: the client rendezvouses
            # from the very socket this copy came from.
            session.server_told_udp = True
            update = ConnectionUpdate(
                connect_session_id=session.session_id, client_udp_endpoint=channel.origin.observed
            )
            actions.append(
                self._indication(server.info.peer, update.to_stun(self._transaction_id()))
            )
        if session.answer is not None:
            # A late or retransmitted copy gets the same answer, with its own transaction id.
            actions += self._answer_channel(session, channel)
        return actions

    def _set_channel(self, session: ConnectSession, channel: ReplyChannel) -> None:
        peer = channel.origin.peer
        if peer is None:
            session.udp = channel
            return
        if session.tcp is not None and session.tcp.origin.peer != peer:
            self._detach_tcp(session)
        session.tcp = channel
        self._tcp_channels.setdefault(peer, set()).add(session.session_id)

    def _detach_tcp(self, session: ConnectSession) -> None:
        assert session.tcp is not None
        peer = session.tcp.origin.peer
        session.tcp = None
        sessions = self._tcp_channels.get(peer)
        if sessions is not None:
            sessions.discard(session.session_id)
            if not sessions:
                del self._tcp_channels[peer]

    def _indication(self, peer: PeerHandle, message: Message) -> SendTcp:
        return SendTcp(peer=peer, data=encode_message(message))

    def _transaction_id(self) -> bytes:
        return new_transaction_id(self._random_bytes)

    # --- connection_ack --------------------------------------------------------------------

    def on_ack(self, message: Message, origin: Origin, now: float) -> list[Action]:
        """A connection_ack: must come over UDP, signed by the target server."""
        fingerprint = message.get(Fingerprint) is not None
        method, transaction_id = message.method, message.transaction_id
        if origin.peer is not None:
            # The ack's source address *is* the punched endpoint; over TCP there is none.
            self._counters.bad_requests += 1
            return self._replier.error(
                origin,
                method,
                transaction_id,
                400,
                "Connection Ack Requires UDP",
                fingerprint=fingerprint,
            )
        ack = ConnectionAck.from_stun(message)
        server = self._registry.get(ack.server_id)
        username = str(ack.server_id)

        def key_for(claimed: str) -> bytes | None:
            if server is None or claimed != username:
                return None
            return server.key

        key = verify_ack(message, key_for=key_for)
        if key is None or server is None:
            self._counters.acks_rejected += 1
            return self._replier.error(
                origin, method, transaction_id, 401, "Unauthorized", fingerprint=fingerprint
            )
        session = self._sessions.get(ack.connect_session_id)
        if (
            session is None
            or session.server_id != ack.server_id
            or isinstance(session.answer, ErrorAnswer)
        ):
            # Looked up only after the signature holds: strangers learn nothing of sessions.
            self._counters.acks_rejected += 1
            return self._replier.error(
                origin, method, transaction_id, 404, "Unknown Session", fingerprint=fingerprint
            )
        first_ack = session.server_udp_endpoint is None
        if first_ack:
            self._counters.acks_accepted += 1
            session.server_udp_endpoint = origin.observed
        assert session.server_udp_endpoint is not None
        response = ConnectionAckResponse(server_udp_endpoint=session.server_udp_endpoint)
        actions = self._replier.success(
            origin,
            response.to_stun(transaction_id),
            fingerprint=fingerprint,
            integrity_sha256_key=key,
        )
        was_pending = session.state is ConnectState.PENDING
        session.move(ConnectEvent.ACK)
        if was_pending:
            actions += self._settle(session, self._connect_response(server, session), now)
        elif first_ack:
            # The timeout answered already; copies arriving from now on learn the
            # punched endpoint too.
            session.answer = self._connect_response(server, session)
        return actions

    def _connect_response(self, server: ServerSession, session: ConnectSession) -> ConnectResponse:
        punched = session.server_udp_endpoint
        return ConnectResponse(
            server_id=session.server_id,
            system_id=session.system_id,
            forwarded_endpoints=server.info.forwarded_endpoints,
            local_endpoints=server.info.local_endpoints,
            udp_endpoints=(punched,) if punched is not None else (),
            relay_urls=self._relay_urls,
        )

    # --- connection_result -----------------------------------------------------------------

    def on_result(self, message: Message, origin: Origin, now: float) -> list[Action]:
        """A client's report of which path won."""
        result = ConnectionResult.from_stun(message)
        fingerprint = message.get(Fingerprint) is not None
        session = self._sessions.get(result.connect_session_id)
        if session is None:
            return self._replier.error(
                origin,
                message.method,
                message.transaction_id,
                404,
                "Unknown Session",
                fingerprint=fingerprint,
            )
        if session.result_path is None:
            # Counted once per session: the client retransmits over UDP until answered.
            session.result_path = result.path
            self._counters.results_by_path[ConnectionPath.NAMES[result.path]] += 1
        return self._replier.success(origin, message.success_response(), fingerprint=fingerprint)

    # --- answers and endings ---------------------------------------------------------------

    def _settle(
        self, session: ConnectSession, answer: ConnectResponse | ErrorAnswer, now: float
    ) -> list[Action]:
        """Answer every reply channel of a pending session; keep it for late copies."""
        session.answer = answer
        session_id = session.session_id
        self._pending.discard(session_id)
        self._answered.touch(session_id, now)
        server = self._registry.get(session.server_id)
        if server is not None:
            server.pending.discard(session_id)
        if isinstance(answer, ErrorAnswer):
            self._counters.connects_failed += 1
        else:
            self._counters.connects_answered += 1
            if answer.udp_endpoints:
                self._counters.connects_answered_with_udp += 1
        actions: list[Action] = []
        for channel in session.channels():
            actions += self._answer_channel(session, channel)
        return actions

    def _answer_channel(self, session: ConnectSession, channel: ReplyChannel) -> list[Action]:
        answer = session.answer
        assert answer is not None
        variants: Iterable[Message]
        if isinstance(answer, ErrorAnswer):
            variants = self._replier.error_variants(
                MediatorMethod.CONNECT, channel.transaction_id, answer.code, answer.reason
            )
        else:
            variants = connect_answer_variants(answer, channel, software=self._replier.software)
        return self._replier.send(channel.origin, variants, fingerprint=channel.fingerprint)

    def peer_gone(self, peer: PeerHandle) -> None:
        """A TCP peer closed: its reply channels go with it."""
        for session_id in self._tcp_channels.pop(peer, ()):
            session = self._sessions[session_id]
            session.tcp = None

    def server_lost(self, server: ServerSession, now: float) -> list[Action]:
        """A server's listen session ended: its pending connects get 404 at once."""
        pending, server.pending = server.pending, set()
        actions: list[Action] = []
        for session_id in pending:
            session = self._sessions[session_id]
            session.move(ConnectEvent.SERVER_LOST)
            actions += self._settle(session, _SERVER_WENT_OFFLINE, now)
        return actions

    def next_deadline(self) -> float | None:
        """The earliest ack timeout or answered-session expiry."""
        deadlines = [
            d
            for d in (self._pending.next_deadline(), self._answered.next_deadline())
            if d is not None
        ]
        return min(deadlines, default=None)

    def handle_timer(self, now: float) -> list[Action]:
        """Answer sessions whose ack is overdue; forget answered ones past their time."""
        actions: list[Action] = []
        while (session_id := self._pending.pop_expired(now)) is not None:
            session = self._sessions[session_id]
            server = self._registry.get(session.server_id)
            # A lost server settles its sessions at once, so a pending one has its server.
            assert server is not None
            session.move(ConnectEvent.ACK_TIMEOUT)
            # "Rather than not at all": the TCP endpoints and relays may still work.
            actions += self._settle(session, self._connect_response(server, session), now)
        while (session_id := self._answered.pop_expired(now)) is not None:
            session = self._sessions.pop(session_id)
            if session.tcp is not None:
                self._detach_tcp(session)
        return actions
