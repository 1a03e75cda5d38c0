"""A UDT4 connection: handshake, then a reliable, paced byte stream (UDT 4.11 core.cpp ``CUDT``).

This module owns one connection's life: it runs the handshake (``handshake.py``),
then composes the sender (``sender.py``), the receiver (``receiver.py``) and the
congestion control (``congestion.py``) with the timers that drive them (ACK every
SYN, periodic NAK, EXP with keep-alive, idle timeout, linger), the RTT estimate
and the events the application reads. It does not know sockets, clocks or the
other connections of its UDP socket (the multiplexer's), and draws no randomness
of its own. Every state change is in ``_TRANSITIONS``; docs/protocol.md §4.8
describes the behaviour and where it departs from 4.11.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Sequence

from ..addresses import Endpoint
from ..errors import LocalProtocolError
from .congestion import SYN_INTERVAL, CongestionControl, UdtNativeCongestion
from .connection_types import (
    CloseReason,
    ConnectionClosed,
    ConnectionEstablished,
    ConnectionState,
    DataReceived,
    UdtConfig,
    UdtConnectionCounters,
    UdtEvent,
    payload_size,
)
from .handshake import HandshakeEstablished, HandshakeFailed, HandshakeRole, UdtHandshake
from .listener import AcceptedHandshake
from .packet_types import (
    Ack,
    Ack2,
    ControlPacket,
    ControlType,
    Handshake,
    KeepAlive,
    LightAck,
    MessageDropRequest,
    Nak,
    Shutdown,
    SocketType,
    UdtDecodeError,
)
from .packets import decode_packet, encode_packet
from .receiver import UdtReceiver
from .sender import UdtSender, unwrap
from .seqnum import SEQ_MAX

__all__ = [
    "HOLD_LIMIT",
    "KEEPALIVE_INTERVAL",
    "MAX_RTT",
    "MIN_EXP_INTERVAL",
    "MIN_NAK_INTERVAL",
    "UdtConnection",
]

#: Seconds without sending anything after which a keep-alive goes. 4.11 sends one
#: when its EXP timer fires with nothing to resend (every 0.3 s or more); one a
#: second keeps any idle timeout above a few seconds from firing, for less traffic.
KEEPALIVE_INTERVAL = 1.0
#: Floor of the EXP interval per expiration (core.cpp ``m_ullMinExpInt``, 300 ms).
MIN_EXP_INTERVAL = 0.3
#: Floor of the periodic NAK interval. 4.11 commented its NAK timer out ("rely on the
#: sender's EXP"); the draft keeps it. A lost retransmission then costs
#: max(RTT + 4 RTTVar, 20 ms), not the sender's EXP interval (300 ms or more).
MIN_NAK_INTERVAL = 0.02
#: Datagrams kept while the handshake is still finishing (a peer that completed
#: first and started sending); replayed once established, in order.
HOLD_LIMIT = 64
#: An RTT sample (or an ACK's RTT field) counts as at most this many seconds, so a
#: hostile ACK cannot push the EXP timer into next year.
MAX_RTT = 10.0
#: A closed connection answers its peer's packets with Shutdown at most this often.
_SHUTDOWN_REPLY_INTERVAL = 1.0

_HEADER = struct.Struct("!IIII")
_CONTROL = 0x80000000
_US = 1_000_000
_MAX_RTT_US = int(MAX_RTT * _US)
_INITIAL_RTT_US = 100_000  # CUDT::open: m_iRTT = 10 * m_iSYNInterval
_INITIAL_RTT_VAR_US = 50_000  # m_iRTTVar = m_iRTT >> 1
_INITIAL_RECEIVE_RATE = 16  # m_iDeliveryRate
_INITIAL_LINK_CAPACITY = 1  # m_iBandwidth
_INT32_MAX = 0x7FFFFFFF

_S = ConnectionState
# (state, input) -> next state: every change of ``ConnectionState``; anything else
# is ignored (and counted where it came from the peer).
_TRANSITIONS: dict[tuple[ConnectionState, str], ConnectionState] = {
    (_S.CONNECTING, "established"): _S.CONNECTED,
    (_S.CONNECTING, "handshake failed"): _S.CLOSED,
    (_S.CONNECTING, "close"): _S.CLOSED,
    (_S.CONNECTING, "abort"): _S.CLOSED,
    (_S.CONNECTED, "close"): _S.CLOSING,
    (_S.CONNECTED, "abort"): _S.CLOSED,
    (_S.CONNECTED, "peer shutdown"): _S.CLOSED,
    (_S.CONNECTED, "idle timeout"): _S.CLOSED,
    (_S.CLOSING, "all acknowledged"): _S.CLOSED,
    (_S.CLOSING, "linger expired"): _S.CLOSED,
    (_S.CLOSING, "abort"): _S.CLOSED,
    (_S.CLOSING, "peer shutdown"): _S.CLOSED,
    (_S.CLOSING, "idle timeout"): _S.CLOSED,
}


class UdtConnection:
    """One UDT connection, from the handshake to ``ConnectionClosed``.

    Drive it like every wavesync machine: ``receive_datagram`` for each datagram,
    ``handle_timer(now)`` at ``get_timer()``, ``datagrams_to_send(now)`` after any
    call, ``next_event()`` until None. ``send()`` buffers bytes (already while
    connecting); they go out paced by the congestion control.
    """

    def __init__(
        self,
        *,
        socket_id: int,
        now: float,
        random: Callable[[], float],
        config: UdtConfig,
        handshake: UdtHandshake | None,
        established: HandshakeEstablished | None,
    ) -> None:
        self._socket_id = socket_id
        self._config = config
        self._random = random
        self._state = ConnectionState.CONNECTING
        self._counters = UdtConnectionCounters()
        self._handshake = handshake
        self._peer_socket_id: int | None = None
        self._peer_address: Endpoint | None = None
        self._events: deque[tuple[UdtEvent, int]] = deque()
        # Control and data packets for the peer, encoded; paired with the address on the way out.
        self._outbox: list[bytes] = []
        # Datagrams with their own destination (the handshake's; a Shutdown after closing).
        self._extra: list[tuple[bytes, Endpoint]] = []
        self._held: list[tuple[bytes, Endpoint]] = []
        self._early: list[bytes] = []
        self._early_bytes = 0
        self._sender: UdtSender | None = None
        self._receiver: UdtReceiver | None = None
        self._cc: CongestionControl | None = None
        self._message_mode = config.socket_type is SocketType.DGRAM
        # Estimates (integer µs, as 4.11 keeps them) and the peer's window.
        self._rtt_us = _INITIAL_RTT_US
        self._rtt_var_us = _INITIAL_RTT_VAR_US
        self._receive_rate = _INITIAL_RECEIVE_RATE
        self._link_capacity = _INITIAL_LINK_CAPACITY
        self._rate_known = False
        self._capacity_known = False
        self._loss_frontier = -1
        self._peer_window = 0
        # Timers.
        self._now = now
        self._start = now
        self._last_heard = now
        self._last_sent = now
        self._next_syn = now
        self._exp_base = now
        self._exp_count = 1
        self._linger_deadline = float("inf")
        self._last_ack2_time = float("-inf")
        self._last_ack2_number = -1
        self._last_shutdown_reply = float("-inf")
        # A keep-alive addressed to us: what we show the handshake when the peer's
        # traffic proves it is connected (4.11 accepts data/keep-alive as that proof).
        self._proof = encode_packet(KeepAlive(destination_socket_id=socket_id))
        if established is not None:
            self._establish(established, now)

    # --- constructors --------------------------------------------------------------------

    @classmethod
    def connect(
        cls,
        peer: Endpoint,
        *,
        socket_id: int,
        isn: int,
        now: float,
        random: Callable[[], float],
        config: UdtConfig = UdtConfig(),  # noqa: B008 - frozen, shared safely
    ) -> UdtConnection:
        """A regular connect to the listener at ``peer``."""
        handshake = UdtHandshake.caller(
            peer,
            socket_id=socket_id,
            isn=isn,
            now=now,
            mss=config.mss,
            flow_window=config.flow_window,
            socket_type=config.socket_type,
        )
        return cls(
            socket_id=socket_id,
            now=now,
            random=random,
            config=config,
            handshake=handshake,
            established=None,
        )

    @classmethod
    def rendezvous(
        cls,
        candidates: Sequence[Endpoint],
        *,
        socket_id: int,
        isn: int,
        now: float,
        random: Callable[[], float],
        config: UdtConfig = UdtConfig(),  # noqa: B008 - frozen, shared safely
    ) -> UdtConnection:
        """A rendezvous connect toward every address in ``candidates``; the first heard wins."""
        handshake = UdtHandshake.rendezvous(
            candidates,
            socket_id=socket_id,
            isn=isn,
            now=now,
            mss=config.mss,
            flow_window=config.flow_window,
            socket_type=config.socket_type,
        )
        return cls(
            socket_id=socket_id,
            now=now,
            random=random,
            config=config,
            handshake=handshake,
            established=None,
        )

    @classmethod
    def accepted(
        cls,
        accepted: AcceptedHandshake,
        *,
        now: float,
        random: Callable[[], float],
        config: UdtConfig = UdtConfig(),  # noqa: B008 - frozen, shared safely
    ) -> UdtConnection:
        """The server side of a regular connect, from ``UdtListener.accept``.

        The connection is established at once (``ConnectionEstablished`` is its first
        event). It does not send ``accepted.response``: the multiplexer does, and again
        for every duplicate request.
        """
        return cls(
            socket_id=accepted.established.local_socket_id,
            now=now,
            random=random,
            config=config,
            handshake=None,
            established=accepted.established,
        )

    # --- queries ---------------------------------------------------------------------------

    @property
    def socket_id(self) -> int:
        return self._socket_id

    @property
    def peer_socket_id(self) -> int | None:
        return self._peer_socket_id

    @property
    def peer_address(self) -> Endpoint | None:
        return self._peer_address

    @property
    def state(self) -> ConnectionState:
        return self._state

    @property
    def counters(self) -> UdtConnectionCounters:
        """What the connection did so far (the sender's and receiver's tallies folded in)."""
        counters = self._counters
        sender = self._sender
        if sender is not None:
            counters.packets_sent = sender.packets_sent
            counters.bytes_sent = sender.bytes_sent
            counters.packets_retransmitted = sender.packets_retransmitted
        receiver = self._receiver
        if receiver is not None:
            counters.packets_received = receiver.packets_received
            counters.bytes_received = receiver.bytes_received
            counters.packets_duplicate = receiver.duplicates
            counters.packets_out_of_window = receiver.out_of_window
            counters.packets_lost = receiver.lost
            counters.naks_sent = receiver.naks_sent
            counters.acks_sent = receiver.acks_sent
            counters.light_acks_sent = receiver.light_acks_sent
        return counters

    @property
    def config(self) -> UdtConfig:
        return self._config

    @property
    def send_space(self) -> int:
        """Bytes ``send()`` would accept now."""
        if self._state is ConnectionState.CONNECTING:
            return max(self._config.send_buffer_bytes - self._early_bytes, 0)
        if self._state is ConnectionState.CONNECTED and self._sender is not None:
            return self._sender.send_space
        return 0

    @property
    def rtt(self) -> float:
        """The smoothed round-trip time, seconds."""
        return self._rtt_us / _US

    @property
    def rtt_variance(self) -> float:
        return self._rtt_var_us / _US

    @property
    def congestion(self) -> CongestionControl | None:
        """The congestion control (None until established)."""
        return self._cc

    @property
    def send_buffer_bytes(self) -> int:
        """Bytes given to ``send()`` and not yet acknowledged."""
        if self._sender is None:
            return self._early_bytes
        return self._sender.buffered_bytes

    @property
    def receive_buffer_packets(self) -> int:
        """Packets the receive side holds (out of order, ready, in untaken events)."""
        return 0 if self._receiver is None else self._receiver.occupied

    @property
    def sender(self) -> UdtSender | None:
        return self._sender

    @property
    def receiver(self) -> UdtReceiver | None:
        return self._receiver

    # --- the application's side ------------------------------------------------------------

    def send(self, data: bytes | bytearray | memoryview) -> int:
        """Buffer up to ``send_space`` bytes of ``data``; return how many were taken.

        DGRAM: ``data`` is one message, taken whole or not at all (0).
        """
        state = self._state
        if state is ConnectionState.CONNECTED:
            assert self._sender is not None
            return self._sender.write(data, whole=self._message_mode)
        if state is ConnectionState.CONNECTING:
            size = len(data)
            space = self._config.send_buffer_bytes - self._early_bytes
            if size == 0 or space <= 0 or (self._message_mode and size > space):
                return 0
            size = min(size, space)
            self._early.append(bytes(data[:size]))
            self._early_bytes += size
            return size
        raise LocalProtocolError(f"send() on a connection that is {state.value}")

    def next_event(self) -> UdtEvent | None:
        """The next event, or None. Data comes coalesced: one event per batch of packets."""
        if self._events:
            event, packets = self._events.popleft()
            if packets:
                assert self._receiver is not None
                self._receiver.undelivered_packets -= packets
                self._check_window_update()
            return event
        receiver = self._receiver
        if receiver is not None and receiver.ready_packets:
            self._flush_ready()
            event, packets = self._events.popleft()
            receiver.undelivered_packets -= packets
            self._check_window_update()
            return event
        return None

    def close(self, now: float) -> None:
        """Graceful close: no more ``send()``; once everything is acknowledged, Shutdown.

        Waits at most ``config.linger``. Closing a connection that is still connecting
        ends it at once.
        """
        self._now = now
        state = self._state
        if state is ConnectionState.CONNECTING:
            self._finish("close", CloseReason.LOCAL_CLOSE, "closed before the handshake finished")
        elif state is ConnectionState.CONNECTED:
            self._state = _TRANSITIONS[state, "close"]
            self._linger_deadline = now + self._config.linger
            self._maybe_closed(now)

    def abort(self, now: float) -> None:
        """Shutdown now, drop both buffers, ``ConnectionClosed(ABORTED)``."""
        self._now = now
        if self._state is ConnectionState.CLOSED:
            return
        if self._state is not ConnectionState.CONNECTING:
            self._send_shutdown()
        if self._receiver is not None:
            self._receiver.clear()
        self._finish("abort", CloseReason.ABORTED, "aborted")

    # --- datagrams ---------------------------------------------------------------------------

    def receive_datagram(self, data: bytes, addr: Endpoint, now: float) -> None:
        """Take one datagram from ``addr``. Never raises on what the peer sends."""
        self._now = now
        state = self._state
        if state is ConnectionState.CONNECTED or state is ConnectionState.CLOSING:
            if addr != self._peer_address:
                self._counters.wrong_source += 1
                return
            if len(data) < 16:
                self._counters.malformed += 1
                return
            word0, word1, _, destination = _HEADER.unpack_from(data)
            if destination != self._socket_id:
                self._stray(data, addr, now, word0, destination)
                return
            self._last_heard = now
            if not word0 & _CONTROL:
                receiver = self._receiver
                assert receiver is not None
                receiver.on_data(data, word0, word1, now)
                if receiver.ack_now:
                    self._send_ack(now)
                return
            self._receive_control(data, addr, now)
        elif state is ConnectionState.CONNECTING:
            self._receive_connecting(data, addr, now)
        else:
            self._receive_closed(data, addr, now)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Endpoint]]:
        """Everything due by ``now``: control packets, then the data pacing allows."""
        self._now = now
        out = self._extra
        self._extra = []
        handshake = self._handshake
        if handshake is not None:
            out.extend(handshake.datagrams_to_send(now))
        state = self._state
        outbox = self._outbox
        if state is ConnectionState.CONNECTED or state is ConnectionState.CLOSING:
            sender = self._sender
            cc = self._cc
            assert sender is not None
            assert cc is not None
            assert self._peer_socket_id is not None
            if sender.loss or sender.pending_packets:
                was_idle = sender.next_seq == sender.last_ack
                sender.emit(
                    outbox,
                    now=now,
                    timestamp=int((now - self._start) * _US) & 0xFFFFFFFF,
                    destination=self._peer_socket_id,
                    window=self._window(cc),
                    congestion=cc,
                )
                if was_idle and sender.next_seq != sender.last_ack:
                    self._exp_base = now
                    self._exp_count = 1
        if outbox:
            peer = self._peer_address
            assert peer is not None
            out += [(datagram, peer) for datagram in outbox]
            outbox.clear()  # the receiver appends to this very list
            self._last_sent = now
        return out

    def get_timer(self) -> float | None:
        """The next moment ``handle_timer`` (or pacing in ``datagrams_to_send``) has work."""
        state = self._state
        if state is ConnectionState.CONNECTING:
            assert self._handshake is not None
            return self._handshake.get_timer()
        if state is ConnectionState.CLOSED:
            return None
        sender = self._sender
        receiver = self._receiver
        cc = self._cc
        assert sender is not None
        assert receiver is not None
        assert cc is not None
        deadline = self._last_heard + self._config.idle_timeout
        keepalive = self._last_sent + KEEPALIVE_INTERVAL
        deadline = min(deadline, keepalive)
        deadline = min(deadline, self._linger_deadline)
        if self._next_syn < deadline and receiver.needs_tick():
            deadline = self._next_syn
        if sender.next_seq != sender.last_ack:
            expiry = self._exp_deadline()
            deadline = min(deadline, expiry)
        if sender.slot < deadline and sender.wants_to_send(self._window(cc)):
            deadline = sender.slot
        return deadline

    def handle_timer(self, now: float) -> None:
        """Run whatever is due at ``now``: ACK/NAK tick, EXP, keep-alive, idle and linger."""
        self._now = now
        state = self._state
        if state is ConnectionState.CONNECTING:
            assert self._handshake is not None
            self._handshake.handle_timer(now)
            self._poll_handshake(now)
            return
        if state is ConnectionState.CLOSED:
            return
        sender = self._sender
        receiver = self._receiver
        cc = self._cc
        assert sender is not None
        assert receiver is not None
        assert cc is not None
        if now >= self._last_heard + self._config.idle_timeout:
            self._finish(
                "idle timeout",
                CloseReason.TIMEOUT,
                f"nothing heard from the peer for {self._config.idle_timeout:g} s",
            )
            return
        if now >= self._linger_deadline:
            unacked = sender.buffered_bytes
            self._send_shutdown()
            self._finish(
                "linger expired",
                CloseReason.LOCAL_CLOSE,
                f"linger of {self._config.linger:g} s expired with {unacked} bytes unacknowledged",
            )
            return
        if now >= self._next_syn:
            if receiver.needs_tick():
                self._syn_tick(now)
            cc.on_ack_timer(now=now)
            self._next_syn = now + SYN_INTERVAL
        if sender.next_seq != sender.last_ack and now >= self._exp_deadline():
            # core.cpp checkTimers: resend everything unacknowledged (unless losses are
            # queued already), tell the congestion control, back off.
            self._counters.timeouts += 1
            self._counters.losses_reported += sender.timeout()
            cc.on_timeout(now=now)
            self._exp_count += 1
            self._exp_base = now
        if now >= self._last_sent + KEEPALIVE_INTERVAL:
            self._send_control(KeepAlive(destination_socket_id=self._peer_id()))
            self._counters.keepalives_sent += 1
            self._last_sent = now

    # --- internals: the handshake ----------------------------------------------------------

    def _receive_connecting(self, data: bytes, addr: Endpoint, now: float) -> None:
        handshake = self._handshake
        assert handshake is not None
        if len(data) < 16:
            self._counters.malformed += 1
            return
        word0, _, _, destination = _HEADER.unpack_from(data)
        if word0 & _CONTROL and (word0 >> 16) & 0x7FFF == ControlType.HANDSHAKE:
            handshake.receive_datagram(data, addr, now)
            self._poll_handshake(now)
            return
        if destination != self._socket_id:
            self._counters.wrong_destination += 1
            return
        # Any packet of the connection, addressed to us, proves the peer connected (4.11
        # takes data and keep-alives as proof; we take any packet). The handshake
        # checks that it comes from the peer and that the peer's handshake was seen.
        handshake.receive_datagram(self._proof, addr, now)
        self._poll_handshake(now)
        if self._state is ConnectionState.CONNECTING:
            if len(self._held) < HOLD_LIMIT:
                self._held.append((data, addr))
                self._counters.held += 1
            return
        if self._state is not ConnectionState.CLOSED:
            self.receive_datagram(data, addr, now)

    def _poll_handshake(self, now: float) -> None:
        handshake = self._handshake
        assert handshake is not None
        event = handshake.next_event()
        if isinstance(event, HandshakeEstablished):
            if handshake.role is HandshakeRole.CALLER:
                # A caller never answers late handshakes; a rendezvous peer does (-2).
                self._extra.extend(handshake.datagrams_to_send(now))
                self._handshake = None
            self._establish(event, now)
        elif isinstance(event, HandshakeFailed):
            self._handshake = None
            self._finish(
                "handshake failed",
                CloseReason.HANDSHAKE_FAILED,
                f"{event.reason.value}: {event.detail}",
            )

    def _establish(self, established: HandshakeEstablished, now: float) -> None:
        config = self._config
        self._state = _TRANSITIONS[self._state, "established"]
        self._peer_socket_id = established.peer_socket_id
        self._peer_address = established.peer_address
        self._peer_window = established.flow_window
        self._sender = UdtSender(
            isn=established.local_isn,
            payload_size=payload_size(established.mss),
            capacity_bytes=config.send_buffer_bytes,
        )
        self._sender.slot = now
        self._receiver = UdtReceiver(
            isn=established.peer_isn,
            capacity_packets=config.receive_buffer_packets,
            payload_size=payload_size(established.mss),
            peer_socket_id=established.peer_socket_id,
            message_mode=self._message_mode,
            out=self._outbox,
            now=now,
        )
        factory = config.congestion or UdtNativeCongestion
        self._cc = factory(
            initial_sequence_number=established.local_isn,
            max_flow_window=max(min(established.flow_window, 1 << 20), 2),
            random=self._random,
            now=now,
            mss=established.mss,
        )
        self._start = now
        self._last_heard = now
        self._last_sent = now
        self._next_syn = now
        self._exp_base = now
        self._events.append(
            (
                ConnectionEstablished(
                    peer_address=established.peer_address,
                    peer_socket_id=established.peer_socket_id,
                ),
                0,
            )
        )
        for chunk in self._early:
            self._sender.write(chunk, whole=self._message_mode)
        self._early = []
        self._early_bytes = 0
        held, self._held = self._held, []
        for data, addr in held:
            self.receive_datagram(data, addr, now)

    # --- internals: control packets ----------------------------------------------------------

    def _receive_control(self, data: bytes, addr: Endpoint, now: float) -> None:
        try:
            packet = decode_packet(data)
        except UdtDecodeError:
            self._counters.malformed += 1
            return
        if isinstance(packet, Ack):
            self._on_ack(packet, now)
        elif isinstance(packet, LightAck):
            self._on_light_ack(packet, now)
        elif isinstance(packet, Nak):
            self._on_nak(packet, now)
        elif isinstance(packet, Ack2):
            self._on_ack2(packet, now)
        elif isinstance(packet, KeepAlive):
            pass  # "the only purpose of keep-alive packet is to tell that the peer is still alive"
        elif isinstance(packet, Shutdown):
            self._finish("peer shutdown", CloseReason.PEER_CLOSED, "the peer sent Shutdown")
        elif isinstance(packet, Handshake):
            if self._handshake is not None:
                self._handshake.receive_datagram(data, addr, now)
            else:
                self._counters.invalid += 1
        elif isinstance(packet, MessageDropRequest):
            # We never send one (no message time-to-live yet); a byte stream cannot skip
            # bytes, and honouring one in message mode is not implemented: ignored.
            self._counters.drop_requests_received += 1
        else:
            self._counters.invalid += 1  # congestion warning, error signal, user-defined

    def _stray(self, data: bytes, addr: Endpoint, now: float, word0: int, destination: int) -> None:
        # A rendezvous peer's late handshake may still carry destination 0; answer it (-2).
        if (
            destination == 0
            and self._handshake is not None
            and word0 & _CONTROL
            and (word0 >> 16) & 0x7FFF == ControlType.HANDSHAKE
        ):
            self._last_heard = now
            self._handshake.receive_datagram(data, addr, now)
            return
        self._counters.wrong_destination += 1

    def _on_ack(self, packet: Ack, now: float) -> None:
        sender = self._sender
        cc = self._cc
        assert sender is not None
        assert cc is not None
        # core.cpp processCtrl: ACK2 for the ACK, at most one per SYN (or for a repeat).
        number = packet.ack_number
        if now - self._last_ack2_time > SYN_INTERVAL or number == self._last_ack2_number:
            self._send_control(Ack2(destination_socket_id=self._peer_id(), ack_number=number))
            self._counters.ack2s_sent += 1
            self._last_ack2_time = now
            self._last_ack2_number = number
        seq = unwrap(packet.sequence_number, sender.last_ack)
        freed = sender.acknowledge(packet.sequence_number)
        if freed < 0:
            self._counters.invalid += 1  # 4.11: "this should not happen: attack or bug"
            return
        self._counters.acks_received += 1
        if seq >= sender.last_ack:
            # "Update Flow Window Size, must update before and together with m_iSndLastAck"
            self._peer_window = packet.available_buffer
        if freed:
            self._progress(now)
        if seq <= sender.last_data_ack:
            return  # a repeated ACK: nothing for the congestion control
        sender.last_data_ack = seq
        rtt = min(packet.rtt, _MAX_RTT_US)
        self._rtt_var_us = (self._rtt_var_us * 3 + abs(rtt - self._rtt_us)) >> 2
        self._rtt_us = (self._rtt_us * 7 + rtt) >> 3
        # 4.11 averages every positive sample into placeholders (16 and 1 packets/s), so
        # its link capacity needs a dozen ACKs to come within half of a measured value;
        # here the first sample replaces the placeholder, the rest are averaged as 4.11 does.
        rate = packet.receive_rate
        if rate is not None and 0 < rate <= _INT32_MAX:
            if self._rate_known:
                self._receive_rate = (self._receive_rate * 7 + rate) >> 3
            else:
                self._receive_rate = rate
                self._rate_known = True
        capacity = packet.link_capacity
        if capacity is not None and 0 < capacity <= _INT32_MAX:
            if self._capacity_known:
                self._link_capacity = (self._link_capacity * 7 + capacity) >> 3
            else:
                self._link_capacity = capacity
                self._capacity_known = True
        cc.on_ack(
            sequence_number=packet.sequence_number,
            rtt=self._rtt_us / _US,
            rtt_variance=self._rtt_var_us / _US,
            receive_rate=self._receive_rate,
            link_capacity=self._link_capacity,
            now=now,
        )
        self._maybe_closed(now)

    def _on_light_ack(self, packet: LightAck, now: float) -> None:
        sender = self._sender
        assert sender is not None
        freed = sender.acknowledge(packet.sequence_number)
        if freed < 0:
            self._counters.invalid += 1
            return
        self._counters.acks_received += 1
        if freed:
            # processCtrl: a light ACK shrinks the window by what it acknowledges.
            self._peer_window -= freed
            self._progress(now)
            self._maybe_closed(now)

    def _on_nak(self, packet: Nak, now: float) -> None:
        sender = self._sender
        cc = self._cc
        assert sender is not None
        assert cc is not None
        accepted = sender.add_losses(packet.losses)
        if not accepted:
            self._counters.invalid += 1  # nothing in it was in flight
            return
        self._counters.naks_received += 1
        self._counters.losses_reported += sum(last - first + 1 for first, last in accepted)
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

    def _on_ack2(self, packet: Ack2, now: float) -> None:
        receiver = self._receiver
        assert receiver is not None
        sample = receiver.on_ack2(packet.ack_number, now)
        if sample is None:
            self._counters.invalid += 1
            return
        self._counters.ack2s_received += 1
        rtt = min(max(round(sample * _US), 0), _MAX_RTT_US)
        self._rtt_var_us = (self._rtt_var_us * 3 + abs(rtt - self._rtt_us)) >> 2
        self._rtt_us = (self._rtt_us * 7 + rtt) >> 3

    def _receive_closed(self, data: bytes, addr: Endpoint, now: float) -> None:
        # The peer still talks to a closed connection: its Shutdown was lost. Say it again.
        if (
            addr == self._peer_address
            and self._peer_socket_id is not None
            and len(data) >= 16
            and now - self._last_shutdown_reply >= _SHUTDOWN_REPLY_INTERVAL
        ):
            word0, _, _, destination = _HEADER.unpack_from(data)
            shutdown = _CONTROL | ControlType.SHUTDOWN << 16
            if destination == self._socket_id and word0 & 0xFFFF0000 != shutdown:
                self._last_shutdown_reply = now
                self._send_shutdown()

    # --- internals: timers and helpers -------------------------------------------------------

    def _syn_tick(self, now: float) -> None:
        receiver = self._receiver
        assert receiver is not None
        self._send_ack(now)
        if receiver.loss:
            # sendCtrl(3): wait long enough for the retransmission, not much longer.
            interval = (self._rtt_us + 4 * self._rtt_var_us) / _US
            speed = receiver.receive_rate()
            if speed > 0:
                interval += len(receiver.loss) / speed
            receiver.periodic_nak(now, max(interval, MIN_NAK_INTERVAL))

    def _send_ack(self, now: float) -> None:
        receiver = self._receiver
        assert receiver is not None
        receiver.full_ack(now, self._rtt_us / _US, self._rtt_var_us / _US)

    def _exp_deadline(self) -> float:
        count = self._exp_count
        interval = (count * (self._rtt_us + 4 * self._rtt_var_us) + 10_000) / _US
        floor = count * MIN_EXP_INTERVAL
        return self._exp_base + (interval if interval > floor else floor)

    def _progress(self, now: float) -> None:
        """The peer acknowledged or reported something: the EXP timer starts over."""
        self._exp_base = now
        self._exp_count = 1

    def _window(self, cc: CongestionControl) -> int:
        window = int(cc.congestion_window)
        peer = self._peer_window
        return window if window < peer else peer

    def _peer_id(self) -> int:
        assert self._peer_socket_id is not None
        return self._peer_socket_id

    def _send_control(self, packet: ControlPacket) -> None:
        self._outbox.append(encode_packet(packet))

    def _send_shutdown(self) -> None:
        if self._peer_socket_id is None:
            return
        packet = encode_packet(Shutdown(destination_socket_id=self._peer_socket_id))
        if self._state is ConnectionState.CLOSED:
            assert self._peer_address is not None
            self._extra.append((packet, self._peer_address))
        else:
            self._outbox.append(packet)

    def _maybe_closed(self, now: float) -> None:
        sender = self._sender
        if self._state is ConnectionState.CLOSING and sender is not None and sender.is_idle():
            self._send_shutdown()
            self._finish("all acknowledged", CloseReason.LOCAL_CLOSE, "closed")

    def _check_window_update(self) -> None:
        receiver = self._receiver
        assert receiver is not None
        half = self._config.receive_buffer_packets // 2
        if receiver.last_available < half <= receiver.available:
            receiver.window_update = True

    def _flush_ready(self) -> None:
        receiver = self._receiver
        if receiver is None or not receiver.ready_packets:
            return
        chunks, packets = receiver.take_ready()
        receiver.undelivered_packets += packets
        if self._message_mode:
            last = len(chunks) - 1
            for index, message in enumerate(chunks):
                self._events.append(
                    (
                        DataReceived(data=message, message_complete=True),
                        packets if index == last else 0,
                    )
                )
        else:
            self._events.append((DataReceived(data=b"".join(chunks)), packets))

    def _finish(self, transition: str, reason: CloseReason, detail: str) -> None:
        self._state = _TRANSITIONS[self._state, transition]
        if reason is not CloseReason.ABORTED:
            self._flush_ready()
        if self._sender is not None:
            self._sender.clear()
        if self._receiver is not None:
            self._receiver.clear()
        self._early = []
        self._early_bytes = 0
        self._held = []
        self._handshake = None
        # Whatever control packets were queued (the Shutdown) still go out.
        if self._outbox and self._peer_address is not None:
            self._extra.extend((datagram, self._peer_address) for datagram in self._outbox)
        self._outbox.clear()
        self._events.append((ConnectionClosed(reason=reason, detail=detail), 0))
