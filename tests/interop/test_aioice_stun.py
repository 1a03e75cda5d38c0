"""Interop with aioice's STUN codec (the ICE stack of aiortc), in both directions.

aioice is software nobody here wrote: if our bytes satisfy its parser and
integrity check, and its bytes satisfy ours, both readings of RFC 8489 agree.
"""

from __future__ import annotations

from aioice import stun as aioice_stun

from wavesync_proto.stun import (
    BINDING,
    BindingResponder,
    Fingerprint,
    Message,
    MessageClass,
    MessageIntegrity,
    RawAttribute,
    Software,
    Username,
    XorMappedAddress,
    decode_message,
    encode_message,
    short_term_key,
    verify_integrity,
)

PASSWORD = "interop-password"
KEY = short_term_key(PASSWORD)
TID = b"interop-tid!"


def test_we_decode_and_verify_an_aioice_ice_check() -> None:
    check = aioice_stun.Message(
        message_method=aioice_stun.Method.BINDING,
        message_class=aioice_stun.Class.REQUEST,
        transaction_id=TID,
    )
    check.attributes["USERNAME"] = "remote:local"
    check.attributes["PRIORITY"] = 0x6E0001FF
    check.attributes["ICE-CONTROLLING"] = 0x932FF9B151263B36
    check.add_message_integrity(KEY)

    message = decode_message(bytes(check))
    assert message.message_class is MessageClass.REQUEST
    assert message.method == BINDING
    assert message.transaction_id == TID
    assert message.get(Username) == Username("remote:local")
    assert RawAttribute(0x0024, (0x6E0001FF).to_bytes(4, "big")) in message.attributes
    assert message.get(MessageIntegrity) is not None
    assert message.get(Fingerprint) is not None
    assert verify_integrity(message, KEY)
    assert not verify_integrity(message, short_term_key("wrong"))


def test_aioice_decodes_and_verifies_our_signed_message() -> None:
    ours = Message(
        message_class=MessageClass.SUCCESS,
        method=BINDING,
        transaction_id=TID,
        attributes=(XorMappedAddress(("2001:db8::5", 6000)), Software("wavesync")),
    )
    parsed = aioice_stun.parse_message(encode_message(ours, integrity_key=KEY, fingerprint=True))
    assert parsed.message_class == aioice_stun.Class.RESPONSE
    assert parsed.transaction_id == TID
    assert parsed.attributes["XOR-MAPPED-ADDRESS"] == ("2001:db8::5", 6000)
    assert parsed.attributes["SOFTWARE"] == "wavesync"
    assert parsed.check_message_integrity(KEY)


def test_aioice_reads_our_binding_responders_answer() -> None:
    request = aioice_stun.Message(
        message_method=aioice_stun.Method.BINDING,
        message_class=aioice_stun.Class.REQUEST,
        transaction_id=TID,
    )
    request.add_fingerprint()
    answer = BindingResponder().handle_request(bytes(request), ("198.51.100.4", 54321))
    assert answer is not None
    parsed = aioice_stun.parse_message(answer)  # checks our FINGERPRINT too
    assert parsed.message_class == aioice_stun.Class.RESPONSE
    assert parsed.transaction_id == TID
    assert parsed.attributes["XOR-MAPPED-ADDRESS"] == ("198.51.100.4", 54321)
