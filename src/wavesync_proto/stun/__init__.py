"""STUN (RFC 8489, compatible with RFC 5389): the framing every wavesync control protocol speaks.

``decode_message`` / ``encode_message`` are the codec; ``ClientTransaction`` is
the retransmission schedule of a request; ``BindingResponder`` answers Binding
requests. Nothing here does I/O.
"""

from __future__ import annotations

from .attributes import (
    MAGIC_COOKIE,
    AlternateDomain,
    AlternateServer,
    Attribute,
    AttributeType,
    ErrorCode,
    Fingerprint,
    MappedAddress,
    MessageIntegrity,
    MessageIntegritySha256,
    Nonce,
    PasswordAlgorithm,
    PasswordAlgorithmId,
    PasswordAlgorithms,
    RawAttribute,
    Realm,
    Software,
    UnknownAttributes,
    Userhash,
    Username,
    XorMappedAddress,
    is_comprehension_required,
)
from .credentials import long_term_key, saslprep, short_term_key, userhash
from .errors import StunDecodeError
from .message import (
    BINDING,
    HEADER_LENGTH,
    MAX_MESSAGE_LENGTH,
    Message,
    MessageClass,
    decode_message,
    encode_message,
    new_transaction_id,
    peek_header,
    stream_message_length,
    verify_integrity,
    verify_integrity_sha256,
)
from .responder import DEFAULT_SOFTWARE, MAX_RESPONSE_LENGTH, BindingResponder, ResponderCounters
from .transaction import (
    ClientTransaction,
    ResponseReceived,
    TransactionEvent,
    TransactionTimedOut,
)

__all__ = [
    "BINDING",
    "DEFAULT_SOFTWARE",
    "HEADER_LENGTH",
    "MAGIC_COOKIE",
    "MAX_MESSAGE_LENGTH",
    "MAX_RESPONSE_LENGTH",
    "AlternateDomain",
    "AlternateServer",
    "Attribute",
    "AttributeType",
    "BindingResponder",
    "ClientTransaction",
    "ErrorCode",
    "Fingerprint",
    "MappedAddress",
    "Message",
    "MessageClass",
    "MessageIntegrity",
    "MessageIntegritySha256",
    "Nonce",
    "PasswordAlgorithm",
    "PasswordAlgorithmId",
    "PasswordAlgorithms",
    "RawAttribute",
    "Realm",
    "ResponderCounters",
    "ResponseReceived",
    "Software",
    "StunDecodeError",
    "TransactionEvent",
    "TransactionTimedOut",
    "UnknownAttributes",
    "Userhash",
    "Username",
    "XorMappedAddress",
    "decode_message",
    "encode_message",
    "is_comprehension_required",
    "long_term_key",
    "new_transaction_id",
    "peek_header",
    "saslprep",
    "short_term_key",
    "stream_message_length",
    "userhash",
    "verify_integrity",
    "verify_integrity_sha256",
]
