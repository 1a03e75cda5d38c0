"""Mediator authentication: nonces, the listen challenge (RFC 8489 §9.2.4) and signed acks."""

from __future__ import annotations

import hashlib
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wavesync_proto.errors import LocalProtocolError
from wavesync_proto.mediator import ConnectionAck, Listen, NonceIssuer, credential_key
from wavesync_proto.mediator.auth import (
    AuthFailure,
    challenge_attributes,
    sign_ack,
    sign_listen,
    verify_ack,
    verify_listen,
)
from wavesync_proto.stun import (
    Message,
    MessageIntegritySha256,
    Nonce,
    PasswordAlgorithm,
    PasswordAlgorithmId,
    PasswordAlgorithms,
    Realm,
    Username,
    decode_message,
    encode_message,
)

SYSTEM = uuid.UUID("04f5a9ea-3cb8-44b0-bb62-401b420701de")
SERVER = uuid.UUID("9b2f4c0e-1d7a-4e63-8a55-0c3f6b1e2d44")
USERNAME = str(SERVER)
REALM = "wavesync"
KEY = credential_key(USERNAME, REALM, "the-system-key")
TID = b"auth-tid-123"
NONCES = NonceIssuer(secret=b"n" * 32, lifetime=600.0)


def listen_request() -> Message:
    return Listen(system_id=SYSTEM, server_id=SERVER).to_stun(TID)


def key_for(username: str) -> bytes | None:
    return KEY if username == USERNAME else None


def verify(data: bytes, now: float = 1000.0) -> AuthFailure | bytes:
    return verify_listen(decode_message(data), realm=REALM, nonces=NONCES, now=now, key_for=key_for)


def test_the_credential_key_is_sha256_of_username_realm_password() -> None:
    assert hashlib.sha256(f"{USERNAME}:{REALM}:the-system-key".encode()).digest() == KEY


def test_nonces_carry_the_rfc_cookie_and_expire() -> None:
    nonce = NONCES.issue(1000.0)
    # RFC 8489 §9.2: "obMatJos2" then the feature bits; "gAAA" = password algorithms set.
    assert nonce.startswith("obMatJos2gAAA")
    assert NONCES.check(nonce, 1000.0) is True
    assert NONCES.check(nonce, 1600.0) is True
    assert NONCES.check(nonce, 1601.0) is False
    assert NONCES.check(nonce[:-1] + ("A" if nonce[-1] != "A" else "B"), 1000.0) is None
    assert NONCES.check("obMatJos2gAAAzz.", 1000.0) is None
    assert NONCES.check("plain", 1000.0) is None
    other = NonceIssuer(secret=b"m" * 32)
    assert other.check(nonce, 1000.0) is None


def test_nonce_issuer_refuses_weak_settings() -> None:
    with pytest.raises(LocalProtocolError, match="at least 16 bytes"):
        NonceIssuer(secret=b"short")
    with pytest.raises(LocalProtocolError, match="lifetime must be positive"):
        NonceIssuer(secret=b"s" * 16, lifetime=0)


def test_challenge_carries_realm_nonce_and_sha256() -> None:
    assert challenge_attributes(REALM, "n") == (
        Realm(REALM),
        Nonce("n"),
        PasswordAlgorithms(((PasswordAlgorithmId.SHA256, b""),)),
    )


def test_a_correctly_signed_listen_yields_the_key() -> None:
    data = sign_listen(
        listen_request(), username=USERNAME, realm=REALM, nonce=NONCES.issue(990.0), key=KEY
    )
    assert verify(data) == KEY


def test_an_unsigned_listen_is_challenged() -> None:
    assert verify(encode_message(listen_request())) == AuthFailure(
        code=401, reason="Unauthorized", challenge=True
    )


@pytest.mark.parametrize(
    ("signer", "expected"),
    [
        (
            {"username": USERNAME, "realm": REALM, "key": credential_key(USERNAME, REALM, "wrong")},
            AuthFailure(code=401, reason="Unauthorized", challenge=True),
        ),
        (
            {"username": "someone-else", "realm": REALM, "key": KEY},
            AuthFailure(code=401, reason="Unauthorized", challenge=True),
        ),
        (
            {"username": USERNAME, "realm": "other-realm", "key": KEY},
            AuthFailure(code=401, reason="Unauthorized", challenge=True),
        ),
    ],
    ids=["wrong key", "unknown user", "wrong realm"],
)
def test_bad_credentials_are_refused(signer: dict[str, str | bytes], expected: AuthFailure) -> None:
    data = sign_listen(listen_request(), nonce=NONCES.issue(1000.0), **signer)  # type: ignore[arg-type]
    assert verify(data) == expected


def test_an_expired_nonce_gets_438() -> None:
    data = sign_listen(
        listen_request(), username=USERNAME, realm=REALM, nonce=NONCES.issue(100.0), key=KEY
    )
    assert verify(data, now=1000.0) == AuthFailure(code=438, reason="Stale Nonce", challenge=True)


def test_a_forged_nonce_is_a_401() -> None:
    data = sign_listen(
        listen_request(), username=USERNAME, realm=REALM, nonce="obMatJos2gAAA3e8.AAAA", key=KEY
    )
    assert verify(data) == AuthFailure(code=401, reason="Unauthorized", challenge=True)


def test_integrity_without_credentials_is_a_400() -> None:
    data = encode_message(listen_request(), integrity_sha256_key=KEY)
    assert verify(data) == AuthFailure(code=400, reason="Missing Credentials", challenge=False)


def test_the_sha256_password_algorithm_is_required() -> None:
    message = Message(
        message_class=listen_request().message_class,
        method=listen_request().method,
        transaction_id=TID,
        attributes=(
            *listen_request().attributes,
            Username(USERNAME),
            Realm(REALM),
            Nonce(NONCES.issue(1000.0)),
            PasswordAlgorithm(PasswordAlgorithmId.MD5),
        ),
    )
    data = encode_message(message, integrity_sha256_key=KEY)
    assert verify(data) == AuthFailure(
        code=400, reason="SHA-256 Password Algorithm Required", challenge=False
    )


def test_tampering_after_signing_is_detected() -> None:
    data = bytearray(
        sign_listen(
            listen_request(), username=USERNAME, realm=REALM, nonce=NONCES.issue(1000.0), key=KEY
        )
    )
    data[30] ^= 0x01  # inside the SYSTEM-ID value
    assert verify(bytes(data)) == AuthFailure(code=401, reason="Unauthorized", challenge=True)


def test_signed_acks_verify_and_unsigned_or_foreign_ones_do_not() -> None:
    ack = ConnectionAck(connect_session_id=bytes(16), server_id=SERVER).to_stun(TID)
    signed = decode_message(sign_ack(ack, username=USERNAME, key=KEY))
    assert signed.get(MessageIntegritySha256) is not None
    assert verify_ack(signed, key_for=key_for) == KEY
    assert verify_ack(decode_message(encode_message(ack)), key_for=key_for) is None
    wrong = decode_message(sign_ack(ack, username=USERNAME, key=b"k" * 32))
    assert verify_ack(wrong, key_for=key_for) is None
    stranger = decode_message(sign_ack(ack, username="stranger", key=KEY))
    assert verify_ack(stranger, key_for=key_for) is None


@pytest.mark.property
@given(nonce=st.text(max_size=80), now=st.floats(min_value=0, max_value=1e12))
def test_any_nonce_text_is_checked_without_raising(nonce: str, now: float) -> None:
    assert NONCES.check(nonce, now) in (True, False, None)
