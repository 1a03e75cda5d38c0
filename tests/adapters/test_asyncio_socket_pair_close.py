"""The asyncio tunnel server leaves no socket-pair end, transport or coroutine behind.

A tunnel's stream is one end of a ``socket.socketpair()``; its application's end is
closed gracefully when the handler returns, which never finishes while the other
end's peer (the tunnel's far side) stops reading. Each test makes that happen on
purpose (no load, no sleep): the server must reset such a transport after its
``close_linger``, or at once when it stops, and close both ends of a pair whose
tasks were cancelled before they started. Every wait is bounded; a wait that
runs out is the failure.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from wavesync_adapters.asyncio.tunnel import open_tunnel
from wavesync_adapters.asyncio.tunnel_server import AcceptedTunnel, TunnelServer
from wavesync_proto.tunnel import TunnelKind, TunnelMethod

pytestmark = pytest.mark.anyio
WAIT = 20.0  # seconds any one step may take before the test fails
WEBSOCKET = TunnelKind(method=TunnelMethod.WEBSOCKET)
#: More than the client's reader, both TCP buffers and the socket pair hold together:
#: what is left stays in the handler's transport while nobody reads.
FLOOD = 48 * 1024 * 1024


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.parametrize("how", ["linger runs out", "server stops"])
async def test_a_handlers_stream_whose_far_side_stopped_reading_is_reset_not_left_closing(
    how: str,
) -> None:
    returned = asyncio.Event()
    writers: list[asyncio.StreamWriter] = []

    async def flood_then_return(tunnel: AcceptedTunnel) -> None:
        writers.append(tunnel.writer)
        tunnel.writer.write(b"\x00" * FLOOD)  # no drain: the peer reads none of it
        returned.set()

    # A linger that cannot run out within the test when the server's stop is the reset.
    linger = 0.01 if how == "linger runs out" else 3600.0
    server = TunnelServer(flood_then_return, close_linger=linger)
    bound = await server.listen("127.0.0.1", 0)
    try:
        async with asyncio.timeout(WAIT):
            _, writer = await open_tunnel(f"127.0.0.1:{bound[1]}", WEBSOCKET)
            try:
                await returned.wait()
                assert writers[0].transport.get_write_buffer_size() > 0  # still has to write
                if how == "server stops":
                    server.close()
                # Closed, not left closing: its socket-pair end is released.
                await writers[0].wait_closed()
                assert writers[0].transport.get_extra_info("socket").fileno() == -1
            finally:
                writer.transport.abort()
    finally:
        server.close()


class _Tunnel:
    """What ``tunnel_up`` reads of a bridge."""

    kind = WEBSOCKET
    remote = ("127.0.0.1", 1)

    def abort(self) -> None:
        pass

    def closed(self) -> None:
        pass


@pytest.mark.parametrize("on_socket", [False, True], ids=["handler", "on_socket"])
async def test_a_server_closed_before_its_tasks_start_closes_both_ends_of_the_pair(
    monkeypatch: pytest.MonkeyPatch, on_socket: bool
) -> None:
    pairs: list[tuple[socket.socket, socket.socket]] = []
    real_socketpair = socket.socketpair

    def recording_socketpair(*args: Any) -> tuple[socket.socket, socket.socket]:
        pair = real_socketpair(*args)
        pairs.append(pair)
        return pair

    async def unused_handler(tunnel: AcceptedTunnel) -> None:
        raise AssertionError("the server closed before the handler could start")

    taken: list[socket.socket] = []
    monkeypatch.setattr(socket, "socketpair", recording_socketpair)
    if on_socket:
        server = TunnelServer(on_socket=lambda given: taken.append(given.sock))
    else:
        server = TunnelServer(unused_handler)
    server.attach(asyncio.get_running_loop())
    server.tunnel_up(_Tunnel())  # type: ignore[arg-type]
    tasks = list(server._tasks)
    server.close()  # before any task had a turn: each is cancelled before it starts
    async with asyncio.timeout(WAIT):
        await asyncio.wait(tasks)
    ((inner, outer),) = pairs
    assert outer.fileno() == -1
    if on_socket:
        assert taken == [inner]  # the application's to close, not the server's
        assert inner.fileno() != -1
        inner.close()
    else:
        assert inner.fileno() == -1
