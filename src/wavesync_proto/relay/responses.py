"""The requester's side of a relay handshake: write one request, read the relay's one answer.

This module owns what the server agent and the client share: building the
upgrade request and reading the answer with h11 into "switched, with these
headers and these first tunnel bytes" or "refused, with this status and
reason". What a request asks for and what an answer means to each of them is
``standby.py``'s and ``client.py``'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import h11

from ..errors import RemoteProtocolError
from .wire import UPGRADE_PROTOCOL

__all__ = ["Refused", "Switched", "UpgradeExchange"]

# The longest answer head we read; the relay's are a few hundred bytes.
_MAX_HEAD = 8192
# How much of an error body is kept as its reason.
_MAX_REASON = 512


@dataclass(frozen=True, kw_only=True)
class Switched:
    """The relay answered 101: the connection is now raw bytes."""

    #: Lower-case header name → value.
    headers: dict[str, str]
    #: Bytes that came after the 101 in the same reads: the tunnel's first bytes.
    trailing: bytes


@dataclass(frozen=True, kw_only=True)
class Refused:
    """The relay answered with anything but 101."""

    status: int
    reason: str
    headers: dict[str, str]

    @property
    def retry_after(self) -> float | None:
        """The relay's Retry-After in seconds, when it gave a number."""
        value = self.headers.get("retry-after", "")
        return float(value) if value.isascii() and value.isdigit() else None


class UpgradeExchange:
    """One upgrade request to the relay and the reading of its one answer."""

    def __init__(self, *, host: str, path: str, headers: Sequence[tuple[str, str]]) -> None:
        self._http = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_HEAD)
        request = h11.Request(
            method="GET",
            target=path,
            headers=[
                ("Host", host),
                ("Connection", "Upgrade"),
                ("Upgrade", UPGRADE_PROTOCOL),
                *headers,
            ],
        )
        #: The request's bytes, to be written first.
        self.request = self._http.send(request) + self._http.send(h11.EndOfMessage())
        self._refusal: h11.Response | None = None
        self._reason = bytearray()

    def feed(self, data: bytes) -> Switched | Refused | None:
        """The answer once it is complete; RemoteProtocolError for anything that is not HTTP."""
        if not data:
            return None  # to h11 an empty read means end of file: that is connection_closed()
        self._http.receive_data(data)
        while True:
            try:
                event = self._http.next_event()
            except h11.RemoteProtocolError as exc:
                raise RemoteProtocolError(f"the relay's answer is not HTTP/1.1: {exc}") from None
            if event is h11.NEED_DATA:
                return None
            if isinstance(event, h11.InformationalResponse):
                if event.status_code != 101:
                    continue  # 1xx other than 101 carry nothing for us (RFC 9110 §15.2)
                return Switched(
                    headers=_header_dict(event.headers),
                    trailing=bytes(self._http.trailing_data[0]),
                )
            if isinstance(event, h11.Response):
                self._refusal = event
            elif isinstance(event, h11.Data):
                room = _MAX_REASON - len(self._reason)
                self._reason += event.data[: max(room, 0)]
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return self._refused()
            elif event is h11.PAUSED:  # pragma: no cover - a Response ends in EndOfMessage
                return None

    def connection_closed(self) -> Refused | None:
        """The relay closed: a refusal whose body ran to the close, or None if none began."""
        if self._refusal is None:
            return None
        return self._refused()

    def _refused(self) -> Refused:
        assert self._refusal is not None
        reason = self._reason.decode("utf-8", "replace").strip()
        return Refused(
            status=self._refusal.status_code,
            reason=reason or self._refusal.reason.decode("latin-1"),
            headers=_header_dict(self._refusal.headers),
        )


def _header_dict(headers: Sequence[tuple[bytes, bytes]]) -> dict[str, str]:
    return {name.decode("ascii"): value.decode("latin-1") for name, value in headers}
