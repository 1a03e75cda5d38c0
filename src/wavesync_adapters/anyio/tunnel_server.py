"""HTTP tunnels on anyio, the server's side: an HTTP face that turns requests into tunnels.

Thin by design: ``TunnelRequestReader`` reads each connection's first request
and says which tunnel it opens or what to answer; the method machines and
``GetPostRegistry`` (which pairs a getpost GET with its POSTs, and times out a
GET whose first POST does not come) decide the rest. This module accepts the
connections (TLS first, when it has a context), moves bytes and time, and hands
every established tunnel to the application's handler as a ``TunnelStream``.
A connection whose first byte cannot start a request arrived through a proxy's
CONNECT: it is a raw tunnel (``connect``) from its first byte.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable

import anyio
import anyio.abc
from anyio.streams.tls import TLSStream

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

from ._net import ServiceTimer
from .tunnel_stream import RECEIVE_BYTES, TunnelStream

__all__ = ["TunnelHandler", "TunnelServer"]

log = logging.getLogger("wavesync.tunnel.server")

TunnelHandler = Callable[[TunnelStream], Awaitable[None]]

_LOST = (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


class TunnelServer:
    """Serves tunnels of every method on one TCP port; each one goes to ``handler``.

    The stream is closed when the handler returns. A probe's echo at the start
    of a stream is answered before the handler reads anything (docs/tunnel.md
    §7.1), so the handler sees only what follows it.
    """

    def __init__(
        self,
        handler: TunnelHandler,
        *,
        ssl_context: ssl.SSLContext | None = None,
        limits: TunnelLimits | None = None,
        registry: GetPostRegistry | None = None,
        handshake_timeout: float = 10.0,
    ) -> None:
        """``ssl_context``: a server context; every connection is TLS (the ``ssl+`` kinds).
        ``handshake_timeout``: how long a connection may take to send its request."""
        self._handler = handler
        self._ssl_context = ssl_context
        self.limits = limits if limits is not None else TunnelLimits()
        # Not `registry or ...`: an empty registry has length 0 and would be replaced.
        self.registry = registry if registry is not None else GetPostRegistry(limits=self.limits)
        self._handshake_timeout = handshake_timeout
        self._getpost: dict[bytes, TunnelStream] = {}
        self._timer = ServiceTimer(
            self.registry.get_timer, self._registry_timer, anyio.current_time
        )
        self.bound: Endpoint | None = None
        #: Tunnels handed to the handler so far, per kind.
        self.served: dict[str, int] = {}

    async def serve(
        self,
        host: str,
        port: int,
        *,
        task_status: anyio.abc.TaskStatus[Endpoint] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port`` and serve until cancelled."""
        listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
        async with listener, anyio.create_task_group() as group:
            address = listener.extra(anyio.abc.SocketAttribute.local_address)
            self.bound = (str(address[0]), int(address[1]))
            group.start_soon(self._timer.run)
            log.info("tunnel server on tcp %s", format_endpoint(self.bound))
            task_status.started(self.bound)
            await listener.serve(self.handle_connection)

    async def run_timer(self) -> None:
        """Drive the getpost registry's timer, until cancelled: for a server that is fed
        connections by ``handle_connection`` from its own listener (``serve`` does this
        itself)."""
        await self._timer.run()

    async def handle_connection(self, stream: anyio.abc.ByteStream) -> None:
        """Serve one accepted connection until its tunnel (or its getpost leg) ends."""
        try:
            with anyio.fail_after(self._handshake_timeout):
                if self._ssl_context is not None:
                    stream = await TLSStream.wrap(
                        stream,
                        server_side=True,
                        ssl_context=self._ssl_context,
                        standard_compatible=False,
                    )
                first = await stream.receive(RECEIVE_BYTES)
                if not starts_http(first):
                    machine: TunnelEndpoint = RawEndpoint(limits=self.limits)
                    machine.receive_data(first)
                    request: TunnelRequest | None = None
                else:
                    request = await self._read_request(stream, first)
        except (TimeoutError, ssl.SSLError, *_LOST) as exc:
            log.debug("no tunnel request: %r", exc)
            await anyio.aclose_forcefully(stream)
            return
        except BaseException:  # cancelled: the server is stopping
            with anyio.CancelScope(shield=True):
                await anyio.aclose_forcefully(stream)
            raise
        if request is None:
            await self._run(self._tunnel(machine, stream), stream)
        elif request.method is TunnelMethod.GETPOST and request.verb == "POST":
            await self._join(request, stream)
        elif request.method is TunnelMethod.GETPOST:
            await self._open_getpost(request, stream)
        elif request.method is TunnelMethod.UPGRADE:
            await self._run(
                self._tunnel(UpgradeServer(request, limits=self.limits), stream), stream
            )
        else:
            machine = WebSocketServer(request, limits=self.limits)
            await self._run(self._tunnel(machine, stream), stream)

    async def _read_request(
        self, stream: anyio.abc.ByteStream, first: bytes
    ) -> TunnelRequest | None:
        reader = TunnelRequestReader(limits=self.limits)
        reader.receive_data(first)
        while (event := reader.next_event()) is None:
            try:
                data = await stream.receive(RECEIVE_BYTES)
            except anyio.EndOfStream:
                data = b""
            reader.receive_data(data)
        if isinstance(event, RequestRejected):
            log.debug("refused with %d: %s", event.status, event.reason)
            with contextlib.suppress(*_LOST):
                await stream.send(reader.data_to_send())
            raise anyio.EndOfStream
        return event

    def _tunnel(self, machine: TunnelEndpoint, stream: anyio.abc.ByteStream) -> TunnelStream:
        kind = TunnelKind(method=machine.method, tls=self._ssl_context is not None)
        tunnel = TunnelStream(
            machine, kind, legs={0: stream}, reads_leg_zero=True, answers_echo=True
        )
        tunnel.absorb()
        return tunnel

    async def _run(self, tunnel: TunnelStream, stream: anyio.abc.ByteStream) -> None:
        try:
            await tunnel.flush()
            if tunnel.failure is None:
                self.served[str(tunnel.kind)] = self.served.get(str(tunnel.kind), 0) + 1
                await self._handler(tunnel)
            else:
                log.debug("%s tunnel failed: %s", tunnel.kind, tunnel.failure.reason)
        except Exception:
            log.exception("the %s tunnel's handler failed", tunnel.kind)
        finally:
            with anyio.CancelScope(shield=True):
                await tunnel.aclose()
                await anyio.aclose_forcefully(stream)

    # --- getpost: one GET, then its POSTs on other connections ----------------------------

    async def _open_getpost(self, request: TunnelRequest, stream: anyio.abc.ByteStream) -> None:
        opened = self.registry.open(request, anyio.current_time())
        if isinstance(opened, RequestRejected):
            await self._refuse(stream, opened.response)
            return
        self._timer.changed()
        kind = TunnelKind(method=TunnelMethod.GETPOST, tls=self._ssl_context is not None)
        tunnel = TunnelStream(
            opened, kind, legs={0: stream}, reads_leg_zero=False, answers_echo=True
        )
        tunnel.absorb()
        self._getpost[opened.tunnel_id] = tunnel
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(self._read_leg, tunnel, 0, stream)
                await self._run(tunnel, stream)
        finally:
            del self._getpost[opened.tunnel_id]
            self.registry.release(opened.tunnel_id)

    async def _join(self, request: TunnelRequest, stream: anyio.abc.ByteStream) -> None:
        joined = self.registry.join(request)
        if isinstance(joined, RequestRejected):
            await self._refuse(stream, joined.response)
            return
        machine, leg = joined
        tunnel = self._getpost[machine.tunnel_id]
        tunnel.add_leg(leg, stream)
        try:
            tunnel.absorb()  # join() fed the bytes glued to the POST's head
            await tunnel.flush(wait=False)
            await self._read_leg(tunnel, leg, stream)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.aclose_forcefully(stream)

    async def _refuse(self, stream: anyio.abc.ByteStream, response: bytes) -> None:
        try:
            with contextlib.suppress(*_LOST):
                await stream.send(response)
        finally:  # closed even when the server is stopping during the send
            with anyio.CancelScope(shield=True):
                await anyio.aclose_forcefully(stream)

    async def _read_leg(self, tunnel: TunnelStream, leg: int, stream: anyio.abc.ByteStream) -> None:
        scope = anyio.CancelScope()
        tunnel.leg_scopes.add(scope)
        with scope:
            while tunnel.has_leg(leg):
                try:
                    data = await stream.receive(RECEIVE_BYTES)
                except _LOST:
                    data = b""
                await tunnel.feed_leg(leg, data)
                if not data:
                    return
        tunnel.leg_scopes.discard(scope)

    def _registry_timer(self, now: float) -> None:
        for machine in self.registry.handle_timer(now):
            tunnel = self._getpost.get(machine.tunnel_id)
            if tunnel is not None:
                tunnel.absorb()  # its TunnelFailed ends the handler's receive
