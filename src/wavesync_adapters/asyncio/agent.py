"""The server agent on asyncio: every path a client can take ends in one handler.

The twin of ``wavesync_adapters.anyio.agent`` (plain asyncio, uvloop too; no anyio).
``ServerAgent`` runs the server's side of DESIGN.md §1 at once: the listen session
with the mediator, one punching UDP socket per connect request (the signed
connection_ack and the UDT rendezvous leave from it, and it keeps listening so the
client's later connections reuse the hole), a TCP listener for direct and LAN
clients, the relay standby pools and the LAN responder. Whatever the path, a new
stream must first pass ``tunnel_syn`` (``answer_client``); only then does the
application's handler see it.

API::

    agent = ServerAgent(system_id=..., server_id=..., key=..., mediator=..., relays=[...])

    async def handler(accepted: AcceptedStream) -> None:
        data = await accepted.reader.read(100)    # an asyncio.StreamReader
        accepted.writer.write(data)               # an asyncio.StreamWriter
        await accepted.writer.drain()

    async with agent.running(handler) as tcp_endpoint:   # serving in a task
        await asyncio.wait_for(agent.wait_ready(), 10)    # registered, relays standing by
        ...
    # or, as a task of your own: await agent.serve(handler, started=future)

``serve(handler, *, started=None)`` runs until cancelled; ``started`` (an
``asyncio.Future[Endpoint]``) gets the bound TCP listener's address once every part
has started. ``running(handler)`` does the same in a task and yields that address;
leaving the block cancels it and waits for every task it owns. Each verified stream
runs ``handler(AcceptedStream(reader, writer, path, peer, connect_session_id))`` in
its own task; the writer is closed when the handler returns, whichever path
(``PathKind.TCP`` for direct and LAN clients, ``UDP`` for a punched UDT stream,
``RELAY``). ``agent.counters`` is an ``AgentCounters``, field for field the anyio
agent's. With ``tunnel=`` the listen session and the standby connections ride HTTP
tunnels (``mediator_http=``, ``proxy=``), as on anyio.

Thin by design: registration, punching, standby policy, hole lifetime
(``wavesync_proto.holes``), discovery answers and verification are the core's
machines; this module wires them to sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from wavesync_proto.addresses import Endpoint, format_endpoint
from wavesync_proto.discovery import DEFAULT_GROUP, DiscoveryResponder
from wavesync_proto.errors import LocalProtocolError
from wavesync_proto.holes import PunchedSocket, PunchSockets
from wavesync_proto.mediator.listen import ClientUdpEndpointLearned, ConnectionRequestReceived
from wavesync_proto.race import PathKind
from wavesync_proto.tunnel import ProxyConfig, TunnelMemory
from wavesync_proto.udt.connection_types import UdtConfig

from .._common import AgentCounters, TunnelChoice, advertised_endpoint, parse_target
from .lan import LanResponder
from .listen import MediatorListener
from .relay_agent import RelayAgent, RelayTunnelInfo
from .udt import (
    UdtConnectError,
    UdtEndpoint,
    create_udt_endpoint,
    open_udt_rendezvous,
    start_udt_server,
)
from .verify import VerificationError, answer_client

__all__ = ["AcceptedStream", "AgentCounters", "ServerAgent", "StreamHandler"]

log = logging.getLogger("wavesync.agent")


@dataclass(frozen=True, kw_only=True)
class AcceptedStream:
    """A verified stream from a client, whichever path it came by."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    #: TCP (direct or LAN: the server cannot tell them apart), UDP or RELAY.
    path: PathKind
    #: The client's address as this side sees it (the relay's, for a relayed stream).
    peer: Endpoint | None
    #: The client's connect session, when it came through the mediator.
    connect_session_id: bytes | None


StreamHandler = Callable[[AcceptedStream], Awaitable[None]]


@dataclass(eq=False)
class _Punch:
    """One punching socket: its task, the tasks it owns, the sessions acked from it, the
    rendezvous tried, and its use (``wavesync_proto.holes`` decides when it closes)."""

    endpoint: UdtEndpoint
    sessions: set[bytes]
    use: PunchedSocket
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    tried: set[Endpoint] = field(default_factory=set)

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


class ServerAgent:
    """A server behind NAT: registered, punching, listening, in the relay pools.

    See the module docstring for ``serve``, ``running`` and the handler.
    """

    def __init__(
        self,
        *,
        system_id: uuid.UUID,
        server_id: uuid.UUID,
        key: str,
        mediator: Endpoint | None = None,
        relays: Sequence[str] = (),
        tcp_listen: Endpoint = ("0.0.0.0", 0),  # noqa: S104 - a server's default
        udp_host: str = "0.0.0.0",  # noqa: S104 - a server's default
        advertise: Sequence[Endpoint] | None = None,
        lan: bool = True,
        lan_group: Endpoint = DEFAULT_GROUP,
        lan_interfaces: Sequence[str] = ("0.0.0.0",),  # noqa: S104 - the kernel's pick
        standby_count: int = 7,
        verify_timeout: float = 5.0,
        max_punch_sockets: int = 64,
        hole_linger: float = 30.0,
        rendezvous_timeout: float = 10.0,
        max_streams: int = 1024,
        udt_config: UdtConfig | None = None,
        tunnel: TunnelChoice | None = None,
        mediator_http: str | None = None,
        proxy: ProxyConfig | None = None,
    ) -> None:
        """The anyio agent's arguments and defaults (see its ``__init__``).

        ``tunnel``: the listen session and the standby connections ride HTTP tunnels
        of that kind, or the one the probe picks (``"auto"``), through ``proxy`` when
        given; the mediator's at its HTTP face ``mediator_http`` (docs/tunnel.md).
        UDP (the ack, the punching) is never tunnelled."""
        if verify_timeout <= 0 or hole_linger < 0 or max_punch_sockets < 1 or max_streams < 1:
            raise LocalProtocolError("timeouts and limits must be positive")
        punch_config = udt_config or UdtConfig()
        if punch_config.connect_timeout is None:
            punch_config = dataclasses.replace(punch_config, connect_timeout=rendezvous_timeout)
        self.system_id, self.server_id, self._key = system_id, server_id, key
        self.mediator = mediator
        self.relays = tuple(relays)
        self._relay_endpoints = [parse_target(url) for url in self.relays]
        self._tcp_listen = tcp_listen
        self._udp_host = udp_host
        self._advertise = tuple(advertise) if advertise is not None else None
        self._lan = lan
        self._lan_group = lan_group
        self._lan_interfaces = tuple(lan_interfaces)
        self._standby_count = standby_count
        self._verify_timeout = verify_timeout
        self._hole_linger = hole_linger
        self._rendezvous_timeout = rendezvous_timeout
        self._max_streams = max_streams
        self._udt_config = punch_config
        self._tunnel, self._mediator_http, self._proxy = tunnel, mediator_http, proxy
        # One memory for both services: each location's winning method is kept apart.
        self._tunnel_memory = TunnelMemory()
        self._punches: dict[bytes, _Punch] = {}
        self._punch_tasks: dict[bytes, asyncio.Task[None]] = {}
        self._punch_sockets = PunchSockets[bytes](limit=max_punch_sockets)
        self._streams = 0
        self._handler: StreamHandler | None = None
        self._group: asyncio.TaskGroup | None = None
        #: The bound TCP listener's address, once ``serve`` has started.
        self.tcp_endpoint: Endpoint | None = None
        #: The TCP endpoints reported to the mediator and to LAN searches.
        self.advertised: tuple[Endpoint, ...] = ()
        self.listener: MediatorListener | None = None
        self.relay_agents: list[RelayAgent] = []
        self.counters = AgentCounters()

    # --- running ----------------------------------------------------------------------

    async def serve(
        self, handler: StreamHandler, *, started: Callable[[Endpoint], None] | None = None
    ) -> None:
        """Run every part until cancelled; ``started`` is called with the TCP listener's
        address once every part runs (a callback, as on the daemons and
        ``serve_local_port``)."""
        async with asyncio.TaskGroup() as group:
            self._handler, self._group = handler, group
            host, port = self._tcp_listen
            tcp = await asyncio.start_server(
                lambda r, w: group.create_task(self._tcp_stream(r, w)), host, port
            )
            try:
                bound = tcp.sockets[0].getsockname()
                self.tcp_endpoint = (str(bound[0]), int(bound[1]))
                self.advertised = self._advertise or (self._reachable(self.tcp_endpoint),)
                log.info(
                    "server %s accepting on tcp %s (advertised %s)",
                    self.server_id,
                    format_endpoint(self.tcp_endpoint),
                    ", ".join(format_endpoint(e) for e in self.advertised),
                )
                await self._start_parts(group)
                if started is not None:
                    started(self.tcp_endpoint)
                await asyncio.get_running_loop().create_future()  # until cancelled
            finally:
                tcp.close()

    @contextlib.asynccontextmanager
    async def running(self, handler: StreamHandler) -> AsyncIterator[Endpoint]:
        """``serve`` in a task for the block; yields the TCP listener's address."""
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[Endpoint] = loop.create_future()
        task = loop.create_task(self.serve(handler, started=ready.set_result))
        try:
            waits: set[asyncio.Future[Any]] = {ready, task}
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if not ready.done():
                await task  # it ended before it started: its exception says why
                raise RuntimeError("the agent stopped before it started")
            yield ready.result()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def wait_ready(self) -> None:
        """Return once the mediator holds this server online and every relay has an idle
        standby connection (bound it with a timeout). Raises ``RegistrationError`` if
        the mediator refuses the key."""
        if self.listener is not None:
            await self.listener.wait_registered()
        for agent in self.relay_agents:
            await agent.wait_for_idle(1)

    async def _start_parts(self, group: asyncio.TaskGroup) -> None:
        loop = asyncio.get_running_loop()
        if self.mediator is not None:
            self.listener = MediatorListener(
                self.mediator,
                system_id=self.system_id,
                server_id=self.server_id,
                system_key=self._key,
                local_endpoints=self.advertised,
                tunnel=self._tunnel,
                http=self._mediator_http,
                proxy=self._proxy,
                tunnel_memory=self._tunnel_memory,
            )
            joined: asyncio.Future[None] = loop.create_future()
            group.create_task(self.listener.run(started=joined))
            await joined
            group.create_task(self._take_requests(self.listener))
        for relay in self._relay_endpoints:
            agent = RelayAgent(
                relay,
                system_id=self.system_id,
                server_id=self.server_id,
                key=self._key,
                target=self._standby_count,
                tunnel=self._tunnel,
                proxy=self._proxy,
                tunnel_memory=self._tunnel_memory,
            )
            self.relay_agents.append(agent)
            joined = loop.create_future()
            group.create_task(agent.serve(self._relay_tunnel, started=joined))
            await joined
        if self._lan:
            responder = DiscoveryResponder(
                system_id=self.system_id, server_id=self.server_id, endpoints=self.advertised
            )
            lan = LanResponder(responder, group=self._lan_group, interfaces=self._lan_interfaces)
            joined = loop.create_future()
            group.create_task(lan.run(started=joined))
            await joined

    def _reachable(self, bound: Endpoint) -> Endpoint:
        """``bound``, or with a wildcard host the address the route to the mediator uses."""
        return advertised_endpoint(bound, self.mediator)

    # --- the paths --------------------------------------------------------------------

    async def _tcp_stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        remote = writer.get_extra_info("peername")
        peer = (str(remote[0]), int(remote[1]))
        await self._verify_and_handle(reader, writer, PathKind.TCP, peer, None)

    async def _relay_tunnel(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, info: RelayTunnelInfo
    ) -> None:
        # The relay agent closes the writer when this returns, as the handler does.
        await self._verify_and_handle(reader, writer, PathKind.RELAY, info.client_address, None)

    async def _take_requests(self, listener: MediatorListener) -> None:
        assert self._group is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                request = await listener.next_request()
            except EOFError:
                return
            if isinstance(request, ConnectionRequestReceived):
                self.counters.connect_requests += 1
                admitted, evict = self._punch_sockets.admit()
                if evict is not None:
                    evicted = self._punch_tasks.get(evict)
                    if evicted is not None:  # else its task sees ``evicted`` as it starts
                        evicted.cancel()
                    self.counters.punches_evicted += 1
                    log.info("connect %s: punching socket evicted", evict.hex()[:12])
                if not admitted:
                    self.counters.punches_refused += 1
                    log.warning(
                        "connect %s: not punching, %d punching sockets carry connections",
                        request.connect_session_id.hex()[:12],
                        len(self._punches),
                    )
                    continue
                # Counted from now, not from when its task starts: a burst of requests
                # must not open more sockets than the cap.
                use = PunchedSocket(
                    linger=self._hole_linger,
                    unproven_linger=self._rendezvous_timeout,
                    idle_since=loop.time(),
                )
                session_id = request.connect_session_id
                self._punch_sockets.add(session_id, use)
                task = self._group.create_task(self._punch(listener, request, use))
                self._punch_tasks[session_id] = task
                task.add_done_callback(functools.partial(self._punch_ended, session_id))
            elif isinstance(request, ClientUdpEndpointLearned):
                punch = self._punches.get(request.connect_session_id)
                if punch is not None:
                    self._start_rendezvous(punch, request.client_udp_endpoint)

    def _punch_ended(self, session_id: bytes, task: asyncio.Task[None]) -> None:
        if self._punch_tasks.get(session_id) is task:
            del self._punch_tasks[session_id]

    async def _punch(
        self,
        listener: MediatorListener,
        request: ConnectionRequestReceived,
        use: PunchedSocket,
    ) -> None:
        """Ack from a fresh socket and rendezvous toward the client; keep the hole open."""
        session_id = request.connect_session_id
        try:
            if not use.evicted:
                await self._punch_from_new_socket(listener, request, use)
        finally:
            # Evicted (cancelled) anywhere, even while its socket opened: it gives way.
            self._punch_sockets.remove(session_id)

    async def _punch_from_new_socket(
        self,
        listener: MediatorListener,
        request: ConnectionRequestReceived,
        use: PunchedSocket,
    ) -> None:
        session_id = request.connect_session_id
        sid = session_id.hex()[:12]
        try:
            endpoint = await create_udt_endpoint((self._udp_host, 0), config=self._udt_config)
        except OSError as exc:
            log.warning("connect %s: no punching socket: %s", sid, exc)
            return
        punch = _Punch(endpoint=endpoint, sessions={session_id}, use=use)
        self._punches[session_id] = punch

        def reused(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            # The client's next connections come as regular connects on the hole.
            punch.use.connection_proven()
            punch.spawn(
                self._serve_on_hole(punch, reader, writer, writer.get_extra_info("peername"))
            )

        try:
            await start_udt_server(reused, endpoint=endpoint)
            if request.client_udp_endpoint is not None:
                self._start_rendezvous(punch, request.client_udp_endpoint)
            punched = await listener.acknowledge(session_id, endpoint.datagram_port())
            log.info(
                "connect %s: acked from udp %s (seen as %s)",
                sid,
                format_endpoint(endpoint.local_address),
                format_endpoint(punched) if punched else "nothing: no answer",
            )
            await self._hold_hole(punch)
        finally:
            del self._punches[session_id]
            for task in list(punch.tasks):
                task.cancel()
            await asyncio.gather(*punch.tasks, return_exceptions=True)
            endpoint.close()
            await endpoint.wait_closed()
        log.debug("connect %s: punching socket closed", sid)

    def _start_rendezvous(self, punch: _Punch, client: Endpoint) -> None:
        if client in punch.tried:
            return
        punch.tried.add(client)
        punch.use.rendezvous_started()
        punch.spawn(self._rendezvous(punch, client))

    async def _rendezvous(self, punch: _Punch, client: Endpoint) -> None:
        try:
            reader, writer = await open_udt_rendezvous([client], endpoint=punch.endpoint)
        except (UdtConnectError, ConnectionError) as exc:
            punch.use.rendezvous_ended(connected=False)
            self.counters.rendezvous_failed += 1
            log.info("rendezvous with %s failed: %s", format_endpoint(client), exc)
            return
        except BaseException:
            punch.use.rendezvous_ended(connected=False)
            raise
        punch.use.rendezvous_ended(connected=True)
        await self._serve_on_hole(punch, reader, writer, client)

    async def _serve_on_hole(
        self,
        punch: _Punch,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: Endpoint | None,
    ) -> None:
        punch.use.stream_started()
        try:
            await self._verify_and_handle(
                reader,
                writer,
                PathKind.UDP,
                peer,
                punch.sessions.__contains__,
                require_session=True,
            )
        finally:
            punch.use.stream_ended(asyncio.get_running_loop().time())

    async def _hold_hole(self, punch: _Punch) -> None:
        """Return once the socket may close (``PunchedSocket.close_deadline``): polled,
        because a UDT connection opening or closing is not signalled."""
        loop = asyncio.get_running_loop()
        while True:
            pause = punch.use.poll_interval(
                loop.time(),
                open_connections=len(punch.endpoint.multiplexer.connections),
            )
            if pause <= 0:
                return
            await asyncio.sleep(pause)

    # --- every path ends here ---------------------------------------------------------

    async def _verify_and_handle(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        path: PathKind,
        peer: Endpoint | None,
        known_session: Callable[[bytes], bool] | None,
        *,
        require_session: bool = False,
    ) -> None:
        if self._streams >= self._max_streams:
            self.counters.over_capacity += 1
            log.warning("refusing a %s stream: %d streams open", path.value, self._streams)
            writer.transport.abort()
            return
        self._streams += 1
        try:
            try:
                accepted = await answer_client(
                    reader,
                    writer,
                    system_id=self.system_id,
                    server_id=self.server_id,
                    require_session=require_session,
                    known_session=known_session,
                    timeout=self._verify_timeout,
                )
            except VerificationError as exc:
                self.counters.rejected += 1
                where = format_endpoint(peer) if peer else "?"
                log.info("%s stream from %s not verified: %s", path.value, where, exc)
                return
            self.counters.accepted[path.value] += 1
            log.info(
                "accepted a %s stream from %s",
                path.value,
                format_endpoint(peer) if peer else "?",
            )
            assert self._handler is not None
            try:
                await self._handler(
                    AcceptedStream(
                        reader=reader,
                        writer=writer,
                        path=path,
                        peer=peer,
                        connect_session_id=accepted.connect_session_id,
                    )
                )
            except Exception:
                # One stream's failure is its handler's bug or its peer's doing; the
                # agent and its other streams carry on.
                log.exception("the %s stream handler failed", path.value)
        finally:
            self._streams -= 1
            writer.close()
