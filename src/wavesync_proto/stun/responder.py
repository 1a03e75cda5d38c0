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

from dataclasses import dataclass

from .. import __version__
from ..addresses import Endpoint
from ..errors import LocalProtocolError
from .attributes import Attribute, Fingerprint, Software, UnknownAttributes, XorMappedAddress
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
