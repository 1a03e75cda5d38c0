"""``TunnelStream`` on asyncio: a tunnel machine (``wavesync_proto.tunnel``) and its legs.

The twin of ``wavesync_adapters.anyio.tunnel_stream`` (uvloop too; no anyio import).
The machine decides everything: what goes on which leg, when a leg ends, when the
stream has ended or failed. ``TunnelStream`` moves bytes between the legs (asyncio
stream pairs, TCP or TLS) and the machine, and opens the legs getpost asks for;
``TunnelTransport`` puts an ``asyncio.Transport`` over it, so the application gets
the ``(StreamReader, StreamWriter)`` pair (or the protocol) it gets for plain TCP.

The transport runs two tasks of its own, one reading the stream into the protocol and
one writing the protocol's bytes into the stream; both end (cancelled or finished)
by the time the protocol's ``connection_lost`` is called. Writes: no write waits
behind another task's write, as in the anyio twin: a leg's lock holder writes
everything the machine has for it, and a reader that finds the lock taken leaves its
bytes to that holder.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from wavesync_proto.tunnel import (
    GetPostClient,
    OpenLeg,
    StreamData,
    StreamEnded,
    TunnelEndpoint,
    TunnelEstablished,
    TunnelFailed,
    TunnelKind,
    TunnelMethod,
    TunnelState,
)

__all__ = ["Leg", "LegOpener", "TunnelStream", "TunnelTransport"]

RECEIVE_BYTES = 65536
#: How long closing waits for the answer to a getpost POST that carried the last chunk.
CLOSE_LINGER = 2.0
#: The transport's write buffer: above HIGH the protocol is paused, below LOW resumed.
WRITE_HIGH_WATER = 1 << 20
WRITE_LOW_WATER = 1 << 18

#: Gracefully closed legs ``aclose`` still waits for: getpost closes one per POST.
_CLOSING_LEGS_KEPT = 8

_RAW = (TunnelMethod.UPGRADE, TunnelMethod.CONNECT)


@dataclass(eq=False)
class Leg:
    """One TCP (or TLS) connection of a tunnel."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def receive(self) -> bytes:
        """Up to RECEIVE_BYTES; ``b""`` at its end, whichever way it ended."""
        try:
            return await self.reader.read(RECEIVE_BYTES)
        except OSError:
            return b""

    def half_close(self) -> None:
        # TLS has no half-close: there the end is the tunnel's (upgrade and connect only).
        if self.writer.can_write_eof():
            with contextlib.suppress(OSError, RuntimeError):
                self.writer.write_eof()

    def close(self) -> None:
        """Close after what is buffered has gone (a getpost POST's body, the last chunk)."""
        self.writer.close()

    def abort(self) -> None:
        """Close now, buffered bytes or not (a TLS leg sends no close_notify)."""
        self.writer.transport.abort()


LegOpener = Callable[[], Awaitable[Leg]]


class TunnelClosedError(ConnectionAbortedError):
    """The tunnel was closed on our side."""


class TunnelStream:
    """One client tunnel as a byte stream; ``kind`` says which method carries it.

    ``receive`` returns ``b""`` once the peer ended its direction cleanly and raises
    ``ConnectionResetError`` (with the machine's reason) when the tunnel failed.
    ``send_eof`` ends our direction in band (websocket, getpost) or by a TCP
    half-close (upgrade, connect; not over TLS, which has none).
    """

    def __init__(
        self,
        machine: TunnelEndpoint,
        kind: TunnelKind,
        *,
        legs: dict[int, Leg],
        open_leg: LegOpener | None = None,
    ) -> None:
        """``open_leg`` opens a getpost POST leg."""
        self.machine = machine
        self.kind = kind
        self._legs = legs
        self._locks: dict[int, asyncio.Lock] = {}
        self._shut: set[int] = set()
        self._open_leg = open_leg
        self._opening: list[int] = []
        self._chunks: deque[bytes] = deque()
        self._established = False
        self._ended = False
        self._failure: TunnelFailed | None = None
        self._closed = False
        self._leg_zero_eof = False
        self._eof_sent = False
        #: Legs closed gracefully (a TLS shutdown takes a round trip) that ``aclose`` waits for.
        self._closing_legs: list[Leg] = []

    @property
    def established(self) -> bool:
        return self._established

    @property
    def failure(self) -> TunnelFailed | None:
        return self._failure

    def leg_zero(self) -> Leg | None:
        return self._legs.get(0)

    def absorb(self) -> None:
        """Take every event the machine has; stream bytes go to the application's buffer."""
        while (event := self.machine.next_event()) is not None:
            if isinstance(event, StreamData):
                self._chunks.append(event.data)
            elif isinstance(event, StreamEnded):
                self._ended = True
            elif isinstance(event, TunnelFailed):
                self._failure = event
            elif isinstance(event, OpenLeg):
                self._opening.append(event.leg)
            elif isinstance(event, TunnelEstablished):
                self._established = True

    async def flush(self, *, wait: bool = True) -> None:
        """Open the legs the machine asked for, write what it has for every leg, shut the
        legs it is done with. ``wait=False``: skip a leg another task is writing."""
        while self._opening:
            leg = self._opening.pop(0)
            assert self._open_leg is not None, "only a getpost client opens legs"
            opened = await self._open_leg()
            if self._closed:
                # close() ran while this leg was connecting and closed the others.
                opened.writer.transport.abort()
                raise TunnelClosedError("the tunnel is closed")
            self._legs[leg] = opened
        for leg in list(self._legs):
            await self._flush_leg(leg, wait=wait)

    async def _flush_leg(self, leg: int, *, wait: bool) -> None:
        lock = self._locks.setdefault(leg, asyncio.Lock())
        if not wait and lock.locked():
            return  # the holder writes everything before it lets go
        async with lock:
            stream = self._legs.get(leg)
            while stream is not None and leg not in self._shut:
                data = self.machine.data_to_send(leg)
                if data:
                    try:
                        await stream.send(data)
                    except OSError as exc:
                        self._leg_lost(leg, exc)
                        return
                    continue
                if self.machine.eof_to_send(leg):
                    self._shut.add(leg)
                    self._shut_leg(leg, stream)
                break

    def _shut_leg(self, leg: int, stream: Leg) -> None:
        if leg == 0 and self.machine.state is TunnelState.OPEN:
            # Our direction ended, the peer's goes on: a half-close where the transport has one.
            stream.half_close()
            return
        # A finished getpost POST, or the whole tunnel ended: nothing more to read here.
        self._legs.pop(leg, None)
        stream.close()
        self._closing_legs.append(stream)
        if len(self._closing_legs) > _CLOSING_LEGS_KEPT:
            # Closed POST legs after so many later ones: long done (abort is a no-op then).
            self._closing_legs.pop(0).abort()

    def _leg_lost(self, leg: int, exc: BaseException) -> None:
        if self._failure is None and self.machine.state is not TunnelState.CLOSED:
            self._failure = TunnelFailed(reason=f"leg {leg} broke: {exc!r}")

    def push_front(self, data: bytes) -> None:
        """Give back stream bytes read ahead (what followed the probe's echo)."""
        if data:
            self._chunks.appendleft(data)

    def take_buffered(self) -> bytes:
        """Every received stream byte not yet read, taken out of the stream."""
        data = b"".join(self._chunks)
        self._chunks.clear()
        return data

    async def pump_leg_zero(self) -> None:
        """Read leg 0 once and hand it to the machine (the handshake, and ``receive``)."""
        data = await self._legs[0].receive() if 0 in self._legs else b""
        if not data:
            if self._leg_zero_eof:
                self._leg_lost(0, EOFError())
                return
            self._leg_zero_eof = True
        self.machine.receive_data(data, 0)
        self.absorb()
        await self.flush(wait=False)

    # --- the application's side ------------------------------------------------------

    async def receive(self) -> bytes:
        while not self._chunks:
            if self._closed:
                raise TunnelClosedError("the tunnel is closed")
            if self._failure is not None:
                raise ConnectionResetError(f"{self.kind} tunnel: {self._failure.reason}")
            if self._ended:
                return b""
            await self.pump_leg_zero()
        return self._chunks.popleft()

    async def send(self, data: bytes) -> None:
        if self._closed:
            raise TunnelClosedError("the tunnel is closed")
        if self._failure is not None:
            raise ConnectionResetError(f"{self.kind} tunnel: {self._failure.reason}")
        try:
            self.machine.send(data)
        except Exception as exc:  # LocalProtocolError: sent after send_eof
            raise TunnelClosedError(str(exc)) from exc
        await self.flush()
        await self._wait_for_post_answers(final=False)
        if self._failure is not None:
            raise ConnectionResetError(f"{self.kind} tunnel: {self._failure.reason}")

    async def _wait_for_post_answers(self, *, final: bool) -> None:
        """getpost: read the POST leg whose answer the upstream waits for.

        A full body's answer (one round trip per ``post_length`` bytes) is waited for
        here; the answer to the body with the last chunk only when closing (``final``).
        """
        machine = self.machine
        if not isinstance(machine, GetPostClient):
            return
        while (leg := machine.awaiting_answer) is not None and self._failure is None:
            if (self._eof_sent and not final) or leg not in self._legs:
                return
            data = await self._legs[leg].receive()
            machine.receive_data(data, leg)
            self.absorb()
            await self.flush()
            if not data:
                return

    def can_send_eof(self) -> bool:
        """upgrade and connect over TLS cannot: their end is the transport's half-close,
        which TLS does not have (use websocket or getpost)."""
        return not (self.kind.tls and self.kind.method in _RAW)

    async def send_eof(self) -> None:
        if not self.can_send_eof():
            raise NotImplementedError(f"{self.kind} cannot half-close: TLS has no half-close")
        if self._eof_sent or self._closed:
            return
        self._eof_sent = True
        self.machine.close()
        await self.flush()

    async def aclose(self) -> None:
        """End the tunnel in band when it is open, close every leg and wait until each has
        closed; all within CLOSE_LINGER, after which the legs left are aborted."""
        if self._closed:
            return
        try:
            async with asyncio.timeout(CLOSE_LINGER):
                if self._failure is None and self.machine.state is TunnelState.OPEN:
                    with contextlib.suppress(OSError):
                        self._eof_sent = True
                        self.machine.close()
                        await self.flush()
                        await self._wait_for_post_answers(final=True)
                self._closed = True
                for leg in self._legs.values():
                    leg.close()
                self._closing_legs.extend(self._legs.values())
                self._legs.clear()
                for leg in self._closing_legs:
                    with contextlib.suppress(OSError):
                        await leg.writer.wait_closed()
        except TimeoutError:
            pass
        finally:
            self.abort()

    def abort(self) -> None:
        """Close every leg now (the ones still closing too)."""
        self._closed = True
        for leg in [*self._legs.values(), *self._closing_legs]:
            leg.abort()
        self._legs.clear()
        self._closing_legs.clear()


class TunnelTransport(asyncio.Transport):
    """A ``TunnelStream`` as an asyncio transport: ``write`` goes into the tunnel, what
    the tunnel carries goes to the protocol's ``data_received``.

    ``get_extra_info``: ``peername``/``sockname`` are leg 0's (the proxy's
    or the tunnel server's address), ``tunnel_kind`` the tunnel's ``TunnelKind``.
    """

    def __init__(self, stream: TunnelStream, protocol: asyncio.BaseProtocol) -> None:
        super().__init__()
        self._stream = stream
        self._protocol = protocol
        self._loop = asyncio.get_running_loop()
        self._outgoing = bytearray()
        self._has_outgoing = asyncio.Event()
        self._eof_wanted = False
        self._closing = False
        self._lost = False
        self._reading_allowed = asyncio.Event()
        self._reading_allowed.set()
        self._writing_paused = False
        leg = stream.leg_zero()
        self._extra: dict[str, Any] = {"tunnel_kind": stream.kind}
        if leg is not None:
            # Not "sslcontext": StreamReaderProtocol would take the tunnel for a TLS
            # transport and close it at the peer's half-close.
            for name in ("peername", "sockname"):
                self._extra[name] = leg.writer.get_extra_info(name)
        self._tasks: set[asyncio.Task[None]] = set()
        protocol.connection_made(self)
        self._spawn(self._read())
        self._spawn(self._write())

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- the tasks -------------------------------------------------------------------

    async def _read(self) -> None:
        try:
            while True:
                await self._reading_allowed.wait()
                data = await self._stream.receive()
                if not data:
                    break
                self._protocol.data_received(data)  # type: ignore[attr-defined]
        except Exception as exc:  # a broken tunnel, or the protocol's own bug: both fatal
            if not self._closing:  # while closing, the legs' end is ours
                self._lose(exc)
            return
        keep_open = self._protocol.eof_received()  # type: ignore[attr-defined]
        if not keep_open:
            self.close()

    async def _write(self) -> None:
        try:
            while True:
                if self._outgoing:
                    data = bytes(self._outgoing)
                    self._outgoing.clear()
                    await self._stream.send(data)
                    self._maybe_resume_writing()
                elif self._eof_wanted:
                    self._eof_wanted = False
                    await self._stream.send_eof()
                elif self._closing:
                    break
                else:
                    self._has_outgoing.clear()
                    await self._has_outgoing.wait()
            await self._stream.aclose()
        except Exception as exc:  # the protocol hears of any failure, none dies unseen
            self._lose(exc)
            return
        self._lose(None)

    def _lose(self, exc: Exception | None) -> None:
        """The end: the tasks stop, the legs close, the protocol hears of it once."""
        if self._lost:
            return
        self._lost = True
        self._closing = True
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        self._stream.abort()
        self._outgoing.clear()
        self._loop.call_soon(self._protocol.connection_lost, exc)

    # --- asyncio.Transport ------------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._extra.get(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Write what is buffered, end the tunnel in band, then close its legs."""
        if self._closing:
            return
        self._closing = True
        self._reading_allowed.set()
        self._has_outgoing.set()

    def abort(self) -> None:
        self._lose(None)

    def is_reading(self) -> bool:
        return self._reading_allowed.is_set() and not self._closing

    def pause_reading(self) -> None:
        self._reading_allowed.clear()

    def resume_reading(self) -> None:
        self._reading_allowed.set()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing:
            return  # as asyncio's own transports: a write after close is dropped
        if not data:
            return
        self._outgoing += data
        self._has_outgoing.set()
        if not self._writing_paused and len(self._outgoing) > WRITE_HIGH_WATER:
            self._writing_paused = True
            self._protocol.pause_writing()

    def _maybe_resume_writing(self) -> None:
        if self._writing_paused and len(self._outgoing) <= WRITE_LOW_WATER:
            self._writing_paused = False
            self._protocol.resume_writing()

    def can_write_eof(self) -> bool:
        return self._stream.can_send_eof()

    def write_eof(self) -> None:
        if not self.can_write_eof():
            raise NotImplementedError(f"{self._stream.kind} cannot half-close")
        self._eof_wanted = True
        self._has_outgoing.set()

    def get_write_buffer_size(self) -> int:
        return len(self._outgoing)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (WRITE_LOW_WATER, WRITE_HIGH_WATER)
