"""UDT4 connection setup (UDT 4.11 core.cpp ``connect``/``listen``, api.cpp ``newConnection``).

This module owns the handshake phase of one UDT connection: what a caller, a listener
and a rendezvous peer send, when they resend it, and which parameters both ends agree on.
It does not know sockets, clocks or the data-transfer phase (``UdtConnection``'s), and it
draws no randomness: socket ids, initial sequence numbers and the cookie secret come in.

Every transition of ``UdtHandshake`` is in ``_TRANSITIONS``; ``UdtListener`` keeps no
state per request at all (SYN cookies). docs/protocol.md §4.6 describes the exchanges,
the timers, and where this module and libudt 4.11 differ.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from ..addresses import Endpoint
from ..errors import LocalProtocolError
from .packet_types import (
    HANDSHAKE_LENGTH,
    UDT_VERSION,
    ControlPacket,
    DataPacket,
    Handshake,
    KeepAlive,
    RequestType,
    SocketType,
    UdtDecodeError,
)
from .packets import decode_packet, encode_packet, pack_peer_ip
from .seqnum import SEQ_MAX

__all__ = [
    "CONNECT_RETRY_INTERVAL",
    "COOKIE_PERIOD",
    "DEFAULT_FLOW_WINDOW",
    "DEFAULT_MSS",
    "MIN_MSS",
    "REGULAR_CONNECT_TIMEOUT",
    "RENDEZVOUS_CONNECT_TIMEOUT",
    "FailureReason",
    "HandshakeCounters",
    "HandshakeEstablished",
    "HandshakeEvent",
    "HandshakeFailed",
    "HandshakeRole",
    "HandshakeState",
    "UdtHandshake",
]

#: Seconds between two requests: 4.11 sends "at most 1 request per 250ms" (core.cpp
#: ``connect``, queue.cpp ``CRendezvousQueue::updateConnStatus``).
CONNECT_RETRY_INTERVAL = 0.25
#: A regular connect gives up after 3 s (``ttl = 3000000`` µs in ``CUDT::connect``) ...
REGULAR_CONNECT_TIMEOUT = 3.0
#: ... a rendezvous connect after ten times that (``if (m_bRendezvous) ttl *= 10``).
RENDEZVOUS_CONNECT_TIMEOUT = 30.0
#: 4.11's cookie "secret changes every one minute"; the current and previous bucket count.
COOKIE_PERIOD = 60.0
#: libudt's defaults: MSS 1500, and the flow window it announces, min(receive buffer
#: 8192, flight flag size 25600) packets (captured).
DEFAULT_MSS = 1500
DEFAULT_FLOW_WINDOW = 8192
#: The smallest MSS 4.11 accepts (``setOpt(UDT_MSS)``: 28 + the handshake's 48 bytes).
MIN_MSS = 28 + HANDSHAKE_LENGTH

_MAX_SOCKET_ID = 0x7FFFFFFF
_MAX_FIELD = 0xFFFFFFFF


# --- events ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class HandshakeEvent:
    """Base class of what a handshake reports: exactly one event per ``UdtHandshake``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class HandshakeEstablished(HandshakeEvent):
    """The connection exists; these are the parameters its data-transfer phase starts from."""

    local_socket_id: int
    """Our socket id: the destination id of everything the peer sends us."""
    peer_socket_id: int
    """The peer's socket id: the destination id of everything we send."""
    local_isn: int
    """The sequence number of our first data packet."""
    peer_isn: int
    """The sequence number of the peer's first data packet (our receive window starts here)."""
    mss: int
    """Maximum packet size including IP and UDP headers, the same on both ends."""
    flow_window: int
    """Packets we may have unacknowledged: the window the peer announced (its receive side)."""
    peer_address: Endpoint
    """Where the peer's handshakes came from and where all later packets go."""
    reported_ip: bytes
    """The peer's 16-byte peer-IP field: our address as the peer saw it (``unpack_peer_ip``)."""


class FailureReason(enum.Enum):
    """Why a handshake ended without a connection."""

    TIMEOUT = "timeout"
    REJECTED = "rejected"
    INCOMPATIBLE = "incompatible"


@dataclass(frozen=True, slots=True, kw_only=True)
class HandshakeFailed(HandshakeEvent):
    """No connection: nothing valid came back in time, or the peer refused."""

    reason: FailureReason
    """``TIMEOUT``, ``REJECTED`` (the listener sent request type 1002) or ``INCOMPATIBLE``
    (a rendezvous peer of another UDT version or socket type)."""
    detail: str
    """What happened, for a log line."""


@dataclass(slots=True)
class HandshakeCounters:
    """Datagrams that were dropped, by cause (each is also harmless to ignore)."""

    malformed: int = 0
    """Not a UDT packet at all."""
    not_handshake: int = 0
    """A UDT packet that is not a handshake and means nothing in this state."""
    wrong_source: int = 0
    """From an address that is not (or no longer) the peer's."""
    wrong_destination: int = 0
    """Addressed to another socket id."""
    wrong_peer: int = 0
    """A handshake that contradicts the peer's earlier ones (socket id, ISN) or ours (ISN)."""
    unexpected: int = 0
    """A request type that means nothing in this state (late duplicates, a regular request
    at a rendezvous peer)."""


# --- the connecting side: caller and rendezvous ----------------------------------------


class HandshakeRole(enum.Enum):
    CALLER = "caller"
    RENDEZVOUS = "rendezvous"


class HandshakeState(enum.Enum):
    #: Caller: sending request type 1 without a cookie.
    REQUESTING = "requesting"
    #: Caller: sending request type -1 with the listener's cookie.
    CONFIRMING = "confirming"
    #: Rendezvous: sending type 0 to every candidate, nothing heard yet.
    WAVING = "waving"
    #: Rendezvous: heard the peer, sending type -1 to it.
    AGREEING = "agreeing"
    ESTABLISHED = "established"
    FAILED = "failed"


class _Input(enum.Enum):
    CHALLENGE = RequestType.REGULAR
    RESPONSE = RequestType.RESPONSE
    RENDEZVOUS_REQUEST = RequestType.RENDEZVOUS
    RENDEZVOUS_RESPONSE = RequestType.RENDEZVOUS_RESPONSE
    REJECTED = RequestType.REJECTED
    #: A data or keep-alive packet from the peer: it is connected already (4.11 POST_CONNECT).
    PEER_TRAFFIC = "peer traffic"
    TIMEOUT = "timeout"


_S = HandshakeState
_I = _Input
# (state, input) -> next state; anything else is counted as unexpected and dropped.
# Read against core.cpp ``CUDT::connect(const CPacket&)``: a caller takes the cookie of a
# type-1 reply (again if the listener re-challenges) and is connected by the -1; a
# rendezvous peer turns its own type to -1 on hearing anything while either side still
# says 0, and is connected when both say -1 (or the peer says -2, or sends data).
_TRANSITIONS: dict[tuple[HandshakeState, _Input], HandshakeState] = {
    (_S.REQUESTING, _I.CHALLENGE): _S.CONFIRMING,
    (_S.REQUESTING, _I.REJECTED): _S.FAILED,
    (_S.REQUESTING, _I.TIMEOUT): _S.FAILED,
    (_S.CONFIRMING, _I.CHALLENGE): _S.CONFIRMING,
    (_S.CONFIRMING, _I.RESPONSE): _S.ESTABLISHED,
    (_S.CONFIRMING, _I.REJECTED): _S.FAILED,
    (_S.CONFIRMING, _I.TIMEOUT): _S.FAILED,
    (_S.WAVING, _I.RENDEZVOUS_REQUEST): _S.AGREEING,
    (_S.WAVING, _I.RESPONSE): _S.AGREEING,
    (_S.WAVING, _I.RENDEZVOUS_RESPONSE): _S.AGREEING,
    (_S.WAVING, _I.REJECTED): _S.FAILED,
    (_S.WAVING, _I.TIMEOUT): _S.FAILED,
    (_S.AGREEING, _I.RENDEZVOUS_REQUEST): _S.AGREEING,
    (_S.AGREEING, _I.RESPONSE): _S.ESTABLISHED,
    (_S.AGREEING, _I.RENDEZVOUS_RESPONSE): _S.ESTABLISHED,
    (_S.AGREEING, _I.PEER_TRAFFIC): _S.ESTABLISHED,
    (_S.AGREEING, _I.REJECTED): _S.FAILED,
    (_S.AGREEING, _I.TIMEOUT): _S.FAILED,
}
_CONNECTING = frozenset({_S.REQUESTING, _S.CONFIRMING, _S.WAVING, _S.AGREEING})


def check_settings(socket_id: int, mss: int, flow_window: int) -> None:
    if not 0 < socket_id <= _MAX_SOCKET_ID:
        raise LocalProtocolError(f"socket id {socket_id} is not a positive 31-bit number")
    if not MIN_MSS <= mss <= 0xFFFF:
        raise LocalProtocolError(f"MSS {mss} is outside {MIN_MSS}..65535")
    if not 0 < flow_window <= _MAX_FIELD:
        raise LocalProtocolError(f"flow window {flow_window} is not a positive 32-bit number")


def decode_or_none(data: bytes) -> DataPacket | ControlPacket | None:
    try:
        return decode_packet(data)
    except UdtDecodeError:
        return None


class UdtHandshake:
    """One connection attempt of a caller (toward a listener) or a rendezvous peer.

    Drive it like every wavesync machine: ``datagrams_to_send(now)`` after any call,
    ``handle_timer(now)`` at ``get_timer()``, ``receive_datagram`` for each datagram from
    the socket, ``next_event()`` for the one ``HandshakeEstablished`` / ``HandshakeFailed``.
    Keep feeding it handshake datagrams after establishment: a rendezvous peer answers
    the other side's late handshakes with type -2, as 4.11 does, and the other side may
    need that answer to finish.
    """

    def __init__(
        self,
        *,
        role: HandshakeRole,
        candidates: Sequence[Endpoint],
        socket_id: int,
        isn: int,
        now: float,
        mss: int = DEFAULT_MSS,
        flow_window: int = DEFAULT_FLOW_WINDOW,
        socket_type: SocketType = SocketType.STREAM,
        timeout: float | None = None,
    ) -> None:
        check_settings(socket_id, mss, flow_window)
        if not 0 <= isn <= SEQ_MAX:
            raise LocalProtocolError(f"ISN {isn} is not a 31-bit sequence number")
        if not candidates:
            raise LocalProtocolError("a handshake needs at least one peer address")
        if role is HandshakeRole.CALLER and len(candidates) != 1:
            raise LocalProtocolError("a caller connects to exactly one listener address")
        self.role = role
        self.counters = HandshakeCounters()
        self._candidates = tuple(dict.fromkeys(candidates))
        self._socket_id = socket_id
        self._isn = isn
        self._mss = mss
        self._flow_window = flow_window
        self._socket_type = socket_type
        self._state = _S.REQUESTING if role is HandshakeRole.CALLER else _S.WAVING
        self._request_type = (
            RequestType.REGULAR if role is HandshakeRole.CALLER else RequestType.RENDEZVOUS
        )
        self._cookie = 0
        # The caller's peer is fixed; a rendezvous peer locks onto the first candidate heard.
        self._locked: Endpoint | None = candidates[0] if role is HandshakeRole.CALLER else None
        self._peer: Handshake | None = None  # the peer's last handshake (4.11 m_ConnRes)
        self._reported_ip = bytes(16)
        self._next_send = now  # 4.11 sends the first request from connect() itself
        if timeout is None:
            timeout = (
                REGULAR_CONNECT_TIMEOUT
                if role is HandshakeRole.CALLER
                else RENDEZVOUS_CONNECT_TIMEOUT
            )
        self._deadline = now + timeout
        self._outbox: list[tuple[bytes, Endpoint]] = []
        self._events: deque[HandshakeEvent] = deque()
        self.result: HandshakeEvent | None = None

    @classmethod
    def caller(
        cls,
        server: Endpoint,
        *,
        socket_id: int,
        isn: int,
        now: float,
        mss: int = DEFAULT_MSS,
        flow_window: int = DEFAULT_FLOW_WINDOW,
        socket_type: SocketType = SocketType.STREAM,
    ) -> UdtHandshake:
        """A regular connect to the listener at ``server``."""
        return cls(
            role=HandshakeRole.CALLER,
            candidates=[server],
            socket_id=socket_id,
            isn=isn,
            now=now,
            mss=mss,
            flow_window=flow_window,
            socket_type=socket_type,
        )

    @classmethod
    def rendezvous(
        cls,
        candidates: Sequence[Endpoint],
        *,
        socket_id: int,
        isn: int,
        now: float,
        mss: int = DEFAULT_MSS,
        flow_window: int = DEFAULT_FLOW_WINDOW,
        socket_type: SocketType = SocketType.STREAM,
    ) -> UdtHandshake:
        """A rendezvous connect toward every address in ``candidates``; the first heard wins."""
        return cls(
            role=HandshakeRole.RENDEZVOUS,
            candidates=candidates,
            socket_id=socket_id,
            isn=isn,
            now=now,
            mss=mss,
            flow_window=flow_window,
            socket_type=socket_type,
        )

    # --- queries -------------------------------------------------------------------------

    @property
    def state(self) -> HandshakeState:
        return self._state

    @property
    def peer_address(self) -> Endpoint | None:
        """The listener, or the rendezvous candidate heard first (None before that)."""
        return self._locked

    def get_timer(self) -> float | None:
        """When ``handle_timer`` / ``datagrams_to_send`` next have something to do."""
        if self._state not in _CONNECTING:
            return None
        return min(self._next_send, self._deadline)

    def next_event(self) -> HandshakeEvent | None:
        return self._events.popleft() if self._events else None

    # --- inputs --------------------------------------------------------------------------

    def handle_timer(self, now: float) -> None:
        """Give up once the connect timeout has passed (resends happen in ``datagrams_to_send``)."""
        if self._state in _CONNECTING and now >= self._deadline:
            self._apply(_I.TIMEOUT, None, now)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Endpoint]]:
        """Every datagram due now, with its destination."""
        out, self._outbox = self._outbox, []
        if self._state in _CONNECTING and now >= self._next_send and now < self._deadline:
            targets = self._candidates if self._locked is None else (self._locked,)
            out.extend((self._request(target), target) for target in targets)
            self._next_send = now + CONNECT_RETRY_INTERVAL
        return out

    def receive_datagram(self, data: bytes, source: Endpoint, now: float) -> None:
        """Take one datagram the socket received from ``source``; junk is counted and dropped."""
        packet = decode_or_none(data)
        if packet is None:
            self.counters.malformed += 1
            return
        if not isinstance(packet, Handshake | DataPacket | KeepAlive):
            self.counters.not_handshake += 1
            return
        if not self._from_peer(source):
            self.counters.wrong_source += 1
            return
        if packet.destination_socket_id not in (0, self._socket_id) or (
            self.role is HandshakeRole.CALLER and packet.destination_socket_id == 0
        ):
            self.counters.wrong_destination += 1
            return
        if not isinstance(packet, Handshake):
            if self._peer is not None and packet.destination_socket_id == self._socket_id:
                self._apply(_I.PEER_TRAFFIC, None, now)
            else:
                self.counters.not_handshake += 1
            return
        self._receive_handshake(packet, source, now)

    # --- internals -----------------------------------------------------------------------

    def _from_peer(self, source: Endpoint) -> bool:
        if self._locked is not None:
            return source == self._locked
        return source in self._candidates

    def _receive_handshake(self, packet: Handshake, source: Endpoint, now: float) -> None:
        if not self._consistent(packet):
            self.counters.wrong_peer += 1
            return
        if self._state is _S.ESTABLISHED:
            self._answer_late(packet)
            return
        try:
            event = _Input(packet.request_type)
        except ValueError:
            event = None
        if event is None or (self._state, event) not in _TRANSITIONS:
            self.counters.unexpected += 1
            return
        if (
            self.role is HandshakeRole.RENDEZVOUS
            and event in (_I.RENDEZVOUS_REQUEST, _I.RESPONSE)
            and (packet.version != UDT_VERSION or packet.socket_type != self._socket_type)
        ):
            self._fail(
                FailureReason.INCOMPATIBLE,
                f"peer speaks UDT version {packet.version}, socket type {packet.socket_type}",
            )
            return
        if self._locked is None:
            self._locked = source
        self._apply(event, packet, now)

    def _consistent(self, packet: Handshake) -> bool:
        if packet.mss < MIN_MSS and packet.request_type != RequestType.REJECTED:
            return False
        if self.role is HandshakeRole.CALLER:
            # Every listener reply echoes our ISN (4.11's caller checks it on the final one).
            return packet.initial_sequence_number == self._isn
        # A rendezvous peer keeps its socket id and ISN for the whole handshake.
        return self._peer is None or (
            packet.socket_id == self._peer.socket_id
            and packet.initial_sequence_number == self._peer.initial_sequence_number
        )

    def _apply(self, event: _Input, packet: Handshake | None, now: float) -> None:
        next_state = _TRANSITIONS.get((self._state, event))
        if next_state is None:
            self.counters.unexpected += 1
            return
        self._state = next_state
        if next_state is _S.FAILED:
            if event is _I.TIMEOUT:
                self._fail(FailureReason.TIMEOUT, "no answer before the connect timeout")
            else:
                self._fail(FailureReason.REJECTED, "the peer refused the connection (1002)")
            return
        assert packet is not None or event is _I.PEER_TRAFFIC
        if packet is not None:
            self._peer = packet
            if event is not _I.RENDEZVOUS_RESPONSE:
                self._reported_ip = packet.peer_ip
        if next_state is _S.ESTABLISHED:
            self._establish()
            return
        if event is _I.CHALLENGE:
            assert packet is not None
            self._cookie = packet.cookie
        self._request_type = RequestType.RESPONSE
        # "new request/response should be sent out immediately on receiving a response"
        self._next_send = now

    def _establish(self) -> None:
        peer = self._peer
        assert peer is not None
        assert self._locked is not None
        event = HandshakeEstablished(
            local_socket_id=self._socket_id,
            peer_socket_id=peer.socket_id,
            local_isn=self._isn,
            peer_isn=peer.initial_sequence_number,
            mss=min(self._mss, peer.mss),
            flow_window=peer.flow_window,
            peer_address=self._locked,
            reported_ip=self._reported_ip,
        )
        self._mss = event.mss
        self.result = event
        self._events.append(event)

    def _fail(self, reason: FailureReason, detail: str) -> None:
        self._state = _S.FAILED
        self.result = HandshakeFailed(reason=reason, detail=detail)
        self._events.append(self.result)

    def _answer_late(self, packet: Handshake) -> None:
        # 4.11 processCtrl: a connected rendezvous socket answers every handshake that is
        # not -2 with a -2, so a peer whose last -1 we never answered still completes.
        # A connected regular caller has nothing to answer: the listener never asks.
        if self.role is HandshakeRole.RENDEZVOUS and packet.request_type != (
            RequestType.RENDEZVOUS_RESPONSE
        ):
            self._outbox.append(self.rendezvous_answer())
        else:
            self.counters.unexpected += 1

    def rendezvous_answer(self) -> tuple[bytes, Endpoint]:
        """The -2 that tells a connected rendezvous peer's partner that it is connected.

        4.11 sends it only in answer to the partner's next handshake; ``UdtConnection``
        also sends one the moment it connects, which saves the partner 250 ms (§4.8).
        """
        if self.role is not HandshakeRole.RENDEZVOUS or self._state is not _S.ESTABLISHED:
            raise LocalProtocolError("only an established rendezvous handshake answers -2")
        assert self._locked is not None
        assert self._peer is not None
        answer = Handshake(
            destination_socket_id=self._peer.socket_id,
            socket_type=self._socket_type,
            initial_sequence_number=self._isn,
            mss=self._mss,
            flow_window=self._flow_window,
            request_type=RequestType.RENDEZVOUS_RESPONSE,
            socket_id=self._socket_id,
        )
        return encode_packet(answer), self._locked

    def _request(self, target: Endpoint) -> bytes:
        # A caller's requests always go to socket id 0 (the listener); a rendezvous peer
        # addresses the peer's id once it knows it (core.cpp: request.m_iID = m_ConnRes.m_iID).
        destination = 0
        if self.role is HandshakeRole.RENDEZVOUS and self._peer is not None:
            destination = self._peer.socket_id
        return encode_packet(
            Handshake(
                destination_socket_id=destination,
                socket_type=self._socket_type,
                initial_sequence_number=self._isn,
                mss=self._mss,
                flow_window=self._flow_window,
                request_type=self._request_type,
                socket_id=self._socket_id,
                cookie=self._cookie,
                peer_ip=pack_peer_ip(target[0]),
            )
        )
