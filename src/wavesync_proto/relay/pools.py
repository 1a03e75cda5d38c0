"""The relay's standby pools and waiting clients, per server and per system.

This module owns which idle standby connection a client gets (the newest of
the server's, or the next server of a system in round-robin order), which
waiting client a new standby connection goes to (first come, first served;
clients that named the server before clients that named its system), and how
long a server stays "known" after its last standby connection went. It does
not know about HTTP, timeouts of connections or actions: the service does.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from ..errors import LocalProtocolError
from ..mediator.timeouts import TimeoutLane
from .service_types import ConnectionHandle

__all__ = ["RelayPools"]


@dataclass(slots=True)
class _ServerPool:
    system_id: uuid.UUID
    #: Idle standby connections, oldest first (a dict is an ordered set).
    idle: dict[ConnectionHandle, None] = field(default_factory=dict)
    #: Clients that named this server and wait for a standby connection, first come first.
    waiting: dict[ConnectionHandle, None] = field(default_factory=dict)
    #: When a standby connection of the server last left the pool or was handed over:
    #: ``known_server_ttl`` runs from here, not from when the last client stopped waiting.
    last_seen: float = 0.0


class RelayPools:
    """Idle standby connections and waiting clients, indexed for O(1) pairing."""

    def __init__(self, *, known_server_ttl: float) -> None:
        self._servers: dict[uuid.UUID, _ServerPool] = {}
        # Per system, its servers in round-robin order: the one chosen moves to the end.
        self._systems: dict[uuid.UUID, dict[uuid.UUID, None]] = {}
        self._system_waiting: dict[uuid.UUID, dict[ConnectionHandle, None]] = {}
        # Servers with no idle connection and no waiting client, until they are forgotten.
        self._fading: TimeoutLane[uuid.UUID] = TimeoutLane(known_server_ttl)
        self.idle_total = 0
        self.waiting_total = 0

    # --- standby connections ------------------------------------------------------------------

    def idle_count(self, server_id: uuid.UUID) -> int:
        pool = self._servers.get(server_id)
        return 0 if pool is None else len(pool.idle)

    def system_of(self, server_id: uuid.UUID) -> uuid.UUID | None:
        pool = self._servers.get(server_id)
        return None if pool is None else pool.system_id

    def add_idle(
        self, server_id: uuid.UUID, system_id: uuid.UUID, standby: ConnectionHandle
    ) -> None:
        pool = self._pool(server_id, system_id)
        pool.idle[standby] = None
        self.idle_total += 1
        self._fading.discard(server_id)

    def remove_idle(self, server_id: uuid.UUID, standby: ConnectionHandle, now: float) -> bool:
        """Forget an idle connection that closed or expired; False if it was not idle."""
        pool = self._servers.get(server_id)
        if pool is None or pool.idle.pop(standby, 0) is not None:
            return False
        self.idle_total -= 1
        pool.last_seen = now
        self._maybe_fading(server_id, pool, now)
        return True

    def take_for_server(self, server_id: uuid.UUID, now: float) -> ConnectionHandle | None:
        """The server's newest idle connection (the least likely to be dead), or None."""
        pool = self._servers.get(server_id)
        if pool is None or not pool.idle:
            return None
        standby, _ = pool.idle.popitem()
        self.idle_total -= 1
        pool.last_seen = now
        self._maybe_fading(server_id, pool, now)
        return standby

    def take_for_system(
        self, system_id: uuid.UUID, now: float
    ) -> tuple[uuid.UUID, ConnectionHandle] | None:
        """An idle connection of the system's next server (round robin), or None."""
        servers = self._systems.get(system_id)
        if not servers:
            return None
        for server_id in list(servers):
            if self.idle_count(server_id):
                del servers[server_id]
                servers[server_id] = None  # to the back of the round
                standby = self.take_for_server(server_id, now)
                assert standby is not None
                return server_id, standby
        return None

    # --- waiting clients ----------------------------------------------------------------------

    def is_known_server(self, server_id: uuid.UUID) -> bool:
        return server_id in self._servers

    def is_known_system(self, system_id: uuid.UUID) -> bool:
        return bool(self._systems.get(system_id))

    def add_waiting(
        self, client: ConnectionHandle, server_id: uuid.UUID | None, system_id: uuid.UUID | None
    ) -> None:
        if server_id is not None:
            self._servers[server_id].waiting[client] = None
            self._fading.discard(server_id)
        else:
            assert system_id is not None
            self._system_waiting.setdefault(system_id, {})[client] = None
        self.waiting_total += 1

    def remove_waiting(
        self,
        client: ConnectionHandle,
        server_id: uuid.UUID | None,
        system_id: uuid.UUID | None,
        now: float,
    ) -> None:
        if server_id is not None:
            pool = self._servers.get(server_id)
            if pool is None or pool.waiting.pop(client, 0) is not None:
                return
            self._maybe_fading(server_id, pool, now)
        else:
            assert system_id is not None
            waiting = self._system_waiting.get(system_id)
            if waiting is None or waiting.pop(client, 0) is not None:
                return
            if not waiting:
                del self._system_waiting[system_id]
        self.waiting_total -= 1

    def pop_waiting(
        self, server_id: uuid.UUID, system_id: uuid.UUID, now: float
    ) -> ConnectionHandle | None:
        """The client that has waited longest for this server (by id, then by system).

        ``system_id`` is the server's: a server not seen before has no pool yet, and its
        first standby connection is still what the clients of its system wait for.
        """
        pool = self._servers.get(server_id)
        if pool is not None:
            for client in pool.waiting:
                del pool.waiting[client]
                self.waiting_total -= 1
                pool.last_seen = now
                self._maybe_fading(server_id, pool, now)
                return client
        waiting = self._system_waiting.get(system_id)
        if not waiting:
            return None
        for client in waiting:
            del waiting[client]
            break
        if not waiting:
            del self._system_waiting[system_id]
        self.waiting_total -= 1
        # The server just offered a connection: it is known, and alive as of now.
        pool = self._pool(server_id, system_id)
        pool.last_seen = now
        self._maybe_fading(server_id, pool, now)
        return client

    # --- forgetting servers -------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        return self._fading.next_deadline()

    def forget_faded(self, now: float) -> int:
        """Forget servers whose last connection went ``known_server_ttl`` ago; how many."""
        forgotten = 0
        while (server_id := self._fading.pop_expired(now)) is not None:
            self._forget(server_id)
            forgotten += 1
        return forgotten

    def _pool(self, server_id: uuid.UUID, system_id: uuid.UUID) -> _ServerPool:
        pool = self._servers.get(server_id)
        if pool is None:
            pool = self._servers[server_id] = _ServerPool(system_id)
            self._systems.setdefault(system_id, {})[server_id] = None
        elif pool.system_id != system_id:
            # The service refuses a server id another system holds (409) before this.
            raise LocalProtocolError(f"server {server_id} belongs to another system")
        return pool

    def _maybe_fading(self, server_id: uuid.UUID, pool: _ServerPool, now: float) -> None:
        if pool.idle or pool.waiting:
            return
        if now - pool.last_seen >= self._fading.timeout:
            # Its time ran out while clients waited for it. Starting the ttl over when the
            # last one leaves would let clients that retry a dead server keep it known
            # (and keep waiting for it instead of trying another path) forever.
            self._forget(server_id)
        else:
            self._fading.touch(server_id, pool.last_seen)

    def _forget(self, server_id: uuid.UUID) -> None:
        pool = self._servers.pop(server_id)
        self._fading.discard(server_id)
        # Only empty pools fade: an idle connection or waiting client left here would leak.
        assert not pool.idle
        assert not pool.waiting
        servers = self._systems.get(pool.system_id)
        if servers is not None:
            servers.pop(server_id, None)
            if not servers:
                del self._systems[pool.system_id]
