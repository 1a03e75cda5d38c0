"""The probe's end-to-end check (docs/tunnel.md §7.1): a 32-byte echo through a finished tunnel.

This module owns the bytes of the check and both ends of it. The prober sends
``ECHO_REQUEST`` + 16 random bytes as the first stream bytes; a tunnel server
that sees them first answers ``ECHO_ANSWER`` + the same 16 bytes, and the
stream goes on after both as an ordinary tunnel. Each marker starts with 0xFF,
which no HTTP request, STUN message (its first two bits are 0) or TLS record
starts with, so the server decides at the first byte whether a stream is a
probe. It also says which first bytes of a raw connection (what a CONNECT
delivers to the server's port) read as an HTTP request. It draws no
randomness: the caller passes the 16 bytes in.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "ECHO_ANSWER",
    "ECHO_REQUEST",
    "EchoAnswer",
    "EchoCheck",
    "EchoReader",
    "NotEcho",
    "starts_http",
]

ECHO_REQUEST = b"\xffwavesync-probe?"
ECHO_ANSWER = b"\xffwavesync-probe!"
_NONCE = 16
_LENGTH = len(ECHO_REQUEST) + _NONCE


def starts_http(first: bytes) -> bool:
    """Whether a connection whose first byte is ``first[0]`` carries an HTTP request.

    Request methods are upper-case tokens (GET, POST, ...); anything else on the
    tunnel server's port arrived through a CONNECT: a raw stream (a probe's echo,
    STUN, TLS).
    """
    return bool(first) and 0x41 <= first[0] <= 0x5A


class EchoCheck:
    """The prober's side: ``request`` to send, then ``feed`` the stream until it says so."""

    def __init__(self, nonce: bytes) -> None:
        if len(nonce) != _NONCE:
            raise LocalProtocolError("the echo nonce is 16 random bytes")
        self.request = ECHO_REQUEST + nonce
        self._expected = ECHO_ANSWER + nonce
        self._received = bytearray()
        #: Stream bytes after the answer (the tunnel's own, once validated).
        self.rest = b""

    def feed(self, data: bytes) -> bool:
        """True once the whole answer came back intact; RemoteProtocolError when it differs
        (or the stream ended, ``data == b""``, before it was whole)."""
        if not data:
            raise RemoteProtocolError(
                f"the stream ended after {len(self._received)} of {_LENGTH} echo bytes"
            )
        self._received += data
        head = bytes(self._received[:_LENGTH])
        if head != self._expected[: len(head)]:
            raise RemoteProtocolError(f"the echo came back garbled: {head[:40]!r}")
        if len(self._received) < _LENGTH:
            return False
        self.rest = bytes(self._received[_LENGTH:])
        return True


@dataclass(frozen=True, kw_only=True)
class EchoAnswer:
    """The stream started with a probe's echo: write ``answer``; ``rest`` follows it."""

    answer: bytes
    rest: bytes


@dataclass(frozen=True, kw_only=True)
class NotEcho:
    """The stream did not start with an echo: ``data`` is its first bytes, untouched."""

    data: bytes


class EchoReader:
    """The tunnel server's side: decides from the first stream bytes, holding at most 32."""

    def __init__(self) -> None:
        self._held = bytearray()

    def feed(self, data: bytes) -> EchoAnswer | NotEcho | None:
        """None while undecided; ``data == b""`` (the stream ended) decides ``NotEcho``."""
        if not data:
            return NotEcho(data=bytes(self._held))
        self._held += data
        head = bytes(self._held[: len(ECHO_REQUEST)])
        if head != ECHO_REQUEST[: len(head)]:
            return NotEcho(data=bytes(self._held))
        if len(self._held) < _LENGTH:
            return None
        nonce = bytes(self._held[len(ECHO_REQUEST) : _LENGTH])
        return EchoAnswer(answer=ECHO_ANSWER + nonce, rest=bytes(self._held[_LENGTH:]))
