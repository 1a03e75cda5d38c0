"""Attribute values (RFC 8489 §14), one by one: exact bytes both ways and every error text."""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import ClassVar

import pytest

from wavesync_proto.addresses import format_endpoint, parse_endpoint
from wavesync_proto.errors import LocalProtocolError
from wavesync_proto.stun import (
    AlternateDomain,
    AlternateServer,
    Attribute,
    ErrorCode,
    Fingerprint,
    MappedAddress,
    Message,
    MessageClass,
    MessageIntegrity,
    MessageIntegritySha256,
    Nonce,
    PasswordAlgorithm,
    PasswordAlgorithms,
    RawAttribute,
    Realm,
    Software,
    StunDecodeError,
    UnknownAttributes,
    Userhash,
    Username,
    XorMappedAddress,
    attribute_codecs,
    decode_message,
    encode_message,
    is_comprehension_required,
)
from wavesync_proto.stun.attribute_codecs import (
    pack_attribute_value,
    register_attribute,
    unpack_attribute_value,
)

TID = bytes(range(12))  # 000102030405060708090a0b


def decode_error(text: str) -> AbstractContextManager[pytest.ExceptionInfo[StunDecodeError]]:
    return pytest.raises(StunDecodeError, match=f"^{re.escape(text)}$")


def local_error(text: str) -> AbstractContextManager[pytest.ExceptionInfo[LocalProtocolError]]:
    return pytest.raises(LocalProtocolError, match=f"^{re.escape(text)}$")


def assert_round_trip(attribute: Attribute, wire_type: int, value: bytes) -> None:
    assert pack_attribute_value(attribute, TID) == (wire_type, value)
    assert unpack_attribute_value(wire_type, value, TID) == attribute
    assert attribute.wire_type == wire_type


def in_message(attribute_type: int, value: bytes) -> bytes:
    """A Binding request carrying one raw attribute, zero-padded."""
    body = struct.pack("!HH", attribute_type, len(value)) + value + b"\x00" * (-len(value) % 4)
    return struct.pack("!HHI", 0x0001, len(body), 0x2112A442) + TID + body


# --- addresses ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "wire_type"),
    [(MappedAddress, 0x0001), (AlternateServer, 0x8023)],
)
def test_plain_address_round_trip(
    cls: type[MappedAddress | AlternateServer], wire_type: int
) -> None:
    assert_round_trip(cls(("192.0.2.1", 3478)), wire_type, bytes.fromhex("0001 0d96 c0000201"))
    assert_round_trip(
        cls(("2001:db8::1", 65535)),
        wire_type,
        bytes.fromhex("0002 ffff 20010db8000000000000000000000001"),
    )


def test_xor_mapped_address_ipv4_by_hand() -> None:
    # port 3478 = 0x0d96 ^ 0x2112 = 0x2c84; 10.0.0.1 = 0x0a000001 ^ 0x2112a442 = 0x2b12a443
    assert_round_trip(
        XorMappedAddress(("10.0.0.1", 3478)), 0x0020, bytes.fromhex("0001 2c84 2b12a443")
    )


def test_xor_mapped_address_ipv6_by_hand() -> None:
    # port 443 = 0x01bb ^ 0x2112 = 0x20a9; the address is xored with cookie || transaction id:
    #   20010db8 00000000 00000000 00000001
    # ^ 2112a442 00010203 04050607 08090a0b
    # = 0113a9fa 00010203 04050607 08090a0a
    assert_round_trip(
        XorMappedAddress(("2001:db8::1", 443)),
        0x0020,
        bytes.fromhex("0002 20a9 0113a9fa000102030405060708090a0a"),
    )


def test_xor_mapped_address_ipv6_depends_on_transaction_id() -> None:
    value = bytes.fromhex("0002 20a9 0113a9fa000102030405060708090a0a")
    other = unpack_attribute_value(0x0020, value, bytes(12))
    assert other == XorMappedAddress(("2001:db8:1:203:405:607:809:a0a", 443))


ADDRESS_TYPES = [
    pytest.param(0x0001, "MAPPED-ADDRESS", id="mapped"),
    pytest.param(0x0020, "XOR-MAPPED-ADDRESS", id="xor-mapped"),
    pytest.param(0x8023, "ALTERNATE-SERVER", id="alternate-server"),
]


@pytest.mark.parametrize(("wire_type", "name"), ADDRESS_TYPES)
@pytest.mark.parametrize("size", [0, 3])
def test_address_too_short(wire_type: int, name: str, size: int) -> None:
    with decode_error(f"{name} is {size} bytes, shorter than its 4-byte header"):
        unpack_attribute_value(wire_type, bytes.fromhex("00010d96")[:size], TID)


@pytest.mark.parametrize(("wire_type", "name"), ADDRESS_TYPES)
@pytest.mark.parametrize("family", [0x00, 0x03, 0xFF])
def test_address_unknown_family(wire_type: int, name: str, family: int) -> None:
    with decode_error(f"{name} has unknown address family 0x{family:02x}"):
        unpack_attribute_value(wire_type, bytes((0, family, 0, 1)) + bytes(4), TID)


@pytest.mark.parametrize(("wire_type", "name"), ADDRESS_TYPES)
@pytest.mark.parametrize("size", [4, 7, 12, 20])
def test_ipv4_address_wrong_length(wire_type: int, name: str, size: int) -> None:
    value = bytes.fromhex("0001 0d96") + bytes(size - 4)
    with decode_error(f"{name} with IPv4 family must be 8 bytes, not {size}"):
        unpack_attribute_value(wire_type, value, TID)


@pytest.mark.parametrize(("wire_type", "name"), ADDRESS_TYPES)
@pytest.mark.parametrize("size", [8, 16, 24])
def test_ipv6_address_wrong_length(wire_type: int, name: str, size: int) -> None:
    value = bytes.fromhex("0002 0d96") + bytes(size - 4)
    with decode_error(f"{name} with IPv6 family must be 20 bytes, not {size}"):
        unpack_attribute_value(wire_type, value, TID)


def test_address_errors_surface_from_decode_message() -> None:
    with decode_error("XOR-MAPPED-ADDRESS has unknown address family 0x03"):
        decode_message(in_message(0x0020, bytes.fromhex("0003 0d96 00000000")))


@pytest.mark.parametrize(
    ("attribute", "text"),
    [
        (MappedAddress(("192.0.2.1", 65536)), "MAPPED-ADDRESS port 65536 is outside 0..65535"),
        (XorMappedAddress(("::1", -1)), "XOR-MAPPED-ADDRESS port -1 is outside 0..65535"),
        (AlternateServer(("example.org", 1)), "not an IP address: 'example.org'"),
    ],
)
def test_address_encode_errors(attribute: Attribute, text: str) -> None:
    with local_error(text):
        pack_attribute_value(attribute, TID)


# --- ERROR-CODE -----------------------------------------------------------------------------


def test_error_code_round_trip() -> None:
    assert_round_trip(
        ErrorCode(420, "Unknown Attribute"),
        0x0009,
        bytes.fromhex("0000 0414") + b"Unknown Attribute",
    )
    assert_round_trip(ErrorCode(300, ""), 0x0009, bytes.fromhex("0000 0300"))
    assert_round_trip(ErrorCode(699, "x"), 0x0009, bytes.fromhex("0000 0663") + b"x")


def test_error_code_ignores_reserved_bits() -> None:
    value = bytes.fromhex("ffff fc26") + b"Stale Nonce"  # class 4 under 21 reserved one-bits
    assert unpack_attribute_value(0x0009, value, TID) == ErrorCode(438, "Stale Nonce")


@pytest.mark.parametrize("error_class", [0, 2, 7])
def test_error_code_class_outside_range(error_class: int) -> None:
    with decode_error(f"ERROR-CODE class {error_class} is outside 3..6"):
        unpack_attribute_value(0x0009, bytes((0, 0, error_class, 0)), TID)


@pytest.mark.parametrize("number", [100, 255])
def test_error_code_number_too_large(number: int) -> None:
    with decode_error(f"ERROR-CODE number {number} is outside 0..99"):
        unpack_attribute_value(0x0009, bytes((0, 0, 4, number)), TID)


def test_error_code_too_short() -> None:
    with decode_error("ERROR-CODE is 3 bytes, shorter than its 4-byte header"):
        unpack_attribute_value(0x0009, bytes((0, 0, 4)), TID)


@pytest.mark.parametrize("code", [0, 299, 700, 1000])
def test_error_code_encode_outside_range(code: int) -> None:
    with local_error(f"ERROR-CODE {code} is outside 300..699"):
        pack_attribute_value(ErrorCode(code, "x"), TID)


def test_error_code_reason_decode_limit() -> None:
    header = bytes.fromhex("0000 0400")
    # 763 bytes decode: RFC 8489 §14.8 allows that much on receipt.
    longest = "\u00e9" * 381 + "a"
    assert unpack_attribute_value(0x0009, header + longest.encode(), TID) == ErrorCode(400, longest)
    with decode_error("ERROR-CODE reason is 764 bytes, more than the 763 allowed"):
        unpack_attribute_value(0x0009, header + b"a" * 764, TID)


def test_error_code_reason_encode_limit() -> None:
    assert pack_attribute_value(ErrorCode(500, "r" * 127), TID) == (
        0x0009,
        bytes.fromhex("0000 0500") + b"r" * 127,
    )
    with local_error("ERROR-CODE reason must be fewer than 128 characters"):
        pack_attribute_value(ErrorCode(500, "r" * 128), TID)


def test_error_code_reason_not_utf8() -> None:
    with decode_error("ERROR-CODE reason is not valid UTF-8 (byte 1)"):
        unpack_attribute_value(0x0009, bytes.fromhex("0000 0400 41ff"), TID)


# --- text attributes ------------------------------------------------------------------------


TEXT_TYPES = [
    pytest.param(Realm, 0x0014, "REALM", id="realm"),
    pytest.param(Nonce, 0x0015, "NONCE", id="nonce"),
    pytest.param(Software, 0x8022, "SOFTWARE", id="software"),
]
AnyText = type[Realm | Nonce | Software]


@pytest.mark.parametrize(("cls", "wire_type", "name"), TEXT_TYPES)
def test_text_round_trip(cls: AnyText, wire_type: int, name: str) -> None:
    assert_round_trip(cls("wavesync 0.1"), wire_type, b"wavesync 0.1")
    assert_round_trip(cls(""), wire_type, b"")
    assert_round_trip(cls("\u00e9\u4e2d\U0001f600"), wire_type, "\u00e9\u4e2d\U0001f600".encode())


@pytest.mark.parametrize(("cls", "wire_type", "name"), TEXT_TYPES)
def test_text_character_limit(cls: AnyText, wire_type: int, name: str) -> None:
    # 127 four-byte characters are 508 bytes: within both limits.
    assert pack_attribute_value(cls("\U0001f600" * 127), TID) == (
        wire_type,
        "\U0001f600".encode() * 127,
    )
    with local_error(f"{name} must be fewer than 128 characters"):
        pack_attribute_value(cls("a" * 128), TID)


@pytest.mark.parametrize(("cls", "wire_type", "name"), TEXT_TYPES)
def test_text_decode_byte_limit(cls: AnyText, wire_type: int, name: str) -> None:
    assert unpack_attribute_value(wire_type, b"a" * 763, TID) == cls("a" * 763)
    with decode_error(f"{name} is 764 bytes, more than the 763 allowed"):
        unpack_attribute_value(wire_type, b"a" * 764, TID)


@pytest.mark.parametrize(("cls", "wire_type", "name"), TEXT_TYPES)
@pytest.mark.parametrize(
    ("value", "position"), [(b"\xff", 0), (b"ab\xc3", 2), (b"a\xed\xa0\x80", 1)]
)
def test_text_not_utf8(
    cls: AnyText, wire_type: int, name: str, value: bytes, position: int
) -> None:
    with decode_error(f"{name} is not valid UTF-8 (byte {position})"):
        unpack_attribute_value(wire_type, value, TID)


def test_text_not_encodable() -> None:
    with local_error("SOFTWARE is not encodable as UTF-8"):
        pack_attribute_value(Software("lone \ud800 surrogate"), TID)
    with local_error("USERNAME is not encodable as UTF-8"):
        pack_attribute_value(Username("\udfff"), TID)


def test_username_byte_limit() -> None:
    longest = "\u00e9" * 254  # 508 bytes, and many more than 127 characters
    assert_round_trip(Username(longest), 0x0006, longest.encode())
    assert_round_trip(Username("u" * 508), 0x0006, b"u" * 508)
    with local_error("USERNAME is 509 bytes, more than 508"):
        pack_attribute_value(Username("u" * 509), TID)
    with decode_error("USERNAME is 509 bytes, more than the 508 allowed"):
        unpack_attribute_value(0x0006, b"u" * 509, TID)


def test_alternate_domain_byte_limit() -> None:
    assert_round_trip(AlternateDomain("d" * 255), 0x8003, b"d" * 255)
    with local_error("ALTERNATE-DOMAIN is 256 bytes, more than 255"):
        pack_attribute_value(AlternateDomain("d" * 256), TID)
    with decode_error("ALTERNATE-DOMAIN is 256 bytes, more than the 255 allowed"):
        unpack_attribute_value(0x8003, b"d" * 256, TID)


# --- UNKNOWN-ATTRIBUTES, PASSWORD-ALGORITHM(S), USERHASH --------------------------------------


def test_unknown_attributes_round_trip() -> None:
    assert_round_trip(UnknownAttributes((0x0024, 0x8029)), 0x000A, bytes.fromhex("0024 8029"))
    assert_round_trip(UnknownAttributes((0x0024,)), 0x000A, bytes.fromhex("0024"))
    assert_round_trip(UnknownAttributes(()), 0x000A, b"")


@pytest.mark.parametrize("size", [1, 3, 5])
def test_unknown_attributes_odd_length(size: int) -> None:
    with decode_error(f"UNKNOWN-ATTRIBUTES length {size} is odd"):
        unpack_attribute_value(0x000A, bytes(size), TID)


def test_unknown_attributes_type_outside_range() -> None:
    with local_error("attribute type 65536 is outside 0..0xFFFF"):
        pack_attribute_value(UnknownAttributes((1, 0x10000)), TID)


def test_password_algorithms_round_trip_with_padded_parameters() -> None:
    attribute = PasswordAlgorithms(((2, b""), (0x8001, b"\xaa"), (1, b"12345")))
    value = bytes.fromhex("0002 0000  8001 0001 aa000000  0001 0005 3132333435000000")
    assert_round_trip(attribute, 0x8002, value)
    assert_round_trip(PasswordAlgorithms(()), 0x8002, b"")


def test_password_algorithms_unpadded_last_entry_is_accepted() -> None:
    value = bytes.fromhex("0001 0000 0002 0001 aa")
    assert unpack_attribute_value(0x8002, value, TID) == PasswordAlgorithms(
        ((1, b""), (2, b"\xaa"))
    )


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("0001 00", "entry at byte 0 is truncated"),
        ("0001 0000 0002", "entry at byte 4 is truncated"),
        ("0001 0008 aabb", "entry at byte 0 claims 8 parameter bytes, only 2 remain"),
        ("0001 0000 0002 0005 aabbccdd", "entry at byte 4 claims 5 parameter bytes, only 4 remain"),
    ],
)
def test_password_algorithms_truncated(value: str, text: str) -> None:
    with decode_error(f"PASSWORD-ALGORITHMS {text}"):
        unpack_attribute_value(0x8002, bytes.fromhex(value), TID)
    # PASSWORD-ALGORITHM shares the entry format and its errors.
    with decode_error(f"PASSWORD-ALGORITHM {text}"):
        unpack_attribute_value(0x001D, bytes.fromhex(value), TID)


def test_password_algorithm_round_trip() -> None:
    assert_round_trip(PasswordAlgorithm(2), 0x001D, bytes.fromhex("0002 0000"))
    assert_round_trip(
        PasswordAlgorithm(1, b"\x01\x02\x03"), 0x001D, bytes.fromhex("0001 0003 01020300")
    )


@pytest.mark.parametrize(("value", "count"), [("", 0), ("0001 0000 0002 0000", 2)])
def test_password_algorithm_needs_exactly_one_entry(value: str, count: int) -> None:
    with decode_error(f"PASSWORD-ALGORITHM holds {count} entries instead of one"):
        unpack_attribute_value(0x001D, bytes.fromhex(value), TID)


def test_password_algorithm_encode_errors() -> None:
    with local_error("password algorithm 65536 is outside 0..0xFFFF"):
        pack_attribute_value(PasswordAlgorithm(0x10000), TID)
    with local_error("password algorithm parameters exceed 65535 bytes"):
        pack_attribute_value(PasswordAlgorithms(((1, bytes(0x10000)),)), TID)


def test_userhash() -> None:
    assert_round_trip(Userhash(bytes(range(32))), 0x001E, bytes(range(32)))
    for size in (0, 31, 33):
        with decode_error(f"USERHASH must be 32 bytes, not {size}"):
            unpack_attribute_value(0x001E, bytes(size), TID)
        with local_error(f"USERHASH must be 32 bytes, not {size}"):
            pack_attribute_value(Userhash(bytes(size)), TID)


# --- integrity and fingerprint values --------------------------------------------------------


def test_message_integrity_length() -> None:
    assert_round_trip(MessageIntegrity(bytes(range(20))), 0x0008, bytes(range(20)))
    for size in (0, 19, 21, 32):
        with decode_error(f"MESSAGE-INTEGRITY must be 20 bytes, not {size}"):
            unpack_attribute_value(0x0008, bytes(size), TID)
        with local_error(f"MESSAGE-INTEGRITY must be 20 bytes, not {size}"):
            pack_attribute_value(MessageIntegrity(bytes(size)), TID)


@pytest.mark.parametrize("size", [16, 20, 24, 28, 32])
def test_message_integrity_sha256_valid_lengths(size: int) -> None:
    assert_round_trip(MessageIntegritySha256(bytes(range(size))), 0x001C, bytes(range(size)))


@pytest.mark.parametrize("size", [0, 12, 15, 18, 33, 36])
def test_message_integrity_sha256_invalid_lengths(size: int) -> None:
    with decode_error(f"MESSAGE-INTEGRITY-SHA256 must be 16..32 bytes in steps of 4, not {size}"):
        unpack_attribute_value(0x001C, bytes(size), TID)
    with local_error("MESSAGE-INTEGRITY-SHA256 must be 16..32 bytes in steps of 4"):
        pack_attribute_value(MessageIntegritySha256(bytes(size)), TID)


def test_fingerprint_value() -> None:
    assert_round_trip(Fingerprint(0xE57A3BCF), 0x8028, bytes.fromhex("e57a3bcf"))
    for size in (0, 3, 5, 8):
        with decode_error(f"FINGERPRINT must be 4 bytes, not {size}"):
            unpack_attribute_value(0x8028, bytes(size), TID)
    for crc in (-1, 1 << 32):
        with local_error("FINGERPRINT must fit in 32 bits"):
            pack_attribute_value(Fingerprint(crc), TID)


# --- unknown attributes ---------------------------------------------------------------------


@pytest.mark.parametrize("wire_type", [0x8000, 0x8029, 0xC057, 0xFFFF])
@pytest.mark.parametrize("value", [b"", b"\x01", b"\x01\x02\x03", b"\x00" * 4, bytes(range(9))])
def test_unknown_optional_attribute_kept_byte_for_byte(wire_type: int, value: bytes) -> None:
    raw = RawAttribute(wire_type, value)
    assert unpack_attribute_value(wire_type, value, TID) == raw
    assert pack_attribute_value(raw, TID) == (wire_type, value)
    message = Message(
        message_class=MessageClass.INDICATION,
        method=0x001,
        transaction_id=TID,
        attributes=(raw, Software("after")),
    )
    data = encode_message(message)
    padding = b"\x00" * (-len(value) % 4)
    body = struct.pack("!HH", wire_type, len(value)) + value + padding
    body += bytes.fromhex("8022 0005") + b"after\x00\x00\x00"
    assert data == struct.pack("!HHI", 0x0011, len(body), 0x2112A442) + TID + body
    decoded = decode_message(data)
    assert decoded == message
    assert decoded.unknown_comprehension_required == ()


def test_raw_attribute_type_outside_range() -> None:
    with local_error("attribute type 65536 is outside 0..0xFFFF"):
        pack_attribute_value(RawAttribute(0x10000, b""), TID)


def test_comprehension_ranges() -> None:
    assert is_comprehension_required(0x0000)
    assert is_comprehension_required(0x7FFF)
    assert not is_comprehension_required(0x8000)
    assert not is_comprehension_required(0xFFFF)


# --- endpoints ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "endpoint"),
    [
        ("192.0.2.1:3478", ("192.0.2.1", 3478)),
        ("[2001:db8::1]:443", ("2001:db8::1", 443)),
        ("[::1]:0", ("::1", 0)),
        ("stun.example.org:65535", ("stun.example.org", 65535)),
    ],
)
def test_parse_endpoint(text: str, endpoint: tuple[str, int]) -> None:
    assert parse_endpoint(text) == endpoint
    assert format_endpoint(endpoint) == text


def test_parse_endpoint_default_port() -> None:
    assert parse_endpoint("192.0.2.1", default_port=3478) == ("192.0.2.1", 3478)
    assert parse_endpoint("[2001:db8::1]", default_port=3478) == ("2001:db8::1", 3478)
    assert parse_endpoint("192.0.2.1:1", default_port=3478) == ("192.0.2.1", 1)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("192.0.2.1", "missing ':PORT' in address '192.0.2.1'"),
        ("[::1]", "missing ':PORT' in address '[::1]'"),
        ("192.0.2.1:", "port must be a number in 0..65535, not ''"),
        ("192.0.2.1:http", "port must be a number in 0..65535, not 'http'"),
        ("192.0.2.1:65536", "port must be a number in 0..65535, not '65536'"),
        ("192.0.2.1:-1", "port must be a number in 0..65535, not '-1'"),
        ("192.0.2.1:\u0661\u0662", "port must be a number in 0..65535, not '\u0661\u0662'"),
        ("[::1]:x", "port must be a number in 0..65535, not 'x'"),
        ("[::1:80", "unbalanced '[' in address '[::1:80'"),
        ("[::1]80", "expected ':PORT' after ']' in address '[::1]80'"),
        ("2001:db8::1:80", "write IPv6 addresses as [ADDRESS]:PORT, not '2001:db8::1:80'"),
        (":80", "missing host in address ':80'"),
        ("[]:80", "missing host in address '[]:80'"),
    ],
)
def test_parse_endpoint_errors(text: str, message: str) -> None:
    with local_error(message):
        parse_endpoint(text)


def test_format_endpoint() -> None:
    assert format_endpoint(("192.0.2.1", 32853)) == "192.0.2.1:32853"
    assert format_endpoint(("2001:db8::1", 5)) == "[2001:db8::1]:5"


# --- register_attribute --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Example(Attribute):
    TYPE: ClassVar[int] = 0xC0DE
    value: bytes


def _unpack_example(value: bytes, transaction_id: bytes) -> Attribute:
    return _Example(value)


def _pack_example(attribute: Attribute, transaction_id: bytes) -> bytes:
    assert isinstance(attribute, _Example)
    return attribute.value


@pytest.fixture
def codec_table() -> Iterator[None]:
    """Registration is process-wide: put the table back so other tests see the stock one."""
    unpackers, packers = dict(attribute_codecs.UNPACKERS), dict(attribute_codecs.PACKERS)
    yield
    attribute_codecs.UNPACKERS.clear()
    attribute_codecs.UNPACKERS.update(unpackers)
    attribute_codecs.PACKERS.clear()
    attribute_codecs.PACKERS.update(packers)


@pytest.mark.usefixtures("codec_table")
def test_registered_attributes_join_the_codec() -> None:
    register_attribute(_Example, 0xC0DE, _unpack_example, _pack_example)
    message = Message(
        message_class=MessageClass.INDICATION,
        method=0x108,
        transaction_id=TID,
        attributes=(_Example(b"abc"),),
    )
    assert decode_message(encode_message(message)) == message


@pytest.mark.usefixtures("codec_table")
@pytest.mark.parametrize(
    ("cls", "type_code", "error"),
    [
        (_Example, 0x0020, "attribute type 0x0020 is already registered"),
        (Software, 0xC0DF, "Software is already registered"),
        (_Example, 0x10000, "outside 0..0xFFFF"),
    ],
)
def test_registration_clashes_are_refused(cls: type[Attribute], type_code: int, error: str) -> None:
    with pytest.raises(LocalProtocolError, match=error):
        register_attribute(cls, type_code, _unpack_example, _pack_example)
