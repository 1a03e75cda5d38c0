"""Credential keys (RFC 8489 §9) and SASLprep (RFC 4013), against independently computed digests."""

from __future__ import annotations

import hashlib
import re

import pytest

from wavesync_proto.errors import LocalProtocolError
from wavesync_proto.stun import (
    PasswordAlgorithmId,
    long_term_key,
    saslprep,
    short_term_key,
    userhash,
)

from . import rfc5769


def _md5(text: str) -> bytes:
    return hashlib.md5(text.encode("utf-8"), usedforsecurity=False).digest()


def _sha256(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


# --- SASLprep -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "prepared"),
    [
        # The examples of RFC 4013 §3.
        ("I\u00adX", "IX"),  # SOFT HYPHEN mapped to nothing
        ("user", "user"),  # no transformation
        ("USER", "USER"),  # case preserved
        ("\u00aa", "a"),  # output is NFKC
        ("\u2168", "IX"),  # ROMAN NUMERAL NINE, NFKC
        # Further cases of the §2 steps.
        ("a\u00a0b\u3000c", "a b c"),  # non-ASCII spaces become SPACE (C.1.2)
        ("a\u200bb\ufeffc", "abc"),  # zero-width space and BOM: commonly mapped to nothing (B.1)
        ("The\u00adM\u00aatr\u2168", "TheMatrIX"),  # RFC 5769 §2.4's password
        ("\u0627\u0628", "\u0627\u0628"),  # right-to-left only, starting and ending so
        ("\u0627\u0031\u0628", "\u0627\u0031\u0628"),  # a digit inside RTL text is fine
        ("", ""),
    ],
)
def test_saslprep(text: str, prepared: str) -> None:
    assert saslprep(text) == prepared


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("\u0007", "SASLprep: prohibited code point U+0007"),  # RFC 4013 §3: control character
        ("pass\u0000word", "SASLprep: prohibited code point U+0000"),
        ("\u0085", "SASLprep: prohibited code point U+0085"),  # C.2.2 non-ASCII control
        ("\ue000", "SASLprep: prohibited code point U+E000"),  # C.3 private use
        ("\ufdd0", "SASLprep: prohibited code point U+FDD0"),  # C.4 non-character
        ("\ufff9", "SASLprep: prohibited code point U+FFF9"),  # C.6 interlinear annotation
        ("\u2ff0", "SASLprep: prohibited code point U+2FF0"),  # C.7 ideographic description
        ("a\u200eb", "SASLprep: prohibited code point U+200E"),  # C.8 left-to-right mark
        ("\U000e0001", "SASLprep: prohibited code point U+E0001"),  # C.9 language tag
        ("\u0221", "SASLprep: unassigned code point U+0221"),  # unassigned in Unicode 3.2
        ("\u0627\u0031", "SASLprep: right-to-left text must start and end so"),  # RFC 4013 §3
        ("\u0031\u0627", "SASLprep: right-to-left text must start and end so"),
        ("\u0627a\u0628", "SASLprep: mixes right-to-left and left-to-right text"),
    ],
)
def test_saslprep_rejects(text: str, message: str) -> None:
    with pytest.raises(LocalProtocolError, match=f"^{re.escape(message)}$"):
        saslprep(text)


# --- short-term ------------------------------------------------------------------------------


def test_short_term_key_is_the_prepared_password() -> None:
    assert short_term_key(rfc5769.SAMPLE_REQUEST_PASSWORD) == b"VOkJxbRl1RmTxUk/WvJxBt"
    assert short_term_key("I\u00adX") == b"IX"
    assert short_term_key("p\u00e4ss") == "p\u00e4ss".encode()
    with pytest.raises(LocalProtocolError, match="prohibited"):
        short_term_key("\u0007")


# --- long-term -------------------------------------------------------------------------------


def test_long_term_key_md5() -> None:
    assert long_term_key("alice", "example.org", "secret") == _md5("alice:example.org:secret")
    assert long_term_key(
        "alice", "example.org", "secret", algorithm=PasswordAlgorithmId.MD5
    ) == _md5("alice:example.org:secret")


def test_long_term_key_sha256() -> None:
    key = long_term_key("alice", "example.org", "secret", algorithm=PasswordAlgorithmId.SHA256)
    assert key == _sha256("alice:example.org:secret")
    assert len(key) == 32


def test_long_term_key_rfc5769_credentials() -> None:
    expected = "\u30de\u30c8\u30ea\u30c3\u30af\u30b9:example.org:TheMatrIX"
    arguments = (rfc5769.LONG_TERM_USERNAME, rfc5769.LONG_TERM_REALM, rfc5769.LONG_TERM_PASSWORD)
    assert long_term_key(*arguments) == _md5(expected)
    assert long_term_key(*arguments, algorithm=PasswordAlgorithmId.SHA256) == _sha256(expected)


def test_long_term_key_prepares_realm_and_password() -> None:
    assert long_term_key("u", "ex\u00adample", "pa\u00a0ss") == _md5("u:example:pa ss")
    with pytest.raises(LocalProtocolError, match="prohibited"):
        long_term_key("u", "realm\u0007", "p")


def test_long_term_key_differs_per_field() -> None:
    base = long_term_key("u", "r", "p")
    assert long_term_key("v", "r", "p") != base
    assert long_term_key("u", "s", "p") != base
    assert long_term_key("u", "r", "q") != base


@pytest.mark.parametrize("algorithm", [0x0000, 0x0003, 0xFFFF])
def test_long_term_key_unknown_algorithm(algorithm: int) -> None:
    with pytest.raises(LocalProtocolError, match=f"^unknown password algorithm 0x{algorithm:04x}$"):
        long_term_key("u", "r", "p", algorithm=algorithm)


# --- USERHASH --------------------------------------------------------------------------------


def test_userhash() -> None:
    assert userhash("alice", "example.org") == _sha256("alice:example.org")
    assert userhash("alice", "ex\u00adample.org") == _sha256("alice:example.org")
    # RFC 8489 §14.4 prepares the username too.
    assert userhash("al\u00adice", "example.org") == _sha256("alice:example.org")


def test_userhash_rfc8489_appendix_b1() -> None:
    # RFC 8489 Appendix B.1 gives the USERHASH of the RFC 5769 §2.4 user and realm.
    expected = bytes.fromhex("4a3cf38fef6992bda952c6780417da0f24819415569e60b205c46e41407f1704")
    assert userhash(rfc5769.LONG_TERM_USERNAME, rfc5769.LONG_TERM_REALM) == expected
