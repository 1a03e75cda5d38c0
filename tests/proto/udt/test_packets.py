"""UDT4 packet codec: libudt 4.11's own datagrams, the spec's other packets, every bad input.

The "captured" vectors are datagrams Debian's libudt 4.11 (libudt-dev
4.11+dfsg1-1+b1, x86-64) sent to each other through a logging UDP relay on
loopback: a regular stream connection, a datagram connection whose messages had
a 50 ms time-to-live (with one data packet and its NAK dropped, to force a
message drop request), a rendezvous connection, and an IPv6 connect. The others
are built from 4.11's packet.cpp/core.cpp and draft-gg-udt-03, as their
docstrings say.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from wavesync_proto.errors import LocalProtocolError, RemoteProtocolError
from wavesync_proto.udt import (
    Ack,
    Ack2,
    Boundary,
    CongestionWarning,
    ControlPacket,
    DataPacket,
    ErrorSignal,
    Handshake,
    KeepAlive,
    LightAck,
    MessageDropRequest,
    Nak,
    Packet,
    RequestType,
    Shutdown,
    SocketType,
    UdtDecodeError,
    UserDefinedControl,
    decode_packet,
    encode_packet,
    pack_peer_ip,
    packets,
    unpack_peer_ip,
)


def wire(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", "").replace("\n", ""))


# Socket ids and sequence numbers of the captured regular stream connection.
CLIENT = 0x1670F2F8
SERVER = 0x33D098EC
ISN = 0x3EBB1DE9
COOKIE = 0x15A4CA89
LOOPBACK = pack_peer_ip("127.0.0.1")
PAYLOAD = bytes(i & 0xFF for i in range(3000))  # the client sent this, 400 times over


def regular_handshake(**changes: int) -> Handshake:
    fields: dict[str, int] = {
        "socket_type": SocketType.STREAM,
        "initial_sequence_number": ISN,
        "mss": 1500,
        "flow_window": 8192,
        "request_type": RequestType.REGULAR,
        "socket_id": CLIENT,
    }
    fields.update(changes)
    return Handshake(peer_ip=LOOPBACK, **fields)


CAPTURED: list[tuple[str, bytes, Packet]] = [
    (
        "client's first request: type 1, no cookie, no destination yet",
        wire(
            "80000000 00000000 00000000 00000000"
            "00000004 00000001 3ebb1de9 000005dc 00002000 00000001 1670f2f8 00000000"
            "0100007f 00000000 00000000 00000000"
        ),
        regular_handshake(),
    ),
    (
        "listener's answer: the request echoed with its SYN cookie",
        wire(
            "80000000 00000000 00000000 1670f2f8"
            "00000004 00000001 3ebb1de9 000005dc 00002000 00000001 1670f2f8 15a4ca89"
            "0100007f 00000000 00000000 00000000"
        ),
        Handshake(
            destination_socket_id=CLIENT,
            socket_type=SocketType.STREAM,
            initial_sequence_number=ISN,
            mss=1500,
            flow_window=8192,
            request_type=RequestType.REGULAR,
            socket_id=CLIENT,
            cookie=COOKIE,
            peer_ip=LOOPBACK,
        ),
    ),
    (
        "client's second request: type -1 with the cookie",
        wire(
            "80000000 00000000 00000000 00000000"
            "00000004 00000001 3ebb1de9 000005dc 00002000 ffffffff 1670f2f8 15a4ca89"
            "0100007f 00000000 00000000 00000000"
        ),
        regular_handshake(request_type=RequestType.RESPONSE, cookie=COOKIE),
    ),
    (
        "listener's acceptance: type -1 from the new socket",
        wire(
            "80000000 00000000 00000000 1670f2f8"
            "00000004 00000001 3ebb1de9 000005dc 00002000 ffffffff 33d098ec 15a4ca89"
            "0100007f 00000000 00000000 00000000"
        ),
        regular_handshake(
            destination_socket_id=CLIENT,
            request_type=RequestType.RESPONSE,
            socket_id=SERVER,
            cookie=COOKIE,
        ),
    ),
    (
        "a DGRAM socket's first request: socket type 2, not the draft's 1",
        wire(
            "80000000 00000000 00000000 00000000"
            "00000004 00000002 4f10ace5 000005dc 00002000 00000001 205fb76b 00000000"
            "0100007f 00000000 00000000 00000000"
        ),
        regular_handshake(
            socket_type=SocketType.DGRAM, initial_sequence_number=0x4F10ACE5, socket_id=0x205FB76B
        ),
    ),
    (
        "rendezvous peer's first request: type 0",
        wire(
            "80000000 00000000 00000000 00000000"
            "00000004 00000001 1208bf8b 000005dc 00002000 00000000 139e47ed 00000000"
            "0100007f 00000000 00000000 00000000"
        ),
        regular_handshake(
            initial_sequence_number=0x1208BF8B,
            request_type=RequestType.RENDEZVOUS,
            socket_id=0x139E47ED,
        ),
    ),
    (
        "rendezvous peer's answer: type -1, now addressed to the other socket",
        wire(
            "80000000 00000000 00000000 346e9abb"
            "00000004 00000001 1208bf8b 000005dc 00002000 ffffffff 139e47ed 00000000"
            "0100007f 00000000 00000000 00000000"
        ),
        regular_handshake(
            destination_socket_id=0x346E9ABB,
            initial_sequence_number=0x1208BF8B,
            request_type=RequestType.RESPONSE,
            socket_id=0x139E47ED,
        ),
    ),
    (
        "an AF_INET6 socket's request to ::ffff:127.0.0.1",
        wire(
            "80000000 00000000 00000000 00000000"
            "00000004 00000001 06d3d7e5 000005dc 00002000 00000001 13af8508 00000000"
            "00000000 00000000 ffff0000 0100007f"
        ),
        Handshake(
            socket_type=SocketType.STREAM,
            initial_sequence_number=0x06D3D7E5,
            mss=1500,
            flow_window=8192,
            request_type=RequestType.REGULAR,
            socket_id=0x13AF8508,
            peer_ip=pack_peer_ip("::ffff:127.0.0.1"),
        ),
    ),
    (
        "first packet of a 3000-byte send()",
        wire("3ebb1de9 80000001 000006d2 33d098ec") + PAYLOAD[:1456],
        DataPacket(
            timestamp=1746,
            destination_socket_id=SERVER,
            sequence_number=ISN,
            message_number=1,
            boundary=Boundary.FIRST,
            payload=PAYLOAD[:1456],
        ),
    ),
    (
        "middle packet",
        wire("3ebb1dea 00000001 000006da 33d098ec") + PAYLOAD[1456:2912],
        DataPacket(
            timestamp=1754,
            destination_socket_id=SERVER,
            sequence_number=ISN + 1,
            message_number=1,
            boundary=Boundary.MIDDLE,
            payload=PAYLOAD[1456:2912],
        ),
    ),
    (
        "last packet",
        wire("3ebb1deb 40000001 000006dd 33d098ec") + PAYLOAD[2912:],
        DataPacket(
            timestamp=1757,
            destination_socket_id=SERVER,
            sequence_number=ISN + 2,
            message_number=1,
            boundary=Boundary.LAST,
            payload=PAYLOAD[2912:],
        ),
    ),
    (
        "a 5-byte send() on a rendezvous connection: one solo packet",
        wire("1208bf8b c0000001 000003ef 346e9abb") + b"hello",
        DataPacket(
            timestamp=1007,
            destination_socket_id=0x346E9ABB,
            sequence_number=0x1208BF8B,
            message_number=1,
            boundary=Boundary.SOLO,
            payload=b"hello",
        ),
    ),
    (
        "six-word ACK (a SYN interval since the last one): ACK number 1, RTT 100 ms",
        wire(
            "80020000 00000001 00000000 1670f2f8"
            "3ebb1dec 000186a0 0000c350 00001ffc 00000001 000003e8"
        ),
        Ack(
            destination_socket_id=CLIENT,
            ack_number=1,
            sequence_number=ISN + 3,
            rtt=100_000,
            rtt_variance=50_000,
            available_buffer=8188,
            receive_rate=1,
            link_capacity=1000,
        ),
    ),
    (
        "four-word ACK (less than a SYN interval since the last six-word one)",
        wire("80020000 00000002 00000000 1670f2f8 3ebb1ded 000186a0 0000c350 00001ffb"),
        Ack(
            destination_socket_id=CLIENT,
            ack_number=2,
            sequence_number=ISN + 4,
            rtt=100_000,
            rtt_variance=50_000,
            available_buffer=8187,
        ),
    ),
    (
        "NAK of one packet: one word",
        wire("80030000 00000000 00000000 1670f2f8 3ebb1ded"),
        Nak(destination_socket_id=CLIENT, losses=((ISN + 4, ISN + 4),)),
    ),
    (
        "NAK of three packets: first with the top bit set, then last",
        wire("80030000 00000000 00000000 1670f2f8 bebb1dfb 3ebb1dfd"),
        Nak(destination_socket_id=CLIENT, losses=((0x3EBB1DFB, 0x3EBB1DFD),)),
    ),
    (
        "ACK2 of ACK 2, with 4.11's four bytes of padding",
        wire("80060000 00000002 00000000 33d098ec 00000000"),
        Ack2(destination_socket_id=SERVER, ack_number=2),
    ),
    (
        "message drop request: message 1, sequence numbers in the body",
        wire("80070000 00000001 00000000 1cbe2941 4f10ace5 4f10ace8"),
        MessageDropRequest(
            destination_socket_id=0x1CBE2941,
            message_number=1,
            first_sequence_number=0x4F10ACE5,
            last_sequence_number=0x4F10ACE8,
        ),
    ),
    (
        "keep-alive",
        wire("80010000 00000000 00000000 346e9abb 00000000"),
        KeepAlive(destination_socket_id=0x346E9ABB),
    ),
    (
        "shutdown",
        wire("80050000 00000000 00000000 33d098ec 00000000"),
        Shutdown(destination_socket_id=SERVER),
    ),
]

FROM_SOURCE: list[tuple[str, bytes, Packet]] = [
    (
        "light ACK: one word, no ACK number (core.cpp sendCtrl(2, NULL, NULL, 4))",
        wire("80020000 00000000 00000000 33d098ec 3ebb1e29"),
        LightAck(destination_socket_id=SERVER, sequence_number=0x3EBB1E29),
    ),
    (
        "NAK mixing a single loss and a range that wraps past SEQ_MAX",
        wire("80030000 00000000 00000000 00000007 00000005 fffffffe 00000001"),
        Nak(destination_socket_id=7, losses=((5, 5), (0x7FFFFFFE, 1))),
    ),
    (
        "a connected rendezvous socket re-answering a handshake: type -2, version 0",
        wire(
            "80000000 00000000 00000000 139e47ed"
            "00000000 00000000 23ee2bf7 000005dc 00002000 fffffffe 346e9abb 00000000"
            "00000000 00000000 00000000 00000000"
        ),
        Handshake(
            destination_socket_id=0x139E47ED,
            version=0,
            socket_type=0,
            initial_sequence_number=0x23EE2BF7,
            mss=1500,
            flow_window=8192,
            request_type=RequestType.RENDEZVOUS_RESPONSE,
            socket_id=0x346E9ABB,
        ),
    ),
    (
        "a listener's refusal: the request echoed with type 1002",
        wire(
            "80000000 00000000 00000000 1670f2f8"
            "00000004 00000002 3ebb1de9 000005dc 00002000 000003ea 1670f2f8 15a4ca89"
            "0100007f 00000000 00000000 00000000"
        ),
        regular_handshake(
            destination_socket_id=CLIENT,
            socket_type=SocketType.DGRAM,
            request_type=RequestType.REJECTED,
            cookie=COOKIE,
        ),
    ),
    (
        "congestion warning (4.11 handles it, never sends it)",
        wire("80040000 00000000 00000000 00000009 00000000"),
        CongestionWarning(destination_socket_id=9),
    ),
    (
        "error signal with 4.11's only code, EFILE 4000, as additional info",
        wire("80080000 00000fa0 00000000 00000009 00000000"),
        ErrorSignal(destination_socket_id=9, error_code=4000),
    ),
    (
        "user-defined control: subtype in the low 16 bits, body as raw bytes",
        wire("ffff0102 0000002a 00000010 00000009 deadbeef 01"),
        UserDefinedControl(
            timestamp=16,
            destination_socket_id=9,
            subtype=0x0102,
            additional_info=42,
            body=wire("deadbeef 01"),
        ),
    ),
    (
        "in-order message packet (sendmsg(..., inorder=true)) at the top message number",
        wire("00000000 bfffffff ffffffff ffffffff"),
        DataPacket(
            timestamp=0xFFFFFFFF,
            destination_socket_id=0xFFFFFFFF,
            sequence_number=0,
            message_number=0x1FFFFFFF,
            boundary=Boundary.FIRST,
            in_order=True,
        ),
    ),
]

VECTORS = CAPTURED + FROM_SOURCE


@pytest.mark.parametrize(("data", "packet"), [v[1:] for v in VECTORS], ids=[v[0] for v in VECTORS])
def test_vector_decodes_and_encodes_byte_for_byte(data: bytes, packet: Packet) -> None:
    assert decode_packet(data) == packet
    assert encode_packet(packet) == data


def test_every_packet_class_has_a_vector() -> None:
    classes = {type(packet) for _, _, packet in VECTORS}
    assert classes == {DataPacket, *packets._ENCODERS}


def test_decode_takes_bytearray_and_memoryview() -> None:
    data = wire("80010000 00000000 00000000 346e9abb 00000000")
    assert (
        decode_packet(bytearray(data))
        == decode_packet(memoryview(data))
        == KeepAlive(destination_socket_id=0x346E9ABB)
    )


def test_a_data_packet_may_be_empty() -> None:
    packet = DataPacket(sequence_number=1, message_number=1)
    assert encode_packet(packet) == wire("00000001 c0000001 00000000 00000000")
    assert decode_packet(encode_packet(packet)) == packet


def test_the_data_payload_is_a_bytes_object() -> None:
    packet = decode_packet(bytearray(wire("00000001 c0000001 00000000 00000000") + b"ab"))
    assert isinstance(packet, DataPacket)
    assert type(packet.payload) is bytes


# --- what the decoder tolerates, as libudt does ------------------------------------------


@pytest.mark.parametrize(
    ("data", "packet"),
    [
        # The draft's body-less control packets, without 4.11's padding.
        (wire("80010000 00000000 00000000 00000009"), KeepAlive(destination_socket_id=9)),
        (wire("80050000 00000000 00000000 00000009"), Shutdown(destination_socket_id=9)),
        (wire("80040000 00000000 00000000 00000009"), CongestionWarning(destination_socket_id=9)),
        (wire("80060000 00000003 00000000 00000009"), Ack2(destination_socket_id=9, ack_number=3)),
        (
            wire("80080000 00000001 00000000 00000009"),
            ErrorSignal(destination_socket_id=9, error_code=1),
        ),
        # Padding with something in it (the value means nothing).
        (wire("80010000 00000000 00000000 00000009 12345678"), KeepAlive(destination_socket_id=9)),
        # Reserved bits and undefined additional info.
        (wire("8001abcd 00000000 00000000 00000009 00000000"), KeepAlive(destination_socket_id=9)),
        (wire("80050000 ffffffff 00000000 00000009"), Shutdown(destination_socket_id=9)),
        # Only wavesync's exact abort word sets the flag.
        (wire("80050000 57534143 00000000 00000009"), Shutdown(destination_socket_id=9)),
        (
            wire("80050000 57534142 00000000 00000009"),
            Shutdown(destination_socket_id=9, aborted=True),
        ),
        (
            wire("80020001 ffffffff 00000000 00000009 00000005"),
            LightAck(destination_socket_id=9, sequence_number=5),
        ),
        # The receiver reads only the 29-bit message number (CPacket::getMsgSeq).
        (
            wire("80070000 e0000007 00000000 00000009 00000001 00000002"),
            MessageDropRequest(
                destination_socket_id=9,
                message_number=7,
                first_sequence_number=1,
                last_sequence_number=2,
            ),
        ),
        # A range of one is a single loss (libudt accepts it; it would send one word).
        (
            wire("80030000 00000000 00000000 00000009 80000005 00000005"),
            Nak(destination_socket_id=9, losses=((5, 5),)),
        ),
    ],
)
def test_decoder_ignores_what_libudt_ignores(data: bytes, packet: Packet) -> None:
    assert decode_packet(data) == packet


def test_user_defined_control_keeps_libudts_padding_as_its_body() -> None:
    packet = decode_packet(wire("ffff0001 00000000 00000000 00000009 00000000"))
    assert packet == UserDefinedControl(destination_socket_id=9, subtype=1, body=bytes(4))
    empty = decode_packet(wire("ffff0001 00000000 00000000 00000009"))
    assert empty == UserDefinedControl(destination_socket_id=9, subtype=1)


# --- malformed datagrams -----------------------------------------------------------------


HEADER = "00000000 00000000"  # timestamp, destination socket id


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "datagram is 0 bytes, shorter than the 16-byte header"),
        (
            wire("80010000 00000000 00000000 000000"),
            "datagram is 15 bytes, shorter than the 16-byte header",
        ),
        (wire("80090000 00000000" + HEADER), "unknown control packet type 0x0009"),
        (wire("81000000 00000000" + HEADER), "unknown control packet type 0x0100"),
        (wire("fffe0000 00000000" + HEADER), "unknown control packet type 0x7ffe"),
        (wire("80000000 00000000" + HEADER), "handshake body is 0 bytes, not 48"),
        (wire("80000000 00000000" + HEADER) + bytes(47), "handshake body is 47 bytes, not 48"),
        (wire("80000000 00000000" + HEADER) + bytes(52), "handshake body is 52 bytes, not 48"),
        (
            wire("80000000 00000000" + HEADER + "00000004 00000001 80000000") + bytes(36),
            "handshake initial sequence number 0x80000000 has the top bit set",
        ),
        (
            wire("80010000 00000000" + HEADER + "00000000 00000000"),
            "keep-alive carries 8 bytes of control information, not 0 or 4",
        ),
        (
            wire("80040000 00000000" + HEADER + "00"),
            "congestion warning carries 1 bytes of control information, not 0 or 4",
        ),
        (
            wire("80050000 00000000" + HEADER + "00000000 00"),
            "shutdown carries 5 bytes of control information, not 0 or 4",
        ),
        (
            wire("80060000 00000001" + HEADER + "00000000 00000000"),
            "ACK2 carries 8 bytes of control information, not 0 or 4",
        ),
        (
            wire("80080000 00000001" + HEADER + "00000000 00000000"),
            "error signal carries 8 bytes of control information, not 0 or 4",
        ),
        (wire("80060000 80000001" + HEADER), "ACK2 ACK number 0x80000001 has the top bit set"),
        (wire("80020000 00000001" + HEADER), "ACK body is 0 bytes, not 4, 16 or 24"),
        (wire("80020000 00000001" + HEADER) + bytes(8), "ACK body is 8 bytes, not 4, 16 or 24"),
        (wire("80020000 00000001" + HEADER) + bytes(20), "ACK body is 20 bytes, not 4, 16 or 24"),
        (wire("80020000 00000001" + HEADER) + bytes(28), "ACK body is 28 bytes, not 4, 16 or 24"),
        (
            wire("80020000 00000000" + HEADER + "ffffffff"),
            "light ACK sequence number 0xffffffff has the top bit set",
        ),
        (
            wire("80020000 80000000" + HEADER) + bytes(16),
            "ACK number 0x80000000 has the top bit set",
        ),
        (
            wire("80020000 00000001" + HEADER + "80000000") + bytes(20),
            "ACK sequence number 0x80000000 has the top bit set",
        ),
        (wire("80030000 00000000" + HEADER), "NAK carries no loss list"),
        (
            wire("80030000 00000000" + HEADER + "00000001 0000"),
            "NAK loss list is 6 bytes, not whole 32-bit words",
        ),
        (
            wire("80030000 00000000" + HEADER + "00000001 80000005"),
            "NAK loss list ends inside a range: word 1 has no end",
        ),
        (
            wire("80030000 00000000" + HEADER + "80000005 80000009"),
            "NAK range at word 0 ends with 0x80000009, which has the top bit set",
        ),
        (
            wire("80030000 00000000" + HEADER + "80000009 00000005"),
            "NAK range 9..5 ends before it starts",
        ),
        (
            wire("80030000 00000000" + HEADER + "80000001 7fffffff"),
            "NAK range 1..2147483647 ends before it starts",
        ),
        (
            wire("80070000 00000001" + HEADER + "00000001"),
            "message drop request body is 4 bytes, not 8",
        ),
        (
            wire("80070000 00000001" + HEADER) + bytes(12),
            "message drop request body is 12 bytes, not 8",
        ),
        (
            wire("80070000 00000001" + HEADER + "80000001 00000002"),
            "drop request first sequence number 0x80000001 has the top bit set",
        ),
        (
            wire("80070000 00000001" + HEADER + "00000001 80000002"),
            "drop request last sequence number 0x80000002 has the top bit set",
        ),
    ],
)
def test_malformed_datagram_is_refused_with_a_reason(data: bytes, message: str) -> None:
    with pytest.raises(UdtDecodeError) as caught:
        decode_packet(data)
    assert str(caught.value) == message
    assert isinstance(caught.value, RemoteProtocolError)
    # Nothing to answer a broken datagram with: the receiver counts it and drops it.
    assert caught.value.error_code_hint is None


# --- what the encoder refuses --------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Foreign(ControlPacket):
    CONTROL_TYPE = 9


@pytest.mark.parametrize(
    ("packet", "message"),
    [
        (
            DataPacket(sequence_number=1 << 31, message_number=1),
            "sequence number 2147483648 or message number 1 does not fit its 31 or 29 bits",
        ),
        (
            DataPacket(sequence_number=-1, message_number=1),
            "sequence number -1 or message number 1 does not fit its 31 or 29 bits",
        ),
        (
            DataPacket(sequence_number=1, message_number=1 << 29),
            "sequence number 1 or message number 536870912 does not fit its 31 or 29 bits",
        ),
        (
            DataPacket(sequence_number=1, message_number=1, timestamp=1 << 32),
            "data packet field out of range: 'I' format requires 0 <= number <= 4294967295",
        ),
        (
            regular_handshake(initial_sequence_number=1 << 31),
            "initial sequence number 2147483648 is not a 31-bit sequence number",
        ),
        (
            Handshake(
                socket_type=1,
                initial_sequence_number=1,
                mss=1500,
                flow_window=8192,
                request_type=1,
                socket_id=1,
                peer_ip=bytes(4),
            ),
            "peer_ip must be 16 bytes, not 4",
        ),
        (
            regular_handshake(request_type=1 << 31),
            "Handshake field out of range: 'i' format requires -2147483648 <= number <= 2147483647",
        ),
        (
            Ack(
                ack_number=1,
                sequence_number=1,
                rtt=1,
                rtt_variance=1,
                available_buffer=2,
                receive_rate=1,
            ),
            "a six-word ACK needs both receive_rate and link_capacity",
        ),
        (
            Ack(ack_number=1 << 31, sequence_number=1, rtt=1, rtt_variance=1, available_buffer=2),
            "ACK number 2147483648 is not a 31-bit sequence number",
        ),
        (
            LightAck(sequence_number=-5),
            "light ACK sequence number -5 is not a 31-bit sequence number",
        ),
        (Nak(losses=()), "a NAK must report at least one loss"),
        (Nak(losses=((9, 5),)), "NAK range 9..5 ends before it starts"),
        (Nak(losses=((1, 1 << 31),)), "NAK loss 2147483648 is not a 31-bit sequence number"),
        (Ack2(ack_number=-1), "ACK2 ACK number -1 is not a 31-bit sequence number"),
        (
            MessageDropRequest(
                message_number=1 << 29, first_sequence_number=1, last_sequence_number=2
            ),
            "message number 536870912 does not fit 29 bits",
        ),
        (
            MessageDropRequest(
                message_number=1, first_sequence_number=1 << 31, last_sequence_number=2
            ),
            "first sequence number 2147483648 is not a 31-bit sequence number",
        ),
        (UserDefinedControl(subtype=0x10000), "user-defined subtype 65536 does not fit 16 bits"),
        (ErrorSignal(error_code=-1), "ErrorSignal field out of range: argument out of range"),
        (Foreign(), "not a UDT packet: Foreign"),
        (Packet(), "not a UDT packet: Packet"),
    ],
)
def test_encoder_refuses_fields_that_do_not_fit(packet: Packet, message: str) -> None:
    with pytest.raises(LocalProtocolError) as caught:
        encode_packet(packet)
    assert str(caught.value) == message


# --- the handshake's peer address ----------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "ipv6", "field"),
    [
        ("127.0.0.1", False, "0100007f 00000000 00000000 00000000"),
        ("192.0.2.33", False, "210200c0 00000000 00000000 00000000"),
        ("::ffff:7f00:1", True, "00000000 00000000 ffff0000 0100007f"),
        ("2001:db8::1:2", True, "b80d0120 00000000 00000000 02000100"),
    ],
)
def test_peer_ip_as_libudt_writes_it(host: str, ipv6: bool, field: str) -> None:
    assert pack_peer_ip(host) == wire(field)
    assert unpack_peer_ip(wire(field), ipv6=ipv6) == host


def test_a_mapped_address_packs_like_its_plain_ipv6_text() -> None:
    # Captured above: what an AF_INET6 libudt socket sent when connecting to 127.0.0.1.
    assert pack_peer_ip("::ffff:127.0.0.1") == pack_peer_ip("::ffff:7f00:1")


def test_peer_ip_refuses_what_is_not_an_address() -> None:
    with pytest.raises(LocalProtocolError, match="not an IP address"):
        pack_peer_ip("example.com")
    with pytest.raises(LocalProtocolError, match="a peer IP field is 16 bytes, not 4"):
        unpack_peer_ip(bytes(4), ipv6=False)


def test_an_aborting_shutdown_carries_the_abort_word_and_a_plain_one_zero() -> None:
    aborted = encode_packet(Shutdown(destination_socket_id=9, aborted=True))
    assert aborted == wire("80050000 57534142 00000000 00000009 00000000")
    assert encode_packet(Shutdown(destination_socket_id=9)) == wire(
        "80050000 00000000 00000000 00000009 00000000"
    )
    assert decode_packet(aborted) == Shutdown(destination_socket_id=9, aborted=True)
