"""The tunnel wire format (docs/tunnel.md): paths, tokens, limits, and the small codecs.

This module owns every byte of the HTTP tunnels that is ours rather than
HTTP's: the paths and the upgrade token, how a tunnel id is written, the
``Proxy-Authorization: Basic`` value (RFC 7617), the chunk framing of the
getpost upstream (the chunked coding of RFC 9112 §7.1, without extensions or
trailers) and the error answers a tunnel server gives. It keeps no state
beyond one parser's buffer and knows nothing about which role plays it.
"""

from __future__ import annotations

import base64
import enum
import re
from dataclasses import dataclass

from ..errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "PATH_PREFIX",
    "UPGRADE_PROTOCOL",
    "WEBSOCKET_SUBPROTOCOL",
    "ChunkReader",
    "ProxyConfig",
    "TunnelLimits",
    "TunnelMethod",
    "encode_chunk",
    "error_response",
    "format_tunnel_id",
    "parse_tunnel_id",
    "tunnel_path",
]

#: Every tunnel request's path starts here; the method follows (``/wavesync/tunnel/v1/upgrade``).
PATH_PREFIX = "/wavesync/tunnel/v1/"
#: ``Upgrade`` token of the upgrade method. Squid matches these case-sensitively
#: (``http_upgrade_request_protocols``), so it is sent exactly as written here.
UPGRADE_PROTOCOL = "wavesync-tunnel/1"
#: ``Sec-WebSocket-Protocol`` the websocket method offers and the server echoes.
WEBSOCKET_SUBPROTOCOL = "wavesync-tunnel.v1"
#: Headers of ours; each must appear at most once.
HEADER_TUNNEL = "wavesync-tunnel"

_TUNNEL_ID = re.compile(r"[0-9a-f]{32}")
_REASONS = {
    101: "Switching Protocols",
    200: "OK",
    204: "No Content",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",
    426: "Upgrade Required",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


class TunnelMethod(enum.Enum):
    """How a tunnel rides HTTP. ``ssl`` is not a member: any method runs over TLS
    when the adapter puts TLS under it (docs/tunnel.md §ssl)."""

    UPGRADE = "upgrade"
    WEBSOCKET = "websocket"
    CONNECT = "connect"
    GETPOST = "getpost"


@dataclass(frozen=True, kw_only=True)
class TunnelLimits:
    """What a tunnel machine holds of a peer's bytes, at most."""

    #: A request or response head (request line or status line and headers).
    max_head: int = 8192
    #: One getpost upstream chunk, and the longest chunk the getpost sender writes.
    max_chunk: int = 65536
    #: Content-Length of each getpost POST: the upstream bytes one POST carries. 496 KiB, so
    #: that a POST's head and body (a head is under 16 KiB) never fill squid's request buffer
    #: (``client_request_buffer_max_size``, 512 KiB by default): squid before the fix of its
    #: bug 5405 (5.7 included) then reads with no room, takes that for the client's EOF and
    #: aborts the POST, whenever the origin drains it slower than the client sends
    #: (docs/tunnel.md §5.2). The cost is one round trip per POST.
    post_length: int = 496 * 1024
    #: Bytes of an error body kept as the reason of a refusal.
    max_reason: int = 512

    def __post_init__(self) -> None:
        if self.max_head < 256:
            raise LocalProtocolError("max_head below 256 bytes cannot hold a request")
        if not 16 <= self.max_chunk <= 1 << 24:
            raise LocalProtocolError("max_chunk must be in [16, 16 MiB]")
        if not 64 <= self.post_length <= 1 << 62:
            raise LocalProtocolError("post_length must be in [64, 2**62]")
        if self.max_reason < 0:
            raise LocalProtocolError("max_reason must not be negative")


@dataclass(frozen=True, kw_only=True)
class ProxyConfig:
    """An explicitly configured HTTP proxy (``from_url("http://user:pass@host:port")``)."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None

    @classmethod
    def from_url(cls, url: str) -> ProxyConfig:
        """``http://user:pass@host:port`` (the ``--proxy`` and ``*_proxy`` form; see
        ``proxy_env.parse_proxy_url`` for every rule)."""
        from .proxy_env import parse_proxy_url  # noqa: PLC0415 - proxy_env builds on this module

        return parse_proxy_url(url)

    def authorization(self) -> list[tuple[str, str]]:
        """The ``Proxy-Authorization`` header when credentials are configured (RFC 7617)."""
        if self.username is None:
            return []
        if ":" in self.username:
            raise LocalProtocolError("a Basic user-id cannot contain ':' (RFC 7617 §2)")
        secret = f"{self.username}:{self.password or ''}".encode()
        return [("Proxy-Authorization", "Basic " + base64.b64encode(secret).decode("ascii"))]


def authority(host: str, port: int) -> str:
    """``host:port`` with brackets around an IPv6 literal (RFC 9112 §3.2.3)."""
    if not 0 < port < 65536:
        raise LocalProtocolError(f"not a TCP port: {port!r}")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def tunnel_path(method: TunnelMethod, *parts: str) -> str:
    """The path of a tunnel request: ``/wavesync/tunnel/v1/<method>[/<part>...]``."""
    return PATH_PREFIX + "/".join((method.value, *parts))


def request_target(
    *, host: str, port: int, path: str, proxy: ProxyConfig | None
) -> tuple[str, list[tuple[str, str]]]:
    """The request target and the extra headers for a request to ``host:port``.

    Through a forward proxy over plain HTTP the target is in absolute form
    (RFC 9112 §3.2.2) and carries the proxy's credentials; straight to the
    server, or inside TLS or a CONNECT tunnel, it is in origin form.
    """
    if proxy is None:
        return path, []
    return f"http://{authority(host, port)}{path}", proxy.authorization()


def format_tunnel_id(tunnel_id: bytes) -> str:
    if len(tunnel_id) != 16:
        raise LocalProtocolError("a tunnel id is 16 random bytes")
    return tunnel_id.hex()


def parse_tunnel_id(text: str) -> bytes | None:
    """The 16 bytes of a 32-lower-case-hex tunnel id, or None when malformed."""
    return bytes.fromhex(text) if _TUNNEL_ID.fullmatch(text) else None


def encode_chunk(data: bytes) -> bytes:
    """One chunk of the chunked coding; ``b""`` makes the last chunk (the stream's end)."""
    if not data:
        return b"0\r\n\r\n"
    return b"%x\r\n%b\r\n" % (len(data), data)


class ChunkReader:
    """Reads the chunked coding (RFC 9112 §7.1) without extensions or trailers, bounded.

    Holds at most one chunk-size line (18 bytes) and hands chunk data out as it
    arrives, so its memory does not grow with the chunk size; a chunk larger
    than ``max_chunk`` is refused up front.
    """

    #: A size line or the CRLF after data, CRLF included: 16 hex digits would be absurd already.
    _MAX_LINE = 18

    def __init__(self, *, max_chunk: int) -> None:
        self._max_chunk = max_chunk
        self._line = bytearray()
        self._remaining = 0  # data bytes left in the current chunk
        self._after_data = False  # the next line is the CRLF that ends a chunk's data
        self._last = False  # the last chunk was read; its CRLF is due
        self.finished = False

    @property
    def buffered(self) -> int:
        """Bytes held that are not yet handed out (part of a size line or CRLF)."""
        return len(self._line)

    def feed(self, data: bytes) -> list[bytes]:
        """The chunk data in ``data``, as it arrives; ``finished`` once the last chunk is read.

        RemoteProtocolError for anything but well-formed chunks. Bytes after the
        last chunk are not read (``feed`` returns at once): what they mean is the
        caller's business.
        """
        out: list[bytes] = []
        position, size = 0, len(data)
        while position < size and not self.finished:
            if self._remaining:
                take = min(self._remaining, size - position)
                out.append(data[position : position + take])
                position += take
                self._remaining -= take
                if not self._remaining:
                    self._after_data = True
                continue
            room = self._MAX_LINE - len(self._line)
            end = data.find(b"\n", position, position + room)
            if end < 0:
                if size - position >= room:
                    raise RemoteProtocolError("chunk size line too long", error_code_hint=400)
                self._line += data[position:]
                break
            self._line += data[position : end + 1]
            position = end + 1
            line = bytes(self._line)
            self._line.clear()
            self._line_done(line)
        return out

    def _line_done(self, line: bytes) -> None:
        if not line.endswith(b"\r\n"):
            raise RemoteProtocolError("chunk line not ended by CRLF", error_code_hint=400)
        line = line[:-2]
        if self._after_data or self._last:
            if line:
                raise RemoteProtocolError("chunk data not followed by CRLF", error_code_hint=400)
            self._after_data = False
            self.finished = self._last
            return
        chunk = _chunk_size(line)
        if chunk > self._max_chunk:
            raise RemoteProtocolError(
                f"chunk of {chunk} bytes exceeds the limit of {self._max_chunk}",
                error_code_hint=413,
            )
        if chunk == 0:
            self._last = True
        else:
            self._remaining = chunk


def _chunk_size(line: bytes) -> int:
    if not 0 < len(line) <= 16 or not all(c in b"0123456789abcdefABCDEF" for c in line):
        raise RemoteProtocolError(f"bad chunk size line {line[:20]!r}", error_code_hint=400)
    return int(line, 16)


def error_response(status: int, reason: str) -> bytes:
    """A complete answer with ``reason`` as its text body; the server closes after it."""
    body = (reason + "\n").encode("utf-8", "replace")
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body
