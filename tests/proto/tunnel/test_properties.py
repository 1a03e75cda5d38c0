"""Hypothesis properties of the tunnel machines: parsers never raise or hoard; streams arrive whole.

Whatever a peer sends, in whatever read sizes, the server-side parsers (the
request reader, each method's server machine, getpost's chunk reader) never
raise and never hold more than their limit; the client machines end any
answer with an event. And for every method, any sequence of writes arrives
byte-exact and in order both ways, with a clean close, whatever the reads.
"""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from wavesync_proto.errors import RemoteProtocolError
from wavesync_proto.tunnel import (
    GetPostRegistry,
    GetPostServer,
    OpenLeg,
    RequestRejected,
    StreamEnded,
    TunnelEndpoint,
    TunnelFailed,
    TunnelLimits,
    TunnelMethod,
    TunnelRequest,
    TunnelRequestReader,
    TunnelState,
    UpgradeServer,
    WebSocketServer,
)
from wavesync_proto.tunnel.wire import ChunkReader, encode_chunk

from .helpers import ALL_METHODS, TUNNEL_ID, Link, cutter, drain, make_client

pytestmark = pytest.mark.property

LIMITS = TunnelLimits(max_head=1024, max_chunk=64, post_length=200)
TID = TUNNEL_ID.hex()


def _requests() -> list[bytes]:
    wire = [make_client(method, limits=LIMITS).data_to_send() for method in ALL_METHODS]
    wire.append(
        f"POST /wavesync/tunnel/v1/getpost/{TID}/0 HTTP/1.1\r\nHost: h\r\n"
        "Content-Length: 1000000000\r\n\r\n".encode()
    )
    return wire


REQUESTS = _requests()


@st.composite
def mutated(draw: st.DrawFn, originals: list[bytes]) -> bytes:
    """One of ``originals`` with a few bytes flipped, inserted, deleted, or cut off."""
    data = bytearray(draw(st.sampled_from(originals)))
    for _ in range(draw(st.integers(min_value=0, max_value=4))):
        position = draw(st.integers(min_value=0, max_value=len(data)))
        action = draw(st.sampled_from(["flip", "insert", "delete", "cut"]))
        if action == "flip" and position < len(data):
            data[position] ^= draw(st.integers(min_value=1, max_value=255))
        elif action == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=2000))
        elif action == "delete":
            del data[position : position + draw(st.integers(min_value=1, max_value=8))]
        elif action == "cut":
            del data[position:]
    return bytes(data) + draw(st.binary(max_size=32))


peer_bytes = mutated(REQUESTS) | st.binary(max_size=3000)
cuts = st.lists(st.integers(min_value=0, max_value=300), max_size=8)


def pieces(data: bytes, sizes: list[int]) -> list[bytes]:
    return cutter(sizes)(data) if data else []


@given(peer_bytes, cuts, st.booleans())
def test_the_request_reader_never_raises_and_never_hoards(
    data: bytes, sizes: list[int], eof: bool
) -> None:
    reader = TunnelRequestReader(limits=LIMITS)
    results: list[TunnelRequest | RequestRejected] = []
    for piece in [*pieces(data, sizes), *([b""] if eof else [])]:
        reader.receive_data(piece)
        assert reader.buffered <= LIMITS.max_head + len(piece)
        if (result := reader.next_event()) is not None:
            results.append(result)
    assert len(results) <= 1
    if results and isinstance(results[0], RequestRejected):
        rejected = results[0]
        assert rejected.status in (0, 400, 404, 405, 413, 426, 431)
        assert reader.data_to_send() == rejected.response
    if results and isinstance(results[0], TunnelRequest):
        assert len(results[0].head) <= LIMITS.max_head


def server_for(request: TunnelRequest) -> tuple[TunnelEndpoint, int]:
    if request.method is TunnelMethod.UPGRADE:
        return UpgradeServer(request, limits=LIMITS), 0
    if request.method is TunnelMethod.WEBSOCKET:
        return WebSocketServer(request, limits=LIMITS), 0
    registry = GetPostRegistry(limits=LIMITS)
    get = TunnelRequestReader(limits=LIMITS)
    get.receive_data(REQUESTS[3])
    opened = registry.open(get.next_event(), 0.0)  # type: ignore[arg-type]
    assert isinstance(opened, GetPostServer)
    if request.verb == "GET":
        return opened, 0
    joined = registry.join(request)
    assert not isinstance(joined, RequestRejected)
    return joined


# Stream-phase bytes a server might get: websocket frames (masked and not), chunks, noise.
phase_bytes = st.lists(
    st.sampled_from(
        [
            b"\x82\x85\x01\x02\x03\x04"
            + bytes(b ^ k for b, k in zip(b"hello", b"\x01\x02\x03\x04\x01", strict=True)),
            b"\x82\x80\x00\x00\x00\x00",
            b"\x88\x82\x00\x00\x00\x00\x03\xe8",
            b"\x89\x80\x00\x00\x00\x00",
            b"\x81\x81\x00\x00\x00\x00a",
            b"\x82\xfe\x00\x7e\x00\x00\x00\x00",
            encode_chunk(b"hello"),
            encode_chunk(b"x" * 64),
            b"41\r\n",
            encode_chunk(b""),
            b"\r\n",
        ]
    )
    | st.binary(max_size=200),
    max_size=10,
).map(b"".join)


@given(st.sampled_from(REQUESTS[:2] + REQUESTS[3:]), phase_bytes, cuts, st.booleans())
def test_server_machines_never_raise_and_never_hoard(
    request_bytes: bytes, data: bytes, sizes: list[int], eof: bool
) -> None:
    reader = TunnelRequestReader(limits=LIMITS)
    reader.receive_data(request_bytes)
    request = reader.next_event()
    assert isinstance(request, TunnelRequest)
    server, leg = server_for(request)
    for piece in [*pieces(data, sizes), *([b""] if eof else [])]:
        server.receive_data(piece, leg)
        events = drain(server)
        server.data_to_send(leg)
        # Frames and chunk lines are short; data is handed on as it arrives.
        assert server.buffered <= 18
        if any(isinstance(event, TunnelFailed) for event in events):
            assert server.state is TunnelState.FAILED
            assert server.eof_to_send(leg)


@given(phase_bytes, cuts)
def test_the_chunk_reader_either_reads_or_refuses_and_holds_one_line_at_most(
    data: bytes, sizes: list[int]
) -> None:
    reader = ChunkReader(max_chunk=64)
    out: list[bytes] = []
    with contextlib.suppress(RemoteProtocolError):  # refusing is allowed; any other error is not
        for piece in pieces(data, sizes):
            out += reader.feed(piece)
            assert reader.buffered <= 18
    assert all(len(piece) <= 64 for piece in out)


answers = st.lists(
    st.sampled_from(
        [
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
            b"Upgrade: wavesync-tunnel/1\r\n\r\n",
            b"HTTP/1.1 200 Connection established\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 100 Continue\r\n\r\n",
            encode_chunk(b"data"),
            encode_chunk(b""),
        ]
    )
    | st.binary(max_size=100),
    max_size=6,
).map(b"".join)


@pytest.mark.parametrize("method", ALL_METHODS)
@given(data=answers, sizes=cuts, eof=st.booleans())
def test_client_machines_never_raise_on_any_answer(
    method: TunnelMethod, data: bytes, sizes: list[int], eof: bool
) -> None:
    client = make_client(method, limits=LIMITS)
    client.send(b"early")
    client.data_to_send(0)
    for piece in [*pieces(data, sizes), *([b""] if eof else [])]:
        for leg in (0, 1):
            # Leg 1 exists once a getpost client has its 200; the others have leg 0 only.
            if leg == 0 or (method is TunnelMethod.GETPOST and client.state is TunnelState.OPEN):
                client.receive_data(piece, leg)
        drain(client)
        assert client.buffered <= LIMITS.max_head + len(piece)
    if eof:
        assert client.state is not TunnelState.HANDSHAKE


writes = st.lists(
    st.tuples(st.booleans(), st.binary(min_size=1, max_size=300)), min_size=0, max_size=12
)


@pytest.mark.parametrize("method", ALL_METHODS)
@given(script=writes, sizes=cuts, client_closes_first=st.booleans())
# getpost: 196 bytes of chunks, so the client's last chunk (5 bytes, sent after the server
# ended) straddles the end of the 200-byte POST 0 and its tail opens POST 1.
@example(
    script=[(True, bytes(size)) for size in (2, 8, 12, 14, 14, 14, 17, 17, 20, 24)],
    sizes=[],
    client_closes_first=False,
)
def test_any_writes_arrive_byte_exact_and_in_order_both_ways(
    method: TunnelMethod,
    script: list[tuple[bool, bytes]],
    sizes: list[int],
    client_closes_first: bool,
) -> None:
    link = Link(make_client(method, limits=LIMITS), limits=LIMITS, split=cutter(sizes))
    sent_up, sent_down = b"", b""
    for index, (from_client, data) in enumerate(script):
        if from_client:
            link.client.send(data)
            sent_up += data
        elif link.legs[0].machine is not None:
            link.server.send(data)
            sent_down += data
        if index % 3 == 0:
            link.pump()
    link.pump()
    first, second = (
        (link.client, link.server) if client_closes_first else (link.server, link.client)
    )
    first.close()
    link.pump()
    second.close()
    link.pump()
    assert link.server_received() == sent_up
    assert link.client_received() == sent_down
    assert link.client.state is TunnelState.CLOSED
    assert link.server.state is TunnelState.CLOSED
    # A getpost client may open one more POST after the server ended: its own last chunk
    # can spill past the current body.
    assert [e for e in link.client_events if not isinstance(e, OpenLeg)][-1] == StreamEnded()
    assert link.server_events[-1] == StreamEnded()
