"""Drive pairs of ``UdtConnection`` through ``tests/netsim.py``: the transfer tests' tools.

``ListenerSide`` plays the multiplexer's part for a server: datagrams for socket id 0
go to a ``UdtListener``, the rest to the one connection it accepted. ``Transfer``
moves bytes one way (or both) between two connections, checks the buffers stay
within their bounds at every step, and reports what each side received and how
each closed.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from wavesync_proto.addresses import Endpoint
from wavesync_proto.udt.congestion import CongestionControl
from wavesync_proto.udt.connection import UdtConnection
from wavesync_proto.udt.connection_types import (
    ConnectionClosed,
    ConnectionState,
    DataReceived,
    UdtConfig,
)
from wavesync_proto.udt.listener import (
    AcceptedHandshake,
    ConnectionRequest,
    ListenerReply,
    UdtListener,
)

from ...netsim import LinkConfig, Network, run_until

CLIENT: Endpoint = ("192.0.2.10", 40000)
SERVER: Endpoint = ("198.51.100.20", 9000)
SECRET = b"a cookie secret!"
_DESTINATION = struct.Struct("!I")


def seeded(seed: int) -> random.Random:
    """A reproducible generator for test data and the congestion control's draw."""
    return random.Random(seed)  # noqa: S311 - reproducible test input, not a secret


def payload(size: int, seed: int = 4) -> bytes:
    """``size`` bytes that look random, the same for the same seed."""
    return seeded(seed).randbytes(size)


class ListenerSide:
    """A server endpoint: a ``UdtListener`` for socket id 0 and the connection it accepts."""

    def __init__(self, *, socket_id: int, seed: int, config: UdtConfig) -> None:
        self.listener = UdtListener(secret=SECRET, mss=config.mss, flow_window=config.flow_window)
        self.connection: UdtConnection | None = None
        self.accepted: AcceptedHandshake | None = None
        self._socket_id = socket_id
        self._random = seeded(seed).random
        self._config = config
        self._out: list[tuple[bytes, Endpoint]] = []

    def receive_datagram(self, data: bytes, addr: Endpoint, now: float) -> None:
        destination = _DESTINATION.unpack_from(data, 12)[0] if len(data) >= 16 else 0
        if destination != 0:
            if self.connection is not None:
                self.connection.receive_datagram(data, addr, now)
            return
        reply = self.listener.receive_datagram(data, addr, now)
        if isinstance(reply, ListenerReply):
            self._out.append((reply.datagram, reply.destination))
        elif isinstance(reply, ConnectionRequest):
            if self.accepted is None:
                self.accepted = self.listener.accept(reply, socket_id=self._socket_id)
                self.connection = UdtConnection.accepted(
                    self.accepted, now=now, random=self._random, config=self._config
                )
            if reply.key == self.accepted.key:
                # A repeated request: the multiplexer answers with the same response.
                self._out.append((self.accepted.response, self.accepted.destination))

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Endpoint]]:
        out, self._out = self._out, []
        if self.connection is not None:
            out += self.connection.datagrams_to_send(now)
        return out

    def get_timer(self) -> float | None:
        return None if self.connection is None else self.connection.get_timer()

    def handle_timer(self, now: float) -> None:
        if self.connection is not None:
            self.connection.handle_timer(now)


@dataclass
class Side:
    """One end of a transfer: what it sends, what it got, how it ended."""

    to_send: bytes
    received: list[bytes] = field(default_factory=list)
    received_bytes: int = 0
    offered: int = 0
    closed: ConnectionClosed | None = None
    established_at: float | None = None
    max_send_buffer: int = 0
    max_receive_buffer: int = 0


Wrapper = Callable[[object], object]


class Transfer:
    """Two connections over one netsim link, moving ``a_data`` A->B and ``b_data`` B->A.

    Each side hands its bytes to ``send()`` as space allows (from the first moment,
    while still connecting), and calls ``close()`` once all of them are taken and
    everything it expects has arrived, so both ends close themselves or hear the
    other's Shutdown. ``rendezvous`` picks the handshake; otherwise A calls B's
    listener. A rendezvous B sends its first request at ``b_start`` (it answers A's
    before that): the two requests do not cross, and B is established a round trip
    before A.
    """

    def __init__(
        self,
        *,
        a_data: bytes,
        b_data: bytes = b"",
        link: LinkConfig,
        reverse: LinkConfig | None = None,
        rendezvous: bool = False,
        seed: int = 1,
        config: UdtConfig = UdtConfig(),  # noqa: B008 - frozen
        a_isn: int = 0x7FFFFF00,
        b_isn: int = 12345,
        wrap_a: Callable[[UdtConnection], object] | None = None,
        b_start: float = 0.0,
    ) -> None:
        self.network = Network(seed)
        self.network.link(CLIENT, SERVER, link, reverse=reverse)
        self.config = config
        self.a = Side(to_send=a_data)
        self.b = Side(to_send=b_data)
        rng_a = seeded(seed * 7 + 1).random
        self.listener: ListenerSide | None = None
        self.a_connection: UdtConnection
        self._b_connection: UdtConnection | None = None
        if rendezvous:
            self.a_connection = UdtConnection.rendezvous(
                [SERVER], socket_id=111, isn=a_isn, now=0.0, random=rng_a, config=config
            )
            self._b_connection = UdtConnection.rendezvous(
                [CLIENT],
                socket_id=222,
                isn=b_isn,
                now=b_start,
                random=seeded(seed * 7 + 2).random,
                config=config,
            )
            b_endpoint: object = self._b_connection
        else:
            self.a_connection = UdtConnection.connect(
                SERVER, socket_id=111, isn=a_isn, now=0.0, random=rng_a, config=config
            )
            self.listener = ListenerSide(socket_id=222, seed=seed * 7 + 2, config=config)
            b_endpoint = self.listener
        a_endpoint: object = wrap_a(self.a_connection) if wrap_a else self.a_connection
        self.endpoints = {CLIENT: a_endpoint, SERVER: b_endpoint}
        #: When B had every byte A sent: the transfer's end, before the close.
        self.b_done_at: float | None = None

    @property
    def b_connection(self) -> UdtConnection | None:
        if self.listener is not None:
            return self.listener.connection
        return self._b_connection

    def run(self, *, until: float = 3600.0, max_steps: int = 3_000_000) -> float:
        """Run until both ends are closed; return the virtual time that took."""
        return run_until(
            self.network,
            self.endpoints,  # type: ignore[arg-type]
            until,
            stop=self._step,
            max_steps=max_steps,
        )

    def _step(self) -> bool:
        now = self.network.now
        b_connection = self.b_connection
        for side, other, connection in (
            (self.a, self.b, self.a_connection),
            (self.b, self.a, b_connection),
        ):
            if connection is None:
                continue
            self._pump(side, other, connection, now)
        if self.b_done_at is None and self.b.received_bytes >= len(self.a.to_send):
            self.b_done_at = now
        # A caller that never got through leaves no connection behind the listener.
        b_done = self.b.closed is not None or b_connection is None
        return self.a.closed is not None and b_done

    def _pump(self, side: Side, other: Side, connection: UdtConnection, now: float) -> None:
        config = self.config
        state = connection.state
        if side.offered < len(side.to_send) and state in (
            ConnectionState.CONNECTING,
            ConnectionState.CONNECTED,
        ):
            side.offered += connection.send(side.to_send[side.offered : side.offered + 65536])
        while (event := connection.next_event()) is not None:
            if isinstance(event, DataReceived):
                side.received.append(event.data)
                side.received_bytes += len(event.data)
            elif isinstance(event, ConnectionClosed):
                assert side.closed is None, "ConnectionClosed came twice"
                side.closed = event
            else:
                side.established_at = now
            assert side.closed is None or isinstance(event, ConnectionClosed), (
                "an event after ConnectionClosed"
            )
        side.max_send_buffer = max(side.max_send_buffer, connection.send_buffer_bytes)
        side.max_receive_buffer = max(side.max_receive_buffer, connection.receive_buffer_packets)
        assert connection.send_buffer_bytes <= config.send_buffer_bytes
        assert connection.receive_buffer_packets <= config.receive_buffer_packets
        if (
            connection.state is ConnectionState.CONNECTED
            and side.offered == len(side.to_send)
            and side.received_bytes == len(other.to_send)
        ):
            connection.close(now)
            # close() may end the connection at once: take its events now.
            while (event := connection.next_event()) is not None:
                assert isinstance(event, ConnectionClosed)
                side.closed = event

    def a_received(self) -> bytes:
        return b"".join(self.a.received)

    def b_received(self) -> bytes:
        return b"".join(self.b.received)


class FixedRate(CongestionControl):
    """A congestion control that never changes: a fixed period and window (records its calls)."""

    __slots__ = ("_period", "_window", "losses", "sent", "timeouts")

    def __init__(self, period: float = 0.0, window: float = 1_000_000.0) -> None:
        self._period = period
        self._window = window
        self.sent: list[int] = []
        self.losses: list[list[tuple[int, int]]] = []
        self.timeouts = 0

    @classmethod
    def factory(cls, period: float = 0.0, window: float = 1_000_000.0) -> Callable[..., FixedRate]:
        """For ``UdtConfig.congestion``: ignores the connection's keywords."""

        def make(**_: object) -> FixedRate:
            return cls(period, window)

        return make

    @property
    def packet_send_period(self) -> float:
        return self._period

    @property
    def congestion_window(self) -> float:
        return self._window

    @property
    def in_slow_start(self) -> bool:
        return False

    def on_packet_sent(self, *, sequence_number: int, now: float) -> None:
        self.sent.append(sequence_number)

    def on_ack(
        self,
        *,
        sequence_number: int,
        rtt: float,
        rtt_variance: float,
        receive_rate: int,
        link_capacity: int,
        now: float,
    ) -> None:
        pass

    def on_loss(self, *, losses: Sequence[tuple[int, int]], now: float) -> None:
        self.losses.append(list(losses))

    def on_timeout(self, *, now: float) -> None:
        self.timeouts += 1
