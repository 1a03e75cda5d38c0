"""The adapters' batched UDP socket: GSO runs out, GRO runs in, cut back exactly.

Real loopback sockets where the kernel has the feature (a test that cannot run says
why), and a scripted socket for the cutting itself: a run's last segment may be
shorter, a datagram the feed refuses goes to ``foreign``, and a socket without GRO
reads one datagram at a time.
"""

from __future__ import annotations

import asyncio
import select
import socket
import struct
import time
from typing import Any

import pytest

from wavesync_adapters._udp_batches import BatchedUdpSocket
from wavesync_proto.addresses import Endpoint

SOL_UDP, UDP_GRO = 17, 104
PEER: Endpoint = ("192.0.2.7", 4000)


class Fed:
    """A feed that keeps what it is given; refuses datagrams starting with ``b"not"``."""

    def __init__(self) -> None:
        self.taken: list[bytes] = []
        self.foreign: list[bytes] = []

    def feed(self, data: bytes, source: Endpoint, now: float) -> bool:
        assert isinstance(data, bytes)
        if data.startswith(b"not"):
            return False
        self.taken.append(data)
        return True

    def hand_on(self, data: bytes, source: Endpoint) -> None:
        self.foreign.append(data)


class ScriptedSocket:
    """Answers ``recvmsg`` from a list of (data, segment size or 0); then EAGAIN."""

    family = socket.AF_INET

    def __init__(self, reads: list[tuple[bytes, int]], *, gro: bool = True) -> None:
        self.reads = reads
        self.gro = gro
        self.options: list[tuple[int, int, int]] = []

    def setsockopt(self, level: int, option: int, value: int) -> None:
        if not self.gro:
            raise OSError(92, "Protocol not available")
        self.options.append((level, option, value))

    def recvmsg(self, size: int, space: int) -> tuple[bytes, list[Any], int, Endpoint]:
        if not self.reads:
            raise BlockingIOError
        data, segment = self.reads.pop(0)
        ancillary = [(SOL_UDP, UDP_GRO, struct.pack("=i", segment))] if segment else []
        return data, ancillary, 0, PEER

    def recvfrom(self, size: int) -> tuple[bytes, Endpoint]:
        if not self.reads:
            raise BlockingIOError
        return self.reads.pop(0)[0], PEER


def batched(sock: Any, **options: Any) -> BatchedUdpSocket:
    return BatchedUdpSocket(sock, datagram_bytes=1500, clock=time.monotonic, **options)


def test_a_run_is_cut_at_its_segment_size_and_the_last_may_be_shorter() -> None:
    run = b"a" * 1000 + b"b" * 1000 + b"c" * 300
    io = batched(ScriptedSocket([(run, 1000), (b"single", 0)]))
    fed = Fed()
    assert io.receive_all(fed.feed, 64, fed.hand_on) == 4
    assert fed.taken == [b"a" * 1000, b"b" * 1000, b"c" * 300, b"single"]
    assert io.gro_batches == 1


def test_a_datagram_of_a_run_the_feed_refuses_goes_to_foreign() -> None:
    run = b"x" * 8 + b"not-udt!" + b"y" * 8
    io = batched(ScriptedSocket([(run, 8)]))
    fed = Fed()
    io.receive_all(fed.feed, 64, fed.hand_on)
    assert (fed.taken, fed.foreign) == ([b"x" * 8, b"y" * 8], [b"not-udt!"])


def test_a_kernel_without_gro_reads_one_datagram_at_a_time() -> None:
    scripted = ScriptedSocket([(b"one", 0), (b"two", 0)], gro=False)
    io = batched(scripted)
    fed = Fed()
    assert io.receive_all(fed.feed, 64, fed.hand_on) == 2
    assert fed.taken == [b"one", b"two"]
    assert io.gro_batches == 0


def test_gro_can_be_left_off() -> None:
    scripted = ScriptedSocket([(b"one", 0)])
    batched(scripted, gro=False)
    assert scripted.options == []


def test_gso_runs_over_loopback_arrive_as_the_same_datagrams_in_order() -> None:
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sender, receiver:
        receiver.bind(("127.0.0.1", 0))
        sender.bind(("127.0.0.1", 0))
        receiver.setblocking(False)
        sender.setblocking(False)
        outgoing = batched(sender, gso=True)
        incoming = batched(receiver)
        if not incoming._gro:
            pytest.skip("this kernel refuses UDP_GRO (Linux >= 5.0 has it)")
        address = receiver.getsockname()
        datagrams = [(bytes([n]) * 1200, address) for n in range(40)] + [(b"tail", address)]
        outgoing.send_all(datagrams)
        if outgoing.gso_batches == 0:
            pytest.skip("this kernel refuses UDP_SEGMENT (Linux >= 4.18 has it)")
        fed = Fed()
        deadline = time.monotonic() + 10.0
        while len(fed.taken) < len(datagrams):
            assert time.monotonic() < deadline, f"{len(fed.taken)} of {len(datagrams)} arrived"
            select.select([receiver], [], [], 1.0)
            incoming.receive_all(fed.feed, 64, fed.hand_on)
        assert fed.taken == [data for data, _ in datagrams]
        # Loopback hands a GSO batch to a GRO socket whole: fewer reads than datagrams.
        assert incoming.gro_batches >= 1


@pytest.mark.parametrize(("closing", "after"), [(False, 0), (True, 1)])
def test_a_socket_left_to_its_owner_gets_gro_turned_off_again(closing: bool, after: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        io = batched(sock)
        if not io._gro:
            pytest.skip("this kernel refuses UDP_GRO (Linux >= 5.0 has it)")
        assert sock.getsockopt(SOL_UDP, UDP_GRO) == 1
        io.release(closing=closing)
        # A socket the endpoint closes is left as it is: nobody reads it again.
        assert sock.getsockopt(SOL_UDP, UDP_GRO) == after


def test_a_handed_in_socket_is_given_back_without_gro_by_every_adapter() -> None:
    import anyio  # noqa: PLC0415 - each adapter's own runtime, only here

    from wavesync_adapters.anyio.udt import UdtEndpoint as AnyioEndpoint  # noqa: PLC0415
    from wavesync_adapters.asyncio.udt_endpoint import (  # noqa: PLC0415
        create_udt_endpoint,
    )
    from wavesync_adapters.blocking.udt import UdtEndpoint as BlockingEndpoint  # noqa: PLC0415

    def fresh() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        return sock

    async def anyio_side(sock: socket.socket) -> None:
        async with AnyioEndpoint(sock):
            assert sock.getsockopt(SOL_UDP, UDP_GRO) == 1

    async def asyncio_side(sock: socket.socket) -> None:
        endpoint = await create_udt_endpoint(sock=sock)
        assert sock.getsockopt(SOL_UDP, UDP_GRO) == 1
        endpoint.close()

    def on_anyio(sock: socket.socket) -> None:
        anyio.run(anyio_side, sock)

    def on_asyncio(sock: socket.socket) -> None:
        asyncio.run(asyncio_side(sock))

    def on_threads(sock: socket.socket) -> None:
        BlockingEndpoint(sock).close()

    for run in (on_anyio, on_asyncio, on_threads):
        with fresh() as sock:
            if not batched(sock)._gro:
                pytest.skip("this kernel refuses UDP_GRO (Linux >= 5.0 has it)")
            sock.setsockopt(SOL_UDP, UDP_GRO, 0)
            run(sock)
            assert sock.fileno() >= 0, "a handed-in socket stays open"
            assert sock.getsockopt(SOL_UDP, UDP_GRO) == 0
