"""Typed mediator messages (docs/protocol.md §2): frozen dataclasses with to/from STUN.

This module owns which method and class each mediator message has and which
attributes it must carry. It does not know about authentication (``auth.py``
adds and checks USERNAME/REALM/NONCE/MESSAGE-INTEGRITY-SHA256 around these)
or about any state machine.

``parse_mediator_message`` turns a decoded STUN ``Message`` into one of these
classes or raises ``MediatorMessageError`` (a ``RemoteProtocolError`` hinting
400) naming what was missing or wrong.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import ClassVar, Self, TypeVar

from ..addresses import Endpoint
from ..errors import LocalProtocolError, RemoteProtocolError
from ..stun.attributes import Attribute, XorMappedAddress
from ..stun.message import Message, MessageClass
from .attributes import (
    ConnectDuration,
    ConnectionPath,
    ConnectionPathAttribute,
    ConnectSessionId,
    ForwardedEndpoint,
    KeepaliveInterval,
    LocalEndpoint,
    PeerTcpEndpoint,
    PeerUdpEndpoint,
    RelayUrl,
    ServerId,
    SystemId,
    UdpEndpoint,
)

__all__ = [
    "Connect",
    "ConnectResponse",
    "ConnectionAck",
    "ConnectionAckResponse",
    "ConnectionRequested",
    "ConnectionResult",
    "ConnectionUpdate",
    "Listen",
    "ListenResponse",
    "MediatorMessage",
    "MediatorMessageError",
    "MediatorMethod",
    "parse_mediator_message",
]

# Bounds on repeated attributes: a server reports a handful of interfaces, and a
# peer that sends hundreds is either broken or probing our memory.
MAX_ENDPOINTS = 16
MAX_RELAY_URLS = 8


class MediatorMethod:
    """STUN method numbers of the mediator protocol (docs/protocol.md §2.1)."""

    LISTEN = 0x101
    CONNECT = 0x102
    CONNECTION_REQUESTED = 0x103
    CONNECTION_ACK = 0x104
    CONNECTION_UPDATE = 0x105
    CONNECTION_RESULT = 0x106
    SEARCH = 0x108
    TUNNEL_SYN = 0x109


class MediatorMessageError(RemoteProtocolError):
    """A well-formed STUN message that is not a valid mediator message (answer 400)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code_hint=400)


_A = TypeVar("_A", bound=Attribute)


def _one(message: Message, cls: type[_A], name: str) -> _A:
    attribute = message.get(cls)
    if attribute is None:
        raise MediatorMessageError(f"{name} is missing its {cls.__name__} attribute")
    return attribute


def _endpoints(
    message: Message, cls: type[LocalEndpoint | ForwardedEndpoint | UdpEndpoint], name: str
) -> tuple[Endpoint, ...]:
    found = message.get_all(cls)
    if len(found) > MAX_ENDPOINTS:
        raise MediatorMessageError(
            f"{name} lists {len(found)} {cls.__name__}s, at most {MAX_ENDPOINTS}"
        )
    return tuple(a.address for a in found)


def _check_endpoints(name: str, endpoints: tuple[Endpoint, ...]) -> None:
    if len(endpoints) > MAX_ENDPOINTS:
        raise LocalProtocolError(f"{name}: at most {MAX_ENDPOINTS} endpoints")


def check_target(name: str, server_id: uuid.UUID | None, system_id: uuid.UUID | None) -> None:
    """A message that names whom it wants (connect, search, tunnel_syn) names exactly one
    of a server (that server) and a system (any server of it)."""
    if (server_id is None) == (system_id is None):
        raise LocalProtocolError(f"{name} names exactly one of server_id and system_id")


def target_attribute(server_id: uuid.UUID | None, system_id: uuid.UUID | None) -> Attribute:
    """SERVER-ID or SYSTEM-ID for a target ``check_target`` accepted."""
    if server_id is not None:
        return ServerId(server_id)
    assert system_id is not None  # check_target guarantees exactly one
    return SystemId(system_id)


def read_target(message: Message, name: str) -> tuple[uuid.UUID | None, uuid.UUID | None]:
    """(server id, system id) of a message that must name exactly one of them."""
    server, system = message.get(ServerId), message.get(SystemId)
    if (server is None) == (system is None):
        raise MediatorMessageError(f"{name} must name exactly one of SERVER-ID and SYSTEM-ID")
    return (server.value if server else None, system.value if system else None)


def _check_session_id(session_id: bytes) -> None:
    if len(session_id) != 16:
        raise LocalProtocolError("a connect session id is 16 bytes")


@dataclass(frozen=True, kw_only=True)
class MediatorMessage:
    """Base class: each subclass is one (method, class) of the mediator protocol."""

    METHOD: ClassVar[int]
    CLASS: ClassVar[MessageClass]

    def to_stun(self, transaction_id: bytes) -> Message:
        """This message as a STUN message with the given transaction id."""
        return Message(
            message_class=self.CLASS,
            method=self.METHOD,
            transaction_id=transaction_id,
            attributes=self.stun_attributes(),
        )

    def stun_attributes(self) -> tuple[Attribute, ...]:
        """The attributes, in wire order."""
        raise NotImplementedError

    @classmethod
    def from_stun(cls, message: Message) -> Self:
        """Read this message type out of a decoded STUN message."""
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class Listen(MediatorMessage):
    """listen (request, server → mediator over its persistent TCP session): "I am online"."""

    METHOD: ClassVar[int] = MediatorMethod.LISTEN
    CLASS: ClassVar[MessageClass] = MessageClass.REQUEST
    system_id: uuid.UUID
    server_id: uuid.UUID
    #: TCP addresses on the server's own interfaces (for clients on the same network).
    local_endpoints: tuple[Endpoint, ...] = ()
    #: Public TCP addresses forwarded to the server (configured port forwarding).
    forwarded_endpoints: tuple[Endpoint, ...] = ()

    def __post_init__(self) -> None:
        _check_endpoints("local_endpoints", self.local_endpoints)
        _check_endpoints("forwarded_endpoints", self.forwarded_endpoints)

    def stun_attributes(self) -> tuple[Attribute, ...]:
        return (
            SystemId(self.system_id),
            ServerId(self.server_id),
            *(LocalEndpoint(e) for e in self.local_endpoints),
            *(ForwardedEndpoint(e) for e in self.forwarded_endpoints),
        )

    @classmethod
    def from_stun(cls, message: Message) -> Self:
        system = _one(message, SystemId, "listen")
        server = _one(message, ServerId, "listen")
        return cls(
            system_id=system.value,
            server_id=server.value,
            local_endpoints=_endpoints(message, LocalEndpoint, "listen"),
            forwarded_endpoints=_endpoints(message, ForwardedEndpoint, "listen"),
        )


@dataclass(frozen=True, kw_only=True)
class ListenResponse(MediatorMessage):
    """listen success: the server's public TCP address as seen, and the keep-alive interval."""

    METHOD: ClassVar[int] = MediatorMethod.LISTEN
    CLASS: ClassVar[MessageClass] = MessageClass.SUCCESS
    public_endpoint: Endpoint
    keepalive_interval: int

    def stun_attributes(self) -> tuple[Attribute, ...]:
        return (XorMappedAddress(self.public_endpoint), KeepaliveInterval(self.keepalive_interval))

    @classmethod
    def from_stun(cls, message: Message) -> Self:
        mapped = _one(message, XorMappedAddress, "listen response")
        interval = _one(message, KeepaliveInterval, "listen response")
        if interval.seconds < 1:
            raise MediatorMessageError("listen response: KEEPALIVE-INTERVAL must be at least 1 s")
        return cls(public_endpoint=mapped.address, keepalive_interval=interval.seconds)


@dataclass(frozen=True, kw_only=True)
class Connect(MediatorMessage):
    """connect (request, client → mediator over UDP and TCP at once).

    Names its target by ``server_id`` (that server) or ``system_id`` (any online
    server of that system); exactly one of the two.
    """

    METHOD: ClassVar[int] = MediatorMethod.CONNECT
    CLASS: ClassVar[MessageClass] = MessageClass.REQUEST
    connect_session_id: bytes
    server_id: uuid.UUID | None = None
    system_id: uuid.UUID | None = None

    def __post_init__(self) -> None:
        _check_session_id(self.connect_session_id)
        check_target("connect", self.server_id, self.system_id)

    def stun_attributes(self) -> tuple[Attribute, ...]:
        return (
            ConnectSessionId(self.connect_session_id),
            target_attribute(self.server_id, self.system_id),
        )

    @classmethod
    def from_stun(cls, message: Message) -> Self:
        session = _one(message, ConnectSessionId, "connect")
        server_id, system_id = read_target(message, "connect")
        return cls(connect_session_id=session.value, server_id=server_id, system_id=system_id)


@dataclass(frozen=True, kw_only=True)
class ConnectResponse(MediatorMessage):
    """connect success (*connect_response*): every address of the chosen server, and relays."""

    METHOD: ClassVar[int] = MediatorMethod.CONNECT
    CLASS: ClassVar[MessageClass] = MessageClass.SUCCESS
    server_id: uuid.UUID
    system_id: uuid.UUID
    forwarded_endpoints: tuple[Endpoint, ...] = ()
    local_endpoints: tuple[Endpoint, ...] = ()
    #: The server's punched UDP address(es); empty when its ack did not come in time.
    udp_endpoints: tuple[Endpoint, ...] = ()
    relay_urls: tuple[str, ...] = ()
    #: The client's own address as the mediator saw this copy of the request.
    client_mapped: Endpoint | None = None

    def __post_init__(self) -> None:
        for name in ("forwarded_endpoints", "local_endpoints", "udp_endpoints"):
            _check_endpoints(name, getattr(self, name))
        if len(self.relay_urls) > MAX_RELAY_URLS:
            raise LocalProtocolError(f"at most {MAX_RELAY_URLS} relay URLs")

    def stun_attributes(self) -> tuple[Attribute, ...]:
        mapped = (XorMappedAddress(self.client_mapped),) if self.client_mapped else ()
        return (
            ServerId(self.server_id),
            SystemId(self.system_id),
            *(ForwardedEndpoint(e) for e in self.forwarded_endpoints),
            *(LocalEndpoint(e) for e in self.local_endpoints),
            *(UdpEndpoint(e) for e in self.udp_endpoints),
            *(RelayUrl(u) for u in self.relay_urls),
            *mapped,
        )

    @classmethod
    def from_stun(cls, message: Message) -> Self:
        server = _one(message, ServerId, "connect response")
        system = _one(message, SystemId, "connect response")
        urls = message.get_all(RelayUrl)
        if len(urls) > MAX_RELAY_URLS:
            raise MediatorMessageError(f"connect response lists {len(urls)} relay URLs")
        mapped = message.get(XorMappedAddress)
        return cls(
            server_id=server.value,
            system_id=system.value,
            forwarded_endpoints=_endpoints(message, ForwardedEndpoint, "connect response"),
            local_endpoints=_endpoints(message, LocalEndpoint, "connect response"),
            udp_endpoints=_endpoints(message, UdpEndpoint, "connect response"),
            relay_urls=tuple(u.value for u in urls),
            client_mapped=mapped.address if mapped else None,
        )


@dataclass(frozen=True, kw_only=True)
class ConnectionRequested(MediatorMessage):
    """connection_requested (indication, mediator → server over its TCP session)."""

    METHOD: ClassVar[int] = MediatorMethod.CONNECTION_REQUESTED
    CLASS: ClassVar[MessageClass] = MessageClass.INDICATION
    connect_session_id: bytes
    #: The client's UDP address; None when only the TCP copy of connect has arrived yet.
    client_udp_endpoint: Endpoint | None = None
    #: The client's TCP source address, when the TCP copy arrived.
    client_tcp_endpoint: Endpoint | None = None

    def __post_init__(self) -> None:
        _check_session_id(self.connect_session_id)

    def stun_attributes(self) -> tuple[Attribute, ...]:
        udp = (PeerUdpEndpoint(self.client_udp_endpoint),) if self.client_udp_endpoint else ()
        tcp = (PeerTcpEndpoint(self.client_tcp_endpoint),) if self.client_tcp_endpoint else ()
        return (ConnectSessionId(self.connect_session_id), *udp, *tcp)

    @classmethod
    def from_stun(cls, message: Message) -> Self:
        session = _one(message, ConnectSessionId, "connection_requested")
        udp, tcp = message.get(PeerUdpEndpoint), message.get(PeerTcpEndpoint)
        return cls(
            connect_session_id=session.value,
            client_udp_endpoint=udp.address if udp else None,
            client_tcp_endpoint=tcp.address if tcp else None,
        )


@dataclass(frozen=True, kw_only=True)
class ConnectionAck(MediatorMessage):
    """connection_ack (request, server → mediator over UDP, from the socket it punches from)."""

    METHOD: ClassVar[int] = MediatorMethod.CONNECTION_ACK
    CLASS: ClassVar[MessageClass] = MessageClass.REQUEST
    connect_session_id: bytes
    server_id: uuid.UUID

    def __post_init__(self) -> None:
        _check_session_id(self.connect_session_id)

    def stun_attributes(self) -> tuple[Attribute, ...]:
        return (ConnectSessionId(self.connect_session_id), ServerId(self.server_id))

    @classmethod
    def from_stun(cls, message: Message) -> Self:
        session = _one(message, ConnectSessionId, "connection_ack")
        server = _one(message, ServerId, "connection_ack")
        return cls(connect_session_id=session.value, server_id=server.value)


@dataclass(frozen=True, kw_only=True)
class ConnectionAckResponse(MediatorMessage):
    """connection_ack success: where the mediator saw the server's punching socket."""

    METHOD: ClassVar[int] = MediatorMethod.CONNECTION_ACK
    CLASS: ClassVar[MessageClass] = MessageClass.SUCCESS
    server_udp_endpoint: Endpoint

    def stun_attributes(self) -> tuple[Attribute, ...]:
        return (XorMappedAddress(self.server_udp_endpoint),)

    @classmethod
    def from_stun(cls, message: Message) -> Self:
        mapped = _one(message, XorMappedAddress, "connection_ack response")
        return cls(server_udp_endpoint=mapped.address)


@dataclass(frozen=True, kw_only=True)
class ConnectionUpdate(MediatorMessage):
    """connection_update (indication, mediator → server): the client's UDP address, learned late."""

    METHOD: ClassVar[int] = MediatorMethod.CONNECTION_UPDATE
    CLASS: ClassVar[MessageClass] = MessageClass.INDICATION
    connect_session_id: bytes
    client_udp_endpoint: Endpoint

    def __post_init__(self) -> None:
        _check_session_id(self.connect_session_id)

    def stun_attributes(self) -> tuple[Attribute, ...]:
        return (
            ConnectSessionId(self.connect_session_id),
            PeerUdpEndpoint(self.client_udp_endpoint),
        )

    @classmethod
    def from_stun(cls, message: Message) -> Self:
        session = _one(message, ConnectSessionId, "connection_update")
        udp = _one(message, PeerUdpEndpoint, "connection_update")
        return cls(connect_session_id=session.value, client_udp_endpoint=udp.address)


@dataclass(frozen=True, kw_only=True)
class ConnectionResult(MediatorMessage):
    """connection_result (request, client → mediator): which path won, for metrics."""

    METHOD: ClassVar[int] = MediatorMethod.CONNECTION_RESULT
    CLASS: ClassVar[MessageClass] = MessageClass.REQUEST
    connect_session_id: bytes
    #: A ``ConnectionPath`` value.
    path: int
    duration_ms: int

    def __post_init__(self) -> None:
        _check_session_id(self.connect_session_id)
        if self.path not in ConnectionPath.NAMES:
            raise LocalProtocolError(f"unknown connection path {self.path}")

    def stun_attributes(self) -> tuple[Attribute, ...]:
        return (
            ConnectSessionId(self.connect_session_id),
            ConnectionPathAttribute(self.path),
            ConnectDuration(self.duration_ms),
        )

    @classmethod
    def from_stun(cls, message: Message) -> Self:
        session = _one(message, ConnectSessionId, "connection_result")
        path = _one(message, ConnectionPathAttribute, "connection_result")
        duration = _one(message, ConnectDuration, "connection_result")
        return cls(
            connect_session_id=session.value, path=path.path, duration_ms=duration.milliseconds
        )


_BY_KIND: dict[tuple[int, MessageClass], type[MediatorMessage]] = {
    (cls.METHOD, cls.CLASS): cls
    for cls in (
        Listen,
        ListenResponse,
        Connect,
        ConnectResponse,
        ConnectionRequested,
        ConnectionAck,
        ConnectionAckResponse,
        ConnectionUpdate,
        ConnectionResult,
    )
}


def parse_mediator_message(message: Message) -> MediatorMessage:
    """The typed mediator message a decoded STUN message carries.

    Error responses are not mediator messages (read ``message.error_code``); a
    (method, class) pair the protocol does not define raises too.
    """
    cls = _BY_KIND.get((message.method, message.message_class))
    if cls is None:
        raise MediatorMessageError(
            f"no mediator message is method 0x{message.method:03x} {message.message_class.name}"
        )
    return cls.from_stun(message)
