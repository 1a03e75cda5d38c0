"""HTTP tunnels on plain asyncio, the server's side: an HTTP face that turns requests into
tunnels.

The twin of ``wavesync_adapters.anyio.tunnel_server`` (same class, arguments, log
lines and ``served`` counter), on public asyncio APIs only, so it runs on uvloop and
imports nothing of anyio. Thin by design: ``TunnelRequestReader`` reads each
connection's first request and says which tunnel it opens or what to answer; the
method machines and ``GetPostRegistry`` (which pairs a getpost GET with its POSTs,
and times out a GET whose first POST does not come) decide the rest. A connection
whose first byte cannot start a request arrived through a proxy's CONNECT: it is a
raw tunnel (``connect``) from its first byte.

How a tunnel reaches the application: every established tunnel's stream is one end
of a ``socket.socketpair()``. This module holds the other end and moves bytes
between it and the tunnel's legs (TCP or TLS connections, each an
``asyncio.Protocol``) through the machine, with flow control both ways (a full
buffer on one side pauses reading on the other). What the application gets:

- ``TunnelServer(handler)``: ``async def handler(tunnel: AcceptedTunnel)`` gets an
  ``asyncio.StreamReader``/``StreamWriter`` pair (plus the tunnel's kind and the
  remote address of the connection that carries it); the writer is closed when
  the handler returns.
- ``TunnelServer(on_socket=take)``: ``take(tunnel)`` is given a ``TunnelSocket``: the
  socket pair's end itself (non-blocking), owned by ``take`` from then on. The relay
  and the mediator use this: the socket enters them as a connection like any other,
  and the relay splices it. ``sock.shutdown(SHUT_WR)`` ends our direction in band;
  closing it (then calling ``tunnel.closed()``) ends the tunnel.

A probe's echo at the start of a stream is answered before the application reads
anything (docs/tunnel.md §7.1), so it sees only what follows it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

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

from ._tunnel_bridge import CLOSE_LINGER, LocalSide, TunnelBridge

__all__ = ["AcceptedTunnel", "SocketTaker", "TunnelHandler", "TunnelServer", "TunnelSocket"]

log = logging.getLogger("wavesync.tunnel.server")

_LISTEN_BACKLOG = 4096
_UNKNOWN: Endpoint = ("0.0.0.0", 0)  # noqa: S104 - an address to report, not to bind


@dataclass(frozen=True, kw_only=True)
class AcceptedTunnel:
    """One tunnel's stream, as asyncio streams: what a ``TunnelHandler`` is given."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    kind: TunnelKind
    #: The connection that carries the tunnel (its leg 0): the peer's, or its proxy's.
    remote: Endpoint


@dataclass(frozen=True, kw_only=True)
class TunnelSocket:
    """One tunnel's stream as a socket pair's end: what ``on_socket`` is given to own."""

    sock: socket.socket
    kind: TunnelKind
    #: The connection that carries the tunnel (its leg 0): the peer's, or its proxy's.
    remote: Endpoint
    #: Call once ``sock`` is closed: the tunnel gets a moment for the bytes still in the
    #: pair, then ends (after a half-close alone, our end cannot see the close).
    closed: Callable[[], None]


TunnelHandler = Callable[[AcceptedTunnel], Awaitable[None]]
#: Takes a ``TunnelSocket`` (see the module docstring).
SocketTaker = Callable[[TunnelSocket], None]


class TunnelServer:
    """Serves tunnels of every method on one TCP port; each one goes to the application.

    Give exactly one of ``handler`` and ``on_socket`` (the module docstring says how
    each receives a tunnel).
    """

    def __init__(
        self,
        handler: TunnelHandler | None = None,
        *,
        on_socket: SocketTaker | None = None,
        ssl_context: ssl.SSLContext | None = None,
        limits: TunnelLimits | None = None,
        registry: GetPostRegistry | None = None,
        handshake_timeout: float = 10.0,
        close_linger: float = CLOSE_LINGER,
    ) -> None:
        """``ssl_context``: a server context; every connection is TLS (the ``ssl+`` kinds).
        ``handshake_timeout``: how long a connection may take to send its request.
        ``close_linger``: how long a connection or socket-pair end closed gracefully may
        take to hand over what it still buffers before it is reset."""
        if (handler is None) == (on_socket is None):
            raise TypeError("give TunnelServer a handler or on_socket, not both or neither")
        self._handler = handler
        self._on_socket = on_socket
        self._ssl_context = ssl_context
        self.limits = limits or TunnelLimits()
        # ``is None``, not ``or``: an empty registry has no tunnels, so it is falsy.
        self.registry = GetPostRegistry(limits=self.limits) if registry is None else registry
        self._handshake_timeout = handshake_timeout
        self.close_linger = close_linger
        self._getpost: dict[bytes, TunnelBridge] = {}
        self._tunnels: set[TunnelBridge] = set()
        self._handshaking: set[_Leg] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        #: Transports closed gracefully, each with the timer that resets it if its peer
        #: never takes what it still buffers (a closing transport never ends on its own).
        self._lingering: dict[asyncio.WriteTransport, asyncio.TimerHandle] = {}
        #: Socket-pair ends no transport or application owns yet: a task that would take
        #: one may be cancelled before it starts, and then only ``close()`` closes it.
        self._unowned: set[socket.socket] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.bound: Endpoint | None = None
        #: Tunnels handed to the application so far, per kind.
        self.served: dict[str, int] = {}

    # --- running ----------------------------------------------------------------------

    async def serve(
        self,
        host: str,
        port: int,
        *,
        started: Callable[[Endpoint], None] | None = None,
    ) -> None:
        """Listen on ``host:port`` and serve until cancelled (then close every tunnel)."""
        try:
            bound = await self.listen(host, port)
            if started is not None:
                started(bound)
            await asyncio.get_running_loop().create_future()  # until cancelled
        finally:
            tasks = list(self._tasks)
            self.close()
            # The loop may stop as soon as we return: let the cancelled tasks end and the
            # reset transports report their loss (each closes its socket then) first.
            if tasks:
                await asyncio.wait(tasks, timeout=self.close_linger)
            await asyncio.sleep(0)

    async def listen(self, host: str, port: int) -> Endpoint:
        """Listen on ``host:port`` and serve in the background until ``close()``."""
        loop = asyncio.get_running_loop()
        self.attach(loop)
        infos: list[tuple[Any, ...]] = await loop.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, _, _, _, address = infos[0]
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.setblocking(False)
            listener.bind(address)
            listener.listen(_LISTEN_BACKLOG)
            self._server = await loop.create_server(
                lambda: _Leg(self),
                sock=listener,
                ssl=self._ssl_context,
                ssl_handshake_timeout=self._handshake_timeout if self._ssl_context else None,
            )
        except BaseException:
            listener.close()
            raise
        local = listener.getsockname()
        self.bound = (str(local[0]), int(local[1]))
        log.info("tunnel server on tcp %s", format_endpoint(self.bound))
        return self.bound

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve on ``loop`` without a listener of its own: for a daemon that hands
        connections over with ``handle_socket`` (``listen`` does this itself)."""
        self._loop = loop

    def handle_socket(self, sock: socket.socket, prefix: bytes = b"") -> None:
        """Serve one accepted TCP connection (plain: TLS needs ``listen``) whose first
        bytes, ``prefix``, were already read from it; the server owns ``sock`` now."""
        loop = self._require_loop()
        self._spawn(self._adopt(loop, sock, prefix))

    def close(self) -> None:
        """Stop listening and end every connection and tunnel at once."""
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in list(self._tasks):
            task.cancel()
        for leg in list(self._handshaking):
            leg.abort()
        for tunnel in list(self._tunnels):
            tunnel.abort()
        for transport, timer in list(self._lingering.items()):
            timer.cancel()
            if not _is_lost(transport):
                transport.abort()
        self._lingering.clear()
        for sock in list(self._unowned):
            sock.close()
        self._unowned.clear()
        self._loop = None

    def close_gracefully(self, transport: asyncio.WriteTransport) -> None:
        """Close ``transport`` after what it buffers; reset it if that has not happened
        within ``close_linger`` (its peer stopped reading) or when the server stops."""
        if _is_lost(transport):
            return
        if not transport.is_closing():
            transport.close()
        # Even one closing already (its owner closed it): closing alone may never end.
        loop = self._loop
        if loop is None:  # stopping: nobody would reset it later
            transport.abort()
        elif transport not in self._lingering:
            self._lingering[transport] = loop.call_later(
                self.close_linger, self._linger_over, transport
            )

    def _linger_over(self, transport: asyncio.WriteTransport) -> None:
        del self._lingering[transport]
        if not _is_lost(transport):
            transport.abort()

    def transport_lost(self, transport: asyncio.BaseTransport) -> None:
        """``transport`` has closed (its protocol's ``connection_lost``): no reset is due.
        (An asyncio transport that finished a graceful close must not be aborted: once
        its buffer drained it forgets its loop, and abort() then fails.)"""
        timer = self._lingering.pop(cast(asyncio.WriteTransport, transport), None)
        if timer is not None:
            timer.cancel()

    # --- connections and their requests ---------------------------------------------

    async def _adopt(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, prefix: bytes
    ) -> None:
        try:
            await loop.connect_accepted_socket(lambda: _Leg(self, prefix), sock=sock)
        except BaseException:
            sock.close()
            raise

    def _dispatch(self, leg: _Leg, request: TunnelRequest) -> None:
        if request.method is TunnelMethod.GETPOST and request.verb == "POST":
            joined = self.registry.join(request)
            if isinstance(joined, RequestRejected):
                leg.refuse(joined.response)
                return
            machine, number = joined
            tunnel = self._getpost[machine.tunnel_id]
            leg.tunnel, leg.number = tunnel, number
            tunnel.join(number, leg)
            return
        machine_now: TunnelEndpoint
        if request.method is TunnelMethod.GETPOST:
            opened = self.registry.open(request, self._require_loop().time())
            if isinstance(opened, RequestRejected):
                leg.refuse(opened.response)
                return
            machine_now = opened
            self._registry_changed()
        elif request.method is TunnelMethod.UPGRADE:
            machine_now = UpgradeServer(request, limits=self.limits)
        else:
            machine_now = WebSocketServer(request, limits=self.limits)
        self._open(leg, machine_now)

    def _open(self, leg: _Leg, machine: TunnelEndpoint) -> None:
        kind = TunnelKind(method=machine.method, tls=self._ssl_context is not None)
        tunnel = TunnelBridge(self, machine, kind, leg)
        leg.tunnel = tunnel
        self._tunnels.add(tunnel)
        if machine.method is TunnelMethod.GETPOST:
            self._getpost[cast(Any, machine).tunnel_id] = tunnel
        tunnel.start()

    def tunnel_up(self, tunnel: TunnelBridge) -> None:
        """The tunnel is up: its stream goes to the application through a socket pair."""
        loop = self._require_loop()
        self.served[str(tunnel.kind)] = self.served.get(str(tunnel.kind), 0) + 1
        inner, outer = socket.socketpair()
        inner.setblocking(False)
        outer.setblocking(False)
        self._unowned.add(outer)
        self._spawn(self._attach_local(loop, tunnel, outer))
        try:
            if self._on_socket is not None:
                self._on_socket(
                    TunnelSocket(
                        sock=inner, kind=tunnel.kind, remote=tunnel.remote, closed=tunnel.closed
                    )
                )
            else:
                self._unowned.add(inner)
                self._spawn(self._run_handler(tunnel, inner))
        except Exception:
            log.exception("the %s tunnel's handler failed", tunnel.kind)
            self._unowned.discard(inner)
            inner.close()

    async def _attach_local(
        self, loop: asyncio.AbstractEventLoop, tunnel: TunnelBridge, outer: socket.socket
    ) -> None:
        try:
            await loop.connect_accepted_socket(lambda: LocalSide(tunnel), sock=outer)
        except BaseException:
            outer.close()
            tunnel.abort()
            raise
        finally:
            self._unowned.discard(outer)  # its transport's now, or closed

    async def _run_handler(self, tunnel: TunnelBridge, inner: socket.socket) -> None:
        assert self._handler is not None
        loop = asyncio.get_running_loop()
        try:
            reader = asyncio.StreamReader(loop=loop)
            transport, protocol = await loop.connect_accepted_socket(
                lambda: _HandlerSide(self, reader, loop), sock=inner
            )
            writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        except BaseException:
            inner.close()
            raise
        finally:
            self._unowned.discard(inner)  # its transport's now, or closed
        try:
            await self._handler(
                AcceptedTunnel(reader=reader, writer=writer, kind=tunnel.kind, remote=tunnel.remote)
            )
        except Exception:
            log.exception("the %s tunnel's handler failed", tunnel.kind)
        finally:
            # Not waited for here (no wait_closed coroutine that a stopping loop could
            # leave unstarted): the server resets it if its peer stops reading.
            self.close_gracefully(writer.transport)

    def tunnel_ended(self, tunnel: TunnelBridge) -> None:
        self._tunnels.discard(tunnel)
        tunnel_id = getattr(tunnel.machine, "tunnel_id", None)
        if tunnel_id is not None and self._getpost.get(tunnel_id) is tunnel:
            del self._getpost[tunnel_id]
            self.registry.release(tunnel_id)
            self._registry_changed()

    # --- the getpost registry's timer --------------------------------------------------

    def _registry_changed(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.registry.get_timer()
        if deadline is not None and self._loop is not None:
            self._timer = self._loop.call_at(deadline, self._registry_timer)

    def _registry_timer(self) -> None:
        self._timer = None
        if self._loop is None:
            return
        for machine in self.registry.handle_timer(self._loop.time()):
            tunnel = self._getpost.get(machine.tunnel_id)
            if tunnel is not None:
                tunnel.machine_moved()  # its TunnelFailed ends the application's stream
        self._registry_changed()

    # --- helpers --------------------------------------------------------------------

    def running_loop(self) -> asyncio.AbstractEventLoop | None:
        return self._loop

    def _require_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("the tunnel server is not running (listen() or attach() first)")
        return self._loop

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work, loop=self._require_loop())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _is_lost(transport: asyncio.BaseTransport) -> bool:
    """Whether ``transport``'s protocol (one of this module's) heard ``connection_lost``;
    asyncio drops the protocol then, uvloop keeps it."""
    protocol = transport.get_protocol()
    return protocol is None or bool(getattr(protocol, "lost", False))


class _HandlerSide(asyncio.StreamReaderProtocol):
    """The handler's end of the socket pair (what ``asyncio.open_connection`` would make),
    telling the server when it has closed."""

    def __init__(
        self, server: TunnelServer, reader: asyncio.StreamReader, loop: asyncio.AbstractEventLoop
    ) -> None:
        super().__init__(reader, loop=loop)
        self._server = server
        self._own: asyncio.BaseTransport | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._own = transport
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._own is not None:
            self._server.transport_lost(self._own)
        super().connection_lost(exc)


class _Leg(asyncio.Protocol):
    """One accepted connection: first its request, then one leg of a tunnel."""

    def __init__(self, server: TunnelServer, prefix: bytes = b"") -> None:
        self._server = server
        self._prefix = prefix
        self.transport: asyncio.Transport | None = None
        self.remote = _UNKNOWN
        self._reader: TunnelRequestReader | None = None
        self._deadline: asyncio.TimerHandle | None = None
        #: Once the request is read: the tunnel this connection is a leg of.
        self.tunnel: TunnelBridge | None = None
        self.number = 0
        self._got_eof = False
        #: ``connection_lost`` came: nothing is left to close or reset.
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they have its methods.
        self.transport = cast(asyncio.Transport, transport)
        address = transport.get_extra_info("peername")
        if isinstance(address, tuple):
            self.remote = (str(address[0]), int(address[1]))
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        server = self._server
        server._handshaking.add(self)
        loop = server._require_loop()
        self._deadline = loop.call_later(server._handshake_timeout, self._too_slow)
        if self._prefix:
            prefix, self._prefix = self._prefix, b""
            self.data_received(prefix)

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.leg_data(self, data)
        elif self.transport is not None and not self.transport.is_closing():
            self._read_request(data)

    def eof_received(self) -> bool:
        if self._got_eof:  # a paused and resumed transport reads its EOF again
            return True
        self._got_eof = True
        if self.tunnel is not None:
            self.tunnel.leg_data(self, b"")
            return True  # keep writing: the other direction may go on
        if self._reader is None:
            self._give_up(EOFError("closed before its request"))
            return False
        self._read_request(b"")
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._end_handshake()
        if self.transport is not None:
            self._server.transport_lost(self.transport)
        if self.tunnel is not None:
            if not self._got_eof:
                self._got_eof = True
                self.tunnel.leg_data(self, b"")
            self.tunnel.leg_lost(self, exc)

    def pause_writing(self) -> None:
        if self.tunnel is not None:
            self.tunnel.leg_writable(self, writable=False)

    def resume_writing(self) -> None:
        if self.tunnel is not None:
            self.tunnel.leg_writable(self, writable=True)

    # --- the request ------------------------------------------------------------------

    def _read_request(self, data: bytes) -> None:
        server = self._server
        if self._reader is None:
            if not starts_http(data):
                self._end_handshake()
                machine = RawEndpoint(limits=server.limits)
                machine.receive_data(data)
                server._open(self, machine)
                return
            self._reader = TunnelRequestReader(limits=server.limits)
        self._reader.receive_data(data)
        event = self._reader.next_event()
        if event is None:
            return
        self._end_handshake()
        if isinstance(event, RequestRejected):
            log.debug("refused with %d: %s", event.status, event.reason)
            self.refuse(self._reader.data_to_send())
            return
        server._dispatch(self, event)

    def refuse(self, response: bytes) -> None:
        self._end_handshake()
        self.close_after(response)

    def _too_slow(self) -> None:
        self._deadline = None
        self._give_up(TimeoutError("no request in time"))

    def _give_up(self, exc: BaseException) -> None:
        log.debug("no tunnel request: %r", exc)
        self.abort()

    def _end_handshake(self) -> None:
        self._server._handshaking.discard(self)
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    # --- writing and closing ----------------------------------------------------------

    def write(self, data: bytes) -> None:
        transport = self.transport
        if data and transport is not None and not transport.is_closing():
            transport.write(data)

    def half_close(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing() and transport.can_write_eof():
            transport.write_eof()

    def close_after(self, data: bytes = b"") -> None:
        """Write ``data`` and what is queued, then close; reset if that takes too long."""
        self.write(data)
        if self.transport is not None:
            self._server.close_gracefully(self.transport)

    def abort(self) -> None:
        self._end_handshake()
        if self.transport is not None:
            self.transport.abort()

    def reading(self, wanted: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if wanted and not transport.is_reading():
            transport.resume_reading()
        elif not wanted and transport.is_reading():
            transport.pause_reading()
