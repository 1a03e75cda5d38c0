"""Hypothesis properties of the UDT codec and number arithmetic."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wavesync_proto.udt import (
    MSG_MAX,
    SEQ_MAX,
    Ack,
    Ack2,
    Boundary,
    CongestionWarning,
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
    decode_packet,
    encode_packet,
    msg_cmp,
    msg_inc,
    msg_offset,
    seq_cmp,
    seq_inc,
    seq_len,
    seq_offset,
)

u32 = st.integers(0, 0xFFFFFFFF)
i32 = st.integers(-(1 << 31), (1 << 31) - 1)
# Plain values plus the edges where wrap-around bugs live.
seqs = st.integers(0, SEQ_MAX) | st.sampled_from(
    [0, 1, SEQ_MAX, SEQ_MAX - 1, 0x3FFFFFFF, 0x40000000, 0x40000001]
)
msgnos = st.integers(0, MSG_MAX) | st.sampled_from([0, 1, MSG_MAX, 0x0FFFFFFF, 0x10000000])
header = {"timestamp": u32, "destination_socket_id": u32}


@st.composite
def loss_ranges(draw: st.DrawFn) -> tuple[int, int]:
    first = draw(seqs)
    # A range may run up to just short of half the circle and across SEQ_MAX.
    return first, seq_inc(first, draw(st.integers(0, (1 << 30) - 1)))


data_packets = st.builds(
    DataPacket,
    sequence_number=seqs,
    message_number=msgnos,
    boundary=st.sampled_from(Boundary),
    in_order=st.booleans(),
    payload=st.binary(max_size=64),
    **header,
)
control_packets = st.one_of(
    st.builds(
        Handshake,
        version=u32,
        socket_type=u32,
        initial_sequence_number=seqs,
        mss=u32,
        flow_window=u32,
        request_type=i32,
        socket_id=u32,
        cookie=u32,
        peer_ip=st.binary(min_size=16, max_size=16),
        **header,
    ),
    st.builds(KeepAlive, **header),
    st.builds(
        Ack,
        ack_number=seqs,
        sequence_number=seqs,
        rtt=u32,
        rtt_variance=u32,
        available_buffer=u32,
        **header,
    ),
    st.builds(
        Ack,
        ack_number=seqs,
        sequence_number=seqs,
        rtt=u32,
        rtt_variance=u32,
        available_buffer=u32,
        receive_rate=u32,
        link_capacity=u32,
        **header,
    ),
    st.builds(LightAck, sequence_number=seqs, **header),
    st.builds(Nak, losses=st.lists(loss_ranges(), min_size=1, max_size=8).map(tuple), **header),
    st.builds(CongestionWarning, **header),
    st.builds(Shutdown, **header),
    st.builds(Ack2, ack_number=seqs, **header),
    st.builds(
        MessageDropRequest,
        message_number=msgnos,
        first_sequence_number=seqs,
        last_sequence_number=seqs,
        **header,
    ),
    st.builds(ErrorSignal, error_code=u32, **header),
    st.builds(
        UserDefinedControl,
        subtype=st.integers(0, 0xFFFF),
        additional_info=u32,
        body=st.binary(max_size=64),
        **header,
    ),
)


@pytest.mark.property
@given(data_packets | control_packets)
def test_decode_inverts_encode(packet: Packet) -> None:
    assert decode_packet(encode_packet(packet)) == packet


# Words that sit on the edges the body parsers test: range starts, top bits, zero.
edge_words = st.sampled_from([0, 5, 0x7FFFFFFF, 0x80000000, 0x80000005, 0xFFFFFFFF])


@st.composite
def control_datagrams(draw: st.DrawFn) -> bytes:
    # Random bytes rarely make a control header with a known type; build those on
    # purpose so the body parsers see garbage too.
    control_type = draw(st.sampled_from([*ControlType, 9, 0x100, 0x7FFE]))
    first_word = 0x80000000 | control_type << 16 | draw(st.integers(0, 0xFFFF))
    words = draw(st.lists(edge_words | u32, max_size=14))
    tail = draw(st.binary(max_size=3))
    head = struct.pack("!IIII", first_word, draw(u32), draw(u32), draw(u32))
    return head + struct.pack(f"!{len(words)}I", *words) + tail


@st.composite
def nak_datagrams(draw: st.DrawFn) -> bytes:
    # Loss lists made of edge words: valid singles and ranges, ranges with no end,
    # ends with the top bit, ranges that run backwards.
    words = draw(st.lists(edge_words, min_size=1, max_size=6))
    return struct.pack(f"!4I{len(words)}I", 0x80030000, 0, 0, 0, *words)


def decode_or_refuse(data: bytes) -> None:
    try:
        packet = decode_packet(data)
    except UdtDecodeError:
        return
    # Whatever decodes re-encodes to a datagram that means the same thing (the
    # encoder writes zeros where libudt does, so the bytes may differ).
    assert decode_packet(encode_packet(packet)) == packet


@pytest.mark.property
@given(st.binary(max_size=80))
def test_random_bytes_decode_or_raise_udt_decode_error(data: bytes) -> None:
    decode_or_refuse(data)


@pytest.mark.property
@given(control_datagrams())
def test_control_datagram_decodes_or_raises_udt_decode_error(data: bytes) -> None:
    decode_or_refuse(data)


@pytest.mark.property
@given(nak_datagrams())
def test_nak_loss_list_decodes_or_raises_udt_decode_error(data: bytes) -> None:
    decode_or_refuse(data)


@pytest.mark.property
@given(seqs, st.integers(-(1 << 30) + 1, (1 << 30) - 1))
def test_offset_inverts_increment(start: int, n: int) -> None:
    assert 0 <= seq_inc(start, n) <= SEQ_MAX
    assert seq_offset(start, seq_inc(start, n)) == n
    assert seq_len(start, seq_inc(start, n)) == (n if n >= 0 else n + (1 << 31)) + 1


@pytest.mark.property
@given(msgnos, st.integers(-(1 << 28) + 1, (1 << 28) - 1))
def test_message_offset_inverts_increment(start: int, n: int) -> None:
    assert 0 <= msg_inc(start, n) <= MSG_MAX
    assert msg_offset(start, msg_inc(start, n)) == n


@pytest.mark.property
@given(seqs, st.integers(-(1 << 31), 1 << 31) | st.sampled_from([1 << 30, -(1 << 30)]))
def test_sequence_comparison_is_antisymmetric_across_the_wrap(a: int, distance: int) -> None:
    b = seq_inc(a, distance)
    assert seq_cmp(a, b) == -seq_cmp(b, a)
    assert seq_offset(a, b) == -seq_offset(b, a)
    assert -(1 << 30) <= seq_offset(a, b) <= 1 << 30
    # "a comes before b" means "b is ahead of a".
    assert seq_cmp(a, b) == -((seq_offset(a, b) > 0) - (seq_offset(a, b) < 0))
    assert (seq_cmp(a, b) == 0) == (a == b)


@pytest.mark.property
@given(msgnos, st.integers(-(1 << 29), 1 << 29) | st.sampled_from([1 << 28, -(1 << 28)]))
def test_message_comparison_is_antisymmetric_across_the_wrap(a: int, distance: int) -> None:
    b = msg_inc(a, distance)
    assert msg_cmp(a, b) == -msg_cmp(b, a)
    assert msg_offset(a, b) == -msg_offset(b, a)
    assert (msg_cmp(a, b) == 0) == (a == b)
