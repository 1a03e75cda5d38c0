"""What every tunnel machine shares (docs/tunnel.md §1): its events and its stream's life.

This module owns the byte stream a finished tunnel carries, as one state table:
the handshake, the open stream, the two directions ending (each side's clean
close), and failure. It does not know any method's wire format: a method's
machine moves the table with ``_established``/``_peer_ended``/``_fail`` and
puts its encoded bytes on a *leg* (a TCP connection; every method but getpost
has exactly one, leg 0).
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass

from ..errors import LocalProtocolError
from .wire import TunnelLimits, TunnelMethod

__all__ = [
    "OpenLeg",
    "StreamData",
    "StreamEnded",
    "TunnelEndpoint",
    "TunnelEstablished",
    "TunnelEvent",
    "TunnelFailed",
    "TunnelState",
]


@dataclass(frozen=True, kw_only=True)
class TunnelEvent:
    """Base class of what a tunnel machine reports from ``next_event()``."""


@dataclass(frozen=True, kw_only=True)
class TunnelEstablished(TunnelEvent):
    """The handshake is done: ``send`` now reaches the peer, ``StreamData`` follows."""

    method: TunnelMethod


@dataclass(frozen=True, kw_only=True)
class StreamData(TunnelEvent):
    """Bytes of the peer's stream, in order (bytes glued to the handshake included)."""

    data: bytes


@dataclass(frozen=True, kw_only=True)
class StreamEnded(TunnelEvent):
    """The peer closed its direction cleanly: no ``StreamData`` follows."""


@dataclass(frozen=True, kw_only=True)
class TunnelFailed(TunnelEvent):
    """The tunnel is unusable; close every leg after writing what ``data_to_send`` holds.

    ``status`` is the HTTP status behind the failure when there is one: the
    proxy's or server's refusal on a client (407, 403, 426, ...), or the status
    a server answers a malformed request with (already queued for sending).
    """

    reason: str
    status: int | None = None
    #: The refusal's ``Proxy-Authenticate`` (407) or ``Retry-After``, when given.
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, kw_only=True)
class OpenLeg(TunnelEvent):
    """Open another TCP connection to the same place (same proxy, same TLS) as leg ``leg``."""

    leg: int


class TunnelState(enum.Enum):
    HANDSHAKE = "handshake"
    OPEN = "open"  # the stream flows (either direction may already have ended)
    CLOSED = "closed"  # both directions ended cleanly
    FAILED = "failed"


class _Input(enum.Enum):
    ESTABLISHED = "established"
    BOTH_ENDED = "both directions ended"
    FAIL = "fail"


_S, _I = TunnelState, _Input
_TRANSITIONS: dict[tuple[TunnelState, _Input], TunnelState] = {
    (_S.HANDSHAKE, _I.ESTABLISHED): _S.OPEN,
    (_S.HANDSHAKE, _I.FAIL): _S.FAILED,
    (_S.OPEN, _I.FAIL): _S.FAILED,
    (_S.OPEN, _I.BOTH_ENDED): _S.CLOSED,
}
# A failure after a clean close, or a second failure, changes nothing: those pairs are
# absent on purpose and ``_fail`` ignores them (a peer's late garbage is not news).


class TunnelEndpoint:
    """One end of a tunnel: bytes in and out per leg, stream bytes and events for the caller.

    The caller's loop: feed what each leg reads to ``receive_data(data, leg)``
    (``b""`` at that leg's end of file), take events from ``next_event()`` until
    None, write ``data_to_send(leg)`` on every leg it has, and shut a leg's write
    side down once ``eof_to_send(leg)`` says so.
    """

    method: TunnelMethod

    def __init__(self, *, limits: TunnelLimits | None = None) -> None:
        self.limits = limits or TunnelLimits()
        self._state = TunnelState.HANDSHAKE
        self._events: deque[TunnelEvent] = deque()
        self._outgoing: dict[int, bytearray] = {0: bytearray()}
        self._eof: set[int] = set()
        self._early = bytearray()  # sent before the handshake finished
        self._we_closed = False
        self._peer_ended = False

    # --- the caller's side ------------------------------------------------------------

    @property
    def state(self) -> TunnelState:
        return self._state

    @property
    def buffered(self) -> int:
        """Peer bytes held that are not yet events (a partial head, frame or chunk line)."""
        return 0

    def receive_data(self, data: bytes, leg: int = 0) -> None:
        """Bytes read from ``leg``; ``b""`` means its end of file. Never raises for the peer's
        bytes: what they mean comes out of ``next_event()``."""
        if leg not in self._outgoing:
            raise LocalProtocolError(f"no leg {leg} on this tunnel")
        if self._state is TunnelState.FAILED:
            return  # the tunnel is being torn down; late bytes carry no news
        self._receive(data, leg)

    def next_event(self) -> TunnelEvent | None:
        return self._events.popleft() if self._events else None

    def data_to_send(self, leg: int = 0) -> bytes:
        buffer = self._outgoing.get(leg)
        if buffer is None:
            return b""
        data = bytes(buffer)
        buffer.clear()
        return data

    def eof_to_send(self, leg: int = 0) -> bool:
        """Whether the caller should shut ``leg``'s write side (after ``data_to_send(leg)``)."""
        return leg in self._eof

    def send(self, data: bytes) -> None:
        """Queue stream bytes for the peer; before the handshake ends they wait for it."""
        if self._we_closed:
            raise LocalProtocolError("send() after close()")
        if self._state is TunnelState.FAILED:
            raise LocalProtocolError("send() on a failed tunnel")
        if not data:
            return
        if self._state is TunnelState.HANDSHAKE:
            self._early += data
        else:
            self._send_stream(bytes(data))

    def close(self) -> None:
        """End our direction cleanly; the peer's bytes keep coming until ``StreamEnded``."""
        if self._we_closed or self._state is TunnelState.FAILED:
            return
        self._we_closed = True
        if self._state is TunnelState.OPEN:
            self._send_end()
            self._maybe_finished()

    # --- for the method machines ------------------------------------------------------

    def _receive(self, data: bytes, leg: int) -> None:
        raise NotImplementedError

    def _send_stream(self, data: bytes) -> None:
        raise NotImplementedError

    def _send_end(self) -> None:
        raise NotImplementedError

    def _add_leg(self, leg: int) -> None:
        self._outgoing[leg] = bytearray()

    def _drop_leg(self, leg: int) -> None:
        """The leg has no more use: write out what it holds, then close it."""
        self._eof.add(leg)

    def _established(self) -> None:
        self._move(_Input.ESTABLISHED)
        self._events.append(TunnelEstablished(method=self.method))
        if self._early:
            early = bytes(self._early)
            self._early.clear()
            self._send_stream(early)
        if self._we_closed:
            self._send_end()

    def _data(self, data: bytes) -> None:
        if data and not self._peer_ended:
            self._events.append(StreamData(data=data))

    def _peer_end(self) -> None:
        if self._peer_ended or self._state is not TunnelState.OPEN:
            return
        self._peer_ended = True
        self._events.append(StreamEnded())
        self._maybe_finished()

    def _maybe_finished(self) -> None:
        if self._we_closed and self._peer_ended and self._state is TunnelState.OPEN:
            self._move(_Input.BOTH_ENDED)
            self._finished()

    def _finished(self) -> None:
        """Both directions ended: by default every leg is closed after its last bytes."""
        self._eof.update(self._outgoing)

    def _fail(
        self,
        reason: str,
        status: int | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        if self._state in (TunnelState.FAILED, TunnelState.CLOSED):
            return
        self._move(_Input.FAIL)
        self._early.clear()
        self._eof.update(self._outgoing)
        self._events.append(TunnelFailed(reason=reason, status=status, headers=headers))

    def _move(self, event: _Input) -> None:
        next_state = _TRANSITIONS.get((self._state, event))
        if next_state is None:
            # Every input is derived inside the machine: a missing pair is a bug here.
            raise AssertionError(f"{event.value} while {self._state.value}")
        self._state = next_state
