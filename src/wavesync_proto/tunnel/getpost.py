"""The getpost method (docs/tunnel.md §5): a long GET carries downstream, POSTs carry upstream.

This module owns both ends of a getpost tunnel and how its two kinds of legs
are sequenced. Downstream is the chunked body of one long GET response.
Upstream is a chunked-coded stream (RFC 9112 §7.1 syntax) cut into the bodies
of POSTs of ``post_length`` bytes each; POST *n* is sent only after the server
answered 204 to POST *n-1*, which it does once that body is all in, so the
bodies join end to end with no byte lost or repeated. An empty chunk ends a
direction. It does not pair legs with tunnels (``registry.py`` does) and
draws no tunnel id: the caller passes 16 random bytes in.
"""

from __future__ import annotations

import h11

from ..errors import LocalProtocolError, RemoteProtocolError
from .answer import AnswerReader
from .requests import RequestRejected, TunnelRequest, rejection
from .stream import OpenLeg, TunnelEndpoint, TunnelState
from .wire import (
    ChunkReader,
    ProxyConfig,
    TunnelLimits,
    TunnelMethod,
    authority,
    encode_chunk,
    format_tunnel_id,
    request_target,
    tunnel_path,
)

__all__ = ["DOWNSTREAM_LEG", "GetPostClient", "GetPostServer"]

#: The GET's leg; POST ``n`` rides leg ``n + 1`` on both ends.
DOWNSTREAM_LEG = 0

_NO_CACHE = [("Cache-Control", "no-cache, no-store"), ("Pragma", "no-cache")]
_DOWNSTREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: application/octet-stream\r\n"
    b"Cache-Control: no-cache, no-store\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
_POST_DONE = b"HTTP/1.1 204 No Content\r\nCache-Control: no-store\r\n\r\n"
# An answer before the body's end (the upstream ended early): the connection cannot be reused.
_POST_ENDED = b"HTTP/1.1 204 No Content\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n"


def _chunks(data: bytes, max_chunk: int) -> bytes:
    if len(data) <= max_chunk:
        return encode_chunk(data)
    return b"".join(
        encode_chunk(data[start : start + max_chunk]) for start in range(0, len(data), max_chunk)
    )


class GetPostClient(TunnelEndpoint):
    """The client: leg 0 is ``GET getpost/<id>``; after its 200, leg ``n + 1`` is ``POST n``."""

    method = TunnelMethod.GETPOST

    def __init__(
        self,
        *,
        host: str,
        port: int,
        tunnel_id: bytes,
        proxy: ProxyConfig | None = None,
        limits: TunnelLimits | None = None,
    ) -> None:
        """``tunnel_id``: 16 bytes from a secrets-quality source; they name the tunnel to the
        server and are the only thing that keeps a stranger's POST out of it."""
        super().__init__(limits=limits)
        self._host, self._port, self._proxy = host, port, proxy
        self._id_text = format_tunnel_id(tunnel_id)
        target, extra = self._target()
        self._down = AnswerReader(
            method="GET",
            target=target,
            headers=[("Host", authority(host, port)), *_NO_CACHE, *extra],
            max_head=self.limits.max_head,
        )
        self._down_open = False  # the GET's 200 arrived
        self._outgoing[DOWNSTREAM_LEG] += self._down.request
        self._pending = bytearray()  # framed upstream bytes not yet in a POST body
        self._sequence = -1  # the POST being written
        self._post: AnswerReader | None = None
        self._post_left = 0  # body bytes the current POST can still carry
        self._end_written = False  # the last chunk is in a POST body

    @property
    def buffered(self) -> int:
        readers = [self._down, *([self._post] if self._post else [])]
        return sum(reader.buffered for reader in readers)

    @property
    def awaiting_answer(self) -> int | None:
        """The POST leg whose answer the upstream waits for (its body is full, or carries the
        last chunk): the caller must read that leg. None while the current POST has room."""
        if self._post is None:
            return None
        if not self._post_left or (self._end_written and not self._pending):
            return self._sequence + 1
        return None

    def _target(self, *parts: str) -> tuple[str, list[tuple[str, str]]]:
        path = tunnel_path(TunnelMethod.GETPOST, self._id_text, *parts)
        return request_target(host=self._host, port=self._port, path=path, proxy=self._proxy)

    # --- downstream ------------------------------------------------------------------

    def _receive(self, data: bytes, leg: int) -> None:
        if leg == DOWNSTREAM_LEG:
            self._receive_down(data)
        elif leg == self._sequence + 1 and self._post is not None:
            self._receive_up(data)
        # Bytes on a finished POST's leg are a late answer to something already settled.

    def _receive_down(self, data: bytes) -> None:
        if self._peer_ended:
            return  # the last chunk came: the server closing its GET leg is no news
        try:
            if not self._down_open:
                answer = self._down.feed(data)
                if answer is None:
                    return
                if answer.status != 200:
                    retry = answer.headers.get("retry-after")
                    self._fail(
                        f"getpost GET refused: {answer.status} {answer.reason}",
                        status=answer.status,
                        headers=(("Retry-After", retry),) if retry else (),
                    )
                    return
                self._down_open = True
                self._next_post()
                self._established()  # the body's first bytes are already in h11
            else:
                self._down.http.receive_data(data)
            self._read_body(eof=not data)
        except RemoteProtocolError as exc:
            self._fail(f"getpost downstream: {exc}")

    def _read_body(self, *, eof: bool = False) -> None:
        while self._state is TunnelState.OPEN:
            try:
                event = self._down.http.next_event()
            except h11.RemoteProtocolError as exc:
                if eof:
                    raise RemoteProtocolError(
                        "the downstream closed before its last chunk"
                    ) from None
                raise RemoteProtocolError(f"the response body is not HTTP/1.1: {exc}") from None
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Data):
                self._data(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                self._peer_end()
                self._drop_leg(DOWNSTREAM_LEG)
                return
            elif isinstance(event, h11.ConnectionClosed):
                raise RemoteProtocolError("the downstream closed before its last chunk")

    # --- upstream --------------------------------------------------------------------

    def _next_post(self) -> None:
        self._sequence += 1
        leg = self._sequence + 1
        target, extra = self._target(str(self._sequence))
        length = self.limits.post_length
        self._post = AnswerReader(
            method="POST",
            target=target,
            headers=[
                ("Host", authority(self._host, self._port)),
                ("Content-Type", "application/octet-stream"),
                ("Content-Length", str(length)),
                *_NO_CACHE,
                *extra,
            ],
            max_head=self.limits.max_head,
        )
        self._post_left = length
        self._add_leg(leg)
        self._outgoing[leg] += self._post.request
        self._events.append(OpenLeg(leg=leg))
        self._flush_up()

    def _flush_up(self) -> None:
        if self._post is None or not self._pending or not self._post_left:
            return
        take = min(len(self._pending), self._post_left)
        self._outgoing[self._sequence + 1] += self._pending[:take]
        del self._pending[:take]
        self._post_left -= take

    def _send_stream(self, data: bytes) -> None:
        self._pending += _chunks(data, self.limits.max_chunk)
        self._flush_up()

    def _send_end(self) -> None:
        self._pending += encode_chunk(b"")
        self._flush_up()
        self._end_written = True

    def _receive_up(self, data: bytes) -> None:
        assert self._post is not None
        leg = self._sequence + 1
        try:
            answer = self._post.feed(data)
        except RemoteProtocolError as exc:
            if self._end_written and not self._pending:
                self._post = None  # the server closed after our last chunk: all is said
                self._drop_leg(leg)
                return
            self._fail(f"getpost POST {self._sequence}: {exc}")
            return
        if answer is None:
            return
        if not 200 <= answer.status < 300:
            self._fail(
                f"getpost POST {self._sequence} refused: {answer.status} {answer.reason}",
                status=answer.status,
            )
            return
        self._drop_leg(leg)
        self._post = None
        if self._end_written and not self._pending:
            return
        if self._post_left:
            self._fail(f"the server ended POST {self._sequence} before its body")
            return
        self._next_post()

    def _finished(self) -> None:
        # A POST that carried our last chunk stays open until the server answers it: closing
        # it at once could make a proxy drop the body's tail along with the request.
        self._eof.update(
            leg for leg in self._outgoing if self._post is None or leg != self._sequence + 1
        )


class GetPostServer(TunnelEndpoint):
    """The server's side of one getpost tunnel; ``GetPostRegistry`` creates and joins them."""

    method = TunnelMethod.GETPOST

    def __init__(self, request: TunnelRequest, *, limits: TunnelLimits | None = None) -> None:
        if request.method is not TunnelMethod.GETPOST or request.verb != "GET":
            raise LocalProtocolError("a getpost tunnel starts with its GET")
        assert request.tunnel_id is not None
        super().__init__(limits=limits)
        self.tunnel_id = request.tunnel_id
        self._outgoing[DOWNSTREAM_LEG] += _DOWNSTREAM_HEAD
        self._chunks = ChunkReader(max_chunk=self.limits.max_chunk)
        self._expected = 0  # the next POST's sequence number
        self._post_leg: int | None = None
        self._body_left = 0
        self._established()

    @property
    def buffered(self) -> int:
        return self._chunks.buffered

    @property
    def expected_sequence(self) -> int:
        return self._expected

    def abort(self, reason: str) -> None:
        """Fail the tunnel for a reason of the server's own (``GetPostRegistry``'s timeout)."""
        self._fail(reason)

    def join(self, request: TunnelRequest) -> int | RequestRejected:
        """Take POST ``request`` as the next upstream leg: its leg number, or why not (409)."""
        if request.tunnel_id != self.tunnel_id or request.verb != "POST":
            raise LocalProtocolError("join() takes a POST of this tunnel")
        assert request.sequence is not None
        assert request.content_length is not None
        if self._state is not TunnelState.OPEN or self._chunks.finished:
            return rejection(409, "this tunnel's upstream has ended")
        if self._post_leg is not None:
            return rejection(409, f"POST {self._expected - 1} is still in progress")
        if request.sequence != self._expected:
            return rejection(409, f"expected POST {self._expected}, not {request.sequence}")
        leg = self._expected + 1
        self._add_leg(leg)
        self._post_leg, self._body_left = leg, request.content_length
        self._expected += 1
        if request.trailing:
            self._receive(request.trailing, leg)
        return leg

    def _receive(self, data: bytes, leg: int) -> None:
        if leg == DOWNSTREAM_LEG:
            if not data and not self._we_closed:
                self._fail("the client closed the downstream connection")
            return  # a GET has no body: anything else is ignored
        if leg != self._post_leg:
            return  # an old POST's leg: its business is settled
        if not data:
            self._fail(f"POST {self._expected - 1} closed before its body ended")
            return
        body = data[: self._body_left]
        self._body_left -= len(body)
        try:
            for piece in self._chunks.feed(body):
                self._data(piece)
        except RemoteProtocolError as exc:
            status = exc.error_code_hint or 400
            self._outgoing[leg] += rejection(status, f"bad upstream chunk: {exc}").response
            self._fail(f"bad upstream chunk: {exc}", status=status)
            return
        if self._chunks.finished:
            self._outgoing[leg] += _POST_ENDED
            self._post_leg = None
            self._drop_leg(leg)
            self._peer_end()
        elif not self._body_left:
            self._outgoing[leg] += _POST_DONE
            self._post_leg = None
            self._drop_leg(leg)

    def _send_stream(self, data: bytes) -> None:
        self._outgoing[DOWNSTREAM_LEG] += _chunks(data, self.limits.max_chunk)

    def _send_end(self) -> None:
        self._outgoing[DOWNSTREAM_LEG] += encode_chunk(b"")
        self._drop_leg(DOWNSTREAM_LEG)
