"""Many UDT connections over one UDP socket (UDT 4.11 queue.cpp ``CRcvQueue``, ``CHash``).

This module owns the routing of one socket's datagrams: by destination socket id to
the connection that owns it; id 0 to the rendezvous connection waiting for that
address or, when listening, to the SYN-cookie ``UdtListener``. It allocates socket ids
and initial sequence numbers from the randomness it is given, and forgets closed
connections. It does not know what a connection does with a datagram, or sockets and
clocks: an adapter runs one multiplexer per UDP socket. docs/protocol.md §4.9.

Reaching a peer again needs nothing from the mediator: the socket whose hole is
punched is this multiplexer's socket, so a second ``rendezvous`` (or ``connect`` to a
listening peer) toward an address already reached goes through the same mapping.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from ..addresses import Endpoint
from ..errors import LocalProtocolError
from .connection import UdtConnection
from .connection_types import ConnectionState, UdtConfig
from .listener import AcceptedHandshake, ConnectionKey, ConnectionRequest, UdtListener
from .packet_types import HANDSHAKE_LENGTH, HEADER_LENGTH, ControlType, RequestType
from .seqnum import SEQ_MAX

__all__ = [
    "ConnectionAccepted",
    "MultiplexerCounters",
    "MultiplexerEvent",
    "UdtMultiplexer",
]

# A STUN message (RFC 8489 §5) starts with two zero bits and has the magic cookie in
# bytes 4-8; the mediator's punching socket carries both STUN and UDT.
_STUN_MAGIC = b"\x21\x12\xa4\x42"
_STUN_HEADER = 20
_DESTINATION = struct.Struct("!I")
_CONTROL_WORD = struct.Struct("!H")
_HANDSHAKE_TYPE = 0x8000 | ControlType.HANDSHAKE
# The handshake body's request type is its 6th 32-bit word (protocol.md §4.3).
_REQUEST_TYPE = struct.Struct("!i")
_REQUEST_TYPE_OFFSET = HEADER_LENGTH + 20
_MAX_SOCKET_ID = 0x7FFFFFFF


@dataclass(frozen=True, slots=True, kw_only=True)
class MultiplexerEvent:
    """Base class of what a multiplexer reports (each connection reports its own events)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionAccepted(MultiplexerEvent):
    """A regular connect to our listener completed its handshake."""

    connection: UdtConnection
    """The new connection, already ``CONNECTED``; read its events from it."""


@dataclass(slots=True)
class MultiplexerCounters:
    """Datagrams the multiplexer itself dealt with, by outcome."""

    not_udt: int = 0
    """Returned to the caller as not ours (STUN, or shorter than a UDT header)."""
    unknown_destination: int = 0
    """Addressed to a socket id no live connection has (late packets of a closed one)."""
    unrouted_handshakes: int = 0
    """Addressed to id 0 while not listening and no rendezvous expects the sender."""
    accepted: int = 0
    """Connections created by the listener."""
    rejected: int = 0
    """Listener requests refused (type 1002) because ``max_connections`` was reached."""
    repeated_requests: int = 0
    """Requests for a connection already accepted, answered with its response again."""


class UdtMultiplexer:
    """All UDT connections of one UDP socket, demultiplexed by destination socket id.

    Drive it as one machine: ``receive_datagram`` for every datagram the socket reads
    (a ``False`` answer means the datagram is not UDT and is the caller's to handle),
    ``handle_timer(now)`` at ``get_timer()``, and ``datagrams_to_send(now)`` after every
    call. ``next_event()`` reports connections the listener accepted; every connection
    reports its own events through ``connection.next_event()``.
    """

    __slots__ = (
        "_accepted_by_key",
        "_config",
        "_connections",
        "_events",
        "_key_of",
        "_listener",
        "_listener_outbox",
        "_max_connections",
        "_random_bits",
        "_rendezvous_by_candidate",
        "_rendezvous_by_peer",
        "_secret",
        "counters",
    )

    def __init__(
        self,
        *,
        now: float,
        random_bits: Callable[[int], int],
        cookie_secret: bytes,
        config: UdtConfig | None = None,
        max_connections: int = 1024,
    ) -> None:
        if max_connections < 1:
            raise LocalProtocolError(f"max_connections {max_connections} is not positive")
        if len(cookie_secret) < 16:
            raise LocalProtocolError("the cookie secret must be at least 16 bytes")
        del now  # nothing is timed before the first connection; kept for the house signature
        self._config = config if config is not None else UdtConfig()
        self._random_bits = random_bits
        self._secret = cookie_secret
        self._max_connections = max_connections
        self._connections: dict[int, UdtConnection] = {}
        self._listener: UdtListener | None = None
        self._listener_outbox: list[tuple[bytes, Endpoint]] = []
        # Listener side: a caller's repeated request (our response was lost) must get
        # the same response, not a second connection (4.11 CUDTUnited::locate).
        self._accepted_by_key: dict[ConnectionKey, AcceptedHandshake] = {}
        self._key_of: dict[int, ConnectionKey] = {}
        # Rendezvous: requests to id 0 are routed by the sender's address; once a peer
        # socket id has been routed to a connection it stays with that connection, so
        # two rendezvous toward the same peer (hole reuse) do not steal each other's.
        self._rendezvous_by_candidate: dict[Endpoint, list[int]] = {}
        self._rendezvous_by_peer: dict[tuple[Endpoint, int], int] = {}
        self._events: deque[MultiplexerEvent] = deque()
        self.counters = MultiplexerCounters()

    # --- queries -------------------------------------------------------------------------

    @property
    def connections(self) -> Mapping[int, UdtConnection]:
        """Live connections by local socket id."""
        return MappingProxyType(self._connections)

    @property
    def listening(self) -> bool:
        return self._listener is not None

    def next_event(self) -> MultiplexerEvent | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        deadline: float | None = None
        for connection in self._connections.values():
            timer = connection.get_timer()
            if timer is not None and (deadline is None or timer < deadline):
                deadline = timer
        return deadline

    # --- commands ------------------------------------------------------------------------

    def listen(self) -> None:
        """Accept regular connects from now on (as a listening UDT socket)."""
        if self._listener is None:
            self._listener = UdtListener(
                secret=self._secret,
                mss=self._config.mss,
                flow_window=self._config.flow_window,
                socket_type=self._config.socket_type,
            )

    def connect(self, peer: Endpoint, now: float) -> UdtConnection:
        """Start a regular connect to the listener at ``peer``."""
        self._check_room()
        return self._add(
            UdtConnection.connect(
                peer,
                socket_id=self._new_socket_id(),
                isn=self._random_bits(31),
                now=now,
                random=self._random_float,
                config=self._config,
            )
        )

    def rendezvous(self, candidates: Sequence[Endpoint], now: float) -> UdtConnection:
        """Start a rendezvous connect toward every address in ``candidates``."""
        self._check_room()
        connection = self._add(
            UdtConnection.rendezvous(
                candidates,
                socket_id=self._new_socket_id(),
                isn=self._random_bits(31),
                now=now,
                random=self._random_float,
                config=self._config,
            )
        )
        for candidate in dict.fromkeys(candidates):
            self._rendezvous_by_candidate.setdefault(candidate, []).append(connection.socket_id)
        return connection

    def receive_datagram(self, data: bytes, addr: Endpoint, now: float) -> bool:
        """Route one datagram; ``False`` if it is not UDT and the caller may use it."""
        if len(data) < HEADER_LENGTH or (
            data[0] & 0xC0 == 0
            and data[4:8] == _STUN_MAGIC
            and len(data) >= _STUN_HEADER
            and _CONTROL_WORD.unpack_from(data, 2)[0] == len(data) - _STUN_HEADER
        ):
            self.counters.not_udt += 1
            return False
        (destination,) = _DESTINATION.unpack_from(data, 12)
        if destination:
            connection = self._connections.get(destination)
            if connection is None:
                self.counters.unknown_destination += 1
            else:
                connection.receive_datagram(data, addr, now)
            return True
        self._receive_for_id_zero(data, addr, now)
        return True

    def handle_timer(self, now: float) -> None:
        for connection in list(self._connections.values()):
            timer = connection.get_timer()
            if timer is not None and timer <= now:
                connection.handle_timer(now)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Endpoint]]:
        datagrams = self._listener_outbox
        self._listener_outbox = []
        finished: list[int] = []
        for socket_id, connection in self._connections.items():
            datagrams.extend(connection.datagrams_to_send(now))
            if connection.state is ConnectionState.CLOSED:
                finished.append(socket_id)
        for socket_id in finished:
            self._forget(socket_id)
        return datagrams

    # --- internals -----------------------------------------------------------------------

    def _receive_for_id_zero(self, data: bytes, addr: Endpoint, now: float) -> None:
        # Only handshakes are ever sent to id 0: a caller's requests, and a rendezvous
        # peer's before it knows our id.
        # A rendezvous peer addresses id 0 only with type-0 requests: once it has our
        # handshake it knows our id (4.11 core.cpp: request.m_iID = m_ConnRes.m_iID). A
        # caller's cookie response (type -1) also goes to id 0 and is the listener's.
        if (
            len(data) >= HEADER_LENGTH + HANDSHAKE_LENGTH
            and _CONTROL_WORD.unpack_from(data)[0] == _HANDSHAKE_TYPE
            and _REQUEST_TYPE.unpack_from(data, _REQUEST_TYPE_OFFSET)[0] == RequestType.RENDEZVOUS
        ):
            waiting = self._rendezvous_for(data, addr)
            if waiting is not None:
                waiting.receive_datagram(data, addr, now)
                return
        if self._listener is None:
            self.counters.unrouted_handshakes += 1
            return
        verdict = self._listener.receive_datagram(data, addr, now)
        if isinstance(verdict, ConnectionRequest):
            self._accept(verdict, now)
        elif verdict is not None:
            self._listener_outbox.append((verdict.datagram, verdict.destination))

    def _rendezvous_for(self, data: bytes, addr: Endpoint) -> UdtConnection | None:
        ids = self._rendezvous_by_candidate.get(addr)
        if not ids:
            return None
        # The sender's socket id is the handshake body's 7th word.
        (peer_id,) = _DESTINATION.unpack_from(data, HEADER_LENGTH + 24)
        bound = self._rendezvous_by_peer.get((addr, peer_id))
        if bound is not None:
            return self._connections.get(bound)
        taken = set(self._rendezvous_by_peer.values())
        fallback: UdtConnection | None = None
        for socket_id in ids:
            connection = self._connections[socket_id]
            if connection.peer_socket_id == peer_id:
                # Established through a packet sent to our id; a late type-0 request of
                # the same peer still needs this connection's -2 answer.
                fallback = connection
                break
            if (
                fallback is None
                and socket_id not in taken
                and connection.state is ConnectionState.CONNECTING
                and connection.peer_socket_id is None
            ):
                fallback = connection
        if fallback is not None:
            self._rendezvous_by_peer[(addr, peer_id)] = fallback.socket_id
        return fallback

    def _accept(self, request: ConnectionRequest, now: float) -> None:
        assert self._listener is not None
        known = self._accepted_by_key.get(request.key)
        if known is not None:
            self.counters.repeated_requests += 1
            self._listener_outbox.append((known.response, known.destination))
            return
        if len(self._connections) >= self._max_connections:
            self.counters.rejected += 1
            reply = self._listener.reject(request)
            self._listener_outbox.append((reply.datagram, reply.destination))
            return
        accepted = self._listener.accept(request, socket_id=self._new_socket_id())
        connection = self._add(
            UdtConnection.accepted(
                accepted, now=now, random=self._random_float, config=self._config
            )
        )
        self._accepted_by_key[request.key] = accepted
        self._key_of[connection.socket_id] = request.key
        self._listener_outbox.append((accepted.response, accepted.destination))
        self.counters.accepted += 1
        self._events.append(ConnectionAccepted(connection=connection))

    def _forget(self, socket_id: int) -> None:
        del self._connections[socket_id]
        key = self._key_of.pop(socket_id, None)
        if key is not None:
            del self._accepted_by_key[key]
        for candidate, ids in list(self._rendezvous_by_candidate.items()):
            if socket_id in ids:
                ids.remove(socket_id)
                if not ids:
                    del self._rendezvous_by_candidate[candidate]
        for peer, bound in list(self._rendezvous_by_peer.items()):
            if bound == socket_id:
                del self._rendezvous_by_peer[peer]

    def _add(self, connection: UdtConnection) -> UdtConnection:
        self._connections[connection.socket_id] = connection
        return connection

    def _check_room(self) -> None:
        if len(self._connections) >= self._max_connections:
            raise LocalProtocolError(
                f"this socket already has {self._max_connections} connections (max_connections)"
            )

    def _new_socket_id(self) -> int:
        while True:
            socket_id = self._random_bits(31) & _MAX_SOCKET_ID
            if socket_id and socket_id not in self._connections:
                return socket_id

    def _random_float(self) -> float:
        return self._random_bits(53) / float(1 << 53)


assert SEQ_MAX == _MAX_SOCKET_ID  # both are 31-bit: one random_bits(31) serves either
