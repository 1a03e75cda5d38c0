"""Loss recovery on a loopback-like path: sub-ms RTT, high bandwidth, a bounded queue, 5 % loss.

On such a path the smoothed RTT is still near 4.11's 100 ms placeholder for most of a
transfer (ACKs, and so ACK2 samples, are few while a hole holds the ACK number), so a
periodic NAK timed by it leaves a lost retransmission or a lost NAK unrepaired for a
third of a second while the receive buffer fills behind the hole. docs/protocol.md
§4.8.4.
"""

from __future__ import annotations

import pytest

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
