"""The mediator service (docs/protocol.md §2): listen sessions, connect brokering, Binding.

This module owns the mediator's inputs: TCP framing, the dispatch of every
request, listen sessions and keep-alives, the rate limit, and when peers end.
It does not know sockets, event loops or the clock: the adapter feeds TCP
bytes, datagrams and ``now`` in, and carries out the actions that come back.

One instance serves UDP and TCP on the same port; TCP peers are keyed by a
``PeerHandle`` the adapter picks. Connect sessions live in ``brokering.py``.
Every table is bounded by a limit or by a timeout that ``handle_timer``
enforces; ``get_timer`` says when to call it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from ..addresses import Endpoint
from ..errors import LocalProtocolError
from ..stun.attributes import Attribute, Fingerprint, MessageIntegritySha256, UnknownAttributes
from ..stun.errors import StunDecodeError
from ..stun.message import (
    BINDING,
    HEADER_LENGTH,
    Message,
    MessageClass,
    decode_message,
    encode_message,
    peek_header,
    stream_message_length,
)
from ..stun.responder import DEFAULT_SOFTWARE, BindingResponder
from .answers import Origin, Replier
from .auth import (
    DEFAULT_REALM,
    AuthFailure,
    NonceIssuer,
    challenge_attributes,
    credential_key,
    verify_listen,
)
from .brokering import ConnectBroker
from .messages import (
    ConnectResponse,
    Listen,
    ListenResponse,
    MediatorMessageError,
    MediatorMethod,
)
from .ratelimit import SourceRateLimiter
from .registry import OnlineServer, PeerHandle, ServerRegistry
from .service_types import (
    Action,
    CloseTcp,
    MediatorCounters,
    MediatorLimits,
    SendDatagram,
    SendTcp,
)
from .timeouts import TimeoutLane

__all__ = [
    "Action",
    "CloseTcp",
    "MediatorCounters",
    "MediatorLimits",
    "MediatorService",
    "OnlineServer",
    "PeerHandle",
    "SendDatagram",
    "SendTcp",
]

# Requests that cost no rate-limit token: listen needs a completed TCP handshake
# and proves a key, and connection_ack carries an HMAC only a registered server
# can make (a busy server acks thousands a second from one address). Registered
# servers' own TCP sessions (Binding keep-alives) are not limited either.
_NOT_RATE_LIMITED = frozenset((MediatorMethod.LISTEN, MediatorMethod.CONNECTION_ACK))
# UNKNOWN-ATTRIBUTES lists at most this many types, as the Binding responder does.
_MAX_UNKNOWN_LISTED = 16


@dataclass(eq=False, slots=True, kw_only=True)
class _TcpPeer:
    handle: PeerHandle
    remote: Endpoint
    buffer: bytearray = field(default_factory=bytearray)
    #: The server this peer's listen session registered, if any.
    server_id: uuid.UUID | None = None


class MediatorService:
    """The mediator as a sans-I/O machine: inputs keyed by peer or address, actions out."""

    def __init__(
        self,
        *,
        systems: Mapping[uuid.UUID, str],
        relay_urls: Sequence[str] = (),
        realm: str = DEFAULT_REALM,
        nonce_secret: bytes,
        limits: MediatorLimits = MediatorLimits(),  # noqa: B008 - frozen, so sharing is safe
        software: str | None = DEFAULT_SOFTWARE,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self._systems = dict(systems)
        self._realm = realm
        for system_key in self._systems.values():
            # SASLprep refuses some keys (and realms); find out now, not at a listen.
            credential_key("probe", realm, system_key)
        self.limits = limits
        self.counters = MediatorCounters()
        self._nonces = NonceIssuer(secret=nonce_secret, lifetime=limits.nonce_lifetime)
        # BindingResponder refuses a SOFTWARE that would break its 128-byte bound.
        self._binding = BindingResponder(software=software)
        # The same answers without SOFTWARE, for a Binding request too small to earn
        # the full answer under the amplification bound.
        self._binding_bare = BindingResponder(software=None) if software else None
        relay_urls = tuple(relay_urls)
        # Refuse relay URLs that could not be sent, now rather than at the first connect.
        probe = ConnectResponse(
            system_id=uuid.UUID(int=0), server_id=uuid.UUID(int=0), relay_urls=relay_urls
        )
        encode_message(probe.to_stun(bytes(12)))
        self._replier = Replier(
            software=software,
            amplification_factor=limits.udp_amplification_factor,
            counters=self.counters,
        )
        self._registry = ServerRegistry()
        self._broker = ConnectBroker(
            registry=self._registry,
            limits=limits,
            counters=self.counters,
            replier=self._replier,
            relay_urls=relay_urls,
            random_bytes=random_bytes,
        )
        self._peers: dict[PeerHandle, _TcpPeer] = {}
        self._limiter = SourceRateLimiter(
            rate=limits.rate_limit_per_second,
            burst=limits.rate_limit_burst,
            max_sources=limits.max_rate_limited_sources,
        )
        self._client_peers: TimeoutLane[PeerHandle] = TimeoutLane(limits.client_idle_timeout)
        self._server_peers: TimeoutLane[PeerHandle] = TimeoutLane(
            limits.keepalive_interval * limits.dead_after_intervals
        )
        self._handlers: dict[int, Callable[[Message, Origin, float], list[Action]]] = {
            MediatorMethod.LISTEN: self._on_listen,
            MediatorMethod.CONNECT: self._broker.on_connect,
            MediatorMethod.CONNECTION_ACK: self._broker.on_ack,
            MediatorMethod.CONNECTION_RESULT: self._broker.on_result,
        }

    # --- the adapter's interface -----------------------------------------------------------

    def tcp_connected(self, peer: PeerHandle, remote: Endpoint, now: float) -> list[Action]:
        """A TCP peer connected from ``remote``. Nothing is sent until it speaks."""
        if peer in self._peers:
            raise LocalProtocolError(f"TCP peer {peer!r} is already connected")
        self._peers[peer] = _TcpPeer(handle=peer, remote=remote)
        self._client_peers.touch(peer, now)
        return []

    def tcp_data_received(self, peer: PeerHandle, data: bytes, now: float) -> list[Action]:
        """Bytes arrived from a TCP peer: split them into STUN messages and handle each."""
        record = self._peers.get(peer)
        if record is None:
            # Closed by us already; the adapter may still hold bytes that were in flight.
            return []
        buffer = record.buffer
        buffer += data
        limit = self.limits.max_tcp_buffer
        actions: list[Action] = []
        offset = 0
        while True:
            try:
                length = stream_message_length(buffer[offset : offset + HEADER_LENGTH])
            except StunDecodeError as error:
                self.counters.malformed += 1
                return actions + self._close_peer(peer, f"not a STUN stream: {error}", now)
            if length is None:
                break
            if length > limit:
                # Refused on the header: waiting for the body would buffer what we refuse.
                reason = f"a {length}-byte message exceeds the {limit}-byte buffer"
                return actions + self._close_peer(peer, reason, now)
            if len(buffer) - offset < length:
                break
            message = bytes(buffer[offset : offset + length])
            offset += length
            # Only complete messages count as activity: trickled bytes keep nobody alive.
            lane = self._server_peers if record.server_id is not None else self._client_peers
            lane.touch(peer, now)
            actions += self._on_tcp_message(message, record, now)
        # One compaction per read, not per message: many small messages in one chunk
        # would otherwise move the rest of the buffer once each.
        del buffer[:offset]
        return actions

    def tcp_closed(self, peer: PeerHandle, now: float) -> list[Action]:
        """The TCP peer is gone (closed by the other side, or after our ``CloseTcp``)."""
        if peer not in self._peers:
            return []
        return self._forget_peer(peer, now)

    def datagram_received(self, data: bytes, source: Endpoint, now: float) -> list[Action]:
        """A UDP datagram arrived from ``source``."""
        origin = Origin(observed=source, peer=None, length=len(data))
        header = peek_header(data)
        if header is None:
            # Not RFC 8489 STUN; it may still be an RFC 3489 Binding request.
            return self._binding_request(data, origin, now)
        message_class, method, transaction_id = header
        if message_class is not MessageClass.REQUEST:
            # Answering a response or an indication could loop between two agents.
            self.counters.malformed += 1
            return []
        if method == BINDING:
            return self._binding_request(data, origin, now)
        return self._request(data, method, transaction_id, origin, now)

    def get_timer(self) -> float | None:
        """The earliest deadline at which ``handle_timer`` has work, or None."""
        deadlines = (
            self._client_peers.next_deadline(),
            self._server_peers.next_deadline(),
            self._broker.next_deadline(),
        )
        return min((d for d in deadlines if d is not None), default=None)

    def handle_timer(self, now: float) -> list[Action]:
        """Expire everything due at ``now``: idle peers, dead servers, unacked connects."""
        actions: list[Action] = []
        while (peer := self._client_peers.pop_expired(now)) is not None:
            reason = f"idle: no complete message for {self._client_peers.timeout:g} s"
            actions += self._close_peer(peer, reason, now)
        while (peer := self._server_peers.pop_expired(now)) is not None:
            self.counters.servers_timed_out += 1
            reason = f"keep-alive timeout: silent for {self._server_peers.timeout:g} s"
            actions += self._close_peer(peer, reason, now)
        actions += self._broker.handle_timer(now)
        return actions

    def online_servers(self) -> Mapping[uuid.UUID, OnlineServer]:
        """A read-only live view of the registered servers, by server id."""
        return self._registry.view

    def pending_connects(self) -> dict[bytes, uuid.UUID]:
        """Connect session ids waiting for an ack, with the server each waits for (a copy)."""
        return {
            session.session_id: session.server_id
            for session in self._broker.sessions()
            if session.answer is None
        }

    def table_sizes(self) -> dict[str, int]:
        """How full every internal table is, for metrics and the boundedness tests."""
        return {
            "servers": len(self._registry),
            "systems": self._registry.system_count(),
            "tcp_peers": len(self._peers),
            "tcp_buffer_max": max((len(p.buffer) for p in self._peers.values()), default=0),
            "connects_pending": self._broker.pending_count,
            "connects_answered": self._broker.answered_count,
            "tcp_reply_peers": self._broker.tcp_reply_peers,
            "rate_limited_sources": len(self._limiter),
        }

    # --- framing and dispatch --------------------------------------------------------------

    def _on_tcp_message(self, data: bytes, peer: _TcpPeer, now: float) -> list[Action]:
        header = peek_header(data)
        assert header is not None  # stream_message_length checked the same header
        message_class, method, transaction_id = header
        if message_class is not MessageClass.REQUEST:
            if method == BINDING and message_class is MessageClass.INDICATION:
                # RFC 8489 §6.3.2: a Binding indication is a keep-alive; the touch did it.
                self.counters.keepalives += 1
            else:
                self.counters.malformed += 1
            return []
        origin = Origin(observed=peer.remote, peer=peer.handle)
        if method == BINDING:
            return self._binding_request(data, origin, now)
        return self._request(data, method, transaction_id, origin, now)

    def _limited(self, origin: Origin, now: float) -> bool:
        """Charge one token to the request's source; True if there was none left."""
        if origin.peer is not None and self._peers[origin.peer].server_id is not None:
            return False
        if self._limiter.allow(origin.observed[0], now):
            return False
        self.counters.rate_limited += 1
        return True

    def _binding_request(self, data: bytes, origin: Origin, now: float) -> list[Action]:
        if self._limited(origin, now):
            return []
        answer = self._binding.handle_request(data, origin.observed)
        if answer is None:
            self.counters.malformed += 1
            return []
        if origin.peer is not None:
            self.counters.bindings_answered += 1
            return [SendTcp(peer=origin.peer, data=answer)]
        # The responder stays under 128 bytes; a request under 43 bytes needs less.
        budget = self._replier.budget(origin)
        if len(answer) > budget and self._binding_bare is not None:
            answer = self._binding_bare.handle_request(data, origin.observed)
        if answer is None or len(answer) > budget:
            self.counters.udp_answers_suppressed += 1
            return []
        self.counters.bindings_answered += 1
        return [SendDatagram(address=origin.observed, data=answer)]

    def _request(
        self, data: bytes, method: int, transaction_id: bytes, origin: Origin, now: float
    ) -> list[Action]:
        # The token is charged before decoding, so a flood costs as little as possible.
        if method not in _NOT_RATE_LIMITED and self._limited(origin, now):
            return []
        try:
            message = decode_message(data)
        except StunDecodeError:
            self.counters.malformed += 1
            return self._replier.error(origin, method, transaction_id, 400, "Bad Request")
        fingerprint = message.get(Fingerprint) is not None
        unknown = message.unknown_comprehension_required
        handler = self._handlers.get(method)
        if unknown or handler is None:
            self.counters.bad_requests += 1
            if unknown:
                # RFC 8489 §6.3.1: "the server MUST generate an error response with an
                # error code of 420 (Unknown Attribute)" listing them.
                listed = UnknownAttributes(unknown[:_MAX_UNKNOWN_LISTED])
                return self._replier.error(
                    origin,
                    method,
                    transaction_id,
                    420,
                    "Unknown Attribute",
                    listed,
                    fingerprint=fingerprint,
                )
            return self._replier.error(
                origin, method, transaction_id, 400, "Unsupported Method", fingerprint=fingerprint
            )
        try:
            return handler(message, origin, now)
        except MediatorMessageError as error:
            # A well-formed STUN request missing what its method needs: say what.
            self.counters.bad_requests += 1
            return self._replier.error(
                origin, method, transaction_id, 400, str(error), fingerprint=fingerprint
            )

    # --- listen ----------------------------------------------------------------------------

    def _on_listen(self, message: Message, origin: Origin, now: float) -> list[Action]:
        method, transaction_id = message.method, message.transaction_id
        fingerprint = message.get(Fingerprint) is not None
        if origin.peer is None:
            # The listen session *is* the TCP connection: connection_requested rides on it.
            self.counters.bad_requests += 1
            return self._replier.error(
                origin, method, transaction_id, 400, "Listen Requires TCP", fingerprint=fingerprint
            )
        listen = Listen.from_stun(message)
        system_key = self._systems.get(listen.system_id)
        username = str(listen.server_id)

        def key_for(claimed: str) -> bytes | None:
            # An unknown system fails exactly like a wrong key: which systems exist is
            # nobody's business before they prove one of them.
            if system_key is None or claimed != username:
                return None
            return credential_key(claimed, self._realm, system_key)

        verdict = verify_listen(
            message, realm=self._realm, nonces=self._nonces, now=now, key_for=key_for
        )
        if isinstance(verdict, AuthFailure):
            return self._refuse_listen(message, origin, verdict, now)
        peer = self._peers[origin.peer]
        if peer.server_id is not None and peer.server_id != listen.server_id:
            # One TCP session speaks for one server: connection_requested names none.
            self.counters.bad_requests += 1
            return self._replier.error(
                origin,
                method,
                transaction_id,
                400,
                "Session Already Listening",
                fingerprint=fingerprint,
            )
        if (
            listen.server_id not in self._registry
            and len(self._registry) >= self.limits.max_servers
        ):
            return self._replier.error(
                origin,
                method,
                transaction_id,
                508,
                "Insufficient Capacity",
                fingerprint=fingerprint,
            )
        info = OnlineServer(
            system_id=listen.system_id,
            server_id=listen.server_id,
            peer=peer.handle,
            public_endpoint=peer.remote,
            local_endpoints=listen.local_endpoints,
            forwarded_endpoints=listen.forwarded_endpoints,
        )
        _, previous = self._registry.put(info, verdict)
        actions: list[Action] = []
        if previous is not None and previous.peer != peer.handle:
            # The server reconnected (or moved); the old connection is stale. Its
            # pending connects stay: they name the server, not the connection, and
            # its ack is checked against the new session's key.
            self.counters.servers_replaced += 1
            self._peers[previous.peer].server_id = None
            actions += self._close_peer(previous.peer, "replaced by a new listen session", now)
        if peer.server_id is None:
            peer.server_id = listen.server_id
            self._client_peers.discard(peer.handle)
            self._server_peers.touch(peer.handle, now)
        self.counters.listens_accepted += 1
        self.counters.servers_online = len(self._registry)
        response = ListenResponse(
            public_endpoint=peer.remote, keepalive_interval=self.limits.keepalive_interval
        )
        # Signed, so the server can tell it is talking to a mediator that knows its key.
        actions += self._replier.success(
            origin,
            response.to_stun(transaction_id),
            fingerprint=fingerprint,
            integrity_sha256_key=verdict,
        )
        return actions

    def _refuse_listen(
        self, message: Message, origin: Origin, failure: AuthFailure, now: float
    ) -> list[Action]:
        if message.get(MessageIntegritySha256) is None:
            self.counters.listen_challenges += 1
        else:
            self.counters.auth_failures += 1
        extra: tuple[Attribute, ...] = ()
        if failure.challenge:
            extra = challenge_attributes(self._realm, self._nonces.issue(now))
        return self._replier.error(
            origin,
            message.method,
            message.transaction_id,
            failure.code,
            failure.reason,
            *extra,
            fingerprint=message.get(Fingerprint) is not None,
        )

    # --- peers and servers going away ------------------------------------------------------

    def _close_peer(self, peer: PeerHandle, reason: str, now: float) -> list[Action]:
        self.counters.peers_closed += 1
        return [CloseTcp(peer=peer, reason=reason), *self._forget_peer(peer, now)]

    def _forget_peer(self, handle: PeerHandle, now: float) -> list[Action]:
        peer = self._peers.pop(handle)
        self._client_peers.discard(handle)
        self._server_peers.discard(handle)
        self._broker.peer_gone(handle)
        if peer.server_id is None:
            return []
        server = self._registry.remove(peer.server_id)
        self.counters.servers_online = len(self._registry)
        return self._broker.server_lost(server, now)
