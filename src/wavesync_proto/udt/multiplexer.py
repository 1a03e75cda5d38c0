"""Many UDT connections over one UDP socket (UDT 4.11 queue.cpp ``CRcvQueue``, ``CHash``).

This module owns the routing of one socket's datagrams: by destination socket id to
the connection that owns it; id 0 to the rendezvous connection waiting for that
address or, when listening, to the SYN-cookie ``UdtListener``. It allocates socket ids
and initial sequence numbers from the randomness it is given, and forgets closed
connections. It does not know what a connection does with a datagram, or sockets and
clocks: an adapter runs one multiplexer per UDP socket. docs/protocol.md §4.9.

A turn costs O(connections that did something) + O(log n), not O(n): connections
wait in a lazy min-heap of their deadlines, and only those fed a datagram, due, or
changed by the application (its connections report ``send``/``close``/``abort`` and
taken events themselves; ``touch`` for anything else) are looked at.

Reaching a peer again needs nothing from the mediator: the socket whose hole is
punched is this multiplexer's socket, so a second ``rendezvous`` (or ``connect`` to a
listening peer) toward an address already reached goes through the same mapping.
"""

from __future__ import annotations

import heapq
import struct
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from ..addresses import Endpoint
from ..errors import LocalProtocolError
from .connection import UdtConnection
from .connection_types import ConnectionState, UdtConfig, UdtEvent
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
# Stale heap entries (a deadline since moved) are dropped when they surface; past this
# many per live connection the heap is rebuilt, so a busy connection that reschedules
# every turn cannot grow it without bound. Amortized O(1) per push.
_HEAP_SLACK = 4


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


class _MultiplexedConnection(UdtConnection):
    """A connection that tells its multiplexer when the application changed it.

    ``send``, ``close`` and ``abort`` may make datagrams due or move the timer; taking
    an event may reopen the receive window (an ACK due). Without this the multiplexer
    would see such a change only at the connection's previous deadline: still served,
    never lost, but late.
    """

    _changed: Callable[[UdtConnection], None] | None = None
    _events_taken: Callable[[UdtConnection], None] | None = None
    _latest_now: Callable[[], float] | None = None

    # Whatever send() takes, passed on as it is: this class adds a notice, not a contract.
    def send(self, *args: Any, **kwargs: Any) -> int:
        if self._latest_now is not None:
            # A quiet connection is not handed every turn's ``now`` any more: a message's
            # time-to-live still starts at the latest one the multiplexer was given.
            self._now = max(self._now, self._latest_now())
        taken = super().send(*args, **kwargs)
        if taken and self._changed is not None:
            self._changed(self)
        return taken

    def close(self, now: float) -> None:
        super().close(now)
        if self._changed is not None:
            self._changed(self)

    def abort(self, now: float) -> None:
        super().abort(now)
        if self._changed is not None:
            self._changed(self)

    def next_event(self) -> UdtEvent | None:
        event = super().next_event()
        if event is not None and self._events_taken is not None:
            self._events_taken(self)
        return event


class UdtMultiplexer:
    """All UDT connections of one UDP socket, demultiplexed by destination socket id.

    Drive it as one machine: ``receive_datagram`` for every datagram the socket reads
    (a ``False`` answer means the datagram is not UDT and is the caller's to handle),
    ``handle_timer(now)`` at ``get_timer()``, and ``datagrams_to_send(now)`` after every
    call. ``next_event()`` reports connections the listener accepted; every connection
    reports its own events through ``connection.next_event()``, and
    ``ready_connections()`` says which connections may have some, so a driver pumps
    only those.
    """

    __slots__ = (
        "_accepted_by_key",
        "_config",
        "_connections",
        "_dirty",
        "_events",
        "_heap",
        "_key_of",
        "_listener",
        "_listener_outbox",
        "_max_connections",
        "_now",
        "_random_bits",
        "_ready",
        "_recheck",
        "_rendezvous_by_candidate",
        "_rendezvous_by_peer",
        "_scheduled",
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
        self._now = now  # the latest time given: where a quiet connection's send() is
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
        # The lazy timer heap: (deadline, socket id); an entry counts only while
        # _scheduled still holds that deadline for that id.
        self._heap: list[tuple[float, int]] = []
        self._scheduled: dict[int, float] = {}
        # Connections whose datagrams_to_send must run (and timer be read again) next.
        self._dirty: dict[int, UdtConnection] = {}
        # Connections whose timer may have moved (events taken): read again, no send.
        self._recheck: dict[int, UdtConnection] = {}
        # What ready_connections() will return; None until it is first asked, so a
        # caller that never asks does not collect closed connections here.
        self._ready: dict[int, UdtConnection] | None = None

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
        self._reschedule_changed()
        heap = self._heap
        scheduled = self._scheduled
        while heap:
            deadline, socket_id = heap[0]
            if scheduled.get(socket_id) == deadline:
                return deadline
            heapq.heappop(heap)
        return None

    def ready_connections(self) -> list[UdtConnection]:
        """Connections that may have events since the last call, and forget them.

        Every connection fed a datagram, run by the timer, given a turn of
        ``datagrams_to_send`` or touched, closed ones included (their
        ``ConnectionClosed`` waits). The first call returns every live connection. A
        driver pumps ``next_event()`` of these alone; the others have nothing new.
        """
        ready = self._ready
        self._ready = {}
        if ready is None:
            return list(self._connections.values())
        return list(ready.values())

    # --- commands ------------------------------------------------------------------------

    def touch(self, connection: UdtConnection) -> None:
        """The application changed ``connection``: give it a turn at the next send.

        The connections this multiplexer makes call it themselves from ``send``,
        ``close``, ``abort`` (and, for the timer alone, ``next_event``); call it after
        anything else that may make datagrams due or move the timer. Forgetting it
        costs latency, never correctness: the connection is still served at the
        deadline it had. A connection that is not (or no longer) ours is ignored.
        """
        socket_id = connection.socket_id
        if self._connections.get(socket_id) is connection:
            self._mark(socket_id, connection)

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
            _MultiplexedConnection.connect(
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
            _MultiplexedConnection.rendezvous(
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
        self._now = now
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
                self._mark(destination, connection)
            return True
        self._receive_for_id_zero(data, addr, now)
        return True

    def handle_timer(self, now: float) -> None:
        self._now = now
        self._reschedule_changed()
        for _, connection in self._take_due(now):
            timer = connection.get_timer()
            if timer is not None and timer <= now:
                connection.handle_timer(now)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Endpoint]]:
        self._now = now
        datagrams = self._listener_outbox
        self._listener_outbox = []
        # A due connection sends even if handle_timer was not called (pacing slots).
        self._reschedule_changed()
        self._take_due(now)
        dirty = self._dirty
        self._dirty = {}
        for socket_id, connection in dirty.items():
            if self._connections.get(socket_id) is not connection:
                continue  # forgotten since it was marked
            datagrams.extend(connection.datagrams_to_send(now))
            if connection.state is ConnectionState.CLOSED:
                self._forget(socket_id)
            else:
                self._reschedule(socket_id, connection)
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
                self._mark(waiting.socket_id, waiting)
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
            _MultiplexedConnection.accepted(
                accepted, now=now, random=self._random_float, config=self._config
            )
        )
        self._accepted_by_key[request.key] = accepted
        self._key_of[connection.socket_id] = request.key
        self._listener_outbox.append((accepted.response, accepted.destination))
        self.counters.accepted += 1
        self._events.append(ConnectionAccepted(connection=connection))

    def _mark(self, socket_id: int, connection: UdtConnection) -> None:
        self._dirty[socket_id] = connection
        if self._ready is not None:
            self._ready[socket_id] = connection

    def _latest_now(self) -> float:
        return self._now

    def _events_taken(self, connection: UdtConnection) -> None:
        socket_id = connection.socket_id
        if self._connections.get(socket_id) is connection:
            self._recheck[socket_id] = connection

    def _take_due(self, now: float) -> list[tuple[int, UdtConnection]]:
        """Pop every connection whose deadline is ``now`` or earlier; mark each dirty."""
        heap = self._heap
        scheduled = self._scheduled
        connections = self._connections
        due: list[tuple[int, UdtConnection]] = []
        while heap and heap[0][0] <= now:
            deadline, socket_id = heapq.heappop(heap)
            if scheduled.get(socket_id) != deadline:
                continue  # stale: moved since, or forgotten
            del scheduled[socket_id]
            connection = connections[socket_id]
            due.append((socket_id, connection))
            self._mark(socket_id, connection)
        return due

    def _reschedule_changed(self) -> None:
        """Read again the timers of connections changed since they were scheduled."""
        recheck = self._recheck
        if recheck:
            self._recheck = {}
            for socket_id, connection in recheck.items():
                if self._connections.get(socket_id) is connection:
                    self._reschedule(socket_id, connection)
        for socket_id, connection in self._dirty.items():
            self._reschedule(socket_id, connection)

    def _reschedule(self, socket_id: int, connection: UdtConnection) -> None:
        timer = connection.get_timer()
        scheduled = self._scheduled
        if timer is None:
            # Only a closed connection has no timer: its next send turn forgets it.
            scheduled.pop(socket_id, None)
            self._mark(socket_id, connection)
            return
        if scheduled.get(socket_id) == timer:
            return
        scheduled[socket_id] = timer
        heap = self._heap
        heapq.heappush(heap, (timer, socket_id))
        if len(heap) > _HEAP_SLACK * len(scheduled) + 64:
            heap[:] = [(deadline, sid) for sid, deadline in scheduled.items()]
            heapq.heapify(heap)

    def _forget(self, socket_id: int) -> None:
        del self._connections[socket_id]
        self._scheduled.pop(socket_id, None)
        self._dirty.pop(socket_id, None)
        self._recheck.pop(socket_id, None)
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
        assert isinstance(connection, _MultiplexedConnection)
        connection._changed = self.touch
        connection._events_taken = self._events_taken
        connection._latest_now = self._latest_now
        self._connections[connection.socket_id] = connection
        self._mark(connection.socket_id, connection)
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
