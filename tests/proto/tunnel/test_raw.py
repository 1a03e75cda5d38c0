"""The raw methods, upgrade and connect: handshakes, glued bytes, close, and refusals."""

from __future__ import annotations

import pytest

from wavesync_proto.errors import LocalProtocolError
from wavesync_proto.tunnel import (
    ConnectClient,
    ProxyConfig,
    RawEndpoint,
    StreamData,
    StreamEnded,
    TunnelEstablished,
    TunnelFailed,
    TunnelLimits,
    TunnelMethod,
    TunnelRequest,
    TunnelRequestReader,
    TunnelState,
    UpgradeClient,
    UpgradeServer,
)

from .helpers import HOST, PORT, PROXY, Link, cutter, drain, opened_link, state_of

UPGRADE_101 = (
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: wavesync-tunnel/1\r\n\r\n"
)


def answer(client: UpgradeClient | ConnectClient, data: bytes) -> list[object]:
    client.data_to_send()
    client.receive_data(data)
    return list(drain(client))


# --- upgrade ---------------------------------------------------------------------------


def test_upgrade_request_is_exactly_this() -> None:
    assert UpgradeClient(host=HOST, port=PORT).data_to_send() == (
        b"GET /wavesync/tunnel/v1/upgrade HTTP/1.1\r\n"
        b"Host: mediator.example:8080\r\n"
        b"Connection: Upgrade\r\n"
        b"Upgrade: wavesync-tunnel/1\r\n"
        b"Cache-Control: no-cache\r\n\r\n"
    )


def test_upgrade_through_a_proxy_uses_the_absolute_form_and_its_credentials() -> None:
    proxy = ProxyConfig(host="proxy.example", port=3128, username="u", password="p")
    request = UpgradeClient(host=HOST, port=PORT, proxy=proxy).data_to_send()
    assert request.startswith(b"GET http://mediator.example:8080/wavesync/tunnel/v1/upgrade ")
    assert b"Proxy-Authorization: Basic dTpw\r\n" in request


def test_upgrade_carries_bytes_glued_to_both_handshakes() -> None:
    link = Link(UpgradeClient(host=HOST, port=PORT))
    link.client.send(b"client first")  # queued until the 101, then sent
    link.pump()
    assert link.server_events == [
        TunnelEstablished(method=TunnelMethod.UPGRADE),
        StreamData(data=b"client first"),
    ]
    client = UpgradeClient(host=HOST, port=PORT)
    assert answer(client, UPGRADE_101 + b"server first") == [
        TunnelEstablished(method=TunnelMethod.UPGRADE),
        StreamData(data=b"server first"),
    ]


def test_upgrade_request_glued_bytes_reach_the_server() -> None:
    reader = TunnelRequestReader()
    reader.receive_data(UpgradeClient(host=HOST, port=PORT).data_to_send() + b"glued")
    result = reader.next_event()
    assert isinstance(result, TunnelRequest)
    server = UpgradeServer(result)
    assert drain(server) == [
        TunnelEstablished(method=TunnelMethod.UPGRADE),
        StreamData(data=b"glued"),
    ]


def test_upgrade_close_is_a_half_close_each_way() -> None:
    link = opened_link(TunnelMethod.UPGRADE)
    link.client.send(b"ping")
    link.client.close()
    link.pump()
    assert link.client.eof_to_send()
    assert link.server_received() == b"ping"
    assert link.server_events[-1] == StreamEnded()
    # The server's direction is still open: a half-close, not a hang-up.
    link.server.send(b"pong")
    link.pump()
    assert link.client_received() == b"pong"
    assert state_of(link.client) is TunnelState.OPEN
    link.server.close()
    link.pump()
    assert state_of(link.client) is TunnelState.CLOSED
    assert state_of(link.server) is TunnelState.CLOSED
    assert link.client_events[-1] == StreamEnded()


@pytest.mark.parametrize(
    ("data", "status", "reason"),
    [
        (b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\n\r\n", 426, "upgrade refused"),
        (
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
            101,
            "101 to another protocol",
        ),
        (
            b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 3\r\nContent-Length: 0\r\n\r\n",
            503,
            "upgrade refused: 503",
        ),
        (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", None, "not HTTP/1.1"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 9000, None, "not HTTP/1.1"),
    ],
)
def test_upgrade_refusals_and_garbage_fail_clearly(
    data: bytes, status: int | None, reason: str
) -> None:
    client = UpgradeClient(host=HOST, port=PORT)
    events = answer(client, data)
    assert len(events) == 1
    failed = events[0]
    assert isinstance(failed, TunnelFailed)
    assert failed.status == status
    assert reason in failed.reason
    assert state_of(client) is TunnelState.FAILED
    assert client.eof_to_send()
    with pytest.raises(LocalProtocolError):
        client.send(b"x")


def test_a_retry_after_comes_with_the_refusal() -> None:
    client = UpgradeClient(host=HOST, port=PORT)
    (failed,) = answer(client, b"HTTP/1.1 503 Busy\r\nRetry-After: 3\r\nContent-Length: 0\r\n\r\n")
    assert isinstance(failed, TunnelFailed)
    assert failed.headers == (("Retry-After", "3"),)


def test_an_answer_head_too_large_in_one_read_fails() -> None:
    client = UpgradeClient(host=HOST, port=PORT, limits=TunnelLimits(max_head=512))
    big = UPGRADE_101[:-2] + b"X-Pad: " + b"a" * 600 + b"\r\n\r\n"
    (failed,) = answer(client, big)
    assert isinstance(failed, TunnelFailed)
    assert "too large" in failed.reason


def test_the_server_hanging_up_before_answering_fails() -> None:
    client = UpgradeClient(host=HOST, port=PORT)
    (failed,) = answer(client, b"")
    assert isinstance(failed, TunnelFailed)
    assert "closed before the answer" in failed.reason


def test_a_100_continue_before_the_101_is_skipped() -> None:
    client = UpgradeClient(host=HOST, port=PORT)
    events = answer(client, b"HTTP/1.1 100 Continue\r\n\r\n" + UPGRADE_101 + b"x")
    assert events == [TunnelEstablished(method=TunnelMethod.UPGRADE), StreamData(data=b"x")]


def test_leg_misuse_raises() -> None:
    client = UpgradeClient(host=HOST, port=PORT)
    with pytest.raises(LocalProtocolError):
        client.receive_data(b"x", 1)
    assert client.data_to_send(5) == b""
    client.close()
    with pytest.raises(LocalProtocolError):
        client.send(b"after close")


def test_close_during_the_handshake_takes_effect_after_it() -> None:
    link = Link(UpgradeClient(host=HOST, port=PORT))
    link.client.send(b"last words")
    link.client.close()
    link.pump()
    assert link.server_received() == b"last words"
    assert link.server_events[-1] == StreamEnded()


# --- connect ---------------------------------------------------------------------------


def test_connect_request_is_exactly_this() -> None:
    proxy = ProxyConfig(host="proxy.example", port=3128, username="Aladdin", password="open sesame")
    assert ConnectClient(host="relay.example", port=443, proxy=proxy).data_to_send() == (
        b"CONNECT relay.example:443 HTTP/1.1\r\n"
        b"Host: relay.example:443\r\n"
        b"Proxy-Authorization: Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==\r\n\r\n"
    )
    assert (
        b"Proxy-Authorization"
        not in ConnectClient(host="relay.example", port=443, proxy=PROXY).data_to_send()
    )


def test_connect_to_an_ipv6_target_brackets_it() -> None:
    client = ConnectClient(host="2001:db8::7", port=443, proxy=PROXY)
    assert client.data_to_send().startswith(b"CONNECT [2001:db8::7]:443 HTTP/1.1\r\n")


def test_connect_200_opens_a_raw_stream_with_the_glued_bytes() -> None:
    client = ConnectClient(host=HOST, port=PORT, proxy=PROXY)
    events = answer(client, b"HTTP/1.1 200 Connection established\r\n\r\nhello from target")
    assert events == [
        TunnelEstablished(method=TunnelMethod.CONNECT),
        StreamData(data=b"hello from target"),
    ]


def test_connect_through_the_canned_proxy_in_pieces() -> None:
    link = Link(ConnectClient(host=HOST, port=PORT, proxy=PROXY), split=cutter([1, 2, 5]))
    link.client.send(b"early")
    link.pump()
    link.server.send(b"reply")
    link.pump()
    assert link.server_received() == b"early"
    assert link.client_received() == b"reply"


@pytest.mark.parametrize(
    ("data", "status", "reason", "headers"),
    [
        (
            b"HTTP/1.1 407 Proxy Authentication Required\r\n"
            b'Proxy-Authenticate: Basic realm="squid"\r\nContent-Length: 5\r\n\r\nlogin',
            407,
            "wants credentials",
            (("Proxy-Authenticate", 'Basic realm="squid"'),),
        ),
        (
            b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n",
            403,
            "CONNECT refused: 403 Forbidden",
            (),
        ),
        (b"HTTP/1.0 502 Bad Gateway\r\n\r\n", 502, "CONNECT refused: 502", ()),
        (b"\x00\x01garbage\r\n\r\n", None, "not HTTP/1.1", ()),
        (b"HTTP/1.1 200 OK", None, "closed before the answer", ()),
    ],
)
def test_connect_refusals_and_garbage_from_the_proxy(
    data: bytes, status: int | None, reason: str, headers: tuple[tuple[str, str], ...]
) -> None:
    client = ConnectClient(host=HOST, port=PORT, proxy=PROXY)
    client.data_to_send()
    client.receive_data(data)
    if status is None and data.endswith(b"OK"):
        client.receive_data(b"")  # the proxy hangs up mid-head
    (failed,) = drain(client)
    assert isinstance(failed, TunnelFailed)
    assert (failed.status, failed.headers) == (status, headers)
    assert reason in failed.reason


def test_the_canned_proxy_refusing_fails_the_link() -> None:
    refusal = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n"
    link = Link(ConnectClient(host=HOST, port=PORT, proxy=PROXY), connect_answer=refusal)
    link.pump()
    assert isinstance(link.client_events[-1], TunnelFailed)


def test_a_raw_endpoint_is_open_at_once() -> None:
    target = RawEndpoint()
    assert drain(target) == [TunnelEstablished(method=TunnelMethod.CONNECT)]
    target.receive_data(b"abc")
    target.receive_data(b"")
    assert drain(target) == [StreamData(data=b"abc"), StreamEnded()]
    target.receive_data(b"late")  # after the peer's end: nothing
    assert drain(target) == []
