"""Sequence, message and ACK number arithmetic, against values libudt 4.11 computed."""

from __future__ import annotations

import pytest

from wavesync_proto.udt.seqnum import (
    ACK_MAX,
    MSG_MAX,
    SEQ_MAX,
    ack_inc,
    msg_cmp,
    msg_dec,
    msg_inc,
    msg_offset,
    seq_cmp,
    seq_dec,
    seq_inc,
    seq_len,
    seq_max,
    seq_offset,
)

# Printed by a throw-away C++ program linked against Debian's libudt 4.11
# (libudt-dev 4.11+dfsg1-1+b1): CSeqNo::seqcmp's sign and CSeqNo::seqoff.
LIBUDT_SEQ = [  # (a, b, sign(seqcmp(a, b)), seqoff(a, b))
    (0x00000000, 0x00000000, 0, 0),
    (0x00000000, 0x00000001, -1, 1),
    (0x00000001, 0x00000000, 1, -1),
    (0x00000000, 0x7FFFFFFF, 1, -1),
    (0x7FFFFFFF, 0x00000000, -1, 1),
    (0x7FFFFFF0, 0x00000010, -1, 32),
    (0x00000010, 0x7FFFFFF0, 1, -32),
    (0x00000000, 0x3FFFFFFE, -1, 1073741822),
    (0x3FFFFFFE, 0x00000000, 1, -1073741822),
    (0x00000000, 0x3FFFFFFF, 1, -1073741825),
    (0x3FFFFFFF, 0x00000000, -1, 1073741825),
    (0x00000000, 0x40000000, 1, -1073741824),
    (0x40000000, 0x00000000, -1, 1073741824),
    (0x00000000, 0x40000001, 1, -1073741823),
    (0x40000001, 0x00000000, -1, 1073741823),
    (0x00000005, 0x40000005, 1, -1073741824),
    (0x40000005, 0x00000005, -1, 1073741824),
    (0x60000000, 0x1FFFFFFF, -1, 1073741823),
    (0x1FFFFFFF, 0x60000000, 1, -1073741823),
    (0x7FFFFFFF, 0x3FFFFFFF, -1, 1073741824),
    (0x3FFFFFFF, 0x7FFFFFFF, 1, -1073741824),
    (0x000003E8, 0x000003DE, 1, -10),
    (0x7FFFFFFE, 0x3FFFFFFD, -1, 1073741823),
]
LIBUDT_MSG = [  # (a, b, sign(msgcmp(a, b)), msgoff(a, b))
    (0x00000000, 0x00000000, 0, 0),
    (0x00000000, 0x00000001, -1, 1),
    (0x00000001, 0x00000000, 1, -1),
    (0x00000000, 0x1FFFFFFF, 1, -1),
    (0x1FFFFFFF, 0x00000000, -1, 1),
    (0x00000000, 0x0FFFFFFE, -1, 268435454),
    (0x00000000, 0x0FFFFFFF, 1, -268435457),
    (0x0FFFFFFF, 0x00000000, -1, 268435457),
    (0x00000000, 0x10000000, 1, -268435456),
    (0x10000000, 0x00000000, -1, 268435456),
    (0x00000000, 0x10000001, 1, -268435455),
    (0x1FFFFFF0, 0x00000010, -1, 32),
]


def test_the_number_spaces_are_libudts() -> None:
    # CSeqNo::m_iMaxSeqNo, CMsgNo::m_iMaxMsgNo, CAckNo::m_iMaxAckSeqNo in 4.11.
    assert (SEQ_MAX, MSG_MAX, ACK_MAX) == (0x7FFFFFFF, 0x1FFFFFFF, 0x7FFFFFFF)


@pytest.mark.parametrize(("a", "b", "sign", "offset"), LIBUDT_SEQ)
def test_sequence_comparison_matches_libudt(a: int, b: int, sign: int, offset: int) -> None:
    if abs(a - b) == 0x3FFFFFFF:
        # The one documented difference: libudt goes the long way round here.
        assert seq_offset(a, b) == offset + (1 << 31 if offset < 0 else -(1 << 31))
        assert seq_cmp(a, b) == -sign
    else:
        assert seq_offset(a, b) == offset
        assert seq_cmp(a, b) == sign


@pytest.mark.parametrize(("a", "b", "sign", "offset"), LIBUDT_MSG)
def test_message_comparison_matches_libudt(a: int, b: int, sign: int, offset: int) -> None:
    if abs(a - b) == 0x0FFFFFFF:
        assert msg_offset(a, b) == offset + (1 << 29 if offset < 0 else -(1 << 29))
        assert msg_cmp(a, b) == -sign
    else:
        assert msg_offset(a, b) == offset
        assert msg_cmp(a, b) == sign


def test_the_short_way_round_just_below_half_the_circle() -> None:
    assert seq_offset(0, 0x3FFFFFFF) == 0x3FFFFFFF
    assert seq_offset(0x3FFFFFFF, 0) == -0x3FFFFFFF
    assert seq_cmp(0, 0x3FFFFFFF) == -1
    assert msg_offset(0, 0x0FFFFFFF) == 0x0FFFFFFF


def test_increment_and_decrement_wrap() -> None:
    assert seq_inc(SEQ_MAX) == 0
    assert seq_inc(0x7FFFFFF0, 0x20) == 0x10  # CSeqNo::incseq(0x7ffffff0, 0x20) == 16
    assert seq_inc(5, -10) == SEQ_MAX - 4
    assert seq_dec(0) == SEQ_MAX
    assert seq_dec(5, 10) == SEQ_MAX - 4
    assert seq_dec(seq_inc(123, 1 << 30), 1 << 30) == 123
    assert msg_inc(MSG_MAX) == 0  # CMsgNo::incmsg
    assert msg_inc(7, 3) == 10
    assert msg_dec(0) == MSG_MAX
    assert msg_dec(2, 5) == MSG_MAX - 2
    assert ack_inc(ACK_MAX) == 0
    assert ack_inc(41) == 42


def test_comparison_across_the_wrap() -> None:
    assert seq_cmp(SEQ_MAX, 0) == -1
    assert seq_cmp(0, SEQ_MAX) == 1
    assert seq_cmp(17, 17) == 0
    assert msg_cmp(MSG_MAX, 0) == -1
    assert msg_cmp(3, 3) == 0


def test_sequence_length_counts_forward_inclusively() -> None:
    assert seq_len(5, 5) == 1
    assert seq_len(5, 9) == 5
    assert seq_len(0x7FFFFFF0, 0x10) == 33  # CSeqNo::seqlen agrees
    # The whole circle: libudt's int32 overflows to -2**31 here.
    assert seq_len(1, 0) == 1 << 31
    assert seq_len(0, SEQ_MAX) == 1 << 31


def test_seq_max_takes_the_later_number() -> None:
    assert seq_max(5, 9) == 9
    assert seq_max(9, 5) == 9
    assert seq_max(SEQ_MAX, 3) == 3
    assert seq_max(3, SEQ_MAX) == 3
    assert seq_max(4, 4) == 4
