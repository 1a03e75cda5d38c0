"""The requesting side's HTTP: write one request head, read the one answer that ends a handshake.

This module owns h11 on the tunnel *client* (upgrade, connect, getpost legs):
building a request, reading the answer's head within ``max_head`` bytes, and
handing back the bytes that arrived after it. What the status means is the
method's business.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import h11

from ..errors import RemoteProtocolError

__all__ = ["Answer", "AnswerReader"]


@dataclass(frozen=True, kw_only=True)
class Answer:
    """The head of the answer that ends a handshake."""

    status: int
    reason: str
    #: Lower-case name → value (a repeated header is joined with commas).
    headers: dict[str, str]
    #: Bytes after the head: the tunnel's first bytes after 101 or a CONNECT's 2xx, else
    #: ``b""`` (the body of other answers stays in h11, which ``reader`` can keep reading).
    trailing: bytes


class AnswerReader:
    """Writes one request and reads the head of its answer (1xx other than 101 skipped)."""

    def __init__(
        self,
        *,
        method: str,
        target: str,
        headers: Sequence[tuple[str, str]],
        max_head: int,
    ) -> None:
        self.http = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_head)
        self._max_head = max_head
        self._received = 0
        request = h11.Request(method=method, target=target, headers=list(headers))
        # No request of ours has a body (a POST's is ours to write, after its head).
        self.request = self.http.send(request) or b""
        if method != "POST":
            self.request += self.http.send(h11.EndOfMessage()) or b""
        self._done = False

    @property
    def buffered(self) -> int:
        """Answer bytes held while the head is incomplete (never much above ``max_head``)."""
        return 0 if self._done else self._received

    def feed(self, data: bytes) -> Answer | None:
        """The answer's head once complete; RemoteProtocolError when it is not HTTP/1.1,
        too large, or the connection ends first (``data == b""`` is the end of file)."""
        self.http.receive_data(data)
        self._received += len(data)
        while True:
            try:
                event = self.http.next_event()
            except h11.RemoteProtocolError as exc:
                if not data:
                    raise RemoteProtocolError("the connection closed before the answer") from None
                raise RemoteProtocolError(f"the answer is not HTTP/1.1: {exc}") from None
            if event is h11.NEED_DATA:
                return None
            if isinstance(event, h11.ConnectionClosed):
                raise RemoteProtocolError("the connection closed before the answer")
            if isinstance(event, h11.InformationalResponse) and event.status_code != 101:
                continue  # 100 Continue and friends carry nothing for us (RFC 9110 §15.2)
            if isinstance(event, h11.InformationalResponse | h11.Response):
                self._done = True
                unread = bytes(self.http.trailing_data[0])
                # h11 bounds only a head still incomplete; one that arrived whole in one
                # read is measured here, so the limit does not depend on read sizes.
                if self._received - len(unread) > self._max_head:
                    raise RemoteProtocolError("the answer's head is too large")
                switched = self.http.their_state is h11.SWITCHED_PROTOCOL
                return Answer(
                    status=event.status_code,
                    reason=event.reason.decode("latin-1"),
                    headers=header_dict(event.headers),
                    trailing=unread if switched else b"",
                )
            # A Data or EndOfMessage cannot come before a head: h11 would have raised.
            raise RemoteProtocolError(f"unexpected {type(event).__name__} before the answer")


def header_dict(headers: Sequence[tuple[bytes, bytes]]) -> dict[str, str]:
    """Lower-case name → value; a repeated header is joined with commas (RFC 9110 §5.3)."""
    result: dict[str, str] = {}
    for name, value in headers:
        key, text = name.decode("ascii").lower(), value.decode("latin-1")
        result[key] = f"{result[key]}, {text}" if key in result else text
    return result


def tokens(value: str) -> list[str]:
    """The comma-separated tokens of a header value, stripped (case kept)."""
    return [token.strip() for token in value.split(",") if token.strip()]
