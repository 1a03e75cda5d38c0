"""RFC 3489 ("classic STUN") Binding requests, answered for backward compatibility.

RFC 8489 §12 asks a server to answer a Binding request without the magic
cookie — sent by an RFC 3489 client such as Debian's ``stun`` — with
MAPPED-ADDRESS, copying the cookie field back as part of a 128-bit transaction
id. This module owns that framing only; ``responder.py`` decides the answer.
It does not implement RFC 3489's other behaviours (RESPONSE-ADDRESS
redirection, answering from another address), and refuses requests for them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .attributes import MAGIC_COOKIE
from .errors import StunDecodeError
from .message import HEADER_LENGTH

__all__ = [
    "CHANGE_REQUEST",
    "RESPONSE_ADDRESS",
    "ClassicRequest",
    "encode_classic_response",
    "parse_classic_binding_request",
]

# RFC 3489 §11.2 attribute types that only classic clients send.
RESPONSE_ADDRESS = 0x0002
CHANGE_REQUEST = 0x0003

_CLASSIC_BINDING_REQUEST = 0x0001
_CLASSIC_BINDING_RESPONSE = 0x0101
_CLASSIC_BINDING_ERROR = 0x0111
_HEADER = struct.Struct("!HHI")
_ATTRIBUTE_HEADER = struct.Struct("!HH")


@dataclass(frozen=True, kw_only=True)
class ClassicRequest:
    """A well-framed RFC 3489 Binding request."""

    #: 16 bytes: the 128-bit RFC 3489 transaction id (what RFC 8489 calls cookie + id).
    transaction_id: bytes
    #: ``(type, value)`` pairs in wire order.
    attributes: tuple[tuple[int, bytes], ...]


def parse_classic_binding_request(data: bytes) -> ClassicRequest | None:
    """The request, if ``data`` is an RFC 3489 Binding request; ``None`` if it is not one.

    Raises ``StunDecodeError`` when the header is a classic Binding request but
    the attributes do not fit in it.
    """
    if len(data) < HEADER_LENGTH:
        return None
    message_type, length, cookie = _HEADER.unpack_from(data)
    if message_type != _CLASSIC_BINDING_REQUEST or cookie == MAGIC_COOKIE:
        return None
    if length & 3 or HEADER_LENGTH + length != len(data):
        return None
    attributes: list[tuple[int, bytes]] = []
    position = HEADER_LENGTH
    while position < len(data):
        attribute_type, value_length = _ATTRIBUTE_HEADER.unpack_from(data, position)
        end = position + 4 + value_length
        if end > len(data):
            raise StunDecodeError(
                f"classic attribute 0x{attribute_type:04x} at byte {position} overruns the message"
            )
        attributes.append((attribute_type, bytes(data[position + 4 : end])))
        # RFC 3489 values are multiples of 4; tolerate padding anyway, as RFC 5389 peers send it.
        position = position + 4 + ((value_length + 3) & ~3)
    return ClassicRequest(transaction_id=bytes(data[4:20]), attributes=tuple(attributes))


def encode_classic_response(
    request: ClassicRequest, attributes: list[tuple[int, bytes]], *, error: bool = False
) -> bytes:
    """A classic Binding success (or error) response echoing the 128-bit transaction id."""
    body = b"".join(
        _ATTRIBUTE_HEADER.pack(attribute_type, len(value)) + value + b"\x00" * (-len(value) % 4)
        for attribute_type, value in attributes
    )
    message_type = _CLASSIC_BINDING_ERROR if error else _CLASSIC_BINDING_RESPONSE
    return struct.pack("!HH", message_type, len(body)) + request.transaction_id + body
