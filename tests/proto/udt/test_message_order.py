"""DGRAM messages and the in-order bit (4.11 ``sendmsg(..., inorder)``, ``CRcvBuffer::scanMsg``).

A whole message whose in-order bit is 0 is handed out at once, ahead of earlier
messages still missing packets; one whose bit is 1 waits for everything before it.
The ACK still names the first missing packet, and the buffer stays bounded.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest

from wavesync_proto.errors import LocalProtocolError
from wavesync_proto.udt import Ack, Boundary, DataPacket, UdtConfig, decode_packet
from wavesync_proto.udt.connection import UdtConnection
from wavesync_proto.udt.connection_types import DataReceived
from wavesync_proto.udt.packet_types import SocketType
from wavesync_proto.udt.receiver import UdtReceiver
from wavesync_proto.udt.sender import IN_ORDER_BIT
from wavesync_proto.udt.seqnum import SEQ_MAX

from .connection_helpers import seeded
from .test_connection import A_ID, A_ISN, B_ID, B_ISN, A, B, Pair, connected, events

_HEADER = struct.Struct("!IIII")
DGRAM = UdtConfig(socket_type=SocketType.DGRAM)
FIRST, MIDDLE, LAST, SOLO = Boundary.FIRST, Boundary.MIDDLE, Boundary.LAST, Boundary.SOLO


def receiver(capacity: int = 1000) -> tuple[UdtReceiver, list[bytes]]:
    out: list[bytes] = []
    r = UdtReceiver(
        isn=500,
        capacity_packets=capacity,
        payload_size=1456,
        peer_socket_id=9,
        message_mode=True,
        out=out,
        now=0.0,
    )
    return r, out


def packet(
    r: UdtReceiver, seq: int, boundary: Boundary, body: bytes, *, number: int, ordered: bool
) -> None:
    """One data packet of message ``number`` (its in-order bit ``ordered``) arrives."""
    word = boundary << 30 | (IN_ORDER_BIT if ordered else 0) | number
    datagram = _HEADER.pack(seq & SEQ_MAX, word, 0, 3) + body
    r.on_data(datagram, seq & SEQ_MAX, word, 0.0)


def taken(r: UdtReceiver) -> list[bytes]:
    """What the application would read now (the event queue's part played by hand)."""
    chunks, packets = r.take_ready()
    r.undelivered_packets += packets
    return chunks


# --- the receiver ---------------------------------------------------------------------------


def test_a_whole_unordered_message_overtakes_a_hole() -> None:
    r, out = receiver()
    packet(r, 500, SOLO, b"a", number=1, ordered=False)
    # 501 (message 2) is lost; 502 and 503-504 are whole messages with the bit 0.
    packet(r, 502, SOLO, b"c", number=3, ordered=False)
    packet(r, 503, FIRST, b"d", number=4, ordered=False)
    assert taken(r) == [b"a", b"c"]
    packet(r, 504, LAST, b"e", number=4, ordered=False)
    assert taken(r) == [b"de"]
    # The ACK still names the first missing packet.
    assert r.contig == 501
    assert r.loss.ranges() == [(501, 501)]
    out.clear()
    assert r.full_ack(1.0, 0.1, 0.05)
    ack = decode_packet(out[-1])
    assert isinstance(ack, Ack)
    assert ack.sequence_number == 501
    # The four delivered packets are counted until the application takes their events.
    assert ack.available_buffer == 1000 - 4
    assert r.buffered_out_of_order == 0
    packet(r, 501, SOLO, b"b", number=2, ordered=False)
    assert taken(r) == [b"b"]
    assert r.contig == 505  # past the handed-out numbers, each delivered once
    r.undelivered_packets = 0
    assert r.occupied == 0


def test_an_ordered_message_waits_for_everything_before_it() -> None:
    r, _ = receiver()
    packet(r, 500, FIRST, b"a", number=1, ordered=True)
    # 501 (message 1's LAST) is lost.
    packet(r, 502, SOLO, b"c", number=2, ordered=True)
    packet(r, 503, FIRST, b"d", number=3, ordered=True)
    packet(r, 504, LAST, b"e", number=3, ordered=True)
    assert taken(r) == []
    assert r.buffered_out_of_order == 3
    packet(r, 501, LAST, b"b", number=1, ordered=True)
    assert taken(r) == [b"ab", b"c", b"de"]
    assert r.contig == 505


def test_mixed_flags_each_message_keeps_its_own_rule() -> None:
    r, _ = receiver()
    # Message 1 (500-501, bit 0): 500 lost. Message 2 (502, bit 1). Message 3 (503, bit
    # 0). Message 4 (504-506, bit 0): its middle 505 lost. Message 5 (507, bit 1).
    packet(r, 501, LAST, b"a2", number=1, ordered=False)
    packet(r, 502, SOLO, b"b", number=2, ordered=True)
    packet(r, 503, SOLO, b"c", number=3, ordered=False)
    packet(r, 504, FIRST, b"d1", number=4, ordered=False)
    packet(r, 506, LAST, b"d3", number=4, ordered=False)
    packet(r, 507, SOLO, b"e", number=5, ordered=True)
    assert taken(r) == [b"c"]
    assert r.loss.ranges() == [(500, 500), (505, 505)]
    packet(r, 505, MIDDLE, b"d2", number=4, ordered=False)  # the retransmission
    assert taken(r) == [b"d1d2d3"]
    assert r.contig == 500
    packet(r, 500, FIRST, b"a1", number=1, ordered=False)
    assert taken(r) == [b"a1a2", b"b", b"e"]
    assert r.contig == 508
    assert not r.loss


def test_a_late_copy_of_a_handed_out_packet_is_a_duplicate() -> None:
    r, _ = receiver()
    packet(r, 502, SOLO, b"x", number=3, ordered=False)
    assert taken(r) == [b"x"]
    packet(r, 502, SOLO, b"x", number=3, ordered=False)
    assert r.duplicates == 1
    packet(r, 500, SOLO, b"v", number=1, ordered=False)
    packet(r, 501, SOLO, b"w", number=2, ordered=False)
    packet(r, 502, SOLO, b"x", number=3, ordered=False)  # now before the window
    assert taken(r) == [b"v", b"w"]
    assert r.duplicates == 2


def test_a_message_cut_short_by_a_handed_out_one_is_discarded() -> None:
    # A peer that broke the rules: message 1 has a FIRST and no LAST before message 2.
    r, _ = receiver()
    packet(r, 500, FIRST, b"a", number=1, ordered=False)
    packet(r, 502, SOLO, b"c", number=2, ordered=False)
    assert taken(r) == [b"c"]
    packet(r, 501, MIDDLE, b"b", number=1, ordered=False)
    assert taken(r) == []
    assert r.discarded == 2
    assert r.contig == 503
    assert r.occupied == 1  # message 2, until the application takes its event


def test_a_dropped_message_is_skipped_around_handed_out_ones() -> None:
    r, _ = receiver()
    # Message 1 (500-502, bit 0) loses 501 and 502; message 2 (503, bit 0) overtakes.
    packet(r, 500, FIRST, b"a", number=1, ordered=False)
    packet(r, 503, SOLO, b"d", number=2, ordered=False)
    packet(r, 504, SOLO, b"e", number=3, ordered=True)
    assert taken(r) == [b"d"]
    # The sender gives up on message 1 (its time-to-live), naming one past its last
    # as 4.11 does: message 2's packet survives, message 3 follows in order.
    assert r.drop_message(1, 500, 503) == 2
    assert taken(r) == [b"e"]
    assert r.contig == 505
    assert r.discarded == 1
    assert not r.loss


def test_a_drop_request_for_a_handed_out_message_changes_nothing() -> None:
    # After an EXP the sender may resend, and then drop, a message that did arrive.
    r, _ = receiver()
    packet(r, 501, FIRST, b"b", number=2, ordered=False)
    packet(r, 502, LAST, b"c", number=2, ordered=False)
    assert taken(r) == [b"bc"]
    assert r.drop_message(2, 501, 502) == 0
    packet(r, 500, SOLO, b"a", number=1, ordered=False)
    assert taken(r) == [b"a"]
    assert r.contig == 503
    assert r.discarded == 0


def test_handed_out_messages_stay_within_the_buffer() -> None:
    r, _ = receiver(capacity=8)
    for seq in range(501, 508):
        packet(r, seq, SOLO, bytes([seq & 0xFF]), number=seq, ordered=False)
    assert len(taken(r)) == 7
    assert r.occupied == 7  # in events the application has not taken
    assert r.available == 2  # never below 2
    packet(r, 508, SOLO, b"z", number=508, ordered=False)
    assert r.out_of_window == 1  # past what is free
    packet(r, 500, SOLO, b"a", number=500, ordered=False)  # the hole always fits
    assert taken(r) == [b"a"]
    assert r.occupied == 8
    assert r.contig == 508
    r.undelivered_packets = 0  # the application took every event
    assert r.occupied == 0
    assert r.available == 8


def test_clear_forgets_the_handed_out_numbers() -> None:
    r, _ = receiver()
    packet(r, 502, SOLO, b"x", number=3, ordered=False)
    r.clear()
    r.undelivered_packets = 0
    assert r.occupied == 0
    assert r.buffered_out_of_order == 0


# --- the connection -----------------------------------------------------------------------


def sent_data(pair: Pair) -> list[DataPacket]:
    result = [decode_packet(data) for data in pair.sent_ab]
    return [p for p in result if isinstance(p, DataPacket)]


def test_send_sets_the_bit_per_message_and_defaults_to_in_order() -> None:
    pair = connected(DGRAM)
    assert pair.a.send(b"x" * 3000, in_order=False) == 3000
    assert pair.a.send(b"y") == 1
    assert pair.a.send(b"z", in_order=True) == 1
    pair.advance(0.1)
    assert [(p.message_number, p.in_order) for p in sent_data(pair)] == [
        (1, False),
        (1, False),
        (1, False),
        (2, True),
        (3, True),
    ]


def drop_once(message_number: int) -> Callable[[bytes], bool]:
    """A filter that loses the first data packet of message ``message_number``."""
    lost: list[bytes] = []

    def drop(data: bytes) -> bool:
        decoded = decode_packet(data)
        mine = isinstance(decoded, DataPacket) and decoded.message_number == message_number
        if mine and not lost:
            lost.append(data)
            return True
        return False

    return drop


def test_retransmissions_keep_the_bit() -> None:
    pair = connected(DGRAM)
    pair.drop_ab = drop_once(1)
    pair.a.send(b"a", in_order=False)
    pair.a.send(b"b", in_order=True)
    pair.advance(1.0)
    first = [p for p in sent_data(pair) if p.message_number == 1]
    assert len(first) >= 2  # resent after the NAK
    assert not any(p.in_order for p in first)
    assert all(p.in_order for p in sent_data(pair) if p.message_number == 2)


def test_an_unordered_message_overtakes_a_lost_one_end_to_end() -> None:
    pair = connected(DGRAM)
    pair.drop_ab = drop_once(1)
    pair.a.send(b"first")
    pair.a.send(b"second", in_order=False)
    pair.a.send(b"third")
    assert pair.b is not None
    got: list[bytes] = []
    while pair.now < 1.0:
        pair.advance(pair.now - pair.origin + 0.001)
        got += [e.data for e in events(pair.b) if isinstance(e, DataReceived)]
        if got == [b"second"]:
            assert pair.b.receiver is not None
            assert pair.b.receiver.loss.ranges()  # the first message is still missing
    assert got == [b"second", b"first", b"third"]


def test_messages_sent_while_connecting_keep_their_bit() -> None:
    a = UdtConnection.rendezvous(
        [B], socket_id=A_ID, isn=A_ISN, now=0.0, random=seeded(1).random, config=DGRAM
    )
    b = UdtConnection.rendezvous(
        [A], socket_id=B_ID, isn=B_ISN, now=0.0, random=seeded(2).random, config=DGRAM
    )
    assert a.send(b"early", in_order=False) == 5
    assert a.send(b"bird") == 4
    pair = Pair(a, b)
    pair.advance(0.3)
    assert [(p.payload, p.in_order) for p in sent_data(pair)][:2] == [
        (b"early", False),
        (b"bird", True),
    ]


@pytest.mark.parametrize("in_order", [True, False])
def test_a_byte_stream_refuses_the_in_order_bit(in_order: bool) -> None:
    pair = connected()
    with pytest.raises(LocalProtocolError, match="in-order bit needs a DGRAM connection"):
        pair.a.send(b"x", in_order=in_order)
    assert pair.a.send(b"x") == 1
    pair.exchange()
    assert [p.in_order for p in sent_data(pair)] == [False]
