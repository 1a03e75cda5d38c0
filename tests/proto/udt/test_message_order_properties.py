"""Hypothesis properties of DGRAM messages with random in-order bits through a lossy network.

Whatever the network does, every message arrives exactly once and whole; a message
sent with the in-order bit arrives after every message sent before it; the receive
buffer never holds more than its configured packets.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wavesync_proto.udt.connection import UdtConnection
from wavesync_proto.udt.connection_types import (
    CloseReason,
    ConnectionClosed,
    ConnectionState,
    DataReceived,
    UdtConfig,
)
from wavesync_proto.udt.packet_types import SocketType
from wavesync_proto.udt.seqnum import SEQ_MAX

from ...netsim import LinkConfig, Network, run_until
from .connection_helpers import CLIENT, SERVER, seeded

# A whole connection per example: keep each one small. A small receive buffer makes
# messages handed out ahead of a hole press against its bound.
SMALL = settings(suppress_health_check=[HealthCheck.too_slow])
CONFIG = UdtConfig(
    socket_type=SocketType.DGRAM,
    linger=600.0,
    receive_buffer_packets=32,
    send_buffer_bytes=64 * 1456,
)

links = st.builds(
    LinkConfig,
    delay=st.sampled_from([0.0, 0.002, 0.02]),
    loss=st.sampled_from([0.0, 0.05, 0.2]),
    duplicate=st.sampled_from([0.0, 0.05]),
    reorder=st.sampled_from([0.0, 0.1]),
    reorder_delay=st.just(0.01),
)
messages = st.lists(
    st.tuples(st.sampled_from([1, 100, 1456, 1457, 4000, 9000]), st.booleans()),
    min_size=1,
    max_size=30,
)


def run(
    plan: list[tuple[int, bool]], link: LinkConfig, seed: int
) -> tuple[list[bytes], list[bytes], ConnectionClosed | None]:
    """Send ``plan`` (size, in-order bit) A->B; return what was sent, what B got, A's end."""
    rng = seeded(seed)
    # Each message starts with its index: equal sizes still give distinct messages.
    sent = [index.to_bytes(2, "big") + rng.randbytes(size) for index, (size, _) in enumerate(plan)]
    a = UdtConnection.rendezvous(
        [SERVER], socket_id=1, isn=SEQ_MAX - 20, now=0.0, random=rng.random, config=CONFIG
    )
    b = UdtConnection.rendezvous(
        [CLIENT], socket_id=2, isn=5, now=0.0, random=seeded(seed + 1).random, config=CONFIG
    )
    network = Network(seed)
    network.link(CLIENT, SERVER, link)
    got: list[bytes] = []
    closed: dict[str, ConnectionClosed] = {}
    next_message = 0

    def step() -> bool:
        nonlocal next_message
        while next_message < len(sent) and a.state in (
            ConnectionState.CONNECTING,
            ConnectionState.CONNECTED,
        ):
            if not a.send(sent[next_message], in_order=plan[next_message][1]):
                break
            next_message += 1
        if next_message == len(sent) and a.state is ConnectionState.CONNECTED:
            a.close(network.now)
        for name, connection in (("a", a), ("b", b)):
            assert connection.receive_buffer_packets <= CONFIG.receive_buffer_packets
            while (event := connection.next_event()) is not None:
                if isinstance(event, DataReceived):
                    assert event.message_complete
                    got.append(event.data)
                elif isinstance(event, ConnectionClosed):
                    closed[name] = event
        return "a" in closed and "b" in closed

    run_until(network, {CLIENT: a, SERVER: b}, 3600.0, stop=step, max_steps=2_000_000)
    return sent, got, closed.get("a")


@pytest.mark.property
@SMALL
@given(plan=messages, link=links, seed=st.integers(0, 2**16))
def test_every_message_once_whole_and_in_order_ones_after_all_before(
    plan: list[tuple[int, bool]], link: LinkConfig, seed: int
) -> None:
    sent, got, closed = run(plan, link, seed)
    assert closed == ConnectionClosed(reason=CloseReason.LOCAL_CLOSE, detail="closed")
    # Exactly once and whole: what arrived is a permutation of what was sent.
    assert sorted(got) == sorted(sent)
    position = {message: index for index, message in enumerate(got)}
    for index, (_, in_order) in enumerate(plan):
        if in_order:
            arrived = position[sent[index]]
            assert all(position[sent[before]] < arrived for before in range(index))
