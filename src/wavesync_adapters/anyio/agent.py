"""The server agent on anyio: every path a client can take ends in one ``serve`` handler.

``ServerAgent`` runs the server's side of DESIGN.md §1 at once: the listen session
with the mediator, one punching UDP socket per connect request (the signed
connection_ack and the UDT rendezvous leave from it, and it keeps listening so the
client's later connections reuse the hole), a TCP listener for direct and LAN
clients, the relay standby pools and the LAN responder. Whatever the path, a new
stream must first pass ``tunnel_syn`` (``answer_client``); only then does the
application's handler see it, as an ``AcceptedStream``.

Thin by design: registration, punching, standby policy, discovery answers and
verification are the core's machines; this module wires them to sockets.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import anyio
import anyio.abc

from wavesync_proto.addresses import Endpoint, format_endpoint
from wavesync_proto.discovery import DEFAULT_GROUP, DiscoveryResponder
from wavesync_proto.errors import LocalProtocolError
from wavesync_proto.holes import PunchedSocket, PunchSockets
from wavesync_proto.mediator.listen import ClientUdpEndpointLearned, ConnectionRequestReceived
from wavesync_proto.race import PathKind
from wavesync_proto.tunnel import ProxyConfig, TunnelMemory
from wavesync_proto.udt.connection_types import UdtConfig

from .._common import AgentCounters, advertised_endpoint
from ._dial import TunnelChoice
from .lan import LanResponder
from .listen import MediatorListener
from .relay_agent import RelayAgent, RelayTunnelInfo
from .tunnel import parse_target
from .udt import UdtConnectError, UdtEndpoint, UdtStream
from .verify import VerificationError, answer_client

__all__ = ["AcceptedStream", "AgentCounters", "ServerAgent", "StreamHandler"]

log = logging.getLogger("wavesync.agent")


@dataclass(frozen=True, kw_only=True)
class AcceptedStream:
    """A verified stream from a client, whichever path it came by."""

    stream: anyio.abc.ByteStream
    #: TCP (direct or LAN: the server cannot tell them apart), UDP or RELAY.
    path: PathKind
    #: The client's address as this side sees it (the relay's, for a relayed stream).
    peer: Endpoint | None
    #: The client's connect session, when it came through the mediator.
    connect_session_id: bytes | None


StreamHandler = Callable[[AcceptedStream], Awaitable[None]]


@dataclass(eq=False)
class _Punch:
    """One punching socket: its task group, the sessions acked from it, the
    rendezvous tried, and its use (``wavesync_proto.holes`` decides when it closes)."""

    endpoint: UdtEndpoint
    sessions: set[bytes]
    group: anyio.abc.TaskGroup
    use: PunchedSocket
    tried: set[Endpoint] = field(default_factory=set)


class ServerAgent:
    """A server behind NAT: registered, punching, listening, in the relay pools.

    ``await group.start(agent.serve, handler)`` returns once the TCP listener is bound
    (``tcp_endpoint``); ``handler`` runs in its own task for each verified stream, and
    the stream is closed when it returns.
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
        """``tunnel``: the listen session and the standby connections ride HTTP tunnels
        of that kind, or the one the probe picks (``"auto"``), through ``proxy`` when
        given; the mediator's at its HTTP face ``mediator_http`` (docs/tunnel.md).
        UDP (the ack, the punching) is never tunnelled.

        ``advertise``: the TCP endpoints to report to the mediator and LAN clients
        (default: the bound listener, with an unspecified host replaced by the address
        this host reaches the mediator from). ``hole_linger``: how long a punching
        socket stays open after its last connection closed, for the client's next
        connection to reuse the hole. ``rendezvous_timeout``: how long the agent punches
        toward a client (a client's race gives up after 10 s by default; UDT 4.11 would
        try for 30 s). A socket that never carried a connection closes when its
        rendezvous ends."""
        if verify_timeout <= 0 or hole_linger < 0 or max_punch_sockets < 1 or max_streams < 1:
            raise LocalProtocolError("timeouts and limits must be positive")
        punch_config = udt_config or UdtConfig()
        if punch_config.connect_timeout is None:
            punch_config = dataclasses.replace(punch_config, connect_timeout=rendezvous_timeout)
        self.system_id, self.server_id, self._key = system_id, server_id, key
        self.mediator = mediator
        self.relays = tuple(relays)
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
        self._punch_sockets = PunchSockets[bytes](limit=max_punch_sockets)
        self._streams = 0
        self._handler: StreamHandler | None = None
        self._group: anyio.abc.TaskGroup | None = None
        #: The bound TCP listener's address, once ``serve`` has started.
        self.tcp_endpoint: Endpoint | None = None
        #: The TCP endpoints reported to the mediator and to LAN searches.
        self.advertised: tuple[Endpoint, ...] = ()
        self.listener: MediatorListener | None = None
        self.relay_agents: list[RelayAgent] = []
        self.counters = AgentCounters()

    # --- running ----------------------------------------------------------------------

    async def serve(
        self,
        handler: StreamHandler,
        *,
        task_status: anyio.abc.TaskStatus[Endpoint] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run every part until cancelled; ``task_status`` gets the TCP listener's address."""
        tcp = await anyio.create_tcp_listener(
            local_host=self._tcp_listen[0], local_port=self._tcp_listen[1], reuse_port=False
        )
        async with tcp, anyio.create_task_group() as group:
            self._handler, self._group = handler, group
            bound = tcp.extra(anyio.abc.SocketAttribute.local_address)
            self.tcp_endpoint = (str(bound[0]), int(bound[1]))
            self.advertised = self._advertise or (self._reachable(self.tcp_endpoint),)
            log.info(
                "server %s accepting on tcp %s (advertised %s)",
                self.server_id,
                format_endpoint(self.tcp_endpoint),
                ", ".join(format_endpoint(e) for e in self.advertised),
            )
            group.start_soon(tcp.serve, self._tcp_stream, group)
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
                await group.start(self.listener.run)
                group.start_soon(self._take_requests, self.listener)
            for url in self.relays:
                agent = RelayAgent(
                    parse_target(url),
                    system_id=self.system_id,
                    server_id=self.server_id,
                    key=self._key,
                    target=self._standby_count,
                    tunnel=self._tunnel,
                    proxy=self._proxy,
                    tunnel_memory=self._tunnel_memory,
                )
                self.relay_agents.append(agent)
                await group.start(agent.serve, self._relay_tunnel)
            if self._lan:
                responder = DiscoveryResponder(
                    system_id=self.system_id, server_id=self.server_id, endpoints=self.advertised
                )
                lan = LanResponder(
                    responder, group=self._lan_group, interfaces=self._lan_interfaces
                )
                await group.start(lan.run)
            task_status.started(self.tcp_endpoint)

    @contextlib.asynccontextmanager
    async def running(self, handler: StreamHandler) -> AsyncIterator[Endpoint]:
        """``serve`` in a task group for the block; yields the TCP listener's address.
        Leaving the block stops every part (as the asyncio and blocking agents'
        ``running`` do)."""
        async with anyio.create_task_group() as group:
            bound = await group.start(self.serve, handler)
            try:
                yield bound
            finally:
                group.cancel_scope.cancel()

    async def wait_ready(self) -> None:
        """Return once the mediator holds this server online and every relay has an idle
        standby connection (bound it with a timeout). Raises ``RegistrationError`` if
        the mediator refuses the key."""
        if self.listener is not None:
            await self.listener.wait_registered()
        for agent in self.relay_agents:
            await agent.wait_for_idle(1)

    def _reachable(self, bound: Endpoint) -> Endpoint:
        """``bound``, or with a wildcard host the address the route to the mediator uses."""
        return advertised_endpoint(bound, self.mediator)

    # --- the paths --------------------------------------------------------------------

    async def _tcp_stream(self, stream: anyio.abc.SocketStream) -> None:
        remote = stream.extra(anyio.abc.SocketAttribute.remote_address)
        peer = (str(remote[0]), int(remote[1]))
        await self._verify_and_handle(stream, PathKind.TCP, peer, None)

    async def _relay_tunnel(self, stream: anyio.abc.ByteStream, info: RelayTunnelInfo) -> None:
        # The relay agent closes the stream when this returns, as the handler does.
        await self._verify_and_handle(stream, PathKind.RELAY, info.client_address, None)

    async def _take_requests(self, listener: MediatorListener) -> None:
        assert self._group is not None
        while True:
            try:
                request = await listener.next_request()
            except anyio.EndOfStream:
                return
            if isinstance(request, ConnectionRequestReceived):
                self.counters.connect_requests += 1
                admitted, evict = self._punch_sockets.admit()
                if evict is not None:
                    evicted = self._punches.get(evict)
                    if evicted is not None:  # else its task sees ``evicted`` as it starts
                        evicted.group.cancel_scope.cancel()
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
                    idle_since=anyio.current_time(),
                )
                self._punch_sockets.add(request.connect_session_id, use)
                self._group.start_soon(self._punch, listener, request, use)
            elif isinstance(request, ClientUdpEndpointLearned):
                punch = self._punches.get(request.connect_session_id)
                if punch is not None:
                    self._start_rendezvous(punch, request.client_udp_endpoint)

    async def _punch(
        self,
        listener: MediatorListener,
        request: ConnectionRequestReceived,
        use: PunchedSocket,
    ) -> None:
        """Ack from a fresh socket and rendezvous toward the client; keep the hole open."""
        session_id = request.connect_session_id
        sid = session_id.hex()[:12]
        if use.evicted:
            self._punch_sockets.remove(session_id)
            return
        try:
            endpoint = UdtEndpoint.bind((self._udp_host, 0), config=self._udt_config)
        except OSError as exc:
            self._punch_sockets.remove(session_id)
            log.warning("connect %s: no punching socket: %s", sid, exc)
            return
        async with endpoint, anyio.create_task_group() as group:
            punch = _Punch(endpoint=endpoint, sessions={session_id}, group=group, use=use)
            self._punches[session_id] = punch
            try:
                endpoint.listen()  # the client's next connections come as regular connects
                group.start_soon(self._accept_reused, punch)
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
                self._punch_sockets.remove(session_id)
                group.cancel_scope.cancel()
        log.debug("connect %s: punching socket closed", sid)

    def _start_rendezvous(self, punch: _Punch, client: Endpoint) -> None:
        if client in punch.tried:
            return
        punch.tried.add(client)
        punch.use.rendezvous_started()
        punch.group.start_soon(self._rendezvous, punch, client)

    async def _rendezvous(self, punch: _Punch, client: Endpoint) -> None:
        try:
            stream = await punch.endpoint.rendezvous([client])
        except (UdtConnectError, anyio.BrokenResourceError) as exc:
            punch.use.rendezvous_ended(connected=False)
            self.counters.rendezvous_failed += 1
            log.info("rendezvous with %s failed: %s", format_endpoint(client), exc)
            return
        except BaseException:
            punch.use.rendezvous_ended(connected=False)
            raise
        punch.use.rendezvous_ended(connected=True)
        await self._serve_on_hole(punch, stream, client)

    async def _accept_reused(self, punch: _Punch) -> None:
        while True:
            stream = await punch.endpoint.accept()
            peer = stream.connection.peer_address
            punch.use.connection_proven()
            punch.group.start_soon(self._serve_on_hole, punch, stream, peer)

    async def _serve_on_hole(self, punch: _Punch, stream: UdtStream, peer: Endpoint | None) -> None:
        punch.use.stream_started()
        try:
            await self._verify_and_handle(
                stream, PathKind.UDP, peer, punch.sessions.__contains__, require_session=True
            )
        finally:
            punch.use.stream_ended(anyio.current_time())

    async def _hold_hole(self, punch: _Punch) -> None:
        """Return once the socket may close (``PunchedSocket.close_deadline``): polled,
        because a UDT connection opening or closing is not signalled."""
        while True:
            pause = punch.use.poll_interval(
                anyio.current_time(),
                open_connections=len(punch.endpoint.multiplexer.connections),
            )
            if pause <= 0:
                return
            await anyio.sleep(pause)

    # --- every path ends here ---------------------------------------------------------

    async def _verify_and_handle(
        self,
        stream: anyio.abc.ByteStream,
        path: PathKind,
        peer: Endpoint | None,
        known_session: Callable[[bytes], bool] | None,
        require_session: bool = False,
    ) -> None:
        if self._streams >= self._max_streams:
            self.counters.over_capacity += 1
            log.warning("refusing a %s stream: %d streams open", path.value, self._streams)
            await anyio.aclose_forcefully(stream)
            return
        self._streams += 1
        try:
            try:
                verified, accepted = await answer_client(
                    stream,
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
                        stream=verified,
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
            with anyio.CancelScope(shield=True):
                await anyio.aclose_forcefully(stream)
