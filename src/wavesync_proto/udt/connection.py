"""A UDT4 connection: handshake, then a reliable, paced byte stream (UDT 4.11 core.cpp ``CUDT``).

This module owns one connection's life: it starts in its connecting phase
(``connecting.py``, which drives the handshake of ``handshake.py``), hands the
established connection to its data-transfer phase (``transfer.py``: sender,
receiver, congestion control, ACK/NAK/EXP timers), routes the peer's datagrams,
and owns the states, the idle timeout, linger and closing (the Shutdown packets
are ``closing.py``'s; the events the application reads queue in ``event_queue.py``).
It does not know sockets, clocks or the other connections of its UDP socket (the
multiplexer's), and draws no randomness of its own. Every
state change is in ``_TRANSITIONS``; docs/protocol.md §4.8 describes the
behaviour and where it departs from 4.11.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence

from ..addresses import Endpoint
from ..errors import LocalProtocolError
from .closing import SHUTDOWN_COPIES, ShutdownNotice, peer_shutdown_reason
from .congestion import CongestionControl
from .connecting import HOLD_LIMIT, ConnectingHandover, UdtConnecting, start_handshake
from .connection_types import (
    CloseReason,
    ConnectionClosed,
    ConnectionEstablished,
    ConnectionState,
    UdtConfig,
    UdtConnectionCounters,
    UdtEvent,
)
from .event_queue import UdtEventQueue
from .handshake import HandshakeEstablished, HandshakeFailed, HandshakeRole, UdtHandshake
from .listener import AcceptedHandshake
from .packet_types import (
    Ack,
    Ack2,
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
from .packets import decode_packet
from .receiver import UdtReceiver
from .sender import UdtSender
from .transfer import (
    KEEPALIVE_INTERVAL,
    MAX_RTT,
    MIN_EXP_INTERVAL,
    MIN_NAK_INTERVAL,
    UdtTransfer,
)

__all__ = [
    "HOLD_LIMIT",
    "KEEPALIVE_INTERVAL",
    "MAX_RTT",
    "MIN_EXP_INTERVAL",
    "MIN_NAK_INTERVAL",
    "SHUTDOWN_COPIES",
    "UdtConnection",
]

_HEADER = struct.Struct("!IIII")
_CONTROL = 0x80000000
_HANDSHAKE_WORD = _CONTROL | ControlType.HANDSHAKE << 16
# HOLD_LIMIT (connecting.py's) and SHUTDOWN_COPIES (closing.py's) stay importable from here.

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
        # While connecting: the handshake's phase. After it, a rendezvous connection
        # keeps the handshake alone, to answer the peer's late requests (-2).
        self._connecting: UdtConnecting | None = None
        self._handshake = handshake
        if handshake is not None:
            self._connecting = UdtConnecting(
                handshake, socket_id=socket_id, config=config, counters=self._counters
            )
        self._transfer: UdtTransfer | None = None
        self._peer_socket_id: int | None = None
        self._peer_address: Endpoint | None = None
        self._message_mode = config.socket_type is SocketType.DGRAM
        self._events = UdtEventQueue(
            message_mode=self._message_mode,
            receive_buffer_packets=config.receive_buffer_packets,
        )
        # Datagrams with their own destination (the handshake's; a Shutdown after closing).
        self._extra: list[tuple[bytes, Endpoint]] = []
        # The -2 a rendezvous connection sends as it connects.
        self._answer: tuple[bytes, Endpoint] | None = None
        self._linger_deadline = float("inf")
        self._shutdown = ShutdownNotice(socket_id=socket_id)
        self._now = now  # the latest time given: where a message's time-to-live starts
        if established is not None:
            self._establish(ConnectingHandover(established=established), now)

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
        handshake = start_handshake(
            HandshakeRole.CALLER, [peer], socket_id=socket_id, isn=isn, now=now, config=config
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
        handshake = start_handshake(
            HandshakeRole.RENDEZVOUS,
            candidates,
            socket_id=socket_id,
            isn=isn,
            now=now,
            config=config,
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
        if self._transfer is not None:
            self._transfer.sync_counters()
        return self._counters

    @property
    def config(self) -> UdtConfig:
        return self._config

    @property
    def send_space(self) -> int:
        """Bytes ``send()`` would accept now."""
        if self._connecting is not None:
            return self._connecting.send_space
        if self._state is ConnectionState.CONNECTED and self._transfer is not None:
            return self._transfer.sender.send_space
        return 0

    @property
    def rtt(self) -> float:
        """The smoothed round-trip time, seconds (100 ms until measured)."""
        return 0.1 if self._transfer is None else self._transfer.rtt_us / 1e6

    @property
    def rtt_variance(self) -> float:
        return 0.05 if self._transfer is None else self._transfer.rtt_var_us / 1e6

    @property
    def congestion(self) -> CongestionControl | None:
        """The congestion control (None until established)."""
        return None if self._transfer is None else self._transfer.cc

    @property
    def send_buffer_bytes(self) -> int:
        """Bytes given to ``send()`` and not yet acknowledged."""
        if self._transfer is None:
            return 0 if self._connecting is None else self._connecting.buffered_bytes
        return self._transfer.sender.buffered_bytes

    @property
    def receive_buffer_packets(self) -> int:
        """Packets the receive side holds (out of order, ready, in untaken events)."""
        return 0 if self._transfer is None else self._transfer.receiver.occupied

    @property
    def sender(self) -> UdtSender | None:
        return None if self._transfer is None else self._transfer.sender

    @property
    def receiver(self) -> UdtReceiver | None:
        return None if self._transfer is None else self._transfer.receiver

    # --- the application's side ------------------------------------------------------------

    def send(
        self,
        data: bytes | bytearray | memoryview,
        *,
        ttl: float | None = None,
        in_order: bool | None = None,
    ) -> int:
        """Buffer up to ``send_space`` bytes of ``data``; return how many were taken.

        DGRAM: ``data`` is one message, taken whole or not at all (0). ``ttl`` (DGRAM
        only): seconds, from the last ``now`` the connection was given, after which a
        lost packet of the message is not resent; the peer is told to skip the message
        (4.11 ``sendmsg(..., ttl)``). ``in_order`` (DGRAM only; default True, where
        4.11's ``sendmsg`` has false, because callers rely on messages arriving in order):
        False lets the peer deliver the message once whole, before earlier incomplete ones.
        """
        state = self._state
        if not self._message_mode:
            if ttl is not None:
                raise LocalProtocolError("a time-to-live needs a DGRAM connection")
            if in_order is not None:
                raise LocalProtocolError("the in-order bit needs a DGRAM connection")
        ordered = in_order is not False and self._message_mode
        deadline = None if ttl is None else self._now + ttl
        if state is ConnectionState.CONNECTED:
            assert self._transfer is not None
            return self._transfer.sender.write(
                data, whole=self._message_mode, deadline=deadline, in_order=ordered
            )
        if state is ConnectionState.CONNECTING:
            assert self._connecting is not None
            return self._connecting.send(data, deadline, ordered)
        raise LocalProtocolError(f"send() on a connection that is {state.value}")

    def next_event(self) -> UdtEvent | None:
        """The next event, or None. Data comes coalesced: one event per batch of packets."""
        transfer = self._transfer
        return self._events.pop(None if transfer is None else transfer.receiver)

    def close(self, now: float) -> None:
        """Graceful close: no more ``send()``; once everything is acknowledged, Shutdown.

        Waits at most ``config.linger``. Closing a connection that is still connecting
        ends it at once.
        """
        state = self._state
        if state is ConnectionState.CONNECTING:
            self._finish("close", CloseReason.LOCAL_CLOSE, "closed before the handshake finished")
        elif state is ConnectionState.CONNECTED:
            self._state = _TRANSITIONS[state, "close"]
            self._linger_deadline = now + self._config.linger
            self._maybe_closed()

    def abort(self, now: float) -> None:
        """Shutdown now, drop both buffers, ``ConnectionClosed(ABORTED)``."""
        if self._state is ConnectionState.CLOSED:
            return
        self._send_shutdown(aborted=True)
        self._finish("abort", CloseReason.ABORTED, "aborted")

    # --- datagrams ---------------------------------------------------------------------------

    def receive_datagram(self, data: bytes, addr: Endpoint, now: float) -> None:
        """Take one datagram from ``addr``. Never raises on what the peer sends."""
        self._now = now
        transfer = self._transfer
        if transfer is not None and self._state is not ConnectionState.CLOSED:
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
            transfer.last_heard = now
            if not word0 & _CONTROL:
                receiver = transfer.receiver
                receiver.on_data(data, word0, word1, now)
                if receiver.ack_now:
                    transfer.send_ack(now)
                return
            self._receive_control(data, addr, now)
        elif self._state is ConnectionState.CONNECTING:
            self._receive_connecting(data, addr, now)
        else:
            self._receive_closed(data, addr, now)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Endpoint]]:
        """Everything due by ``now``: control packets, then the data pacing allows."""
        self._now = now
        handshake = self._handshake
        out = [] if handshake is None else handshake.datagrams_to_send(now)
        if self._answer is not None:
            # Before any data: a libudt peer drops data that comes before it is connected.
            out.append(self._answer)
            self._answer = None
        transfer = self._transfer
        if transfer is not None:
            if self._state is not ConnectionState.CLOSED:
                sender = transfer.sender
                if sender.loss or sender.pending_packets:
                    transfer.emit(now)
            outbox = transfer.out
            if outbox:
                peer = self._peer_address
                assert peer is not None
                out += [(datagram, peer) for datagram in outbox]
                outbox.clear()  # the receiver appends to this very list
                transfer.last_sent = now
        if self._extra:
            # Last: a Shutdown goes after the final ACK queued with it.
            out += self._extra
            self._extra = []
        return out

    def get_timer(self) -> float | None:
        """The next moment ``handle_timer`` (or pacing in ``datagrams_to_send``) has work."""
        state = self._state
        if state is ConnectionState.CONNECTING:
            assert self._connecting is not None
            return self._connecting.get_timer()
        if state is ConnectionState.CLOSED:
            return None
        transfer = self._transfer
        assert transfer is not None
        return min(
            transfer.deadline(),
            transfer.last_heard + self._config.idle_timeout,
            self._linger_deadline,
        )

    def handle_timer(self, now: float) -> None:
        """Run whatever is due at ``now``: ACK/NAK tick, EXP, keep-alive, idle and linger."""
        self._now = now
        state = self._state
        if state is ConnectionState.CONNECTING:
            assert self._connecting is not None
            self._take_outcome(self._connecting.handle_timer(now), now)
            return
        if state is ConnectionState.CLOSED:
            return
        transfer = self._transfer
        assert transfer is not None
        if now >= transfer.last_heard + self._config.idle_timeout:
            self._finish(
                "idle timeout",
                CloseReason.TIMEOUT,
                f"nothing heard from the peer for {self._config.idle_timeout:g} s",
            )
            return
        if now >= self._linger_deadline:
            unacked = transfer.sender.buffered_bytes
            self._send_shutdown(aborted=True)
            self._finish(
                "linger expired",
                CloseReason.ABORTED,
                f"linger of {self._config.linger:g} s expired with {unacked} bytes unacknowledged",
            )
            return
        transfer.tick(now)

    # --- internals: the handshake ----------------------------------------------------------

    def _receive_connecting(self, data: bytes, addr: Endpoint, now: float) -> None:
        assert self._connecting is not None
        self._take_outcome(self._connecting.receive_datagram(data, addr, now), now)

    def _take_outcome(
        self, outcome: ConnectingHandover | HandshakeFailed | None, now: float
    ) -> None:
        if isinstance(outcome, ConnectingHandover):
            self._establish(outcome, now)
        elif isinstance(outcome, HandshakeFailed):
            self._handshake = None
            self._finish(
                "handshake failed",
                CloseReason.HANDSHAKE_FAILED,
                f"{outcome.reason.value}: {outcome.detail}",
            )

    def _establish(self, handover: ConnectingHandover, now: float) -> None:
        self._connecting = None
        self._handshake = handover.handshake
        self._answer = handover.answer
        self._extra.extend(handover.trailing)
        established = handover.established
        self._state = _TRANSITIONS[self._state, "established"]
        self._peer_socket_id = established.peer_socket_id
        self._peer_address = established.peer_address
        transfer = self._transfer = UdtTransfer(
            established,
            config=self._config,
            random=self._random,
            counters=self._counters,
            now=now,
        )
        self._events.append(
            ConnectionEstablished(
                peer_address=established.peer_address,
                peer_socket_id=established.peer_socket_id,
            )
        )
        for chunk, deadline, in_order in handover.early:
            transfer.sender.write(
                chunk, whole=self._message_mode, deadline=deadline, in_order=in_order
            )
        for data, addr in handover.held:
            self.receive_datagram(data, addr, now)
        if handover.proof is not None and self._state is not ConnectionState.CLOSED:
            self.receive_datagram(*handover.proof, now)

    # --- internals: control packets ----------------------------------------------------------

    def _receive_control(self, data: bytes, addr: Endpoint, now: float) -> None:
        transfer = self._transfer
        assert transfer is not None
        try:
            packet = decode_packet(data)
        except UdtDecodeError:
            self._counters.malformed += 1
            return
        if isinstance(packet, Ack):
            transfer.on_ack(packet, now)
            self._maybe_closed()
        elif isinstance(packet, LightAck):
            transfer.on_light_ack(packet, now)
            self._maybe_closed()
        elif isinstance(packet, Nak):
            transfer.on_nak(packet, now)
        elif isinstance(packet, Ack2):
            transfer.on_ack2(packet, now)
        elif isinstance(packet, KeepAlive):
            pass  # "the only purpose of keep-alive packet is to tell that the peer is still alive"
        elif isinstance(packet, Shutdown):
            reason, detail = peer_shutdown_reason(packet, len(transfer.receiver.loss))
            self._finish("peer shutdown", reason, detail)
        elif isinstance(packet, Handshake):
            if self._handshake is not None:
                self._handshake.receive_datagram(data, addr, now)
            else:
                self._counters.invalid += 1
        elif isinstance(packet, MessageDropRequest):
            # A byte stream cannot skip bytes: the receiver ignores it in STREAM mode.
            self._counters.drop_requests_received += 1
            transfer.receiver.drop_message(
                packet.message_number, packet.first_sequence_number, packet.last_sequence_number
            )
        else:
            self._counters.invalid += 1  # congestion warning, error signal, user-defined

    def _stray(self, data: bytes, addr: Endpoint, now: float, word0: int, destination: int) -> None:
        # A rendezvous peer's late handshake may still carry destination 0; answer it (-2).
        if (
            destination == 0
            and self._handshake is not None
            and word0 & 0xFFFF0000 == (_HANDSHAKE_WORD)
        ):
            assert self._transfer is not None
            self._transfer.last_heard = now
            self._handshake.receive_datagram(data, addr, now)
            return
        self._counters.wrong_destination += 1

    def _receive_closed(self, data: bytes, addr: Endpoint, now: float) -> None:
        if self._peer_socket_id is not None:
            self._extra += self._shutdown.reply(
                data, addr, now, self._peer_address, self._peer_socket_id
            )

    # --- internals: closing ------------------------------------------------------------------

    def _send_shutdown(self, *, aborted: bool = False) -> None:
        if self._peer_socket_id is not None and self._peer_address is not None:
            self._extra += self._shutdown.copies(
                self._peer_address, self._peer_socket_id, aborted=aborted
            )

    def _maybe_closed(self) -> None:
        transfer = self._transfer
        if (
            self._state is ConnectionState.CLOSING
            and transfer is not None
            and transfer.sender.is_idle()
        ):
            self._send_shutdown()
            self._finish("all acknowledged", CloseReason.LOCAL_CLOSE, "closed")

    def _finish(self, transition: str, reason: CloseReason, detail: str) -> None:
        self._state = _TRANSITIONS[self._state, transition]
        transfer = self._transfer
        if transfer is not None:
            if reason is not CloseReason.ABORTED:
                self._events.take_ready(transfer.receiver)
            transfer.sync_counters()
            transfer.sender.clear()
            transfer.receiver.clear()
            if reason is CloseReason.ABORTED:
                transfer.out.clear()
        self._connecting = None
        self._handshake = None
        self._events.append(ConnectionClosed(reason=reason, detail=detail))
