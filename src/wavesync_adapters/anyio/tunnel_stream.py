"""``TunnelStream``: a tunnel machine (``wavesync_proto.tunnel``) and its legs as one ByteStream.

The machine decides everything: what goes on which leg, when a leg ends, when
the stream has ended or failed. This module moves bytes between the legs (TCP
or TLS streams) and the machine, opens the legs getpost asks for, and turns the
machine's events into anyio's stream results. A leg is read by whoever waits
on it: the client's ``receive`` reads leg 0 itself; on the server, each leg's
connection task feeds what it reads (``feed_leg``), and ``receive`` waits.

No write waits behind another task's write: the task that holds a leg's
lock writes everything the machine has for that leg before letting go, and a
reader that finds the lock taken leaves its bytes (a websocket Pong, a 204) to
that task, so a ``receive`` never blocks on a peer that is not reading.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel

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
from wavesync_proto.tunnel.echo import EchoAnswer, EchoReader

__all__ = ["LegOpener", "TunnelStream"]

RECEIVE_BYTES = 65536
#: Received stream bytes held for the application before the server's leg tasks stop reading.
HIGH_WATER = 1 << 20
#: How long ``aclose`` waits for the answer to a getpost POST that carried the last chunk.
CLOSE_LINGER = 2.0

LegOpener = Callable[[], Awaitable[anyio.abc.ByteStream]]

_RAW = (TunnelMethod.UPGRADE, TunnelMethod.CONNECT)
_CLOSED_ERRORS = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


class TunnelStream(anyio.abc.ByteStream):
    """One tunnel as an anyio byte stream; ``kind`` says which method carries it.

    ``receive`` raises ``anyio.EndOfStream`` once the peer ended its direction
    cleanly, ``anyio.BrokenResourceError`` (with the machine's reason) when the
    tunnel failed. ``send_eof`` ends our direction in band (websocket, getpost)
    or by a TCP half-close (upgrade, connect; not over TLS, which has none).
    """

    def __init__(
        self,
        machine: TunnelEndpoint,
        kind: TunnelKind,
        *,
        legs: dict[int, anyio.abc.ByteStream],
        reads_leg_zero: bool,
        open_leg: LegOpener | None = None,
        answers_echo: bool = False,
    ) -> None:
        """``reads_leg_zero``: ``receive`` reads leg 0 itself (else leg tasks call
        ``feed_leg``); ``open_leg`` opens a getpost POST leg (the client);
        ``answers_echo``: answer a probe's echo at the stream's start (the server)."""
        self.machine = machine
        self.kind = kind
        self._legs = legs
        self._locks: dict[int, anyio.Lock] = {}
        self._shut: set[int] = set()
        self._reads_leg_zero = reads_leg_zero
        self._open_leg = open_leg
        self._opening: list[int] = []
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._established = False
        self._ended = False
        self._failure: TunnelFailed | None = None
        self._closed = False
        self._leg_zero_eof = False
        self._eof_sent = False
        self._echo = EchoReader() if answers_echo else None
        self._readable = anyio.Event()
        self._room = anyio.Event()
        self._receive_guard = anyio.ResourceGuard("reading from")
        self._send_guard = anyio.ResourceGuard("writing to")
        #: The server's leg tasks, cancelled when the stream closes.
        self.leg_scopes: set[anyio.CancelScope] = set()
        first = legs.get(0)
        self._extra: Mapping[Any, Callable[[], Any]] = (
            {} if first is None else first.extra_attributes
        )

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        """Leg 0's (its TCP connection's addresses, on the server the peer's or its
        proxy's)."""
        return self._extra

    # --- what the machine says -------------------------------------------------------

    @property
    def established(self) -> bool:
        return self._established

    @property
    def failure(self) -> TunnelFailed | None:
        return self._failure

    def absorb(self) -> None:
        """Take every event the machine has; stream bytes go to the application's buffer."""
        while (event := self.machine.next_event()) is not None:
            if isinstance(event, StreamData):
                self._chunks.append(event.data)
                self._buffered += len(event.data)
            elif isinstance(event, StreamEnded):
                self._ended = True
            elif isinstance(event, TunnelFailed):
                self._failure = event
            elif isinstance(event, OpenLeg):
                self._opening.append(event.leg)
            elif isinstance(event, TunnelEstablished):
                self._established = True
        self._readable.set()

    async def flush(self, *, wait: bool = True) -> None:
        """Open the legs the machine asked for, write what it has for every leg, shut the
        legs it is done with. ``wait=False``: skip a leg another task is writing."""
        while self._opening:
            leg = self._opening.pop(0)
            assert self._open_leg is not None, "only a getpost client opens legs"
            opened = await self._open_leg()
            if self._closed:
                # aclose() ran while this leg was connecting and closed the others.
                with anyio.CancelScope(shield=True):
                    await anyio.aclose_forcefully(opened)
                raise anyio.ClosedResourceError
            self._legs[leg] = opened
        for leg in list(self._legs):
            await self._flush_leg(leg, wait=wait)

    async def _flush_leg(self, leg: int, *, wait: bool) -> None:
        lock = self._locks.setdefault(leg, anyio.Lock())
        if wait:
            await lock.acquire()
        else:
            try:
                lock.acquire_nowait()
            except anyio.WouldBlock:
                return  # the holder writes everything before it lets go
        try:
            stream = self._legs.get(leg)
            while stream is not None and leg not in self._shut:
                data = self.machine.data_to_send(leg)
                if data:
                    try:
                        await stream.send(data)
                    except _CLOSED_ERRORS as exc:
                        self._leg_lost(leg, exc)
                        return
                    continue
                if self.machine.eof_to_send(leg):
                    self._shut.add(leg)
                    await self._shut_leg(leg, stream)
                break
        finally:
            lock.release()

    async def _shut_leg(self, leg: int, stream: anyio.abc.ByteStream) -> None:
        if leg == 0 and self.machine.state is TunnelState.OPEN:
            # Our direction ended, the peer's goes on: a half-close where the transport has one.
            with contextlib.suppress(NotImplementedError, *_CLOSED_ERRORS):
                await stream.send_eof()
            return
        # A finished getpost POST, or the whole tunnel ended: nothing more to read here.
        self._legs.pop(leg, None)
        await anyio.aclose_forcefully(stream)

    def _leg_lost(self, leg: int, exc: BaseException) -> None:
        if self._failure is None and self.machine.state is not TunnelState.CLOSED:
            self._failure = TunnelFailed(reason=f"leg {leg} broke: {exc!r}")
        self._readable.set()

    async def feed_leg(self, leg: int, data: bytes) -> None:
        """What leg ``leg``'s task read (``b""``: its end); waits while the buffer is full."""
        self.machine.receive_data(data, leg)
        self.absorb()
        await self.flush(wait=False)
        while self._buffered > HIGH_WATER and not self._closed:
            self._room = anyio.Event()
            await self._room.wait()

    def push_front(self, data: bytes) -> None:
        """Give back stream bytes read ahead (what followed the probe's echo)."""
        if data:
            self._chunks.appendleft(data)
            self._buffered += len(data)

    def take_buffered(self) -> bytes:
        """Every received stream byte not yet read, taken out of the stream."""
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        return data

    def add_leg(self, leg: int, stream: anyio.abc.ByteStream) -> None:
        """A server's getpost POST joined the tunnel as ``leg``."""
        self._legs[leg] = stream

    def has_leg(self, leg: int) -> bool:
        return leg in self._legs and leg not in self._shut

    async def _read_leg(self, leg: int) -> bytes:
        stream = self._legs[leg]
        try:
            return await stream.receive(RECEIVE_BYTES)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            return b""

    async def pump_leg_zero(self) -> None:
        """Read leg 0 once and hand it to the machine (the client's handshake and receive)."""
        data = await self._read_leg(0)
        if not data:
            if self._leg_zero_eof:
                self._leg_lost(0, anyio.EndOfStream())
                return
            self._leg_zero_eof = True
        self.machine.receive_data(data, 0)
        self.absorb()
        await self.flush(wait=False)

    # --- the application's side ------------------------------------------------------

    async def receive(self, max_bytes: int = RECEIVE_BYTES) -> bytes:
        with self._receive_guard:
            while True:
                await self._fill()
                if self._echo is None:
                    break
                decision = self._echo.feed(self._take(RECEIVE_BYTES) if self._chunks else b"")
                if decision is None:
                    continue
                self._echo = None
                if isinstance(decision, EchoAnswer):
                    self.machine.send(decision.answer)  # the handler's send_guard is not ours
                    await self.flush()
                    data = decision.rest
                else:
                    data = decision.data
                self.push_front(data)
            if not self._chunks:
                await anyio.lowlevel.checkpoint()
                self._raise_end()
            return self._take(max_bytes)

    async def _fill(self) -> None:
        """Wait until stream bytes are buffered or the stream has ended (either way)."""
        while not self._chunks:
            if self._closed:
                raise anyio.ClosedResourceError
            if self._ended or self._failure is not None:
                return
            if self._reads_leg_zero:
                await self.pump_leg_zero()
            else:
                self._readable = anyio.Event()
                await self._readable.wait()

    def _raise_end(self) -> None:
        if self._failure is not None:
            raise anyio.BrokenResourceError(f"{self.kind} tunnel: {self._failure.reason}")
        raise anyio.EndOfStream

    def _take(self, max_bytes: int) -> bytes:
        data = self._chunks.popleft()
        if len(data) > max_bytes:
            self._chunks.appendleft(data[max_bytes:])
            data = data[:max_bytes]
        self._buffered -= len(data)
        if self._buffered <= HIGH_WATER:
            self._room.set()
        return data

    async def send(self, item: bytes) -> None:
        with self._send_guard:
            if self._closed:
                raise anyio.ClosedResourceError
            if self._failure is not None:
                raise anyio.BrokenResourceError(f"{self.kind} tunnel: {self._failure.reason}")
            try:
                self.machine.send(item)
            except Exception as exc:  # LocalProtocolError: sent after send_eof
                raise anyio.ClosedResourceError(str(exc)) from exc
            await self.flush()
            await self._wait_for_post_answers(final=False)
            if self._failure is not None:
                raise anyio.BrokenResourceError(f"{self.kind} tunnel: {self._failure.reason}")

    async def _wait_for_post_answers(self, *, final: bool) -> None:
        """getpost client: read the POST leg whose answer the upstream waits for.

        A full body's answer (one round trip per ``post_length`` bytes) is waited for
        here; the answer to the body with the last chunk only when closing (``final``).
        """
        machine = self.machine
        if not isinstance(machine, GetPostClient):
            return
        while (leg := machine.awaiting_answer) is not None and self._failure is None:
            if (self._eof_sent and not final) or leg not in self._legs:
                return
            data = await self._read_leg(leg)
            machine.receive_data(data, leg)
            self.absorb()
            await self.flush()
            if not data:
                return

    async def send_eof(self) -> None:
        """End our direction. NotImplementedError for upgrade and connect over TLS: their end
        is the transport's half-close, which TLS does not have (use websocket or getpost)."""
        if self.kind.tls and self.kind.method in _RAW:
            raise NotImplementedError(f"{self.kind} cannot half-close: TLS has no half-close")
        if self._eof_sent or self._closed:
            return
        self._eof_sent = True
        self.machine.close()
        await self.flush()

    async def aclose(self) -> None:
        if self._closed:
            return
        try:
            if self._failure is None and self.machine.state is TunnelState.OPEN:
                with anyio.move_on_after(CLOSE_LINGER, shield=True):
                    self._eof_sent = True
                    self.machine.close()
                    await self.flush()
                    await self._wait_for_post_answers(final=True)
        finally:
            self._closed = True
            for scope in self.leg_scopes:
                scope.cancel()
            self._readable.set()
            self._room.set()
            # Shielded: under a cancel from outside, each aclose_forcefully raises the
            # Cancelled once its leg is closed, which would leave the other legs open.
            with anyio.CancelScope(shield=True):
                for stream in list(self._legs.values()):
                    await anyio.aclose_forcefully(stream)
            self._legs.clear()
