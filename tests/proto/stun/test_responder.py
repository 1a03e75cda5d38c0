"""BindingResponder: what is answered, what gets an error, what gets silence."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wavesync_proto.errors import LocalProtocolError
from wavesync_proto.stun import (
    BINDING,
    MAX_RESPONSE_LENGTH,
    BindingResponder,
    ErrorCode,
    Fingerprint,
    Message,
    MessageClass,
    RawAttribute,
    Software,
    UnknownAttributes,
    Username,
    XorMappedAddress,
    decode_message,
    encode_message,
)

TID = b"responder-tx"
# Attribute types nothing in wavesync registers, not even the mediator's 0x4001..
# and 0xC001.. (registration is process-wide, so these tests must not collide).
UNASSIGNED_REQUIRED = 0x7E00
UNASSIGNED_OPTIONAL = 0xFE00


def request(*attributes: RawAttribute | Username, method: int = BINDING) -> Message:
    return Message(
        message_class=MessageClass.REQUEST, method=method, transaction_id=TID, attributes=attributes
    )


def answer(responder: BindingResponder, data: bytes, source: tuple[str, int]) -> Message:
    response = responder.handle_request(data, source)
    assert response is not None
    assert len(response) <= MAX_RESPONSE_LENGTH
    return decode_message(response)


@pytest.mark.parametrize("source", [("192.0.2.7", 40000), ("2001:db8::7", 65535)])
def test_binding_success_reports_the_source_address(source: tuple[str, int]) -> None:
    responder = BindingResponder(software="test responder")
    response = answer(responder, encode_message(request()), source)
    assert response == Message(
        message_class=MessageClass.SUCCESS,
        method=BINDING,
        transaction_id=TID,
        attributes=(XorMappedAddress(source), Software("test responder")),
    )
    assert responder.counters.answered == 1


def test_fingerprint_in_the_request_gets_fingerprint_in_the_response() -> None:
    responder = BindingResponder(software=None)
    response = answer(responder, encode_message(request(), fingerprint=True), ("192.0.2.1", 1))
    assert [type(a) for a in response.attributes] == [XorMappedAddress, Fingerprint]


def test_unknown_comprehension_required_attributes_get_420() -> None:
    responder = BindingResponder(software=None)
    data = encode_message(
        request(
            RawAttribute(UNASSIGNED_REQUIRED, b"x"), RawAttribute(UNASSIGNED_OPTIONAL, b"optional")
        )
    )
    response = answer(responder, data, ("192.0.2.1", 1))
    assert response.message_class is MessageClass.ERROR
    assert response.attributes == (
        ErrorCode(420, "Unknown Attribute"),
        UnknownAttributes((UNASSIGNED_REQUIRED,)),
    )
    assert responder.counters.unknown_attributes == 1


def test_the_420_list_is_capped_to_keep_the_answer_small() -> None:
    responder = BindingResponder()
    many = tuple(RawAttribute(UNASSIGNED_REQUIRED + i, b"") for i in range(200))
    response = answer(responder, encode_message(request(*many)), ("2001:db8::1", 1))
    listed = response.get(UnknownAttributes)
    assert listed is not None
    assert listed.types == tuple(range(UNASSIGNED_REQUIRED, UNASSIGNED_REQUIRED + 16))


def test_a_request_with_broken_attributes_gets_400() -> None:
    data = bytearray(encode_message(request(Username("abc"))))
    data[24:27] = b"\xff\xfe\xfd"  # USERNAME is no longer UTF-8
    responder = BindingResponder(software=None)
    response = answer(responder, bytes(data), ("192.0.2.1", 1))
    assert response.attributes == (ErrorCode(400, "Bad Request"),)
    assert response.transaction_id == TID
    assert responder.counters.bad_requests == 1


def test_other_methods_get_400() -> None:
    response = answer(
        BindingResponder(software=None), encode_message(request(method=0x102)), ("192.0.2.1", 1)
    )
    assert response.method == 0x102
    assert response.attributes == (ErrorCode(400, "Unsupported Method"),)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"GET / HTTP/1.1\r\n\r\n",
        encode_message(request().success_response()),
        encode_message(request().error_response(401, "Unauthorized")),
        encode_message(
            Message(message_class=MessageClass.INDICATION, method=BINDING, transaction_id=TID)
        ),
    ],
    ids=["empty", "http", "success", "error", "indication"],
)
def test_silence_for_everything_that_is_not_a_request(data: bytes) -> None:
    responder = BindingResponder()
    assert responder.handle_request(data, ("192.0.2.1", 1)) is None
    assert responder.counters.ignored == 1


def test_respond_ignores_decoded_non_requests() -> None:
    responder = BindingResponder()
    assert responder.respond(request().success_response(), ("192.0.2.1", 1)) is None


def test_a_software_name_that_would_break_the_size_bound_is_refused() -> None:
    with pytest.raises(LocalProtocolError, match="would make responses exceed 128 bytes"):
        BindingResponder(software="x" * 40)


@pytest.mark.property
@given(data=st.binary(max_size=600), port=st.integers(min_value=0, max_value=65535))
def test_any_input_gets_silence_or_a_small_answer(data: bytes, port: int) -> None:
    response = BindingResponder().handle_request(data, ("2001:db8::1", port))
    if response is not None:
        assert len(response) <= MAX_RESPONSE_LENGTH
        assert decode_message(response).message_class in (MessageClass.SUCCESS, MessageClass.ERROR)


@pytest.mark.property
@given(
    types=st.lists(st.integers(min_value=0x0000, max_value=0xFFFF), max_size=60),
    fingerprint=st.booleans(),
)
def test_any_attribute_mix_gets_a_bounded_answer(types: list[int], fingerprint: bool) -> None:
    attributes = tuple(RawAttribute(t, b"") for t in types if t not in (0x0008, 0x001C, 0x8028))
    try:
        data = encode_message(request(*attributes), fingerprint=fingerprint)
    except LocalProtocolError:
        return
    response = BindingResponder().handle_request(data, ("2001:db8::1", 9))
    assert response is not None
    assert len(response) <= MAX_RESPONSE_LENGTH
