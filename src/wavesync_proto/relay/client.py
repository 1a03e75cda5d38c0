"""The client's side of a relay connect (docs/protocol.md §3.3): ask for a server, get a tunnel.

This module owns one connect request and what its answer means: paired (a raw
tunnel to the server), not found, no standby connection in time, a redirect
to another relay, or a timeout. It does no I/O and makes no retry decision
beyond reporting ``retry_after``: the race (issue 7) decides what to try next.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from ..errors import LocalProtocolError, RemoteProtocolError
from .responses import Refused, UpgradeExchange
from .wire import CONNECT_PATH, HEADER_SERVER, HEADER_SESSION, HEADER_SYSTEM, parse_session_id

__all__ = ["RelayConnect", "RelayConnectEvent", "RelayFailed", "RelayPaired", "RelayRedirected"]


@dataclass(frozen=True, kw_only=True)
class RelayPaired:
    """The relay paired us with a server: the connection is now a tunnel to it."""

    session_id: bytes
    server_id: uuid.UUID
    #: Bytes the server sent that arrived with the 101: the tunnel's first bytes.
    first_bytes: bytes


@dataclass(frozen=True, kw_only=True)
class RelayRedirected:
    """Another relay instance holds the server: connect there (a URL)."""

    location: str


@dataclass(frozen=True, kw_only=True)
class RelayFailed:
    """No tunnel. ``status`` is the relay's HTTP status, or None (timeout, closed, garbage)."""

    status: int | None
    reason: str
    retry_after: float | None = None

    @property
    def not_found(self) -> bool:
        """The relay holds no such server or system (trying again here will not help)."""
        return self.status == 404


RelayConnectEvent = RelayPaired | RelayRedirected | RelayFailed


class RelayConnect:
    """One request to be paired with ``server_id`` or any server of ``system_id``."""

    def __init__(
        self,
        *,
        relay_host: str,
        now: float,
        server_id: uuid.UUID | None = None,
        system_id: uuid.UUID | None = None,
        timeout: float = 10.0,
    ) -> None:
        """``timeout`` bounds the whole wait, and should exceed the relay's pair timeout
        (5 s by default) so that its 503 arrives before we give up on our own."""
        if (server_id is None) == (system_id is None):
            raise LocalProtocolError("name exactly one of server_id and system_id")
        if not timeout > 0:
            raise LocalProtocolError("timeout must be positive")
        header = (HEADER_SERVER, str(server_id)) if server_id else (HEADER_SYSTEM, str(system_id))
        self._exchange = UpgradeExchange(host=relay_host, path=CONNECT_PATH, headers=[header])
        self._outgoing = self._exchange.request
        self._deadline: float | None = now + timeout
        self.result: RelayConnectEvent | None = None

    def data_to_send(self) -> bytes:
        """The request's bytes (once)."""
        data, self._outgoing = self._outgoing, b""
        return data

    def data_received(self, data: bytes, now: float) -> RelayConnectEvent | None:
        """Feed the relay's bytes until this returns the result."""
        if self.result is not None:
            raise LocalProtocolError("the connect has its result: later bytes are the tunnel's")
        try:
            answer = self._exchange.feed(data)
        except RemoteProtocolError as exc:
            return self._finish(RelayFailed(status=None, reason=str(exc)))
        if answer is None:
            return None
        if isinstance(answer, Refused):
            return self._finish(_refusal(answer))
        try:
            session_id = parse_session_id(answer.headers.get(HEADER_SESSION, ""))
            server_id = uuid.UUID(answer.headers.get(HEADER_SERVER, ""))
        except (RemoteProtocolError, ValueError):
            return self._finish(
                RelayFailed(status=101, reason="the relay's 101 lacks a valid session or server")
            )
        return self._finish(
            RelayPaired(session_id=session_id, server_id=server_id, first_bytes=answer.trailing)
        )

    def connection_lost(self) -> RelayConnectEvent | None:
        """The relay closed before answering; the result (None if it was already given)."""
        if self.result is not None:
            return None
        refused = self._exchange.connection_closed()
        if refused is not None:
            return self._finish(_refusal(refused))
        return self._finish(RelayFailed(status=None, reason="the relay closed without answering"))

    def get_timer(self) -> float | None:
        return self._deadline

    def handle_timer(self, now: float) -> RelayConnectEvent | None:
        if self._deadline is None or now < self._deadline:
            return None
        return self._finish(RelayFailed(status=None, reason="no answer from the relay in time"))

    def _finish(self, result: RelayConnectEvent) -> RelayConnectEvent:
        self.result, self._deadline = result, None
        return result


def _refusal(answer: Refused) -> RelayConnectEvent:
    if answer.status in (301, 302, 307, 308) and "location" in answer.headers:
        return RelayRedirected(location=answer.headers["location"])
    return RelayFailed(status=answer.status, reason=answer.reason, retry_after=answer.retry_after)
