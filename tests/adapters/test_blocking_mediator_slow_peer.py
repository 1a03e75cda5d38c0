"""The blocking mediator daemon drops a TCP peer that reads slower than it is answered,
and tells the service, as the asyncio twin does: what was registered over that
connection must not stay on offer to clients."""

from __future__ import annotations

import contextlib
import secrets
import socket
import threading

from tests.adapters.test_blocking_daemons import WAIT, serving
from wavesync_adapters.blocking.mediator import MediatorDaemon
from wavesync_proto.mediator.registry import PeerHandle
from wavesync_proto.mediator.service import MediatorService
from wavesync_proto.mediator.service_types import Action, MediatorLimits
from wavesync_proto.stun.message import BINDING, Message, MessageClass, encode_message

#: Answers that cannot all wait in the kernel's buffers (a few MB on loopback) plus
#: the daemon's outbox of 1024 messages.
REQUESTS = 150_000


class TellingService(MediatorService):
    """Notes every peer the daemon says is gone (called in the daemon's thread)."""

    def __init__(self, **options: object) -> None:
        super().__init__(**options)  # type: ignore[arg-type]
        self.closed: list[PeerHandle] = []
        self.told = threading.Event()

    def tcp_closed(self, peer: PeerHandle, now: float) -> list[Action]:
        self.closed.append(peer)
        self.told.set()
        return super().tcp_closed(peer, now)


def test_a_peer_that_reads_slower_than_it_is_answered_is_dropped_and_the_service_told() -> None:
    # The rate limit lifted: each request must be answered for the answers to pile up.
    limits = MediatorLimits(rate_limit_per_second=10**6, rate_limit_burst=10**6)
    service = TellingService(systems={}, nonce_secret=secrets.token_bytes(32), limits=limits)
    request = encode_message(
        Message(message_class=MessageClass.REQUEST, method=BINDING, transaction_id=bytes(12))
    )
    with serving(MediatorDaemon(service)) as address:
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and never read
            client.settimeout(WAIT)
            client.connect(address)
            # Dropped while we are still sending (a reset) is what the test wants.
            with contextlib.suppress(OSError):
                client.sendall(request * REQUESTS)
            assert service.told.wait(WAIT), "the service was not told the peer is gone"
    assert len(service.closed) == 1
