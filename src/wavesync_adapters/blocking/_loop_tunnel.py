"""One HTTP tunnel inside a daemon's selector loop: its legs and its socket-pair end.

``LoopTunnel`` holds a tunnel method's machine (``wavesync_proto.tunnel``), the
connections that carry it (one, or a getpost GET and its POSTs) and the outer end of
the socket pair whose other end the daemon serves; it copies between the two in the
loop's thread, at most ``HIGH_WATER`` bytes held each way. Split from
``tunnel_server.py``, which accepts connections, reads their first request and makes
the tunnels.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import select
import socket
import ssl
from typing import TYPE_CHECKING

from wavesync_proto.tunnel import (
    StreamData,
    StreamEnded,
    TunnelEndpoint,
    TunnelFailed,
    TunnelKind,
    TunnelMethod,
    TunnelState,
)
from wavesync_proto.tunnel.echo import EchoAnswer, EchoReader

from ._loop import EVENT_READ, EVENT_WRITE, LoopConnection

if TYPE_CHECKING:
    from .tunnel_server import TunnelServer

__all__ = ["HIGH_WATER", "RECEIVE_BYTES", "LoopTunnel"]

log = logging.getLogger("wavesync.tunnel.server")

RECEIVE_BYTES = 65536
#: Bytes held in either direction before the side that fills it stops being read.
HIGH_WATER = 1 << 20
_RAW = (TunnelMethod.UPGRADE, TunnelMethod.CONNECT)


class LoopTunnel:
    """One tunnel's machine, its legs, and the socket pair end it is copied to and from."""

    def __init__(
        self,
        server: TunnelServer,
        *,
        key: int,
        machine: TunnelEndpoint,
        kind: TunnelKind,
        leg: LoopConnection,
        tunnel_id: bytes | None,
    ) -> None:
        self.server = server
        self._loop = server._loop
        self.key = key
        self.machine = machine
        self.kind = kind
        self.tunnel_id = tunnel_id
        self.legs: dict[int, LoopConnection] = {}
        self._own(0, leg)
        self._shut: set[int] = set()
        self.failure: TunnelFailed | None = None
        self._echo: EchoReader | None = EchoReader()
        #: Stream bytes for the pair end, and the peer's end of its direction.
        self._to_pair = bytearray()
        self._peer_ended = False
        self._outer: socket.socket | None = None
        self._pair_shut = False  # the peer's end was passed on
        self._pair_eof = False  # the daemon's end ended its direction
        self.linger_until: float | None = None
        self.finished = False

    def _own(self, number: int, leg: LoopConnection) -> None:
        leg.ready = functools.partial(self._ready, number)
        self.legs[number] = leg

    @property
    def buffered(self) -> int:
        return len(self._to_pair) + sum(len(leg.out) for leg in self.legs.values())

    def attach(self, outer: socket.socket) -> None:
        self._outer = outer
        self.pump()

    def add_leg(self, number: int, leg: LoopConnection) -> None:
        self._own(number, leg)

    # --- moving bytes ------------------------------------------------------------------------

    def _absorb(self) -> None:
        while (event := self.machine.next_event()) is not None:
            if isinstance(event, StreamData):
                self._stream_bytes(event.data)
            elif isinstance(event, StreamEnded):
                if self._echo is not None:
                    self._stream_bytes(b"")
                self._peer_ended = True
            elif isinstance(event, TunnelFailed) and self.failure is None:
                self.failure = event

    def _stream_bytes(self, data: bytes) -> None:
        if self._echo is None:
            self._to_pair += data
            return
        decision = self._echo.feed(data)
        if decision is None:
            return
        self._echo = None
        if isinstance(decision, EchoAnswer):
            self.machine.send(decision.answer)
            self._to_pair += decision.rest
        else:
            self._to_pair += decision.data

    def pump(self) -> None:
        """Take the machine's events, write what can be written, and watch what is next."""
        if self.finished:
            return
        self._absorb()
        try:
            self._write_legs()
        except ssl.SSLError as exc:
            self._lost(exc)
        if self.failure is not None:
            self._close_outer()  # the daemon sees its connection end
            if self.linger_until is None:
                self.server._linger(self)
        self._write_pair()
        self._maybe_done()
        if not self.finished:
            self._rewatch()

    def _write_legs(self) -> None:
        machine = self.machine
        for number, leg in list(self.legs.items()):
            if leg.closed:
                continue
            if number not in self._shut:
                leg.write(machine.data_to_send(number))
                if machine.eof_to_send(number):
                    self._shut.add(number)
            try:
                flushed = leg.flush()
            except OSError as exc:
                self._lost(exc, number)
                leg.close(self._loop)
                continue
            if number not in self._shut or not flushed:
                continue
            if number == 0 and machine.state is TunnelState.OPEN:
                if not leg.half_closed:
                    leg.half_close()  # our direction ended, the peer's goes on
            else:
                leg.close(self._loop)  # a finished POST, or the whole tunnel ended

    def _lost(self, exc: BaseException, number: int = 0) -> None:
        if self.failure is None and self.machine.state is not TunnelState.CLOSED:
            self.failure = TunnelFailed(reason=f"leg {number} broke: {exc!r}")

    def _write_pair(self) -> None:
        outer = self._outer
        if outer is None:
            return
        buffer = self._to_pair
        while buffer:
            try:
                sent = outer.send(buffer)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._pair_gone()
                return
            del buffer[:sent]
        if self._peer_ended and not self._pair_shut:
            self._pair_shut = True
            with contextlib.suppress(OSError):
                outer.shutdown(socket.SHUT_WR)
        if self._pair_shut and self._pair_eof:
            self._close_outer()

    def _pair_gone(self) -> None:
        """The daemon closed its end: end our direction and let the legs drain."""
        self._close_outer()
        if self.machine.state is TunnelState.OPEN:
            self.machine.close()
            self._write_legs()

    def _close_outer(self) -> None:
        if self._outer is not None:
            self._loop.unwatch(self._outer)
            self._outer.close()
            self._outer = None
            # What the legs still hold gets a moment to go out, no more.
            if self.linger_until is None:
                self.server._linger(self)

    def _read_leg(self, number: int, leg: LoopConnection) -> None:
        try:
            data = leg.read()
        except ssl.SSLError as exc:
            self._lost(exc, number)
            return
        if data is None:
            return
        self.machine.receive_data(data, number)
        if not data and (number != 0 or self.machine.state is not TunnelState.OPEN):
            leg.close(self._loop)

    def _read_pair(self) -> None:
        assert self._outer is not None
        try:
            data = self._outer.recv(RECEIVE_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            if self.machine.state in (TunnelState.HANDSHAKE, TunnelState.OPEN):
                self.machine.send(data)
            return
        self._pair_eof = True
        if (self.kind.tls and self.kind.method in _RAW) or self._daemon_closed():
            # The daemon is done with the whole stream (or TLS cannot pass a half-close).
            self._pair_gone()
            return
        if self.machine.state is TunnelState.OPEN:
            self.machine.close()
        self.server._check_later(self)

    def _daemon_closed(self) -> bool:
        """Whether the daemon closed its end outright rather than ending its direction.

        The pair's end says so by a hang-up (both directions shut), which the loop's
        selector reports only to a socket it watches; so a half-closed pair is asked
        now and then (``on_deadline``), and one whose daemon went is let go, as anyio's
        face lets go once its handler returns.
        """
        outer = self._outer
        if outer is None or not hasattr(select, "poll"):
            return outer is None
        poller = select.poll()
        poller.register(outer, select.POLLOUT)
        return any(events & select.POLLHUP for _, events in poller.poll(0))

    def on_deadline(self, now: float) -> None:
        if self.linger_until is not None and self.linger_until <= now:
            self.close_now()
        elif self._outer is not None and self._pair_eof and not self._pair_shut:
            if self._daemon_closed():
                self._pair_gone()
                self.pump()
            else:
                self.server._check_later(self)

    def _ready(self, number: int, mask: int) -> None:
        leg = self.legs.get(number)
        if leg is None or leg.closed:
            return
        if mask & EVENT_READ:
            self._read_leg(number, leg)
        self.pump()

    def _pair_ready(self, mask: int) -> None:
        if self._outer is None:
            return
        if mask & EVENT_READ:
            self._read_pair()
        self.pump()

    def _rewatch(self) -> None:
        loop = self._loop
        room = len(self._to_pair) < HIGH_WATER
        pending_out = 0
        for leg in self.legs.values():
            if leg.closed:
                continue
            pending_out += len(leg.out)
            events = EVENT_WRITE if leg.out else 0
            if room and not leg.read_eof:
                events |= EVENT_READ
            loop.watch(leg.sock, events, leg.ready)
        outer = self._outer
        if outer is not None:
            events = EVENT_WRITE if self._to_pair else 0
            if not self._pair_eof and pending_out < HIGH_WATER:
                events |= EVENT_READ
            loop.watch(outer, events, self._pair_ready)

    def _maybe_done(self) -> None:
        for number, leg in list(self.legs.items()):
            if leg.closed:
                del self.legs[number]
        over = self.failure is not None or self.machine.state is TunnelState.CLOSED
        drained = not any(leg.out for leg in self.legs.values())
        if self._outer is None and (not self.legs or (over and drained)):
            self.close_now()

    def close_now(self) -> None:
        """Close every leg and the pair end, whatever is still in flight."""
        if self.finished:
            return
        self.finished = True
        self._close_outer()
        for leg in self.legs.values():
            leg.close(self._loop)
        self.legs.clear()
        self.server._ended(self)
