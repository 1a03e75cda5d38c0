"""A STUN Binding responder (RFC 8489 §6.3, §7.3): request + source address -> response bytes.

This module owns what a server answers to a Binding request, including which
bad requests get an error and which get silence. It does not know sockets:
the adapter hands in the bytes and the source address it observed, and sends
back whatever comes out (UDP or TCP alike).

It never answers a response or an indication, never answers bytes that are not
a STUN request, and never answers with more than ``MAX_RESPONSE_LENGTH`` bytes,
so it cannot be used to amplify a spoofed-source flood.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .. import __version__
from ..addresses import Endpoint
from ..errors import LocalProtocolError
from .attribute_codecs import pack_attribute_value
from .attributes import (
    Attribute,
    AttributeType,
    Fingerprint,
    MappedAddress,
    Software,
    UnknownAttributes,
    XorMappedAddress,
    is_comprehension_required,
)
from .classic import (
    CHANGE_REQUEST,
    ClassicRequest,
    encode_classic_response,
    parse_classic_binding_request,
)
from .errors import StunDecodeError
from .message import BINDING, Message, MessageClass, decode_message, encode_message, peek_header

__all__ = ["DEFAULT_SOFTWARE", "MAX_RESPONSE_LENGTH", "BindingResponder", "ResponderCounters"]

DEFAULT_SOFTWARE = f"wavesync {__version__}"
# The largest answer: a 20-byte request can get at most 6.4x its size back. The
# largest answers are a 420 listing 16 types and a success carrying an IPv6 address,
# both with SOFTWARE and FINGERPRINT; the default SOFTWARE keeps them at 112 and 72 bytes.
MAX_RESPONSE_LENGTH = 128
# UNKNOWN-ATTRIBUTES lists at most this many types; the rest are dropped to stay small.
_MAX_UNKNOWN_LISTED = 16
# Classic attributes a plain Binding answer can honour: CHANGE-REQUEST (only with no
# change flag set), USERNAME and MESSAGE-INTEGRITY (ignored: classic STUN has no
# shared-secret exchange here, and the answer reveals only the sender's own address).
_CLASSIC_UNDERSTOOD = frozenset(
    (CHANGE_REQUEST, AttributeType.USERNAME, AttributeType.MESSAGE_INTEGRITY)
)
_NO_CHANGE = bytes(4)
_WORST_CASE_SOURCE: Endpoint = ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535)


@dataclass
class ResponderCounters:
    """What the responder did, for logs and metrics."""

    answered: int = 0
    bad_requests: int = 0
    unknown_attributes: int = 0
    ignored: int = 0


class BindingResponder:
    """Answers Binding requests with the observed source address (XOR-MAPPED-ADDRESS)."""

    def __init__(self, *, software: str | None = DEFAULT_SOFTWARE) -> None:
        self._software_name = software
        self._software: tuple[Attribute, ...] = (Software(software),) if software else ()
        self.counters = ResponderCounters()
        # Refuse a configuration whose biggest possible answers would break the bound.
        request = Message(
            message_class=MessageClass.REQUEST, method=BINDING, transaction_id=bytes(12)
        )
        largest = (
            request.success_response(XorMappedAddress(_WORST_CASE_SOURCE), *self._software),
            request.error_response(
                420,
                "Unknown Attribute",
                UnknownAttributes((0,) * _MAX_UNKNOWN_LISTED),
                *self._software,
            ),
        )
        if any(len(encode_message(m, fingerprint=True)) > MAX_RESPONSE_LENGTH for m in largest):
            raise LocalProtocolError(
                f"SOFTWARE {software!r} would make responses exceed {MAX_RESPONSE_LENGTH} bytes"
            )

    def handle_request(self, data: bytes, source: Endpoint) -> bytes | None:
        """The response to send back to ``source``, or ``None`` to stay silent."""
        header = peek_header(data)
        if header is None:
            try:
                classic = parse_classic_binding_request(data)
            except StunDecodeError:
                self.counters.bad_requests += 1
                return None
            if classic is not None:
                return self._respond_classic(classic, source)
        if header is None or header[0] is not MessageClass.REQUEST:
            # Not STUN, or a response/indication: answering those could loop or amplify.
            self.counters.ignored += 1
            return None
        try:
            request = decode_message(data)
        except StunDecodeError:
            self.counters.bad_requests += 1
            return self._error(header[1], header[2], 400, "Bad Request", fingerprint=False)
        return self.respond(request, source)

    def respond(self, request: Message, source: Endpoint) -> bytes | None:
        """Like ``handle_request`` for a message the caller has already decoded."""
        if request.message_class is not MessageClass.REQUEST:
            self.counters.ignored += 1
            return None
        fingerprint = request.get(Fingerprint) is not None
        unknown = request.unknown_comprehension_required
        if unknown:
            # RFC 8489 §6.3.1: "the server MUST generate an error response with an error
            # code of 420 (Unknown Attribute) and include an UNKNOWN-ATTRIBUTES attribute".
            self.counters.unknown_attributes += 1
            listed = UnknownAttributes(unknown[:_MAX_UNKNOWN_LISTED])
            return self._error(
                request.method,
                request.transaction_id,
                420,
                "Unknown Attribute",
                listed,
                fingerprint=fingerprint,
            )
        if request.method != BINDING:
            self.counters.bad_requests += 1
            return self._error(
                request.method,
                request.transaction_id,
                400,
                "Unsupported Method",
                fingerprint=fingerprint,
            )
        self.counters.answered += 1
        response = request.success_response(XorMappedAddress(source), *self._software)
        return encode_message(response, fingerprint=fingerprint)

    def _respond_classic(self, request: ClassicRequest, source: Endpoint) -> bytes:
        # RFC 3489 clients get MAPPED-ADDRESS (they do not know XOR-MAPPED-ADDRESS).
        # CHANGE-REQUEST with no change flag set is honoured as a plain request; a
        # request to answer from another address or port, or to answer to another
        # address (RESPONSE-ADDRESS, a reflection vector), gets 420 (RFC 5780 §6.1).
        refused = sorted(
            {
                attribute_type
                for attribute_type, value in request.attributes
                if (
                    is_comprehension_required(attribute_type)
                    and attribute_type not in _CLASSIC_UNDERSTOOD
                )
                or (attribute_type == CHANGE_REQUEST and value != _NO_CHANGE)
            }
        )[:_MAX_UNKNOWN_LISTED]
        # RFC 3489 §11.2.10: the SERVER value itself is a multiple of 4 bytes (its
        # parsers reject anything else), so pad inside the value, with spaces.
        software: list[tuple[int, bytes]] = []
        if self._software_name:
            name = self._software_name.encode()
            software.append((Software.TYPE, name + b" " * (-len(name) % 4)))
        if refused:
            self.counters.unknown_attributes += 1
            if len(refused) % 2:
                # RFC 3489 §11.2.8: an odd count repeats one type, to fill the 32-bit word.
                refused.append(refused[-1])
            error_code = bytes((0, 0, 4, 20)) + b"Unknown Attribute"
            listed = struct.pack(f"!{len(refused)}H", *refused)
            return encode_classic_response(
                request,
                [
                    (AttributeType.ERROR_CODE, error_code),
                    (AttributeType.UNKNOWN_ATTRIBUTES, listed),
                ],
                error=True,
            )
        self.counters.answered += 1
        _, mapped = pack_attribute_value(MappedAddress(source), request.transaction_id[4:])
        return encode_classic_response(request, [(MappedAddress.TYPE, mapped), *software])

    def _error(
        self,
        method: int,
        transaction_id: bytes,
        code: int,
        reason: str,
        *attributes: Attribute,
        fingerprint: bool,
    ) -> bytes:
        request = Message(
            message_class=MessageClass.REQUEST, method=method, transaction_id=transaction_id
        )
        response = request.error_response(code, reason, *attributes, *self._software)
        return encode_message(response, fingerprint=fingerprint)
