"""The relay's port is also its HTTP tunnel face: tunnel requests are handed off whole."""

from __future__ import annotations

import pytest

from wavesync_proto.relay import HandOffTunnel

from .helpers import Harness, connect_request

GET = (
    b"GET /wavesync/tunnel/v1/getpost/000102030405060708090a0b0c0d0e0f HTTP/1.1\r\n"
    b"Host: relay.example:8080\r\n\r\n"
)
ABSOLUTE = (
    b"GET http://relay.example:8080/wavesync/tunnel/v1/upgrade HTTP/1.1\r\n"
    b"Host: relay.example:8080\r\nConnection: Upgrade\r\nUpgrade: wavesync-tunnel/1\r\n\r\n"
)
POST = (
    b"POST /wavesync/tunnel/v1/getpost/000102030405060708090a0b0c0d0e0f/0 HTTP/1.1\r\n"
    b"Host: relay.example:8080\r\nContent-Length: 1000000000\r\n\r\n5\r\nhello\r\n"
)


@pytest.mark.parametrize("request_bytes", [GET, ABSOLUTE, POST], ids=["get", "absolute", "post"])
@pytest.mark.parametrize("pieces", [1, 7])
def test_a_tunnel_request_is_handed_off_with_every_byte_it_sent(
    request_bytes: bytes, pieces: int
) -> None:
    h = Harness.create()
    h.connect("t")
    step = -(-len(request_bytes) // pieces)
    actions = []
    for start in range(0, len(request_bytes), step):
        actions = h.send("t", request_bytes[start : start + step])
    # Reported when the head is in: a POST's body of 10**9 bytes is never waited for.
    assert actions == [HandOffTunnel(connection="t", received=request_bytes)]
    assert h.service.counters.tunnels_handed_off == 1
    assert h.service.connection_count() == 0
    assert h.service.get_timer() is None  # no handshake timeout left behind


def test_a_relay_path_is_still_the_relays_and_other_paths_are_404() -> None:
    h = Harness.create()
    h.connect("c")
    h.send("c", b"GET /wavesync/tunnel/v2/upgrade HTTP/1.1\r\nHost: r\r\n\r\n")
    assert h.refused("c").status == 404
    assert h.service.counters.tunnels_handed_off == 0
    h.connect("d")
    h.send("d", connect_request(None))
    assert h.refused("d").status == 400  # a relay request, judged as one
