"""STUN credential keys (RFC 8489 §9) and the SASLprep string preparation they need.

This module owns how a password becomes an HMAC key. It does not know about
messages: computing and checking the HMAC over message bytes is ``message.py``'s.

RFC 8489 prepares realm and password with OpaqueString (RFC 8265) where RFC 5389
used SASLprep (RFC 4013). The two agree on every ASCII string, which is what
wavesync's generated keys are; we implement SASLprep because it is in the
standard library's ``stringprep`` tables and because the RFC 5769 test vectors
(and RFC 5389 peers) use it.
"""

from __future__ import annotations

import hashlib
import stringprep
import unicodedata

from ..errors import LocalProtocolError
from .attributes import PasswordAlgorithmId

__all__ = ["long_term_key", "saslprep", "short_term_key", "userhash"]

# RFC 4013 §2.3: the tables whose characters may not appear in the output.
_PROHIBITED = (
    stringprep.in_table_c12,  # non-ASCII space
    stringprep.in_table_c21_c22,  # control characters
    stringprep.in_table_c3,  # private use
    stringprep.in_table_c4,  # non-character code points
    stringprep.in_table_c5,  # surrogates
    stringprep.in_table_c6,  # inappropriate for plain text
    stringprep.in_table_c7,  # inappropriate for canonical representation
    stringprep.in_table_c8,  # change display properties / deprecated
    stringprep.in_table_c9,  # tagging characters
)


def saslprep(text: str) -> str:
    """RFC 4013 SASLprep for *stored strings* (unassigned code points are refused)."""
    # §2.1 mapping: non-ASCII spaces to SPACE, "commonly mapped to nothing" (B.1) removed.
    mapped = "".join(
        " " if stringprep.in_table_c12(ch) else ch for ch in text if not stringprep.in_table_b1(ch)
    )
    # §2.2 normalization: form KC.
    prepared = unicodedata.normalize("NFKC", mapped)
    for ch in prepared:
        if stringprep.in_table_a1(ch):
            raise LocalProtocolError(f"SASLprep: unassigned code point U+{ord(ch):04X}")
        for in_table in _PROHIBITED:
            if in_table(ch):
                raise LocalProtocolError(f"SASLprep: prohibited code point U+{ord(ch):04X}")
    # §2.4 / RFC 3454 §6: bidirectional text rules.
    if any(stringprep.in_table_d1(ch) for ch in prepared):
        if any(stringprep.in_table_d2(ch) for ch in prepared):
            raise LocalProtocolError("SASLprep: mixes right-to-left and left-to-right text")
        if not (stringprep.in_table_d1(prepared[0]) and stringprep.in_table_d1(prepared[-1])):
            raise LocalProtocolError("SASLprep: right-to-left text must start and end so")
    return prepared


def short_term_key(password: str) -> bytes:
    """RFC 8489 §9.1.1: the short-term key is the prepared password itself."""
    return saslprep(password).encode("utf-8")


def long_term_key(
    username: str,
    realm: str,
    password: str,
    *,
    algorithm: int = PasswordAlgorithmId.MD5,
) -> bytes:
    """RFC 8489 §9.2.2: ``H(username ":" realm ":" password)`` with H = MD5 or SHA-256."""
    material = ":".join((username, saslprep(realm), saslprep(password))).encode("utf-8")
    if algorithm == PasswordAlgorithmId.MD5:
        # MD5 is what the RFC specifies for this key; it is not used for signing by itself.
        return hashlib.md5(material, usedforsecurity=False).digest()
    if algorithm == PasswordAlgorithmId.SHA256:
        return hashlib.sha256(material).digest()
    raise LocalProtocolError(f"unknown password algorithm 0x{algorithm:04x}")


def userhash(username: str, realm: str) -> bytes:
    """RFC 8489 §14.4: ``SHA-256(username ":" realm)``, both prepared, for USERHASH."""
    return hashlib.sha256(f"{saslprep(username)}:{saslprep(realm)}".encode()).digest()
