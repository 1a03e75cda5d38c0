"""Message framing (RFC 8489 §5, §6, §14.5-14.7): exact bytes in, exact bytes or errors out."""

from __future__ import annotations

import dataclasses
import hmac
import re
import struct
import zlib
from contextlib import AbstractContextManager
from typing import cast

import pytest

from wavesync_proto.errors import LocalProtocolError
from wavesync_proto.stun import (
    BINDING,
    HEADER_LENGTH,
    MAGIC_COOKIE,
    Attribute,
    ErrorCode,
    Fingerprint,
    Message,
    MessageClass,
    MessageIntegrity,
    MessageIntegritySha256,
    RawAttribute,
    Software,
    StunDecodeError,
    Username,
    XorMappedAddress,
    decode_message,
    encode_message,
    new_transaction_id,
    peek_header,
    stream_message_length,
    verify_integrity,
    verify_integrity_sha256,
)

from . import rfc5769

TID = bytes(range(1, 13))
KEY = b"swordfish"


def header(message_type: int, length: int, *, cookie: int = MAGIC_COOKIE) -> bytes:
    return struct.pack("!HHI", message_type, length, cookie) + TID


def attribute(attribute_type: int, value: bytes) -> bytes:
    return struct.pack("!HH", attribute_type, len(value)) + value + b"\x00" * (-len(value) % 4)


def framed(message_type: int, *attributes: bytes) -> bytes:
    body = b"".join(attributes)
    return header(message_type, len(body)) + body


def decode_error(text: str) -> AbstractContextManager[pytest.ExceptionInfo[StunDecodeError]]:
    return pytest.raises(StunDecodeError, match=f"^{re.escape(text)}$")


def local_error(text: str) -> AbstractContextManager[pytest.ExceptionInfo[LocalProtocolError]]:
    return pytest.raises(LocalProtocolError, match=f"^{re.escape(text)}$")


def request(*attributes: Attribute, method: int = BINDING) -> Message:
    return Message(
        message_class=MessageClass.REQUEST, method=method, transaction_id=TID, attributes=attributes
    )


# --- header: method and class bit interleaving ------------------------------------------------


@pytest.mark.parametrize(
    ("message_class", "method", "message_type"),
    [
        (MessageClass.REQUEST, BINDING, 0x0001),
        (MessageClass.SUCCESS, BINDING, 0x0101),
        (MessageClass.ERROR, BINDING, 0x0111),
        (MessageClass.INDICATION, BINDING, 0x0011),
        (MessageClass.REQUEST, 0x000, 0x0000),
        (MessageClass.REQUEST, 0xFFF, 0x3EEF),
        (MessageClass.ERROR, 0xFFF, 0x3FFF),
        (MessageClass.INDICATION, 0x00F, 0x001F),
        # M4..M6 skip over C0 (bit 4); M7..M11 skip over C1 (bit 8).
        (MessageClass.REQUEST, 0x010, 0x0020),
        (MessageClass.REQUEST, 0x070, 0x00E0),
        (MessageClass.REQUEST, 0x080, 0x0200),
        (MessageClass.SUCCESS, 0xF80, 0x3F00),
        (MessageClass.SUCCESS, 0x003, 0x0103),  # TURN Allocate success (RFC 8656)
    ],
)
def test_message_type_interleaves_method_and_class(
    message_class: MessageClass, method: int, message_type: int
) -> None:
    message = Message(message_class=message_class, method=method, transaction_id=TID)
    data = encode_message(message)
    assert data == header(message_type, 0)
    decoded = decode_message(data)
    assert decoded.message_class is message_class
    assert decoded.method == method
    assert decoded == message


def test_encoded_header_layout() -> None:
    data = encode_message(request(Software("ab")))
    assert data == bytes.fromhex("0001 0008 2112a442") + TID + bytes.fromhex("8022 0002 6162 0000")
    assert len(data) == HEADER_LENGTH + 8


def test_padding_uses_pad_byte() -> None:
    message = request(Software("a"), Software("abcd"), Software("abcdef"))
    assert encode_message(message, pad_byte=b"\xee") == framed(
        0x0001,
        bytes.fromhex("8022 0001 61 eeeeee"),
        bytes.fromhex("8022 0004 61626364"),
        bytes.fromhex("8022 0006 616263646566 eeee"),
    )


# --- decode: framing errors -----------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 19])
def test_decode_too_short(size: int) -> None:
    with decode_error(f"message is {size} bytes, shorter than the 20-byte header"):
        decode_message(header(0x0001, 0)[:size])


@pytest.mark.parametrize("message_type", [0x4001, 0x8001, 0xC001])
def test_decode_leading_bits_set(message_type: int) -> None:
    with decode_error("the two leading bits of a STUN message must be zero"):
        decode_message(header(message_type, 0))


def test_decode_wrong_magic_cookie() -> None:
    with decode_error("magic cookie is 0x2112a443, not 0x2112a442"):
        decode_message(header(0x0001, 0, cookie=0x2112A443))


@pytest.mark.parametrize("length", [1, 2, 3, 6])
def test_decode_length_not_multiple_of_four(length: int) -> None:
    with decode_error(f"message length {length} is not a multiple of 4"):
        decode_message(header(0x0001, length) + b"\x00" * length)


def test_decode_length_longer_than_message() -> None:
    with decode_error("header says 8 bytes of attributes, the message has 4"):
        decode_message(header(0x0001, 8) + attribute(0x8022, b""))


def test_decode_trailing_bytes_after_message() -> None:
    with decode_error("header says 0 bytes of attributes, the message has 4"):
        decode_message(header(0x0001, 0) + b"\x00\x00\x00\x00")


def test_decode_attribute_value_overruns() -> None:
    data = header(0x0001, 8) + bytes.fromhex("8022 000c 61626364")
    with decode_error("attribute 0x8022 at byte 20 claims 12 bytes, only 4 remain"):
        decode_message(data)


def test_decode_second_attribute_overruns() -> None:
    data = framed(0x0001, attribute(0x8022, b"abcd"), bytes.fromhex("0006 0005 61626364"))
    with decode_error("attribute 0x0006 at byte 28 claims 5 bytes, only 4 remain"):
        decode_message(data)


def test_decode_attribute_after_fingerprint() -> None:
    fingerprinted = encode_message(request(), fingerprint=True)
    data = fingerprinted + attribute(0x8022, b"late")
    data = data[:2] + struct.pack("!H", len(data) - HEADER_LENGTH) + data[4:]
    with decode_error("attribute 0x8022 follows FINGERPRINT, which must be last"):
        decode_message(data)


def test_decode_fingerprint_mismatch() -> None:
    data = encode_message(request(Software("x")), fingerprint=True)
    broken = data[:-4] + struct.pack("!I", int.from_bytes(data[-4:], "big") ^ 1)
    with decode_error("FINGERPRINT does not match the message") as info:
        decode_message(broken)
    # A bad FINGERPRINT means "not STUN": nothing to answer.
    assert info.value.error_code_hint is None


def test_framing_errors_hint_400() -> None:
    with pytest.raises(StunDecodeError) as info:
        decode_message(header(0x0001, 4))
    assert info.value.error_code_hint == 400


def test_fingerprint_is_crc32_xor_stun() -> None:
    data = encode_message(request(Software("x")), fingerprint=True)
    covered = data[:-8]
    assert covered[2:4] == struct.pack("!H", len(data) - HEADER_LENGTH)
    expected = zlib.crc32(covered) ^ 0x5354554E
    assert data[-8:] == struct.pack("!HHI", 0x8028, 4, expected)
    assert decode_message(data).get(Fingerprint) == Fingerprint(expected)


# --- integrity -----------------------------------------------------------------------------


def test_message_integrity_is_hmac_sha1_over_adjusted_header() -> None:
    data = encode_message(request(Username("alice")), integrity_key=KEY)
    body = attribute(0x0006, b"alice")
    covered = header(0x0001, len(body) + 24) + body
    assert data == covered + attribute(0x0008, hmac.digest(KEY, covered, "sha1"))
    assert verify_integrity(decode_message(data), KEY)
    assert not verify_integrity(decode_message(data), KEY + b"!")


def test_message_integrity_sha256_is_computed_and_verified() -> None:
    data = encode_message(request(Username("alice")), integrity_sha256_key=KEY)
    body = attribute(0x0006, b"alice")
    covered = header(0x0001, len(body) + 36) + body
    assert data == covered + attribute(0x001C, hmac.digest(KEY, covered, "sha256"))
    decoded = decode_message(data)
    assert verify_integrity_sha256(decoded, KEY)
    assert not verify_integrity_sha256(decoded, b"other")
    assert not verify_integrity(decoded, KEY)  # no SHA-1 integrity in it


def test_truncated_message_integrity_sha256_verifies() -> None:
    # RFC 8489 §14.6 allows the HMAC truncated to 16 bytes; build one by hand.
    body = attribute(0x8022, b"agent")
    covered = header(0x0001, len(body) + 4 + 16) + body
    truncated = hmac.digest(KEY, covered, "sha256")[:16]
    data = covered + attribute(0x001C, truncated)
    decoded = decode_message(data)
    assert decoded.attributes == (Software("agent"), MessageIntegritySha256(truncated))
    assert verify_integrity_sha256(decoded, KEY)
    assert not verify_integrity_sha256(decoded, KEY[:-1])
    tampered = data[:-1] + bytes([data[-1] ^ 0x80])
    assert not verify_integrity_sha256(decode_message(tampered), KEY)


def test_all_three_trailing_attributes_in_order() -> None:
    sha256_key = b"another key"
    data = encode_message(
        request(Software("s")), integrity_key=KEY, integrity_sha256_key=sha256_key, fingerprint=True
    )
    decoded = decode_message(data)
    types = [type(a) for a in decoded.attributes]
    assert types == [Software, MessageIntegrity, MessageIntegritySha256, Fingerprint]
    assert verify_integrity(decoded, KEY)
    assert verify_integrity_sha256(decoded, sha256_key)
    # MESSAGE-INTEGRITY-SHA256 covers MESSAGE-INTEGRITY (RFC 8489 §14.6).
    sha256_offset = HEADER_LENGTH + 8 + 24
    covered = (
        data[:2] + struct.pack("!H", sha256_offset + 36 - HEADER_LENGTH) + data[4:sha256_offset]
    )
    assert data[sha256_offset + 4 : sha256_offset + 36] == hmac.digest(
        sha256_key, covered, "sha256"
    )


def _append(data: bytes, *attributes: bytes) -> bytes:
    """Append raw attributes to an encoded message and fix its length field."""
    data += b"".join(attributes)
    return data[:2] + struct.pack("!H", len(data) - HEADER_LENGTH) + data[4:]


def test_attributes_after_message_integrity_are_ignored() -> None:
    secured = encode_message(request(Username("bob")), integrity_key=KEY)
    data = _append(secured, attribute(0x8022, b"late"), attribute(0x0006, b"mallory"))
    decoded = decode_message(data)
    assert [type(a) for a in decoded.attributes] == [Username, MessageIntegrity]
    assert decoded.get(Username) == Username("bob")
    # The HMAC covers only what precedes it, so it still verifies.
    assert verify_integrity(decoded, KEY)


def test_ignored_attributes_are_not_parsed() -> None:
    secured = encode_message(request(), integrity_key=KEY)
    # A broken USERNAME (invalid UTF-8) after MESSAGE-INTEGRITY is skipped, not an error.
    data = _append(secured, attribute(0x0006, b"\xff\xfe"))
    assert [type(a) for a in decode_message(data).attributes] == [MessageIntegrity]


def test_sha256_and_fingerprint_after_message_integrity_are_kept() -> None:
    secured = encode_message(request(Username("bob")), integrity_key=KEY)
    with_ignored = _append(secured, attribute(0x8022, b"ignored"))
    # Hand-compute MESSAGE-INTEGRITY-SHA256 and FINGERPRINT over the bytes before each.
    offset = len(with_ignored)
    sha_covered = (
        with_ignored[:2] + struct.pack("!H", offset + 36 - HEADER_LENGTH) + with_ignored[4:]
    )
    with_sha = _append(with_ignored, attribute(0x001C, hmac.digest(KEY, sha_covered, "sha256")))
    fp_covered = with_sha[:2] + struct.pack("!H", len(with_sha) + 8 - HEADER_LENGTH) + with_sha[4:]
    crc = zlib.crc32(fp_covered) ^ 0x5354554E
    data = _append(with_sha, attribute(0x8028, struct.pack("!I", crc)))
    decoded = decode_message(data)
    types = [type(a) for a in decoded.attributes]
    assert types == [Username, MessageIntegrity, MessageIntegritySha256, Fingerprint]
    assert decoded.get(Fingerprint) == Fingerprint(crc)
    assert verify_integrity(decoded, KEY)
    assert verify_integrity_sha256(decoded, KEY)


def test_only_fingerprint_counts_after_message_integrity_sha256() -> None:
    secured = encode_message(request(), integrity_sha256_key=KEY)
    data = _append(secured, attribute(0x0008, bytes(20)), attribute(0x8022, b"late"))
    decoded = decode_message(data)
    assert [type(a) for a in decoded.attributes] == [MessageIntegritySha256]
    assert not verify_integrity(decoded, KEY)
    assert verify_integrity_sha256(decoded, KEY)


def test_verify_is_false_without_the_attribute() -> None:
    decoded = decode_message(encode_message(request(Software("x")), fingerprint=True))
    assert not verify_integrity(decoded, KEY)
    assert not verify_integrity_sha256(decoded, KEY)


def test_verify_is_false_on_a_constructed_message() -> None:
    # Correct HMACs, but a constructed message has no wire bytes to check them against.
    decoded = decode_message(encode_message(request(), integrity_key=KEY, integrity_sha256_key=KEY))
    constructed = request(*decoded.attributes)
    assert constructed == decoded
    assert verify_integrity(decoded, KEY)
    assert verify_integrity_sha256(decoded, KEY)
    assert not verify_integrity(constructed, KEY)
    assert not verify_integrity_sha256(constructed, KEY)


# --- encode errors -------------------------------------------------------------------------


def test_encode_method_too_large() -> None:
    with local_error("method 0x1000 does not fit in 12 bits"):
        encode_message(request(method=0x1000))


@pytest.mark.parametrize("size", [0, 11, 13])
def test_encode_transaction_id_not_twelve_bytes(size: int) -> None:
    message = Message(
        message_class=MessageClass.REQUEST, method=BINDING, transaction_id=bytes(size)
    )
    with local_error(f"transaction id must be 12 bytes, not {size}"):
        encode_message(message)


@pytest.mark.parametrize("pad_byte", [b"", b"  "])
def test_encode_pad_byte_not_one_byte(pad_byte: bytes) -> None:
    with local_error("pad_byte must be exactly one byte"):
        encode_message(request(Software("x")), pad_byte=pad_byte)


@pytest.mark.parametrize(
    "trailing",
    [MessageIntegrity(bytes(20)), MessageIntegritySha256(bytes(32)), Fingerprint(0)],
)
@pytest.mark.parametrize(
    "options",
    [{"integrity_key": KEY}, {"integrity_sha256_key": KEY}, {"fingerprint": True}],
)
def test_encode_keys_for_an_already_secured_message(
    trailing: Attribute, options: dict[str, bytes | bool]
) -> None:
    message = request(Software("x"), trailing)
    with local_error(
        "message already carries integrity or FINGERPRINT attributes; "
        "pass keys only for a message without them"
    ):
        encode_message(message, **options)  # type: ignore[arg-type]


def test_encode_rejects_a_non_attribute_object() -> None:
    with local_error("object is not a STUN attribute class"):
        encode_message(request(cast(Attribute, object())))


def test_encode_rejects_an_attribute_subclass_outside_the_table() -> None:
    class Homemade(Attribute):
        TYPE = 0x8FFF

    with local_error("Homemade is not a STUN attribute class"):
        encode_message(request(Homemade()))


def test_encode_rejects_oversized_message_and_attribute() -> None:
    with local_error("message exceeds the 65535-byte STUN length field"):
        encode_message(request(*[RawAttribute(0x8FFF, bytes(1020))] * 64))
    with local_error("attribute 0x8fff value exceeds 65535 bytes"):
        encode_message(request(RawAttribute(0x8FFF, bytes(0x10000))))


# --- peek_header and stream_message_length --------------------------------------------------


def test_peek_header() -> None:
    assert peek_header(header(0x0111, 0)) == (MessageClass.ERROR, BINDING, TID)
    # Only the header matters: broken attributes still let a responder answer 400.
    assert peek_header(header(0x0001, 8) + b"\xff") == (MessageClass.REQUEST, BINDING, TID)
    assert peek_header(header(0x0001, 0)[:19]) is None
    assert peek_header(header(0x4001, 0)) is None
    assert peek_header(header(0x0001, 0, cookie=0)) is None
    assert peek_header(header(0x0001, 2)) is None


def test_stream_message_length() -> None:
    data = rfc5769.SAMPLE_REQUEST
    assert stream_message_length(b"") is None
    assert stream_message_length(data[:19]) is None
    assert stream_message_length(data[:20]) == 108 == len(data)
    assert stream_message_length(bytearray(data + data)) == len(data)
    assert stream_message_length(header(0x0001, 0xFFFC)) == 20 + 0xFFFC


def test_stream_message_length_rejects_garbage() -> None:
    with decode_error("the two leading bits of a STUN message must be zero"):
        stream_message_length(b"GET / HTTP/1.1\r\nHost: x\r\n")
    with decode_error("magic cookie is 0x00000000, not 0x2112a442"):
        stream_message_length(header(0x0001, 0, cookie=0))
    with decode_error("message length 5 is not a multiple of 4"):
        stream_message_length(header(0x0001, 5))


def test_stream_message_length_rejects_garbage_before_a_whole_header() -> None:
    # A peer speaking another protocol is refused on its first short write.
    with decode_error("the two leading bits of a STUN message must be zero"):
        stream_message_length(b"G")
    with decode_error("bytes 4..5 are not the magic cookie"):
        stream_message_length(header(0x0001, 0, cookie=0)[:6])
    # Every proper prefix of a real header is still just "not yet".
    data = rfc5769.SAMPLE_REQUEST
    assert all(stream_message_length(data[:n]) is None for n in range(20))


# --- responses, transaction ids, accessors --------------------------------------------------


def test_success_response() -> None:
    mapped = XorMappedAddress(("192.0.2.1", 32853))
    response = request(Software("client")).success_response(mapped)
    assert response == Message(
        message_class=MessageClass.SUCCESS,
        method=BINDING,
        transaction_id=TID,
        attributes=(mapped,),
    )


def test_error_response() -> None:
    response = request(method=0x003).error_response(401, "Unauthorized", Software("srv"))
    assert response == Message(
        message_class=MessageClass.ERROR,
        method=0x003,
        transaction_id=TID,
        attributes=(ErrorCode(401, "Unauthorized"), Software("srv")),
    )
    assert response.error_code == ErrorCode(401, "Unauthorized")
    assert encode_message(response) == framed(
        0x0113,
        bytes.fromhex("0009 0010 00000401") + b"Unauthorized",
        attribute(0x8022, b"srv"),
    )


@pytest.mark.parametrize(
    "message_class", [MessageClass.INDICATION, MessageClass.SUCCESS, MessageClass.ERROR]
)
def test_response_to_a_non_request(message_class: MessageClass) -> None:
    message = Message(message_class=message_class, method=BINDING, transaction_id=TID)
    text = f"only a request has a response, not a {message_class.name}"
    with local_error(text):
        message.success_response()
    with local_error(text):
        message.error_response(400, "Bad Request")


def test_new_transaction_id_uses_the_injected_source() -> None:
    requested: list[int] = []

    def source(size: int) -> bytes:
        requested.append(size)
        return bytes(range(100, 100 + size))

    assert new_transaction_id(source) == bytes(range(100, 112))
    assert requested == [12]


def test_new_transaction_id_rejects_a_short_source() -> None:
    with local_error("the random source returned the wrong number of bytes"):
        new_transaction_id(lambda size: bytes(size - 1))


def test_new_transaction_id_default_source() -> None:
    assert len(new_transaction_id()) == 12


def test_get_and_get_all() -> None:
    message = request(Software("one"), Username("u"), Software("two"), Software("three"))
    assert message.get(Software) == Software("one")
    assert message.get(Username) == Username("u")
    assert message.get(ErrorCode) is None
    assert message.error_code is None
    assert message.get_all(Software) == [Software("one"), Software("two"), Software("three")]
    assert message.get_all(Username) == [Username("u")]
    assert message.get_all(ErrorCode) == []


@pytest.mark.parametrize("wrap", [bytearray, memoryview])
def test_buffer_input_decodes_like_bytes(wrap: type[bytearray] | type[memoryview]) -> None:
    data = rfc5769.SAMPLE_REQUEST
    decoded = decode_message(wrap(data))
    assert decoded == decode_message(data)
    assert verify_integrity(decoded, rfc5769.SAMPLE_REQUEST_PASSWORD.encode())
    assert encode_message(decoded, pad_byte=b" ") == data


def test_a_copy_with_other_attributes_does_not_inherit_the_verified_bytes() -> None:
    # Regression: dataclasses.replace() used to carry the decoded wire bytes along, so
    # verify_integrity vouched for a USERNAME that was never signed.
    decoded = decode_message(rfc5769.SAMPLE_REQUEST)
    key = rfc5769.SAMPLE_REQUEST_PASSWORD.encode()
    assert verify_integrity(decoded, key)
    forged = dataclasses.replace(
        decoded,
        attributes=tuple(
            Username("mallory") if isinstance(a, Username) else a for a in decoded.attributes
        ),
    )
    assert not verify_integrity(forged, key)
    assert not verify_integrity(dataclasses.replace(decoded, attributes=()), key)
