"""RFC 3489 ("classic") Binding requests: framing and the responder's answers."""

from __future__ import annotations

import struct

import pytest

from wavesync_proto.stun import MAX_RESPONSE_LENGTH, BindingResponder
from wavesync_proto.stun.classic import (
    CHANGE_REQUEST,
    RESPONSE_ADDRESS,
    ClassicRequest,
    parse_classic_binding_request,
)

TID16 = bytes(range(100, 116))  # no magic cookie in the first four bytes


def classic_request(*attributes: tuple[int, bytes], message_type: int = 0x0001) -> bytes:
    body = b"".join(struct.pack("!HH", t, len(v)) + v for t, v in attributes)
    return struct.pack("!HH", message_type, len(body)) + TID16 + body


def test_parse_a_classic_request() -> None:
    data = classic_request((CHANGE_REQUEST, bytes(4)))
    assert parse_classic_binding_request(data) == ClassicRequest(
        transaction_id=TID16, attributes=((CHANGE_REQUEST, bytes(4)),)
    )


@pytest.mark.parametrize(
    "data",
    [
        b"",
        bytes(19),
        classic_request(message_type=0x0002),  # classic Shared Secret request
        classic_request()[:-1] + b"",  # shorter than the header
        struct.pack("!HH", 1, 4) + TID16,  # length says 4, nothing follows
        struct.pack("!HHI", 1, 0, 0x2112A442) + bytes(12),  # has the cookie: RFC 8489
    ],
    ids=["empty", "short", "other method", "truncated", "length mismatch", "modern"],
)
def test_what_is_not_a_classic_binding_request(data: bytes) -> None:
    assert parse_classic_binding_request(data) is None


def test_an_attribute_overrunning_the_message_is_an_error() -> None:
    data = struct.pack("!HH", 1, 4) + TID16 + struct.pack("!HH", 0x8022, 40)
    responder = BindingResponder()
    assert responder.handle_request(data, ("192.0.2.1", 1)) is None
    assert responder.counters.bad_requests == 1


def test_classic_clients_get_mapped_address_and_their_transaction_id() -> None:
    responder = BindingResponder(software="wavesync test")  # 13 bytes: padded to 16
    answer = responder.handle_request(classic_request(), ("192.0.2.9", 40123))
    assert answer == (
        struct.pack("!HH", 0x0101, 32)
        + TID16
        + struct.pack("!HHBBH", 0x0001, 8, 0, 1, 40123)
        + bytes((192, 0, 2, 9))
        + struct.pack("!HH", 0x8022, 16)
        + b"wavesync test   "
    )
    assert responder.counters.answered == 1


def test_change_request_without_a_change_is_a_plain_request() -> None:
    responder = BindingResponder(software=None)
    answer = responder.handle_request(classic_request((CHANGE_REQUEST, bytes(4))), ("192.0.2.9", 5))
    assert answer is not None
    assert answer[:2] == b"\x01\x01"


@pytest.mark.parametrize(
    ("attributes", "listed"),
    [
        (((CHANGE_REQUEST, bytes((0, 0, 0, 4))),), [CHANGE_REQUEST, CHANGE_REQUEST]),
        (((CHANGE_REQUEST, bytes((0, 0, 0, 2))),), [CHANGE_REQUEST, CHANGE_REQUEST]),
        (((RESPONSE_ADDRESS, bytes(8)),), [RESPONSE_ADDRESS, RESPONSE_ADDRESS]),
        (((0x0011, b""), (0x0012, b"")), [0x0011, 0x0012]),
    ],
    ids=["change ip", "change port", "response-address", "two unknown"],
)
def test_what_a_single_address_server_cannot_do_gets_420(
    attributes: tuple[tuple[int, bytes], ...], listed: list[int]
) -> None:
    responder = BindingResponder(software=None)
    answer = responder.handle_request(classic_request(*attributes), ("192.0.2.9", 5))
    assert answer is not None
    error_code = struct.pack("!HH", 0x0009, 21) + bytes((0, 0, 4, 20)) + b"Unknown Attribute"
    unknown = struct.pack(f"!HH{len(listed)}H", 0x000A, 2 * len(listed), *listed)
    body = error_code + b"\x00" * 3 + unknown
    assert answer == struct.pack("!HH", 0x0111, len(body)) + TID16 + body
    assert responder.counters.unknown_attributes == 1


def test_classic_answers_stay_within_the_bound() -> None:
    many = tuple((0x0010 + i, b"") for i in range(100))
    answer = BindingResponder().handle_request(classic_request(*many), ("2001:db8::1", 1))
    assert answer is not None
    assert len(answer) <= MAX_RESPONSE_LENGTH
