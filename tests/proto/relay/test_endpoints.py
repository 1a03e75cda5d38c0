"""The server agent's StandbyConnection and the client's RelayConnect, on a hand-moved clock.

Most tests talk to a real ``RelayService`` in memory, so both sides of the
wire are ours and must agree; the rest feed hand-written relay answers to
reach what a correct relay never says.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import pytest

from wavesync_proto.errors import LocalProtocolError
from wavesync_proto.relay.client import RelayConnect, RelayFailed, RelayPaired, RelayRedirected
from wavesync_proto.relay.requests import ClientRequest, RequestReader
from wavesync_proto.relay.service import RelayService
from wavesync_proto.relay.service_types import SendBytes, StartSplice
from wavesync_proto.relay.standby import (
    DEAD_AFTER_INTERVALS,
    StandbyAccepted,
    StandbyConnection,
    StandbyEnded,
    StandbyRefused,
    TunnelOpened,
)

SYSTEM = uuid.UUID("0a000000-0000-4000-8000-00000000000a")
SERVER = uuid.UUID("51000000-0000-4000-8000-000000000001")
KEY = "system-a-secret-key-0123"
HOST = "relay.test:7000"
UNIX = 1_800_000_000.0
SESSION = bytes(range(16))


def standby(*, key: str = KEY, now: float = 0.0, nonce: bytes = b"n" * 16) -> StandbyConnection:
    return StandbyConnection(
        key=key,
        system_id=SYSTEM,
        server_id=SERVER,
        relay_host=HOST,
        unix_time=UNIX,
        nonce=nonce,
        now=now,
    )


def relay_service() -> RelayService:
    return RelayService({SYSTEM: KEY}, random_bytes=lambda n: SESSION[:n])


def sent(actions: Sequence[object], handle: str) -> bytes:
    return b"".join(
        action.data
        for action in actions
        if isinstance(action, SendBytes) and action.connection == handle
    )


def accepted_standby(service: RelayService, handle: str = "s") -> StandbyConnection:
    machine = standby()
    service.connection_made(handle, ("198.51.100.1", 40000), 0.0)
    answer = service.data_received(handle, machine.data_to_send(), 0.0, unix_time=UNIX)
    assert machine.data_received(sent(answer, handle), 0.0) == [
        StandbyAccepted(standby_count=7, keepalive_interval=20.0)
    ]
    return machine


# --- StandbyConnection ------------------------------------------------------------------


def test_standby_is_accepted_opened_and_answers_ready_with_the_clients_first_bytes() -> None:
    service = relay_service()
    machine = accepted_standby(service)
    assert machine.is_idle
    client = RelayConnect(relay_host=HOST, now=0.0, server_id=SERVER)
    service.connection_made("c", ("203.0.113.9", 61000), 0.0)
    actions = service.data_received("c", client.data_to_send() + b"early", 0.0, unix_time=UNIX)
    events = machine.data_received(sent(actions, "s"), 0.0)
    assert events == [
        TunnelOpened(session_id=SESSION, client_address=("203.0.113.9", 61000), first_bytes=b"")
    ]
    assert machine.get_timer() is None
    ready = machine.data_to_send()
    assert ready == b"READY " + SESSION.hex().encode() + b"\r\n"
    [splice] = service.data_received("s", ready + b"hello", 0.0, unix_time=UNIX)
    assert isinstance(splice, StartSplice)
    assert splice.to_server == b"early"
    result = client.data_received(splice.to_client, 0.0)
    assert result == RelayPaired(session_id=SESSION, server_id=SERVER, first_bytes=b"hello")
    with pytest.raises(LocalProtocolError):
        machine.data_received(b"tunnel bytes", 0.0)


def test_open_in_the_same_read_as_the_101_and_bytes_after_open_are_kept() -> None:
    machine = standby()
    answer = (
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
        b"Upgrade: wavesync-relay/1\r\nWavesync-Keepalive: 20\r\n\r\n"
        b"PING\r\nOPEN " + SESSION.hex().encode() + b" [2001:db8::9]:443\r\nfirst"
    )
    events = machine.data_received(answer, 0.0)
    assert events == [
        StandbyAccepted(standby_count=None, keepalive_interval=20.0),
        TunnelOpened(session_id=SESSION, client_address=("2001:db8::9", 443), first_bytes=b"first"),
    ]


def test_pings_keep_the_standby_alive_and_silence_ends_it() -> None:
    service = relay_service()
    machine = accepted_standby(service)
    assert machine.get_timer() == DEAD_AFTER_INTERVALS * 20.0
    assert machine.data_received(b"PI", 50.0) == []  # half a line proves nothing yet
    assert machine.data_received(b"NG\r\n", 55.0) == []
    deadline = machine.get_timer()
    assert deadline == 55.0 + DEAD_AFTER_INTERVALS * 20.0
    assert machine.handle_timer(deadline - 0.001) == []
    [ended] = machine.handle_timer(deadline)
    assert isinstance(ended, StandbyEnded)
    assert "keep-alive" in ended.reason
    assert machine.get_timer() is None


def test_a_wrong_key_is_refused_with_the_relays_reason() -> None:
    service = relay_service()
    machine = standby(key="not-the-key-of-system-a")
    service.connection_made("s", ("198.51.100.1", 40000), 0.0)
    answer = service.data_received("s", machine.data_to_send(), 0.0, unix_time=UNIX)
    [refused] = machine.data_received(sent(answer, "s"), 0.0)
    assert isinstance(refused, StandbyRefused)
    assert refused.status == 401
    assert "signature" in refused.reason


def test_a_refusal_read_to_the_close_and_retry_after() -> None:
    machine = standby()
    head = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 3\r\n\r\nbusy, come back"
    assert machine.data_received(head, 0.0) == []  # no length: the body runs to the close
    [refused] = machine.connection_lost()
    assert refused == StandbyRefused(status=503, reason="busy, come back", retry_after=3.0)


@pytest.mark.parametrize(
    "answer",
    [
        b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nWavesync-Keepalive: soon\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nWavesync-Keepalive: 0\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nWavesync-Keepalive: 20\r\n\r\nHELLO\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nWavesync-Keepalive: 20\r\n\r\nREADY "
        + SESSION.hex().encode()
        + b"\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nWavesync-Keepalive: 20\r\n\r\n" + b"P" * 200,
    ],
)
def test_anything_but_the_protocol_ends_the_standby(answer: bytes) -> None:
    events = standby().data_received(answer, 0.0)
    assert isinstance(events[-1], StandbyEnded)


def test_no_answer_in_time_and_a_close_before_answering_end_it() -> None:
    machine = standby(now=5.0)
    assert machine.get_timer() == 15.0
    [ended] = machine.handle_timer(15.0)
    assert isinstance(ended, StandbyEnded)
    assert "in time" in ended.reason
    [closed] = standby().connection_lost()
    assert isinstance(closed, StandbyEnded)


def test_bad_arguments_are_local_errors() -> None:
    with pytest.raises(LocalProtocolError):
        standby(nonce=b"short")
    with pytest.raises(LocalProtocolError):
        StandbyConnection(
            key=KEY,
            system_id=SYSTEM,
            server_id=SERVER,
            relay_host=HOST,
            unix_time=UNIX,
            nonce=b"n" * 16,
            now=0.0,
            handshake_timeout=0,
        )


# --- RelayConnect -----------------------------------------------------------------------


def test_connect_to_an_unknown_server_is_not_found() -> None:
    service = relay_service()
    client = RelayConnect(relay_host=HOST, now=0.0, server_id=SERVER)
    service.connection_made("c", ("203.0.113.9", 61000), 0.0)
    answer = service.data_received("c", client.data_to_send(), 0.0, unix_time=UNIX)
    result = client.data_received(sent(answer, "c"), 0.0)
    assert isinstance(result, RelayFailed)
    assert result.not_found
    assert client.result is result
    assert client.data_to_send() == b""


def test_connect_by_system_waits_then_gets_503_with_retry_after() -> None:
    service = relay_service()
    machine = accepted_standby(service)
    service.connection_lost("s", 1.0)  # known, but nothing idle now
    assert machine.connection_lost() != []
    client = RelayConnect(relay_host=HOST, now=1.0, system_id=SYSTEM)
    service.connection_made("c", ("203.0.113.9", 61000), 1.0)
    assert service.data_received("c", client.data_to_send(), 1.0, unix_time=UNIX) == []
    actions = service.handle_timer(1.0 + service.limits.pair_timeout)
    result = client.data_received(sent(actions, "c"), 6.0)
    assert isinstance(result, RelayFailed)
    assert (result.status, result.retry_after) == (503, 1.0)


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_redirect_names_the_other_relay(status: int) -> None:
    client = RelayConnect(relay_host=HOST, now=0.0, server_id=SERVER)
    answer = (
        f"HTTP/1.1 {status} Moved\r\nLocation: http://relay-2.test:7000/\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()
    assert client.data_received(answer, 0.0) == RelayRedirected(
        location="http://relay-2.test:7000/"
    )


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 101 Switching Protocols\r\nWavesync-Server: "
        + str(SERVER).encode()
        + b"\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nWavesync-Session: "
        + SESSION.hex().encode()
        + b"\r\n\r\n",
        b"\x00\x01garbage\r\n\r\n",
    ],
)
def test_a_101_without_session_or_server_or_garbage_fails(answer: bytes) -> None:
    client = RelayConnect(relay_host=HOST, now=0.0, server_id=SERVER)
    result = client.data_received(answer, 0.0)
    assert isinstance(result, RelayFailed)
    with pytest.raises(LocalProtocolError):
        client.data_received(b"more", 0.0)


def test_connect_times_out_and_a_close_before_answering_fails() -> None:
    client = RelayConnect(relay_host=HOST, now=2.0, server_id=SERVER, timeout=3.0)
    assert client.handle_timer(4.9) is None
    result = client.handle_timer(5.0)
    assert isinstance(result, RelayFailed)
    assert result.status is None
    assert client.get_timer() is None
    assert client.connection_lost() is None  # the result stands
    closed = RelayConnect(relay_host=HOST, now=0.0, server_id=SERVER).connection_lost()
    assert isinstance(closed, RelayFailed)


def test_connect_needs_exactly_one_target() -> None:
    with pytest.raises(LocalProtocolError):
        RelayConnect(relay_host=HOST, now=0.0)
    with pytest.raises(LocalProtocolError):
        RelayConnect(relay_host=HOST, now=0.0, server_id=SERVER, system_id=SYSTEM)
    with pytest.raises(LocalProtocolError):
        RelayConnect(relay_host=HOST, now=0.0, server_id=SERVER, timeout=0)


def test_a_host_idna_cannot_encode_is_a_local_error_when_signing() -> None:
    with pytest.raises(LocalProtocolError):
        StandbyConnection(
            key=KEY,
            system_id=SYSTEM,
            server_id=SERVER,
            relay_host="a..b",
            unix_time=UNIX,
            nonce=b"n" * 16,
            now=0.0,
        )


def test_an_empty_read_is_not_the_end_of_a_request() -> None:
    reader = RequestReader(max_request_bytes=8192)
    client = RelayConnect(relay_host=HOST, now=0.0, server_id=SERVER)
    request = client.data_to_send()
    assert reader.feed(request[:10]) is None
    assert reader.feed(b"") is None
    assert reader.feed(request[10:]) == ClientRequest(server_id=SERVER, system_id=None)
