"""The relay's side of a handshake (docs/protocol.md §3): read one request, write one answer.

This module owns turning the bytes a new connection sends into a
``StandbyRequest`` or a ``ClientRequest`` (with h11 doing the HTTP), and the
exact bytes of every answer the relay gives (101 and the error statuses). It
does not decide anything: whether a signature is fresh, a pool has room or a
server is known is the service's business.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11

from ..errors import RemoteProtocolError
from ..tunnel.wire import PATH_PREFIX as TUNNEL_PATH_PREFIX
from .wire import (
    CONNECT_PATH,
    HEADER_SERVER,
    HEADER_SYSTEM,
    STANDBY_PATH,
    UPGRADE_PROTOCOL,
    StandbyCredentials,
    parse_uuid_header,
)

__all__ = [
    "ClientRequest",
    "RequestReader",
    "StandbyRequest",
    "TunnelRequestSeen",
    "error_response",
    "switching_response",
]

_REASONS = {
    101: "Switching Protocols",
    307: "Temporary Redirect",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",
    426: "Upgrade Required",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


@dataclass(frozen=True, kw_only=True)
class StandbyRequest:
    """A server agent offers an idle connection for its server id."""

    credentials: StandbyCredentials
    #: The Host header, which the signature covers.
    host: str


@dataclass(frozen=True, kw_only=True)
class ClientRequest:
    """A client asks to be paired with a server (by server id) or any server of a system."""

    server_id: uuid.UUID | None
    system_id: uuid.UUID | None


@dataclass(frozen=True, kw_only=True)
class TunnelRequestSeen:
    """The request opens an HTTP tunnel (its path starts ``/wavesync/tunnel/v1/``, in
    origin or absolute form): the connection belongs to the tunnel machinery, which
    reads the request again from ``received`` (every byte the connection sent so far)."""

    received: bytes


class RequestError(RemoteProtocolError):
    """The request cannot be served; ``status`` is the HTTP answer to give."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason, error_code_hint=status)
        self.status = status


class RequestReader:
    """Reads exactly one request from a new connection and keeps what follows it."""

    def __init__(self, *, max_request_bytes: int) -> None:
        self._http = h11.Connection(h11.SERVER, max_incomplete_event_size=max_request_bytes)
        self._max_request_bytes = max_request_bytes
        self._received = 0
        # Every byte so far, for a tunnel request (read again by the tunnel machinery);
        # bounded by the head limit plus one read, as the head must end within the limit.
        self._raw = bytearray()
        self._request: StandbyRequest | ClientRequest | None = None

    def feed(self, data: bytes) -> StandbyRequest | ClientRequest | TunnelRequestSeen | None:
        """The request once its last byte is in, else None; ``RequestError`` if not ours.

        A tunnel request is reported as soon as its head is in (a getpost POST's
        body may never end), as ``TunnelRequestSeen``."""
        if not data:
            return None  # to h11 an empty read means end of file, after which it reads nothing
        self._http.receive_data(data)
        self._received += len(data)
        self._raw += data
        while True:
            try:
                event = self._http.next_event()
            except h11.RemoteProtocolError as exc:
                raise RequestError(exc.error_status_hint, f"malformed HTTP: {exc}") from None
            if event is h11.NEED_DATA:
                return None
            if isinstance(event, h11.Request):
                # h11 bounds only a head still incomplete; one that arrived whole in one
                # read is measured here, so the limit does not depend on read sizes.
                if self._received - len(self.trailing_data) > self._max_request_bytes:
                    raise RequestError(431, "request head too large")
                if _is_tunnel(event.target):
                    return TunnelRequestSeen(received=bytes(self._raw))
                self._request = _interpret(event)
            elif isinstance(event, h11.Data):
                raise RequestError(400, "relay requests have no body")
            elif isinstance(event, h11.EndOfMessage | h11.PAUSED):
                return self._request
            elif isinstance(event, h11.ConnectionClosed):  # pragma: no cover - feed never sees EOF
                return None

    @property
    def trailing_data(self) -> bytes:
        """Bytes that arrived after the request's end (the first bytes of the tunnel)."""
        return bytes(self._http.trailing_data[0])


def _is_tunnel(target: bytes) -> bool:
    text = target.decode("ascii", "replace")
    if not text.startswith("/"):  # absolute form, through a forward proxy
        text = urlsplit(text).path
    return text.startswith(TUNNEL_PATH_PREFIX)


def _interpret(request: h11.Request) -> StandbyRequest | ClientRequest:
    target = request.target.decode("ascii", "replace")
    if target not in (STANDBY_PATH, CONNECT_PATH):
        raise RequestError(404, f"no such relay path: {target[:80]}")
    if request.method != b"GET":
        raise RequestError(405, f"{target} takes GET")
    headers = _header_dict(request)
    if headers.get("content-length", "0") != "0" or "transfer-encoding" in headers:
        raise RequestError(400, "relay requests have no body")
    # "recipients SHOULD use case-insensitive comparison when matching each protocol-name"
    # (RFC 9110 §7.8); UPGRADE_PROTOCOL is written in lower case.
    upgrade = [token.strip().lower() for token in headers.get("upgrade", "").split(",")]
    connection = [token.strip().lower() for token in headers.get("connection", "").split(",")]
    if UPGRADE_PROTOCOL not in upgrade or "upgrade" not in connection:
        raise RequestError(426, f"send Connection: Upgrade and Upgrade: {UPGRADE_PROTOCOL}")
    try:
        if target == STANDBY_PATH:
            credentials = StandbyCredentials.from_headers(headers)
            host = headers.get("host")
            if host is None:  # HTTP/1.0 may leave it out
                raise RequestError(400, "a standby request needs the Host header it signed")
            return StandbyRequest(credentials=credentials, host=host)
        return _client_request(headers)
    except RequestError:
        raise
    except RemoteProtocolError as exc:
        raise RequestError(400, str(exc)) from None


def _header_dict(request: h11.Request) -> dict[str, str]:
    """Lower-case name → value; a repeated header is joined with commas (RFC 9110 §5.3),
    except ours, which must appear once."""
    headers: dict[str, str] = {}
    for name, value in request.headers:
        key = name.decode("ascii")
        if key not in headers:
            headers[key] = value.decode("latin-1")
        elif key.startswith("wavesync-"):
            raise RequestError(400, f"header {key} given twice")
        else:
            headers[key] += ", " + value.decode("latin-1")
    return headers


def _client_request(headers: dict[str, str]) -> ClientRequest:
    has_server, has_system = HEADER_SERVER in headers, HEADER_SYSTEM in headers
    if has_server == has_system:
        raise RequestError(400, f"name exactly one of {HEADER_SERVER} and {HEADER_SYSTEM}")
    if has_server:
        return ClientRequest(server_id=parse_uuid_header(headers, HEADER_SERVER), system_id=None)
    return ClientRequest(server_id=None, system_id=parse_uuid_header(headers, HEADER_SYSTEM))


def switching_response(headers: Sequence[tuple[str, str]]) -> bytes:
    """The 101 that ends a handshake; raw bytes follow it."""
    lines = [
        "HTTP/1.1 101 Switching Protocols",
        "Connection: Upgrade",
        f"Upgrade: {UPGRADE_PROTOCOL}",
    ]
    lines.extend(f"{name}: {value}" for name, value in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def error_response(status: int, reason: str, headers: Sequence[tuple[str, str]] = ()) -> bytes:
    """A complete error answer with ``reason`` as its text body; the relay closes after it."""
    body = (reason + "\n").encode("utf-8", "replace")
    lines = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    lines.extend(f"{name}: {value}" for name, value in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + body
