"""The RFC 5769 §2 test vectors: decode, verify, re-encode and re-compute each one.

Re-encoding a decoded vector must give the RFC bytes back (the integrity
attributes are written as they were received); re-computing strips them and
lets ``encode_message`` produce MESSAGE-INTEGRITY and FINGERPRINT itself,
which must again give the RFC bytes.
"""

from __future__ import annotations

import hashlib

import pytest

from wavesync_proto.stun import (
    BINDING,
    Attribute,
    Fingerprint,
    Message,
    MessageClass,
    MessageIntegrity,
    Nonce,
    RawAttribute,
    Realm,
    Software,
    StunDecodeError,
    Username,
    XorMappedAddress,
    decode_message,
    encode_message,
    long_term_key,
    short_term_key,
    verify_integrity,
    verify_integrity_sha256,
)

from . import rfc5769

# RFC 5769 §2.1-2.3 share one transaction id; §2.4 has its own.
SHARED_TRANSACTION_ID = bytes.fromhex("b7e7a701bc34d686fa87dfae")
LONG_TERM_TRANSACTION_ID = bytes.fromhex("78ad3433c6ad72c029da412e")

SHORT_TERM_VECTORS = [
    pytest.param(rfc5769.SAMPLE_REQUEST, rfc5769.SAMPLE_REQUEST_PASSWORD, id="2.1-request"),
    pytest.param(rfc5769.SAMPLE_IPV4_RESPONSE, rfc5769.RESPONSE_PASSWORD, id="2.2-ipv4-response"),
    pytest.param(rfc5769.SAMPLE_IPV6_RESPONSE, rfc5769.RESPONSE_PASSWORD, id="2.3-ipv6-response"),
]


def _without_trailing(message: Message) -> Message:
    """The message as a sender builds it, before integrity and FINGERPRINT are added."""
    return Message(
        message_class=message.message_class,
        method=message.method,
        transaction_id=message.transaction_id,
        attributes=tuple(
            a for a in message.attributes if not isinstance(a, MessageIntegrity | Fingerprint)
        ),
    )


def _long_term_key() -> bytes:
    return long_term_key(
        rfc5769.LONG_TERM_USERNAME, rfc5769.LONG_TERM_REALM, rfc5769.LONG_TERM_PASSWORD
    )


# --- 2.1 sample request ---------------------------------------------------------------------


def test_sample_request_decodes() -> None:
    message = decode_message(rfc5769.SAMPLE_REQUEST)
    assert message.message_class is MessageClass.REQUEST
    assert message.method == BINDING
    assert message.transaction_id == SHARED_TRANSACTION_ID
    assert message.attributes == (
        Software("STUN test client"),
        RawAttribute(0x0024, bytes.fromhex("6e0001ff")),
        RawAttribute(0x8029, bytes.fromhex("932ff9b151263b36")),
        Username("evtj:h6vY"),
        MessageIntegrity(bytes.fromhex("9aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a2")),
        Fingerprint(0xE57A3BCF),
    )


def test_sample_request_reports_priority_as_unknown_comprehension_required() -> None:
    message = decode_message(rfc5769.SAMPLE_REQUEST)
    # PRIORITY (0x0024) is comprehension-required and ICE's, not ours; ICE-CONTROLLED
    # (0x8029) is comprehension-optional, so it must not be reported.
    priority, ice_controlled = message.attributes[1], message.attributes[2]
    assert type(priority) is RawAttribute
    assert type(ice_controlled) is RawAttribute
    assert priority.wire_type == 0x0024
    assert ice_controlled.wire_type == 0x8029
    assert message.unknown_comprehension_required == (0x0024,)


# --- 2.2 and 2.3 sample responses -----------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "address"),
    [
        pytest.param(rfc5769.SAMPLE_IPV4_RESPONSE, ("192.0.2.1", 32853), id="2.2-ipv4"),
        pytest.param(
            rfc5769.SAMPLE_IPV6_RESPONSE,
            ("2001:db8:1234:5678:11:2233:4455:6677", 32853),
            id="2.3-ipv6",
        ),
    ],
)
def test_sample_response_decodes(data: bytes, address: tuple[str, int]) -> None:
    message = decode_message(data)
    assert message.message_class is MessageClass.SUCCESS
    assert message.method == BINDING
    assert message.transaction_id == SHARED_TRANSACTION_ID
    assert message.attributes[:2] == (Software("test vector"), XorMappedAddress(address))
    assert message.get(XorMappedAddress) == XorMappedAddress(address)
    # The HMAC and the CRC are the values of the last two attributes, read back exactly.
    assert message.attributes[2:] == (
        MessageIntegrity(data[-28:-8]),
        Fingerprint(int.from_bytes(data[-4:], "big")),
    )
    assert message.unknown_comprehension_required == ()


def test_sample_responses_hold_the_rfc_hmacs_and_crcs() -> None:
    ipv4 = decode_message(rfc5769.SAMPLE_IPV4_RESPONSE)
    ipv6 = decode_message(rfc5769.SAMPLE_IPV6_RESPONSE)
    assert ipv4.get(MessageIntegrity) == MessageIntegrity(
        bytes.fromhex("2b91f599fd9e90c38c7489f92af9ba53f06be7d7")
    )
    assert ipv4.get(Fingerprint) == Fingerprint(0xC07D4C96)
    assert ipv6.get(MessageIntegrity) == MessageIntegrity(
        bytes.fromhex("a382954e4be67bf11784c97c8292c275bfe3ed41")
    )
    assert ipv6.get(Fingerprint) == Fingerprint(0xC8FB0B4C)


# --- 2.1-2.3: integrity, fingerprint, re-encoding --------------------------------------------


@pytest.mark.parametrize(("data", "password"), SHORT_TERM_VECTORS)
def test_short_term_vector_integrity_verifies(data: bytes, password: str) -> None:
    message = decode_message(data)
    assert verify_integrity(message, short_term_key(password))
    # No MESSAGE-INTEGRITY-SHA256 in RFC 5769 vectors.
    assert not verify_integrity_sha256(message, short_term_key(password))


@pytest.mark.parametrize(("data", "password"), SHORT_TERM_VECTORS)
def test_short_term_vector_rejects_wrong_password(data: bytes, password: str) -> None:
    message = decode_message(data)
    assert not verify_integrity(message, short_term_key(password + "x"))
    assert not verify_integrity(message, short_term_key(password[:-1]))
    assert not verify_integrity(message, b"")


@pytest.mark.parametrize(("data", "password"), SHORT_TERM_VECTORS)
def test_short_term_vector_fingerprint_is_checked(data: bytes, password: str) -> None:
    # decode_message checks FINGERPRINT itself: the vector decodes, a wrong CRC does not.
    assert decode_message(data).get(Fingerprint) is not None
    corrupted = data[:-1] + bytes([data[-1] ^ 0x01])
    with pytest.raises(StunDecodeError, match=r"^FINGERPRINT does not match the message$"):
        decode_message(corrupted)


@pytest.mark.parametrize(("data", "password"), SHORT_TERM_VECTORS)
def test_short_term_vector_reencodes_byte_for_byte(data: bytes, password: str) -> None:
    # The RFC pads with spaces; padding content is the sender's choice (RFC 8489 §14).
    assert encode_message(decode_message(data), pad_byte=b" ") == data


@pytest.mark.parametrize(("data", "password"), SHORT_TERM_VECTORS)
def test_short_term_vector_recomputes(data: bytes, password: str) -> None:
    stripped = _without_trailing(decode_message(data))
    assert len(stripped.attributes) == len(decode_message(data).attributes) - 2
    recomputed = encode_message(
        stripped, integrity_key=short_term_key(password), fingerprint=True, pad_byte=b" "
    )
    assert recomputed == data


@pytest.mark.parametrize(("data", "password"), SHORT_TERM_VECTORS)
def test_short_term_vector_recomputed_with_zero_padding_still_verifies(
    data: bytes, password: str
) -> None:
    # Zero padding changes the bytes (and so the HMAC and CRC) but not the message.
    stripped = _without_trailing(decode_message(data))
    key = short_term_key(password)
    recomputed = encode_message(stripped, integrity_key=key, fingerprint=True)
    assert recomputed != data
    assert len(recomputed) == len(data)
    decoded = decode_message(recomputed)
    assert verify_integrity(decoded, key)
    assert _without_trailing(decoded) == stripped


# --- 2.4 long-term credentials ----------------------------------------------------------------


def test_long_term_request_decodes() -> None:
    message = decode_message(rfc5769.SAMPLE_LONG_TERM_REQUEST)
    assert message.message_class is MessageClass.REQUEST
    assert message.method == BINDING
    assert message.transaction_id == LONG_TERM_TRANSACTION_ID
    assert message.attributes == (
        Username("\u30de\u30c8\u30ea\u30c3\u30af\u30b9"),
        Nonce("f//499k954d6OL34oL9FSTvy64sA"),
        Realm("example.org"),
        MessageIntegrity(bytes.fromhex("f67024656dd64a3e02b8e0712e85c9a28ca89666")),
    )
    assert message.get(Username) == Username(rfc5769.LONG_TERM_USERNAME)
    assert message.get(Nonce) == Nonce(rfc5769.LONG_TERM_NONCE)
    assert message.get(Realm) == Realm(rfc5769.LONG_TERM_REALM)
    assert message.get(Fingerprint) is None


def test_long_term_key_needs_saslprep_of_the_password() -> None:
    # RFC 5769 §2.4: the password "The<U+00AD>M<U+00AA>tr<U+2168>" is "TheMatrIX" prepared.
    material = "\u30de\u30c8\u30ea\u30c3\u30af\u30b9:example.org:TheMatrIX".encode()
    assert _long_term_key() == hashlib.md5(material, usedforsecurity=False).digest()
    unprepared = ":".join(
        (rfc5769.LONG_TERM_USERNAME, rfc5769.LONG_TERM_REALM, rfc5769.LONG_TERM_PASSWORD)
    ).encode()
    unprepared_key = hashlib.md5(unprepared, usedforsecurity=False).digest()
    message = decode_message(rfc5769.SAMPLE_LONG_TERM_REQUEST)
    assert verify_integrity(message, _long_term_key())
    assert not verify_integrity(message, unprepared_key)


def test_long_term_request_rejects_wrong_password() -> None:
    message = decode_message(rfc5769.SAMPLE_LONG_TERM_REQUEST)
    wrong = long_term_key(rfc5769.LONG_TERM_USERNAME, rfc5769.LONG_TERM_REALM, "TheMatrix")
    assert not verify_integrity(message, wrong)
    assert not verify_integrity(message, short_term_key(rfc5769.LONG_TERM_PASSWORD))


def test_long_term_request_reencodes_byte_for_byte() -> None:
    data = rfc5769.SAMPLE_LONG_TERM_REQUEST
    assert encode_message(decode_message(data)) == data
    # Its padding is zeros, so space padding must not reproduce it.
    assert encode_message(decode_message(data), pad_byte=b" ") != data


def test_long_term_request_recomputes() -> None:
    stripped = _without_trailing(decode_message(rfc5769.SAMPLE_LONG_TERM_REQUEST))
    built = Message(
        message_class=MessageClass.REQUEST,
        method=BINDING,
        transaction_id=LONG_TERM_TRANSACTION_ID,
        attributes=(
            Username(rfc5769.LONG_TERM_USERNAME),
            Nonce(rfc5769.LONG_TERM_NONCE),
            Realm(rfc5769.LONG_TERM_REALM),
        ),
    )
    assert stripped == built
    # The vector has no FINGERPRINT, only MESSAGE-INTEGRITY.
    assert encode_message(built, integrity_key=_long_term_key()) == rfc5769.SAMPLE_LONG_TERM_REQUEST


def test_sample_request_built_from_scratch() -> None:
    attributes: tuple[Attribute, ...] = (
        Software("STUN test client"),
        RawAttribute(0x0024, bytes.fromhex("6e0001ff")),
        RawAttribute(0x8029, bytes.fromhex("932ff9b151263b36")),
        Username("evtj:h6vY"),
    )
    message = Message(
        message_class=MessageClass.REQUEST,
        method=BINDING,
        transaction_id=SHARED_TRANSACTION_ID,
        attributes=attributes,
    )
    encoded = encode_message(
        message,
        integrity_key=short_term_key(rfc5769.SAMPLE_REQUEST_PASSWORD),
        fingerprint=True,
        pad_byte=b" ",
    )
    assert encoded == rfc5769.SAMPLE_REQUEST
