"""MediatorService framing and transport rules: TCP streams, Binding, what is ignored or refused."""

from __future__ import annotations

import struct

import pytest

from wavesync_proto.errors import LocalProtocolError
from wavesync_proto.mediator.messages import MediatorMethod
from wavesync_proto.mediator.service import CloseTcp, MediatorLimits
from wavesync_proto.stun import (
    BINDING,
    MAGIC_COOKIE,
    BindingResponder,
    Message,
    MessageClass,
    RawAttribute,
    UnknownAttributes,
    XorMappedAddress,
    decode_message,
    encode_message,
)

from .helpers import (
    CLIENT_TCP,
    CLIENT_UDP,
    SERVER_1,
    SERVER_3,
    Harness,
    closed,
    connect_bytes,
    error_of,
    sent_tcp,
    sent_udp,
    tid,
)


def stun(
    method: int, message_class: MessageClass, label: str, *attributes: RawAttribute
) -> Message:
    return Message(
        message_class=message_class, method=method, transaction_id=tid(label), attributes=attributes
    )


def binding(label: str) -> Message:
    return stun(BINDING, MessageClass.REQUEST, label)


def test_binding_over_udp_and_tcp_reports_the_observed_address() -> None:
    h = Harness.create()
    request = binding("udp")
    assert sent_udp(h.udp(encode_message(request), CLIENT_UDP), CLIENT_UDP) == [
        encode_message(request.success_response(XorMappedAddress(CLIENT_UDP)))
    ]
    h.connect_peer("c1", CLIENT_TCP)
    request = binding("tcp")
    assert sent_tcp(h.tcp("c1", encode_message(request)), "c1") == [
        encode_message(request.success_response(XorMappedAddress(CLIENT_TCP)))
    ]
    assert h.service.counters.bindings_answered == 2


def test_classic_rfc3489_binding_is_answered_over_udp() -> None:
    h = Harness.create()
    classic = struct.pack("!HHI", 0x0001, 0, 0x01020304) + bytes(12)
    [answer] = sent_udp(h.udp(classic, CLIENT_UDP), CLIENT_UDP)
    assert answer == BindingResponder(software=None).handle_request(classic, CLIENT_UDP)
    assert answer[:2] == b"\x01\x01"


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(encode_message(binding("x").success_response()), id="a response"),
        pytest.param(
            encode_message(stun(BINDING, MessageClass.INDICATION, "ind")), id="an indication"
        ),
        pytest.param(b"\x16\x03\x01" + bytes(40), id="not STUN"),
        pytest.param(b"", id="empty"),
    ],
)
def test_udp_that_is_not_a_request_is_ignored(data: bytes) -> None:
    h = Harness.create()
    assert h.udp(data, CLIENT_UDP) == []
    assert h.service.counters.malformed == 1


def test_an_undecodable_udp_request_gets_400() -> None:
    h = Harness.create()
    # A connect header whose one attribute claims more bytes than the message has.
    header = encode_message(stun(MediatorMethod.CONNECT, MessageClass.REQUEST, "broken"))
    data = header[:2] + b"\x00\x08" + header[4:] + struct.pack("!HH", 0x4003, 100) + bytes(4)
    assert sent_udp(h.udp(data, CLIENT_UDP), CLIENT_UDP) == [
        encode_message(
            stun(MediatorMethod.CONNECT, MessageClass.REQUEST, "broken").error_response(
                400, "Bad Request"
            )
        )
    ]
    assert h.service.counters.malformed == 1


def test_unknown_comprehension_required_attributes_get_420() -> None:
    h = Harness.create()
    request = stun(
        MediatorMethod.CONNECT, MessageClass.REQUEST, "unknown", RawAttribute(0x7777, b"abcd")
    )
    assert sent_udp(h.udp(encode_message(request), CLIENT_UDP), CLIENT_UDP) == [
        encode_message(
            request.error_response(420, "Unknown Attribute", UnknownAttributes((0x7777,)))
        )
    ]
    # An unknown *optional* attribute (the client's PADDING, 0xC005) is fine.
    padded = connect_bytes(1, transaction_id=tid("padded"), server_id=SERVER_3, pad_to=576)
    assert error_of(sent_udp(h.udp(padded, CLIENT_UDP), CLIENT_UDP)[0]) == (404, "Server Offline")


@pytest.mark.parametrize(
    "method",
    [MediatorMethod.SEARCH, MediatorMethod.TUNNEL_SYN, 0x7FF, MediatorMethod.CONNECTION_REQUESTED],
)
def test_other_methods_get_400_unsupported(method: int) -> None:
    h = Harness.create()
    request = stun(method, MessageClass.REQUEST, "other")
    assert sent_udp(h.udp(encode_message(request), CLIENT_UDP), CLIENT_UDP) == [
        encode_message(request.error_response(400, "Unsupported Method"))
    ]
    h.connect_peer("c1", CLIENT_TCP)
    assert error_of(sent_tcp(h.tcp("c1", encode_message(request)), "c1")[0]) == (
        400,
        "Unsupported Method",
    )
    # Other classes of the same method are never answered.
    assert h.tcp("c1", encode_message(stun(method, MessageClass.INDICATION, "ind"))) == []


def test_tcp_messages_are_split_by_their_length_whatever_the_chunking() -> None:
    h = Harness.create()
    h.connect_peer("c1", CLIENT_TCP)
    requests = [
        stun(BINDING, MessageClass.REQUEST, f"b{n}", RawAttribute(0x8022, b"chunking test"))
        for n in range(4)
    ]
    stream = b"".join(encode_message(request) for request in requests)
    assert len(stream) == 4 * 40
    # One chunk holding a message and a half, then the rest a byte at a time.
    actions = h.tcp("c1", stream[:50])
    for position in range(50, len(stream)):
        actions += h.tcp("c1", stream[position : position + 1])
    answers = [decode_message(d).transaction_id for d in sent_tcp(actions, "c1")]
    assert answers == [tid(f"b{n}") for n in range(4)]
    assert h.service.table_sizes()["tcp_buffer_max"] == 0


def test_tcp_garbage_closes_the_connection() -> None:
    h = Harness.create()
    h.connect_peer("c1", CLIENT_TCP)
    # Refused on the first short write: 'G' cannot start a STUN message.
    actions = h.tcp("c1", b"GET / HTTP/1.1\r\n")
    assert actions == [
        CloseTcp(
            peer="c1",
            reason="not a STUN stream: the two leading bits of a STUN message must be zero",
        )
    ]
    assert h.service.table_sizes()["tcp_peers"] == 0
    # The adapter may still deliver bytes in flight, then report the close: both ignored.
    assert h.tcp("c1", encode_message(binding("late"))) == []
    assert h.tcp_closed("c1") == []


def test_a_message_longer_than_the_buffer_closes_on_its_header() -> None:
    h = Harness.create(limits=MediatorLimits(max_tcp_buffer=256))
    h.connect_peer("c1", CLIENT_TCP)
    assert h.tcp("c1", encode_message(binding("small"))) != []
    header = struct.pack("!HHI", 0x0001, 300, MAGIC_COOKIE) + tid("big")
    assert closed(h.tcp("c1", header)) == {"c1": "a 320-byte message exceeds the 256-byte buffer"}
    assert h.service.table_sizes()["tcp_peers"] == 0


def test_a_well_framed_but_broken_tcp_request_gets_400_and_the_session_stays() -> None:
    h = Harness.create()
    h.connect_peer("c1", CLIENT_TCP)
    header = encode_message(stun(MediatorMethod.CONNECT, MessageClass.REQUEST, "broken"))
    data = header[:2] + b"\x00\x04" + header[4:] + struct.pack("!HH", 0x4003, 16)
    assert error_of(sent_tcp(h.tcp("c1", data), "c1")[0]) == (400, "Bad Request")
    indication = encode_message(
        stun(MediatorMethod.CONNECTION_UPDATE, MessageClass.INDICATION, "i")
    )
    assert (
        h.tcp("c1", indication[:2] + b"\x00\x04" + indication[4:] + struct.pack("!HH", 0x4003, 16))
        == []
    )
    assert h.service.table_sizes()["tcp_peers"] == 1


def test_an_idle_client_connection_is_closed() -> None:
    h = Harness.create()
    h.connect_peer("c1", CLIENT_TCP)
    assert h.advance(9.9) == []
    h.tcp("c1", encode_message(binding("alive")))
    assert h.advance(9.9) == []
    assert h.advance(0.2) == [CloseTcp(peer="c1", reason="idle: no complete message for 10 s")]
    assert h.service.counters.peers_closed == 1
    assert h.service.get_timer() is None


def test_a_peer_handle_cannot_be_connected_twice() -> None:
    h = Harness.create()
    h.connect_peer("c1", CLIENT_TCP)
    with pytest.raises(LocalProtocolError):
        h.connect_peer("c1", CLIENT_TCP)


def test_an_answer_to_a_tcp_connect_is_not_trimmed() -> None:
    h = Harness.create(limits=MediatorLimits(udp_amplification_factor=1))
    h.connect_peer("c1", CLIENT_TCP)
    request = decode_message(connect_bytes(1, transaction_id=tid("t"), server_id=SERVER_1))
    [answer] = sent_tcp(h.tcp("c1", encode_message(request)), "c1")
    assert answer == encode_message(request.error_response(404, "Server Offline"))
