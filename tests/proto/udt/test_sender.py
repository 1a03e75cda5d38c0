"""The sending half of a UDT connection: packets, ACKs, NAKs, timeouts and pacing."""

from __future__ import annotations

import pytest

from wavesync_proto.udt import Boundary, DataPacket, MessageDropRequest, decode_packet
from wavesync_proto.udt.sender import MAX_BURST_TIME, UdtSender, unwrap
from wavesync_proto.udt.seqnum import MSG_MAX, SEQ_MAX

from .connection_helpers import FixedRate

PAYLOAD = 1456


def sender(isn: int = 1000, capacity: int = 1 << 20) -> UdtSender:
    result = UdtSender(isn=isn, payload_size=PAYLOAD, capacity_bytes=capacity)
    result.slot = 0.0
    return result


def emit(
    s: UdtSender, now: float, cc: FixedRate | None = None, window: int = 1 << 20
) -> list[DataPacket]:
    out: list[bytes] = []
    s.emit(
        out,
        now=now,
        timestamp=1234,
        destination=77,
        window=window,
        congestion=cc or FixedRate(),
    )
    packets = [decode_packet(data) for data in out]
    assert all(isinstance(packet, DataPacket) for packet in packets)
    return packets  # type: ignore[return-value]


def test_unwrap_picks_the_nearest_number() -> None:
    assert unwrap(5, 3) == 5
    assert unwrap(1, SEQ_MAX) == SEQ_MAX + 2  # forward across the wrap
    assert unwrap(SEQ_MAX, SEQ_MAX + 2) == SEQ_MAX  # backward across it
    assert unwrap(2, 1 << 33) == (1 << 33) + 2


def test_one_write_is_one_message_cut_into_first_middle_last() -> None:
    s = sender()
    assert s.write(b"x" * (PAYLOAD * 2 + 10), whole=False) == PAYLOAD * 2 + 10
    assert s.write(b"y" * 5, whole=False) == 5
    packets = emit(s, 0.0)
    assert [(p.boundary, p.message_number, len(p.payload)) for p in packets] == [
        (Boundary.FIRST, 1, PAYLOAD),
        (Boundary.MIDDLE, 1, PAYLOAD),
        (Boundary.LAST, 1, 10),
        (Boundary.SOLO, 2, 5),
    ]
    assert [p.sequence_number for p in packets] == [1000, 1001, 1002, 1003]
    assert {(p.destination_socket_id, p.timestamp, p.in_order) for p in packets} == {
        (77, 1234, False)
    }


def test_message_numbers_go_from_the_last_back_to_one() -> None:
    s = sender()
    s._message = MSG_MAX - 1  # 4.11: 0x1FFFFFFE, then 1; never 0x1FFFFFFF or 0
    s.write(b"a", whole=False)
    s.write(b"b", whole=False)
    assert [p.message_number for p in emit(s, 0.0)] == [MSG_MAX - 1, 1]


def test_write_takes_no_more_than_the_buffer_holds() -> None:
    s = sender(capacity=3000)
    assert s.write(b"a" * 2000, whole=False) == 2000
    assert s.send_space == 1000
    assert s.write(b"b" * 2000, whole=False) == 1000
    assert s.write(b"c", whole=False) == 0
    assert s.buffered_bytes == 3000


def test_a_message_is_taken_whole_or_not_at_all() -> None:
    s = sender(capacity=3000)
    assert s.write(b"a" * 2000, whole=True) == 2000
    assert s.write(b"b" * 1001, whole=True) == 0
    assert s.write(bytearray(b"b" * 1000), whole=True) == 1000


def test_the_window_limits_new_packets() -> None:
    s = sender()
    s.write(b"z" * PAYLOAD * 10, whole=False)
    assert len(emit(s, 0.0, window=4)) == 4
    assert s.outstanding == 4
    assert emit(s, 1.0, window=4) == []
    assert not s.wants_to_send(4)
    assert s.acknowledge(1002) == 2
    assert [p.sequence_number for p in emit(s, 2.0, window=4)] == [1004, 1005]


def test_acknowledge_frees_the_buffer_and_refuses_an_ack_of_unsent_data() -> None:
    s = sender()
    s.write(b"q" * PAYLOAD * 3, whole=False)
    emit(s, 0.0)
    assert s.acknowledge(1000 + 4) == -1  # beyond anything sent
    assert s.acknowledge(SEQ_MAX) == 0  # behind: old news
    assert s.buffered_bytes == PAYLOAD * 3
    assert s.acknowledge(1002) == 2
    assert s.acknowledge(1001) == 0
    assert s.buffered_bytes == PAYLOAD
    assert s.acknowledge(1003) == 1
    assert s.is_idle()


def test_lost_packets_go_before_new_ones() -> None:
    s = sender()
    s.write(b"r" * PAYLOAD * 6, whole=False)
    first = emit(s, 0.0, window=4)
    assert s.add_losses([(1001, 1002)]) == [(1001, 1002)]
    again = emit(s, 1.0, window=6)
    assert [p.sequence_number for p in again] == [1001, 1002, 1004, 1005]
    assert again[0].payload == first[1].payload
    assert s.packets_retransmitted == 2


def test_a_nak_is_clipped_to_what_is_in_flight() -> None:
    s = sender()
    s.write(b"s" * PAYLOAD * 5, whole=False)
    emit(s, 0.0)
    s.acknowledge(1002)
    # Partly acknowledged, partly never sent, wholly absurd: only 1002..1004 remain.
    assert s.add_losses([(990, 1003), (1004, 5000), (2_000_000_000, 2_000_000_100)]) == [
        (1002, 1003),
        (1004, 1004),
    ]
    assert s.loss.ranges() == [(1002, 1004)]
    assert s.add_losses([(1, 2)]) == []


def test_sequence_numbers_wrap_at_seq_max() -> None:
    s = sender(isn=SEQ_MAX - 1)
    s.write(b"w" * PAYLOAD * 4, whole=False)
    assert [p.sequence_number for p in emit(s, 0.0)] == [SEQ_MAX - 1, SEQ_MAX, 0, 1]
    assert s.add_losses([(SEQ_MAX, 0)]) == [(SEQ_MAX, SEQ_MAX + 1)]  # unwrapped
    assert [p.sequence_number for p in emit(s, 1.0)] == [SEQ_MAX, 0]
    assert s.acknowledge(1) == 3
    assert s.acknowledge(2) == 1
    assert s.is_idle()


def test_timeout_resends_everything_unacknowledged_once() -> None:
    s = sender()
    s.write(b"t" * PAYLOAD * 3, whole=False)
    emit(s, 0.0)
    assert s.timeout() == 3
    assert s.timeout() == 0  # losses queued already: 4.11 adds nothing
    assert [p.sequence_number for p in emit(s, 1.0)] == [1000, 1001, 1002]
    s.acknowledge(1003)
    assert s.timeout() == 0


def test_pacing_spaces_packets_by_the_period() -> None:
    s = sender(isn=1)  # away from the probing pairs
    s.write(b"p" * PAYLOAD * 10, whole=False)
    cc = FixedRate(period=0.001)
    assert len(emit(s, 0.0, cc)) == 1
    assert s.slot == pytest.approx(0.001)
    assert emit(s, 0.0005, cc) == []
    assert len(emit(s, 0.0025, cc)) == 2  # the slots at 0.001 and 0.002
    assert s.slot == pytest.approx(0.003)
    assert cc.sent == [1, 2, 3]


def test_every_sixteenth_packet_is_followed_at_once_by_the_next() -> None:
    s = sender(isn=15)
    s.write(b"p" * PAYLOAD * 10, whole=False)
    cc = FixedRate(period=0.001)
    # 15 goes at 0; 16 at 0.001 and, being a multiple of 16, takes 17 with it.
    assert [p.sequence_number for p in emit(s, 0.0, cc)] == [15]
    assert [p.sequence_number for p in emit(s, 0.001, cc)] == [16, 17]
    assert [p.sequence_number for p in emit(s, 0.002, cc)] == [18]


def test_a_late_call_catches_up_only_a_bounded_burst() -> None:
    s = sender(isn=1)
    s.write(b"b" * PAYLOAD * 1000, whole=False)
    period = 0.0001
    cc = FixedRate(period=period)
    packets = emit(s, 5.0, cc)  # five seconds late
    assert len(packets) <= MAX_BURST_TIME / period + 2
    assert len(packets) >= MAX_BURST_TIME / period
    # A slow rate may still catch up two periods.
    slow = sender(isn=1)
    slow.write(b"b" * PAYLOAD * 10, whole=False)
    assert len(emit(slow, 5.0, FixedRate(period=0.5))) == 3


def test_a_period_of_zero_sends_the_whole_window() -> None:
    s = sender(isn=1)
    s.write(b"z" * PAYLOAD * 100, whole=False)
    assert len(emit(s, 0.0, FixedRate(period=0.0), window=64)) == 64


def test_clear_drops_everything() -> None:
    s = sender()
    s.write(b"c" * PAYLOAD * 3, whole=False)
    emit(s, 0.0, window=1)
    s.add_losses([(1000, 1000)])
    s.clear()
    assert s.is_idle()
    assert s.buffered_bytes == 0
    assert not s.loss


# --- message time-to-live -------------------------------------------------------------------


def test_a_lost_packet_of_an_expired_message_becomes_a_drop_request() -> None:
    s = sender()
    s.write(b"m" * (PAYLOAD * 2 + 1), whole=True, deadline=1.0)  # message 1: 1000-1002
    s.write(b"n", whole=True, deadline=1.0)  # message 2: 1003
    emit(s, 0.0)
    s.add_losses([(1001, 1001), (1003, 1003)])
    out: list[bytes] = []
    s.emit(out, now=1.5, timestamp=0, destination=77, window=100, congestion=FixedRate())
    assert [decode_packet(d) for d in out] == [
        MessageDropRequest(
            destination_socket_id=77,
            message_number=1,
            first_sequence_number=1000,
            last_sequence_number=1002,
        ),
        MessageDropRequest(
            destination_socket_id=77,
            message_number=2,
            first_sequence_number=1003,
            last_sequence_number=1003,
        ),
    ]
    assert s.drop_requests_sent == 2
    assert not s.loss
    assert s.packets_retransmitted == 0


def test_a_message_within_its_time_to_live_is_resent() -> None:
    s = sender()
    s.write(b"m", whole=True, deadline=1.0)
    s.write(b"n", whole=True)  # no TTL
    emit(s, 0.0)
    s.add_losses([(1000, 1001)])
    assert [p.sequence_number for p in emit(s, 0.5)] == [1000, 1001]
    s.add_losses([(1001, 1001)])
    assert [p.sequence_number for p in emit(s, 5.0)] == [1001]


def test_the_unsent_rest_of_an_expired_message_is_not_sent() -> None:
    s = sender()
    s.write(b"r" * PAYLOAD * 4, whole=True, deadline=1.0)
    emit(s, 0.0, window=2)
    s.add_losses([(1000, 1000)])
    out: list[bytes] = []
    s.emit(out, now=2.0, timestamp=0, destination=77, window=2, congestion=FixedRate())
    (drop,) = [decode_packet(d) for d in out]
    assert isinstance(drop, MessageDropRequest)
    assert (drop.first_sequence_number, drop.last_sequence_number) == (1000, 1001)
    assert s.pending_packets == 0
    assert s.buffered_bytes == PAYLOAD * 2  # the two sent packets, until acknowledged
    assert s.acknowledge(1002) == 2
    assert s.is_idle()


def test_an_acknowledged_message_forgets_its_deadline() -> None:
    s = sender()
    s.write(b"a", whole=True, deadline=1.0)
    emit(s, 0.0)
    s.acknowledge(1001)
    assert s._expiry == {}


def test_the_in_order_bit_marks_every_packet_of_its_message_and_their_resends() -> None:
    s = sender()
    s.write(b"o" * (PAYLOAD * 2 + 1), whole=True, in_order=True)
    s.write(b"u", whole=True)
    first = emit(s, 0.0)
    assert [(p.message_number, p.boundary, p.in_order) for p in first] == [
        (1, Boundary.FIRST, True),
        (1, Boundary.MIDDLE, True),
        (1, Boundary.LAST, True),
        (2, Boundary.SOLO, False),
    ]
    s.add_losses([(1001, 1003)])
    resent = emit(s, 1.0)
    assert [(p.sequence_number, p.in_order) for p in resent] == [
        (1001, True),
        (1002, True),
        (1003, False),
    ]
    # The bit is not part of the message number: a drop request still names message 1.
    s.write(b"t", whole=True, deadline=2.0, in_order=True)
    emit(s, 1.5)
    s.add_losses([(1004, 1004)])
    out: list[bytes] = []
    s.emit(out, now=3.0, timestamp=0, destination=77, window=1 << 20, congestion=FixedRate())
    drop = decode_packet(out[0])
    assert isinstance(drop, MessageDropRequest)
    assert drop.message_number == 3
