"""``UdtTransport``: one UDT connection of a ``UdtEndpoint`` as an ``asyncio.Transport``.

The endpoint hands each connection's events to its transport
(``_pump``), which calls its ``asyncio.Protocol``: ``connection_made`` once the
handshake is done, ``data_received`` for the bytes in order, ``connection_lost``
at the end (``None`` for a clean close, ``UdtConnectionResetError`` for a reset). It
makes no protocol decision: the core decides flow control, pacing and timeouts.

Backpressure both ways, as asyncio transports do it: ``write`` never blocks; what
the core's send buffer cannot take yet waits here, and above the high-water mark
the protocol is paused (``StreamWriter.drain`` waits) until the core has taken it.
``pause_reading`` stops taking the connection's events: the core counts them as
occupied receive buffer, so the peer's flow window closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

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
    from collections.abc import Callable

    from .udt import UdtEndpoint

__all__ = ["UdtConnectError", "UdtConnectionResetError", "UdtTransport"]

log = logging.getLogger("wavesync.udt")

#: asyncio's defaults for a transport's write buffer (``set_write_buffer_limits``).
_HIGH_WATER = 64 * 1024
#: asyncio's ``LOG_THRESHOLD_FOR_CONNLOST_WRITES``: writes after the end are dropped,
#: and logged once there were this many.
_LOST_WRITES_LOGGED = 5


class UdtConnectionResetError(ConnectionResetError):
    """The connection ended without a clean close: the stream is cut short.

    ``reason`` is ``PEER_ABORTED`` (the peer aborted, or closed with data missing),
    ``TIMEOUT`` (nothing heard for ``UdtConfig.idle_timeout``) or ``ABORTED`` (our
    ``close`` lingered out with data unacknowledged, or the endpoint was closed).
    A ``ConnectionResetError``, not a ``TimeoutError``: an idle timeout must not look
    like the caller's own ``asyncio.timeout`` expiring.
    """

    def __init__(self, message: str, *, reason: CloseReason, detail: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.detail = detail


class UdtTransport(asyncio.Transport):
    """One UDT connection. Made by ``UdtEndpoint``; see the module docstring."""

    def __init__(
        self,
        endpoint: UdtEndpoint,
        connection: UdtConnection,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        *,
        accepted: bool = False,
    ) -> None:
        super().__init__()
        self._accepted = accepted
        self.connection = connection
        self._endpoint = endpoint
        self._factory = protocol_factory
        self._protocol: asyncio.BaseProtocol | None = None
        self._data_received: Callable[[bytes], object] | None = None
        #: Written bytes the core's send buffer could not take yet.
        self._backlog: deque[bytes | memoryview] = deque()
        self._backlog_bytes = 0
        self._high_water = _HIGH_WATER
        self._low_water = _HIGH_WATER // 4
        self._protocol_paused = False
        self._reading_paused = False
        self._closing = False  # close() or abort() was called
        self._aborting = False  # abort(): the end is connection_lost(None), like TCP's
        self._broken: str | None = None  # the endpoint stopped under us
        self._closed: ConnectionClosed | None = None
        self._lost_writes = 0
        #: What opened it, for the error if it never connects ("connect to HOST:PORT").
        self.what = "connection"
        self.established: asyncio.Future[None] = endpoint.loop.create_future()

    # --- asyncio.Transport ------------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """``peername``, ``sockname``, ``udt_connection`` (the core's), ``udt_endpoint``."""
        if name == "peername":
            peer = self.connection.peer_address
            return default if peer is None else peer
        if name == "sockname":
            return self._endpoint.local_address
        if name == "udt_connection":
            return self.connection
        if name == "udt_endpoint":
            return self._endpoint
        return default

    def is_closing(self) -> bool:
        return self._closing or self._closed is not None or self._broken is not None

    def close(self) -> None:
        """Close gracefully: send everything written, wait at most ``UdtConfig.linger`` for
        its acknowledgement, then ``connection_lost(None)`` (or ``UdtConnectionResetError`` if
        the linger ran out). Nothing more is received: bytes that arrive are dropped."""
        if self._closing:
            return
        self._closing = True
        self._reading_paused = False  # drain the events, so the close is not stuck
        self._close_when_written()
        self._endpoint._kick(self)

    def abort(self) -> None:
        """Abort: drop what is unsent or unacknowledged, tell the peer (``PEER_ABORTED``
        there), ``connection_lost(None)`` here."""
        self._closing = self._aborting = True
        self._reading_paused = False
        self._backlog.clear()
        self._backlog_bytes = 0
        if self.connection.state is not ConnectionState.CLOSED:
            self.connection.abort(self._endpoint.now())
        if self._protocol is None:
            self._pump()  # no protocol to call back: the end is known at once
        self._endpoint._kick(self)  # the Shutdown goes out, connection_lost comes, in a turn

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"data must be a bytes-like object, not {type(data).__name__}")
        if not data:
            return
        connection = self.connection
        if (
            self._closing
            or self._closed is not None
            or self._broken is not None
            or connection.state in (ConnectionState.CLOSING, ConnectionState.CLOSED)
        ):
            # asyncio's rule: a write after the end is dropped (connection_lost says why),
            # and logged if it persists.
            self._lost_writes += 1
            if self._lost_writes >= _LOST_WRITES_LOGGED:
                log.warning("udt: write() on a closed or closing transport: data dropped")
            return
        if not isinstance(data, bytes):
            data = bytes(data)  # the caller may change it after write() returns
        if not self._backlog:
            space = connection.send_space
            if space >= len(data):
                taken = connection.send(data)
            else:
                taken = connection.send(memoryview(data)[:space]) if space > 0 else 0
            if taken < len(data):
                rest = memoryview(data)[taken:]
                self._backlog.append(rest)
                self._backlog_bytes += len(rest)
        else:
            self._backlog.append(data)
            self._backlog_bytes += len(data)
        self._endpoint._kick(self)
        if self._backlog_bytes > self._high_water and not self._protocol_paused:
            self._protocol_paused = True
            self._call_protocol("pause_writing")

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        """UDT4 has no half-close: ``close()`` closes gracefully (both directions)."""
        raise NotImplementedError(
            "UDT4 has no half-close: close() closes gracefully (both directions)"
        )

    def get_write_buffer_size(self) -> int:
        """Written bytes the connection's send buffer has not taken yet."""
        return self._backlog_bytes

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (self._low_water, self._high_water)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = _HIGH_WATER if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high_water, self._low_water = high, low

    def pause_reading(self) -> None:
        """Stop taking the connection's events: the peer's window closes as they pile up."""
        if not self._closing:
            self._reading_paused = True

    def resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            # The freed receive buffer shows in the core's next ACK: the peer may send.
            self._endpoint._kick(self)

    def is_reading(self) -> bool:
        return not self._reading_paused and not self.is_closing()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol
        self._data_received = getattr(protocol, "data_received", None)

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._protocol is not None
        return self._protocol

    # --- more than asyncio.Transport ---------------------------------------------------

    @property
    def close_reason(self) -> CloseReason | None:
        """Why the connection ended (None while it is open)."""
        return None if self._closed is None else self._closed.reason

    @property
    def close_detail(self) -> str:
        """The core's words on why it ended ('' while open)."""
        return "" if self._closed is None else self._closed.detail

    def __repr__(self) -> str:
        peer = self.connection.peer_address
        where = "?" if peer is None else format_endpoint(peer)
        return f"<UdtTransport {self.connection.socket_id} to {where} {self.connection.state.name}>"

    # --- the endpoint's side ------------------------------------------------------------

    def _pump(self) -> None:
        """Feed the core what was written, hand its events to the protocol."""
        connection = self.connection
        if self._backlog:
            self._feed_backlog()
        closing = self._closing
        while not self._reading_paused:
            event = connection.next_event()
            if event is None:
                break
            if type(event) is DataReceived:
                receive = self._data_received
                if not closing and receive is not None and event.data:
                    receive(event.data)
            elif isinstance(event, ConnectionEstablished):
                self._on_established(event)
            elif isinstance(event, ConnectionClosed):
                self._on_closed(event)
                return

    def _feed_backlog(self) -> None:
        connection = self.connection
        backlog = self._backlog
        if connection.state is not ConnectionState.CONNECTED:
            return
        while backlog and (space := connection.send_space) > 0:
            item = backlog[0]
            taken = connection.send(item if space >= len(item) else memoryview(item)[:space])
            self._backlog_bytes -= taken
            if taken < len(item):
                backlog[0] = item[taken:]
                break
            backlog.popleft()
        if self._protocol_paused and self._backlog_bytes <= self._low_water:
            self._protocol_paused = False
            self._call_protocol("resume_writing")
        if self._closing and not backlog:
            self._close_when_written()

    def _close_when_written(self) -> None:
        # The core takes no send() after close(): what waits here goes in first.
        connection = self.connection
        if self._backlog or connection.state not in (
            ConnectionState.CONNECTING,
            ConnectionState.CONNECTED,
        ):
            return
        # The peer may have closed a moment ago: not an error of ours.
        with contextlib.suppress(LocalProtocolError):
            connection.close(self._endpoint.now())

    def _on_established(self, event: ConnectionEstablished) -> None:
        log.info(
            "udt connection %d established with %s (peer socket %d)",
            self.connection.socket_id,
            format_endpoint(event.peer_address),
            event.peer_socket_id,
        )
        if self._closing:  # aborted while the handshake ran
            return
        protocol = self._factory()
        self.set_protocol(protocol)
        protocol.connection_made(self)
        if not self.established.done():
            self.established.set_result(None)

    def _on_closed(self, event: ConnectionClosed) -> None:
        self._closed = event
        self._endpoint._forget(self)
        log.info(
            "udt connection %d closed: %s (%s); %s",
            self.connection.socket_id,
            event.reason.name,
            event.detail,
            self.connection.counters,
        )
        self._backlog.clear()
        self._backlog_bytes = 0
        if self._protocol is None:
            self._fail_establishment(event.reason, self._broken or event.detail)
            return
        reason = event.reason
        exc: UdtConnectionResetError | None = None
        if self._broken is not None:
            exc = UdtConnectionResetError(
                f"udt connection closed: {self._broken}",
                reason=CloseReason.ABORTED,
                detail=self._broken,
            )
        elif reason is CloseReason.PEER_CLOSED:
            # No half-close in UDT4: the peer's Shutdown is the end of both directions.
            if not self._closing:
                self._call_protocol("eof_received")
        elif reason is CloseReason.ABORTED and self._aborting:
            pass  # our abort(): like TCP's, connection_lost(None)
        elif reason is not CloseReason.LOCAL_CLOSE:
            exc = UdtConnectionResetError(
                f"udt connection closed: {reason.name}: {event.detail}",
                reason=reason,
                detail=event.detail,
            )
        self._protocol.connection_lost(exc)

    def _fail_establishment(self, reason: CloseReason, detail: str) -> None:
        if not self.established.done():
            self.established.set_exception(
                UdtConnectError(f"udt {self.what} failed: {detail}", reason=reason, detail=detail)
            )
            if self._accepted:
                self.established.exception()  # nobody waits on it: no "never retrieved"

    def _break(self, why: str) -> None:
        """The endpoint is closing: abort, and end with ``UdtConnectionResetError(ABORTED)``."""
        if self._broken is None and self._closed is None:
            self._broken = why
            self._reading_paused = False
            if self.connection.state is not ConnectionState.CLOSED:
                self.connection.abort(self._endpoint.now())
            self._pump()

    def _call_protocol(self, name: str) -> None:
        protocol = self._protocol
        if protocol is None:
            return
        try:
            getattr(protocol, name)()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._endpoint.loop.call_exception_handler(
                {
                    "message": f"protocol.{name}() failed",
                    "exception": exc,
                    "transport": self,
                    "protocol": protocol,
                }
            )
