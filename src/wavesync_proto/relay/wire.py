"""The relay's wire format (docs/protocol.md §3): headers, the standby signature, control lines.

This module owns every byte of the relay protocol that is not plain HTTP/1.1:
the paths and the upgrade token, the header names, how a standby request is
signed and checked, and the control lines a standby connection carries before
it turns into a tunnel. It does not parse HTTP (h11 does, in the machines) and
keeps no state: freshness windows and replay memory are the service's.

    server agent                         relay                            client
    GET /wavesync/relay/v1/standby  -->
                                    <--  101 (Wavesync-Standby-Count, -Keepalive)
                                    <--  PING                 (every keep-alive interval)
                                                          <--  GET /wavesync/relay/v1/connect
                                    <--  OPEN <session> <client address>
    READY <session>                 -->
                                                          -->  101 (Wavesync-Session)
    <======================= raw bytes, both ways, spliced by the relay =======================>
"""

from __future__ import annotations

import hashlib
import hmac
import re
import uuid
from dataclasses import dataclass

from ..addresses import Endpoint, format_endpoint, parse_endpoint
from ..errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "CONNECT_PATH",
    "MAX_CONTROL_LINE",
    "STANDBY_PATH",
    "UPGRADE_PROTOCOL",
    "ControlLine",
    "Open",
    "Ping",
    "Ready",
    "StandbyCredentials",
    "encode_control",
    "parse_control",
    "sign_standby",
    "split_control_line",
]

STANDBY_PATH = "/wavesync/relay/v1/standby"
CONNECT_PATH = "/wavesync/relay/v1/connect"
#: Both requests ask to switch to this protocol; a 101 naming it starts the raw phase.
UPGRADE_PROTOCOL = "wavesync-relay/1"

HEADER_SYSTEM = "wavesync-system"
HEADER_SERVER = "wavesync-server"
HEADER_TIME = "wavesync-time"
HEADER_NONCE = "wavesync-nonce"
HEADER_SIGNATURE = "wavesync-signature"
HEADER_SESSION = "wavesync-session"
HEADER_STANDBY_COUNT = "wavesync-standby-count"
HEADER_KEEPALIVE = "wavesync-keepalive"

#: The longest control line, CRLF included: an OPEN with an IPv6 address fits with room.
MAX_CONTROL_LINE = 128
_SIGNATURE_LABEL = b"wavesync-relay-standby/1"
_NONCE = re.compile(r"[0-9a-f]{32}")
_SIGNATURE = re.compile(r"[0-9a-f]{64}")
_SESSION = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True, kw_only=True)
class StandbyCredentials:
    """The signed fields of a standby request (all of them travel as headers)."""

    system_id: uuid.UUID
    server_id: uuid.UUID
    #: Unix time, whole seconds, when the request was made (the freshness window's anchor).
    unix_time: int
    #: 16 random bytes, hex: makes each request unique, so a copy is recognisably a replay.
    nonce: str
    #: HMAC-SHA256 over the fields above and the relay's host name, hex.
    signature: str

    def headers(self) -> list[tuple[str, str]]:
        return [
            (HEADER_SYSTEM, str(self.system_id)),
            (HEADER_SERVER, str(self.server_id)),
            (HEADER_TIME, str(self.unix_time)),
            (HEADER_NONCE, self.nonce),
            (HEADER_SIGNATURE, self.signature),
        ]

    @classmethod
    def from_headers(cls, headers: dict[str, str]) -> StandbyCredentials:
        """Parse the five headers; RemoteProtocolError (400) when one is missing or malformed."""
        system_id = parse_uuid_header(headers, HEADER_SYSTEM)
        server_id = parse_uuid_header(headers, HEADER_SERVER)
        raw_time = headers.get(HEADER_TIME, "")
        if not raw_time.isascii() or not raw_time.isdigit() or len(raw_time) > 12:
            raise RemoteProtocolError(f"{HEADER_TIME} must be unix seconds", error_code_hint=400)
        nonce = headers.get(HEADER_NONCE, "")
        if not _NONCE.fullmatch(nonce):
            raise RemoteProtocolError(f"{HEADER_NONCE} must be 32 hex digits", error_code_hint=400)
        signature = headers.get(HEADER_SIGNATURE, "")
        if not _SIGNATURE.fullmatch(signature):
            raise RemoteProtocolError(
                f"{HEADER_SIGNATURE} must be 64 hex digits", error_code_hint=400
            )
        return cls(
            system_id=system_id,
            server_id=server_id,
            unix_time=int(raw_time),
            nonce=nonce,
            signature=signature,
        )

    def verify(self, key: str, relay_host: str) -> bool:
        """Whether the signature was made with ``key`` for a relay called ``relay_host``."""
        try:
            expected = _signature(
                key,
                system_id=self.system_id,
                server_id=self.server_id,
                unix_time=self.unix_time,
                nonce=self.nonce,
                relay_host=relay_host,
            )
        except UnicodeError:
            # relay_host is the peer's Host header: a name IDNA cannot encode ("a..b", a
            # 64-letter label) cannot have been signed, and must not raise out of the relay.
            return False
        return hmac.compare_digest(expected, self.signature)


def sign_standby(
    *,
    key: str,
    system_id: uuid.UUID,
    server_id: uuid.UUID,
    unix_time: int,
    nonce: bytes,
    relay_host: str,
) -> StandbyCredentials:
    """Sign a standby request for ``relay_host`` (the Host header it is sent with).

    The caller supplies the time and 16 random bytes: the core reads neither a
    clock nor the operating system's randomness.
    """
    if len(nonce) != 16:
        raise LocalProtocolError("a standby nonce is 16 random bytes")
    if unix_time < 0:
        raise LocalProtocolError("unix_time must not be negative")
    try:
        relay_host.lower().encode("idna")
    except UnicodeError:
        raise LocalProtocolError(f"not a host name IDNA can encode: {relay_host!r}") from None
    nonce_hex = nonce.hex()
    return StandbyCredentials(
        system_id=system_id,
        server_id=server_id,
        unix_time=unix_time,
        nonce=nonce_hex,
        signature=_signature(
            key,
            system_id=system_id,
            server_id=server_id,
            unix_time=unix_time,
            nonce=nonce_hex,
            relay_host=relay_host,
        ),
    )


def _signature(
    key: str,
    *,
    system_id: uuid.UUID,
    server_id: uuid.UUID,
    unix_time: int,
    nonce: str,
    relay_host: str,
) -> str:
    # The relay's host name is signed so a request captured on its way to one relay
    # of a cluster cannot be replayed to another (each remembers only its own nonces).
    message = b"\n".join(
        (
            _SIGNATURE_LABEL,
            str(system_id).encode(),
            str(server_id).encode(),
            str(unix_time).encode(),
            nonce.encode(),
            relay_host.lower().encode("idna"),
        )
    )
    return hmac.new(key.encode("ascii"), message, hashlib.sha256).hexdigest()


def parse_uuid_header(headers: dict[str, str], name: str) -> uuid.UUID:
    """The UUID in header ``name``; RemoteProtocolError (400) when missing or malformed."""
    raw = headers.get(name)
    if raw is None:
        raise RemoteProtocolError(f"missing header {name}", error_code_hint=400)
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise RemoteProtocolError(
            f"{name} is not a UUID: {raw[:40]!r}", error_code_hint=400
        ) from None


def parse_session_id(raw: str) -> bytes:
    """A session id from its 32-hex-digit text; RemoteProtocolError when malformed."""
    if not _SESSION.fullmatch(raw):
        raise RemoteProtocolError(f"a session id is 32 hex digits, not {raw[:40]!r}")
    return bytes.fromhex(raw)


# --- control lines on a standby connection ------------------------------------------------


@dataclass(frozen=True)
class Ping:
    """Relay → server agent: this standby connection is still wanted."""


@dataclass(frozen=True, kw_only=True)
class Open:
    """Relay → server agent: a client is paired with this connection; answer READY."""

    session_id: bytes
    client_address: Endpoint


@dataclass(frozen=True, kw_only=True)
class Ready:
    """Server agent → relay: the tunnel for ``session_id`` is open; raw bytes follow."""

    session_id: bytes


ControlLine = Ping | Open | Ready


def encode_control(line: ControlLine) -> bytes:
    if isinstance(line, Ping):
        return b"PING\r\n"
    if isinstance(line, Open):
        if len(line.session_id) != 16:
            raise LocalProtocolError("a session id is 16 bytes")
        text = f"OPEN {line.session_id.hex()} {format_endpoint(line.client_address)}\r\n"
        return text.encode("ascii")
    if len(line.session_id) != 16:
        raise LocalProtocolError("a session id is 16 bytes")
    return f"READY {line.session_id.hex()}\r\n".encode("ascii")


def split_control_line(buffer: bytes) -> tuple[bytes | None, bytes]:
    """``(line, rest)`` when ``buffer`` starts with a whole CRLF line, else ``(None, buffer)``.

    RemoteProtocolError when no CRLF appears within ``MAX_CONTROL_LINE`` bytes,
    so a peer cannot make us buffer an endless line.
    """
    end = buffer.find(b"\r\n", 0, MAX_CONTROL_LINE)
    if end < 0:
        if len(buffer) >= MAX_CONTROL_LINE:
            raise RemoteProtocolError("control line too long")
        return None, buffer
    return buffer[:end], buffer[end + 2 :]


def parse_control(line: bytes) -> ControlLine:
    """One control line (without its CRLF); RemoteProtocolError for anything else."""
    try:
        words = line.decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise RemoteProtocolError("control line is not ASCII") from None
    match words:
        case ["PING"]:
            return Ping()
        case ["OPEN", session, address]:
            try:
                client_address = parse_endpoint(address)
            except LocalProtocolError as exc:
                raise RemoteProtocolError(f"OPEN: bad client address: {exc}") from None
            return Open(session_id=parse_session_id(session), client_address=client_address)
        case ["READY", session]:
            return Ready(session_id=parse_session_id(session))
    raise RemoteProtocolError(f"unknown control line {line[:40]!r}")
