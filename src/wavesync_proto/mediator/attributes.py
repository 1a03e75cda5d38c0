"""The mediator's STUN attributes: ids, endpoints, relay URLs (docs/protocol.md §2.2).

This module owns the attribute numbers and value layouts of the mediator
protocol and registers them in the STUN codec's table, so a mediator message
is decoded by the same one-pass decoder as any STUN message. It does not know
which message carries which attribute: that is ``messages.py``'s.

Numbers: comprehension-required attributes live in 0x4000-0x7FFF (a peer that
does not know them must refuse the request), optional ones in 0xC000-0xFFFF.
Endpoints use the XOR-MAPPED-ADDRESS layout, so a NAT that rewrites addresses
it finds in payloads cannot corrupt them.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass
from typing import ClassVar

from ..addresses import Endpoint
from ..errors import LocalProtocolError
from ..stun.attribute_codecs import (
    Packer,
    Unpacker,
    pack_xor_address,
    register_attribute,
    unpack_xor_address,
)
from ..stun.attributes import Attribute
from ..stun.errors import StunDecodeError

__all__ = [
    "ConnectDuration",
    "ConnectSessionId",
    "ConnectionPath",
    "ConnectionPathAttribute",
    "ForwardedEndpoint",
    "KeepaliveInterval",
    "LocalEndpoint",
    "MediatorAttributeType",
    "PeerTcpEndpoint",
    "PeerUdpEndpoint",
    "RelayUrl",
    "ServerId",
    "SystemId",
    "UdpEndpoint",
]


class MediatorAttributeType:
    """Attribute type codes of the mediator protocol."""

    SYSTEM_ID = 0x4001
    SERVER_ID = 0x4002
    CONNECT_SESSION_ID = 0x4003
    LOCAL_ENDPOINT = 0x4004
    FORWARDED_ENDPOINT = 0x4005
    UDP_ENDPOINT = 0x4006
    PEER_UDP_ENDPOINT = 0x4007
    CONNECTION_PATH = 0x4008
    RELAY_URL = 0xC001
    KEEPALIVE_INTERVAL = 0xC002
    PEER_TCP_ENDPOINT = 0xC003
    CONNECT_DURATION = 0xC004


class ConnectionPath:
    """Which path a client's connection took (CONNECTION-PATH values)."""

    FAILED = 0
    LAN = 1
    TCP = 2
    UDP = 3
    RELAY = 4

    NAMES: ClassVar[dict[int, str]] = {0: "failed", 1: "lan", 2: "tcp", 3: "udp", 4: "relay"}


# --- ids -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SystemId(Attribute):
    """SYSTEM-ID: the RFC 4122 UUID of a system (a group of servers sharing one key)."""

    TYPE: ClassVar[int] = MediatorAttributeType.SYSTEM_ID
    value: uuid.UUID


@dataclass(frozen=True, slots=True)
class ServerId(Attribute):
    """SERVER-ID: the RFC 4122 UUID of one server of a system."""

    TYPE: ClassVar[int] = MediatorAttributeType.SERVER_ID
    value: uuid.UUID


@dataclass(frozen=True, slots=True)
class ConnectSessionId(Attribute):
    """CONNECT-SESSION-ID: 128 random bits naming one connect attempt end to end."""

    TYPE: ClassVar[int] = MediatorAttributeType.CONNECT_SESSION_ID
    value: bytes


# --- endpoints -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LocalEndpoint(Attribute):
    """LOCAL-ENDPOINT: a TCP address on one of the server's own interfaces (repeatable)."""

    TYPE: ClassVar[int] = MediatorAttributeType.LOCAL_ENDPOINT
    address: Endpoint


@dataclass(frozen=True, slots=True)
class ForwardedEndpoint(Attribute):
    """FORWARDED-ENDPOINT: a public TCP address forwarded to the server (repeatable)."""

    TYPE: ClassVar[int] = MediatorAttributeType.FORWARDED_ENDPOINT
    address: Endpoint


@dataclass(frozen=True, slots=True)
class UdpEndpoint(Attribute):
    """UDP-ENDPOINT: where the server's punching socket was seen by the mediator (repeatable)."""

    TYPE: ClassVar[int] = MediatorAttributeType.UDP_ENDPOINT
    address: Endpoint


@dataclass(frozen=True, slots=True)
class PeerUdpEndpoint(Attribute):
    """PEER-UDP-ENDPOINT: the client's UDP address as the mediator saw it."""

    TYPE: ClassVar[int] = MediatorAttributeType.PEER_UDP_ENDPOINT
    address: Endpoint


@dataclass(frozen=True, slots=True)
class PeerTcpEndpoint(Attribute):
    """PEER-TCP-ENDPOINT: the client's TCP source address as the mediator saw it."""

    TYPE: ClassVar[int] = MediatorAttributeType.PEER_TCP_ENDPOINT
    address: Endpoint


# --- the rest ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RelayUrl(Attribute):
    """RELAY-URL: a relay the client may use, as a URL (repeatable)."""

    TYPE: ClassVar[int] = MediatorAttributeType.RELAY_URL
    value: str


@dataclass(frozen=True, slots=True)
class KeepaliveInterval(Attribute):
    """KEEPALIVE-INTERVAL: seconds between the listening server's keep-alives."""

    TYPE: ClassVar[int] = MediatorAttributeType.KEEPALIVE_INTERVAL
    seconds: int


@dataclass(frozen=True, slots=True)
class ConnectionPathAttribute(Attribute):
    """CONNECTION-PATH: the ``ConnectionPath`` a connection took, one byte and three reserved."""

    TYPE: ClassVar[int] = MediatorAttributeType.CONNECTION_PATH
    path: int


@dataclass(frozen=True, slots=True)
class ConnectDuration(Attribute):
    """CONNECT-DURATION: milliseconds from the client's connect request to its first stream."""

    TYPE: ClassVar[int] = MediatorAttributeType.CONNECT_DURATION
    milliseconds: int


# --- codecs --------------------------------------------------------------------------------

_U32 = struct.Struct("!I")
_MAX_URL_BYTES = 509  # as STUN text attributes (RFC 8489 §14.9)


def _id_codec(cls: type[SystemId | ServerId], name: str) -> tuple[Unpacker, Packer]:
    def unpack(value: bytes, transaction_id: bytes) -> Attribute:
        if len(value) != 16:
            raise StunDecodeError(f"{name} must be 16 bytes, not {len(value)}")
        return cls(uuid.UUID(bytes=value))

    def pack(attribute: Attribute, transaction_id: bytes) -> bytes:
        assert isinstance(attribute, cls)
        return attribute.value.bytes

    return unpack, pack


def _unpack_session_id(value: bytes, transaction_id: bytes) -> Attribute:
    if len(value) != 16:
        raise StunDecodeError(f"CONNECT-SESSION-ID must be 16 bytes, not {len(value)}")
    return ConnectSessionId(value)


def _pack_session_id(attribute: Attribute, transaction_id: bytes) -> bytes:
    assert isinstance(attribute, ConnectSessionId)
    if len(attribute.value) != 16:
        raise LocalProtocolError("CONNECT-SESSION-ID must be 16 bytes")
    return attribute.value


_EndpointClass = (
    type[LocalEndpoint]
    | type[ForwardedEndpoint]
    | type[UdpEndpoint]
    | type[PeerUdpEndpoint]
    | type[PeerTcpEndpoint]
)


def _endpoint_codec(cls: _EndpointClass, name: str) -> tuple[Unpacker, Packer]:
    def unpack(value: bytes, transaction_id: bytes) -> Attribute:
        return cls(unpack_xor_address(name, value, transaction_id))

    def pack(attribute: Attribute, transaction_id: bytes) -> bytes:
        assert isinstance(attribute, cls)
        return pack_xor_address(name, attribute.address, transaction_id)

    return unpack, pack


def _unpack_relay_url(value: bytes, transaction_id: bytes) -> Attribute:
    if len(value) > _MAX_URL_BYTES:
        raise StunDecodeError(f"RELAY-URL is {len(value)} bytes, more than {_MAX_URL_BYTES}")
    try:
        return RelayUrl(value.decode("utf-8"))
    except UnicodeDecodeError:
        raise StunDecodeError("RELAY-URL is not valid UTF-8") from None


def _pack_relay_url(attribute: Attribute, transaction_id: bytes) -> bytes:
    assert isinstance(attribute, RelayUrl)
    encoded = attribute.value.encode("utf-8")
    if len(encoded) > _MAX_URL_BYTES:
        raise LocalProtocolError(f"RELAY-URL must be at most {_MAX_URL_BYTES} bytes")
    return encoded


def _u32_codec(
    cls: type[KeepaliveInterval | ConnectDuration], name: str, field_name: str
) -> tuple[Unpacker, Packer]:
    def unpack(value: bytes, transaction_id: bytes) -> Attribute:
        if len(value) != 4:
            raise StunDecodeError(f"{name} must be 4 bytes, not {len(value)}")
        return cls(_U32.unpack(value)[0])

    def pack(attribute: Attribute, transaction_id: bytes) -> bytes:
        assert isinstance(attribute, cls)
        number: int = getattr(attribute, field_name)
        if not 0 <= number <= 0xFFFFFFFF:
            raise LocalProtocolError(f"{name} {number} does not fit in 32 bits")
        return _U32.pack(number)

    return unpack, pack


def _unpack_path(value: bytes, transaction_id: bytes) -> Attribute:
    if len(value) != 4:
        raise StunDecodeError(f"CONNECTION-PATH must be 4 bytes, not {len(value)}")
    if value[0] not in ConnectionPath.NAMES:
        raise StunDecodeError(f"CONNECTION-PATH {value[0]} is not a known path")
    return ConnectionPathAttribute(value[0])


def _pack_path(attribute: Attribute, transaction_id: bytes) -> bytes:
    assert isinstance(attribute, ConnectionPathAttribute)
    if attribute.path not in ConnectionPath.NAMES:
        raise LocalProtocolError(f"CONNECTION-PATH {attribute.path} is not a known path")
    return bytes((attribute.path, 0, 0, 0))


def _register_all() -> None:
    table: list[tuple[type[Attribute], int, tuple[Unpacker, Packer]]] = [
        (SystemId, SystemId.TYPE, _id_codec(SystemId, "SYSTEM-ID")),
        (ServerId, ServerId.TYPE, _id_codec(ServerId, "SERVER-ID")),
        (ConnectSessionId, ConnectSessionId.TYPE, (_unpack_session_id, _pack_session_id)),
        (LocalEndpoint, LocalEndpoint.TYPE, _endpoint_codec(LocalEndpoint, "LOCAL-ENDPOINT")),
        (
            ForwardedEndpoint,
            ForwardedEndpoint.TYPE,
            _endpoint_codec(ForwardedEndpoint, "FORWARDED-ENDPOINT"),
        ),
        (UdpEndpoint, UdpEndpoint.TYPE, _endpoint_codec(UdpEndpoint, "UDP-ENDPOINT")),
        (
            PeerUdpEndpoint,
            PeerUdpEndpoint.TYPE,
            _endpoint_codec(PeerUdpEndpoint, "PEER-UDP-ENDPOINT"),
        ),
        (
            PeerTcpEndpoint,
            PeerTcpEndpoint.TYPE,
            _endpoint_codec(PeerTcpEndpoint, "PEER-TCP-ENDPOINT"),
        ),
        (ConnectionPathAttribute, ConnectionPathAttribute.TYPE, (_unpack_path, _pack_path)),
        (RelayUrl, RelayUrl.TYPE, (_unpack_relay_url, _pack_relay_url)),
        (
            KeepaliveInterval,
            KeepaliveInterval.TYPE,
            _u32_codec(KeepaliveInterval, "KEEPALIVE-INTERVAL", "seconds"),
        ),
        (
            ConnectDuration,
            ConnectDuration.TYPE,
            _u32_codec(ConnectDuration, "CONNECT-DURATION", "milliseconds"),
        ),
    ]
    for cls, type_code, (unpack, pack) in table:
        register_attribute(cls, type_code, unpack, pack)


# Importing this module is what teaches the STUN codec the mediator's attributes.
_register_all()
