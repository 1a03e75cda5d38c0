"""The client connector on anyio: one call, a verified stream by whichever path won.

``Connector.connect()`` runs a ``PathRace`` (wavesync_proto.race): the race says
when to search the LAN, when to ask the mediator, which attempts to start and
which to cancel; this module dials TCP, punches UDT from the socket the connect
request left from, asks relays, passes ``tunnel_syn`` on each new stream
(``verify_server``) and reports back. The first verified stream is returned, the
others are closed.

A punched socket outlives the connect that made it: while it holds a connection
(and ``hole_linger`` seconds after), the next ``connect()`` to the same server
first tries a new UDT connection through the same hole, without the mediator
(DESIGN.md §1 step 7); the race falls back to every path if that fails.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType

import anyio
import anyio.abc

from wavesync_proto.addresses import Endpoint, format_endpoint
from wavesync_proto.discovery import DEFAULT_GROUP, ServerFound
from wavesync_proto.errors import LocalProtocolError
from wavesync_proto.holes import PunchedSocket
from wavesync_proto.mediator.connect import RESULT_REPORTS_WAIT, connection_result_transaction
from wavesync_proto.race import (
    ALL_PATHS,
    RELAY_GRACE,
    RESULT_PATHS,
    AskMediator,
    Attempt,
    AttemptFailure,
    CancelAttempt,
    PathKind,
    PathRace,
    RaceAction,
    RaceFailed,
    RaceWon,
    StartAttempt,
    StartLanSearch,
)
from wavesync_proto.stun.transaction import ClientTransaction, TransactionTimedOut
from wavesync_proto.tunnel import ProxyConfig, TunnelMemory
from wavesync_proto.udt.connection_types import UdtConfig

from .._common import describe_failure
from ..errors import PathRaceError
from ._dial import TunnelChoice
from ._net import resolve, run_transaction, sleep_until_or
from .connect import ConnectError, request_connection
from .lan import search_lan
from .relay_client import RelayConnectError, open_relay_stream
from .tunnel import parse_target
from .udt import UdtEndpoint, UdtStream
from .verify import VerificationError, verify_server

__all__ = ["Connection", "Connector", "PathRaceError"]

log = logging.getLogger("wavesync.connector")


@dataclass(frozen=True, kw_only=True)
class Connection:
    """A verified stream to the server, and how it was reached."""

    stream: anyio.abc.ByteStream
    path: PathKind
    #: The winning attempt, e.g. "udp 203.0.113.5:40000" or "relay http://relay:3479".
    target: str
    #: Seconds from ``connect()`` to the verified stream.
    elapsed: float
    #: A new connection through a hole an earlier connect punched (no mediator asked).
    reused_hole: bool
    #: What failed before the winner came in (or was still running).
    failures: tuple[AttemptFailure, ...]


@dataclass(eq=False)
class _Hole:
    """A punched socket and the peer it reaches; its holder task lives in the connector."""

    endpoint: UdtEndpoint
    peer: Endpoint | None
    connect_session_id: bytes | None
    server_id: uuid.UUID | None
    release: anyio.Event


class Connector:
    """Connects to one server (``server_id``) or any server of a system (``system_id``).

    Use as ``async with Connector(...) as connector: connection = await
    connector.connect()``; leaving the block closes the punched sockets it keeps.
    """

    def __init__(
        self,
        *,
        server_id: uuid.UUID | None = None,
        system_id: uuid.UUID | None = None,
        mediator: Endpoint | None = None,
        relays: Sequence[str] = (),
        paths: frozenset[PathKind] = ALL_PATHS,
        lan: bool = True,
        lan_group: Endpoint = DEFAULT_GROUP,
        lan_interface: str | None = None,
        lan_timeout: float = 1.0,
        deadline: float = 10.0,
        start_delays: Mapping[PathKind, float] | None = None,
        relay_grace: float = RELAY_GRACE,
        verify_timeout: float = 5.0,
        udp_host: str = "0.0.0.0",  # noqa: S104 - a client socket answers only its peers
        hole_linger: float = 20.0,
        udt_config: UdtConfig | None = None,
        tunnel: TunnelChoice | None = None,
        mediator_http: str | None = None,
        proxy: ProxyConfig | None = None,
    ) -> None:
        """``tunnel``: the TCP copy of the connect request and the relay sessions ride
        HTTP tunnels of that kind, or the one the probe picks (``"auto"``, remembered
        for later connects), through ``proxy`` when given; the mediator's at its HTTP
        face ``mediator_http``. Direct TCP, LAN and UDT are never tunnelled.

        ``relay_grace`` (0.1 s): how long a verified relay stream waits for a direct
        path still under way before it wins (wavesync_proto.race).

        ``hole_linger`` (20 s) is shorter than the agent's (30 s) on purpose: the client
        lets an idle hole go first, so a reuse never waits out a connect timeout
        against a socket the agent already closed."""
        if (server_id is None) == (system_id is None):
            raise LocalProtocolError("name exactly one of server_id and system_id")
        if deadline <= 0 or verify_timeout <= 0 or lan_timeout <= 0 or hole_linger < 0:
            raise LocalProtocolError("timeouts must be positive")
        self.server_id, self.system_id = server_id, system_id
        self.mediator = mediator
        self.relays = tuple(relays)
        self.paths = paths
        self._lan = lan
        self._lan_group = lan_group
        self._lan_interface = lan_interface
        self._lan_timeout = lan_timeout
        self._deadline = deadline
        self._start_delays = start_delays
        self._relay_grace = relay_grace
        self._verify_timeout = verify_timeout
        self._udp_host = udp_host
        self._hole_linger = hole_linger
        self._udt_config = udt_config
        self._tunnel, self._mediator_http, self._proxy = tunnel, mediator_http, proxy
        self._tunnel_memory = TunnelMemory()
        self._group: anyio.abc.TaskGroup | None = None
        #: Live punched sockets, by the server they reach (None: not known yet).
        self._holes: dict[uuid.UUID, _Hole] = {}
        #: Connect requests sent to the mediator (a reused hole sends none).
        self.mediator_requests = 0
        #: connection_result reports the mediator answered.
        self.results_reported = 0
        self._reports = 0
        self._reports_done = anyio.Event()

    async def __aenter__(self) -> Connector:
        self._group = anyio.create_task_group()
        await self._group.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        assert self._group is not None
        if exc_type is None and self._reports:
            # Leaving normally: let the mediator hear which paths won (each report gives
            # up 2.5 s after it began on its own).
            with anyio.move_on_after(RESULT_REPORTS_WAIT):
                await self._reports_done.wait()
        self._group.cancel_scope.cancel()
        return await self._group.__aexit__(exc_type, exc, traceback)

    async def connect(self) -> Connection:
        """A verified stream to the server by the first path that works.

        Raises ``PathRaceError`` (listing each path's failure) when none does within
        the deadline.
        """
        if self._group is None:
            raise RuntimeError("use the Connector in an `async with` block")
        hole = self._hole_for(self.server_id)
        reuse: tuple[Endpoint, ...] = ()
        if hole is not None and hole.peer is not None and PathKind.UDP in self.paths:
            reuse = (hole.peer,)
        race = PathRace(
            now=anyio.current_time(),
            paths=self.paths,
            deadline=self._deadline,
            start_delays=self._start_delays,
            relay_grace=self._relay_grace,
            lan=self._lan,
            mediator=self.mediator is not None,
            relays=self.relays,
            reuse=reuse,
        )
        return await _RaceRun(self, race, hole).run()

    def _hole_for(self, server_id: uuid.UUID | None) -> _Hole | None:
        if server_id is not None:
            return self._holes.get(server_id)
        # A system target: any server of it that we reach already will do.
        return next(iter(self._holes.values()), None)

    async def _open_hole(self) -> _Hole:
        """A new punching socket, held open by a task of the connector's."""
        assert self._group is not None
        endpoint = UdtEndpoint.bind((self._udp_host, 0), config=self._udt_config)
        hole = _Hole(
            endpoint=endpoint,
            peer=None,
            connect_session_id=None,
            server_id=None,
            release=anyio.Event(),
        )
        await self._group.start(self._hold, hole)
        return hole

    async def _report_result(self, hole: _Hole, transaction: ClientTransaction) -> None:
        """Send connection_result from the punched socket, then release it."""
        self._reports += 1
        try:
            assert self.mediator is not None
            mediator = await resolve(self.mediator)
            event = await run_transaction(transaction, hole.endpoint.datagram_port(), mediator)
            if isinstance(event, TransactionTimedOut):
                log.debug("connection_result: no answer from the mediator")
            elif event.message.error_code is None:
                self.results_reported += 1
        except (OSError, anyio.BrokenResourceError) as exc:
            log.debug("connection_result not sent: %s", exc)
        finally:
            hole.release.set()
            self._reports -= 1
            if not self._reports:
                self._reports_done.set()
                self._reports_done = anyio.Event()

    async def _hold(
        self, hole: _Hole, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Keep ``hole`` open until released, then while it carries connections and
        ``hole_linger`` seconds after its last."""
        async with hole.endpoint:
            task_status.started()
            await hole.release.wait()
            use = PunchedSocket(
                linger=self._hole_linger,
                unproven_linger=0.0,
                idle_since=anyio.current_time(),
                proven=hole.peer is not None,
                tried=True,
            )
            while True:
                pause = use.poll_interval(
                    anyio.current_time(),
                    open_connections=len(hole.endpoint.multiplexer.connections),
                )
                if pause <= 0:
                    break
                await anyio.sleep(pause)
        if hole.server_id is not None and self._holes.get(hole.server_id) is hole:
            del self._holes[hole.server_id]
        log.debug("punched socket %s closed", format_endpoint(hole.endpoint.local_address))


class _RaceRun:
    """One ``connect()``: runs the race's actions and feeds it what they found."""

    def __init__(self, connector: Connector, race: PathRace, reuse_hole: _Hole | None) -> None:
        self.connector = connector
        self.race = race
        self.reuse_hole = reuse_hole
        self.hole: _Hole | None = None  # the one this run punched, if it asked the mediator
        self.server_id = connector.server_id  # learned from the connect response
        self.wake = anyio.Event()
        self.scopes: dict[int, anyio.CancelScope] = {}
        self.verified: dict[int, anyio.abc.ByteStream] = {}

    def changed(self) -> None:
        self.wake.set()

    async def run(self) -> Connection:
        race = self.race
        try:
            async with anyio.create_task_group() as group:
                while True:
                    for action in race.actions():
                        self._act(action, group)
                    event = race.next_event()
                    if event is not None:
                        break
                    await sleep_until_or(self.wake, race.get_timer())
                    self.wake = anyio.Event()
                    race.handle_timer(anyio.current_time())
                group.cancel_scope.cancel()
        finally:
            self._release_hole(race.winner, race.started_at)
            winner = race.winner
            for attempt_id, stream in self.verified.items():
                if winner is None or attempt_id != winner.attempt_id:
                    with anyio.CancelScope(shield=True):
                        await anyio.aclose_forcefully(stream)
        if isinstance(event, RaceFailed):
            log.info("connect failed: %s\n%s", event.reason, event.describe())
            raise PathRaceError(event)
        assert isinstance(event, RaceWon)
        attempt = event.attempt
        log.info("connected by %s in %.1f ms", attempt.describe(), event.elapsed * 1000)
        return Connection(
            stream=self.verified[attempt.attempt_id],
            path=attempt.kind,
            target=attempt.describe(),
            elapsed=event.elapsed,
            reused_hole=attempt.reuse,
            failures=event.failures,
        )

    def _release_hole(self, winner: Attempt | None, started_at: float) -> None:
        """Hand the punched socket back to its holder; after the mediator answered, first
        tell it which path won (connection_result, from that socket, in the background)."""
        hole = self.hole
        if hole is None:
            return
        connector = self.connector
        if winner is None or hole.connect_session_id is None or connector._group is None:
            hole.release.set()
            return
        transaction = connection_result_transaction(
            hole.connect_session_id,
            path=RESULT_PATHS[winner.kind],
            duration_ms=round((anyio.current_time() - started_at) * 1000),
            now=anyio.current_time(),
        )
        connector._group.start_soon(connector._report_result, hole, transaction)

    def _act(self, action: RaceAction, group: anyio.abc.TaskGroup) -> None:
        if isinstance(action, StartLanSearch):
            group.start_soon(self._search_lan)
        elif isinstance(action, AskMediator):
            group.start_soon(self._ask_mediator)
        elif isinstance(action, StartAttempt):
            scope = anyio.CancelScope()
            self.scopes[action.attempt.attempt_id] = scope
            group.start_soon(self._attempt, action.attempt, scope)
        elif isinstance(action, CancelAttempt):
            running = self.scopes.get(action.attempt.attempt_id)
            if running is not None:
                log.debug("cancelling %s: %s", action.attempt.describe(), action.reason)
                running.cancel()

    # --- the sources ------------------------------------------------------------------

    async def _search_lan(self) -> None:
        connector = self.connector

        def found(server: ServerFound) -> None:
            self.race.offer_lan(server.endpoints, anyio.current_time())
            self.changed()

        try:
            await search_lan(
                found,
                server_id=connector.server_id,
                system_id=connector.system_id,
                timeout=connector._lan_timeout,
                group=connector._lan_group,
                interface=connector._lan_interface,
            )
        except OSError as exc:
            log.info("lan search failed: %s", exc)
        self.race.lan_search_finished(anyio.current_time())
        self.changed()

    async def _ask_mediator(self) -> None:
        connector = self.connector
        assert connector.mediator is not None
        try:
            self.hole = await connector._open_hole()
            connector.mediator_requests += 1
            answer = await request_connection(
                connector.mediator,
                server_id=connector.server_id,
                system_id=connector.system_id,
                udp=self.hole.endpoint.datagram_port(),
                timeout=connector._deadline,
                tunnel=connector._tunnel,
                http=connector._mediator_http,
                proxy=connector._proxy,
                tunnel_memory=connector._tunnel_memory,
            )
        except (ConnectError, OSError) as exc:
            self.race.mediator_failed(str(exc), anyio.current_time())
        else:
            self.hole.connect_session_id = answer.connect_session_id
            self.hole.server_id = self.server_id = answer.response.server_id
            self.race.offer_connect_response(answer.response, anyio.current_time())
        self.changed()

    # --- the attempts -----------------------------------------------------------------

    async def _attempt(self, attempt: Attempt, scope: anyio.CancelScope) -> None:
        race = self.race
        with scope:
            try:
                stream, session_id = await self._open(attempt)
            except (
                OSError,
                RelayConnectError,
                TimeoutError,
                ValueError,
                anyio.BrokenResourceError,
            ) as exc:
                race.attempt_failed(attempt.attempt_id, describe_failure(exc), anyio.current_time())
                self.changed()
                return
            race.attempt_connected(attempt.attempt_id, anyio.current_time())
            try:
                verified, _answer = await verify_server(
                    stream,
                    server_id=self.server_id,
                    system_id=None if self.server_id else self.connector.system_id,
                    connect_session_id=session_id,
                    timeout=self.connector._verify_timeout,
                )
            except VerificationError as exc:
                await anyio.aclose_forcefully(stream)
                race.attempt_failed(attempt.attempt_id, describe_failure(exc), anyio.current_time())
                self.changed()
                return
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await anyio.aclose_forcefully(stream)
                raise
            self.verified[attempt.attempt_id] = verified
            if isinstance(stream, UdtStream):
                self._keep_hole(attempt, stream.connection.peer_address)
            race.attempt_verified(attempt.attempt_id, anyio.current_time())
            self.changed()

    async def _open(self, attempt: Attempt) -> tuple[anyio.abc.ByteStream, bytes | None]:
        """The attempt's transport, and the connect session its tunnel_syn names."""
        timeout = self.connector._deadline
        if attempt.kind in (PathKind.TCP, PathKind.LAN):
            assert attempt.tcp_endpoint is not None
            host, port = attempt.tcp_endpoint
            with anyio.fail_after(timeout):
                stream = await anyio.connect_tcp(host, port)
            return stream, self.hole.connect_session_id if self.hole else None
        if attempt.kind is PathKind.RELAY:
            assert attempt.relay_url is not None
            relayed = await open_relay_stream(
                parse_target(attempt.relay_url),
                server_id=self.server_id,
                system_id=None if self.server_id else self.connector.system_id,
                timeout=timeout,
                tunnel=self.connector._tunnel,
                proxy=self.connector._proxy,
                tunnel_memory=self.connector._tunnel_memory,
            )
            return relayed.stream, None
        if attempt.reuse:
            hole = self.reuse_hole
            assert hole is not None
            assert hole.peer is not None
            return await hole.endpoint.connect(hole.peer), hole.connect_session_id
        hole = self.hole
        if hole is None:  # the race offers UDP only after a connect response
            raise OSError("no punched socket for a UDP attempt")
        return await hole.endpoint.rendezvous(attempt.udp_candidates), hole.connect_session_id

    def _keep_hole(self, attempt: Attempt, peer: Endpoint | None) -> None:
        """A verified UDT stream proves the hole: later connects may reuse it."""
        hole = self.reuse_hole if attempt.reuse else self.hole
        if hole is None or peer is None or self.server_id is None:
            return
        hole.peer = peer
        hole.server_id = self.server_id
        self.connector._holes[self.server_id] = hole
