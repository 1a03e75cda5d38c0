"""Hypothesis properties of the STUN codec: round trips, robustness, integrity under bit flips.

``nox -s fuzz`` runs these with the ``fuzz`` profile's much larger example budget.
"""

from __future__ import annotations

import string
import struct
import zlib

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from wavesync_proto.stun import (
    HEADER_LENGTH,
    MAGIC_COOKIE,
    AlternateDomain,
    AlternateServer,
    Attribute,
    AttributeType,
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
    decode_message,
    encode_message,
    stream_message_length,
    verify_integrity,
    verify_integrity_sha256,
)
from wavesync_proto.stun.attribute_codecs import UNPACKERS

# Every type the codec interprets; a RawAttribute of one of these would decode as the typed class.
TABLE_TYPES = frozenset(
    value
    for name, value in vars(AttributeType).items()
    if not name.startswith("_") and isinstance(value, int)
)
FINGERPRINT_XOR = 0x5354554E

# --- strategies -----------------------------------------------------------------------------

u16 = st.integers(0, 0xFFFF)
endpoints = st.tuples(st.ip_addresses().map(str), u16)
# Realm, nonce, software, reason: fewer than 128 characters, which is at most 508 UTF-8 bytes.
short_text = st.text(max_size=127)
usernames = short_text | st.text(alphabet=string.printable, max_size=508)
domains = st.text(max_size=63) | st.text(alphabet=string.ascii_lowercase + ".-", max_size=255)
# Looked up at draw time: other protocols (the mediator) register attributes into the
# live table, and a snapshot taken at import would make this test order-dependent.
unknown_types = u16.filter(lambda t: t not in UNPACKERS)
table_or_any_type = st.sampled_from(sorted(TABLE_TYPES)) | u16
algorithm_entries = st.tuples(u16, st.binary(max_size=24))

ordinary_attributes: st.SearchStrategy[Attribute] = st.one_of(
    st.builds(MappedAddress, endpoints),
    st.builds(XorMappedAddress, endpoints),
    st.builds(AlternateServer, endpoints),
    st.builds(Username, usernames),
    st.builds(Userhash, st.binary(min_size=32, max_size=32)),
    st.builds(ErrorCode, st.integers(300, 699), short_text),
    st.builds(Realm, short_text),
    st.builds(Nonce, short_text),
    st.builds(Software, short_text),
    st.builds(AlternateDomain, domains),
    st.builds(PasswordAlgorithms, st.lists(algorithm_entries, max_size=4).map(tuple)),
    st.builds(PasswordAlgorithm, u16, st.binary(max_size=24)),
    st.builds(UnknownAttributes, st.lists(u16, max_size=8).map(tuple)),
    st.builds(RawAttribute, unknown_types, st.binary(max_size=48)),
)
sha256_hmacs = st.sampled_from([16, 20, 24, 28, 32]).flatmap(
    lambda size: st.binary(min_size=size, max_size=size)
)
keys = st.binary(max_size=64)


@st.composite
def messages(draw: st.DrawFn, *, with_integrity_values: bool = False) -> Message:
    """Any valid message; optionally ending in (arbitrary) integrity attribute values."""
    attributes = draw(st.lists(ordinary_attributes, max_size=8))
    if with_integrity_values:
        # These two may end a message in this order (RFC 8489 §14.5, §14.6); their values are
        # not checked on decode, only by verify_*. FINGERPRINT is, so it is not drawn here.
        if draw(st.booleans()):
            attributes.append(MessageIntegrity(draw(st.binary(min_size=20, max_size=20))))
        if draw(st.booleans()):
            attributes.append(MessageIntegritySha256(draw(sha256_hmacs)))
    return Message(
        message_class=draw(st.sampled_from(MessageClass)),
        method=draw(st.integers(0, 0xFFF)),
        transaction_id=draw(st.binary(min_size=12, max_size=12)),
        attributes=tuple(attributes),
    )


def _attribute_offsets(data: bytes) -> list[int]:
    """Offsets of the attribute headers of a well-formed encoded message."""
    offsets, position = [], HEADER_LENGTH
    while position < len(data):
        offsets.append(position)
        (length,) = struct.unpack_from("!H", data, position + 2)
        position += 4 + ((length + 3) & ~3)
    return offsets


@st.composite
def mutated_messages(draw: st.DrawFn) -> bytes:
    """A valid encoded message, damaged so that decoding gets past the header now and then."""
    if draw(st.booleans()):
        data = bytearray(encode_message(draw(messages(with_integrity_values=True))))
    else:
        secured = encode_message(
            draw(messages()),
            integrity_key=draw(st.none() | keys),
            integrity_sha256_key=draw(st.none() | keys),
            fingerprint=draw(st.booleans()),
        )
        data = bytearray(secured)
    offsets = _attribute_offsets(bytes(data))
    # Structural damage first, while the attribute offsets are still known: give an attribute
    # another type (every unpacker then sees foreign values) or another length.
    for _ in range(draw(st.integers(0, 3)) if offsets else 0):
        offset = draw(st.sampled_from(offsets))
        if draw(st.booleans()):
            new_type = draw(table_or_any_type)
            data[offset : offset + 2] = new_type.to_bytes(2, "big")
        else:
            data[offset + 2 : offset + 4] = draw(st.integers(0, 40) | u16).to_bytes(2, "big")
    # Then byte-level damage anywhere.
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["truncate", "overwrite", "insert", "delete"]))
        if kind == "truncate":
            del data[draw(st.integers(0, len(data))) :]
        elif kind == "overwrite" and data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        elif kind == "insert":
            position = draw(st.integers(0, len(data)))
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
        elif data:
            start = draw(st.integers(0, len(data) - 1))
            del data[start : start + draw(st.integers(1, 8))]
    # Usually repair the framing so the attribute parser, not the header check, gets the bytes.
    if len(data) >= HEADER_LENGTH and draw(st.integers(0, 3)):
        del data[len(data) - len(data) % 4 :]
        data[0] &= 0x3F
        data[2:4] = (len(data) - HEADER_LENGTH).to_bytes(2, "big")
        data[4:8] = MAGIC_COOKIE.to_bytes(4, "big")
    return bytes(data)


def _decode_or_none(data: bytes) -> Message | None:
    """Decode; StunDecodeError is the only acceptable failure (anything else propagates)."""
    try:
        message = decode_message(data)
    except StunDecodeError:
        event("rejected")
        return None
    event("decoded")
    # Verification of whatever decoded must not raise either.
    verify_integrity(message, b"key")
    verify_integrity_sha256(message, b"key")
    return message


# --- (1) round trips --------------------------------------------------------------------------


@pytest.mark.property
@given(messages(with_integrity_values=True), st.binary(min_size=1, max_size=1))
def test_decode_inverts_encode(message: Message, pad_byte: bytes) -> None:
    data = encode_message(message, pad_byte=pad_byte)
    assert len(data) % 4 == 0
    assert stream_message_length(data) == len(data)
    decoded = decode_message(data)
    assert decoded == message
    assert decoded.transaction_id == message.transaction_id
    # Decoded messages re-encode byte for byte.
    assert encode_message(decoded, pad_byte=pad_byte) == data


@pytest.mark.property
@given(
    messages(),
    st.none() | keys,
    st.none() | keys,
    st.booleans(),
)
def test_decode_inverts_secured_encode(
    message: Message,
    integrity_key: bytes | None,
    integrity_sha256_key: bytes | None,
    fingerprint: bool,
) -> None:
    data = encode_message(
        message,
        integrity_key=integrity_key,
        integrity_sha256_key=integrity_sha256_key,
        fingerprint=fingerprint,
    )
    decoded = decode_message(data)
    count = len(message.attributes)
    assert decoded.attributes[:count] == message.attributes
    trailing = [type(a) for a in decoded.attributes[count:]]
    expected: list[type[Attribute]] = []
    if integrity_key is not None:
        expected.append(MessageIntegrity)
    if integrity_sha256_key is not None:
        expected.append(MessageIntegritySha256)
    if fingerprint:
        expected.append(Fingerprint)
    assert trailing == expected
    assert verify_integrity(decoded, integrity_key or b"") is (integrity_key is not None)
    assert verify_integrity_sha256(decoded, integrity_sha256_key or b"") is (
        integrity_sha256_key is not None
    )
    if integrity_key is not None:
        assert not verify_integrity(decoded, integrity_key + b"!")
    if integrity_sha256_key is not None:
        assert not verify_integrity_sha256(decoded, integrity_sha256_key + b"!")
    assert encode_message(decoded) == data


@pytest.mark.property
@given(messages())
def test_fingerprint_option_matches_a_hand_computed_crc(message: Message) -> None:
    plain = encode_message(message)
    length = len(plain) - HEADER_LENGTH + 8
    covered = plain[:2] + length.to_bytes(2, "big") + plain[4:]
    crc = zlib.crc32(covered) ^ FINGERPRINT_XOR
    by_hand = Message(
        message_class=message.message_class,
        method=message.method,
        transaction_id=message.transaction_id,
        attributes=(*message.attributes, Fingerprint(crc)),
    )
    assert encode_message(message, fingerprint=True) == encode_message(by_hand)
    assert decode_message(encode_message(by_hand)) == by_hand


# --- (2) robustness -------------------------------------------------------------------------


@pytest.mark.property
@given(st.binary(max_size=256))
def test_decode_arbitrary_bytes_raises_only_stun_decode_error(data: bytes) -> None:
    _decode_or_none(data)


@pytest.mark.property
@given(st.binary(max_size=200))
def test_decode_arbitrary_body_raises_only_stun_decode_error(body: bytes) -> None:
    # Arbitrary bytes behind a valid header: the attribute framing sees all of them.
    body = body[: len(body) - len(body) % 4]
    header = struct.pack("!HHI", 0x0001, len(body), MAGIC_COOKIE) + bytes(12)
    _decode_or_none(header + body)


@pytest.mark.property
@given(st.lists(st.tuples(table_or_any_type, st.binary(max_size=40)), max_size=6))
def test_decode_arbitrary_attribute_values_raises_only_stun_decode_error(
    attributes: list[tuple[int, bytes]],
) -> None:
    # Well-framed attributes of known types with arbitrary values: every unpacker is exercised.
    body = b"".join(
        struct.pack("!HH", t, len(v)) + v + b"\x00" * (-len(v) % 4) for t, v in attributes
    )
    header = struct.pack("!HHI", 0x0001, len(body), MAGIC_COOKIE) + bytes(12)
    _decode_or_none(header + body)


@pytest.mark.property
@given(mutated_messages())
def test_decode_mutated_message_raises_only_stun_decode_error(data: bytes) -> None:
    _decode_or_none(data)


# --- (3) single bit flips -------------------------------------------------------------------


@pytest.mark.property
@given(messages(), st.none() | keys, st.data())
def test_bit_flip_breaks_fingerprint(
    message: Message, integrity_key: bytes | None, data: st.DataObject
) -> None:
    encoded = encode_message(message, integrity_key=integrity_key, fingerprint=True)
    bit = data.draw(st.integers(0, len(encoded) * 8 - 1), label="bit")
    flipped = bytearray(encoded)
    flipped[bit // 8] ^= 0x80 >> (bit % 8)
    try:
        decoded = decode_message(bytes(flipped))
    except StunDecodeError:
        return
    # CRC-32 catches every single-bit error, so a flip can only survive by making the
    # FINGERPRINT vanish: a new type in its header, or an earlier length swallowing it.
    assert bit >= HEADER_LENGTH * 8, "a flip in the header always breaks the CRC or the framing"
    assert decoded.get(Fingerprint) is None


@pytest.mark.property
@given(messages(), keys, st.data())
def test_bit_flip_breaks_message_integrity(
    message: Message, key: bytes, data: st.DataObject
) -> None:
    encoded = encode_message(message, integrity_key=key)
    assert verify_integrity(decode_message(encoded), key)
    bit = data.draw(st.integers(0, len(encoded) * 8 - 1), label="bit")
    flipped = bytearray(encoded)
    flipped[bit // 8] ^= 0x80 >> (bit % 8)
    try:
        decoded = decode_message(bytes(flipped))
    except StunDecodeError:
        return
    assert not verify_integrity(decoded, key)


# --- (4) stream framing -----------------------------------------------------------------------


@pytest.mark.property
@given(st.binary(max_size=64))
def test_stream_message_length_on_arbitrary_bytes(data: bytes) -> None:
    try:
        length = stream_message_length(data)
    except StunDecodeError:
        # Refused only if no STUN header starts with these bytes (checked on what is there).
        assert (
            data[0] & 0xC0
            or data[4:8] != MAGIC_COOKIE.to_bytes(4, "big")[: len(data[4:8])]
            or (len(data) >= HEADER_LENGTH and int.from_bytes(data[2:4], "big") % 4)
        )
        return
    # Accepted: the bytes so far are consistent with a STUN header.
    assert not data or not data[0] & 0xC0
    if len(data) < HEADER_LENGTH:
        assert length is None
    else:
        assert length == HEADER_LENGTH + int.from_bytes(data[2:4], "big")
        assert length % 4 == 0


@pytest.mark.property
@given(messages(), st.binary(max_size=64), st.data())
def test_stream_message_length_of_a_message_in_a_stream(
    message: Message, following: bytes, data: st.DataObject
) -> None:
    encoded = encode_message(message, fingerprint=True)
    stream = encoded + following
    received = data.draw(st.integers(0, len(stream)), label="received")
    length = stream_message_length(bytearray(stream[:received]))
    if received < HEADER_LENGTH:
        assert length is None
    else:
        assert length == len(encoded)
        if received >= len(encoded):
            assert decode_message(stream[:length]) == decode_message(encoded)
