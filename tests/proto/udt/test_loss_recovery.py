"""Loss recovery on a loopback-like path: sub-ms RTT, high bandwidth, a bounded queue, 5 % loss.

On such a path the smoothed RTT is still near 4.11's 100 ms placeholder for most of a
transfer (ACKs, and so ACK2 samples, are few while a hole holds the ACK number), so a
periodic NAK timed by it leaves a lost retransmission or a lost NAK unrepaired for a
third of a second while the receive buffer fills behind the hole; and a lost last
packet, which no later packet reveals, waits for the sender's EXP (0.3 s at least).
docs/protocol.md §4.8.4 and §4.8.5.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from wavesync_proto.addresses import Endpoint
from wavesync_proto.udt.connection import UdtConnection
from wavesync_proto.udt.connection_types import UdtConfig

from ...netsim import LinkConfig
from .connection_helpers import FixedRate, Transfer, payload

#: 50 µs each way, 1 Gbit/s, 256 kB of queue: a loopback's socket, roughly.
LOOPBACK = LinkConfig(delay=0.00005, bandwidth=125_000_000, queue_limit=256_000, loss=0.05)


class Timed(Transfer):
    """Also notes when B has ``mark`` bytes in order."""

    mark = 0
    marked_at: float | None = None

    def _step(self) -> bool:
        done = super()._step()
        if self.marked_at is None and self.b.received_bytes >= self.mark:
            self.marked_at = self.network.now
        return done


@pytest.mark.parametrize("seed", [5, 6])
def test_a_lost_nak_or_retransmission_is_reported_again_within_a_few_syn(seed: int) -> None:
    # A fixed 20 µs period (73 MB/s of payload, below the link): only the connection's
    # loss recovery decides the time. The mark stops short of the tail (a lost last
    # packet is the tail probe's business, not the periodic NAK's).
    data = payload(3_000_000, seed=21)
    transfer = Timed(
        a_data=data,
        link=LOOPBACK,
        config=UdtConfig(linger=3600.0, congestion=FixedRate.factory(period=20e-6)),
        seed=seed,
    )
    transfer.mark = 2_900_000
    transfer.run(max_steps=5_000_000)
    assert transfer.b_received() == data
    b = transfer.b_connection
    assert b is not None
    # Some NAKs were lost, and the periodic NAK repaired those holes.
    assert b.counters.naks_sent > transfer.a_connection.counters.naks_received
    # 2000 packets at 20 µs take 40 ms; a repeated report waits 1-2 SYN. Measured:
    # 0.050 s for both seeds. With the RTT folded from 4.11's placeholders, 0.35 s
    # (seed 5); with a floor of 2 SYN, 0.10 s (seed 6).
    assert transfer.marked_at is not None
    assert transfer.marked_at < 0.075, transfer.marked_at


class Drop:
    """Passes A's connection through, but loses the first datagram ``outgoing`` (sent by
    A) or ``incoming`` (to A) picks."""

    def __init__(
        self,
        connection: UdtConnection,
        *,
        outgoing: Callable[[bytes], bool] = lambda _: False,
        incoming: Callable[[bytes], bool] = lambda _: False,
    ) -> None:
        self.connection = connection
        self.outgoing = outgoing
        self.incoming = incoming
        self.dropped = 0

    def receive_datagram(self, data: bytes, addr: Endpoint, now: float) -> None:
        if not self.dropped and self.incoming(data):
            self.dropped += 1
            return
        self.connection.receive_datagram(data, addr, now)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Endpoint]]:
        out = self.connection.datagrams_to_send(now)
        if not self.dropped:
            for k, (data, _) in enumerate(out):
                if self.outgoing(data):
                    self.dropped += 1
                    del out[k]
                    break
        return out

    def get_timer(self) -> float | None:
        return self.connection.get_timer()

    def handle_timer(self, now: float) -> None:
        self.connection.handle_timer(now)


CLEAN = LinkConfig(delay=0.00005, bandwidth=125_000_000, queue_limit=256_000)
SIZE = 3_000_000


class LastData:
    """Picks the data packet that carries the stream's last byte (its first sending)."""

    def __init__(self) -> None:
        self.carried = 0

    def __call__(self, data: bytes) -> bool:
        if data[0] & 0x80:
            return False
        self.carried += len(data) - 16
        return self.carried == SIZE


def run_dropping(**drop: Callable[[bytes], bool]) -> tuple[float, Transfer, list[Drop]]:
    data = payload(SIZE, seed=22)
    wrappers: list[Drop] = []

    def wrap(connection: UdtConnection) -> Drop:
        wrappers.append(Drop(connection, **drop))
        return wrappers[0]

    transfer = Transfer(
        a_data=data,
        link=CLEAN,
        config=UdtConfig(linger=3600.0, congestion=FixedRate.factory(period=20e-6)),
        wrap_a=wrap,
    )
    elapsed = transfer.run(max_steps=5_000_000)
    assert transfer.b_received() == data
    return elapsed, transfer, wrappers


def test_a_lost_last_packet_is_probed_after_a_few_syn_not_the_senders_exp() -> None:
    clean, _, _ = run_dropping()
    elapsed, transfer, wrappers = run_dropping(outgoing=LastData())
    assert wrappers[0].dropped == 1
    counters = transfer.a_connection.counters
    # Nothing after it, so no NAK: before, EXP resent it (0.14 s more: the EXP floor
    # counts from the last progress). Measured: 0.02 s more.
    assert counters.tail_probes == 1
    assert counters.timeouts == 0
    assert elapsed < clean + 0.05, (elapsed, clean)
