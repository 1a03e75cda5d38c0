"""The server agent's side of one standby connection (docs/protocol.md §3.2).

This module owns one connection's life from the agent's point of view: the
signed request, the relay's answer, PINGs while idle, and OPEN, which it
answers with READY and after which the connection is a tunnel to a client. It
does not decide how many standby connections to keep or when to retry (that
is ``StandbyPool``'s) and does no I/O: the adapter writes ``data_to_send()``,
feeds what it reads, and hands the tunnel to the application.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass

from ..addresses import Endpoint
from ..errors import LocalProtocolError, RemoteProtocolError
from .responses import Refused, Switched, UpgradeExchange
from .wire import (
    HEADER_KEEPALIVE,
    HEADER_STANDBY_COUNT,
    STANDBY_PATH,
    Open,
    Ping,
    Ready,
    encode_control,
    parse_control,
    sign_standby,
    split_control_line,
)

__all__ = [
    "StandbyAccepted",
    "StandbyConnection",
    "StandbyEnded",
    "StandbyEvent",
    "StandbyRefused",
    "TunnelOpened",
]

#: Missing this many keep-alive intervals in a row means the relay (or the path) is gone.
DEAD_AFTER_INTERVALS = 3


@dataclass(frozen=True, kw_only=True)
class StandbyAccepted:
    """The relay took the connection into the server's pool."""

    #: How many standby connections the relay asks the server to keep (None: not said).
    standby_count: int | None
    keepalive_interval: float


@dataclass(frozen=True, kw_only=True)
class StandbyRefused:
    """The relay answered the standby request with an error status."""

    status: int
    reason: str
    retry_after: float | None


@dataclass(frozen=True, kw_only=True)
class TunnelOpened:
    """A client is paired: after ``data_to_send()`` (READY) the connection is its tunnel."""

    session_id: bytes
    client_address: Endpoint
    #: Bytes that followed OPEN: the client's first bytes (normally none yet).
    first_bytes: bytes


@dataclass(frozen=True, kw_only=True)
class StandbyEnded:
    """The connection is of no more use: close it. ``reason`` is for the log."""

    reason: str


StandbyEvent = StandbyAccepted | StandbyRefused | TunnelOpened | StandbyEnded


class _State(enum.Enum):
    REQUESTING = "requesting"
    IDLE = "idle"
    TUNNEL = "tunnel"
    ENDED = "ended"


class StandbyConnection:
    """One standby connection, from the signed request to the tunnel (or its end)."""

    def __init__(
        self,
        *,
        key: str,
        system_id: uuid.UUID,
        server_id: uuid.UUID,
        relay_host: str,
        unix_time: float,
        nonce: bytes,
        now: float,
        handshake_timeout: float = 10.0,
    ) -> None:
        """``relay_host`` is the Host header (host, or host:port) the request is signed for;
        ``unix_time`` the wall clock and ``nonce`` 16 random bytes, both from the adapter."""
        if not handshake_timeout > 0:
            raise LocalProtocolError("handshake_timeout must be positive")
        credentials = sign_standby(
            key=key,
            system_id=system_id,
            server_id=server_id,
            unix_time=int(unix_time),
            nonce=nonce,
            relay_host=relay_host,
        )
        self._exchange = UpgradeExchange(
            host=relay_host, path=STANDBY_PATH, headers=credentials.headers()
        )
        self._outgoing = bytearray(self._exchange.request)
        self._state = _State.REQUESTING
        self._deadline: float | None = now + handshake_timeout
        self._keepalive_interval = 0.0
        self._control = b""

    @property
    def is_idle(self) -> bool:
        """Accepted by the relay and not yet a tunnel."""
        return self._state is _State.IDLE

    def data_to_send(self) -> bytes:
        """Bytes to write to the relay now (the request, later READY)."""
        data = bytes(self._outgoing)
        self._outgoing.clear()
        return data

    def data_received(self, data: bytes, now: float) -> list[StandbyEvent]:
        """Bytes the relay sent, before the connection became a tunnel."""
        if self._state is _State.REQUESTING:
            try:
                answer = self._exchange.feed(data)
            except RemoteProtocolError as exc:
                return self._end(str(exc))
            if answer is None:
                return []
            if isinstance(answer, Refused):
                return self._refused(answer)
            return self._accepted(answer, now)
        if self._state is _State.IDLE:
            self._control += data
            return self._read_control(now)
        if self._state is _State.TUNNEL:
            raise LocalProtocolError("the connection is a tunnel: its bytes are the client's")
        return []

    def connection_lost(self) -> list[StandbyEvent]:
        """The relay closed the connection (or it broke) before it became a tunnel."""
        if self._state in (_State.TUNNEL, _State.ENDED):
            return []
        if self._state is _State.REQUESTING:
            refused = self._exchange.connection_closed()
            if refused is not None:
                return self._refused(refused)
            return self._end("the relay closed the connection before answering")
        return self._end("the relay closed the standby connection")

    def get_timer(self) -> float | None:
        return self._deadline

    def handle_timer(self, now: float) -> list[StandbyEvent]:
        if self._deadline is None or now < self._deadline:
            return []
        if self._state is _State.REQUESTING:
            return self._end("no answer to the standby request in time")
        return self._end(f"no keep-alive from the relay for {DEAD_AFTER_INTERVALS} intervals")

    def _accepted(self, answer: Switched, now: float) -> list[StandbyEvent]:
        try:
            interval = float(answer.headers.get(HEADER_KEEPALIVE, ""))
            raw_count = answer.headers.get(HEADER_STANDBY_COUNT)
            count = None if raw_count is None else int(raw_count)
        except ValueError:
            return self._end("the relay's 101 has malformed Wavesync headers")
        if not 0 < interval <= 3600 or (count is not None and count < 0):
            return self._end("the relay's 101 has out-of-range Wavesync headers")
        self._state = _State.IDLE
        self._keepalive_interval = interval
        self._deadline = now + DEAD_AFTER_INTERVALS * interval
        self._control = answer.trailing
        events: list[StandbyEvent] = [
            StandbyAccepted(standby_count=count, keepalive_interval=interval)
        ]
        return events + self._read_control(now)

    def _read_control(self, now: float) -> list[StandbyEvent]:
        events: list[StandbyEvent] = []
        while self._state is _State.IDLE:
            try:
                line, self._control = split_control_line(self._control)
                if line is None:
                    break
                control = parse_control(line)
            except RemoteProtocolError as exc:
                return events + self._end(f"bad control line from the relay: {exc}")
            # Any line proves the relay is there: the dead-relay timer restarts.
            self._deadline = now + DEAD_AFTER_INTERVALS * self._keepalive_interval
            if isinstance(control, Ping):
                continue
            if isinstance(control, Ready):
                return events + self._end("the relay sent READY, which is the server's line")
            events.append(self._open(control))
        return events

    def _open(self, control: Open) -> TunnelOpened:
        self._state, self._deadline = _State.TUNNEL, None
        self._outgoing += encode_control(Ready(session_id=control.session_id))
        first_bytes, self._control = self._control, b""
        return TunnelOpened(
            session_id=control.session_id,
            client_address=control.client_address,
            first_bytes=first_bytes,
        )

    def _refused(self, answer: Refused) -> list[StandbyEvent]:
        self._state, self._deadline = _State.ENDED, None
        return [
            StandbyRefused(
                status=answer.status, reason=answer.reason, retry_after=answer.retry_after
            )
        ]

    def _end(self, reason: str) -> list[StandbyEvent]:
        self._state, self._deadline = _State.ENDED, None
        return [StandbyEnded(reason=reason)]
