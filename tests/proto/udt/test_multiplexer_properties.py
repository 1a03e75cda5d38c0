"""Hypothesis properties of UdtMultiplexer: any datagram is routed or handed back, never raises."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wavesync_proto.addresses import Endpoint
from wavesync_proto.udt.connection_types import ConnectionState
from wavesync_proto.udt.multiplexer import UdtMultiplexer

from ...netsim import GilbertElliott, LinkConfig, Network, run_until

CLIENT: Endpoint = ("192.0.2.1", 4000)
SERVER: Endpoint = ("198.51.100.2", 5000)
SECRET = b"0123456789abcdef"


def _mux(seed: int) -> UdtMultiplexer:
    rng = random.Random(seed)  # noqa: S311 - reproducible ids for a test, not secrets
    return UdtMultiplexer(now=0.0, random_bits=rng.getrandbits, cookie_secret=SECRET)


def _is_stun(data: bytes) -> bool:
    return (
        len(data) >= 20
        and data[0] & 0xC0 == 0
        and data[4:8] == b"\x21\x12\xa4\x42"
        and struct.unpack_from("!H", data, 2)[0] == len(data) - 20
    )


# Datagrams that look like UDT headers addressed to id 0 or to a live connection
# reach deeper code than uniformly random bytes would.
headers = st.tuples(
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFFFFFF),
    st.integers(0, 0xFFFFFFFF),
    st.sampled_from(["zero", "live", "random"]),
    st.binary(max_size=80),
)


@pytest.mark.property
@given(
    seed=st.integers(0, 2**32 - 1),
    datagrams=st.lists(st.one_of(st.binary(max_size=120), headers), max_size=40),
)
def test_any_datagram_is_routed_or_handed_back_and_nothing_raises(
    seed: int, datagrams: list[bytes | tuple[int, int, int, int, str, bytes]]
) -> None:
    network = Network(seed)
    network.link(CLIENT, SERVER, LinkConfig(delay=0.001))
    client, server = _mux(seed), _mux(seed + 1)
    server.listen()
    outgoing = client.connect(SERVER, 0.0)
    endpoints = {CLIENT: client, SERVER: server}
    run_until(network, endpoints, stop=lambda: outgoing.state is ConnectionState.CONNECTED)
    live = next(iter(server.connections))
    now = network.now
    for item in datagrams:
        if isinstance(item, bytes):
            data = item
        else:
            word0, word1, word2, word3, destination, body = item
            socket_id = {"zero": 0, "live": live}.get(destination, word3)
            data = struct.pack("!HHIII", word0, word1, word2, word3, socket_id) + body
        routed = server.receive_datagram(data, CLIENT, now)
        assert routed is not (len(data) < 16 or _is_stun(data))
        server.handle_timer(now)
        for _, destination_address in server.datagrams_to_send(now):
            assert destination_address == CLIENT
        now += 0.001
    assert len(server.connections) <= 1


@pytest.mark.property
@given(
    seed=st.integers(0, 2**32 - 1),
    loss=st.floats(0.0, 0.5),
    duplicate=st.floats(0.0, 0.3),
    connects=st.integers(1, 6),
)
def test_every_connect_over_a_lossy_link_ends_connected_once_or_failed(
    seed: int, loss: float, duplicate: float, connects: int
) -> None:
    network = Network(seed)
    config = LinkConfig(
        delay=0.01,
        loss=loss,
        duplicate=duplicate,
        burst=GilbertElliott(good_to_bad=0.01, bad_to_good=0.5),
    )
    network.link(CLIENT, SERVER, config)
    client, server = _mux(seed), _mux(seed + 1)
    server.listen()
    outgoing = [client.connect(SERVER, 0.0) for _ in range(connects)]
    endpoints = {CLIENT: client, SERVER: server}
    run_until(
        network,
        endpoints,
        until=10.0,
        stop=lambda: all(c.state is not ConnectionState.CONNECTING for c in outgoing),
    )
    # Duplicated and repeated requests never make a second server-side connection.
    connected = [c for c in outgoing if c.state is ConnectionState.CONNECTED]
    peers = [c.peer_socket_id for c in server.connections.values()]
    assert len(peers) == len(set(peers))
    assert {c.socket_id for c in connected} <= set(peers)
