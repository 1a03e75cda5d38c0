"""The receiving half of a UDT connection: buffer, losses, ACK/NAK/ACK2, rate estimates."""

from __future__ import annotations

import struct

import pytest

from wavesync_proto.udt import (
    Ack,
    Boundary,
    ControlPacket,
    DataPacket,
    LightAck,
    Nak,
    decode_packet,
)
from wavesync_proto.udt.receiver import ACK_HISTORY, LIGHT_ACK_INTERVAL, UdtReceiver
from wavesync_proto.udt.sender import IN_ORDER_BIT
from wavesync_proto.udt.seqnum import SEQ_MAX

PAYLOAD = 1456
_HEADER = struct.Struct("!IIII")


def receiver(
    isn: int = 500, capacity: int = 1000, *, message_mode: bool = False
) -> tuple[UdtReceiver, list[bytes]]:
    out: list[bytes] = []
    r = UdtReceiver(
        isn=isn,
        capacity_packets=capacity,
        payload_size=PAYLOAD,
        peer_socket_id=9,
        message_mode=message_mode,
        out=out,
        now=0.0,
    )
    return r, out


def data(seq: int, body: bytes | None = None, boundary: Boundary = Boundary.SOLO) -> bytes:
    word = boundary << 30 | 1
    return _HEADER.pack(seq & SEQ_MAX, word, 0, 3) + (body if body is not None else b"d" * PAYLOAD)


def feed(r: UdtReceiver, seq: int, now: float = 0.0, body: bytes | None = None) -> None:
    packet = data(seq, body)
    word0, word1, _, _ = _HEADER.unpack_from(packet)
    r.on_data(packet, word0, word1, now)


def ready(r: UdtReceiver) -> bytes:
    chunks, _ = r.take_ready()
    return b"".join(chunks)


def decoded(out: list[bytes]) -> list[DataPacket | ControlPacket]:
    packets = [decode_packet(datagram) for datagram in out]
    out.clear()
    return packets


def test_in_order_packets_are_ready_at_once() -> None:
    r, out = receiver()
    feed(r, 500, body=b"ab")
    feed(r, 501, body=b"cd")
    assert r.ready_packets == 2
    assert ready(r) == b"abcd"
    assert r.contig == 502
    assert out == []  # no gap, no NAK


def test_a_gap_is_nakd_at_once_and_filled_by_the_retransmission() -> None:
    r, out = receiver()
    feed(r, 500, body=b"0")
    feed(r, 503, body=b"3", now=0.5)
    assert decoded(out) == [Nak(destination_socket_id=9, losses=((501, 502),))]
    assert r.loss.ranges() == [(501, 502)]
    assert r.lost == 2
    assert ready(r) == b"0"
    feed(r, 502, body=b"2")
    assert ready(r) == b""
    feed(r, 501, body=b"1")
    assert ready(r) == b"123"
    assert not r.loss
    assert r.contig == 504


def test_duplicates_and_packets_outside_the_window_are_dropped() -> None:
    r, _ = receiver(capacity=10)
    feed(r, 500)
    feed(r, 500)  # delivered already
    feed(r, 505)
    feed(r, 505)  # held already
    feed(r, 400)  # far behind
    feed(r, 510)  # offset 10: the buffer holds 10, one of them ready
    feed(r, 500 + 1_000_000)  # far ahead
    assert r.duplicates == 3
    assert r.out_of_window == 2
    assert r.packets_received == 2
    assert r.occupied == 2
    assert r.available == 8


def test_undelivered_events_count_as_occupied_buffer() -> None:
    r, _ = receiver(capacity=4)
    for seq in range(500, 504):
        feed(r, seq)
    _, packets = r.take_ready()
    r.undelivered_packets += packets  # the connection's events, not taken yet
    feed(r, 504)
    assert r.out_of_window == 1
    assert r.available == 2  # 4.11's floor: never announce less than 2
    r.undelivered_packets = 0
    feed(r, 504)
    assert r.ready_packets == 1


def test_sequence_numbers_wrap_at_seq_max() -> None:
    r, out = receiver(isn=SEQ_MAX - 1)
    feed(r, SEQ_MAX - 1, body=b"a")
    feed(r, 1, body=b"d")  # SEQ_MAX and 0 are missing
    assert decoded(out) == [Nak(destination_socket_id=9, losses=((SEQ_MAX, 0),))]
    feed(r, 0, body=b"c")
    feed(r, SEQ_MAX, body=b"b")
    assert ready(r) == b"abcd"
    assert r.contig & SEQ_MAX == 2
    assert r.full_ack(1.0, 0.1, 0.05)
    (ack,) = decoded(out)
    assert isinstance(ack, Ack)
    assert ack.sequence_number == 2


def test_full_ack_reports_the_first_missing_number_and_the_estimates() -> None:
    r, out = receiver()
    for seq in (500, 501, 503):
        feed(r, seq)
    out.clear()
    assert r.full_ack(0.1, rtt=0.02, rtt_variance=0.005)
    (ack,) = decoded(out)
    assert ack == Ack(
        destination_socket_id=9,
        ack_number=1,
        sequence_number=502,
        rtt=20000,
        rtt_variance=5000,
        available_buffer=997,  # two ready, one out of order
        receive_rate=0,  # three arrivals are not enough to tell
        link_capacity=0,
    )


def test_acks_repeat_only_after_rtt_plus_four_variances_and_stop_once_confirmed() -> None:
    r, out = receiver()
    feed(r, 500)
    assert r.full_ack(1.0, 0.1, 0.01)
    assert not r.full_ack(1.05, 0.1, 0.01)  # nothing new, 0.14 s not passed
    assert r.full_ack(1.15, 0.1, 0.01)  # the ACK2 did not come: again
    acks = decoded(out)
    assert [a.ack_number for a in acks if isinstance(a, Ack)] == [1, 2]
    assert r.on_ack2(2, 1.2) == pytest.approx(0.05)
    assert not r.full_ack(2.0, 0.1, 0.01)  # confirmed: silence
    assert not r.needs_tick()


def test_an_ack_within_a_syn_of_the_last_full_one_has_no_rates() -> None:
    r, out = receiver()
    feed(r, 500)
    r.full_ack(1.0, 0.1, 0.01)
    feed(r, 501)
    r.full_ack(1.005, 0.1, 0.01)
    first, second = decoded(out)
    assert isinstance(first, Ack)
    assert isinstance(second, Ack)
    assert first.receive_rate is not None
    assert second.receive_rate is None  # the 16-byte form


def test_ack2_for_an_unknown_ack_is_none_and_the_history_is_bounded() -> None:
    r, _ = receiver(capacity=ACK_HISTORY * 3)
    assert r.on_ack2(12345, 1.0) is None
    for n in range(ACK_HISTORY + 10):
        feed(r, 500 + n)
        r.full_ack(n * 0.02, 0.0, 0.0)
    assert len(r._ack_history) == ACK_HISTORY
    assert r.on_ack2(1, 100.0) is None  # evicted
    assert r.on_ack2(ACK_HISTORY + 10, 100.0) is not None


def test_a_light_ack_goes_every_64_packets_between_full_acks() -> None:
    r, out = receiver()
    for seq in range(500, 500 + 2 * LIGHT_ACK_INTERVAL + 1):
        feed(r, seq)
    lights = [p for p in decoded(out) if isinstance(p, LightAck)]
    assert [p.sequence_number for p in lights] == [563, 627]
    assert r.light_acks_sent == 2


def test_a_short_packet_asks_for_an_ack_at_once() -> None:
    r, _ = receiver()
    feed(r, 500)
    assert not r.ack_now
    feed(r, 501, body=b"end")
    assert r.ack_now
    assert r.needs_tick()


def test_periodic_nak_repeats_only_losses_not_reported_within_the_interval() -> None:
    r, out = receiver()
    feed(r, 500, now=0.0)
    feed(r, 502, now=0.0)  # 501 lost, NAKd at 0.0
    feed(r, 505, now=0.3)  # 503-504 lost, NAKd at 0.3
    out.clear()
    assert r.periodic_nak(0.35, interval=0.1)
    assert decoded(out) == [Nak(destination_socket_id=9, losses=((501, 501),))]
    assert not r.periodic_nak(0.36, interval=0.1)
    assert r.periodic_nak(0.5, interval=0.1)
    assert decoded(out) == [Nak(destination_socket_id=9, losses=((501, 501), (503, 504)))]


def test_receive_rate_is_the_median_filtered_arrival_speed() -> None:
    r, _ = receiver(capacity=100)
    for n in range(8):
        feed(r, 500 + n, now=n * 0.001)
    assert r.receive_rate() == 0  # not enough samples
    for n in range(8, 40):
        feed(r, 500 + n, now=n * 0.001)
    assert r.receive_rate() == 1000
    feed(r, 540, now=5.0)  # one long pause is filtered out
    assert r.receive_rate() == 1000


def test_receive_rate_with_a_batch_of_arrivals_per_clock_reading() -> None:
    r, _ = receiver(capacity=1000)
    # Ten datagrams per reading, a reading every millisecond: 10,000 packets/s.
    for n in range(400):
        feed(r, 500 + n, now=(n // 10) * 0.001 + 0.001)
    assert r.receive_rate() == pytest.approx(10_000, rel=0.01)


def test_link_capacity_from_probing_pairs() -> None:
    r, _ = receiver(capacity=1000)
    now = 0.0
    for seq in range(512, 512 + 16 * 12):
        # A pair (multiple of 16, next) arrives 100 µs apart; the rest every 1 ms.
        now += 0.0001 if seq % 16 == 1 else 0.001
        feed(r, seq, now=now)
    assert r.link_capacity() == pytest.approx(10_000, rel=0.01)


def test_link_capacity_is_unknown_before_eight_pairs() -> None:
    r, _ = receiver(capacity=1000)
    for seq in range(512, 512 + 16 * 3):
        feed(r, seq, now=seq * 0.001)
    assert r.link_capacity() == 0


def test_message_mode_delivers_whole_messages() -> None:
    r, _ = receiver(message_mode=True)

    def message_packet(seq: int, boundary: Boundary, body: bytes) -> None:
        # In-order messages: a whole one after a hole waits (test_message_order.py has
        # the messages that need not wait).
        word = boundary << 30 | IN_ORDER_BIT | 1
        packet = _HEADER.pack(seq, word, 0, 3) + body
        r.on_data(packet, seq, word, 0.0)

    message_packet(500, Boundary.FIRST, b"he")
    message_packet(502, Boundary.LAST, b"lo")
    message_packet(503, Boundary.SOLO, b"!")
    assert r.ready_packets == 0  # 501 is missing: nothing whole yet
    message_packet(501, Boundary.MIDDLE, b"l")
    chunks, packets = r.take_ready()
    assert chunks == [b"hello", b"!"]
    assert packets == 4
    assert r.occupied == 0


def test_clear_empties_the_buffers() -> None:
    r, _ = receiver()
    feed(r, 500)
    feed(r, 505)
    r.clear()
    assert r.occupied == 0
    assert not r.loss


# --- message drop requests (DGRAM) ----------------------------------------------------------


def message(r: UdtReceiver, seq: int, boundary: Boundary, body: bytes, number: int) -> None:
    packet = _HEADER.pack(seq & SEQ_MAX, boundary << 30 | number, 0, 3) + body
    word0, word1, _, _ = _HEADER.unpack_from(packet)
    r.on_data(packet, word0, word1, 0.0)


def test_a_dropped_message_is_skipped_and_never_delivered_in_part() -> None:
    r, out = receiver(message_mode=True)
    message(r, 500, Boundary.FIRST, b"he", number=1)  # 501, 502 lost
    message(r, 503, Boundary.SOLO, b"next", number=2)
    out.clear()
    assert r.drop_message(1, 500, 502) == 2  # two missing numbers marked
    chunks, packets = r.take_ready()
    assert chunks == [b"next"]
    assert packets == 1
    assert not r.loss
    assert r.contig == 504
    assert r.discarded == 1  # the FIRST that arrived
    assert r.occupied == 0


def test_a_drop_request_for_a_later_message_waits_for_its_turn() -> None:
    r, _ = receiver(message_mode=True)
    message(r, 500, Boundary.FIRST, b"a", number=1)
    # 501 (the end of message 1) is lost; message 2 is 502-503, dropped by the sender.
    assert r.drop_message(2, 502, 503) == 2
    assert r.loss.ranges() == [(501, 501)]  # found by the drop: still to be NAKd
    message(r, 501, Boundary.LAST, b"b", number=1)
    message(r, 504, Boundary.SOLO, b"c", number=3)
    chunks, _ = r.take_ready()
    assert chunks == [b"ab", b"c"]


def test_a_drop_request_keeps_packets_of_other_messages() -> None:
    # 4.11 names one number past the message's last: that packet is the next message's.
    r, _ = receiver(message_mode=True)
    message(r, 501, Boundary.SOLO, b"keep", number=2)
    r.drop_message(1, 500, 501)
    chunks, _ = r.take_ready()
    assert chunks == [b"keep"]


def test_a_drop_request_is_ignored_in_a_byte_stream_and_outside_the_window() -> None:
    r, _ = receiver()
    feed(r, 501)
    assert r.drop_message(0, 500, 500) == 0
    assert r.loss.ranges() == [(500, 500)]
    m, _ = receiver(message_mode=True, capacity=8)
    assert m.drop_message(1, 400, 450) == 0  # all before the window
    assert m.drop_message(1, 500, 600) == 8  # clipped to the buffer
    assert m.occupied == 0


def test_a_fragment_without_its_first_packet_is_discarded() -> None:
    r, _ = receiver(message_mode=True)
    message(r, 500, Boundary.MIDDLE, b"x", number=1)
    message(r, 501, Boundary.LAST, b"y", number=1)
    message(r, 502, Boundary.SOLO, b"z", number=2)
    chunks, _ = r.take_ready()
    assert chunks == [b"z"]
    assert r.discarded == 2


def test_an_unconfirmed_ack_repeats_sooner_when_asked() -> None:
    r, out = receiver()
    feed(r, 500)
    assert r.full_ack(1.0, 0.1, 0.05)
    assert not r.full_ack(1.009, 0.1, 0.05, repeat_after=0.01)
    assert r.full_ack(1.011, 0.1, 0.05, repeat_after=0.01)
    assert [p.sequence_number for p in decoded(out) if isinstance(p, Ack)] == [501, 501]
