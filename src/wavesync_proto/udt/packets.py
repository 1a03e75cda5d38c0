"""UDT4 packets (UDT 4.11, draft-gg-udt-03): one datagram to one typed value and back.

This module owns the bytes of a UDT datagram: the 16-byte header, the fields of
a data packet, and the control information of each control type. It does not
know what a packet means to a connection (handshake states, windows, timers,
which socket a destination id names): that is the connection's and the
multiplexer's. docs/protocol.md §4 has the layout of every packet and says which
facts come from libudt 4.11's source and captures, and which from the draft.

Every field is network byte order. libudt builds a control body as host-order
int32 words and converts each with ``htonl`` on the way out (channel.cpp), so a
body is a sequence of big-endian 32-bit words: the one surprise is the peer IP
address in the handshake (``pack_peer_ip``).

Decoding raises only ``UdtDecodeError``. A field that libudt 4.11 leaves
undefined and ignores (the low 16 bits of a control packet's first word other
than a user-defined one, the additional info of types that have none, the
4-byte padding after a body-less control packet) is accepted whatever it holds,
dropped, and written back as zeros, as libudt writes it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from ..addresses import pack_host, unpack_ipv4, unpack_ipv6
from ..errors import LocalProtocolError
from .packet_types import (
    HANDSHAKE_LENGTH,
    HEADER_LENGTH,
    SHUTDOWN_ABORTED,
    Ack,
    Ack2,
    Boundary,
    CongestionWarning,
    ControlPacket,
    ControlType,
    DataPacket,
    ErrorSignal,
    Handshake,
    KeepAlive,
    LightAck,
    MessageDropRequest,
    Nak,
    Packet,
    Shutdown,
    UdtDecodeError,
    UserDefinedControl,
)
from .seqnum import seq_offset

__all__ = ["decode_packet", "encode_packet", "pack_peer_ip", "unpack_peer_ip"]


_HEADER = struct.Struct("!IIII")
_HANDSHAKE = struct.Struct("!IIIIIiII16s")
_WORD = struct.Struct("!I")
_TWO_WORDS = struct.Struct("!II")
_FOUR_WORDS = struct.Struct("!IIII")
_SIX_WORDS = struct.Struct("!IIIIII")

_CONTROL_FLAG = 0x80000000
_TOP_BIT = 0x80000000
_SEQ_MASK = 0x7FFFFFFF
_MSG_MASK = 0x1FFFFFFF
# "control info field should be none but writev does not allow this" (packet.cpp):
# libudt sends four zero bytes after every control packet that has no body.
_PAD = b"\x00\x00\x00\x00"


# --- peer IP address -----------------------------------------------------------------------


def _swap_words(field: bytes) -> bytes:
    # Reverse the bytes of each 32-bit word; its own inverse.
    return b"".join(field[i : i + 4][::-1] for i in range(0, 16, 4))


def pack_peer_ip(host: str) -> bytes:
    """The 16-byte handshake peer-IP field for ``host``, as libudt 4.11 writes it on x86.

    ``CIPAddress::ntop`` stores an IPv4 ``s_addr`` (network order) in word 0 as a
    host integer, and builds each IPv6 word from 4 address bytes little-endian;
    ``htonl`` then swaps each word onto the wire. On a little-endian host, which
    every libudt we can meet runs on, every 4-byte group of the address therefore
    appears reversed: 127.0.0.1 is ``01 00 00 7f`` followed by 12 zero bytes, and
    ::ffff:127.0.0.1 ends ``ff ff 00 00 01 00 00 7f`` (both captured from libudt).
    4.11 only copies the field into the address ``getsockname`` reports.
    """
    _family, packed = pack_host(host)
    return _swap_words(packed.ljust(16, b"\x00"))


def unpack_peer_ip(field: bytes, *, ipv6: bool) -> str:
    """The textual address in a handshake peer-IP field (inverse of ``pack_peer_ip``).

    The handshake does not say which family it carries; the receiving socket's
    family does, so the caller passes it.
    """
    if len(field) != 16:
        raise LocalProtocolError(f"a peer IP field is 16 bytes, not {len(field)}")
    if ipv6:
        return unpack_ipv6(_swap_words(field))
    return unpack_ipv4(field[3::-1])


# --- encoding ------------------------------------------------------------------------------


def _header(packet: ControlPacket, additional_info: int, subtype: int = 0) -> bytes:
    return _HEADER.pack(
        _CONTROL_FLAG | packet.CONTROL_TYPE << 16 | subtype,
        additional_info,
        packet.timestamp,
        packet.destination_socket_id,
    )


def _check_seq(value: int, what: str) -> int:
    if not 0 <= value <= _SEQ_MASK:
        raise LocalProtocolError(f"{what} {value} is not a 31-bit sequence number")
    return value


def _encode_handshake(packet: Handshake) -> bytes:
    _check_seq(packet.initial_sequence_number, "initial sequence number")
    if len(packet.peer_ip) != 16:
        raise LocalProtocolError(f"peer_ip must be 16 bytes, not {len(packet.peer_ip)}")
    return _header(packet, 0) + _HANDSHAKE.pack(
        packet.version,
        packet.socket_type,
        packet.initial_sequence_number,
        packet.mss,
        packet.flow_window,
        packet.request_type,
        packet.socket_id,
        packet.cookie,
        packet.peer_ip,
    )


def _encode_empty(packet: ControlPacket) -> bytes:
    return _header(packet, 0) + _PAD


def _encode_shutdown(packet: Shutdown) -> bytes:
    return _header(packet, SHUTDOWN_ABORTED if packet.aborted else 0) + _PAD


def _encode_ack(packet: Ack) -> bytes:
    _check_seq(packet.ack_number, "ACK number")
    _check_seq(packet.sequence_number, "ACK sequence number")
    fields = (packet.sequence_number, packet.rtt, packet.rtt_variance, packet.available_buffer)
    header = _header(packet, packet.ack_number)
    if packet.receive_rate is None and packet.link_capacity is None:
        return header + _FOUR_WORDS.pack(*fields)
    if packet.receive_rate is None or packet.link_capacity is None:
        raise LocalProtocolError("a six-word ACK needs both receive_rate and link_capacity")
    return header + _SIX_WORDS.pack(*fields, packet.receive_rate, packet.link_capacity)


def _encode_light_ack(packet: LightAck) -> bytes:
    _check_seq(packet.sequence_number, "light ACK sequence number")
    return _header(packet, 0) + _WORD.pack(packet.sequence_number)


def _encode_nak(packet: Nak) -> bytes:
    if not packet.losses:
        raise LocalProtocolError("a NAK must report at least one loss")
    words: list[int] = []
    for first, last in packet.losses:
        _check_seq(first, "NAK loss")
        _check_seq(last, "NAK loss")
        if first == last:
            words.append(first)
        elif seq_offset(first, last) < 0:
            raise LocalProtocolError(f"NAK range {first}..{last} ends before it starts")
        else:
            words += (first | _TOP_BIT, last)
    return _header(packet, 0) + struct.pack(f"!{len(words)}I", *words)


def _encode_ack2(packet: Ack2) -> bytes:
    _check_seq(packet.ack_number, "ACK2 ACK number")
    return _header(packet, packet.ack_number) + _PAD


def _encode_drop(packet: MessageDropRequest) -> bytes:
    if not 0 <= packet.message_number <= _MSG_MASK:
        raise LocalProtocolError(f"message number {packet.message_number} does not fit 29 bits")
    first = _check_seq(packet.first_sequence_number, "first sequence number")
    last = _check_seq(packet.last_sequence_number, "last sequence number")
    return _header(packet, packet.message_number) + _TWO_WORDS.pack(first, last)


def _encode_error(packet: ErrorSignal) -> bytes:
    return _header(packet, packet.error_code) + _PAD


def _encode_user(packet: UserDefinedControl) -> bytes:
    if not 0 <= packet.subtype <= 0xFFFF:
        raise LocalProtocolError(f"user-defined subtype {packet.subtype} does not fit 16 bits")
    return _header(packet, packet.additional_info, packet.subtype) + packet.body


# Each encoder takes exactly the class it is filed under.
_ENCODERS: dict[type[ControlPacket], Callable[[Any], bytes]] = {
    Handshake: _encode_handshake,
    KeepAlive: _encode_empty,
    Ack: _encode_ack,
    LightAck: _encode_light_ack,
    Nak: _encode_nak,
    CongestionWarning: _encode_empty,
    Shutdown: _encode_shutdown,
    Ack2: _encode_ack2,
    MessageDropRequest: _encode_drop,
    ErrorSignal: _encode_error,
    UserDefinedControl: _encode_user,
}


def encode_packet(packet: Packet) -> bytes:
    """The datagram for ``packet``; ``LocalProtocolError`` if a field does not fit its bits."""
    if type(packet) is DataPacket:
        # The hot path: one check for the two fields whose overflow would silently
        # change the meaning of other bits, then let struct check the rest.
        sequence_number = packet.sequence_number
        message_number = packet.message_number
        if sequence_number >> 31 or message_number >> 29:
            raise LocalProtocolError(
                f"sequence number {sequence_number} or message number {message_number}"
                " does not fit its 31 or 29 bits"
            )
        try:
            return (
                _HEADER.pack(
                    sequence_number,
                    packet.boundary << 30 | packet.in_order << 29 | message_number,
                    packet.timestamp,
                    packet.destination_socket_id,
                )
                + packet.payload
            )
        except struct.error as error:
            raise LocalProtocolError(f"data packet field out of range: {error}") from None
    encoder = _ENCODERS.get(type(packet))  # type: ignore[arg-type]  # a miss is the error below
    if encoder is None:
        raise LocalProtocolError(f"not a UDT packet: {type(packet).__name__}")
    try:
        return encoder(packet)
    except struct.error as error:
        raise LocalProtocolError(f"{type(packet).__name__} field out of range: {error}") from None


# --- decoding ------------------------------------------------------------------------------


# Data packets are built through the slot descriptors, bypassing the generated frozen
# __init__ (object.__setattr__ per field): measured 640 ns instead of 1180 ns to decode
# a 1456-byte data packet on CPython 3.11.
_new_packet = object.__new__
_set_timestamp = Packet.__dict__["timestamp"].__set__
_set_destination = Packet.__dict__["destination_socket_id"].__set__
_set_sequence = DataPacket.__dict__["sequence_number"].__set__
_set_message = DataPacket.__dict__["message_number"].__set__
_set_boundary = DataPacket.__dict__["boundary"].__set__
_set_in_order = DataPacket.__dict__["in_order"].__set__
_set_payload = DataPacket.__dict__["payload"].__set__
_BOUNDARIES = (Boundary.MIDDLE, Boundary.LAST, Boundary.FIRST, Boundary.SOLO)

# (first word, additional info, timestamp, destination socket id, body) -> packet
_Decoder = Callable[[int, int, int, int, bytes], ControlPacket]


def _seq_field(value: int, what: str) -> int:
    if value & _TOP_BIT:
        raise UdtDecodeError(f"{what} 0x{value:08x} has the top bit set")
    return value


def _no_body(body: bytes, name: str) -> None:
    # 4.11 sends 4 bytes of padding; the draft and other implementations send none.
    if len(body) not in (0, 4):
        raise UdtDecodeError(f"{name} carries {len(body)} bytes of control information, not 0 or 4")


def _decode_handshake(word0: int, info: int, ts: int, dst: int, body: bytes) -> Handshake:
    if len(body) != HANDSHAKE_LENGTH:
        raise UdtDecodeError(f"handshake body is {len(body)} bytes, not {HANDSHAKE_LENGTH}")
    version, socket_type, isn, mss, window, request, socket_id, cookie, ip = _HANDSHAKE.unpack(body)
    return Handshake(
        timestamp=ts,
        destination_socket_id=dst,
        version=version,
        socket_type=socket_type,
        initial_sequence_number=_seq_field(isn, "handshake initial sequence number"),
        mss=mss,
        flow_window=window,
        request_type=request,
        socket_id=socket_id,
        cookie=cookie,
        peer_ip=ip,
    )


def _empty_decoder(cls: type[KeepAlive | CongestionWarning], name: str) -> _Decoder:
    def decode(word0: int, info: int, ts: int, dst: int, body: bytes) -> ControlPacket:
        _no_body(body, name)
        return cls(timestamp=ts, destination_socket_id=dst)

    return decode


def _decode_shutdown(word0: int, info: int, ts: int, dst: int, body: bytes) -> Shutdown:
    _no_body(body, "shutdown")
    return Shutdown(timestamp=ts, destination_socket_id=dst, aborted=info == SHUTDOWN_ABORTED)


def _decode_ack(word0: int, info: int, ts: int, dst: int, body: bytes) -> Ack | LightAck:
    size = len(body)
    if size == 4:
        (sequence_number,) = _WORD.unpack(body)
        sequence_number = _seq_field(sequence_number, "light ACK sequence number")
        return LightAck(timestamp=ts, destination_socket_id=dst, sequence_number=sequence_number)
    if size == 16:
        sequence_number, rtt, rtt_variance, available = _FOUR_WORDS.unpack(body)
        receive_rate = link_capacity = None
    elif size == 24:
        sequence_number, rtt, rtt_variance, available, receive_rate, link_capacity = (
            _SIX_WORDS.unpack(body)
        )
    else:
        raise UdtDecodeError(f"ACK body is {size} bytes, not 4, 16 or 24")
    return Ack(
        timestamp=ts,
        destination_socket_id=dst,
        ack_number=_seq_field(info, "ACK number"),
        sequence_number=_seq_field(sequence_number, "ACK sequence number"),
        rtt=rtt,
        rtt_variance=rtt_variance,
        available_buffer=available,
        receive_rate=receive_rate,
        link_capacity=link_capacity,
    )


def _decode_nak(word0: int, info: int, ts: int, dst: int, body: bytes) -> Nak:
    size = len(body)
    if size == 0:
        raise UdtDecodeError("NAK carries no loss list")
    if size & 3:
        raise UdtDecodeError(f"NAK loss list is {size} bytes, not whole 32-bit words")
    words = struct.unpack(f"!{size >> 2}I", body)
    losses: list[tuple[int, int]] = []
    index = 0
    count = len(words)
    while index < count:
        word = words[index]
        if not word & _TOP_BIT:
            losses.append((word, word))
            index += 1
            continue
        if index + 1 == count:
            raise UdtDecodeError(f"NAK loss list ends inside a range: word {index} has no end")
        first = word & _SEQ_MASK
        last = words[index + 1]
        if last & _TOP_BIT:
            raise UdtDecodeError(
                f"NAK range at word {index} ends with 0x{last:08x}, which has the top bit set"
            )
        if seq_offset(first, last) < 0:
            # libudt 4.11 calls this "attack or bug" and breaks the connection.
            raise UdtDecodeError(f"NAK range {first}..{last} ends before it starts")
        losses.append((first, last))
        index += 2
    return Nak(timestamp=ts, destination_socket_id=dst, losses=tuple(losses))


def _decode_ack2(word0: int, info: int, ts: int, dst: int, body: bytes) -> Ack2:
    _no_body(body, "ACK2")
    ack_number = _seq_field(info, "ACK2 ACK number")
    return Ack2(timestamp=ts, destination_socket_id=dst, ack_number=ack_number)


def _decode_drop(word0: int, info: int, ts: int, dst: int, body: bytes) -> MessageDropRequest:
    if len(body) != 8:
        raise UdtDecodeError(f"message drop request body is {len(body)} bytes, not 8")
    first, last = _TWO_WORDS.unpack(body)
    return MessageDropRequest(
        timestamp=ts,
        destination_socket_id=dst,
        # CPacket::getMsgSeq: the receiver reads bits 3-31 only.
        message_number=info & _MSG_MASK,
        first_sequence_number=_seq_field(first, "drop request first sequence number"),
        last_sequence_number=_seq_field(last, "drop request last sequence number"),
    )


def _decode_error(word0: int, info: int, ts: int, dst: int, body: bytes) -> ErrorSignal:
    _no_body(body, "error signal")
    return ErrorSignal(timestamp=ts, destination_socket_id=dst, error_code=info)


def _decode_user(word0: int, info: int, ts: int, dst: int, body: bytes) -> UserDefinedControl:
    return UserDefinedControl(
        timestamp=ts,
        destination_socket_id=dst,
        subtype=word0 & 0xFFFF,
        additional_info=info,
        body=body,
    )


_DECODERS: dict[int, _Decoder] = {
    ControlType.HANDSHAKE: _decode_handshake,
    ControlType.KEEP_ALIVE: _empty_decoder(KeepAlive, "keep-alive"),
    ControlType.ACK: _decode_ack,
    ControlType.NAK: _decode_nak,
    ControlType.CONGESTION_WARNING: _empty_decoder(CongestionWarning, "congestion warning"),
    ControlType.SHUTDOWN: _decode_shutdown,
    ControlType.ACK2: _decode_ack2,
    ControlType.MESSAGE_DROP_REQUEST: _decode_drop,
    ControlType.ERROR_SIGNAL: _decode_error,
    ControlType.USER_DEFINED: _decode_user,
}


def decode_packet(data: bytes | bytearray | memoryview) -> DataPacket | ControlPacket:
    """Parse one UDT datagram; raise ``UdtDecodeError`` for anything malformed."""
    if type(data) is not bytes:
        data = bytes(data)
    if len(data) < HEADER_LENGTH:
        raise UdtDecodeError(f"datagram is {len(data)} bytes, shorter than the 16-byte header")
    word0, word1, timestamp, dst = _HEADER.unpack_from(data)
    if not word0 & _CONTROL_FLAG:
        packet = _new_packet(DataPacket)
        _set_timestamp(packet, timestamp)
        _set_destination(packet, dst)
        _set_sequence(packet, word0)
        _set_message(packet, word1 & _MSG_MASK)
        _set_boundary(packet, _BOUNDARIES[word1 >> 30])
        _set_in_order(packet, (word1 & 0x20000000) != 0)
        _set_payload(packet, data[HEADER_LENGTH:])
        return packet
    control_type = (word0 >> 16) & 0x7FFF
    decoder = _DECODERS.get(control_type)
    if decoder is None:
        raise UdtDecodeError(f"unknown control packet type 0x{control_type:04x}")
    return decoder(word0, word1, timestamp, dst, data[HEADER_LENGTH:])
