"""The tunnel server's front door (docs/tunnel.md §1): read one request, say which tunnel it opens.

This module owns reading the first request on a connection the HTTP face
accepted (h11 does the HTTP, within ``max_head`` bytes) and deciding whether it
is one of ours: which method, which getpost tunnel id and sequence number,
and the exact error answer when it is not. It does not open the tunnel: the
adapter hands a ``TunnelRequest`` to the method's server machine (or, for
getpost, to ``GetPostRegistry``).
"""

from __future__ import annotations

from dataclasses import dataclass

import h11

from .answer import header_dict, tokens
from .wire import (
    PATH_PREFIX,
    UPGRADE_PROTOCOL,
    TunnelLimits,
    TunnelMethod,
    error_response,
    parse_tunnel_id,
)

__all__ = ["RequestRejected", "TunnelRequest", "TunnelRequestReader"]

#: The longest POST body we accept to be announced: 2**62 (a Content-Length must fit a
#: signed 64-bit integer in every proxy on the way, and we add offsets to it).
MAX_CONTENT_LENGTH = 1 << 62


@dataclass(frozen=True, kw_only=True)
class TunnelRequest:
    """A request that opens (or, for getpost, joins) a tunnel."""

    method: TunnelMethod
    #: ``GET`` or ``POST`` (getpost's upstream legs are the POSTs).
    verb: str
    path: str
    #: Lower-case name → value.
    headers: dict[str, str]
    #: getpost: the tunnel id both legs name; None for other methods.
    tunnel_id: bytes | None = None
    #: getpost POST: its place in the upstream (0, 1, ...); None for a GET.
    sequence: int | None = None
    #: getpost POST: the body length it announced.
    content_length: int | None = None
    #: The request's head as it arrived (the websocket server hands it to wsproto).
    head: bytes
    #: Bytes after the head in the same reads: the tunnel's (or the POST body's) first bytes.
    trailing: bytes


@dataclass(frozen=True, kw_only=True)
class RequestRejected:
    """Not a tunnel request (or not one this server will serve): write ``response``, close."""

    status: int
    reason: str
    #: The complete error answer (empty when the peer closed before a request).
    response: bytes = b""


def rejection(status: int, reason: str) -> RequestRejected:
    """A rejection with its answer (none for status 0: nobody is left to read it)."""
    response = error_response(status, reason) if status else b""
    return RequestRejected(status=status, reason=reason, response=response)


class _RefusalError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


class TunnelRequestReader:
    """Reads exactly one request from a new connection; never raises for the peer's bytes."""

    def __init__(self, *, limits: TunnelLimits | None = None) -> None:
        self.limits = limits or TunnelLimits()
        self._http = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_head)
        self._received = bytearray()
        self._outgoing = b""
        self._result: TunnelRequest | RequestRejected | None = None
        self._reported = False

    @property
    def buffered(self) -> int:
        """Bytes held while the request is incomplete (at most ``max_head`` plus one read)."""
        return 0 if self._result is not None else len(self._received)

    def receive_data(self, data: bytes) -> None:
        """Bytes the connection read (``b""``: its end of file)."""
        if self._result is not None:
            return  # after the request, bytes are the tunnel's and go to its machine
        self._received += data
        self._http.receive_data(data)
        try:
            self._result = self._read()
        except _RefusalError as refusal:
            self._result = rejection(refusal.status, refusal.reason)
            self._outgoing = self._result.response
        if self._result is not None:
            self._received = bytearray()

    def next_event(self) -> TunnelRequest | RequestRejected | None:
        """The request or the rejection, once; then None."""
        if self._result is None or self._reported:
            return None
        self._reported = True
        return self._result

    def data_to_send(self) -> bytes:
        data, self._outgoing = self._outgoing, b""
        return data

    def _read(self) -> TunnelRequest | None:
        try:
            event = self._http.next_event()
        except h11.RemoteProtocolError as exc:
            raise _RefusalError(exc.error_status_hint, f"malformed HTTP: {exc}") from None
        if event is h11.NEED_DATA:
            return None
        if isinstance(event, h11.ConnectionClosed):
            raise _RefusalError(0, "the connection closed before a request")
        if not isinstance(event, h11.Request):  # pragma: no cover - a server's first event
            raise _RefusalError(400, "expected a request")
        trailing = bytes(self._http.trailing_data[0])
        head = bytes(self._received[: len(self._received) - len(trailing)])
        # h11 bounds only a head still incomplete; one that arrived whole in one read is
        # measured here, so the limit does not depend on read sizes.
        if len(head) > self.limits.max_head:
            raise _RefusalError(431, "request head too large")
        return _interpret(event, head, trailing)


def _interpret(request: h11.Request, head: bytes, trailing: bytes) -> TunnelRequest:
    path = _origin_path(request.target.decode("ascii", "replace"))
    if not path.startswith(PATH_PREFIX):
        raise _RefusalError(404, f"no tunnel at {path[:80]}")
    parts = path[len(PATH_PREFIX) :].split("/")
    try:
        method = TunnelMethod(parts[0])
    except ValueError:
        raise _RefusalError(404, f"no tunnel method {parts[0][:40]!r}") from None
    if method is TunnelMethod.CONNECT:
        raise _RefusalError(404, "connect tunnels go through a proxy, not to this path")
    headers = header_dict(request.headers)
    verb = request.method.decode("ascii", "replace")
    if method is TunnelMethod.GETPOST:
        return _getpost(
            parts[1:], headers, method=method, verb=verb, path=path, head=head, trailing=trailing
        )
    if len(parts) != 1:
        raise _RefusalError(404, f"no tunnel at {path[:80]}")
    if verb != "GET":
        raise _RefusalError(405, f"{method.value} tunnels open with GET")
    _no_body(headers)
    if "upgrade" not in [token.lower() for token in tokens(headers.get("connection", ""))]:
        raise _RefusalError(426, "send Connection: Upgrade")
    offered = [token.lower() for token in tokens(headers.get("upgrade", ""))]
    # "recipients SHOULD use case-insensitive comparison when matching each protocol-name"
    # (RFC 9110 §7.8); the token is sent in lower case, as Squid's matching needs.
    wanted = UPGRADE_PROTOCOL if method is TunnelMethod.UPGRADE else "websocket"
    if wanted not in offered:
        raise _RefusalError(426, f"send Upgrade: {wanted}")
    return TunnelRequest(
        method=method, verb=verb, path=path, headers=headers, head=head, trailing=trailing
    )


def _getpost(
    parts: list[str],
    headers: dict[str, str],
    *,
    method: TunnelMethod,
    verb: str,
    path: str,
    head: bytes,
    trailing: bytes,
) -> TunnelRequest:
    if not parts or len(parts) > 2:
        raise _RefusalError(404, "getpost paths are getpost/<tunnel id>[/<sequence>]")
    tunnel_id = parse_tunnel_id(parts[0])
    if tunnel_id is None:
        raise _RefusalError(404, "a tunnel id is 32 lower-case hex digits")
    if len(parts) == 1:
        if verb != "GET":
            raise _RefusalError(405, "getpost/<tunnel id> takes GET")
        _no_body(headers)
        return TunnelRequest(
            method=method,
            verb=verb,
            path=path,
            headers=headers,
            tunnel_id=tunnel_id,
            head=head,
            trailing=trailing,
        )
    raw_sequence = parts[1]
    if not (raw_sequence.isascii() and raw_sequence.isdigit() and len(raw_sequence) <= 12):
        raise _RefusalError(404, "a sequence number is at most 12 decimal digits")
    if verb != "POST":
        raise _RefusalError(405, "getpost/<tunnel id>/<sequence> takes POST")
    if "transfer-encoding" in headers:
        raise _RefusalError(400, "getpost POSTs announce a Content-Length, not a transfer coding")
    raw_length = headers.get("content-length", "")
    if not (raw_length.isascii() and raw_length.isdigit()) or not (
        0 < int(raw_length) <= MAX_CONTENT_LENGTH
    ):
        raise _RefusalError(400, f"Content-Length must be in [1, {MAX_CONTENT_LENGTH}]")
    return TunnelRequest(
        method=method,
        verb=verb,
        path=path,
        headers=headers,
        tunnel_id=tunnel_id,
        sequence=int(raw_sequence),
        content_length=int(raw_length),
        head=head,
        trailing=trailing,
    )


def _no_body(headers: dict[str, str]) -> None:
    if headers.get("content-length", "0") != "0" or "transfer-encoding" in headers:
        raise _RefusalError(400, "this request has no body")


def _origin_path(target: str) -> str:
    """The path of an origin-form or absolute-form target (RFC 9112 §3.2), query dropped."""
    if target.startswith(("http://", "https://")):
        slash = target.find("/", target.index("//") + 2)
        target = "/" if slash < 0 else target[slash:]
    return target.split("?", 1)[0]
