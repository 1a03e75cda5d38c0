"""``UdtStream``: one UDT connection of a ``UdtEndpoint`` as an ``anyio.abc.ByteStream``.

The endpoint's driver task hands each connection's events to its stream
(``_pump``); the stream buffers received bytes up to a high-water mark, lets
``send`` wait for room in the core's send buffer, and turns the core's close
reasons into anyio's stream exceptions. It makes no protocol decision.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import anyio.lowlevel

from wavesync_proto.addresses import format_endpoint
from wavesync_proto.errors import LocalProtocolError
from wavesync_proto.udt.connection import UdtConnection
from wavesync_proto.udt.connection_types import (
    CloseReason,
    ConnectionClosed,
    ConnectionEstablished,
    ConnectionState,
    DataReceived,
)

from ..errors import UdtConnectError

if TYPE_CHECKING:
    from .udt import UdtEndpoint

__all__ = ["UdtConnectError", "UdtStream"]

log = logging.getLogger("wavesync.udt")

#: A sender blocked on a full send buffer is woken when this much is free (or all it
#: still has to send fits): one wake-up per ACK's worth, not per freed packet.
_SEND_WAKE_BYTES = 64 * 1024


class UdtStream(anyio.abc.ByteStream):
    """One UDT connection as an anyio byte stream.

    ``send`` waits while the connection's send buffer is full (nothing is dropped);
    ``receive`` raises ``anyio.EndOfStream`` once the peer closed and every byte was
    read, ``anyio.BrokenResourceError`` when the connection timed out or was aborted
    (by either end: ``PEER_ABORTED`` means the stream was cut short).
    UDT4 has no half-close, so ``send_eof`` raises ``NotImplementedError``: use
    ``aclose``, which closes gracefully (the core flushes and waits for the peer's
    acknowledgements for at most ``UdtConfig.linger``) and returns once it is closed;
    ``close_reason`` then says whether everything was acknowledged (``LOCAL_CLOSE``).
    A cancelled ``aclose`` (``anyio.aclose_forcefully``) aborts the connection.
    """

    def __init__(self, endpoint: UdtEndpoint, connection: UdtConnection, high_water: int) -> None:
        self.connection = connection
        self._endpoint = endpoint
        self._high_water = high_water
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        #: True while events are left in the core because the buffer is at high water.
        self._throttled = False
        self._established = False
        self._closed: ConnectionClosed | None = None
        self._closing = False  # aclose() was called: the application is done with it
        self._broken: str | None = None  # the endpoint stopped under us
        self._reader: anyio.Event | None = None
        self._writer: anyio.Event | None = None
        self._writer_wants = 0
        # Never more than the send buffer can ever free at once.
        self._wake_bytes = min(_SEND_WAKE_BYTES, endpoint.config.send_buffer_bytes // 4 or 1)
        self._state_waiter: anyio.Event | None = None
        self._receive_guard = anyio.ResourceGuard("reading from")
        self._send_guard = anyio.ResourceGuard("writing to")

    # --- the application's side -------------------------------------------------------

    @property
    def close_reason(self) -> CloseReason | None:
        """Why the connection ended (None while it is open)."""
        return None if self._closed is None else self._closed.reason

    @property
    def close_detail(self) -> str:
        """The core's words on why it ended ('' while open)."""
        return "" if self._closed is None else self._closed.detail

    @property
    def buffered_bytes(self) -> int:
        """Received bytes held for the application (at most about the high-water mark)."""
        return self._buffered

    @property
    def send_blocked(self) -> bool:
        """True while a ``send`` waits for room in the connection's send buffer."""
        return self._writer is not None

    async def receive(self, max_bytes: int = 65536) -> bytes:
        with self._receive_guard:
            await anyio.lowlevel.checkpoint()
            while not self._chunks:
                if self._closing:
                    raise anyio.ClosedResourceError
                if self._closed is not None:
                    if self._closed.reason is CloseReason.PEER_CLOSED:
                        raise anyio.EndOfStream
                    raise anyio.BrokenResourceError(self._ended_text())
                if self._broken is not None:
                    raise anyio.BrokenResourceError(self._broken)
                self._reader = anyio.Event()
                await self._reader.wait()
            return self._take(max_bytes)

    async def send(self, item: bytes) -> None:
        with self._send_guard:
            await anyio.lowlevel.checkpoint()
            connection = self.connection
            total = len(item)
            view = memoryview(item) if total > 0 else None
            offset = 0
            while offset < total:
                self._check_sendable()
                space = connection.send_space
                if space <= 0:
                    self._writer_wants = min(total - offset, self._wake_bytes)
                    self._writer = anyio.Event()
                    try:
                        await self._writer.wait()
                    finally:
                        self._writer = None
                    continue
                if offset == 0 and space >= total:
                    offset = connection.send(item)
                else:
                    assert view is not None
                    offset += connection.send(view[offset : offset + space])
                self._endpoint._kick()

    async def send_eof(self) -> None:
        raise NotImplementedError(
            "UDT4 has no half-close: aclose() closes gracefully (both directions)"
        )

    async def aclose(self) -> None:
        self._closing = True
        # The application will not read again: drop what it left so the close is not
        # stuck behind a full receive buffer.
        self._chunks.clear()
        self._buffered = 0
        self._wake_all()
        connection = self.connection
        endpoint = self._endpoint
        if self._closed is not None or self._broken is not None:
            await anyio.lowlevel.checkpoint()
            return
        try:
            if connection.state in (ConnectionState.CONNECTING, ConnectionState.CONNECTED):
                # The peer may have closed a moment ago: not an error of ours.
                with contextlib.suppress(LocalProtocolError):
                    connection.close(endpoint.now())
            endpoint._kick()
            self._pump()  # with nothing left to send, the close is already complete
            while self._closed is None and self._broken is None:
                await self._state_changed()
        except BaseException:
            # Cancelled (aclose_forcefully, a deadline): do not linger, abort.
            self._abort()
            raise

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        peer = self.connection.peer_address
        local = self._endpoint.local_address
        attributes: dict[Any, Callable[[], Any]] = {
            anyio.abc.SocketAttribute.family: lambda: self._endpoint.family,
            anyio.abc.SocketAttribute.local_address: lambda: local,
            anyio.abc.SocketAttribute.local_port: lambda: local[1],
        }
        if peer is not None:
            attributes[anyio.abc.SocketAttribute.remote_address] = lambda: peer
            attributes[anyio.abc.SocketAttribute.remote_port] = lambda: peer[1]
        return attributes

    # --- the driver's side ------------------------------------------------------------

    def _pump(self) -> None:
        """Take the connection's events while the buffer is below high water; wake waiters."""
        connection = self.connection
        chunks = self._chunks
        closing = self._closing
        while self._buffered < self._high_water:
            event = connection.next_event()
            if event is None:
                self._throttled = False
                break
            if type(event) is DataReceived:
                if not closing and event.data:
                    chunks.append(event.data)
                    self._buffered += len(event.data)
            elif isinstance(event, ConnectionEstablished):
                self._established = True
                log.info(
                    "udt connection %d established with %s (peer socket %d)",
                    connection.socket_id,
                    format_endpoint(event.peer_address),
                    event.peer_socket_id,
                )
            elif isinstance(event, ConnectionClosed):
                self._closed = event
                self._endpoint._forget(self)
                log.info(
                    "udt connection %d closed: %s (%s); %s",
                    connection.socket_id,
                    event.reason.name,
                    event.detail,
                    connection.counters,
                )
        else:
            self._throttled = True
        if self._reader is not None and (chunks or self._closed is not None):
            self._reader.set()
            self._reader = None
        if self._writer is not None and (
            connection.send_space >= self._writer_wants
            or connection.state is not ConnectionState.CONNECTED
        ):
            self._writer.set()
        if self._state_waiter is not None and (self._established or self._closed is not None):
            self._state_waiter.set()
            self._state_waiter = None

    def _break(self, why: str) -> None:
        """The endpoint stopped: every wait of this stream ends with BrokenResourceError."""
        if self._closed is None and self._broken is None:
            self._broken = why
        self._wake_all()

    def _wake_all(self) -> None:
        for waiter in (self._reader, self._writer, self._state_waiter):
            if waiter is not None:
                waiter.set()
        self._reader = self._state_waiter = None

    def _abort(self) -> None:
        connection = self.connection
        if connection.state is not ConnectionState.CLOSED:
            connection.abort(self._endpoint.now())
            self._endpoint._kick()  # its Shutdown goes out on the driver's next turn
            self._pump()  # ConnectionClosed(ABORTED) is waiting: close_reason says so now

    def _take(self, max_bytes: int) -> bytes:
        chunks = self._chunks
        first = chunks[0]
        if len(first) >= max_bytes:
            data = first[:max_bytes]
            if len(first) > max_bytes:
                chunks[0] = first[max_bytes:]
            else:
                chunks.popleft()
        else:
            parts = [chunks.popleft()]
            size = len(first)
            while chunks and size + len(chunks[0]) <= max_bytes:
                chunk = chunks.popleft()
                parts.append(chunk)
                size += len(chunk)
            if chunks and size < max_bytes:
                rest = chunks[0]
                parts.append(rest[: max_bytes - size])
                chunks[0] = rest[max_bytes - size :]
            data = b"".join(parts)
        self._buffered -= len(data)
        if self._throttled and self._buffered < self._high_water:
            # Take the events the core kept for us now: the freed receive buffer then
            # shows in the core's next ACK, and the peer may send again.
            self._pump()
            self._endpoint._kick()
        return data

    def _check_sendable(self) -> None:
        if self._closing:
            raise anyio.ClosedResourceError
        if self._broken is not None:
            raise anyio.BrokenResourceError(self._broken)
        state = self.connection.state
        if state is not ConnectionState.CONNECTED:
            raise anyio.BrokenResourceError(self._ended_text())

    async def _state_changed(self) -> None:
        # Shared: two tasks may wait at once (an aclose while a connect is cancelled).
        if self._state_waiter is None:
            self._state_waiter = anyio.Event()
        await self._state_waiter.wait()

    def _ended_text(self) -> str:
        if self._closed is None:
            return f"udt connection {self.connection.state.name.lower()}"
        return f"udt connection closed: {self._closed.reason.name}: {self._closed.detail}"

    async def _wait_established(self, what: str) -> None:
        try:
            while not self._established and self._closed is None and self._broken is None:
                await self._state_changed()
        except BaseException:
            self._abort()
            raise
        if self._established:
            return
        if self._closed is not None:
            reason, detail = self._closed.reason, self._closed.detail
        else:
            reason, detail = CloseReason.ABORTED, self._broken or "endpoint closed"
        raise UdtConnectError(f"udt {what} failed: {detail}", reason=reason, detail=detail)
