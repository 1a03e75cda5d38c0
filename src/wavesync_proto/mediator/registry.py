"""The mediator's table of online servers (docs/protocol.md §2): who is listening, and where.

This module owns the server sessions, their index by system for round-robin
choice, and the read-only view tests and metrics see. It does not know about
TCP peers, timeouts, authentication or connect sessions beyond the set of
pending session ids each server holds (the service keeps that set current).
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from ..addresses import Endpoint
from ..errors import LocalProtocolError

__all__ = ["OnlineServer", "PeerHandle", "ServerRegistry", "ServerSession"]

PeerHandle = Hashable
"""The adapter's id for one TCP connection (any hashable: an int, the stream object)."""


@dataclass(frozen=True, kw_only=True)
class OnlineServer:
    """What the mediator knows of one registered server."""

    #: The system the server proved its key for.
    system_id: uuid.UUID
    server_id: uuid.UUID
    #: The TCP peer handle of its listen session.
    peer: PeerHandle
    #: The source address of that TCP session as the mediator sees it.
    public_endpoint: Endpoint
    #: TCP addresses on the server's own interfaces, as it reported them.
    local_endpoints: tuple[Endpoint, ...] = ()
    #: Public TCP addresses forwarded to it, as it reported them.
    forwarded_endpoints: tuple[Endpoint, ...] = ()


@dataclass(eq=False, kw_only=True)
class ServerSession:
    """One listen session: the public facts plus what only the service may see."""

    info: OnlineServer
    #: The credential key the listen was verified with; connection_ack is checked with it.
    key: bytes
    #: Connect session ids waiting for this server's ack (answered 404 if it goes away).
    pending: set[bytes] = field(default_factory=set)


class ServerRegistry:
    """Online servers by server id, by system (round-robin) and as a read-only view."""

    def __init__(self) -> None:
        self._sessions: dict[uuid.UUID, ServerSession] = {}
        self._online: dict[uuid.UUID, OnlineServer] = {}
        # Per system, an insertion-ordered set: picking takes the first and moves it
        # to the back, which is round-robin with O(1) pick, add and remove.
        self._by_system: dict[uuid.UUID, OrderedDict[uuid.UUID, None]] = {}
        self.view: Mapping[uuid.UUID, OnlineServer] = MappingProxyType(self._online)

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, server_id: object) -> bool:
        return server_id in self._sessions

    def get(self, server_id: uuid.UUID) -> ServerSession | None:
        """The session of an online server, or None."""
        return self._sessions.get(server_id)

    def pick(self, system_id: uuid.UUID) -> ServerSession | None:
        """The next online server of ``system_id`` in round-robin order, or None."""
        ring = self._by_system.get(system_id)
        if not ring:
            return None
        server_id = next(iter(ring))
        ring.move_to_end(server_id)
        return self._sessions[server_id]

    def put(self, info: OnlineServer, key: bytes) -> tuple[ServerSession, OnlineServer | None]:
        """Register ``info``; return the session and the previous facts if it replaced one.

        A replaced session keeps its pending connects: they name the server, not
        the TCP connection, and its ack is checked against the new key.
        """
        session = self._sessions.get(info.server_id)
        previous = None
        if session is None:
            session = ServerSession(info=info, key=key)
            self._sessions[info.server_id] = session
        else:
            previous = session.info
            if previous.system_id != info.system_id:
                self._leave_ring(previous)
            session.info = info
            session.key = key
        self._online[info.server_id] = info
        self._by_system.setdefault(info.system_id, OrderedDict())[info.server_id] = None
        return session, previous

    def remove(self, server_id: uuid.UUID) -> ServerSession:
        """Unregister a server; return its session (with the pending ids to fail)."""
        session = self._sessions.pop(server_id, None)
        if session is None:
            raise LocalProtocolError(f"server {server_id} is not registered")
        del self._online[server_id]
        self._leave_ring(session.info)
        return session

    def _leave_ring(self, info: OnlineServer) -> None:
        ring = self._by_system[info.system_id]
        del ring[info.server_id]
        if not ring:
            del self._by_system[info.system_id]

    def system_count(self) -> int:
        """How many systems have at least one server online."""
        return len(self._by_system)
