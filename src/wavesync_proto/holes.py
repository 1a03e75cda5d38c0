"""When a punched UDP socket may close, and which one gives way at the cap.

A punched socket is worth more than its first connection: while the NAT mapping
lives, the client's next connection reaches the server through the same hole
with no mediator involved (DESIGN.md §1 step 7). Both ends therefore keep the
socket open while anything uses it and ``linger`` seconds after its last use;
the client's linger is the shorter one, so a reuse never waits out a connect
timeout against a socket the server already closed.

These are decisions, so they live here and every adapter's server agent and
client connector make them alike. The adapter reports what happens on the
socket and asks ``close_deadline`` when it may close it (it polls, because a
UDT connection opening or closing is not signalled to it).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from .errors import LocalProtocolError

__all__ = ["PunchSockets", "PunchedSocket", "select_eviction"]

Key = TypeVar("Key", bound=Hashable)


@dataclass(eq=False, kw_only=True)
class PunchedSocket:
    """One punching socket's use, and when it may close.

    ``linger``: how long a socket that carried a connection stays open after its
    last use. ``unproven_linger``: how long a socket that never carried one waits
    for its rendezvous to start (the agent's rendezvous timeout: a connect request
    whose client UDP address never comes; 0 for a connector, whose socket only
    matters once it was proven). A socket whose rendezvous was tried and failed
    closes as soon as nothing uses it.
    """

    linger: float
    unproven_linger: float
    #: When the socket was last seen in use (its creation to begin with).
    idle_since: float
    #: A UDT connection was established on it: the hole is worth keeping.
    proven: bool = False
    #: A rendezvous was started from it (and may have ended).
    tried: bool = False
    #: Rendezvous in flight, and streams being served on it now.
    pending_rendezvous: int = 0
    active: int = 0
    #: Given up at the cap for a newer request (an agent's decision, see PunchSockets).
    evicted: bool = False
    #: When the last stream on it ended: a hole reused by short connections is busy
    #: even if a poll never sees one open.
    last_used: float = field(default=-math.inf)

    def __post_init__(self) -> None:
        if self.linger < 0 or self.unproven_linger < 0:
            raise LocalProtocolError("a linger must not be negative")

    def rendezvous_started(self) -> None:
        self.tried = True
        self.pending_rendezvous += 1

    def rendezvous_ended(self, *, connected: bool) -> None:
        if self.pending_rendezvous <= 0:
            raise LocalProtocolError("rendezvous_ended without rendezvous_started")
        self.pending_rendezvous -= 1
        if connected:
            self.proven = True

    def connection_proven(self) -> None:
        """A connection (a reuse, or the connector's verified stream) came through."""
        self.proven = True

    def stream_started(self) -> None:
        self.active += 1

    def stream_ended(self, now: float) -> None:
        if self.active <= 0:
            raise LocalProtocolError("stream_ended without stream_started")
        self.active -= 1
        self.last_used = now

    def close_deadline(self, now: float, *, open_connections: int = 0) -> float | None:
        """When the socket may close (≤ ``now``: close it), or None while it is busy.

        ``open_connections``: the UDT connections its multiplexer holds now,
        including ones still in their handshake that no stream counts yet.
        """
        if self.pending_rendezvous or self.active or open_connections:
            self.idle_since = now
            return None
        self.idle_since = max(self.idle_since, self.last_used)
        if self.proven:
            return self.idle_since + self.linger
        # Never carried a connection: once its rendezvous was tried and is over, it
        # is worth nothing; before that, it waits for the client's UDP address.
        return self.idle_since + (0.0 if self.tried else self.unproven_linger)

    def poll_interval(self, now: float, *, open_connections: int = 0, most: float = 1.0) -> float:
        """How long the adapter may sleep before asking again (at most ``most``: a
        second's slack on a 30 s linger costs nothing). 0 means close now."""
        deadline = self.close_deadline(now, open_connections=open_connections)
        if deadline is None:
            return most
        return max(0.0, min(most, deadline - now))


@dataclass
class PunchSockets(Generic[Key]):
    """An agent's punching sockets by the connect session they were opened for,
    with a cap: what a new connect request gets is ``admit``'s decision."""

    limit: int
    sockets: dict[Key, PunchedSocket] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise LocalProtocolError("the punching socket limit must be at least 1")

    def admit(self) -> tuple[bool, Key | None]:
        """Whether a new punching socket may open, and which one to evict first.

        Below the cap: (True, None). At the cap: evict the oldest socket that never
        carried a connection — a client that won by another path leaves the agent
        punching toward it until the rendezvous times out, and the newest request is
        the likeliest live client; (False, None) when every socket carries one.
        """
        if len(self.sockets) < self.limit:
            return True, None
        victim = select_eviction(self.sockets.items())
        if victim is None:
            return False, None
        self.sockets[victim].evicted = True
        return True, victim

    def add(self, key: Key, punched: PunchedSocket) -> None:
        if key in self.sockets:
            raise LocalProtocolError("a punching socket is already open for this session")
        self.sockets[key] = punched

    def remove(self, key: Key) -> None:
        self.sockets.pop(key, None)

    def __len__(self) -> int:
        return len(self.sockets)


def select_eviction(sockets: Iterable[tuple[Key, PunchedSocket]]) -> Key | None:
    """The first (oldest) socket never proven and not already evicted, or None."""
    for key, punched in sockets:
        if not punched.proven and not punched.evicted:
            return key
    return None
