"""The data-transfer phase of a UDT connection (UDT 4.11 core.cpp ``processCtrl``, ``checkTimers``).

This module owns what happens between ``HandshakeEstablished`` and the end: it
composes the sender, the receiver and the congestion control, answers the peer's
control packets (ACK, light ACK, NAK, ACK2), keeps the RTT and rate estimates,
and runs the SYN tick (ACK, periodic NAK), the EXP timer and the keep-alive. It
does not know the handshake, the connection's states and events, the idle
timeout or closing (``connection.py``'s); it never reads a clock. docs/protocol.md
§4.8 describes the rules and where they depart from 4.11.
"""

from __future__ import annotations

from collections.abc import Callable

from .congestion import SYN_INTERVAL, CongestionControl
from .congestion_rate import DeliveryRateCongestion
from .connection_types import UdtConfig, UdtConnectionCounters, payload_size
from .handshake import HandshakeEstablished
from .packet_types import Ack, Ack2, ControlPacket, KeepAlive, LightAck, Nak, SocketType
from .packets import encode_packet
from .receiver import UdtReceiver
from .sender import UdtSender, unwrap
from .seqnum import SEQ_MAX

__all__ = [
    "KEEPALIVE_INTERVAL",
    "MAX_RTT",
    "MIN_EXP_INTERVAL",
    "MIN_NAK_INTERVAL",
    "UdtTransfer",
]

#: Seconds without sending anything after which a keep-alive goes. 4.11 sends one
#: when its EXP timer fires with nothing to resend (every 0.3 s or more); one a
#: second keeps any idle timeout above a few seconds from firing, for less traffic.
KEEPALIVE_INTERVAL = 1.0
#: Floor of the EXP interval per expiration (core.cpp ``m_ullMinExpInt``, 300 ms).
MIN_EXP_INTERVAL = 0.3
#: Floor of the periodic NAK interval: one SYN, the tick it runs on. 4.11 commented
#: its NAK timer out ("rely on the sender's EXP"); the draft keeps it. A lost
#: retransmission then costs max(RTT + 4 RTTVar, SYN) and the wait for the next tick,
#: not the sender's EXP interval (300 ms or more). On loopback at 5 % loss, 20 ms
#: here gave 100-119 MB/s, 10 ms 164-183 MB/s: the receive buffer fills behind holes.
MIN_NAK_INTERVAL = 0.01
#: An RTT sample (or an ACK's RTT field) counts as at most this many seconds, so a
#: hostile ACK cannot push the EXP timer into next year.
MAX_RTT = 10.0

_US = 1_000_000
_SYN_US = 10_000
_MAX_RTT_US = int(MAX_RTT * _US)
_INITIAL_RTT_US = 100_000  # CUDT::open: m_iRTT = 10 * m_iSYNInterval
_INITIAL_RTT_VAR_US = 50_000  # m_iRTTVar = m_iRTT >> 1
_INITIAL_RECEIVE_RATE = 16  # m_iDeliveryRate
_INITIAL_LINK_CAPACITY = 1  # m_iBandwidth
_INT32_MAX = 0x7FFFFFFF


class UdtTransfer:
    """Sender, receiver, congestion control, estimates and timers of an established connection.

    Everything it sends goes, encoded, into ``out`` (the connection pairs it with the
    peer's address). The connection feeds it the peer's data packets straight into
    ``receiver.on_data`` (the hot path) and its control packets through ``on_*``.
    """

    __slots__ = (
        "_capacity_known",
        "_exp_base",
        "_exp_count",
        "_last_ack2_number",
        "_last_ack2_time",
        "_last_data_sent",
        "_loss_frontier",
        "_peer_rto_us",
        "_probed",
        "_rate_known",
        "_rtt_measured",
        "_start",
        "cc",
        "counters",
        "last_heard",
        "last_sent",
        "link_capacity",
        "next_syn",
        "out",
        "peer_socket_id",
        "peer_window",
        "receive_rate",
        "receiver",
        "rtt_us",
        "rtt_var_us",
        "sender",
    )

    def __init__(
        self,
        established: HandshakeEstablished,
        *,
        config: UdtConfig,
        random: Callable[[], float],
        counters: UdtConnectionCounters,
        now: float,
    ) -> None:
        self.counters = counters
        self.out: list[bytes] = []
        self.peer_socket_id = established.peer_socket_id
        size = payload_size(established.mss)
        self.sender = UdtSender(
            isn=established.local_isn,
            payload_size=size,
            capacity_bytes=config.send_buffer_bytes,
            min_period=_cap_period(config.max_bandwidth, established.mss),
        )
        self.sender.slot = now
        self.receiver = UdtReceiver(
            isn=established.peer_isn,
            capacity_packets=config.receive_buffer_packets,
            payload_size=size,
            peer_socket_id=established.peer_socket_id,
            message_mode=config.socket_type is SocketType.DGRAM,
            out=self.out,
            now=now,
        )
        factory = config.congestion or DeliveryRateCongestion
        self.cc: CongestionControl = factory(
            initial_sequence_number=established.local_isn,
            max_flow_window=max(min(established.flow_window, 1 << 20), 2),
            random=random,
            now=now,
            mss=established.mss,
        )
        #: The peer's window: the handshake's, then each ACK's available buffer.
        self.peer_window = established.flow_window
        # Estimates, integer µs and packets/s, as 4.11 keeps them.
        self.rtt_us = _INITIAL_RTT_US
        self.rtt_var_us = _INITIAL_RTT_VAR_US
        self.receive_rate = _INITIAL_RECEIVE_RATE
        self.link_capacity = _INITIAL_LINK_CAPACITY
        self._rate_known = False
        self._capacity_known = False
        self._rtt_measured = False
        self._loss_frontier = -1
        # RTT + 4 RTTVar as the peer's last ACK reported them (-1: none yet): a sender
        # that receives nothing has no ACK2 of its own to measure the path with.
        self._peer_rto_us = -1
        # Tail loss probe: when data last left; whether the probe went since progress.
        self._last_data_sent = now
        self._probed = False
        # Timers.
        self._start = now
        self.last_heard = now
        self.last_sent = now
        self.next_syn = now
        self._exp_base = now
        self._exp_count = 1
        self._last_ack2_time = float("-inf")
        self._last_ack2_number = -1

    # --- sending -------------------------------------------------------------------------

    def window(self) -> int:
        """Packets that may be outstanding: min(peer's window, congestion window)."""
        window = int(self.cc.congestion_window)
        peer = self.peer_window
        return window if window < peer else peer

    def emit(self, now: float) -> None:
        """Queue the data packets pacing allows by ``now``."""
        sender = self.sender
        was_idle = sender.next_seq == sender.last_ack
        sent = sender.packets_sent
        sender.emit(
            self.out,
            now=now,
            timestamp=int((now - self._start) * _US) & 0xFFFFFFFF,
            destination=self.peer_socket_id,
            window=self.window(),
            congestion=self.cc,
        )
        if sender.packets_sent != sent:
            self._last_data_sent = now
        if was_idle and sender.next_seq != sender.last_ack:
            # Data starts flowing after a quiet spell: the EXP clock starts now.
            self._progress(now)

    def send_control(self, packet: ControlPacket) -> None:
        self.out.append(encode_packet(packet))

    # --- timers ----------------------------------------------------------------------------

    def deadline(self) -> float:
        """The earliest of the SYN tick (when needed), EXP, keep-alive and the pacing slot."""
        sender = self.sender
        deadline = self.last_sent + KEEPALIVE_INTERVAL
        if self.next_syn < deadline and self.receiver.needs_tick():
            deadline = self.next_syn
        if sender.next_seq != sender.last_ack:
            deadline = min(deadline, self._exp_deadline())
            if self._tail_probe_armed():
                deadline = min(deadline, self._tail_probe_deadline())
        if sender.slot < deadline and sender.wants_to_send(self.window()):
            deadline = sender.slot
        return deadline

    def tick(self, now: float) -> None:
        """Run the SYN tick, EXP and keep-alive if due."""
        sender = self.sender
        if now >= self.next_syn:
            if self.receiver.needs_tick():
                self._syn_tick(now)
            self.cc.on_ack_timer(now=now)
            self.next_syn = now + SYN_INTERVAL
        if self._tail_probe_armed() and now >= self._tail_probe_deadline():
            # Nothing new to send, nothing known lost, and no answer for the last
            # packets: resend the last one (RFC 8985's tail loss probe). If it arrives
            # after a lost tail, the receiver sees the gap and NAKs it at once; if only
            # it was lost, it completes the stream. Not a loss for the congestion
            # control; once per progress, then EXP as before.
            self._probed = True
            self.counters.tail_probes += 1
            last = sender.next_seq - 1
            sender.loss.insert(last, last)
        if sender.next_seq != sender.last_ack and now >= self._exp_deadline():
            # core.cpp checkTimers: resend everything unacknowledged (unless losses are
            # queued already), tell the congestion control, back off.
            self.counters.timeouts += 1
            self.counters.losses_reported += sender.timeout()
            # As for a NAK (on_nak): in slow start, before any ACK brought a receive
            # rate, 4.11 would leave slow start at its 16 packets/s placeholder. That is
            # the common case after a rendezvous with libudt, which drops the packets
            # that arrive before its handshake completes: the whole first window is
            # lost, nothing comes back, and only EXP notices.
            if self._rate_known or not self.cc.in_slow_start:
                self.cc.on_timeout(now=now)
            self._exp_count += 1
            self._exp_base = now
        if now >= self.last_sent + KEEPALIVE_INTERVAL:
            self.send_control(KeepAlive(destination_socket_id=self.peer_socket_id))
            self.counters.keepalives_sent += 1
            self.last_sent = now

    def send_ack(self, now: float) -> None:
        """A full ACK now, if the receiver has news (``sendCtrl(2)``).

        4.11 repeats an unconfirmed ACK after RTT + 4 RTTVar, 300 ms with the starting
        placeholders. Until the first ACK2 has measured the RTT it is repeated every SYN
        instead: a libudt caller drops what arrives just after its connect() returns,
        often the first ACK, and would otherwise stall 300 ms with a full window.
        """
        self.receiver.full_ack(
            now,
            self.rtt_us / _US,
            self.rtt_var_us / _US,
            repeat_after=None if self._rtt_measured else SYN_INTERVAL,
        )

    def _syn_tick(self, now: float) -> None:
        receiver = self.receiver
        self.send_ack(now)
        if receiver.loss:
            # sendCtrl(3): wait long enough for the retransmission, not much longer.
            interval = (self.rtt_us + 4 * self.rtt_var_us) / _US
            speed = receiver.receive_rate()
            if speed > 0:
                interval += len(receiver.loss) / speed
            receiver.periodic_nak(now, max(interval, MIN_NAK_INTERVAL))

    def _tail_probe_armed(self) -> bool:
        sender = self.sender
        return (
            not self._probed
            and sender.next_seq != sender.last_ack
            and not sender.loss
            and not sender.pending_packets
        )

    def _tail_probe_deadline(self) -> float:
        """The last data packet + the peer's RTT + 4 RTTVar + 2 SYN: the receiver ACKs on
        its SYN tick (a short last packet at once) and repeats a lost ACK after its
        RTT + 4 RTTVar. Before the peer has reported a measured RTT, 1 s (RFC 8985's
        PTO without an RTT sample): EXP comes first."""
        if self._peer_rto_us < 0:
            return self._last_data_sent + 1.0
        return self._last_data_sent + self._peer_rto_us / _US + 2 * SYN_INTERVAL

    def _exp_deadline(self) -> float:
        count = self._exp_count
        interval = (count * (self.rtt_us + 4 * self.rtt_var_us) + _SYN_US) / _US
        floor = count * MIN_EXP_INTERVAL
        return self._exp_base + (interval if interval > floor else floor)

    def _progress(self, now: float) -> None:
        """The peer acknowledged or reported something: the EXP timer starts over."""
        self._exp_base = now
        self._exp_count = 1
        self._probed = False

    # --- the peer's control packets -----------------------------------------------------------

    def on_ack(self, packet: Ack, now: float) -> None:
        sender = self.sender
        counters = self.counters
        # core.cpp processCtrl: ACK2 for the ACK, at most one per SYN (or for a repeat).
        number = packet.ack_number
        if now - self._last_ack2_time > SYN_INTERVAL or number == self._last_ack2_number:
            self.send_control(Ack2(destination_socket_id=self.peer_socket_id, ack_number=number))
            counters.ack2s_sent += 1
            self._last_ack2_time = now
            self._last_ack2_number = number
        seq = unwrap(packet.sequence_number, sender.last_ack)
        freed = sender.acknowledge(packet.sequence_number)
        if freed < 0:
            counters.invalid += 1  # 4.11: "this should not happen: attack or bug"
            return
        counters.acks_received += 1
        if seq >= sender.last_ack:
            # "Update Flow Window Size, must update before and together with m_iSndLastAck"
            self.peer_window = packet.available_buffer
        if freed:
            self._progress(now)
        if seq <= sender.last_data_ack:
            return  # a repeated ACK: nothing for the congestion control
        sender.last_data_ack = seq
        self._take_reported_rtt(packet.rtt, packet.rtt_variance)
        # 4.11 averages every positive sample into placeholders (16 and 1 packets/s), so
        # its link capacity needs a dozen ACKs to come within half of a measured value;
        # here the first sample replaces the placeholder, the rest are averaged as 4.11 does.
        rate = packet.receive_rate
        if rate is not None and 0 < rate <= _INT32_MAX:
            if self._rate_known:
                self.receive_rate = (self.receive_rate * 7 + rate) >> 3
            else:
                self.receive_rate = rate
                self._rate_known = True
        capacity = packet.link_capacity
        if capacity is not None and 0 < capacity <= _INT32_MAX:
            if self._capacity_known:
                self.link_capacity = (self.link_capacity * 7 + capacity) >> 3
            else:
                self.link_capacity = capacity
                self._capacity_known = True
        self.cc.on_ack(
            sequence_number=packet.sequence_number,
            rtt=self.rtt_us / _US,
            rtt_variance=self.rtt_var_us / _US,
            receive_rate=self.receive_rate,
            link_capacity=self.link_capacity,
            now=now,
        )

    def on_light_ack(self, packet: LightAck, now: float) -> None:
        freed = self.sender.acknowledge(packet.sequence_number)
        if freed < 0:
            self.counters.invalid += 1
            return
        self.counters.acks_received += 1
        if freed:
            # processCtrl: a light ACK shrinks the window by what it acknowledges.
            self.peer_window -= freed
            self._progress(now)

    def on_nak(self, packet: Nak, now: float) -> None:
        cc = self.cc
        accepted = self.sender.add_losses(packet.losses)
        if not accepted:
            self.counters.invalid += 1  # nothing in it was in flight
            return
        self.counters.naks_received += 1
        self.counters.losses_reported += sum(last - first + 1 for first, last in accepted)
        self._progress(now)
        # Only losses beyond every loss reported before are news for the congestion
        # control: 4.11 sends a NAK only when it finds a gap, and relies on EXP for lost
        # retransmissions; our receiver also repeats its loss list (periodic NAK), and
        # those repeats must not count as fresh congestion.
        frontier = accepted[-1][1]
        if frontier <= self._loss_frontier:
            return
        self._loss_frontier = frontier
        # 4.11 leaves slow start on the first NAK with its receive-rate estimate, which
        # before the first ACK carrying a rate is the placeholder 16 packets/s: one loss
        # in the first round trip then pins the rate there (the crawl after a rendezvous
        # connect). A loss before any rate is known is retransmitted but not acted on.
        if self._rate_known or not cc.in_slow_start:
            cc.on_loss(
                losses=[(first & SEQ_MAX, last & SEQ_MAX) for first, last in accepted], now=now
            )

    def on_ack2(self, packet: Ack2, now: float) -> None:
        sample = self.receiver.on_ack2(packet.ack_number, now)
        if sample is None:
            self.counters.invalid += 1
            return
        self.counters.ack2s_received += 1
        rtt_us = min(max(round(sample * _US), 0), _MAX_RTT_US)
        if self._rtt_measured:
            self._fold_rtt(rtt_us)
        else:
            # The first measurement replaces the placeholders (RFC 6298: RTT = R,
            # RTTVar = R/2), as the first receive rate and capacity do. 4.11 folds it
            # into 100 ms / 50 ms, 1/8 per ACK2, and ACK2s are few while a hole holds
            # the ACK number still: on loopback the periodic NAK then waited 50-350 ms
            # for the first second, and the ACKs told the sender as much.
            self.rtt_us = rtt_us
            self.rtt_var_us = rtt_us >> 1
        self._rtt_measured = True

    def _take_reported_rtt(self, rtt_us: int, variance_us: int) -> None:
        """An ACK's RTT: the receiver's estimate, all a sender with no ACK2s of its own has."""
        reported = min(rtt_us, _MAX_RTT_US)
        variance = min(variance_us, _MAX_RTT_US)
        if reported == _INITIAL_RTT_US:  # the peer has not measured the path yet
            self._fold_rtt(reported)
            return
        if self._peer_rto_us < 0 and not self._rtt_measured and reported < self.rtt_us:
            # The peer's first measurement, if shorter, replaces the placeholders, as our
            # own first ACK2 sample does. Folded in at 1/8 per ACK (one a SYN while a hole
            # holds the ACK number), 100 ms took half a second to come down to a 0.2 ms
            # path, and EXP waited on it: a lost tail at 5 % loss cost 20-40 ms on
            # loopback. A longer one is folded in: a peer cannot stretch EXP at once.
            self.rtt_us, self.rtt_var_us = reported, variance
        else:
            self._fold_rtt(reported)
        self._peer_rto_us = reported + 4 * variance

    def _fold_rtt(self, rtt_us: int) -> None:
        # core.cpp: RTTVar = (3 RTTVar + |rtt - RTT|) / 4, RTT = (7 RTT + rtt) / 8.
        self.rtt_var_us = (self.rtt_var_us * 3 + abs(rtt_us - self.rtt_us)) >> 2
        self.rtt_us = (self.rtt_us * 7 + rtt_us) >> 3

    # --- bookkeeping -------------------------------------------------------------------------

    def sync_counters(self) -> None:
        """Copy the sender's and receiver's tallies into ``counters``."""
        counters = self.counters
        sender = self.sender
        counters.packets_sent = sender.packets_sent
        counters.bytes_sent = sender.bytes_sent
        counters.packets_retransmitted = sender.packets_retransmitted
        counters.drop_requests_sent = sender.drop_requests_sent
        receiver = self.receiver
        counters.packets_received = receiver.packets_received
        counters.bytes_received = receiver.bytes_received
        counters.packets_duplicate = receiver.duplicates
        counters.packets_out_of_window = receiver.out_of_window
        counters.packets_lost = receiver.lost
        counters.naks_sent = receiver.naks_sent
        counters.acks_sent = receiver.acks_sent
        counters.light_acks_sent = receiver.light_acks_sent
        counters.packets_discarded = receiver.discarded


def _cap_period(max_bandwidth: int | None, mss: int) -> float:
    """Seconds per packet at ``max_bandwidth`` (0.0: no cap). As 4.11 (``CCUpdate``) a
    packet counts as a whole MSS; stretched by 16/15 because every 16th packet's
    successor goes at once (the probing pair), so 16 packets take 15 periods."""
    if max_bandwidth is None:
        return 0.0
    return mss / max_bandwidth * 16.0 / 15.0
