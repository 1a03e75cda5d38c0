"""HTTP tunnels on plain sockets, the server's side: an HTTP face inside a daemon's selector loop.

The twin of ``wavesync_adapters.anyio.tunnel_server``, thin by design:
``TunnelRequestReader`` reads each connection's first request and says which
tunnel it opens or what to answer; the method machines and ``GetPostRegistry``
(which pairs a getpost GET with its POSTs, and times out a GET whose first POST
does not come) decide the rest. This module accepts the connections (TLS first,
through ``ssl.SSLObject`` and memory buffers, so a handshake never blocks the
loop), moves bytes and time, and hands every established tunnel to the daemon.
A connection whose first byte cannot start a request arrived through a proxy's
CONNECT: it is a raw tunnel (``connect``) from its first byte.

Every tunnel reaches the daemon as one end of a ``socket.socketpair()``: the
daemon serves that end like any TCP connection it accepted, and this module
copies between the other end and the tunnel's legs in the same loop. No thread
per tunnel: a daemon with a thousand tunnels still has one thread.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import select
import socket
import ssl
from collections.abc import Callable

from wavesync_proto.addresses import Endpoint, format_endpoint
from wavesync_proto.tunnel import (
    GetPostRegistry,
    RawEndpoint,
    RequestRejected,
    StreamData,
    StreamEnded,
    TunnelEndpoint,
    TunnelFailed,
    TunnelKind,
    TunnelLimits,
    TunnelMethod,
    TunnelRequest,
    TunnelRequestReader,
    TunnelState,
    UpgradeServer,
    WebSocketServer,
)
from wavesync_proto.tunnel.echo import EchoAnswer, EchoReader, starts_http

from ._loop import EVENT_READ, EVENT_WRITE, Deadlines, LoopConnection, SelectorLoop, earliest

__all__ = ["TunnelHandler", "TunnelServer"]

log = logging.getLogger("wavesync.tunnel.server")

TunnelHandler = Callable[[socket.socket, Endpoint], None]
"""Called in the loop's thread with the daemon's end of a socket pair that carries one
tunnel's stream (non-blocking, the daemon's to close) and the address of the connection
carrying the tunnel (the peer's, or its proxy's)."""

RECEIVE_BYTES = 65536
#: Bytes held in either direction before the side that fills it stops being read.
HIGH_WATER = 1 << 20
#: How long a finished tunnel may take to write its last bytes, and a refused connection
#: to read its answer, before they are closed anyway.
CLOSE_LINGER = 2.0
_ACCEPT_BATCH = 64
_LISTEN_BACKLOG = 4096
_RAW = (TunnelMethod.UPGRADE, TunnelMethod.CONNECT)


class _Pending:
    """An accepted connection reading its first request (TLS handshake first, with TLS)."""

    def __init__(
        self, server: TunnelServer, leg: LoopConnection, remote: Endpoint, deadline: float
    ) -> None:
        self.server = server
        self.leg = leg
        self.remote = remote
        self.deadline = deadline
        self.reader: TunnelRequestReader | None = None
        #: Refused: writing the answer, then reading to the peer's end before closing.
        self.refusing = False
        self.done = False


class TunnelServer:
    """Serves tunnels of every method inside ``loop``; each one goes to ``handler``.

    Everything here runs in the loop's thread; the owner folds ``next_deadline``
    into the loop's and calls ``on_deadline``. A probe's echo at the start of a
    stream is answered here (docs/tunnel.md §7.1): the daemon sees only what
    follows it.
    """

    def __init__(
        self,
        loop: SelectorLoop,
        handler: TunnelHandler,
        *,
        ssl_context: ssl.SSLContext | None = None,
        limits: TunnelLimits | None = None,
        registry: GetPostRegistry | None = None,
        handshake_timeout: float = 10.0,
    ) -> None:
        """``ssl_context``: a server context; every connection is TLS (the ``ssl+`` kinds).
        ``handshake_timeout``: how long a connection may take to send its request."""
        self._loop = loop
        self._handler = handler
        self._ssl_context = ssl_context
        self.limits = limits or TunnelLimits()
        # Not ``registry or ...``: an empty registry has length 0, so it is falsy.
        self.registry = GetPostRegistry(limits=self.limits) if registry is None else registry
        self._handshake_timeout = handshake_timeout
        self._getpost: dict[bytes, _Tunnel] = {}
        self._pending: dict[int, _Pending] = {}
        self._tunnels: dict[int, _Tunnel] = {}
        self._ids = itertools.count(1)
        self._deadlines = Deadlines()
        self._listener: socket.socket | None = None
        self.bound: Endpoint | None = None
        #: Tunnels handed to the handler so far, per kind.
        self.served: dict[str, int] = {}

    def listen(self, host: str, port: int) -> Endpoint:
        """Listen on ``host:port`` (its own port, as the mediator's HTTP face does)."""
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, address = infos[0]
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.setblocking(False)
            listener.bind(address)
            listener.listen(_LISTEN_BACKLOG)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        local = listener.getsockname()
        self.bound = (str(local[0]), int(local[1]))
        self._loop.watch(listener, EVENT_READ, lambda _: self._accept(listener))
        log.info("tunnel server on tcp %s", format_endpoint(self.bound))
        return self.bound

    @property
    def active(self) -> int:
        """Connections still reading their request, plus tunnels not yet closed."""
        return len(self._pending) + len(self._tunnels)

    @property
    def buffered(self) -> int:
        """Bytes the tunnels hold, both directions (bounded by ``HIGH_WATER`` each way,
        plus a read or a machine's framing)."""
        return sum(tunnel.buffered for tunnel in self._tunnels.values())

    def close(self) -> None:
        """Close the listener, every connection and every tunnel (the daemon is stopping)."""
        if self._listener is not None:
            self._loop.unwatch(self._listener)
            self._listener.close()
            self._listener = None
        for pending in list(self._pending.values()):
            self._drop(pending)
        for tunnel in list(self._tunnels.values()):
            tunnel.close_now()

    # --- time --------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        return earliest(self.registry.get_timer(), self._deadlines.next())

    def on_deadline(self, now: float) -> None:
        for key in self._deadlines.pop_due(now):
            pending = self._pending.get(key)
            if pending is not None and pending.deadline <= now:
                log.debug("no tunnel request: %r", TimeoutError())
                self._drop(pending)
            tunnel = self._tunnels.get(key)
            if tunnel is not None:
                tunnel.on_deadline(now)
        timer = self.registry.get_timer()
        if timer is not None and timer <= now:
            for machine in self.registry.handle_timer(now):
                tunnel = self._getpost.get(machine.tunnel_id)
                if tunnel is not None:
                    tunnel.pump()  # its TunnelFailed ends it

    # --- accepting and reading requests --------------------------------------------------

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of file descriptors, a reset in the backlog
                log.warning("accept failed: %s", exc)
                return
            self.handle_connection(sock, (str(address[0]), int(address[1])))

    def handle_connection(
        self, sock: socket.socket, remote: Endpoint, *, first: bytes = b""
    ) -> None:
        """Serve one accepted connection (taken over: this server closes it). ``first``: bytes
        already read from it (the relay's hand-off), read before anything else."""
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = next(self._ids)
        leg = LoopConnection.accept(sock, self._ssl_context if not first else None)
        deadline = self._loop.clock() + self._handshake_timeout
        pending = _Pending(self, leg, remote, deadline)
        self._pending[key] = pending
        self._deadlines.add(deadline, key)
        leg.ready = functools.partial(self._pending_ready, key)
        self._loop.watch(sock, EVENT_READ, leg.ready)
        if first:
            self._request_bytes(key, pending, first)

    def _pending_ready(self, key: int, mask: int) -> None:
        pending = self._pending.get(key)
        if pending is None:
            return
        leg = pending.leg
        if mask & EVENT_WRITE:
            try:
                flushed = leg.flush()
            except OSError:
                self._drop(pending)
                return
            if flushed and pending.refusing:
                leg.half_close()
        if not mask & EVENT_READ:
            self._rewatch_pending(key, pending)
            return
        try:
            data = leg.read()
        except ssl.SSLError as exc:
            log.debug("no tunnel request: %r", exc)
            self._drop(pending)
            return
        if data is None or (pending.refusing and data):
            self._rewatch_pending(key, pending)  # a handshake's next flight to write
            return
        if not data and (pending.reader is None or pending.refusing):  # refused: answer read
            log.debug("no tunnel request: %r", EOFError("closed before a request"))
            self._drop(pending)
            return
        self._request_bytes(key, pending, data)

    def _rewatch_pending(self, key: int, pending: _Pending) -> None:
        if pending.done:
            return
        leg = pending.leg
        if leg.out:
            try:
                leg.flush()
            except OSError:
                self._drop(pending)
                return
        events = EVENT_READ | (EVENT_WRITE if leg.out else 0)
        self._loop.watch(leg.sock, events, leg.ready)

    def _request_bytes(self, key: int, pending: _Pending, data: bytes) -> None:
        if pending.reader is None and not starts_http(data):
            machine = RawEndpoint(limits=self.limits)
            machine.receive_data(data)
            self._finish_pending(key, pending)
            self._start(machine, pending.leg, pending.remote)
            return
        if pending.reader is None:
            pending.reader = TunnelRequestReader(limits=self.limits)
        reader = pending.reader
        reader.receive_data(data)
        event = reader.next_event()
        if event is None:
            self._rewatch_pending(key, pending)
            return
        if isinstance(event, RequestRejected):
            log.debug("refused with %d: %s", event.status, event.reason)
            self._refuse(key, pending, reader.data_to_send())
            return
        self._finish_pending(key, pending)
        self._dispatch(event, pending)

    def _refuse(self, key: int, pending: _Pending, response: bytes) -> None:
        if not response:
            self._drop(pending)
            return
        # Write the answer, end our side and read to the peer's end: closing with its
        # bytes unread would reset the connection and could destroy the answer.
        pending.refusing = True
        pending.deadline = min(pending.deadline, self._loop.clock() + CLOSE_LINGER)
        self._deadlines.add(pending.deadline, key)
        leg = pending.leg
        try:
            leg.write(response)
            if leg.flush():
                leg.half_close()
        except (OSError, ssl.SSLError):
            self._drop(pending)
            return
        self._rewatch_pending(key, pending)

    def _finish_pending(self, key: int, pending: _Pending) -> None:
        """The connection's request is read: it leaves the pending table (socket kept)."""
        pending.done = True
        del self._pending[key]
        self._loop.unwatch(pending.leg.sock)

    def _drop(self, pending: _Pending) -> None:
        for key, value in list(self._pending.items()):
            if value is pending:
                del self._pending[key]
        pending.done = True
        pending.leg.close(self._loop)

    def _dispatch(self, request: TunnelRequest, pending: _Pending) -> None:
        leg, remote = pending.leg, pending.remote
        if request.method is TunnelMethod.GETPOST and request.verb == "POST":
            self._join(request, leg)
        elif request.method is TunnelMethod.GETPOST:
            self._open_getpost(request, leg, remote)
        elif request.method is TunnelMethod.UPGRADE:
            self._start(UpgradeServer(request, limits=self.limits), leg, remote)
        else:
            self._start(WebSocketServer(request, limits=self.limits), leg, remote)

    def _refuse_leg(self, leg: LoopConnection, remote: Endpoint, response: bytes) -> None:
        key = next(self._ids)
        pending = _Pending(self, leg, remote, self._loop.clock() + CLOSE_LINGER)
        self._pending[key] = pending
        leg.ready = functools.partial(self._pending_ready, key)
        self._refuse(key, pending, response)

    # --- tunnels ------------------------------------------------------------------------------

    def _kind(self, method: TunnelMethod) -> TunnelKind:
        return TunnelKind(method=method, tls=self._ssl_context is not None)

    def _start(
        self,
        machine: TunnelEndpoint,
        leg: LoopConnection,
        remote: Endpoint,
        tunnel_id: bytes | None = None,
    ) -> None:
        key = next(self._ids)
        tunnel = _Tunnel(
            self,
            key=key,
            machine=machine,
            kind=self._kind(machine.method),
            leg=leg,
            tunnel_id=tunnel_id,
        )
        self._tunnels[key] = tunnel
        if tunnel_id is not None:
            self._getpost[tunnel_id] = tunnel
        tunnel.pump()
        if tunnel.failure is not None:
            log.debug("%s tunnel failed: %s", tunnel.kind, tunnel.failure.reason)
            return
        if tunnel.finished:
            return
        inner, outer = socket.socketpair()
        inner.setblocking(False)
        outer.setblocking(False)
        self.served[str(tunnel.kind)] = self.served.get(str(tunnel.kind), 0) + 1
        tunnel.attach(outer)
        try:
            self._handler(inner, remote)
        except Exception:
            log.exception("the %s tunnel's handler failed", tunnel.kind)
            inner.close()
            tunnel.close_now()

    def _open_getpost(self, request: TunnelRequest, leg: LoopConnection, remote: Endpoint) -> None:
        opened = self.registry.open(request, self._loop.clock())
        if isinstance(opened, RequestRejected):
            self._refuse_leg(leg, remote, opened.response)
            return
        self._start(opened, leg, remote, opened.tunnel_id)

    def _join(self, request: TunnelRequest, leg: LoopConnection) -> None:
        remote = ("0.0.0.0", 0)  # noqa: S104 - an address to report, not to bind
        joined = self.registry.join(request)
        if isinstance(joined, RequestRejected):
            self._refuse_leg(leg, remote, joined.response)
            return
        machine, number = joined
        tunnel = self._getpost[machine.tunnel_id]
        tunnel.add_leg(number, leg)
        tunnel.pump()  # join() fed the bytes glued to the POST's head

    def _ended(self, tunnel: _Tunnel) -> None:
        self._tunnels.pop(tunnel.key, None)
        if tunnel.tunnel_id is not None:
            self._getpost.pop(tunnel.tunnel_id, None)
            self.registry.release(tunnel.tunnel_id)

    def _linger(self, tunnel: _Tunnel) -> None:
        tunnel.linger_until = self._loop.clock() + CLOSE_LINGER
        self._deadlines.add(tunnel.linger_until, tunnel.key)

    def _check_later(self, tunnel: _Tunnel) -> None:
        self._deadlines.add(self._loop.clock() + CLOSE_LINGER, tunnel.key)


class _Tunnel:
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
