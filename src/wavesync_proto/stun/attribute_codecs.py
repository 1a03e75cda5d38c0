"""Value encodings of the STUN attributes (RFC 8489 §14), as one table of pack/unpack pairs.

This module owns how each attribute's value is laid out in bytes, and the table
the message codec dispatches on. It does not know about framing, padding or
integrity ordering (``message.py``). Other wavesync protocols that ride on STUN
add their own attributes to the same table with ``register_attribute``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from ..addresses import FAMILY_IPV4, FAMILY_IPV6, Endpoint, pack_host, unpack_ipv4, unpack_ipv6
from ..errors import LocalProtocolError
from .attributes import (
    MAGIC_COOKIE,
    AlternateDomain,
    AlternateServer,
    Attribute,
    AttributeType,
    ErrorCode,
    Fingerprint,
    MappedAddress,
    MessageIntegrity,
    MessageIntegritySha256,
    Nonce,
    PasswordAlgorithm,
    PasswordAlgorithms,
    RawAttribute,
    Realm,
    Software,
    UnknownAttributes,
    Userhash,
    Username,
    XorMappedAddress,
)
from .errors import StunDecodeError

__all__ = [
    "PACKERS",
    "UNPACKERS",
    "Packer",
    "Unpacker",
    "pack_attribute_value",
    "pack_xor_address",
    "register_attribute",
    "unpack_attribute_value",
    "unpack_xor_address",
]

_MAGIC_COOKIE_BYTES = MAGIC_COOKIE.to_bytes(4, "big")
_XOR_PORT = MAGIC_COOKIE >> 16
_XOR_IPV4 = MAGIC_COOKIE

_U16 = struct.Struct("!H")
_ADDRESS_HEADER = struct.Struct("!xBH")  # reserved byte, family, port
_ALGORITHM_HEADER = struct.Struct("!HH")

# Every unpacker takes (value bytes, transaction id) and raises only StunDecodeError;
# every packer takes (attribute, transaction id) and raises only LocalProtocolError.

# Length bounds from RFC 8489 §14: text attributes are "fewer than 128 characters
# (which can be as long as 509 bytes when encoding them and as long as 763 bytes
# when decoding them)"; USERNAME is "fewer than 509 bytes".
_MAX_TEXT_CHARS = 127
_MAX_TEXT_ENCODE_BYTES = 509
_MAX_TEXT_DECODE_BYTES = 763
_MAX_USERNAME_BYTES = 508
_MAX_DOMAIN_BYTES = 255

Unpacker = Callable[[bytes, bytes], Attribute]
# Decoders build the frozen attribute objects through their slot descriptors: the
# generated frozen __init__ costs 160 ns, this 90 ns, and a message is mostly attributes.
_new_attribute = object.__new__


def _slot_setter(cls: type[Attribute], field_name: str) -> Callable[[Attribute, object], None]:
    setter: Callable[[Attribute, object], None] = cls.__dict__[field_name].__set__
    return setter


Packer = Callable[[Attribute, bytes], bytes]


def _decode_text(name: str, value: bytes, max_bytes: int) -> str:
    if len(value) > max_bytes:
        raise StunDecodeError(f"{name} is {len(value)} bytes, more than the {max_bytes} allowed")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StunDecodeError(f"{name} is not valid UTF-8 (byte {exc.start})") from None


def _encode_text(name: str, text: str, *, max_bytes: int, max_chars: int | None) -> bytes:
    if max_chars is not None and len(text) > max_chars:
        raise LocalProtocolError(f"{name} must be fewer than {max_chars + 1} characters")
    try:
        encoded = text.encode("utf-8")
    except UnicodeEncodeError:
        raise LocalProtocolError(f"{name} is not encodable as UTF-8") from None
    if len(encoded) > max_bytes:
        raise LocalProtocolError(f"{name} is {len(encoded)} bytes, more than {max_bytes}")
    return encoded


def _unpack_address_fields(name: str, value: bytes) -> tuple[int, int, bytes]:
    if len(value) < 4:
        raise StunDecodeError(f"{name} is {len(value)} bytes, shorter than its 4-byte header")
    family, port = _ADDRESS_HEADER.unpack_from(value)
    if family == FAMILY_IPV4:
        if len(value) != 8:
            raise StunDecodeError(f"{name} with IPv4 family must be 8 bytes, not {len(value)}")
    elif family == FAMILY_IPV6:
        if len(value) != 20:
            raise StunDecodeError(f"{name} with IPv6 family must be 20 bytes, not {len(value)}")
    else:
        raise StunDecodeError(f"{name} has unknown address family 0x{family:02x}")
    return family, port, value[4:]


def _check_port(name: str, port: int) -> None:
    if not 0 <= port <= 0xFFFF:
        raise LocalProtocolError(f"{name} port {port} is outside 0..65535")


def _pack_plain_address(name: str, address: Endpoint) -> bytes:
    host, port = address
    _check_port(name, port)
    family, packed = pack_host(host)
    return _ADDRESS_HEADER.pack(family, port) + packed


def unpack_xor_address(name: str, value: bytes, transaction_id: bytes) -> Endpoint:
    """Read the XOR-MAPPED-ADDRESS layout (RFC 8489 §14.2); ``name`` is for error messages."""
    family, port, packed = _unpack_address_fields(name, value)
    if family == FAMILY_IPV4:
        raw = int.from_bytes(packed, "big") ^ _XOR_IPV4
        host = "%d.%d.%d.%d" % (raw >> 24, (raw >> 16) & 255, (raw >> 8) & 255, raw & 255)  # noqa: UP031
    else:
        mask = int.from_bytes(_MAGIC_COOKIE_BYTES + transaction_id, "big")
        host = unpack_ipv6((int.from_bytes(packed, "big") ^ mask).to_bytes(16, "big"))
    return host, port ^ _XOR_PORT


def _unpack_xor_mapped(value: bytes, transaction_id: bytes) -> Attribute:
    attribute = _new_attribute(XorMappedAddress)
    _set_xor_address(attribute, unpack_xor_address("XOR-MAPPED-ADDRESS", value, transaction_id))
    return attribute


_set_xor_address = _slot_setter(XorMappedAddress, "address")


def _pack_xor_mapped(attribute: Attribute, transaction_id: bytes) -> bytes:
    assert isinstance(attribute, XorMappedAddress)
    return pack_xor_address("XOR-MAPPED-ADDRESS", attribute.address, transaction_id)


def pack_xor_address(name: str, address: Endpoint, transaction_id: bytes) -> bytes:
    """Write the XOR-MAPPED-ADDRESS layout (RFC 8489 §14.2); ``name`` is for error messages."""
    host, port = address
    _check_port(name, port)
    family, packed = pack_host(host)
    if family == FAMILY_IPV4:
        xored = (int.from_bytes(packed, "big") ^ _XOR_IPV4).to_bytes(4, "big")
    else:
        mask = int.from_bytes(_MAGIC_COOKIE_BYTES + transaction_id, "big")
        xored = (int.from_bytes(packed, "big") ^ mask).to_bytes(16, "big")
    return _ADDRESS_HEADER.pack(family, port ^ _XOR_PORT) + xored


def _unpack_error_code(value: bytes, transaction_id: bytes) -> Attribute:
    if len(value) < 4:
        raise StunDecodeError(f"ERROR-CODE is {len(value)} bytes, shorter than its 4-byte header")
    error_class = value[2] & 0x07
    number = value[3]
    if not 3 <= error_class <= 6:
        raise StunDecodeError(f"ERROR-CODE class {error_class} is outside 3..6")
    if number > 99:
        raise StunDecodeError(f"ERROR-CODE number {number} is outside 0..99")
    reason = _decode_text("ERROR-CODE reason", value[4:], _MAX_TEXT_DECODE_BYTES)
    return ErrorCode(error_class * 100 + number, reason)


def _pack_error_code(attribute: Attribute, transaction_id: bytes) -> bytes:
    assert isinstance(attribute, ErrorCode)
    if not 300 <= attribute.code <= 699:
        raise LocalProtocolError(f"ERROR-CODE {attribute.code} is outside 300..699")
    reason = _encode_text(
        "ERROR-CODE reason",
        attribute.reason,
        max_bytes=_MAX_TEXT_ENCODE_BYTES,
        max_chars=_MAX_TEXT_CHARS,
    )
    return bytes((0, 0, attribute.code // 100, attribute.code % 100)) + reason


def _unpack_unknown_attributes(value: bytes, transaction_id: bytes) -> Attribute:
    if len(value) % 2:
        raise StunDecodeError(f"UNKNOWN-ATTRIBUTES length {len(value)} is odd")
    return UnknownAttributes(tuple(t for (t,) in _U16.iter_unpack(value)))


def _pack_unknown_attributes(attribute: Attribute, transaction_id: bytes) -> bytes:
    assert isinstance(attribute, UnknownAttributes)
    for attribute_type in attribute.types:
        if not 0 <= attribute_type <= 0xFFFF:
            raise LocalProtocolError(f"attribute type {attribute_type} is outside 0..0xFFFF")
    return struct.pack(f"!{len(attribute.types)}H", *attribute.types)


def _unpack_algorithm_entries(name: str, value: bytes) -> tuple[tuple[int, bytes], ...]:
    entries: list[tuple[int, bytes]] = []
    position, end = 0, len(value)
    while position < end:
        if end - position < 4:
            raise StunDecodeError(f"{name} entry at byte {position} is truncated")
        algorithm, parameters_length = _ALGORITHM_HEADER.unpack_from(value, position)
        start = position + 4
        if start + parameters_length > end:
            raise StunDecodeError(
                f"{name} entry at byte {position} claims {parameters_length} parameter bytes,"
                f" only {end - start} remain"
            )
        entries.append((algorithm, value[start : start + parameters_length]))
        # Parameters are padded to a multiple of four inside the attribute (RFC 8489 §14.11).
        position = start + ((parameters_length + 3) & ~3)
    return tuple(entries)


def _pack_algorithm_entry(algorithm: int, parameters: bytes) -> bytes:
    if not 0 <= algorithm <= 0xFFFF:
        raise LocalProtocolError(f"password algorithm {algorithm} is outside 0..0xFFFF")
    if len(parameters) > 0xFFFF:
        raise LocalProtocolError("password algorithm parameters exceed 65535 bytes")
    return (
        _ALGORITHM_HEADER.pack(algorithm, len(parameters))
        + parameters
        + b"\x00" * (-len(parameters) % 4)
    )


def _unpack_password_algorithms(value: bytes, transaction_id: bytes) -> Attribute:
    return PasswordAlgorithms(_unpack_algorithm_entries("PASSWORD-ALGORITHMS", value))


def _pack_password_algorithms(attribute: Attribute, transaction_id: bytes) -> bytes:
    assert isinstance(attribute, PasswordAlgorithms)
    return b"".join(_pack_algorithm_entry(a, p) for a, p in attribute.algorithms)


def _unpack_password_algorithm(value: bytes, transaction_id: bytes) -> Attribute:
    entries = _unpack_algorithm_entries("PASSWORD-ALGORITHM", value)
    if len(entries) != 1:
        raise StunDecodeError(f"PASSWORD-ALGORITHM holds {len(entries)} entries instead of one")
    return PasswordAlgorithm(*entries[0])


def _pack_password_algorithm(attribute: Attribute, transaction_id: bytes) -> bytes:
    assert isinstance(attribute, PasswordAlgorithm)
    return _pack_algorithm_entry(attribute.algorithm, attribute.parameters)


def _fixed_length_codec(
    cls: type[Userhash | MessageIntegrity], name: str, size: int
) -> tuple[Unpacker, Packer]:
    def unpack(value: bytes, transaction_id: bytes) -> Attribute:
        if len(value) != size:
            raise StunDecodeError(f"{name} must be {size} bytes, not {len(value)}")
        return cls(value)

    def pack(attribute: Attribute, transaction_id: bytes) -> bytes:
        assert isinstance(attribute, cls)
        data = attribute.value if isinstance(attribute, Userhash) else attribute.hmac
        if len(data) != size:
            raise LocalProtocolError(f"{name} must be {size} bytes, not {len(data)}")
        return data

    return unpack, pack


def _unpack_integrity_sha256(value: bytes, transaction_id: bytes) -> Attribute:
    # RFC 8489 §14.6: "at least 16 bytes", "MUST be a multiple of 4", at most the 32-byte HMAC.
    if not 16 <= len(value) <= 32 or len(value) % 4:
        raise StunDecodeError(
            f"MESSAGE-INTEGRITY-SHA256 must be 16..32 bytes in steps of 4, not {len(value)}"
        )
    return MessageIntegritySha256(value)


def _pack_integrity_sha256(attribute: Attribute, transaction_id: bytes) -> bytes:
    assert isinstance(attribute, MessageIntegritySha256)
    if not 16 <= len(attribute.hmac) <= 32 or len(attribute.hmac) % 4:
        raise LocalProtocolError("MESSAGE-INTEGRITY-SHA256 must be 16..32 bytes in steps of 4")
    return attribute.hmac


def _unpack_fingerprint(value: bytes, transaction_id: bytes) -> Attribute:
    if len(value) != 4:
        raise StunDecodeError(f"FINGERPRINT must be 4 bytes, not {len(value)}")
    return Fingerprint(int.from_bytes(value, "big"))


def _pack_fingerprint(attribute: Attribute, transaction_id: bytes) -> bytes:
    assert isinstance(attribute, Fingerprint)
    if not 0 <= attribute.crc <= 0xFFFFFFFF:
        raise LocalProtocolError("FINGERPRINT must fit in 32 bits")
    return attribute.crc.to_bytes(4, "big")


def _text(
    cls: type[Username | Realm | Nonce | Software | AlternateDomain],
    name: str,
    *,
    decode_max: int = _MAX_TEXT_DECODE_BYTES,
    encode_max: int = _MAX_TEXT_ENCODE_BYTES,
    max_chars: int | None = _MAX_TEXT_CHARS,
) -> tuple[Unpacker, Packer]:
    # The hot path of the codec (every message carries text): one call, no helpers.
    set_value = _slot_setter(cls, "value")

    def unpack(value: bytes, transaction_id: bytes) -> Attribute:
        if len(value) > decode_max:
            raise StunDecodeError(
                f"{name} is {len(value)} bytes, more than the {decode_max} allowed"
            )
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise StunDecodeError(f"{name} is not valid UTF-8 (byte {exc.start})") from None
        attribute = _new_attribute(cls)
        set_value(attribute, text)
        return attribute

    def pack(attribute: Attribute, transaction_id: bytes) -> bytes:
        assert isinstance(attribute, cls)
        return _encode_text(name, attribute.value, max_bytes=encode_max, max_chars=max_chars)

    return unpack, pack


def _address(cls: type[MappedAddress | AlternateServer], name: str) -> tuple[Unpacker, Packer]:
    def unpack(value: bytes, transaction_id: bytes) -> Attribute:
        family, port, packed = _unpack_address_fields(name, value)
        host = unpack_ipv4(packed) if family == FAMILY_IPV4 else unpack_ipv6(packed)
        return cls((host, port))

    def pack(attribute: Attribute, transaction_id: bytes) -> bytes:
        assert isinstance(attribute, cls)
        return _pack_plain_address(name, attribute.address)

    return unpack, pack


# The table: wire type -> (class, unpack, pack). Reading it against RFC 8489 §14 is the review.
_TABLE: dict[int, tuple[type[Attribute], Unpacker, Packer]] = {
    AttributeType.MAPPED_ADDRESS: (
        MappedAddress,
        *_address(MappedAddress, "MAPPED-ADDRESS"),
    ),
    AttributeType.USERNAME: (
        Username,
        *_text(
            Username,
            "USERNAME",
            decode_max=_MAX_USERNAME_BYTES,
            encode_max=_MAX_USERNAME_BYTES,
            max_chars=None,
        ),
    ),
    AttributeType.MESSAGE_INTEGRITY: (
        MessageIntegrity,
        *_fixed_length_codec(MessageIntegrity, "MESSAGE-INTEGRITY", 20),
    ),
    AttributeType.ERROR_CODE: (ErrorCode, _unpack_error_code, _pack_error_code),
    AttributeType.UNKNOWN_ATTRIBUTES: (
        UnknownAttributes,
        _unpack_unknown_attributes,
        _pack_unknown_attributes,
    ),
    AttributeType.REALM: (Realm, *_text(Realm, "REALM")),
    AttributeType.NONCE: (Nonce, *_text(Nonce, "NONCE")),
    AttributeType.MESSAGE_INTEGRITY_SHA256: (
        MessageIntegritySha256,
        _unpack_integrity_sha256,
        _pack_integrity_sha256,
    ),
    AttributeType.PASSWORD_ALGORITHM: (
        PasswordAlgorithm,
        _unpack_password_algorithm,
        _pack_password_algorithm,
    ),
    AttributeType.USERHASH: (Userhash, *_fixed_length_codec(Userhash, "USERHASH", 32)),
    AttributeType.XOR_MAPPED_ADDRESS: (XorMappedAddress, _unpack_xor_mapped, _pack_xor_mapped),
    AttributeType.PASSWORD_ALGORITHMS: (
        PasswordAlgorithms,
        _unpack_password_algorithms,
        _pack_password_algorithms,
    ),
    AttributeType.ALTERNATE_DOMAIN: (
        AlternateDomain,
        *_text(
            AlternateDomain,
            "ALTERNATE-DOMAIN",
            decode_max=_MAX_DOMAIN_BYTES,
            encode_max=_MAX_DOMAIN_BYTES,
            max_chars=None,
        ),
    ),
    AttributeType.SOFTWARE: (Software, *_text(Software, "SOFTWARE")),
    AttributeType.ALTERNATE_SERVER: (
        AlternateServer,
        *_address(AlternateServer, "ALTERNATE-SERVER"),
    ),
    AttributeType.FINGERPRINT: (Fingerprint, _unpack_fingerprint, _pack_fingerprint),
}

#: wire type -> unpacker, for the decoder's loop.
UNPACKERS: dict[int, Unpacker] = {code: entry[1] for code, entry in _TABLE.items()}
#: attribute class -> (wire type, packer), for the encoder's loop.
PACKERS: dict[type[Attribute], tuple[int, Packer]] = {
    entry[0]: (code, entry[2]) for code, entry in _TABLE.items()
}


def register_attribute(
    cls: type[Attribute], type_code: int, unpack: Unpacker, pack: Packer
) -> None:
    """Add an attribute class to the codec (for protocols layered on STUN, e.g. the mediator).

    A type code or class can be registered once: two meanings for one number would
    make the wire ambiguous, so a clash is a programming error.
    """
    if not 0 <= type_code <= 0xFFFF:
        raise LocalProtocolError(f"attribute type {type_code} is outside 0..0xFFFF")
    if type_code in UNPACKERS:
        raise LocalProtocolError(f"attribute type 0x{type_code:04x} is already registered")
    if cls in PACKERS:
        raise LocalProtocolError(f"{cls.__name__} is already registered")
    UNPACKERS[type_code] = unpack
    PACKERS[cls] = (type_code, pack)


def unpack_attribute_value(attribute_type: int, value: bytes, transaction_id: bytes) -> Attribute:
    """Decode one attribute value; unknown types come back as ``RawAttribute``."""
    unpack = UNPACKERS.get(attribute_type)
    if unpack is None:
        return RawAttribute(attribute_type, value)
    return unpack(value, transaction_id)


def pack_attribute_value(attribute: Attribute, transaction_id: bytes) -> tuple[int, bytes]:
    """Encode one attribute as ``(wire type, value bytes)``, without header or padding."""
    if type(attribute) is RawAttribute:
        if not 0 <= attribute.type_code <= 0xFFFF:
            raise LocalProtocolError(f"attribute type {attribute.type_code} is outside 0..0xFFFF")
        return attribute.type_code, attribute.value
    entry = PACKERS.get(type(attribute))
    if entry is None:
        raise LocalProtocolError(f"{type(attribute).__name__} is not a STUN attribute class")
    return entry[0], entry[1](attribute, transaction_id)
