"""The getpost method: the long GET, POSTs in sequence, pairing by tunnel id, and refusals."""

from __future__ import annotations

import pytest

from wavesync_proto.errors import LocalProtocolError
from wavesync_proto.tunnel import (
    GetPostClient,
    GetPostRegistry,
    GetPostServer,
    OpenLeg,
    ProxyConfig,
    RequestRejected,
    StreamData,
    StreamEnded,
    TunnelEstablished,
    TunnelFailed,
    TunnelLimits,
    TunnelMethod,
    TunnelRequest,
    TunnelRequestReader,
    TunnelState,
)

from .helpers import HOST, PORT, TUNNEL_ID, Link, cutter, drain, opened_link, state_of

GP = TunnelMethod.GETPOST
TID = TUNNEL_ID.hex()
OK_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
    b"Cache-Control: no-cache, no-store\r\nTransfer-Encoding: chunked\r\n\r\n"
)
SMALL = TunnelLimits(post_length=64, max_chunk=16)


def request_of(data: bytes) -> TunnelRequest:
    reader = TunnelRequestReader()
    reader.receive_data(data)
    request = reader.next_event()
    assert isinstance(request, TunnelRequest)
    return request


def post(
    sequence: int, body: bytes = b"", length: int = 1000, tunnel_id: str = TID
) -> TunnelRequest:
    return request_of(
        f"POST /wavesync/tunnel/v1/getpost/{tunnel_id}/{sequence} HTTP/1.1\r\nHost: h\r\n"
        f"Content-Length: {length}\r\n\r\n".encode()
        + body
    )


def get(tunnel_id: str = TID) -> TunnelRequest:
    return request_of(
        f"GET /wavesync/tunnel/v1/getpost/{tunnel_id} HTTP/1.1\r\nHost: h\r\n\r\n".encode()
    )


def test_the_get_is_exactly_this_and_the_post_waits_for_its_200() -> None:
    client = GetPostClient(host=HOST, port=PORT, tunnel_id=TUNNEL_ID)
    assert client.data_to_send(0) == (
        f"GET /wavesync/tunnel/v1/getpost/{TID} HTTP/1.1\r\n".encode()
        + b"Host: mediator.example:8080\r\nCache-Control: no-cache, no-store\r\n"
        b"Pragma: no-cache\r\n\r\n"
    )
    assert drain(client) == []
    client.send(b"hi")
    client.receive_data(OK_HEAD + b"3\r\nabc\r\n", 0)
    assert drain(client) == [
        OpenLeg(leg=1),
        TunnelEstablished(method=GP),
        StreamData(data=b"abc"),
    ]
    assert client.data_to_send(1) == (
        f"POST /wavesync/tunnel/v1/getpost/{TID}/0 HTTP/1.1\r\n".encode()
        + b"Host: mediator.example:8080\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Length: 507904\r\nCache-Control: no-cache, no-store\r\n"
        b"Pragma: no-cache\r\n\r\n2\r\nhi\r\n"
    )


def test_through_a_proxy_both_requests_are_absolute_form_with_credentials() -> None:
    proxy = ProxyConfig(host="p", port=3128, username="u", password="p")
    client = GetPostClient(host=HOST, port=PORT, tunnel_id=TUNNEL_ID, proxy=proxy)
    first = client.data_to_send(0)
    assert first.startswith(
        f"GET http://mediator.example:8080/wavesync/tunnel/v1/getpost/{TID} ".encode()
    )
    assert b"Proxy-Authorization: Basic dTpw\r\n" in first
    client.receive_data(OK_HEAD, 0)
    second = client.data_to_send(1)
    assert second.startswith(
        f"POST http://mediator.example:8080/wavesync/tunnel/v1/getpost/{TID}/0 ".encode()
    )
    assert b"Proxy-Authorization: Basic dTpw\r\n" in second


def test_bytes_glued_to_the_get_answer_and_to_the_post_head_arrive() -> None:
    registry = GetPostRegistry()
    server = registry.open(get(), 0.0)
    assert isinstance(server, GetPostServer)
    server.send(b"down")
    assert server.data_to_send(0) == OK_HEAD + b"4\r\ndown\r\n"
    joined = registry.join(post(0, b"5\r\nhello\r\n"))
    assert not isinstance(joined, RequestRejected)
    assert joined == (server, 1)
    assert drain(server) == [TunnelEstablished(method=GP), StreamData(data=b"hello")]


def test_upstream_rolls_over_to_the_next_post_without_losing_or_repeating_a_byte() -> None:
    link = opened_link(GP, limits=SMALL, split=cutter([5, 1, 9]))
    payload = bytes(range(256)) * 3
    link.client.send(payload)
    link.pump()
    assert link.server_received() == payload
    opened = [event.leg for event in link.client_events if isinstance(event, OpenLeg)]
    assert len(opened) > 10
    assert opened == list(range(1, len(opened) + 1))
    # Every POST but the last carried exactly post_length body bytes and got a 204.
    server = link.getpost_server()
    assert server.expected_sequence == len(opened)
    for leg in opened[:-1]:
        assert link.client.eof_to_send(leg)
    assert not link.client.eof_to_send(opened[-1])


def test_the_next_post_waits_for_the_204_to_the_previous_one() -> None:
    client = GetPostClient(host=HOST, port=PORT, tunnel_id=TUNNEL_ID, limits=SMALL)
    client.receive_data(OK_HEAD, 0)
    drain(client)
    client.send(b"x" * 100)
    head_and_body = client.data_to_send(1)
    body = head_and_body[head_and_body.index(b"\r\n\r\n") + 4 :]
    assert len(body) == 64
    assert drain(client) == []  # no POST 1 before the 204
    client.receive_data(b"HTTP/1.1 204 No Content\r\n\r\n", 1)
    assert drain(client) == [OpenLeg(leg=2)]
    assert client.eof_to_send(1)
    assert client.data_to_send(2).startswith(f"POST /wavesync/tunnel/v1/getpost/{TID}/1 ".encode())


def test_clean_close_each_way_is_the_last_chunk() -> None:
    link = opened_link(GP)
    link.client.send(b"up")
    link.client.close()
    link.pump()
    assert link.server_received() == b"up"
    assert link.server_events[-1] == StreamEnded()
    assert state_of(link.server) is TunnelState.OPEN  # a half-close: downstream goes on
    link.server.send(b"down after the client's end")
    link.server.close()
    link.pump()
    assert link.client_received() == b"down after the client's end"
    assert link.client_events[-1] == StreamEnded()
    assert state_of(link.client) is state_of(link.server) is TunnelState.CLOSED
    assert all(link.client.eof_to_send(leg) for leg in link.legs)


def test_a_refused_get_fails_with_its_status() -> None:
    client = GetPostClient(host=HOST, port=PORT, tunnel_id=TUNNEL_ID)
    client.receive_data(b"HTTP/1.1 409 Conflict\r\nContent-Length: 0\r\n\r\n", 0)
    (failed,) = drain(client)
    assert isinstance(failed, TunnelFailed)
    assert failed.status == 409


def test_a_refused_post_fails_the_client() -> None:
    client = GetPostClient(host=HOST, port=PORT, tunnel_id=TUNNEL_ID)
    client.receive_data(OK_HEAD, 0)
    drain(client)
    client.receive_data(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", 1)
    (failed,) = drain(client)
    assert isinstance(failed, TunnelFailed)
    assert failed.status == 404
    assert "POST 0 refused" in failed.reason


def test_a_204_before_the_body_is_used_up_fails_the_client() -> None:
    client = GetPostClient(host=HOST, port=PORT, tunnel_id=TUNNEL_ID)
    client.receive_data(OK_HEAD, 0)
    drain(client)
    client.receive_data(b"HTTP/1.1 204 No Content\r\n\r\n", 1)
    (failed,) = drain(client)
    assert isinstance(failed, TunnelFailed)
    assert "before its body" in failed.reason


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (OK_HEAD + b"zz\r\n", "not HTTP/1.1"),
        (OK_HEAD + b"5\r\nab", "closed before its last chunk"),
    ],
)
def test_a_broken_downstream_fails_the_client(data: bytes, reason: str) -> None:
    client = GetPostClient(host=HOST, port=PORT, tunnel_id=TUNNEL_ID)
    client.receive_data(data, 0)
    client.receive_data(b"", 0)
    events = drain(client)
    assert isinstance(events[-1], TunnelFailed)
    assert reason in events[-1].reason


# --- the server side and the registry ---------------------------------------------------


def test_a_second_get_for_a_live_id_is_409_and_the_first_tunnel_goes_on() -> None:
    registry = GetPostRegistry()
    first = registry.open(get(), 0.0)
    assert isinstance(first, GetPostServer)
    second = registry.open(get(), 0.0)
    assert isinstance(second, RequestRejected)
    assert second.status == 409
    assert registry.get(TUNNEL_ID) is first
    assert state_of(first) is TunnelState.OPEN


def test_a_post_for_an_unknown_id_is_404() -> None:
    rejected = GetPostRegistry().join(post(0))
    assert isinstance(rejected, RequestRejected)
    assert rejected.status == 404
    assert rejected.response.startswith(b"HTTP/1.1 404 Not Found\r\n")


def test_posts_out_of_turn_are_409_and_change_nothing() -> None:
    registry = GetPostRegistry()
    server = registry.open(get(), 0.0)
    assert isinstance(server, GetPostServer)
    skipped = registry.join(post(1))
    assert isinstance(skipped, RequestRejected)
    assert (skipped.status, skipped.reason) == (409, "expected POST 0, not 1")
    assert registry.join(post(0, b"1\r\na\r\n")) == (server, 1)
    racing = registry.join(post(1))
    assert isinstance(racing, RequestRejected)
    assert racing.reason == "POST 0 is still in progress"
    assert drain(server)[-1] == StreamData(data=b"a")


def test_a_released_id_cannot_be_opened_again_and_memory_is_bounded() -> None:
    registry = GetPostRegistry(remember_finished=2, max_tunnels=2)
    ids = [f"{n:032x}" for n in range(4)]
    for tunnel_id in ids[:2]:
        assert isinstance(registry.open(get(tunnel_id), 0.0), GetPostServer)
    full = registry.open(get(ids[2]), 0.0)
    assert isinstance(full, RequestRejected)
    assert full.status == 503
    registry.release(bytes.fromhex(ids[0]))
    registry.release(bytes.fromhex(ids[0]))  # twice is harmless
    replayed = registry.open(get(ids[0]), 0.0)
    assert isinstance(replayed, RequestRejected)
    assert replayed.status == 409
    registry.release(bytes.fromhex(ids[1]))
    assert isinstance(registry.open(get(ids[2]), 0.0), GetPostServer)
    registry.release(bytes.fromhex(ids[2]))
    # Only the last two finished ids are remembered: the oldest is free again.
    assert isinstance(registry.open(get(ids[0]), 0.0), GetPostServer)
    assert len(registry) == 1


def test_registry_misuse_raises() -> None:
    registry = GetPostRegistry()
    with pytest.raises(LocalProtocolError):
        registry.open(post(0), 0.0)
    with pytest.raises(LocalProtocolError):
        registry.join(get())
    with pytest.raises(LocalProtocolError):
        GetPostRegistry(max_tunnels=0)


def test_a_bad_upstream_chunk_is_answered_and_fails_the_tunnel() -> None:
    registry = GetPostRegistry(limits=TunnelLimits(max_chunk=16))
    server = registry.open(get(), 0.0)
    assert isinstance(server, GetPostServer)
    server.data_to_send(0)
    assert registry.join(post(0, b"ff\r\n")) == (server, 1)
    events = drain(server)
    assert isinstance(events[-1], TunnelFailed)
    assert events[-1].status == 413
    assert server.data_to_send(1).startswith(b"HTTP/1.1 413 ")
    assert server.eof_to_send(0)
    assert server.eof_to_send(1)


def test_a_post_closing_mid_body_fails_the_tunnel() -> None:
    registry = GetPostRegistry()
    server = registry.open(get(), 0.0)
    assert isinstance(server, GetPostServer)
    registry.join(post(0, b"3\r\nab"))
    server.receive_data(b"", 1)
    events = drain(server)
    assert isinstance(events[-1], TunnelFailed)
    assert "closed before its body ended" in events[-1].reason


def test_the_client_dropping_the_get_fails_the_tunnel() -> None:
    server = GetPostRegistry().open(get(), 0.0)
    assert isinstance(server, GetPostServer)
    server.receive_data(b"", 0)
    assert isinstance(drain(server)[-1], TunnelFailed)


def test_bytes_past_the_content_length_are_not_stream_bytes() -> None:
    registry = GetPostRegistry()
    server = registry.open(get(), 0.0)
    assert isinstance(server, GetPostServer)
    registry.join(post(0, b"2\r\nab\r\nJUNK", length=7))
    assert drain(server)[1:] == [StreamData(data=b"ab")]
    assert server.data_to_send(1) == b"HTTP/1.1 204 No Content\r\nCache-Control: no-store\r\n\r\n"
    assert server.expected_sequence == 1


def test_a_post_after_the_upstream_ended_is_409() -> None:
    registry = GetPostRegistry()
    server = registry.open(get(), 0.0)
    assert isinstance(server, GetPostServer)
    registry.join(post(0, b"0\r\n\r\n"))
    assert drain(server)[-1] == StreamEnded()
    late = registry.join(post(1))
    assert isinstance(late, RequestRejected)
    assert late.status == 409


def test_link_with_a_duplicate_get_on_the_same_registry() -> None:
    registry = GetPostRegistry()
    first = Link(GetPostClient(host=HOST, port=PORT, tunnel_id=TUNNEL_ID), registry=registry)
    first.pump()
    second = Link(GetPostClient(host=HOST, port=PORT, tunnel_id=TUNNEL_ID), registry=registry)
    second.pump()
    failed = second.client_events[-1]
    assert isinstance(failed, TunnelFailed)
    assert failed.status == 409
    first.client.send(b"still fine")
    first.pump()
    assert first.server_received() == b"still fine"


def test_a_get_whose_first_post_never_comes_is_failed_in_time() -> None:
    registry = GetPostRegistry(first_post_timeout=10.0)
    waiting = registry.open(get(), 100.0)
    other_id = "ff" * 16
    joined = registry.open(get(other_id), 101.0)
    assert isinstance(waiting, GetPostServer)
    assert isinstance(joined, GetPostServer)
    assert registry.join(post(0, tunnel_id=other_id)) == (joined, 1)
    assert registry.get_timer() == 110.0
    assert registry.handle_timer(109.9) == []
    assert registry.handle_timer(110.0) == [waiting]
    failed = drain(waiting)[-1]
    assert isinstance(failed, TunnelFailed)
    assert failed.reason == "no POST followed the GET in time"
    assert waiting.eof_to_send(0)
    assert registry.get_timer() is None  # the joined one is not on the clock
    assert state_of(joined) is TunnelState.OPEN
    registry.release(TUNNEL_ID)
    assert len(registry) == 1


def test_awaiting_answer_names_the_post_leg_the_upstream_waits_for() -> None:
    client = GetPostClient(
        host="m", port=80, tunnel_id=bytes(16), limits=TunnelLimits(post_length=64)
    )
    assert client.awaiting_answer is None
    client.receive_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", 0)
    client.send(b"a" * 10)
    assert client.awaiting_answer is None  # POST 0 has room
    client.send(b"b" * 100)
    assert client.awaiting_answer == 1  # its body is full: read its 204
    client.receive_data(b"HTTP/1.1 204 No Content\r\n\r\n", 1)
    assert client.awaiting_answer is None  # POST 1 goes on
    client.close()
    assert client.awaiting_answer == 2  # the body with the last chunk
