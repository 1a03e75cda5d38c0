"""splice_sockets on real socket pairs: every byte both ways, half-closes passed on, pipes lent.

The relay's splice is the one place bytes move without the sans-I/O core, so it
is tested on its own against kernel sockets (no relay, no protocol).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import anyio
import pytest

from wavesync_adapters.anyio._splice import PipePool, SpliceResult, splice_sockets

pytestmark = pytest.mark.anyio
WAIT = 15.0


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    backend: str = request.param
    return backend


@pytest.fixture
def pairs() -> Iterator[tuple[socket.socket, socket.socket, socket.socket, socket.socket]]:
    # client_end <-> relay_client   relay_server <-> server_end
    client_end, relay_client = socket.socketpair()
    relay_server, server_end = socket.socketpair()
    for sock in (client_end, relay_client, relay_server, server_end):
        sock.setblocking(False)
    yield client_end, relay_client, relay_server, server_end
    for sock in (client_end, relay_client, relay_server, server_end):
        sock.close()


async def receive_all(sock: socket.socket) -> bytes:
    received = bytearray()
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            await anyio.wait_readable(sock)
            continue
        if not chunk:
            return bytes(received)
        received += chunk


async def send_and_close(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            await anyio.wait_writable(sock)
    sock.shutdown(socket.SHUT_WR)


@pytest.mark.parametrize("use_pipes", [True, False], ids=["splice", "copy"])
async def test_every_byte_both_ways_and_half_closes_pass_through(
    pairs: tuple[socket.socket, socket.socket, socket.socket, socket.socket], use_pipes: bool
) -> None:
    client_end, relay_client, relay_server, server_end = pairs
    upstream, downstream = os.urandom(3_000_000), os.urandom(2_000_000)
    pipes = PipePool(max_idle=1) if use_pipes else None
    got: dict[str, bytes] = {}
    result = SpliceResult()

    async def splice() -> None:
        nonlocal result
        result = await splice_sockets(
            relay_client, relay_server, to_client=b"101\r\n", to_server=b"early", pipes=pipes
        )

    async def client() -> None:
        async with anyio.create_task_group() as group:
            group.start_soon(send_and_close, client_end, upstream)
            got["client"] = await receive_all(client_end)

    async def server() -> None:
        async with anyio.create_task_group() as group:
            group.start_soon(send_and_close, server_end, downstream)
            got["server"] = await receive_all(server_end)

    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as group:
            group.start_soon(splice)
            group.start_soon(client)
            group.start_soon(server)
    assert got["server"] == b"early" + upstream
    assert got["client"] == b"101\r\n" + downstream
    assert (result.client_to_server, result.server_to_client) == (
        5 + len(upstream),
        5 + len(downstream),
    )
    assert result.ending == "closed"
    if pipes is not None:
        # Both pumps gave their pipes back empty; the pool keeps one and closed the other.
        assert pipes.open_pipes == 1
        pipes.close()
        assert pipes.open_pipes == 0


async def test_an_idle_session_holds_no_pipe(
    pairs: tuple[socket.socket, socket.socket, socket.socket, socket.socket],
) -> None:
    client_end, relay_client, relay_server, server_end = pairs
    pipes = PipePool()
    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as group:
            group.start_soon(
                lambda: splice_sockets(
                    relay_client, relay_server, to_client=b"", to_server=b"", pipes=pipes
                )
            )
            client_end.send(b"ping")
            await anyio.wait_readable(server_end)
            assert server_end.recv(4096) == b"ping"
            await anyio.wait_all_tasks_blocked()
            # Both pumps now wait for their sources with nothing in flight.
            assert pipes.open_pipes <= 2
            assert len(pipes._idle) == pipes.open_pipes
            client_end.shutdown(socket.SHUT_WR)
            server_end.shutdown(socket.SHUT_WR)


async def test_a_reset_ends_both_directions(
    pairs: tuple[socket.socket, socket.socket, socket.socket, socket.socket],
) -> None:
    client_end, relay_client, relay_server, server_end = pairs
    pipes = PipePool()
    # Unread input makes close() send RST on TCP; a socketpair shows the same as EPIPE
    # or ECONNRESET when the splice writes to a peer that is gone.
    server_end.close()
    client_end.send(b"to nobody")
    with anyio.fail_after(WAIT):
        result = await splice_sockets(
            relay_client, relay_server, to_client=b"", to_server=b"", pipes=pipes
        )
    assert result.ending.startswith("error")
    assert pipes.open_pipes == len(pipes._idle)
