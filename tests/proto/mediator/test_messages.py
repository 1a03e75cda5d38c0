"""Typed mediator messages and attributes: exact bytes, round trips, and what is refused."""

from __future__ import annotations

import contextlib
import struct
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wavesync_proto.errors import LocalProtocolError
from wavesync_proto.mediator import (
    Connect,
    ConnectionAck,
    ConnectionAckResponse,
    ConnectionPath,
    ConnectionRequested,
    ConnectionResult,
    ConnectionUpdate,
    ConnectResponse,
    Listen,
    ListenResponse,
    MediatorMessage,
    MediatorMessageError,
    parse_mediator_message,
)
from wavesync_proto.mediator.attributes import (
    ConnectSessionId,
    LocalEndpoint,
    RelayUrl,
    ServerId,
    SystemId,
)
from wavesync_proto.mediator.messages import MAX_ENDPOINTS, MAX_RELAY_URLS
from wavesync_proto.stun import (
    Message,
    MessageClass,
    StunDecodeError,
    decode_message,
    encode_message,
)

TID = b"mediator-tid"
SYSTEM = uuid.UUID("04f5a9ea-3cb8-44b0-bb62-401b420701de")
SERVER = uuid.UUID("9b2f4c0e-1d7a-4e63-8a55-0c3f6b1e2d44")
SESSION = bytes(range(16))


def wire(message: MediatorMessage) -> bytes:
    return encode_message(message.to_stun(TID))


def parse(data: bytes) -> MediatorMessage:
    return parse_mediator_message(decode_message(data))


def test_connect_by_system_id_exact_bytes() -> None:
    data = wire(Connect(connect_session_id=SESSION, system_id=SYSTEM))
    assert data == (
        # Method 0x102, class request: M8 moves two bits up past C1 and C0, so type 0x0402.
        struct.pack("!HHI", 0x0402, 40, 0x2112A442)
        + TID
        + struct.pack("!HH", 0x4003, 16)
        + SESSION
        + struct.pack("!HH", 0x4001, 16)
        + SYSTEM.bytes
    )


def test_endpoints_use_the_xor_mapped_address_layout() -> None:
    data = wire(Listen(system_id=SYSTEM, server_id=SERVER, local_endpoints=(("192.0.2.1", 32853),)))
    # 0xe112a643 is 192.0.2.1 xor the magic cookie; 0xa147 is 32853 xor 0x2112 (RFC 5769 §2.2).
    assert data.endswith(struct.pack("!HH", 0x4004, 8) + bytes.fromhex("0001a147e112a643"))


MESSAGES: list[MediatorMessage] = [
    Listen(
        system_id=SYSTEM,
        server_id=SERVER,
        local_endpoints=(("10.0.0.2", 7001), ("fe80::1", 7001)),
        forwarded_endpoints=(("203.0.113.9", 443),),
    ),
    ListenResponse(public_endpoint=("203.0.113.1", 5000), keepalive_interval=25),
    Connect(connect_session_id=SESSION, server_id=SERVER),
    Connect(connect_session_id=SESSION, system_id=SYSTEM),
    ConnectResponse(
        server_id=SERVER,
        system_id=SYSTEM,
        forwarded_endpoints=(("203.0.113.9", 443),),
        local_endpoints=(("10.0.0.2", 7001),),
        udp_endpoints=(("203.0.113.1", 40000),),
        relay_urls=("http://relay.example:8080",),
        client_mapped=("198.51.100.1", 1),
    ),
    ConnectResponse(server_id=SERVER, system_id=SYSTEM),
    ConnectionRequested(connect_session_id=SESSION, client_udp_endpoint=("198.51.100.1", 4)),
    ConnectionRequested(connect_session_id=SESSION, client_tcp_endpoint=("2001:db8::1", 9)),
    ConnectionAck(connect_session_id=SESSION, server_id=SERVER),
    ConnectionAckResponse(server_udp_endpoint=("203.0.113.1", 40000)),
    ConnectionUpdate(connect_session_id=SESSION, client_udp_endpoint=("2001:db8::7", 9)),
    ConnectionResult(connect_session_id=SESSION, path=ConnectionPath.UDP, duration_ms=120),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message: MediatorMessage) -> None:
    assert parse(wire(message)) == message


@pytest.mark.parametrize(
    ("attributes", "error"),
    [
        ((ServerId(SERVER),), "listen is missing its SystemId attribute"),
        ((SystemId(SYSTEM),), "listen is missing its ServerId attribute"),
    ],
)
def test_listen_needs_both_ids(attributes: tuple[SystemId | ServerId, ...], error: str) -> None:
    message = Message(
        message_class=MessageClass.REQUEST, method=0x101, transaction_id=TID, attributes=attributes
    )
    with pytest.raises(MediatorMessageError, match=error) as caught:
        parse_mediator_message(message)
    assert caught.value.error_code_hint == 400


@pytest.mark.parametrize(
    "attributes",
    [
        (ConnectSessionId(SESSION),),
        (ConnectSessionId(SESSION), ServerId(SERVER), SystemId(SYSTEM)),
    ],
    ids=["no target", "two targets"],
)
def test_connect_names_exactly_one_target(attributes: tuple[ConnectSessionId, ...]) -> None:
    message = Message(
        message_class=MessageClass.REQUEST, method=0x102, transaction_id=TID, attributes=attributes
    )
    with pytest.raises(MediatorMessageError, match="exactly one of SERVER-ID and SYSTEM-ID"):
        parse_mediator_message(message)


def test_too_many_endpoints_are_refused_both_ways() -> None:
    many = tuple(("10.0.0.1", port) for port in range(MAX_ENDPOINTS + 1))
    with pytest.raises(LocalProtocolError, match="at most 16 endpoints"):
        Listen(system_id=SYSTEM, server_id=SERVER, local_endpoints=many)
    message = Message(
        message_class=MessageClass.REQUEST,
        method=0x101,
        transaction_id=TID,
        attributes=(SystemId(SYSTEM), ServerId(SERVER), *(LocalEndpoint(e) for e in many)),
    )
    with pytest.raises(MediatorMessageError, match="lists 17 LocalEndpoints"):
        parse_mediator_message(message)


def test_too_many_relay_urls_are_refused_both_ways() -> None:
    urls = tuple(f"http://relay{i}" for i in range(MAX_RELAY_URLS + 1))
    with pytest.raises(LocalProtocolError, match="at most 8 relay URLs"):
        ConnectResponse(server_id=SERVER, system_id=SYSTEM, relay_urls=urls)
    message = Message(
        message_class=MessageClass.SUCCESS,
        method=0x102,
        transaction_id=TID,
        attributes=(ServerId(SERVER), SystemId(SYSTEM), *(RelayUrl(u) for u in urls)),
    )
    with pytest.raises(MediatorMessageError, match="lists 9 relay URLs"):
        parse_mediator_message(message)


@pytest.mark.parametrize(
    ("build", "error"),
    [
        (lambda: Connect(connect_session_id=b"short", server_id=SERVER), "16 bytes"),
        (lambda: Connect(connect_session_id=SESSION), "exactly one of server_id and system_id"),
        (
            lambda: ConnectionResult(connect_session_id=SESSION, path=9, duration_ms=1),
            "unknown connection path 9",
        ),
    ],
)
def test_misuse_is_a_local_error(build: object, error: str) -> None:
    assert callable(build)
    with pytest.raises(LocalProtocolError, match=error):
        build()


def test_keepalive_interval_of_zero_is_refused() -> None:
    data = wire(ListenResponse(public_endpoint=("192.0.2.1", 1), keepalive_interval=0))
    with pytest.raises(MediatorMessageError, match="at least 1 s"):
        parse(data)


def test_an_undefined_method_class_pair_is_refused() -> None:
    indication = Message(message_class=MessageClass.INDICATION, method=0x102, transaction_id=TID)
    with pytest.raises(
        MediatorMessageError, match="no mediator message is method 0x102 INDICATION"
    ):
        parse_mediator_message(indication)


@pytest.mark.parametrize(
    ("attribute_type", "value", "error"),
    [
        (0x4001, bytes(15), "SYSTEM-ID must be 16 bytes, not 15"),
        (0x4002, bytes(17), "SERVER-ID must be 16 bytes, not 17"),
        (0x4003, bytes(4), "CONNECT-SESSION-ID must be 16 bytes, not 4"),
        (0x4004, bytes.fromhex("0003a147e112a643"), "LOCAL-ENDPOINT has unknown address family"),
        (0x4007, bytes(3), "PEER-UDP-ENDPOINT is 3 bytes"),
        (0x4008, bytes((7, 0, 0, 0)), "CONNECTION-PATH 7 is not a known path"),
        (0x4008, bytes(2), "CONNECTION-PATH must be 4 bytes, not 2"),
        (0xC001, b"\xff", "RELAY-URL is not valid UTF-8"),
        (0xC001, b"u" * 510, "RELAY-URL is 510 bytes"),
        (0xC002, bytes(3), "KEEPALIVE-INTERVAL must be 4 bytes, not 3"),
        (0xC004, bytes(5), "CONNECT-DURATION must be 4 bytes, not 5"),
    ],
)
def test_malformed_mediator_attributes_are_decode_errors(
    attribute_type: int, value: bytes, error: str
) -> None:
    body = struct.pack("!HH", attribute_type, len(value)) + value + bytes(-len(value) % 4)
    data = struct.pack("!HHI", 0x0402, len(body), 0x2112A442) + TID + body
    with pytest.raises(StunDecodeError, match=error):
        decode_message(data)


endpoints = st.tuples(st.ip_addresses().map(str), st.integers(0, 0xFFFF))
session_ids = st.binary(min_size=16, max_size=16)
uuids = st.uuids()


@pytest.mark.property
@given(
    st.one_of(
        st.builds(
            Listen,
            system_id=uuids,
            server_id=uuids,
            local_endpoints=st.lists(endpoints, max_size=MAX_ENDPOINTS).map(tuple),
            forwarded_endpoints=st.lists(endpoints, max_size=MAX_ENDPOINTS).map(tuple),
        ),
        st.builds(
            ConnectResponse,
            server_id=uuids,
            system_id=uuids,
            forwarded_endpoints=st.lists(endpoints, max_size=4).map(tuple),
            local_endpoints=st.lists(endpoints, max_size=4).map(tuple),
            udp_endpoints=st.lists(endpoints, max_size=4).map(tuple),
            relay_urls=st.lists(st.text(max_size=40), max_size=MAX_RELAY_URLS).map(tuple),
            client_mapped=st.none() | endpoints,
        ),
        st.builds(
            ConnectionRequested,
            connect_session_id=session_ids,
            client_udp_endpoint=st.none() | endpoints,
            client_tcp_endpoint=st.none() | endpoints,
        ),
        st.builds(
            ConnectionResult,
            connect_session_id=session_ids,
            path=st.sampled_from(sorted(ConnectionPath.NAMES)),
            duration_ms=st.integers(0, 0xFFFFFFFF),
        ),
    ),
    st.binary(min_size=12, max_size=12),
)
def test_any_message_round_trips(message: MediatorMessage, transaction_id: bytes) -> None:
    data = encode_message(message.to_stun(transaction_id))
    assert parse_mediator_message(decode_message(data)) == message


@pytest.mark.property
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_protocol_errors(data: bytes) -> None:
    # Mediator attributes in the STUN table must keep the codec's contract.
    framed = struct.pack("!HHI", 0x0402, len(data) + (-len(data) % 4), 0x2112A442) + TID
    framed += data + bytes(-len(data) % 4)
    with contextlib.suppress(StunDecodeError, MediatorMessageError):
        parse_mediator_message(decode_message(framed))
