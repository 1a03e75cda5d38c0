"""The listening side of UDT4 regular connects: SYN cookies, no state per request.

This module owns what a listening UDT socket answers to connection requests (UDT 4.11
core.cpp ``CUDT::listen(sockaddr*, CPacket&)`` and ``CUDT::connect(peer, hs)``, api.cpp
``newConnection``). It does not keep the accepted connections: the multiplexer does, by
``ConnectionKey``, so that it can answer a repeated request with the same response.
docs/protocol.md §4.6 has the exchange and where this differs from 4.11.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from ..addresses import Endpoint
from ..errors import LocalProtocolError
from .handshake import (
    COOKIE_PERIOD,
    DEFAULT_FLOW_WINDOW,
    DEFAULT_MSS,
    MIN_MSS,
    HandshakeCounters,
    HandshakeEstablished,
    check_settings,
    decode_or_none,
)
from .packet_types import UDT_VERSION, Handshake, RequestType, SocketType
from .packets import encode_packet, pack_peer_ip

__all__ = [
    "AcceptedHandshake",
    "ConnectionKey",
    "ConnectionRequest",
    "ListenerReply",
    "UdtListener",
]

#: (peer address, peer socket id, peer ISN): how 4.11 recognises a repeated request for a
#: connection it already accepted (api.cpp ``CUDTUnited::locate(peer, id, isn)``).
ConnectionKey = tuple[Endpoint, int, int]


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenerReply:
    """A datagram to send back and forget: a cookie challenge or a refusal (type 1002)."""

    datagram: bytes
    destination: Endpoint


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionRequest:
    """A request that proved its address with a valid cookie.

    Look ``key`` up among the connections already accepted: a hit is a repeated request
    (our response was lost) and gets that connection's ``AcceptedHandshake.response``
    again; a miss gets ``UdtListener.accept`` (or ``reject`` when the backlog is full).
    """

    key: ConnectionKey
    handshake: Handshake
    source: Endpoint


@dataclass(frozen=True, slots=True, kw_only=True)
class AcceptedHandshake:
    """A new connection: its parameters and the response to send (again, for duplicates)."""

    key: ConnectionKey
    established: HandshakeEstablished
    response: bytes
    destination: Endpoint


class UdtListener:
    """The listening socket's side of regular connects, with no memory of any request.

    A first request (type 1) is answered with itself plus a SYN cookie: 32 bits of
    HMAC-SHA256(secret, "host:port:bucket") for a one-minute time bucket. Only a request
    that brings back a cookie of the current or previous bucket reaches ``accept``; a flood
    of first requests costs one HMAC each and no memory.
    """

    __slots__ = ("_flow_window", "_mss", "_secret", "_socket_type", "counters")

    def __init__(
        self,
        *,
        secret: bytes,
        mss: int = DEFAULT_MSS,
        flow_window: int = DEFAULT_FLOW_WINDOW,
        socket_type: SocketType = SocketType.STREAM,
    ) -> None:
        check_settings(1, mss, flow_window)
        if len(secret) < 16:
            raise LocalProtocolError("the cookie secret must be at least 16 bytes")
        self._secret = secret
        self._mss = mss
        self._flow_window = flow_window
        self._socket_type = socket_type
        self.counters = HandshakeCounters()

    def cookie(self, source: Endpoint, now: float, *, previous: bool = False) -> int:
        """The cookie ``source`` must bring back, for the current (or previous) bucket."""
        bucket = int(now // COOKIE_PERIOD) - previous
        message = f"{source[0]}:{source[1]}:{bucket}".encode()
        digest = hmac.new(self._secret, message, hashlib.sha256).digest()
        return int.from_bytes(digest[:4], "big")

    def receive_datagram(
        self, data: bytes, source: Endpoint, now: float
    ) -> ListenerReply | ConnectionRequest | None:
        """Judge one datagram addressed to socket id 0: answer it, pass it on, or drop it."""
        packet = decode_or_none(data)
        if packet is None:
            self.counters.malformed += 1
        elif not isinstance(packet, Handshake):
            self.counters.not_handshake += 1
        elif packet.destination_socket_id != 0:
            self.counters.wrong_destination += 1
        elif packet.request_type == RequestType.REGULAR:
            return self._challenge(packet, source, now)
        elif packet.request_type != RequestType.RESPONSE:
            self.counters.unexpected += 1
        elif not self._cookie_valid(packet.cookie, source, now):
            # 4.11 drops it, and its caller then repeats the stale cookie until it times
            # out; a fresh challenge costs the same as the first and lets it recover.
            self.counters.wrong_peer += 1
            return self._challenge(packet, source, now)
        elif (
            packet.version != UDT_VERSION
            or packet.socket_type != self._socket_type
            or packet.mss < MIN_MSS
        ):
            return self._refuse(packet, source)
        else:
            key = (source, packet.socket_id, packet.initial_sequence_number)
            return ConnectionRequest(key=key, handshake=packet, source=source)
        return None

    def accept(self, request: ConnectionRequest, *, socket_id: int) -> AcceptedHandshake:
        """Create the connection ``request`` asks for, as 4.11's ``CUDT::connect(peer, hs)``."""
        check_settings(socket_id, self._mss, self._flow_window)
        hs = request.handshake
        mss = min(hs.mss, self._mss)
        established = HandshakeEstablished(
            local_socket_id=socket_id,
            peer_socket_id=hs.socket_id,
            # 4.11: "use peer's ISN and send it back for security check": both directions
            # start at the caller's ISN, and a 4.11 caller refuses any other value.
            local_isn=hs.initial_sequence_number,
            peer_isn=hs.initial_sequence_number,
            mss=mss,
            flow_window=hs.flow_window,
            peer_address=request.source,
            reported_ip=hs.peer_ip,
        )
        response = Handshake(
            destination_socket_id=hs.socket_id,
            version=hs.version,
            socket_type=hs.socket_type,
            initial_sequence_number=hs.initial_sequence_number,
            mss=mss,
            flow_window=self._flow_window,
            request_type=RequestType.RESPONSE,
            socket_id=socket_id,
            cookie=hs.cookie,
            peer_ip=pack_peer_ip(request.source[0]),
        )
        return AcceptedHandshake(
            key=request.key,
            established=established,
            response=encode_packet(response),
            destination=request.source,
        )

    def reject(self, request: ConnectionRequest) -> ListenerReply:
        """Refuse ``request`` (no room for another connection): 4.11 answers 1002."""
        return self._refuse(request.handshake, request.source)

    def _cookie_valid(self, cookie: int, source: Endpoint, now: float) -> bool:
        given = cookie.to_bytes(4, "big")
        return any(
            hmac.compare_digest(given, self.cookie(source, now, previous=p).to_bytes(4, "big"))
            for p in (False, True)
        )

    def _challenge(self, hs: Handshake, source: Endpoint, now: float) -> ListenerReply:
        # 4.11 echoes the request unchanged but for the cookie, to the caller's socket id.
        reply = _echo(hs, request_type=RequestType.REGULAR, cookie=self.cookie(source, now))
        return ListenerReply(datagram=reply, destination=source)

    def _refuse(self, hs: Handshake, source: Endpoint) -> ListenerReply:
        reply = _echo(hs, request_type=RequestType.REJECTED, cookie=hs.cookie)
        return ListenerReply(datagram=reply, destination=source)


def _echo(hs: Handshake, *, request_type: int, cookie: int) -> bytes:
    return encode_packet(
        Handshake(
            destination_socket_id=hs.socket_id,
            version=hs.version,
            socket_type=hs.socket_type,
            initial_sequence_number=hs.initial_sequence_number,
            mss=hs.mss,
            flow_window=hs.flow_window,
            request_type=request_type,
            socket_id=hs.socket_id,
            cookie=cookie,
            peer_ip=hs.peer_ip,
        )
    )
