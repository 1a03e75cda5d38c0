"""The websocket method (RFC 6455 through wsproto; docs/tunnel.md §3).

This module owns how a byte stream rides websocket messages: every ``send`` is
one binary message, an *empty* binary message ends its sender's direction (so a
half-close survives proxies that cannot pass a TCP half-close), and the Close
handshake (1000) comes only after both directions ended. A text message, a
frame wsproto cannot parse or a Close before both ends is a failure. It does
not read the request line (``requests.py`` did, on the server) or do TLS.
"""

from __future__ import annotations

import wsproto
import wsproto.utilities
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.frame_protocol import CloseReason

from ..errors import LocalProtocolError
from .answer import header_dict
from .requests import TunnelRequest
from .stream import TunnelEndpoint, TunnelState
from .wire import (
    WEBSOCKET_SUBPROTOCOL,
    ProxyConfig,
    TunnelLimits,
    TunnelMethod,
    authority,
    error_response,
    request_target,
    tunnel_path,
)

__all__ = ["WebSocketClient", "WebSocketServer"]


class _WebSocketEndpoint(TunnelEndpoint):
    method = TunnelMethod.WEBSOCKET

    def __init__(self, ws: wsproto.WSConnection, *, limits: TunnelLimits | None) -> None:
        super().__init__(limits=limits)
        self._ws = ws
        self._message_has_data = False
        self._client = ws.client

    def _receive(self, data: bytes, leg: int) -> None:
        if not data and self._ws.state is ConnectionState.CLOSED:
            self._eof.add(0)
            return
        try:
            self._ws.receive_data(data or None)
            for event in self._ws.events():
                self._on_event(event)
                if self._state is TunnelState.FAILED:
                    return
        except wsproto.utilities.RemoteProtocolError as exc:
            self._fail(f"websocket handshake failed: {exc}")
        except wsproto.utilities.LocalProtocolError as exc:  # pragma: no cover - a wsproto state
            self._fail(f"websocket state error: {exc}")

    def _on_event(self, event: Event) -> None:
        if isinstance(event, BytesMessage):
            if event.data:
                self._message_has_data = True
                self._data(bytes(event.data))
            if event.message_finished:
                if not self._message_has_data:
                    self._peer_end()  # the empty message: the peer's direction ended
                self._message_has_data = False
        elif isinstance(event, Ping):
            self._write(event.response())
        elif isinstance(event, TextMessage):
            self._close_with(CloseReason.UNSUPPORTED_DATA, "the stream is binary messages only")
        elif isinstance(event, CloseConnection):
            self._on_close(event)
        elif isinstance(event, AcceptConnection | RejectConnection):
            self._on_answer(event)
        # Pong, RejectData and a server's Request (handled at construction) carry no news.

    def _on_close(self, event: CloseConnection) -> None:
        remote = self._ws.state in (ConnectionState.REMOTE_CLOSING, ConnectionState.CLOSED)
        if not remote:
            # wsproto reports a frame it could not parse as a CloseConnection of its own.
            self._close_with(event.code, event.reason or "bad websocket frame")
            return
        if self._ws.state is ConnectionState.REMOTE_CLOSING:
            self._write(event.response())
        self._eof.add(0)
        if self._state is TunnelState.CLOSED:
            return
        if event.code != CloseReason.NORMAL_CLOSURE:
            self._fail(f"the peer closed the websocket: {event.code} {event.reason}".strip())
            return
        self._peer_end()
        if not self._both_ended():
            self._fail("the peer closed the websocket before our direction ended")

    def _both_ended(self) -> bool:
        return self._state is TunnelState.CLOSED

    def _on_answer(self, event: AcceptConnection | RejectConnection) -> None:
        raise NotImplementedError

    def _close_with(self, code: int, reason: str) -> None:
        if self._ws.state is ConnectionState.OPEN:
            self._write(CloseConnection(code=code, reason=reason[:100]))
        self._fail(f"websocket error {code}: {reason}")

    def _write(self, event: Event) -> None:
        self._outgoing[0] += self._ws.send(event)

    def _send_stream(self, data: bytes) -> None:
        self._write(BytesMessage(data=data))

    def _send_end(self) -> None:
        self._write(BytesMessage(data=b""))

    def _finished(self) -> None:
        # Both directions ended. The client starts the closing handshake; the server answers
        # it and closes the TCP connection first, as RFC 6455 §7.1.1 wants.
        if self._client and self._ws.state is ConnectionState.OPEN:
            self._write(CloseConnection(code=CloseReason.NORMAL_CLOSURE))


class WebSocketClient(_WebSocketEndpoint):
    """``GET /wavesync/tunnel/v1/websocket`` as a websocket handshake, then binary messages."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        proxy: ProxyConfig | None = None,
        limits: TunnelLimits | None = None,
    ) -> None:
        super().__init__(wsproto.WSConnection(wsproto.ConnectionType.CLIENT), limits=limits)
        target, extra = request_target(
            host=host, port=port, path=tunnel_path(TunnelMethod.WEBSOCKET), proxy=proxy
        )
        headers = [(b"Cache-Control", b"no-cache")]
        headers += [(name.encode(), value.encode("latin-1")) for name, value in extra]
        self._write(
            Request(
                host=authority(host, port),
                target=target,
                subprotocols=[WEBSOCKET_SUBPROTOCOL],
                extra_headers=headers,
            )
        )

    def _on_answer(self, event: AcceptConnection | RejectConnection) -> None:
        if isinstance(event, RejectConnection):
            headers = header_dict(event.headers)
            retry = headers.get("retry-after")
            self._fail(
                f"websocket refused: {event.status_code}",
                status=event.status_code,
                headers=(("Retry-After", retry),) if retry else (),
            )
            return
        if event.subprotocol != WEBSOCKET_SUBPROTOCOL:
            self._fail(f"the websocket server did not accept {WEBSOCKET_SUBPROTOCOL}")
            return
        self._established()


class WebSocketServer(_WebSocketEndpoint):
    """The server's side of a websocket tunnel, from the request ``TunnelRequestReader`` read."""

    def __init__(self, request: TunnelRequest, *, limits: TunnelLimits | None = None) -> None:
        if request.method is not TunnelMethod.WEBSOCKET:
            raise LocalProtocolError(
                f"a websocket tunnel cannot serve a {request.method.value} request"
            )
        super().__init__(wsproto.WSConnection(wsproto.ConnectionType.SERVER), limits=limits)
        try:
            self._ws.receive_data(request.head)
            events = list(self._ws.events())
        except wsproto.utilities.RemoteProtocolError as exc:
            self._outgoing[0] += error_response(400, f"bad websocket handshake: {exc}")
            self._fail(f"bad websocket handshake: {exc}", status=400)
            return
        offered = next((e for e in events if isinstance(e, Request)), None)
        if offered is None:  # pragma: no cover - the reader handed over a whole request
            self._fail("no websocket request in the head", status=400)
            return
        chosen = WEBSOCKET_SUBPROTOCOL if WEBSOCKET_SUBPROTOCOL in offered.subprotocols else None
        self._write(AcceptConnection(subprotocol=chosen))
        self._established()
        if request.trailing:
            self._receive(request.trailing, 0)

    def _on_answer(self, event: AcceptConnection | RejectConnection) -> None:
        return  # pragma: no cover - a server is never answered
