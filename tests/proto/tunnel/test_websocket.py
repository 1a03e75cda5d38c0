"""The websocket method: RFC 6455 handshake through wsproto, binary messages, in-band half-close."""

from __future__ import annotations

import pytest
import wsproto
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    Request,
    TextMessage,
)

from wavesync_proto.tunnel import (
    StreamData,
    StreamEnded,
    TunnelEstablished,
    TunnelFailed,
    TunnelMethod,
    TunnelRequest,
    TunnelRequestReader,
    TunnelState,
    WebSocketClient,
    WebSocketServer,
)

from .helpers import HOST, PORT, Link, cutter, drain, opened_link, state_of

WS = TunnelMethod.WEBSOCKET


def server_for(client: WebSocketClient, glued: bytes = b"") -> WebSocketServer:
    reader = TunnelRequestReader()
    reader.receive_data(client.data_to_send() + glued)
    request = reader.next_event()
    assert isinstance(request, TunnelRequest)
    return WebSocketServer(request)


def peer_server(client: WebSocketClient) -> wsproto.WSConnection:
    """A plain wsproto server (not ours) that accepted ``client``, to send it odd frames."""
    peer = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
    peer.receive_data(client.data_to_send())
    assert isinstance(next(peer.events()), Request)
    client.receive_data(peer.send(AcceptConnection(subprotocol="wavesync-tunnel.v1")))
    assert drain(client) == [TunnelEstablished(method=WS)]
    return peer


def test_the_request_offers_our_subprotocol() -> None:
    request = WebSocketClient(host=HOST, port=PORT).data_to_send()
    assert request.startswith(b"GET /wavesync/tunnel/v1/websocket HTTP/1.1\r\n")
    assert b"Sec-WebSocket-Protocol: wavesync-tunnel.v1\r\n" in request
    assert b"Upgrade: websocket\r\n" in request


def test_bytes_glued_to_the_request_and_to_the_101_arrive() -> None:
    client = WebSocketClient(host=HOST, port=PORT)
    client.send(b"early")  # queued until the 101
    server = server_for(client, glued=b"")
    server.send(b"server first")
    client.receive_data(server.data_to_send())  # 101 and a frame in one read
    assert drain(client) == [TunnelEstablished(method=WS), StreamData(data=b"server first")]
    server.receive_data(client.data_to_send())
    assert drain(server) == [TunnelEstablished(method=WS), StreamData(data=b"early")]


def test_a_frame_glued_to_the_request_reaches_the_server() -> None:
    other = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    request = other.send(Request(host=HOST, target="/wavesync/tunnel/v1/websocket"))
    reader = TunnelRequestReader()
    # A client that sends a frame before the 101 (allowed to arrive with the request).
    frame = b"\x82\x83\x00\x00\x00\x00abc"
    reader.receive_data(request + frame)
    parsed = reader.next_event()
    assert isinstance(parsed, TunnelRequest)
    server = WebSocketServer(parsed)
    assert drain(server) == [TunnelEstablished(method=WS), StreamData(data=b"abc")]
    # No subprotocol offered: none is chosen (the echo check is the probe's).
    assert b"Sec-WebSocket-Protocol" not in server.data_to_send()


def test_half_close_survives_in_band_and_the_close_handshake_follows() -> None:
    link = opened_link(WS, split=cutter([3]))
    link.client.send(b"request")
    link.client.close()
    link.pump()
    assert link.server_received() == b"request"
    assert link.server_events[-1] == StreamEnded()
    assert state_of(link.server) is TunnelState.OPEN
    link.server.send(b"response after the client's end")
    link.server.close()
    link.pump()
    assert link.client_received() == b"response after the client's end"
    assert state_of(link.client) is TunnelState.CLOSED
    assert state_of(link.server) is TunnelState.CLOSED
    # The close handshake ran: both sides close their TCP connection.
    assert link.client.eof_to_send()
    assert link.server.eof_to_send()


def test_pings_are_answered() -> None:
    client = WebSocketClient(host=HOST, port=PORT)
    peer = peer_server(client)
    client.receive_data(peer.send(Ping(payload=b"are you there")))
    assert drain(client) == []
    peer.receive_data(client.data_to_send())
    assert list(peer.events()) == [Pong(payload=b"are you there")]


def test_a_text_message_fails_the_tunnel_with_1003() -> None:
    client = WebSocketClient(host=HOST, port=PORT)
    peer = peer_server(client)
    client.receive_data(peer.send(TextMessage(data="hello")))
    (failed,) = drain(client)
    assert isinstance(failed, TunnelFailed)
    assert "1003" in failed.reason
    peer.receive_data(client.data_to_send())
    (close,) = list(peer.events())
    assert isinstance(close, CloseConnection)
    assert close.code == 1003


def test_a_malformed_frame_fails_the_tunnel_with_1002() -> None:
    client = WebSocketClient(host=HOST, port=PORT)
    peer_server(client)
    client.receive_data(b"\x8f\x00")  # reserved opcode 0xF
    (failed,) = drain(client)
    assert isinstance(failed, TunnelFailed)
    assert "1002" in failed.reason


def test_a_close_before_our_direction_ended_is_a_failure_after_the_peers_end() -> None:
    client = WebSocketClient(host=HOST, port=PORT)
    peer = peer_server(client)
    client.receive_data(
        peer.send(BytesMessage(data=b"bye")) + peer.send(CloseConnection(code=1000))
    )
    events = drain(client)
    assert events[:2] == [StreamData(data=b"bye"), StreamEnded()]
    assert isinstance(events[2], TunnelFailed)
    assert "before our direction ended" in events[2].reason


def test_an_abnormal_close_code_is_a_failure() -> None:
    client = WebSocketClient(host=HOST, port=PORT)
    peer = peer_server(client)
    client.receive_data(peer.send(CloseConnection(code=1011, reason="oops")))
    (failed,) = drain(client)
    assert isinstance(failed, TunnelFailed)
    assert "1011 oops" in failed.reason


def test_the_connection_dropping_without_a_close_is_a_failure() -> None:
    link = opened_link(WS)
    link.client.receive_data(b"")
    (failed,) = drain(link.client)
    assert isinstance(failed, TunnelFailed)


@pytest.mark.parametrize(
    ("answer", "status"),
    [
        (b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\n\r\n", 426),
        (b"HTTP/1.1 403 Forbidden\r\nRetry-After: 9\r\nContent-Length: 0\r\n\r\n", 403),
    ],
)
def test_a_refused_handshake_fails_with_its_status(answer: bytes, status: int) -> None:
    client = WebSocketClient(host=HOST, port=PORT)
    client.data_to_send()
    client.receive_data(answer)
    (failed,) = drain(client)
    assert isinstance(failed, TunnelFailed)
    assert failed.status == status


def test_a_101_without_our_subprotocol_fails() -> None:
    client = WebSocketClient(host=HOST, port=PORT)
    peer = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
    peer.receive_data(client.data_to_send())
    list(peer.events())
    client.receive_data(peer.send(AcceptConnection()))
    (failed,) = drain(client)
    assert isinstance(failed, TunnelFailed)
    assert "did not accept wavesync-tunnel.v1" in failed.reason


def test_garbage_instead_of_a_101_fails() -> None:
    client = WebSocketClient(host=HOST, port=PORT)
    client.data_to_send()
    client.receive_data(b"\x00\x00\x00garbage\r\n\r\n")
    (failed,) = drain(client)
    assert isinstance(failed, TunnelFailed)
    assert "handshake failed" in failed.reason


def test_a_request_wsproto_refuses_gets_400() -> None:
    reader = TunnelRequestReader()
    reader.receive_data(
        b"GET /wavesync/tunnel/v1/websocket HTTP/1.1\r\nHost: x\r\n"
        b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n"  # no key, no version
    )
    request = reader.next_event()
    assert isinstance(request, TunnelRequest)
    server = WebSocketServer(request)
    (failed,) = drain(server)
    assert isinstance(failed, TunnelFailed)
    assert failed.status == 400
    assert server.data_to_send().startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert server.eof_to_send()


def test_link_round_trip_in_one_byte_pieces() -> None:
    link = Link(WebSocketClient(host=HOST, port=PORT), split=cutter([1]))
    link.pump()
    link.client.send(b"x" * 300)
    link.server.send(b"y" * 70_000)  # a 64-bit length frame
    link.pump()
    assert link.server_received() == b"x" * 300
    assert link.client_received() == b"y" * 70_000
