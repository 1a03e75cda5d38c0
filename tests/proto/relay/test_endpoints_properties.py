"""Hypothesis properties of the agent's and the client's machines: any relay answer, in any pieces.

Whatever a relay (or an impostor) sends, in whatever read sizes, the machines
never raise: they end with an event that says what happened. And a real
relay's answer gives the same result however it is split.
"""

from __future__ import annotations

import itertools
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wavesync_proto.relay.client import RelayConnect, RelayConnectEvent, RelayPaired
from wavesync_proto.relay.standby import StandbyConnection, StandbyEvent, TunnelOpened

pytestmark = pytest.mark.property

SYSTEM = uuid.UUID("0a000000-0000-4000-8000-00000000000a")
SERVER = uuid.UUID("51000000-0000-4000-8000-000000000001")
SESSION = bytes(range(16))
STANDBY_ACCEPTED = (
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: wavesync-relay/1\r\n"
    b"Wavesync-Standby-Count: 7\r\nWavesync-Keepalive: 20\r\n\r\n"
)
PAIRED = (
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: wavesync-relay/1\r\n"
    b"Wavesync-Session: " + SESSION.hex().encode() + b"\r\n"
    b"Wavesync-Server: " + str(SERVER).encode() + b"\r\n\r\n"
)

# Bytes that look like parts of relay answers, so the parsers get past their first line.
relay_like = st.lists(
    st.sampled_from(
        [
            STANDBY_ACCEPTED,
            PAIRED,
            b"PING\r\n",
            b"OPEN " + SESSION.hex().encode() + b" 203.0.113.9:61000\r\n",
            b"READY " + SESSION.hex().encode() + b"\r\n",
            b"HTTP/1.1 503 Busy\r\nRetry-After: 2\r\nContent-Length: 4\r\n\r\nbusy",
            b"\r\n",
        ]
    )
    | st.binary(max_size=64),
    max_size=8,
).map(b"".join)


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    bounds = [0, *points, len(data)]
    return [data[start:end] for start, end in itertools.pairwise(bounds)]


def new_standby() -> StandbyConnection:
    return StandbyConnection(
        key="system-a-secret-key-0123",
        system_id=SYSTEM,
        server_id=SERVER,
        relay_host="relay.test",
        unix_time=1_800_000_000,
        nonce=b"n" * 16,
        now=0.0,
    )


def feed_standby(data: bytes, cuts: list[int]) -> list[StandbyEvent]:
    machine, events = new_standby(), []
    for piece in pieces(data, cuts):
        events += machine.data_received(piece, 1.0)
        if any(isinstance(event, TunnelOpened) for event in events):
            break  # later bytes are the client's, not the machine's
    return events


@given(relay_like, st.lists(st.integers(min_value=0), max_size=6))
def test_standby_never_raises_and_ends_at_most_once(data: bytes, cuts: list[int]) -> None:
    machine, events = new_standby(), []
    for piece in pieces(data, cuts):
        events += machine.data_received(piece, 1.0)
        if any(isinstance(event, TunnelOpened) for event in events):
            break
    events += machine.connection_lost() + machine.handle_timer(1e9)
    # After its last event (refused, ended, or a tunnel) the machine says nothing more.
    final = [event for event in events if type(event).__name__ != "StandbyAccepted"]
    assert len(final) <= 1
    assert machine.get_timer() is None


@given(st.binary(max_size=64), st.lists(st.integers(min_value=0), max_size=6))
def test_standby_result_does_not_depend_on_read_sizes(tail: bytes, cuts: list[int]) -> None:
    data = STANDBY_ACCEPTED + b"PING\r\nOPEN " + SESSION.hex().encode() + b" 203.0.113.9:1\r\n"
    whole = feed_standby(data + tail, [])
    split = feed_standby(data + tail, cuts)
    assert split[0] == whole[0]
    opened, split_opened = whole[1], split[1]
    assert isinstance(opened, TunnelOpened)
    assert isinstance(split_opened, TunnelOpened)
    assert (opened.session_id, opened.client_address) == (SESSION, ("203.0.113.9", 1))
    assert (split_opened.session_id, split_opened.client_address) == (SESSION, ("203.0.113.9", 1))
    # Bytes in the read that held OPEN are kept; later reads are the tunnel's, not ours.
    assert opened.first_bytes == tail
    assert tail.startswith(split_opened.first_bytes)


def feed_client(data: bytes, cuts: list[int]) -> RelayConnectEvent | None:
    machine = RelayConnect(relay_host="relay.test", now=0.0, server_id=SERVER)
    for piece in pieces(data, cuts):
        result = machine.data_received(piece, 1.0)
        if result is not None:
            return result
    return machine.connection_lost()


@given(relay_like, st.lists(st.integers(min_value=0), max_size=6))
def test_client_never_raises_and_always_ends_with_a_result(data: bytes, cuts: list[int]) -> None:
    assert feed_client(data, cuts) is not None


@given(st.binary(max_size=64), st.lists(st.integers(min_value=0), max_size=6))
def test_client_pairing_keeps_the_servers_first_bytes_whatever_the_reads(
    first: bytes, cuts: list[int]
) -> None:
    result = feed_client(PAIRED + first, cuts)
    assert isinstance(result, RelayPaired)
    # Bytes in the read that completed the 101 are kept; later reads are the caller's.
    assert first.startswith(result.first_bytes)
    assert feed_client(PAIRED + first, []) == RelayPaired(
        session_id=SESSION, server_id=SERVER, first_bytes=first
    )
