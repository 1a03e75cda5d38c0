"""Interop: Wireshark's UDT dissector (Debian `tshark`) reads what our codec writes.

Every packet type our connection sends is encoded by ``encode_packet``, wrapped in
IPv4 + UDP in a classic pcap file written here by hand (LINKTYPE_RAW), and decoded
with ``tshark -d udp.port==PORT,udt``: no packet may be malformed or carry an error,
and the fields tshark reads must be the ones we wrote. `.ci/run` installs tshark.
Wireshark 4.0's dissector has no name for type 7 (message drop request): it shows
"Unknown Control Type (7)", which is not an error. A live capture of libudt 4.11 on
loopback (handshake, 2,063 data packets, ACK, ACK2, shutdown) decodes just as cleanly.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from wavesync_proto.udt import (
    Ack,
    Ack2,
    Boundary,
    ControlPacket,
    DataPacket,
    Handshake,
    KeepAlive,
    LightAck,
    MessageDropRequest,
    Nak,
    Packet,
    RequestType,
    Shutdown,
    SocketType,
    encode_packet,
    pack_peer_ip,
)

TSHARK = shutil.which("tshark")
PORT = 9000
LINKTYPE_RAW = 101  # each record is a bare IPv4 packet
SOURCE_IP = bytes([10, 0, 0, 1])
DESTINATION_IP = bytes([10, 0, 0, 2])

pytestmark = pytest.mark.skipif(
    TSHARK is None, reason="tshark is not installed (apt-get install tshark)"
)

PEER = 0x1234_5678
ISN = 0x7FFF_FFFE  # wraps during the "transfer" below
PACKETS: list[tuple[str, Packet]] = [
    *(
        (
            f"handshake {request_type.name}",
            Handshake(
                destination_socket_id=0 if request_type > 0 else PEER,
                socket_type=SocketType.STREAM,
                initial_sequence_number=ISN,
                mss=1500,
                flow_window=8192,
                request_type=request_type,
                socket_id=0x0ABC_DEF0,
                cookie=0xDEAD_BEEF if request_type == RequestType.RESPONSE else 0,
                peer_ip=pack_peer_ip("10.0.0.2"),
            ),
        )
        for request_type in RequestType
    ),
    (
        "data",
        DataPacket(
            timestamp=123_456,
            destination_socket_id=PEER,
            sequence_number=ISN,
            message_number=1,
            boundary=Boundary.SOLO,
            payload=bytes(range(256)) * 5,
        ),
    ),
    (
        "data, middle of a message, in order",
        DataPacket(
            destination_socket_id=PEER,
            sequence_number=0,
            message_number=0x1FFF_FFFF,
            boundary=Boundary.MIDDLE,
            in_order=True,
            payload=b"x",
        ),
    ),
    (
        "full ACK",
        Ack(
            destination_socket_id=PEER,
            ack_number=7,
            sequence_number=1,
            rtt=100_000,
            rtt_variance=50_000,
            available_buffer=8190,
            receive_rate=70_000,
            link_capacity=900_000,
        ),
    ),
    (
        "short ACK",
        Ack(
            destination_socket_id=PEER,
            ack_number=8,
            sequence_number=2,
            rtt=90_000,
            rtt_variance=40_000,
            available_buffer=2,
        ),
    ),
    ("light ACK", LightAck(destination_socket_id=PEER, sequence_number=3)),
    ("NAK", Nak(destination_socket_id=PEER, losses=((5, 5), (0x7FFF_FFF0, 2)))),
    ("ACK2", Ack2(destination_socket_id=PEER, ack_number=7)),
    ("keep-alive", KeepAlive(destination_socket_id=PEER)),
    ("shutdown", Shutdown(destination_socket_id=PEER)),
    (
        "message drop request",
        MessageDropRequest(
            destination_socket_id=PEER,
            message_number=9,
            first_sequence_number=10,
            last_sequence_number=12,
        ),
    ),
]


def _checksum(header: bytes) -> int:
    total: int = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4_udp(payload: bytes, source_port: int, destination_port: int) -> bytes:
    """One IPv4 packet (header checksum set) carrying one UDP datagram (checksum 0: none)."""
    udp = struct.pack("!HHHH", source_port, destination_port, 8 + len(payload), 0) + payload
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0, SOURCE_IP, DESTINATION_IP
    )
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return header + udp


def write_pcap(path: Path, datagrams: list[bytes]) -> None:
    """A classic pcap file (microsecond timestamps), one record per datagram, 1 ms apart."""
    records = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, LINKTYPE_RAW)]
    for number, datagram in enumerate(datagrams):
        frame = ipv4_udp(datagram, 40000, PORT)
        records.append(struct.pack("<IIII", 1, number * 1000, len(frame), len(frame)) + frame)
    path.write_bytes(b"".join(records))


def tshark(capture: Path, *args: str) -> str:
    assert TSHARK is not None
    result = subprocess.run(  # noqa: S603 - the system tshark on a file we wrote
        [TSHARK, "-n", "-r", str(capture), "-d", f"udp.port=={PORT},udt", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_tshark_decodes_every_packet_we_encode_without_errors(tmp_path: Path) -> None:
    capture = tmp_path / "udt.pcap"
    write_pcap(capture, [encode_packet(packet) for _, packet in PACKETS])

    verbose = tshark(capture, "-V")
    assert "Malformed" not in verbose
    assert "Expert Info (Error" not in verbose
    assert "Expert Info (Warning" not in verbose

    fields = ["udt.iscontrol", "udt.type", "udt.id", "udt.seqno", "udt.hs.isn"]
    fields += ["udt.hs.reqtype", "udt.hs.cookie", "udt.ackno", "udt.ack_seqno", "udt.msgno"]
    table = tshark(capture, "-T", "fields", "-E", "separator=;", *(f"-e{f}" for f in fields))
    rows = [dict(zip(fields, line.split(";"), strict=True)) for line in table.splitlines()]
    assert len(rows) == len(PACKETS)
    for (name, packet), row in zip(PACKETS, rows, strict=True):
        assert int(row["udt.id"], 0) == packet.destination_socket_id, name
        if isinstance(packet, DataPacket):
            assert row["udt.iscontrol"] == "0", name
            assert int(row["udt.seqno"], 0) == packet.sequence_number, name
            assert int(row["udt.msgno"], 0) == packet.message_number, name
            continue
        assert isinstance(packet, ControlPacket)
        assert row["udt.iscontrol"] == "1", name
        assert int(row["udt.type"], 0) == packet.CONTROL_TYPE, name
        if isinstance(packet, Handshake):
            assert int(row["udt.hs.isn"], 0) == packet.initial_sequence_number, name
            assert int(row["udt.hs.reqtype"], 0) == packet.request_type, name
            assert int(row["udt.hs.cookie"], 0) == packet.cookie, name
        elif isinstance(packet, Ack):
            assert int(row["udt.ackno"], 0) == packet.ack_number, name
            assert int(row["udt.ack_seqno"], 0) == packet.sequence_number, name
        elif isinstance(packet, Ack2):
            assert int(row["udt.ackno"], 0) == packet.ack_number, name
