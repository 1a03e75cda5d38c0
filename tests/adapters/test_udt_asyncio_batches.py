"""The asyncio UDT endpoint's batched socket: GSO out, GRO in, and back-pressure.

Real loopback sockets on the stdlib loop and on uvloop (skipped, saying so, where
uvloop is not installed or the kernel refuses UDP_SEGMENT or UDP_GRO). Nothing
sleeps to wait: every wait is bounded by ``asyncio.timeout`` and ends on an event.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from wavesync_adapters._udp_batches import BatchedUdpSocket
from wavesync_adapters.asyncio.udt import (
    UdtEndpoint,
    create_udt_endpoint,
    open_udt_connection,
    start_udt_server,
)
from wavesync_proto.addresses import Endpoint

WAIT = 30.0  # seconds any one transfer may take before the test fails
LOOPBACK: Endpoint = ("127.0.0.1", 0)
Runner = Callable[[Coroutine[Any, Any, None]], None]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Runner:
    """Runs a coroutine to the end on the stdlib loop or on uvloop."""
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop", reason="uvloop is not installed here")
        return uvloop.run  # type: ignore[no-any-return]
    return asyncio.run


def batches(endpoint: UdtEndpoint) -> BatchedUdpSocket:
    io = endpoint._io
    assert isinstance(io, BatchedUdpSocket)
    return io


async def transfer(
    server_endpoint: UdtEndpoint,
    client_endpoint: UdtEndpoint,
    size: int,
    arrived: Callable[[], None] = lambda: None,
) -> None:
    """``size`` random bytes from the client to the server: assert they arrive exactly;
    ``arrived()`` runs then, before the close."""
    payload = os.urandom(size)
    got: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.readexactly(len(payload))
        got.set_result(hashlib.sha256(data).hexdigest())
        writer.close()

    async with asyncio.timeout(WAIT):
        server = await start_udt_server(handle, endpoint=server_endpoint)
        try:
            _reader, writer = await open_udt_connection(
                server_endpoint.local_address, endpoint=client_endpoint
            )
            writer.write(payload)
            await writer.drain()
            assert await got == hashlib.sha256(payload).hexdigest()
            arrived()
            writer.close()
            await writer.wait_closed()
        finally:
            server.close()


def test_gso_runs_out_and_gro_runs_in_arrive_byte_exact(run: Runner) -> None:
    counts: dict[str, int] = {}
    refused: list[str] = []

    async def main() -> None:
        async with (
            await create_udt_endpoint(LOOPBACK, gso=True) as server,
            await create_udt_endpoint(LOOPBACK, gso=True) as client,
        ):
            if not batches(server)._gro:
                refused.append("this kernel refuses UDP_GRO (Linux >= 5.0 has it)")
                return
            await transfer(server, client, 4 * 1024 * 1024)
            if not batches(client)._gso:
                refused.append("this kernel refuses UDP_SEGMENT (Linux >= 4.18 has it)")
            counts["gso"] = batches(client).gso_batches
            counts["gro"] = batches(server).gro_batches

    run(main())
    if refused:
        pytest.skip(refused[0])
    assert counts["gso"] > 0
    # Loopback hands a GSO batch to a GRO socket whole: the server read runs.
    assert counts["gro"] > 0


def test_the_default_sends_one_datagram_per_call_and_still_reads_runs(run: Runner) -> None:
    counts: dict[str, int] = {}

    async def main() -> None:
        async with (
            await create_udt_endpoint(LOOPBACK) as server,
            await create_udt_endpoint(LOOPBACK) as client,
        ):
            await transfer(server, client, 1024 * 1024)
            counts["gso"] = batches(client).gso_batches

    run(main())
    assert counts["gso"] == 0


class ChokedSocket:
    """The endpoint's socket with a small send buffer that drains a moment later.

    Loopback frees a UDP datagram's send-buffer memory inside ``sendto`` (the device
    orphans it at once), so a real EAGAIN cannot be had here: this one refuses sends
    once ``budget`` bytes went out, until a timer gives the budget back. As the kernel,
    it takes a send (a GSO batch larger than the budget too) while any budget is left.
    """

    def __init__(self, sock: socket.socket, budget: int) -> None:
        self._sock = sock
        self._budget = budget
        self._left = budget
        self._draining = False
        self.refused: list[bytes] = []
        self.sent: set[bytes] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def _take(self, datagrams: list[bytes]) -> None:
        if self._left <= 0:
            self.refused.extend(datagrams)
            if not self._draining:
                self._draining = True
                asyncio.get_running_loop().call_later(0.001, self._drain)
            raise BlockingIOError
        self._left -= sum(map(len, datagrams))
        self.sent.update(datagrams)

    def _drain(self) -> None:
        self._draining = False
        self._left = self._budget

    def sendto(self, data: bytes, address: Endpoint) -> int:
        self._take([data])
        return self._sock.sendto(data, address)

    def sendmsg(self, buffers: list[bytes], *args: Any) -> int:
        self._take(buffers)
        return self._sock.sendmsg(buffers, *args)


@pytest.mark.parametrize("gso", [False, True], ids=["one-by-one", "gso"])
def test_a_burst_larger_than_the_send_buffer_waits_and_arrives_whole(
    run: Runner, gso: bool
) -> None:
    seen: dict[str, int] = {}

    async def main() -> None:
        def nothing_refused_was_lost() -> None:
            # Each datagram the kernel refused went out later, or still waits.
            lost = set(choked.refused) - choked.sent - {data for data, _ in io.pending}
            seen["refused"] = len(choked.refused)
            seen["lost"] = len(lost)

        async with (
            await create_udt_endpoint(LOOPBACK) as server,
            await create_udt_endpoint(LOOPBACK, gso=gso) as client,
        ):
            io = batches(client)
            choked = ChokedSocket(io.sock, budget=32 * 1024)
            io.sock = choked  # type: ignore[assignment]
            await transfer(server, client, 4 * 1024 * 1024, nothing_refused_was_lost)
            seen["errors"] = io.send_errors

    run(main())
    assert seen["refused"] > 0  # the burst did meet a full buffer
    assert seen["lost"] == 0
    assert seen["errors"] == 0


def test_a_foreign_datagram_the_kernel_refuses_goes_out_when_writable(run: Runner) -> None:
    stun = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + bytes(12)
    received: list[bytes] = []

    async def main() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
            other.bind(LOOPBACK)
            other.settimeout(WAIT)
            async with await create_udt_endpoint(LOOPBACK) as endpoint:
                io = batches(endpoint)
                choked = ChokedSocket(io.sock, budget=len(stun))
                io.sock = choked  # type: ignore[assignment]
                endpoint.send_datagram(stun, other.getsockname())
                endpoint.send_datagram(stun, other.getsockname())  # waits in pending
                assert len(io.pending) == 1
                async with asyncio.timeout(WAIT):
                    # A thread reads: uvloop has no sock_recvfrom.
                    while len(received) < 2:
                        data, _ = await asyncio.to_thread(other.recvfrom, 100)
                        received.append(data)
                assert not io.pending

    run(main())
    assert received == [stun, stun]
