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
import socket
import ssl
from collections.abc import Callable

from wavesync_proto.addresses import Endpoint, format_endpoint
from wavesync_proto.tunnel import (
    GetPostRegistry,
    RawEndpoint,
    RequestRejected,
    TunnelEndpoint,
    TunnelKind,
    TunnelLimits,
    TunnelMethod,
    TunnelRequest,
    TunnelRequestReader,
    UpgradeServer,
    WebSocketServer,
)
from wavesync_proto.tunnel.echo import starts_http

from ._loop import EVENT_READ, EVENT_WRITE, Deadlines, LoopConnection, SelectorLoop, earliest
from ._loop_tunnel import HIGH_WATER, RECEIVE_BYTES, LoopTunnel

__all__ = ["HIGH_WATER", "RECEIVE_BYTES", "TunnelHandler", "TunnelServer"]

log = logging.getLogger("wavesync.tunnel.server")

TunnelHandler = Callable[[socket.socket, Endpoint], None]
"""Called in the loop's thread with the daemon's end of a socket pair that carries one
tunnel's stream (non-blocking, the daemon's to close) and the address of the connection
carrying the tunnel (the peer's, or its proxy's)."""

#: How long a finished tunnel may take to write its last bytes, and a refused connection
#: to read its answer, before they are closed anyway.
CLOSE_LINGER = 2.0
_ACCEPT_BATCH = 64
_LISTEN_BACKLOG = 4096


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
        self._getpost: dict[bytes, LoopTunnel] = {}
        self._pending: dict[int, _Pending] = {}
        self._tunnels: dict[int, LoopTunnel] = {}
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
        tunnel = LoopTunnel(
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

    def _ended(self, tunnel: LoopTunnel) -> None:
        self._tunnels.pop(tunnel.key, None)
        if tunnel.tunnel_id is not None:
            self._getpost.pop(tunnel.tunnel_id, None)
            self.registry.release(tunnel.tunnel_id)

    def _linger(self, tunnel: LoopTunnel) -> None:
        tunnel.linger_until = self._loop.clock() + CLOSE_LINGER
        self._deadlines.add(tunnel.linger_until, tunnel.key)

    def _check_later(self, tunnel: LoopTunnel) -> None:
        self._deadlines.add(self._loop.clock() + CLOSE_LINGER, tunnel.key)
