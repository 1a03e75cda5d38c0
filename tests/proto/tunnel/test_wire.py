"""The tunnel wire codecs: chunk framing, Basic credentials, tunnel ids, request targets."""

from __future__ import annotations

import pytest

from wavesync_proto.errors import LocalProtocolError, RemoteProtocolError
from wavesync_proto.tunnel import ProxyConfig, TunnelLimits, TunnelMethod
from wavesync_proto.tunnel.wire import (
    ChunkReader,
    authority,
    encode_chunk,
    format_tunnel_id,
    parse_tunnel_id,
    request_target,
    tunnel_path,
)


def test_chunks_are_the_chunked_coding() -> None:
    assert encode_chunk(b"hello") == b"5\r\nhello\r\n"
    assert encode_chunk(b"x" * 255) == b"ff\r\n" + b"x" * 255 + b"\r\n"
    assert encode_chunk(b"") == b"0\r\n\r\n"


def test_chunk_reader_hands_out_data_as_it_arrives_in_any_pieces() -> None:
    wire = encode_chunk(b"hello") + encode_chunk(b"world!" * 10) + encode_chunk(b"")
    reader = ChunkReader(max_chunk=100)
    out = b"".join(b"".join(reader.feed(wire[i : i + 1])) for i in range(len(wire)))
    assert out == b"hello" + b"world!" * 10
    assert reader.finished
    assert reader.buffered == 0


def test_chunk_reader_ignores_bytes_after_the_last_chunk() -> None:
    reader = ChunkReader(max_chunk=100)
    assert reader.feed(encode_chunk(b"ab") + encode_chunk(b"") + b"ZZ\r\n") == [b"ab"]
    assert reader.finished
    assert reader.feed(b"more") == []


def test_chunk_reader_accepts_upper_case_hex() -> None:
    assert ChunkReader(max_chunk=100).feed(b"A\r\n0123456789\r\n") == [b"0123456789"]


@pytest.mark.parametrize(
    ("wire", "message", "status"),
    [
        (b"zz\r\n", "bad chunk size line", 400),
        (b"5;ext=1\r\n", "bad chunk size line", 400),
        (b"\r\n", "bad chunk size line", 400),
        (b"65\r\n", "exceeds the limit of 100", 413),
        (b"2\r\nabXY\r\n", "not followed by CRLF", 400),
        (b"2\nab", "not ended by CRLF", 400),
        (b"1" * 40, "too long", 400),
        (b"0\r\nTrailer: x\r\n\r\n", "not followed by CRLF", 400),
    ],
)
def test_chunk_reader_refuses_what_is_not_our_framing(
    wire: bytes, message: str, status: int
) -> None:
    with pytest.raises(RemoteProtocolError, match=message) as caught:
        ChunkReader(max_chunk=100).feed(wire)
    assert caught.value.error_code_hint == status


def test_chunk_reader_holds_at_most_one_short_line() -> None:
    reader = ChunkReader(max_chunk=1 << 20)
    reader.feed(b"fffff")
    assert reader.buffered == 5
    with pytest.raises(RemoteProtocolError):
        reader.feed(b"f" * 14)


def test_proxy_credentials_are_basic() -> None:
    # RFC 7617 §2's own example: Aladdin / open sesame.
    proxy = ProxyConfig(host="p", port=3128, username="Aladdin", password="open sesame")
    assert proxy.authorization() == [("Proxy-Authorization", "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==")]
    assert ProxyConfig(host="p", port=3128).authorization() == []
    with pytest.raises(LocalProtocolError):
        ProxyConfig(host="p", port=1, username="a:b").authorization()


def test_targets_are_origin_form_direct_and_absolute_form_through_a_proxy() -> None:
    path = tunnel_path(TunnelMethod.UPGRADE)
    assert path == "/wavesync/tunnel/v1/upgrade"
    assert request_target(host="h", port=80, path=path, proxy=None) == (path, [])
    proxy = ProxyConfig(host="p", port=3128, username="u", password="")
    target, headers = request_target(host="2001:db8::1", port=8080, path=path, proxy=proxy)
    assert target == "http://[2001:db8::1]:8080/wavesync/tunnel/v1/upgrade"
    assert headers == [("Proxy-Authorization", "Basic dTo=")]
    with pytest.raises(LocalProtocolError):
        authority("h", 0)


def test_tunnel_ids_are_32_lower_case_hex_digits() -> None:
    assert format_tunnel_id(bytes(range(16))) == "000102030405060708090a0b0c0d0e0f"
    assert parse_tunnel_id("000102030405060708090a0b0c0d0e0f") == bytes(range(16))
    for bad in ("000102030405060708090A0B0C0D0E0F", "00", "g" * 32, "0" * 33):
        assert parse_tunnel_id(bad) is None
    with pytest.raises(LocalProtocolError):
        format_tunnel_id(b"short")


def test_limits_refuse_nonsense() -> None:
    with pytest.raises(LocalProtocolError):
        TunnelLimits(max_head=10)
    with pytest.raises(LocalProtocolError):
        TunnelLimits(max_chunk=1)
    with pytest.raises(LocalProtocolError):
        TunnelLimits(post_length=1)
