"""The relay's wire format: the standby signature, its headers, and the control lines."""

from __future__ import annotations

import hashlib
import hmac
import uuid

import pytest

from wavesync_proto.errors import LocalProtocolError, RemoteProtocolError
from wavesync_proto.relay.wire import (
    MAX_CONTROL_LINE,
    Open,
    Ping,
    Ready,
    StandbyCredentials,
    encode_control,
    parse_control,
    parse_session_id,
    sign_standby,
    split_control_line,
)

from .helpers import KEY_A, KEY_B, SERVER_1, SERVER_2, SYSTEM_A, SYSTEM_B

NONCE = bytes(range(16))
SESSION = bytes.fromhex("00112233445566778899aabbccddeeff")


def signed(**changes: object) -> StandbyCredentials:
    fields: dict[str, object] = {
        "key": KEY_A,
        "system_id": SYSTEM_A,
        "server_id": SERVER_1,
        "unix_time": 1_700_000_000,
        "nonce": NONCE,
        "relay_host": "relay.example:8443",
    }
    fields.update(changes)
    return sign_standby(**fields)  # type: ignore[arg-type]


# --- the signature ----------------------------------------------------------------------------


def test_the_signature_is_hmac_sha256_over_the_documented_lines() -> None:
    credentials = signed(relay_host="Relay.Example:8443")
    message = "\n".join(
        (
            "wavesync-relay-standby/1",
            str(SYSTEM_A),
            str(SERVER_1),
            "1700000000",
            NONCE.hex(),
            "relay.example:8443",  # the Host header, in lower case
        )
    ).encode()
    assert credentials.signature == hmac.new(KEY_A.encode(), message, hashlib.sha256).hexdigest()
    assert credentials.nonce == NONCE.hex()


def test_a_signature_verifies_with_its_key_and_host_only() -> None:
    credentials = signed()
    assert credentials.verify(KEY_A, "relay.example:8443")
    assert credentials.verify(KEY_A, "RELAY.example:8443")  # host names are case-insensitive
    assert not credentials.verify(KEY_B, "relay.example:8443")
    assert not credentials.verify(KEY_A, "relay.example")  # the port is part of the Host
    assert not credentials.verify(KEY_A, "other.example:8443")


@pytest.mark.parametrize(
    "change",
    [
        {"system_id": SYSTEM_B},
        {"server_id": SERVER_2},
        {"unix_time": 1_700_000_001},
        {"nonce": "ff" * 16},
    ],
)
def test_every_signed_field_is_covered(change: dict[str, object]) -> None:
    original = signed()
    fields = {
        "system_id": original.system_id,
        "server_id": original.server_id,
        "unix_time": original.unix_time,
        "nonce": original.nonce,
        "signature": original.signature,
    }
    fields.update(change)
    tampered = StandbyCredentials(**fields)  # type: ignore[arg-type]
    assert not tampered.verify(KEY_A, "relay.example:8443")


def test_headers_round_trip() -> None:
    credentials = signed()
    headers = dict(credentials.headers())
    assert set(headers) == {
        "wavesync-system",
        "wavesync-server",
        "wavesync-time",
        "wavesync-nonce",
        "wavesync-signature",
    }
    assert StandbyCredentials.from_headers(headers) == credentials


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"nonce": bytes(15)}, "16 random bytes"),
        ({"nonce": bytes(17)}, "16 random bytes"),
        ({"unix_time": -1}, "must not be negative"),
    ],
)
def test_signing_refuses_misuse(changes: dict[str, object], message: str) -> None:
    with pytest.raises(LocalProtocolError, match=message):
        signed(**changes)


def test_a_host_that_idna_cannot_encode_never_verifies() -> None:
    # Host headers come from the peer: one IDNA refuses ("a..b", a 64-letter label) must
    # be a failed check, not an exception out of the service.
    credentials = signed()
    for host in ("a..b", "x" * 64 + ".example", "\xe9.."):
        assert not credentials.verify(KEY_A, host)


# --- header parsing ---------------------------------------------------------------------------


def good_headers() -> dict[str, str]:
    return dict(signed().headers())


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("wavesync-system", None, "missing header wavesync-system"),
        ("wavesync-server", None, "missing header wavesync-server"),
        ("wavesync-system", "not-a-uuid", "wavesync-system is not a UUID"),
        ("wavesync-server", "1234", "wavesync-server is not a UUID"),
        ("wavesync-time", None, "unix seconds"),
        ("wavesync-time", "", "unix seconds"),
        ("wavesync-time", "-5", "unix seconds"),
        ("wavesync-time", "1.5", "unix seconds"),
        ("wavesync-time", "1" * 13, "unix seconds"),
        ("wavesync-time", "\uff11\uff12", "unix seconds"),  # full-width digits
        ("wavesync-nonce", None, "32 hex digits"),
        ("wavesync-nonce", "AB" * 16, "32 hex digits"),  # lower case only
        ("wavesync-nonce", "ab" * 15, "32 hex digits"),
        ("wavesync-nonce", "zz" * 16, "32 hex digits"),
        ("wavesync-signature", None, "64 hex digits"),
        ("wavesync-signature", "ab" * 31, "64 hex digits"),
        ("wavesync-signature", "ab" * 33, "64 hex digits"),
    ],
)
def test_header_parsing_errors_are_400(name: str, value: str | None, message: str) -> None:
    headers = good_headers()
    if value is None:
        del headers[name]
    else:
        headers[name] = value
    with pytest.raises(RemoteProtocolError, match=message) as caught:
        StandbyCredentials.from_headers(headers)
    assert caught.value.error_code_hint == 400


def test_a_twelve_digit_time_is_accepted() -> None:
    headers = good_headers()
    headers["wavesync-time"] = "9" * 12
    assert StandbyCredentials.from_headers(headers).unix_time == 999_999_999_999


def test_uuid_headers_accept_any_uuid_spelling() -> None:
    headers = good_headers()
    headers["wavesync-server"] = SERVER_1.hex.upper()
    assert StandbyCredentials.from_headers(headers).server_id == SERVER_1


# --- control lines ----------------------------------------------------------------------------


def test_control_lines_encode_exactly() -> None:
    assert encode_control(Ping()) == b"PING\r\n"
    assert encode_control(Ready(session_id=SESSION)) == b"READY " + SESSION.hex().encode() + b"\r\n"
    line = encode_control(Open(session_id=SESSION, client_address=("203.0.113.9", 61001)))
    assert line == b"OPEN " + SESSION.hex().encode() + b" 203.0.113.9:61001\r\n"


@pytest.mark.parametrize(
    "line",
    [
        Ping(),
        Ready(session_id=SESSION),
        Open(session_id=SESSION, client_address=("203.0.113.9", 61001)),
        Open(session_id=SESSION, client_address=("2001:db8::9", 0)),
        Open(session_id=SESSION, client_address=("::ffff:203.0.113.9", 65535)),
    ],
)
def test_control_lines_round_trip(line: Ping | Ready | Open) -> None:
    encoded = encode_control(line)
    assert len(encoded) <= MAX_CONTROL_LINE
    text, rest = split_control_line(encoded)
    assert rest == b""
    assert text is not None
    assert parse_control(text) == line


def test_an_ipv6_client_address_is_bracketed() -> None:
    line = encode_control(
        Open(session_id=SESSION, client_address=("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", 65535))
    )
    assert line.endswith(b" [2001:db8:ffff:ffff:ffff:ffff:ffff:ffff]:65535\r\n")
    # The longest IPv6 text still leaves room under the limit.
    assert len(line) <= MAX_CONTROL_LINE
    parsed = parse_control(line[:-2])
    assert isinstance(parsed, Open)
    assert parsed.client_address == ("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", 65535)


@pytest.mark.parametrize("session", [b"", bytes(15), bytes(17)])
def test_encoding_a_bad_session_id_is_misuse(session: bytes) -> None:
    with pytest.raises(LocalProtocolError, match="16 bytes"):
        encode_control(Ready(session_id=session))
    with pytest.raises(LocalProtocolError, match="16 bytes"):
        encode_control(Open(session_id=session, client_address=("203.0.113.9", 1)))


def test_split_waits_for_a_whole_line_and_keeps_the_rest() -> None:
    assert split_control_line(b"") == (None, b"")
    assert split_control_line(b"PIN") == (None, b"PIN")
    assert split_control_line(b"PING\r") == (None, b"PING\r")
    assert split_control_line(b"PING\r\n") == (b"PING", b"")
    assert split_control_line(b"PING\r\nPING\r\nraw") == (b"PING", b"PING\r\nraw")
    assert split_control_line(b"\r\n") == (b"", b"")


def test_split_bounds_the_line() -> None:
    longest = b"x" * (MAX_CONTROL_LINE - 2) + b"\r\n"
    assert split_control_line(longest + b"more") == (longest[:-2], b"more")
    # One byte short of a CRLF at the limit: still waiting for the LF.
    assert split_control_line(longest[:-1]) == (None, longest[:-1])
    with pytest.raises(RemoteProtocolError, match="too long"):
        split_control_line(b"x" * (MAX_CONTROL_LINE - 1) + b"\r\n")
    with pytest.raises(RemoteProtocolError, match="too long"):
        split_control_line(b"x" * MAX_CONTROL_LINE)
    with pytest.raises(RemoteProtocolError, match="too long"):
        split_control_line(b"x" * 10_000 + b"\r\n")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"PING\xff", "not ASCII"),
        ("READY \u00e9".encode(), "not ASCII"),
        (b"", "unknown control line"),
        (b"ping", "unknown control line"),
        (b"PING ", "unknown control line"),
        (b"PONG", "unknown control line"),
        (b"HELLO world", "unknown control line"),
        (b"READY", "unknown control line"),
        (b"READY  " + SESSION.hex().encode(), "unknown control line"),
        (b"READY " + SESSION.hex().encode() + b" extra", "unknown control line"),
        (b"READY " + SESSION.hex().upper().encode(), "32 hex digits"),
        (b"READY " + SESSION.hex()[:-2].encode(), "32 hex digits"),
        (b"OPEN " + SESSION.hex().encode(), "unknown control line"),
        (b"OPEN " + SESSION.hex().encode() + b" 203.0.113.9", "bad client address"),
        (b"OPEN " + SESSION.hex().encode() + b" 203.0.113.9:99999", "bad client address"),
        (b"OPEN " + SESSION.hex().encode() + b" 2001:db8::9:5", "bad client address"),
        (b"OPEN " + SESSION.hex().encode() + b" [2001:db8::9", "bad client address"),
        (b"OPEN nothex 203.0.113.9:5", "32 hex digits"),
    ],
)
def test_parse_refuses_anything_else(line: bytes, message: str) -> None:
    with pytest.raises(RemoteProtocolError, match=message):
        parse_control(line)


def test_session_ids_are_lower_case_hex() -> None:
    assert parse_session_id(SESSION.hex()) == SESSION
    for bad in ("", SESSION.hex().upper(), SESSION.hex() + "0", "g" * 32):
        with pytest.raises(RemoteProtocolError):
            parse_session_id(bad)


def test_credentials_are_plain_values() -> None:
    # Frozen and comparable: the service keys its replay memory on the nonce they carry.
    credentials = signed()
    assert credentials == signed()
    assert credentials != signed(nonce=bytes(16))
    with pytest.raises(AttributeError):
        credentials.nonce = "00" * 16  # type: ignore[misc]
    assert isinstance(credentials.system_id, uuid.UUID)
