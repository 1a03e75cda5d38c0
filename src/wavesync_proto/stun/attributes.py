"""STUN attributes (RFC 8489 §14): one typed, frozen class per attribute.

This module owns the attribute model: type codes and the classes a decoded
message holds. How each value is laid out in bytes is ``attribute_codecs.py``'s;
message framing, padding and integrity ordering are ``message.py``'s. An
attribute we do not know decodes to ``RawAttribute`` so nothing a peer sent is lost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..addresses import Endpoint

__all__ = [
    "MAGIC_COOKIE",
    "AlternateDomain",
    "AlternateServer",
    "Attribute",
    "AttributeType",
    "ErrorCode",
    "Fingerprint",
    "MappedAddress",
    "MessageIntegrity",
    "MessageIntegritySha256",
    "Nonce",
    "PasswordAlgorithm",
    "PasswordAlgorithmId",
    "PasswordAlgorithms",
    "RawAttribute",
    "Realm",
    "Software",
    "UnknownAttributes",
    "Userhash",
    "Username",
    "XorMappedAddress",
    "is_comprehension_required",
]

MAGIC_COOKIE = 0x2112A442


class AttributeType:
    """Attribute type codes (RFC 8489 §18.3 registry). Plain ints, for speed in the codec."""

    MAPPED_ADDRESS = 0x0001
    USERNAME = 0x0006
    MESSAGE_INTEGRITY = 0x0008
    ERROR_CODE = 0x0009
    UNKNOWN_ATTRIBUTES = 0x000A
    REALM = 0x0014
    NONCE = 0x0015
    MESSAGE_INTEGRITY_SHA256 = 0x001C
    PASSWORD_ALGORITHM = 0x001D
    USERHASH = 0x001E
    XOR_MAPPED_ADDRESS = 0x0020
    PASSWORD_ALGORITHMS = 0x8002
    ALTERNATE_DOMAIN = 0x8003
    SOFTWARE = 0x8022
    ALTERNATE_SERVER = 0x8023
    FINGERPRINT = 0x8028


class PasswordAlgorithmId:
    """PASSWORD-ALGORITHM numbers (RFC 8489 §18.5)."""

    MD5 = 0x0001
    SHA256 = 0x0002


def is_comprehension_required(attribute_type: int) -> bool:
    """RFC 8489 §14: types 0x0000-0x7FFF must be understood or the request fails with 420."""
    return attribute_type < 0x8000


class Attribute:
    """Base class of every attribute value. ``TYPE`` is the wire type code."""

    __slots__ = ()
    TYPE: ClassVar[int]

    @property
    def wire_type(self) -> int:
        """The attribute type written on the wire."""
        return self.TYPE


# --- attribute classes --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MappedAddress(Attribute):
    """MAPPED-ADDRESS (RFC 8489 §14.1): the reflexive address, not obfuscated (RFC 3489 clients)."""

    TYPE: ClassVar[int] = AttributeType.MAPPED_ADDRESS
    address: Endpoint


@dataclass(frozen=True, slots=True)
class XorMappedAddress(Attribute):
    """XOR-MAPPED-ADDRESS (RFC 8489 §14.2): the reflexive address, xored against NAT rewriting."""

    TYPE: ClassVar[int] = AttributeType.XOR_MAPPED_ADDRESS
    address: Endpoint


@dataclass(frozen=True, slots=True)
class AlternateServer(Attribute):
    """ALTERNATE-SERVER (RFC 8489 §14.15): where a 300 Try Alternate sends the client."""

    TYPE: ClassVar[int] = AttributeType.ALTERNATE_SERVER
    address: Endpoint


@dataclass(frozen=True, slots=True)
class Username(Attribute):
    """USERNAME (RFC 8489 §14.3): fewer than 509 bytes of UTF-8."""

    TYPE: ClassVar[int] = AttributeType.USERNAME
    value: str


@dataclass(frozen=True, slots=True)
class Userhash(Attribute):
    """USERHASH (RFC 8489 §14.4): SHA-256 of ``username ":" realm``, 32 bytes."""

    TYPE: ClassVar[int] = AttributeType.USERHASH
    value: bytes


@dataclass(frozen=True, slots=True)
class MessageIntegrity(Attribute):
    """MESSAGE-INTEGRITY (RFC 8489 §14.5): HMAC-SHA1, 20 bytes."""

    TYPE: ClassVar[int] = AttributeType.MESSAGE_INTEGRITY
    hmac: bytes


@dataclass(frozen=True, slots=True)
class MessageIntegritySha256(Attribute):
    """MESSAGE-INTEGRITY-SHA256 (RFC 8489 §14.6): HMAC-SHA256, 16 to 32 bytes in steps of 4."""

    TYPE: ClassVar[int] = AttributeType.MESSAGE_INTEGRITY_SHA256
    hmac: bytes


@dataclass(frozen=True, slots=True)
class Fingerprint(Attribute):
    """FINGERPRINT (RFC 8489 §14.7): CRC-32 of the message xor 0x5354554E."""

    TYPE: ClassVar[int] = AttributeType.FINGERPRINT
    crc: int


@dataclass(frozen=True, slots=True)
class ErrorCode(Attribute):
    """ERROR-CODE (RFC 8489 §14.8): a code in 300..699 and a reason phrase."""

    TYPE: ClassVar[int] = AttributeType.ERROR_CODE
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class Realm(Attribute):
    """REALM (RFC 8489 §14.9): fewer than 128 characters."""

    TYPE: ClassVar[int] = AttributeType.REALM
    value: str


@dataclass(frozen=True, slots=True)
class Nonce(Attribute):
    """NONCE (RFC 8489 §14.10): fewer than 128 characters."""

    TYPE: ClassVar[int] = AttributeType.NONCE
    value: str


@dataclass(frozen=True, slots=True)
class PasswordAlgorithms(Attribute):
    """PASSWORD-ALGORITHMS (RFC 8489 §14.11): the server's list of ``(algorithm, parameters)``."""

    TYPE: ClassVar[int] = AttributeType.PASSWORD_ALGORITHMS
    algorithms: tuple[tuple[int, bytes], ...]


@dataclass(frozen=True, slots=True)
class PasswordAlgorithm(Attribute):
    """PASSWORD-ALGORITHM (RFC 8489 §14.12): the algorithm the client chose."""

    TYPE: ClassVar[int] = AttributeType.PASSWORD_ALGORITHM
    algorithm: int
    parameters: bytes = b""


@dataclass(frozen=True, slots=True)
class UnknownAttributes(Attribute):
    """UNKNOWN-ATTRIBUTES (RFC 8489 §14.13): the types a 420 response did not understand."""

    TYPE: ClassVar[int] = AttributeType.UNKNOWN_ATTRIBUTES
    types: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Software(Attribute):
    """SOFTWARE (RFC 8489 §14.14): the agent's name and version, fewer than 128 characters."""

    TYPE: ClassVar[int] = AttributeType.SOFTWARE
    value: str


@dataclass(frozen=True, slots=True)
class AlternateDomain(Attribute):
    """ALTERNATE-DOMAIN (RFC 8489 §14.16): the TLS name of the ALTERNATE-SERVER."""

    TYPE: ClassVar[int] = AttributeType.ALTERNATE_DOMAIN
    value: str


@dataclass(frozen=True, slots=True)
class RawAttribute(Attribute):
    """An attribute this codec does not interpret, kept byte for byte."""

    type_code: int
    value: bytes

    @property
    def wire_type(self) -> int:
        return self.type_code
