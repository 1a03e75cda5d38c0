"""TunnelRequestReader: which tunnel a first request opens, and the exact refusals."""

from __future__ import annotations

import pytest

from wavesync_proto.tunnel import (
    RequestRejected,
    TunnelLimits,
    TunnelMethod,
    TunnelRequest,
    TunnelRequestReader,
)

from .helpers import TUNNEL_ID, make_client

TID = TUNNEL_ID.hex()


def read(data: bytes, limits: TunnelLimits | None = None) -> TunnelRequest | RequestRejected | None:
    reader = TunnelRequestReader(limits=limits)
    reader.receive_data(data)
    result = reader.next_event()
    assert reader.next_event() is None
    if isinstance(result, RequestRejected):
        assert reader.data_to_send() == result.response
    return result


def head(request_line: str, *headers: str) -> bytes:
    return (
        "\r\n".join([request_line, "Host: mediator.example:8080", *headers]) + "\r\n\r\n"
    ).encode()


def rejected(data: bytes, limits: TunnelLimits | None = None) -> RequestRejected:
    result = read(data, limits)
    assert isinstance(result, RequestRejected)
    return result


@pytest.mark.parametrize("method", [TunnelMethod.UPGRADE, TunnelMethod.WEBSOCKET])
def test_our_clients_requests_are_recognised_with_their_glued_bytes(method: TunnelMethod) -> None:
    request = make_client(method).data_to_send()
    result = read(request + b"first bytes")
    assert isinstance(result, TunnelRequest)
    assert result.method is method
    assert result.head == request
    assert result.trailing == b"first bytes"


def test_a_getpost_get_and_post_name_their_tunnel_and_sequence() -> None:
    get = read(head(f"GET /wavesync/tunnel/v1/getpost/{TID} HTTP/1.1"))
    assert isinstance(get, TunnelRequest)
    assert (get.method, get.verb, get.tunnel_id, get.sequence) == (
        TunnelMethod.GETPOST,
        "GET",
        TUNNEL_ID,
        None,
    )
    post = read(
        head(f"POST /wavesync/tunnel/v1/getpost/{TID}/7 HTTP/1.1", "Content-Length: 1000000000")
        + b"5\r\nhello"
    )
    assert isinstance(post, TunnelRequest)
    assert (post.verb, post.sequence, post.content_length) == ("POST", 7, 1_000_000_000)
    assert post.trailing == b"5\r\nhello"


def test_an_absolute_form_target_is_read_as_its_path() -> None:
    result = read(
        head(
            "GET http://mediator.example:8080/wavesync/tunnel/v1/upgrade?x=1 HTTP/1.1",
            "Connection: upgrade",
            "Upgrade: WAVESYNC-TUNNEL/1",
        )
    )
    assert isinstance(result, TunnelRequest)
    assert result.path == "/wavesync/tunnel/v1/upgrade"


def test_a_request_in_one_byte_reads_is_the_same_request() -> None:
    request = make_client(TunnelMethod.WEBSOCKET).data_to_send()
    reader = TunnelRequestReader()
    for index in range(len(request)):
        assert reader.next_event() is None
        reader.receive_data(request[index : index + 1])
    result = reader.next_event()
    assert isinstance(result, TunnelRequest)
    assert result.head == request
    assert result.trailing == b""


@pytest.mark.parametrize(
    ("data", "status", "reason"),
    [
        (head("GET /index.html HTTP/1.1"), 404, "no tunnel at /index.html"),
        (head("GET /wavesync/tunnel/v1/teleport HTTP/1.1"), 404, "no tunnel method"),
        (head("GET /wavesync/tunnel/v1/connect HTTP/1.1"), 404, "through a proxy"),
        (head("GET /wavesync/tunnel/v1/upgrade/x HTTP/1.1"), 404, "no tunnel at"),
        (head("POST /wavesync/tunnel/v1/upgrade HTTP/1.1", "Content-Length: 0"), 405, "GET"),
        (head("GET /wavesync/tunnel/v1/upgrade HTTP/1.1"), 426, "Connection: Upgrade"),
        (
            head("GET /wavesync/tunnel/v1/upgrade HTTP/1.1", "Connection: Upgrade", "Upgrade: h2c"),
            426,
            "Upgrade: wavesync-tunnel/1",
        ),
        (
            head(
                "GET /wavesync/tunnel/v1/websocket HTTP/1.1",
                "Connection: Upgrade",
                "Upgrade: websocket",
                "Content-Length: 3",
            ),
            400,
            "no body",
        ),
        (head("GET /wavesync/tunnel/v1/getpost/XYZ HTTP/1.1"), 404, "32 lower-case hex"),
        (head(f"GET /wavesync/tunnel/v1/getpost/{TID}/1/2 HTTP/1.1"), 404, "getpost paths"),
        (head(f"POST /wavesync/tunnel/v1/getpost/{TID} HTTP/1.1"), 405, "takes GET"),
        (head(f"GET /wavesync/tunnel/v1/getpost/{TID}/0 HTTP/1.1"), 405, "takes POST"),
        (head(f"POST /wavesync/tunnel/v1/getpost/{TID}/x HTTP/1.1"), 404, "decimal digits"),
        (
            head(f"POST /wavesync/tunnel/v1/getpost/{TID}/0 HTTP/1.1", "Content-Length: 0"),
            400,
            "Content-Length must be",
        ),
        (
            head(
                f"POST /wavesync/tunnel/v1/getpost/{TID}/0 HTTP/1.1", "Transfer-Encoding: chunked"
            ),
            400,
            "not a transfer coding",
        ),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400, "malformed HTTP"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "malformed HTTP"),
    ],
)
def test_what_is_not_a_tunnel_request_gets_a_clear_answer(
    data: bytes, status: int, reason: str
) -> None:
    result = rejected(data)
    assert result.status == status
    assert reason in result.reason
    assert result.response.startswith(f"HTTP/1.1 {status} ".encode())
    assert b"Connection: close\r\n" in result.response
    assert result.response.endswith(result.reason.encode() + b"\n")


def test_a_head_too_large_is_431_whether_it_comes_whole_or_in_pieces() -> None:
    limits = TunnelLimits(max_head=512)
    big = head("GET /wavesync/tunnel/v1/upgrade HTTP/1.1", "X-Pad: " + "a" * 600)
    assert rejected(big, limits).status == 431
    reader = TunnelRequestReader(limits=limits)
    for start in range(0, len(big), 64):
        reader.receive_data(big[start : start + 64])
        assert reader.buffered <= 512 + 64
    result = reader.next_event()
    assert isinstance(result, RequestRejected)
    assert result.status == 431


def test_the_end_of_file_before_a_request_is_a_rejection() -> None:
    reader = TunnelRequestReader()
    reader.receive_data(b"GET /wavesync/tu")
    reader.receive_data(b"")
    result = reader.next_event()
    assert isinstance(result, RequestRejected)
    assert (result.status, result.reason) == (
        400,
        "malformed HTTP: peer unexpectedly closed connection",
    )
    silent = TunnelRequestReader()
    silent.receive_data(b"")
    assert silent.next_event() == RequestRejected(
        status=0, reason="the connection closed before a request", response=b""
    )


def test_bytes_after_the_result_are_not_the_readers() -> None:
    reader = TunnelRequestReader()
    reader.receive_data(b"BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n")
    result = reader.next_event()
    assert isinstance(result, RequestRejected)
    reader.receive_data(b"more garbage")
    assert reader.next_event() is None
    assert reader.buffered == 0
