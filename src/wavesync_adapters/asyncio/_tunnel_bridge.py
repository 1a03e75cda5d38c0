"""How the asyncio tunnel server moves one tunnel's bytes: ``TunnelBridge``.

A tunnel machine (``wavesync_proto.tunnel``), its legs (the connections that carry
it) and our end of a ``socket.socketpair()`` whose other end the application owns:
the machine's stream bytes go to the pair, the application's to the machine, and
what the machine has for each leg to that leg. The machine decides everything;
this module only moves bytes and keeps the buffers bounded. Part of
``wavesync_adapters.asyncio.tunnel_server``, which creates the bridges.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol, cast

from wavesync_proto.addresses import Endpoint
from wavesync_proto.tunnel import (
    StreamData,
    StreamEnded,
    TunnelEndpoint,
    TunnelFailed,
    TunnelKind,
    TunnelState,
)
from wavesync_proto.tunnel.echo import EchoAnswer, EchoReader

__all__ = ["CLOSE_LINGER", "BridgeLeg", "BridgeOwner", "LocalSide", "TunnelBridge"]

log = logging.getLogger("wavesync.tunnel.server")

#: How long a closing leg, or an application's last bytes, may take to get through.
CLOSE_LINGER = 2.0


class BridgeLeg(Protocol):
    """One connection of a tunnel, as the bridge uses it (the server's ``_Leg``)."""

    number: int
    remote: Endpoint

    def write(self, data: bytes) -> None: ...

    def half_close(self) -> None: ...

    def close_after(self, data: bytes = b"") -> None: ...

    def abort(self) -> None: ...

    def reading(self, wanted: bool) -> None: ...


class BridgeOwner(Protocol):
    """The tunnel server, as its bridges report to it."""

    def tunnel_up(self, bridge: TunnelBridge) -> None:
        """The tunnel is established: hand its stream to the application."""

    def tunnel_ended(self, bridge: TunnelBridge) -> None:
        """Every leg is closed: forget the tunnel."""

    def running_loop(self) -> asyncio.AbstractEventLoop | None:
        """The loop the server runs on; None once it stopped."""

    def close_gracefully(self, transport: asyncio.WriteTransport) -> None:
        """Close ``transport`` after what it buffers; reset it if its peer stops reading."""

    def transport_lost(self, transport: asyncio.BaseTransport) -> None:
        """``transport`` has closed: no reset is due."""


class LocalSide(asyncio.Protocol):
    """Our end of the socket pair: the application's bytes go to the tunnel's machine."""

    def __init__(self, tunnel: TunnelBridge) -> None:
        self._tunnel = tunnel
        self._eof = False
        self._transport: asyncio.BaseTransport | None = None
        #: ``connection_lost`` came: nothing is left to close or reset.
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._tunnel.local_ready(cast(asyncio.Transport, transport))

    def data_received(self, data: bytes) -> None:
        self._tunnel.local_data(data)

    def eof_received(self) -> bool:
        if not self._eof:  # a paused and resumed transport reads its EOF again
            self._eof = True
            self._tunnel.local_data(b"")
        return True  # the tunnel's other direction may go on

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._transport is not None:
            self._tunnel.owner.transport_lost(self._transport)
        self._tunnel.local_lost()

    def pause_writing(self) -> None:
        self._tunnel.local_writable(writable=False)

    def resume_writing(self) -> None:
        self._tunnel.local_writable(writable=True)


class TunnelBridge:
    """A tunnel machine, its legs and our end of the socket pair: bytes moved between them.

    The machine decides everything (what goes on which leg, when a leg ends, when the
    stream has ended or failed); this class writes what it says and keeps the
    buffers bounded: a full socket pair stops the legs' reading, a full leg stops
    the socket pair's.
    """

    def __init__(
        self, owner: BridgeOwner, machine: TunnelEndpoint, kind: TunnelKind, leg: BridgeLeg
    ) -> None:
        """``leg``: leg 0, the connection whose request opened the tunnel."""
        self.owner = owner
        self.machine = machine
        self.kind = kind
        self.remote = leg.remote
        self.legs: dict[int, BridgeLeg] = {0: leg}
        self._shut: set[int] = set()
        self._full_legs: set[int] = set()
        self._local: asyncio.Transport | None = None
        self._local_full = False
        self._local_gone = False
        self._pending: list[bytes] = []
        self._pending_eof = False
        self._echo: EchoReader | None = EchoReader()
        self._failure: TunnelFailed | None = None
        self._handed = False
        self._ended = False

    def start(self) -> None:
        self._reading_changed()
        self.machine_moved()
        if self._failure is not None:
            log.debug("%s tunnel failed: %s", self.kind, self._failure.reason)
            self._close_legs()
            return
        if self._ended:
            return
        self._handed = True
        self.owner.tunnel_up(self)

    def join(self, number: int, leg: BridgeLeg) -> None:
        """A getpost POST joined as leg ``number`` (``join`` fed its glued bytes)."""
        self.legs[number] = leg
        self._reading_changed()
        self.machine_moved()

    # --- what the machine says -------------------------------------------------------

    def machine_moved(self) -> None:
        """Take the machine's events, then write what it has for every leg."""
        machine = self.machine
        while (event := machine.next_event()) is not None:
            if isinstance(event, StreamData):
                self._to_local(event.data)
            elif isinstance(event, StreamEnded):
                self._to_local(b"")
            elif isinstance(event, TunnelFailed) and self._failure is None:
                self._failure = event
                if self._handed:  # the application's stream ends with a reset
                    self._pending.clear()
                    if self._local is not None:
                        self._local.abort()
        self._flush()

    def _flush(self) -> None:
        machine = self.machine
        for number, leg in list(self.legs.items()):
            if number in self._shut:
                continue
            leg.write(machine.data_to_send(number))
            if machine.eof_to_send(number):
                self._shut.add(number)
                if number == 0 and machine.state is TunnelState.OPEN:
                    leg.half_close()  # TLS has none: then nothing is sent
                else:
                    self._drop(number)
        if machine.state in (TunnelState.CLOSED, TunnelState.FAILED):
            for number in self._shut & set(self.legs):  # leg 0, half-closed while open
                self._drop(number)
        self._maybe_ended()

    def _to_local(self, data: bytes) -> None:
        """Stream bytes for the application (``b""``: the peer's end), after the echo."""
        if self._echo is not None:
            decision = self._echo.feed(data)
            if decision is None:
                return
            self._echo = None
            if isinstance(decision, EchoAnswer):
                self.machine.send(decision.answer)
                forward = decision.rest
            else:
                forward = decision.data
            if forward:
                self._to_local(forward)
            if data:
                return
        if self._local is None:
            if data:
                self._pending.append(data)
            else:
                self._pending_eof = True
            return
        if self._local.is_closing():
            return
        if data:
            self._local.write(data)
        elif self._local.can_write_eof():
            self._local.write_eof()

    # --- the legs -----------------------------------------------------------------------

    def leg_data(self, leg: BridgeLeg, data: bytes) -> None:
        if self.legs.get(leg.number) is not leg:
            return  # a leg we let go of
        self.machine.receive_data(data, leg.number)
        self.machine_moved()

    def leg_lost(self, leg: BridgeLeg, exc: Exception | None) -> None:
        if self.legs.get(leg.number) is leg:
            self._shut.add(leg.number)
            self._drop(leg.number)
            if exc is not None and self._failure is None and self.machine.state is TunnelState.OPEN:
                self._failure = TunnelFailed(reason=f"leg {leg.number} broke: {exc!r}")
                if self._local is not None:
                    self._local.abort()
        self._maybe_ended()

    def leg_writable(self, leg: BridgeLeg, *, writable: bool) -> None:
        if writable:
            self._full_legs.discard(leg.number)
        else:
            self._full_legs.add(leg.number)
        self._reading_changed()

    def _drop(self, number: int) -> None:
        leg = self.legs.pop(number, None)
        self._full_legs.discard(number)
        if leg is not None:
            leg.close_after()

    def _close_legs(self) -> None:
        for number in list(self.legs):
            self._drop(number)
        self._maybe_ended()

    # --- our end of the socket pair ---------------------------------------------------

    def local_ready(self, transport: asyncio.Transport) -> None:
        if self._failure is not None or self._local_gone:
            transport.abort()
            return
        self._local = transport
        pending, self._pending = self._pending, []
        for data in pending:
            transport.write(data)
        if self._pending_eof and transport.can_write_eof():
            transport.write_eof()
        if self._ended:  # the peer said all it had before we were ready
            self.owner.close_gracefully(transport)
            return
        self._reading_changed()

    def local_data(self, data: bytes) -> None:
        """The application's bytes for the peer (``b""``: its end of our direction)."""
        try:
            if data:
                self.machine.send(data)
            else:
                self.machine.close()
        except Exception:  # LocalProtocolError: the tunnel failed or our side ended
            return
        self._flush()

    def closed(self) -> None:
        """The application closed its end (``TunnelSocket.closed``): what it wrote last is
        still in the pair; give it ``CLOSE_LINGER`` to get through, then end."""
        loop = self.owner.running_loop()
        if not self._ended and loop is not None:
            loop.call_later(CLOSE_LINGER, self.local_lost)

    def local_lost(self) -> None:
        """The application closed its end: end our direction, then let the legs go."""
        if self._local_gone:
            return
        self._local_gone = True
        if self._local is not None:  # after ``closed()``, our end may still be open
            self.owner.close_gracefully(self._local)
        if self._failure is None and self.machine.state is TunnelState.OPEN:
            self.machine.close()
            self.machine_moved()
        self._close_legs()

    def local_writable(self, *, writable: bool) -> None:
        self._local_full = not writable
        self._reading_changed()

    def _reading_changed(self) -> None:
        legs_read = self._local is not None and not self._local_full
        for leg in self.legs.values():
            leg.reading(legs_read)
        local = self._local
        if local is not None and not local.is_closing():
            if self._full_legs and local.is_reading():
                local.pause_reading()
            elif not self._full_legs and not local.is_reading():
                local.resume_reading()

    def _maybe_ended(self) -> None:
        if self._ended or self.legs:
            return
        self._ended = True
        if self._local is not None and not self._local_gone:
            # What the peer sent last is written first, unless the application stopped
            # reading: then the server resets our end after its linger.
            self.owner.close_gracefully(self._local)
        self.owner.tunnel_ended(self)

    def abort(self) -> None:
        """The server is stopping: reset everything at once."""
        self._local_gone = True
        for leg in list(self.legs.values()):
            leg.abort()
        self.legs.clear()
        if self._local is not None:
            self._local.abort()
        self._maybe_ended()
