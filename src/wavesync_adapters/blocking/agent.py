"""The server agent on blocking sockets and threads: every path ends in one handler.

The twin of ``anyio/agent.py``: the listen session with the mediator, one punching UDP
socket per connect request (the signed connection_ack and the UDT rendezvous leave
from it, and it keeps listening so the client's later connections reuse the hole), a
TCP listener for direct and LAN clients, the relay standby pools and the LAN
responder. Whatever the path, a new stream must first pass ``tunnel_syn``
(``answer_client``); only then does the application's handler see it, as an
``AcceptedStream`` whose ``sock`` is a real ``socket.socket``: the TCP or relay
connection itself, or one end of a UDT stream's socketpair.

Thin by design: registration, punching (``wavesync_proto.holes``), standby policy,
discovery answers and verification are the core's machines; this module wires them to
sockets and threads. Threads are named ``wavesync-agent-*``; those that hold a
client's stream are not daemons and are joined when ``running`` ends, after their
sockets were shut down (a handler blocked reading sees EOF).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from wavesync_proto.addresses import Endpoint, format_endpoint
from wavesync_proto.discovery import DEFAULT_GROUP, DiscoveryResponder
from wavesync_proto.errors import LocalProtocolError
from wavesync_proto.holes import PunchedSocket, PunchSockets
from wavesync_proto.mediator.listen import ClientUdpEndpointLearned, ConnectionRequestReceived
from wavesync_proto.race import PathKind
from wavesync_proto.tunnel import ProxyConfig
from wavesync_proto.udt.connection_types import UdtConfig

from .._common import AgentCounters, advertised_endpoint, parse_target
from ..errors import UdtConnectError, VerificationError
from ._dial import SharedTunnelMemory, TunnelChoice
from .lan import LanResponder
from .listen import JOIN_TIMEOUT, STOP_POLL, MediatorListener
from .relay_agent import RelayAgent, RelayTunnelInfo
from .udt import UdtEndpoint
from .verify import answer_client

__all__ = ["AcceptedStream", "AgentCounters", "ServerAgent", "StreamHandler"]

log = logging.getLogger("wavesync.agent")

# A rendezvous gives up by the core's connect timeout; this only bounds the wait for
# its answer should the I/O thread never give one.
_RENDEZVOUS_SLACK = 5.0


@dataclass(frozen=True, kw_only=True)
class AcceptedStream:
    """A verified stream from a client, whichever path it came by."""

    #: A real socket, blocking (no timeout); closed by the agent when the handler returns.
    sock: socket.socket
    #: TCP (direct or LAN: the server cannot tell them apart), UDP or RELAY.
    path: PathKind
    #: The client's address as this side sees it (the relay's, for a relayed stream).
    peer: Endpoint | None
    #: The client's connect session, when it came through the mediator.
    connect_session_id: bytes | None


StreamHandler = Callable[[AcceptedStream], object]


@dataclass(eq=False)
class _Punch:
    """One punching socket: the sessions acked from it, the rendezvous tried, its use
    (``wavesync_proto.holes`` decides when it closes) and its stop flag (eviction)."""

    endpoint: UdtEndpoint
    sessions: set[bytes]
    use: PunchedSocket
    stop: threading.Event = field(default_factory=threading.Event)
    tried: set[Endpoint] = field(default_factory=set)


class ServerAgent:
    """A server behind NAT: registered, punching, listening, in the relay pools.

    ``with agent.running(handler) as tcp_endpoint:`` serves in background threads
    until the block ends; ``handler(accepted)`` runs in a thread of its own for each
    verified stream (at most ``max_streams`` at once), and the socket is closed when
    it returns.
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
        """The anyio agent's arguments and defaults (see ``anyio.agent.ServerAgent``).
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
        self._tunnel, self._mediator_http, self._proxy = tunnel, mediator_http, proxy
        self._tunnel_memory = SharedTunnelMemory()
        self.mediator = mediator
        self.relays = tuple(relays)
        self._relay_endpoints = tuple(parse_target(url) for url in self.relays)
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
        # Guards the counters, the punching sockets and their uses, and the open streams.
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._punches: dict[bytes, _Punch] = {}
        self._punch_sockets = PunchSockets[bytes](limit=max_punch_sockets)
        self._streams = 0
        self._open: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._handler: StreamHandler | None = None
        #: The bound TCP listener's address, once ``running`` has started.
        self.tcp_endpoint: Endpoint | None = None
        #: The TCP endpoints reported to the mediator and to LAN searches.
        self.advertised: tuple[Endpoint, ...] = ()
        self.listener: MediatorListener | None = None
        self.relay_agents: list[RelayAgent] = []
        self.counters = AgentCounters()

    # --- running ----------------------------------------------------------------------

    @contextlib.contextmanager
    def running(self, handler: StreamHandler) -> Iterator[Endpoint]:
        """Run every part in background threads until the block ends; yields the TCP
        listener's address. Leaving the block stops everything: the parts notice within
        ``STOP_POLL`` seconds, open streams are shut down, threads are joined (each
        within ``JOIN_TIMEOUT``; one that does not stop is logged)."""
        if self._handler is not None:
            raise LocalProtocolError("the agent runs already (or ran: make a new one)")
        self._handler = handler
        with contextlib.ExitStack() as stack:
            stack.callback(self._stop_everything)
            tcp = socket.create_server(self._tcp_listen, family=_family(self._tcp_listen[0]))
            stack.callback(tcp.close)
            tcp.settimeout(STOP_POLL)
            bound = tcp.getsockname()
            self.tcp_endpoint = (str(bound[0]), int(bound[1]))
            self.advertised = self._advertise or (self._reachable(self.tcp_endpoint),)
            log.info(
                "server %s accepting on tcp %s (advertised %s)",
                self.server_id,
                format_endpoint(self.tcp_endpoint),
                ", ".join(format_endpoint(e) for e in self.advertised),
            )
            self._spawn("tcp", self._accept_tcp, tcp, daemon=True)
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
                self.listener.start()
                stack.callback(self.listener.close)
                self._spawn("requests", self._take_requests, self.listener, daemon=True)
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
                agent.start(self._relay_tunnel)
                stack.callback(agent.close)
            if self._lan:
                self._start_lan()
            # Runs first on the way out: every loop sees the flag before its socket closes.
            stack.callback(self._stop.set)
            yield self.tcp_endpoint

    def wait_ready(self, timeout: float) -> None:
        """Return once the mediator holds this server online and every relay has an idle
        standby connection; ``TimeoutError`` after ``timeout`` seconds in all. Raises
        ``RegistrationError`` if the mediator refuses the key."""
        deadline = time.monotonic() + timeout
        if self.listener is not None:
            self.listener.wait_registered(timeout)
        for agent in self.relay_agents:
            agent.wait_for_idle(1, max(0.0, deadline - time.monotonic()))

    def _start_lan(self) -> None:
        responder = DiscoveryResponder(
            system_id=self.system_id, server_id=self.server_id, endpoints=self.advertised
        )
        lan = LanResponder(responder, group=self._lan_group, interfaces=self._lan_interfaces)
        joined = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                lan.run(self._stop, started=joined.set)
            except Exception as exc:
                failure.append(exc)
                joined.set()

        self._spawn("lan", run, daemon=True)
        if not joined.wait(JOIN_TIMEOUT):
            raise TimeoutError("the LAN responder did not join its group in time")
        if failure:
            raise failure[0]

    def _stop_everything(self) -> None:
        self._stop.set()
        with self._lock:
            for punch in self._punches.values():
                punch.stop.set()
            streams = list(self._open)
        # Handlers blocked on their socket see EOF; the threads then end on their own.
        for sock in streams:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + JOIN_TIMEOUT
        while True:
            with self._lock:
                threads = [t for t in self._threads if t is not threading.current_thread()]
            alive = [t for t in threads if t.is_alive()]
            if not alive or time.monotonic() >= deadline:
                break
            alive[0].join(max(0.0, min(STOP_POLL, deadline - time.monotonic())))
        for thread in threads:
            if thread.is_alive():
                log.warning("%s did not stop in %.0f s", thread.name, JOIN_TIMEOUT)

    def _spawn(self, role: str, target: Callable[..., object], *args: object, daemon: bool) -> None:
        def run() -> None:
            try:
                target(*args)
            finally:
                with self._lock:
                    self._threads.discard(threading.current_thread())

        thread = threading.Thread(target=run, name=f"wavesync-agent-{role}", daemon=daemon)
        with self._lock:
            self._threads.add(thread)
        thread.start()

    def _reachable(self, bound: Endpoint) -> Endpoint:
        """``bound``, or with a wildcard host the address the route to the mediator uses."""
        return advertised_endpoint(bound, self.mediator)

    # --- the paths --------------------------------------------------------------------

    def _accept_tcp(self, tcp: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                sock, remote = tcp.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stop.is_set():
                    return
                log.warning("tcp accept failed: %s", exc)  # EMFILE and the like: go on
                self._stop.wait(STOP_POLL)
                continue
            peer = (str(remote[0]), int(remote[1]))
            if not self._claim_stream(sock, PathKind.TCP):
                continue
            self._spawn(
                "stream", self._verify_and_handle, sock, PathKind.TCP, peer, None, daemon=False
            )

    def _relay_tunnel(self, sock: socket.socket, info: RelayTunnelInfo) -> None:
        # Runs in the tunnel's own thread; the relay agent closes the socket afterwards.
        if self._claim_stream(sock, PathKind.RELAY):
            self._verify_and_handle(sock, PathKind.RELAY, info.client_address, None)

    def _take_requests(self, listener: MediatorListener) -> None:
        while not self._stop.is_set():
            try:
                request = listener.next_request(STOP_POLL)
            except TimeoutError:
                continue
            except EOFError:
                return
            if isinstance(request, ConnectionRequestReceived):
                self._punch_for(listener, request)
            elif isinstance(request, ClientUdpEndpointLearned):
                with self._lock:
                    punch = self._punches.get(request.connect_session_id)
                if punch is not None:
                    self._start_rendezvous(punch, request.client_udp_endpoint)

    def _punch_for(self, listener: MediatorListener, request: ConnectionRequestReceived) -> None:
        sid = request.connect_session_id.hex()[:12]
        with self._lock:
            self.counters.connect_requests += 1
            admitted, evict = self._punch_sockets.admit()
            if evict is not None:
                evicted = self._punches.get(evict)
                if evicted is not None:  # else its thread sees ``evicted`` as it starts
                    evicted.stop.set()
                self.counters.punches_evicted += 1
            if not admitted:
                self.counters.punches_refused += 1
            else:
                # Counted from now, not from when its thread starts: a burst of requests
                # must not open more sockets than the cap.
                use = PunchedSocket(
                    linger=self._hole_linger,
                    unproven_linger=self._rendezvous_timeout,
                    idle_since=time.monotonic(),
                )
                self._punch_sockets.add(request.connect_session_id, use)
            punching = len(self._punches)
        if evict is not None:
            log.info("connect %s: punching socket evicted", evict.hex()[:12])
        if not admitted:
            log.warning(
                "connect %s: not punching, %d punching sockets carry connections", sid, punching
            )
            return
        self._spawn("punch", self._punch, listener, request, use, daemon=False)

    def _punch(
        self,
        listener: MediatorListener,
        request: ConnectionRequestReceived,
        use: PunchedSocket,
    ) -> None:
        """Ack from a fresh socket and rendezvous toward the client; keep the hole open."""
        session_id = request.connect_session_id
        sid = session_id.hex()[:12]
        with self._lock:
            if use.evicted or self._stop.is_set():
                self._punch_sockets.remove(session_id)
                return
        try:
            endpoint = UdtEndpoint.bind((self._udp_host, 0), config=self._udt_config)
        except OSError as exc:
            with self._lock:
                self._punch_sockets.remove(session_id)
            log.warning("connect %s: no punching socket: %s", sid, exc)
            return
        punch = _Punch(endpoint=endpoint, sessions={session_id}, use=use)
        with self._lock:
            self._punches[session_id] = punch
        try:
            endpoint.listen()  # the client's next connections come as regular connects
            self._spawn("udt-accept", self._accept_reused, punch, daemon=True)
            if request.client_udp_endpoint is not None:
                self._start_rendezvous(punch, request.client_udp_endpoint)
            punched = listener.acknowledge(session_id, endpoint.datagram_port())
            log.info(
                "connect %s: acked from udp %s (seen as %s)",
                sid,
                format_endpoint(endpoint.local_address),
                format_endpoint(punched) if punched else "nothing: no answer",
            )
            self._hold_hole(punch)
        except OSError as exc:  # the endpoint stopped under us (evicted, or the agent stops)
            log.debug("connect %s: punching socket failed: %s", sid, exc)
        finally:
            with self._lock:
                del self._punches[session_id]
                self._punch_sockets.remove(session_id)
            punch.stop.set()
            endpoint.close()  # aborts what is left; the accept and rendezvous threads end
        log.debug("connect %s: punching socket closed", sid)

    def _start_rendezvous(self, punch: _Punch, client: Endpoint) -> None:
        with self._lock:
            if client in punch.tried:
                return
            punch.tried.add(client)
            punch.use.rendezvous_started()
        self._spawn("rendezvous", self._rendezvous, punch, client, daemon=False)

    def _rendezvous(self, punch: _Punch, client: Endpoint) -> None:
        try:
            sock = punch.endpoint.rendezvous(
                [client], timeout=self._rendezvous_timeout + _RENDEZVOUS_SLACK
            )
        except (UdtConnectError, OSError) as exc:
            with self._lock:
                punch.use.rendezvous_ended(connected=False)
                self.counters.rendezvous_failed += 1
            log.info("rendezvous with %s failed: %s", format_endpoint(client), exc)
            return
        except BaseException:
            with self._lock:
                punch.use.rendezvous_ended(connected=False)
            raise
        with self._lock:
            punch.use.rendezvous_ended(connected=True)
        self._serve_on_hole(punch, sock, client)

    def _accept_reused(self, punch: _Punch) -> None:
        while not punch.stop.is_set():
            try:
                sock = punch.endpoint.accept(STOP_POLL)
            except TimeoutError:
                continue
            except OSError:  # the endpoint is closed
                return
            peer = punch.endpoint.peer_of(sock)
            with self._lock:
                punch.use.connection_proven()
            self._spawn("stream", self._serve_on_hole, punch, sock, peer, daemon=False)

    def _serve_on_hole(self, punch: _Punch, sock: socket.socket, peer: Endpoint | None) -> None:
        with self._lock:
            punch.use.stream_started()
        try:
            if self._claim_stream(sock, PathKind.UDP):
                self._verify_and_handle(
                    sock, PathKind.UDP, peer, punch.sessions.__contains__, require_session=True
                )
        finally:
            with self._lock:
                punch.use.stream_ended(time.monotonic())

    def _hold_hole(self, punch: _Punch) -> None:
        """Return once the socket may close (``PunchedSocket.close_deadline``), or it was
        evicted, or the agent stops: polled, because a UDT connection opening or closing
        is not signalled."""
        while not punch.stop.is_set():
            with self._lock:
                pause = punch.use.poll_interval(
                    time.monotonic(),
                    open_connections=len(punch.endpoint.multiplexer.connections),
                )
            if pause <= 0:
                return
            punch.stop.wait(pause)

    # --- every path ends here ---------------------------------------------------------

    def _claim_stream(self, sock: socket.socket, path: PathKind) -> bool:
        """Count a new stream against ``max_streams``; refuse (and close) it at the cap."""
        with self._lock:
            if self._streams < self._max_streams and not self._stop.is_set():
                self._streams += 1
                self._open.add(sock)
                return True
            self.counters.over_capacity += 1
            streams = self._streams
        log.warning("refusing a %s stream: %d streams open", path.value, streams)
        sock.close()
        return False

    def _verify_and_handle(
        self,
        sock: socket.socket,
        path: PathKind,
        peer: Endpoint | None,
        known_session: Callable[[bytes], bool] | None,
        require_session: bool = False,
    ) -> None:
        """Verify a claimed stream, run the handler on it, close it (in this thread)."""
        where = format_endpoint(peer) if peer else "?"
        try:
            try:
                accepted = answer_client(
                    sock,
                    system_id=self.system_id,
                    server_id=self.server_id,
                    require_session=require_session,
                    known_session=known_session,
                    timeout=self._verify_timeout,
                )
            except VerificationError as exc:
                with self._lock:
                    self.counters.rejected += 1
                log.info("%s stream from %s not verified: %s", path.value, where, exc)
                return
            with self._lock:
                self.counters.accepted[path.value] += 1
            log.info("accepted a %s stream from %s", path.value, where)
            sock.settimeout(None)
            assert self._handler is not None
            try:
                self._handler(
                    AcceptedStream(
                        sock=sock,
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
            with self._lock:
                self._streams -= 1
                self._open.discard(sock)
            sock.close()


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
