"""How servers prove their system key to the mediator (docs/protocol.md §2.4).

This module owns the credential mechanics of the mediator protocol, both sides:

- ``listen`` uses RFC 8489 §9.2 long-term credentials: the first attempt is
  answered 401 with REALM, a NONCE and PASSWORD-ALGORITHMS (SHA-256); the
  retry carries USERNAME (the server id), REALM, NONCE, PASSWORD-ALGORITHM and
  MESSAGE-INTEGRITY-SHA256 keyed with ``SHA-256(username ":" realm ":" key)``.
  An expired nonce gets 438 and a fresh one. Success responses are signed too.
- ``connection_ack`` travels over UDP from whatever socket the server punches
  from, so it cannot carry a TCP session's state: it is signed with the same
  key (USERNAME + MESSAGE-INTEGRITY-SHA256, no nonce, RFC 8489 §9.1's
  short-term shape) and is bound to a 128-bit connect session id that only
  the mediator and that server know, which makes a replay useless.

Nonces are stateless: ``obMatJos2`` + the security-feature bits (RFC 8489
§9.2: "password algorithms" set) + the issue time + an HMAC of it under the
mediator's secret. The mediator keeps no table of them, and a forged or
expired one is recognised by recomputation.
"""

from __future__ import annotations

import base64
import hmac
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import LocalProtocolError
from ..stun.attributes import (
    MessageIntegritySha256,
    Nonce,
    PasswordAlgorithm,
    PasswordAlgorithmId,
    PasswordAlgorithms,
    Realm,
    Username,
)
from ..stun.credentials import long_term_key
from ..stun.message import Message, encode_message, verify_integrity_sha256

__all__ = [
    "DEFAULT_REALM",
    "AuthFailure",
    "NonceIssuer",
    "challenge_attributes",
    "credential_key",
    "sign_ack",
    "sign_listen",
    "verify_ack",
    "verify_listen",
]

DEFAULT_REALM = "wavesync"
# RFC 8489 §9.2: the nonce cookie, then 24 feature bits in 4 base64 characters;
# bit 0 ("Password algorithms") set is 0x800000, "gAAA".
_NONCE_COOKIE = "obMatJos2"
_FEATURES = base64.b64encode(b"\x80\x00\x00").decode()
_NONCE_PREFIX = _NONCE_COOKIE + _FEATURES
_NONCE_MAC_BYTES = 12


def credential_key(server_username: str, realm: str, system_key: str) -> bytes:
    """The HMAC key of a server: RFC 8489 long-term key with the SHA-256 algorithm."""
    return long_term_key(server_username, realm, system_key, algorithm=PasswordAlgorithmId.SHA256)


class NonceIssuer:
    """Issues and checks stateless, expiring nonces (no table, nothing to grow)."""

    def __init__(self, *, secret: bytes, lifetime: float = 600.0) -> None:
        if len(secret) < 16:
            raise LocalProtocolError("the nonce secret must be at least 16 bytes")
        if lifetime <= 0:
            raise LocalProtocolError("the nonce lifetime must be positive")
        self._secret = secret
        self.lifetime = lifetime

    def _mac(self, issued: int) -> str:
        digest = hmac.digest(self._secret, issued.to_bytes(8, "big"), "sha256")[:_NONCE_MAC_BYTES]
        return base64.urlsafe_b64encode(digest).decode()

    def issue(self, now: float) -> str:
        """A nonce valid for ``lifetime`` seconds from ``now``."""
        issued = max(0, int(now))
        return f"{_NONCE_PREFIX}{issued:x}.{self._mac(issued)}"

    def check(self, nonce: str, now: float) -> bool | None:
        """True if fresh, False if ours but expired (answer 438), None if not ours (401)."""
        if not nonce.startswith(_NONCE_PREFIX):
            return None
        stamp, _, mac = nonce[len(_NONCE_PREFIX) :].partition(".")
        try:
            issued = int(stamp, 16)
        except ValueError:
            return None
        if issued < 0 or issued > 2**63 or not hmac.compare_digest(mac, self._mac(issued)):
            return None
        return now - issued <= self.lifetime


def challenge_attributes(realm: str, nonce: str) -> tuple[Realm, Nonce, PasswordAlgorithms]:
    """What a 401 or 438 carries (RFC 8489 §9.2.4)."""
    return Realm(realm), Nonce(nonce), PasswordAlgorithms(((PasswordAlgorithmId.SHA256, b""),))


def sign_listen(message: Message, *, username: str, realm: str, nonce: str, key: bytes) -> bytes:
    """Encode an authenticated listen request (the retry after a 401/438)."""
    signed = Message(
        message_class=message.message_class,
        method=message.method,
        transaction_id=message.transaction_id,
        attributes=(
            *message.attributes,
            Username(username),
            Realm(realm),
            Nonce(nonce),
            PasswordAlgorithm(PasswordAlgorithmId.SHA256),
        ),
    )
    return encode_message(signed, integrity_sha256_key=key)


def sign_ack(message: Message, *, username: str, key: bytes) -> bytes:
    """Encode a connection_ack signed with the server's key (no nonce: see the module doc)."""
    signed = Message(
        message_class=message.message_class,
        method=message.method,
        transaction_id=message.transaction_id,
        attributes=(*message.attributes, Username(username)),
    )
    return encode_message(signed, integrity_sha256_key=key)


@dataclass(frozen=True, kw_only=True)
class AuthFailure:
    """Why a request was not authenticated, and the error to answer with."""

    code: int
    reason: str
    #: Whether the answer carries REALM + a fresh NONCE (401 challenge, 438 stale).
    challenge: bool


_UNAUTHENTICATED = AuthFailure(code=401, reason="Unauthorized", challenge=True)


def verify_listen(  # noqa: PLR0911 - one return per outcome RFC 8489 §9.2.4 lists
    message: Message,
    *,
    realm: str,
    nonces: NonceIssuer,
    now: float,
    key_for: Callable[[str], bytes | None],
) -> AuthFailure | bytes:
    """Check a decoded listen request; return the key on success, or why it failed.

    ``key_for(username)`` returns the credential key for a username, or None
    for an unknown one. Follows RFC 8489 §9.2.4: no integrity → 401 challenge;
    integrity without USERNAME/REALM/NONCE → 400; a nonce not ours → 401; an
    expired one → 438; unknown user or wrong HMAC → 401.
    """
    if message.get(MessageIntegritySha256) is None:
        return _UNAUTHENTICATED
    username, message_realm, nonce = message.get(Username), message.get(Realm), message.get(Nonce)
    if username is None or message_realm is None or nonce is None:
        return AuthFailure(code=400, reason="Missing Credentials", challenge=False)
    algorithm = message.get(PasswordAlgorithm)
    if algorithm is None or algorithm.algorithm != PasswordAlgorithmId.SHA256:
        return AuthFailure(code=400, reason="SHA-256 Password Algorithm Required", challenge=False)
    fresh = nonces.check(nonce.value, now)
    if fresh is None or message_realm.value != realm:
        return _UNAUTHENTICATED
    if not fresh:
        return AuthFailure(code=438, reason="Stale Nonce", challenge=True)
    key = key_for(username.value)
    if key is None or not verify_integrity_sha256(message, key):
        return _UNAUTHENTICATED
    return key


def verify_ack(message: Message, *, key_for: Callable[[str], bytes | None]) -> bytes | None:
    """Check a decoded connection_ack; return the key if its signature holds."""
    username = message.get(Username)
    if username is None:
        return None
    key = key_for(username.value)
    if key is None or not verify_integrity_sha256(message, key):
        return None
    return key
