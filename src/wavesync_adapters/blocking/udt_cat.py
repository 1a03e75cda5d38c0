"""``wavesync udt send|recv --adapter blocking``: netcat over UDT with plain sockets.

The twin of ``wavesync_adapters.anyio.udt_cat``, with the same contract (docs/udt.md):
``receive_stream`` writes one connection's bytes to a file descriptor (stdout) until
the peer closes; ``send_stream`` sends a file descriptor (stdin) until its end and
closes gracefully. Both raise ``UdtCatError`` (a one-line reason) unless every byte
arrived and the connection closed cleanly. The connection is a real socket of
``wavesync_adapters.blocking.udt.UdtEndpoint`` (one end of a socketpair its I/O
thread pumps); this thread reads and writes it, stdin and stdout, with plain
blocking calls.

This module imports nothing of asyncio, anyio or trio.
"""

from __future__ import annotations

import os
import select
import socket
import time
from collections.abc import Callable

from wavesync_proto.addresses import format_endpoint
from wavesync_proto.udt.connection_types import CloseReason, UdtConfig

from .._udt_cat import CHUNK, CatResult, UdtCatError, UdtCatMode, bind_address, finished
from .udt import UdtConnectError, UdtEndpoint, UdtStreamInfo

__all__ = ["CatResult", "UdtCatError", "UdtCatMode", "receive_stream", "send_stream"]


def receive_stream(
    mode: UdtCatMode,
    output_fd: int,
    *,
    announce: Callable[[str], None],
    config: UdtConfig | None = None,
) -> CatResult:
    """Take one connection and write its bytes to ``output_fd`` until the peer closes.

    Every read ends: the core closes a connection whose peer went silent
    (``UdtConfig.idle_timeout``), and the stream's socket then reads EOF."""
    with UdtEndpoint.bind(bind_address(mode), config=config, gso=mode.gso) as endpoint:
        sock = _open(endpoint, mode, announce)
        try:
            info = endpoint.stream_info(sock)
            started = time.monotonic()
            total = 0
            while data := _receive(sock):
                _write_all(output_fd, data)
                total += len(data)
            if info.close_reason is not CloseReason.PEER_CLOSED:
                raise UdtCatError(f"after {total} bytes: {_ended(info)}")
            return finished("received", total, started, info.peer_address)
        finally:
            _close(endpoint, sock)


def send_stream(
    mode: UdtCatMode,
    input_fd: int,
    *,
    announce: Callable[[str], None],
    config: UdtConfig | None = None,
) -> CatResult:
    """Send ``input_fd`` to its end over one connection; close and wait for every ACK.

    The wait ends: the core gives up on unacknowledged bytes after ``UdtConfig.linger``
    (or a silent peer after ``idle_timeout``), and the stream's socket then reads EOF."""
    with UdtEndpoint.bind(bind_address(mode), config=config, gso=mode.gso) as endpoint:
        sock = _open(endpoint, mode, announce)
        try:
            info = endpoint.stream_info(sock)
            started = time.monotonic()
            total = 0
            while data := _read(input_fd):
                try:
                    sock.sendall(data)
                except OSError as exc:  # the connection ended under us: its reason says why
                    reason = _ended(info) if info.close_reason is not None else str(exc)
                    raise UdtCatError(f"after {total} bytes: {reason}") from None
                total += len(data)
            # Graceful (UDT4 has no half-close): what was written is still delivered, and
            # the socket reads EOF once the close completed, acknowledged or not.
            sock.shutdown(socket.SHUT_WR)
            while _receive(sock):
                pass  # the receiving program sends nothing; drop what a peer might
            if info.close_reason is not CloseReason.LOCAL_CLOSE:
                raise UdtCatError(f"{total} bytes sent, not all acknowledged: {_ended(info)}")
            return finished("sent", total, started, info.peer_address)
        finally:
            _close(endpoint, sock)


def _open(
    endpoint: UdtEndpoint, mode: UdtCatMode, announce: Callable[[str], None]
) -> socket.socket:
    local = format_endpoint(endpoint.local_address)
    try:
        if mode.listen is not None:
            endpoint.listen()
            announce(f"listening on udp {local}")
            return endpoint.accept()
        if mode.connect is not None:
            return endpoint.connect(mode.connect)
        assert mode.peer is not None
        announce(f"rendezvous from udp {local} with {format_endpoint(mode.peer)}")
        return endpoint.rendezvous([mode.peer])
    except UdtConnectError as exc:
        raise UdtCatError(str(exc)) from None


def _close(endpoint: UdtEndpoint, sock: socket.socket) -> None:
    # The endpoint first: it aborts a connection still open (an error, Ctrl-C), where
    # closing the socket first would close it gracefully and pass a cut stream as whole.
    endpoint.close()
    sock.close()


def _receive(sock: socket.socket) -> bytes:
    """The next bytes, or b"" at the end (a reset is an end too: ``close_reason`` says
    how it ended)."""
    try:
        return sock.recv(CHUNK)
    except ConnectionResetError:
        return b""


def _ended(info: UdtStreamInfo) -> str:
    reason = info.close_reason
    if reason is None:
        return "not closed"
    return f"udt connection closed: {reason.name}: {info.close_detail}"


def _read(fd: int) -> bytes:
    while True:
        try:
            return os.read(fd, CHUNK)
        except BlockingIOError:  # a non-blocking pipe someone else set up
            select.select([fd], [], [])


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        view = view[written:]
