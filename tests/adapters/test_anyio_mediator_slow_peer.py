"""The anyio mediator daemon drops a TCP peer that reads slower than it is answered,
and tells the service, as the asyncio twin does: what was registered over that
connection must not stay on offer to clients."""

from __future__ import annotations

import os

import anyio
import anyio.abc
import pytest

from wavesync_adapters.anyio.mediator import MediatorDaemon
from wavesync_proto.mediator.registry import PeerHandle
from wavesync_proto.mediator.service import MediatorService
from wavesync_proto.mediator.service_types import Action, MediatorLimits
from wavesync_proto.stun.message import BINDING, Message, MessageClass, encode_message

pytestmark = pytest.mark.anyio
WAIT = 30.0


class TellingService(MediatorService):
    """Notes every peer the daemon says is gone."""

    closed: list[PeerHandle]

    def tcp_closed(self, peer: PeerHandle, now: float) -> list[Action]:
        self.closed.append(peer)
        return super().tcp_closed(peer, now)


class NeverReads(anyio.abc.ByteStream):
    """A peer that sends ``requests`` at once and then reads nothing: every send blocks."""

    def __init__(self, requests: bytes) -> None:
        self._requests: bytes | None = requests
        self.closed = anyio.Event()

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if self._requests is None:
            await anyio.sleep_forever()
        data, self._requests = self._requests, None
        assert data is not None
        return data

    async def send(self, item: bytes) -> None:
        await anyio.sleep_forever()  # the peer's window is full and stays so

    async def send_eof(self) -> None:
        pass

    async def aclose(self) -> None:
        self.closed.set()


async def test_a_peer_that_reads_slower_than_it_is_answered_is_dropped_and_the_service_told() -> (
    None
):
    # The rate limit lifted: each request must be answered for the answers to pile up.
    limits = MediatorLimits(rate_limit_per_second=10_000, rate_limit_burst=10_000)
    service = TellingService(systems={}, nonce_secret=os.urandom(32), limits=limits)
    service.closed = []
    daemon = MediatorDaemon(service)
    # More Binding requests than the peer's outbox holds (1024 answers).
    requests = b"".join(
        encode_message(
            Message(
                message_class=MessageClass.REQUEST,
                method=BINDING,
                transaction_id=number.to_bytes(12, "big"),
            )
        )
        for number in range(1100)
    )
    peer = NeverReads(requests)
    with anyio.fail_after(WAIT):
        await daemon.serve_stream(peer)
    assert peer.closed.is_set()
    assert service.closed == [1]
    assert service.counters.bindings_answered == 1100
