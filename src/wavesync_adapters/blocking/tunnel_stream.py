"""``TunnelPump``: a tunnel machine (``wavesync_proto.tunnel``) and its legs behind a REAL socket.

The twin of ``anyio/tunnel_stream.py``. The machine decides everything: what goes
on which leg, when a leg ends, when the stream has ended or failed. This module
moves bytes between the legs (TCP sockets, or ``ssl.SSLSocket`` for the ``ssl+``
kinds) and the machine, opens the legs getpost asks for, and hands the stream to
the application as one end of a ``socket.socketpair()``.

Two phases. While the tunnel opens (``handshake``, ``exchange``) the caller's
thread drives the machine with blocking reads and writes bounded by a deadline.
Once it is open, ``start()`` returns the application's socket and one named thread
pumps the other end: a selector over the pair and every leg, all sockets
non-blocking, so a TLS leg is only ever touched by that one thread. Back-pressure:
a leg is not read while ``HIGH_WATER`` bytes wait for the application, and the
application's socket is not read while the legs hold ``HIGH_WATER`` bytes or a
getpost POST waits for its answer.

Ends: the peer's clean end is the socket's EOF (``shutdown(SHUT_WR)`` on our side);
the application's ``shutdown(SHUT_WR)`` ends our direction (in band for websocket and
getpost, a TCP half-close for upgrade and connect; over TLS those two have no
half-close, so it closes the tunnel); its ``close()`` closes the tunnel (seen as a
hang-up on the pair). A failed tunnel closes the application's socket after the
bytes already received.
"""

from __future__ import annotations

import contextlib
import logging
import select
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable

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

__all__ = ["LegOpener", "TunnelPump"]

log = logging.getLogger("wavesync.tunnel")

RECEIVE_BYTES = 65536
#: Bytes held on either side (for the application, or for the legs) before the pump
#: stops reading the other.
HIGH_WATER = 1 << 20
#: How long closing waits for the answer to a getpost POST that carried the last chunk.
CLOSE_LINGER = 2.0
#: How often the pump looks for ``close()`` and an application that hung up.
POLL = 0.25
#: The pair's buffers: large enough that a bulk stream is not a wake-up per 200 KiB.
PAIR_BUFFER = 1 << 20

LegOpener = Callable[[float], socket.socket]

_RAW = (TunnelMethod.UPGRADE, TunnelMethod.CONNECT)
_AGAIN = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class _Leg:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.out = bytearray()
        self.want_shut = False  # the machine is done with it: shut once ``out`` is written
        self.read_eof = False
        self.maybe_pending = isinstance(sock, ssl.SSLSocket)  # decrypted bytes select cannot see


class TunnelPump:
    """One tunnel's machine and legs; ``start()`` hands the stream out as a socket."""

    def __init__(
        self,
        machine: TunnelEndpoint,
        kind: TunnelKind,
        *,
        legs: dict[int, socket.socket],
        open_leg: LegOpener | None = None,
        leg_timeout: float = 10.0,
    ) -> None:
        """``open_leg(timeout)`` opens a getpost POST leg (blocking, ready for its request)."""
        self.machine = machine
        self.kind = kind
        self._legs = {leg: _Leg(sock) for leg, sock in legs.items()}
        self._open_leg = open_leg
        self._leg_timeout = leg_timeout
        self._opening: list[int] = []
        self._to_app = bytearray()
        self._established = False
        self._ended = False
        self._failure: TunnelFailed | None = None
        self._leg_zero_eof = False
        self._app_read_done = False  # the application shut its side (or closed it)
        self._app_shut = False  # we gave the application its EOF
        self._linger_until: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- what the machine says -------------------------------------------------------

    @property
    def established(self) -> bool:
        return self._established

    @property
    def failure(self) -> TunnelFailed | None:
        return self._failure

    def _absorb(self) -> None:
        while (event := self.machine.next_event()) is not None:
            if isinstance(event, StreamData):
                self._to_app += event.data
            elif isinstance(event, StreamEnded):
                self._ended = True
            elif isinstance(event, TunnelFailed):
                self._failure = event
            elif isinstance(event, TunnelEstablished):
                self._established = True
            elif isinstance(event, OpenLeg):
                self._opening.append(event.leg)
        for leg, record in self._legs.items():
            record.out += self.machine.data_to_send(leg)
            if self.machine.eof_to_send(leg):
                record.want_shut = True

    def _open_legs(self) -> None:
        while self._opening:
            leg = self._opening.pop(0)
            assert self._open_leg is not None, "only a getpost client opens legs"
            sock = self._open_leg(self._leg_timeout)
            if self._thread is not None:
                sock.setblocking(False)
            self._legs[leg] = _Leg(sock)
        self._absorb()  # the new leg's request

    # --- phase 1: blocking, in the caller's thread ------------------------------------

    def handshake(self, deadline: float) -> None:
        """Drive the handshake until established or failed (``TimeoutError`` past
        ``deadline``, a ``time.monotonic()`` value)."""
        self._absorb()
        self._flush_blocking(deadline)
        while not self._established and self._failure is None:
            self._read_leg_zero_blocking(deadline)
            self._flush_blocking(deadline)

    def exchange(self, data: bytes, deadline: float) -> None:
        """Send ``data`` on the stream before ``start()`` (the probe's echo)."""
        self.machine.send(data)
        self._absorb()
        self._flush_blocking(deadline)

    def receive_blocking(self, deadline: float) -> bytes:
        """Stream bytes received before ``start()``, taken out (``b""``: ended or failed)."""
        while not self._to_app and not self._ended and self._failure is None:
            self._read_leg_zero_blocking(deadline)
            self._flush_blocking(deadline)
        data = bytes(self._to_app)
        self._to_app.clear()
        return data

    def push_front(self, data: bytes) -> None:
        """Give back stream bytes read ahead (what followed the probe's echo)."""
        self._to_app[:0] = data

    def _read_leg_zero_blocking(self, deadline: float) -> None:
        sock = self._legs[0].sock
        sock.settimeout(_left(deadline))
        try:
            data = sock.recv(RECEIVE_BYTES)
        except TimeoutError:
            raise
        except OSError as exc:
            log.debug("tunnel %s: leg 0 read: %r", self.kind, exc)
            data = b""
        self._leg_zero_read(data)

    def _leg_zero_read(self, data: bytes) -> None:
        if not data:
            if self._leg_zero_eof:
                self._lost(0, "end of file")
                return
            self._leg_zero_eof = True
            self._legs[0].read_eof = True
        self.machine.receive_data(data, 0)
        self._absorb()

    def _flush_blocking(self, deadline: float) -> None:
        self._open_legs()
        for leg, record in list(self._legs.items()):
            if record.out:
                record.sock.settimeout(_left(deadline))
                record.sock.sendall(record.out)
                record.out.clear()
            if record.want_shut:
                self._shut(leg)

    # --- phase 2: the pump thread -----------------------------------------------------

    def start(self) -> socket.socket:
        """The application's socket (blocking, no timeout); the pump runs until the tunnel
        ends, the application closes it, or ``close()``."""
        app, own = socket.socketpair()
        for end in (app, own):
            with contextlib.suppress(OSError):
                end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, PAIR_BUFFER)
                end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, PAIR_BUFFER)
        own.setblocking(False)
        for record in self._legs.values():
            record.sock.setblocking(False)
        self._thread = threading.Thread(
            target=self._run, args=(own,), name=f"wavesync-tunnel-{self.kind}", daemon=False
        )
        self._thread.start()
        return app

    def close(self, timeout: float = CLOSE_LINGER + 1.0) -> None:
        """Stop the pump and close every leg (the application's socket reads EOF)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        if thread is None:
            self._close_legs()

    def _run(self, own: socket.socket) -> None:
        selector = selectors.DefaultSelector()
        try:
            while not self._stop.is_set() and not self._finished(own):
                self._register(selector, own, want_app=not self._app_read_done)
                ready = selector.select(0 if self._pending_tls() else POLL)
                for key, events in ready:
                    if key.data == "app":
                        if events & selectors.EVENT_WRITE:
                            self._write_app(own)
                        if events & selectors.EVENT_READ and not self._app_read_done:
                            self._app_read_done = self._read_app(own)
                    else:
                        self._leg_ready(key.data, events)
                for leg, record in list(self._legs.items()):
                    if record.maybe_pending and not record.read_eof and self._wants_read(leg):
                        self._read_leg(leg)
                self._open_legs()
                self._write_legs()
        except OSError as exc:
            log.info("tunnel %s: %r", self.kind, exc)
        finally:
            selector.close()
            self._close_legs()
            own.close()

    def _finished(self, own: socket.socket) -> bool:
        """Whether the pump is done; gives the application its EOF when due."""
        if self._failure is not None:
            log.info("tunnel %s failed: %s", self.kind, self._failure.reason)
            with contextlib.suppress(OSError):
                if self._to_app:
                    own.send(self._to_app)  # what is already here, as far as it fits
            return True
        if self._ended and not self._to_app and not self._app_shut:
            with contextlib.suppress(OSError):
                own.shutdown(socket.SHUT_WR)
            self._app_shut = True
        if self.machine.state is TunnelState.CLOSED and not self._legs and not self._to_app:
            return True
        if self._app_read_done and self._linger_until is None and _hung_up(own):
            # The application closed its socket: our end goes, the peer's gets CLOSE_LINGER.
            self._close_our_side()
            self._linger_until = time.monotonic() + CLOSE_LINGER
        return self._linger_until is not None and (
            time.monotonic() >= self._linger_until or not self._legs
        )

    def _register(
        self, selector: selectors.BaseSelector, own: socket.socket, *, want_app: bool
    ) -> None:
        wanted: dict[socket.socket, tuple[int, object]] = {}
        app_events = 0
        out_held = sum(len(record.out) for record in self._legs.values())
        awaiting = (
            isinstance(self.machine, GetPostClient) and self.machine.awaiting_answer is not None
        )
        if (
            want_app
            and out_held < HIGH_WATER
            and not awaiting
            and self.machine.state is TunnelState.OPEN
        ):
            app_events |= selectors.EVENT_READ
        if self._to_app:
            app_events |= selectors.EVENT_WRITE
        if app_events:
            wanted[own] = (app_events, "app")
        for leg, record in self._legs.items():
            events = 0
            if not record.read_eof and self._wants_read(leg):
                events |= selectors.EVENT_READ
            if record.out:
                events |= selectors.EVENT_WRITE
            if events:
                wanted[record.sock] = (events, leg)
        for key in list(selector.get_map().values()):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if sock not in wanted:
                selector.unregister(sock)
            elif (key.events, key.data) != wanted[sock]:
                selector.modify(sock, *wanted.pop(sock))
            else:
                del wanted[sock]
        for sock, (events, data) in wanted.items():
            selector.register(sock, events, data)

    def _wants_read(self, leg: int) -> bool:
        return leg != 0 or len(self._to_app) < HIGH_WATER

    def _pending_tls(self) -> bool:
        return any(
            isinstance(r.sock, ssl.SSLSocket) and not r.read_eof and r.sock.pending()
            for leg, r in self._legs.items()
            if self._wants_read(leg)
        )

    def _read_app(self, own: socket.socket) -> bool:
        """True once the application's direction ended."""
        try:
            data = own.recv(RECEIVE_BYTES)
        except _AGAIN:
            return False
        except OSError:
            data = b""
        if data:
            if self.machine.state is TunnelState.OPEN:
                self.machine.send(data)
                self._absorb()
            return False
        if self.kind.tls and self.kind.method in _RAW:
            # TLS has no half-close: the application's end is the tunnel's end.
            self._close_our_side()
            self._stop.set()
            return True
        self._close_our_side()
        return True

    def _close_our_side(self) -> None:
        if self.machine.state is TunnelState.OPEN:
            self.machine.close()
            self._absorb()

    def _write_app(self, own: socket.socket) -> None:
        try:
            sent = own.send(self._to_app)
        except _AGAIN:
            return
        except OSError as exc:  # the application closed its socket: nobody reads on
            log.debug("tunnel %s: the application left: %r", self.kind, exc)
            self._to_app.clear()
            self._close_our_side()
            self._stop.set()
            return
        del self._to_app[:sent]

    def _leg_ready(self, leg: int, events: int) -> None:
        if leg not in self._legs:
            return
        if events & selectors.EVENT_READ:
            self._read_leg(leg)
        if events & selectors.EVENT_WRITE and leg in self._legs:
            self._write_leg(leg)

    def _read_leg(self, leg: int) -> None:
        record = self._legs[leg]
        try:
            data = record.sock.recv(RECEIVE_BYTES)
        except _AGAIN:
            record.maybe_pending = False
            return
        except OSError as exc:
            log.debug("tunnel %s: leg %d read: %r", self.kind, leg, exc)
            data = b""
        record.maybe_pending = isinstance(record.sock, ssl.SSLSocket)
        if leg == 0:
            self._leg_zero_read(data)
        else:
            if not data:
                record.read_eof = True
            self.machine.receive_data(data, leg)
            self._absorb()

    def _write_legs(self) -> None:
        for leg in list(self._legs):
            record = self._legs.get(leg)
            if record is not None and (record.out or record.want_shut):
                self._write_leg(leg)

    def _write_leg(self, leg: int) -> None:
        record = self._legs[leg]
        while record.out:
            try:
                sent = record.sock.send(record.out)
            except _AGAIN:
                return
            except OSError as exc:
                self._lost(leg, repr(exc))
                return
            del record.out[:sent]
        if record.want_shut:
            self._shut(leg)

    def _shut(self, leg: int) -> None:
        record = self._legs[leg]
        if leg == 0 and self.machine.state is TunnelState.OPEN:
            # Our direction ended, the peer's goes on: a half-close where the transport has one.
            if not isinstance(record.sock, ssl.SSLSocket):
                with contextlib.suppress(OSError):
                    record.sock.shutdown(socket.SHUT_WR)
            record.want_shut = False
            return
        # A finished getpost POST, or the whole tunnel ended: nothing more to read here.
        del self._legs[leg]
        _close_socket(record.sock)

    def _lost(self, leg: int, why: str) -> None:
        if self._failure is None and self.machine.state is not TunnelState.CLOSED:
            self._failure = TunnelFailed(reason=f"leg {leg} broke: {why}")

    def _close_legs(self) -> None:
        for record in self._legs.values():
            _close_socket(record.sock)
        self._legs.clear()


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def _hung_up(sock: socket.socket) -> bool:
    """Whether the application closed its end of the pair (both directions gone)."""
    poller = select.poll()
    poller.register(sock, select.POLLHUP)
    return any(mask & select.POLLHUP for _, mask in poller.poll(0))


def _close_socket(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    sock.close()
