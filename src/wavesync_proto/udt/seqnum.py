"""UDT number spaces: sequence, message and ACK numbers that wrap around.

This module owns the arithmetic of UDT4's three counters (UDT 4.11 common.h:
``CSeqNo``, ``CMsgNo``, ``CAckNo``; draft-gg-udt-03): 31-bit packet
sequence numbers, 29-bit message numbers and 31-bit ACK sub-sequence numbers.
It does not own windows, loss lists or which number comes next: those are the
sender's and the receiver's.

Two numbers are compared the shorter way round the circle. libudt 4.11 decides
the direction from the raw difference: it goes straight when ``abs(a - b)`` is
below ``0x3FFFFFFF`` (``CSeqNo::m_iSeqNoTH``) and the other way round otherwise.
That agrees with the shorter way except when the raw values differ by exactly
2**30 - 1, where libudt takes the long way: its ``seqoff(0, 0x3FFFFFFF)`` is
-(2**30 + 1). Here it is 2**30 - 1, so ``seq_offset(a, seq_inc(a, n)) == n`` for
every ``-2**30 < n < 2**30``; at exactly half-way, where neither way is shorter,
the direction is libudt's. No real window comes near: a flow window is tens of
thousands of packets. The same holds for 29-bit message numbers at 2**28 - 1.

Arguments must already be in range (the codec guarantees that for every number it
decodes); the functions do not check, because they run once or more per packet.
"""

from __future__ import annotations

__all__ = [
    "ACK_MAX",
    "MSG_MAX",
    "SEQ_MAX",
    "ack_inc",
    "msg_cmp",
    "msg_dec",
    "msg_inc",
    "msg_offset",
    "seq_cmp",
    "seq_dec",
    "seq_inc",
    "seq_len",
    "seq_max",
    "seq_offset",
]

#: Largest packet sequence number: the first header word has 31 bits for it.
SEQ_MAX = 0x7FFFFFFF
#: Largest message number: 32 bits less two boundary bits and the in-order bit.
MSG_MAX = 0x1FFFFFFF
#: Largest ACK sub-sequence number (``CAckNo::m_iMaxAckSeqNo``).
ACK_MAX = 0x7FFFFFFF

_SEQ_HALF = 1 << 30
_SEQ_SPAN = 1 << 31
_MSG_HALF = 1 << 28
_MSG_SPAN = 1 << 29


def seq_inc(seq: int, n: int = 1) -> int:
    """``seq`` moved ``n`` places forward (backward if ``n`` is negative), wrapping at 2**31."""
    return (seq + n) & SEQ_MAX


def seq_dec(seq: int, n: int = 1) -> int:
    """``seq`` moved ``n`` places backward, wrapping below zero to ``SEQ_MAX``."""
    return (seq - n) & SEQ_MAX


def seq_offset(first: int, second: int) -> int:
    """How far ``second`` is ahead of ``first`` (negative: behind), the short way round.

    The result is in ``[-2**30, 2**30]``. At exactly half the circle both ways are
    equally long; the answer then points from the larger raw value to the smaller,
    as libudt's ``CSeqNo::seqoff`` does, which keeps
    ``seq_offset(a, b) == -seq_offset(b, a)`` true everywhere.
    """
    distance = (second - first) & SEQ_MAX
    if distance < _SEQ_HALF:
        return distance
    if distance > _SEQ_HALF:
        return distance - _SEQ_SPAN
    return _SEQ_HALF if first > second else -_SEQ_HALF


def seq_cmp(first: int, second: int) -> int:
    """-1, 0 or 1 as ``first`` comes before, equals or comes after ``second``."""
    offset = seq_offset(second, first)
    return (offset > 0) - (offset < 0)


def seq_len(first: int, last: int) -> int:
    """How many sequence numbers run from ``first`` forward to ``last``, both included.

    Always counts forward (``CSeqNo::seqlen``): from 5 to 4 is the whole circle,
    2**31. libudt's int32 overflows to -2**31 there; Python's int does not.
    """
    return ((last - first) & SEQ_MAX) + 1


def seq_max(first: int, second: int) -> int:
    """The later of two sequence numbers."""
    return second if seq_offset(first, second) > 0 else first


def msg_inc(msgno: int, n: int = 1) -> int:
    """``msgno`` moved ``n`` places forward, wrapping at 2**29 (``CMsgNo::incmsg``)."""
    return (msgno + n) & MSG_MAX


def msg_dec(msgno: int, n: int = 1) -> int:
    """``msgno`` moved ``n`` places backward, wrapping below zero to ``MSG_MAX``."""
    return (msgno - n) & MSG_MAX


def msg_offset(first: int, second: int) -> int:
    """How far message ``second`` is ahead of ``first``, the short way round (as ``seq_offset``)."""
    distance = (second - first) & MSG_MAX
    if distance < _MSG_HALF:
        return distance
    if distance > _MSG_HALF:
        return distance - _MSG_SPAN
    return _MSG_HALF if first > second else -_MSG_HALF


def msg_cmp(first: int, second: int) -> int:
    """-1, 0 or 1 as message ``first`` comes before, equals or comes after ``second``."""
    offset = msg_offset(second, first)
    return (offset > 0) - (offset < 0)


def ack_inc(ack_number: int) -> int:
    """The ACK sub-sequence number after ``ack_number`` (``CAckNo::incack``)."""
    return (ack_number + 1) & ACK_MAX
