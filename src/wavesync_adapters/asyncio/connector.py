"""The client connector on asyncio: one call, a verified stream pair by whichever path won.

The twin of ``wavesync_adapters.anyio.connector`` (uvloop too; no anyio import).
``Connector.connect()`` runs a ``PathRace`` (wavesync_proto.race): the race says when to
search the LAN, when to ask the mediator, which attempts to start and which to cancel;
this module dials TCP, punches UDT from the socket the connect request left from, asks
relays, passes ``tunnel_syn`` on each new stream (``verify_server``) and reports back.
The first verified stream is returned as ``(StreamReader, StreamWriter)``, whichever
path carried it; the others are closed.

A punched socket outlives the connect that made it: while it holds a connection (and
``hole_linger`` seconds after), the next ``connect()`` to the same server first tries a
new UDT connection through the same hole, without the mediator (DESIGN.md §1 step 7);
the race falls back to every path if that fails. When the socket may close is
``wavesync_proto.holes.PunchedSocket``'s decision.

Tasks: each ``connect()`` owns its sources and attempts and cancels what is left when
the race is decided; the connector owns the punched sockets' holders and the
connection_result reports, and leaving its ``async with`` block ends them all.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

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

from .._common import TunnelChoice, describe_failure, parse_target
from ..errors import PathRaceError
from ._net import cancel_and_wait, resolve, run_transaction, sleep_until_or
from .connect import ConnectError, request_connection
from .lan import search_lan
from .relay_client import RelayConnectError, open_relay_stream
from .udt import (
    UdtEndpoint,
    UdtTransport,
    create_udt_endpoint,
    open_udt_connection,
    open_udt_rendezvous,
)
from .verify import VerificationError, verify_server

__all__ = ["Connection", "Connector", "PathRaceError"]

log = logging.getLogger("wavesync.connector")

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@dataclass(frozen=True, kw_only=True)
class Connection:
    """A verified stream pair to the server, and how it was reached."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
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
    release: asyncio.Event


class Connector:
    """Connects to one server (``server_id``) or any server of a system (``system_id``).

    Use as ``async with Connector(...) as connector: connection = await
    connector.connect()``; leaving the block closes the punched sockets it keeps (the
    connections it returned are the caller's to close: ``connection.writer.close()``).
    The keyword arguments are the anyio Connector's, HTTP tunnels included.
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
        self._entered = False
        #: The connector's own tasks: punched sockets' holders and connection_result reports.
        self._tasks: set[asyncio.Task[None]] = set()
        #: Every punched socket still open, so that leaving the block closes each.
        self._endpoints: set[UdtEndpoint] = set()
        #: Live punched sockets, by the server they reach (None: not known yet).
        self._holes: dict[uuid.UUID, _Hole] = {}
        #: Connect requests sent to the mediator (a reused hole sends none).
        self.mediator_requests = 0
        #: connection_result reports the mediator answered.
        self.results_reported = 0
        self._reports = 0
        self._reports_done = asyncio.Event()

    async def __aenter__(self) -> Connector:
        self._entered = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._entered = False
        if exc_type is None and self._reports:
            # Leaving normally: let the mediator hear which paths won (each report gives
            # up 2.5 s after it began on its own).
            try:
                async with asyncio.timeout(RESULT_REPORTS_WAIT):
                    await self._reports_done.wait()
            except TimeoutError:
                pass
        if self._tasks:
            await cancel_and_wait(*self._tasks)
        for endpoint in list(self._endpoints):
            endpoint.close()  # a holder cancelled before it ran never closed its own
        self._endpoints.clear()
        self._holes.clear()

    async def connect(self) -> Connection:
        """A verified stream pair to the server by the first path that works.

        Raises ``PathRaceError`` (listing each path's failure) when none does within
        the deadline.
        """
        if not self._entered:
            raise RuntimeError("use the Connector in an `async with` block")
        hole = self._hole_for(self.server_id)
        reuse: tuple[Endpoint, ...] = ()
        if hole is not None and hole.peer is not None and PathKind.UDP in self.paths:
            reuse = (hole.peer,)
        race = PathRace(
            now=asyncio.get_running_loop().time(),
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

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run ``coroutine`` as a task of the connector's (ended when the block is left)."""
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("connector task failed", exc_info=task.exception())

    async def _open_hole(self) -> _Hole:
        """A new punching socket, held open by a task of the connector's."""
        endpoint = await create_udt_endpoint((self._udp_host, 0), config=self._udt_config)
        self._endpoints.add(endpoint)
        hole = _Hole(
            endpoint=endpoint,
            peer=None,
            connect_session_id=None,
            server_id=None,
            release=asyncio.Event(),
        )
        self._spawn(self._hold(hole))
        return hole

    async def _report_result(self, hole: _Hole, transaction: ClientTransaction) -> None:
        """Send connection_result from the punched socket, then release it."""
        try:
            assert self.mediator is not None
            mediator = await resolve(self.mediator)
            event = await run_transaction(transaction, hole.endpoint.datagram_port(), mediator)
            if isinstance(event, TransactionTimedOut):
                log.debug("connection_result: no answer from the mediator")
            elif event.message.error_code is None:
                self.results_reported += 1
        except OSError as exc:
            log.debug("connection_result not sent: %s", exc)
        finally:
            hole.release.set()
            self._reports -= 1
            if not self._reports:
                self._reports_done.set()
                self._reports_done = asyncio.Event()

    async def _hold(self, hole: _Hole) -> None:
        """Keep ``hole`` open until released, then while it carries connections and
        ``hole_linger`` seconds after its last."""
        loop = asyncio.get_running_loop()
        endpoint = hole.endpoint
        try:
            await hole.release.wait()
            use = PunchedSocket(
                linger=self._hole_linger,
                unproven_linger=0.0,
                idle_since=loop.time(),
                proven=hole.peer is not None,
                tried=True,
            )
            while True:
                pause = use.poll_interval(loop.time(), open_connections=len(endpoint.connections))
                if pause <= 0:
                    break
                await asyncio.sleep(pause)
        finally:
            endpoint.close()
            self._endpoints.discard(endpoint)
            if hole.server_id is not None and self._holes.get(hole.server_id) is hole:
                del self._holes[hole.server_id]
            log.debug("punched socket %s closed", format_endpoint(endpoint.local_address))
        await endpoint.wait_closed()


class _RaceRun:
    """One ``connect()``: runs the race's actions and feeds it what they found."""

    def __init__(self, connector: Connector, race: PathRace, reuse_hole: _Hole | None) -> None:
        self.connector = connector
        self.race = race
        self.reuse_hole = reuse_hole
        self.hole: _Hole | None = None  # the one this run punched, if it asked the mediator
        self.server_id = connector.server_id  # learned from the connect response
        self.loop = asyncio.get_running_loop()
        self.wake = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()
        self.attempts: dict[int, asyncio.Task[None]] = {}
        self.verified: dict[int, Streams] = {}
        #: A task that failed unexpectedly: the connect raises it (as a task group would).
        self.crashed: BaseException | None = None

    def changed(self) -> None:
        self.wake.set()

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and self.crashed is None:
            self.crashed = task.exception()
            self.changed()

    async def run(self) -> Connection:
        race = self.race
        try:
            while True:
                for action in race.actions():
                    self._act(action)
                event = race.next_event()
                if event is not None:
                    break
                await sleep_until_or(self.wake, race.get_timer())
                self.wake.clear()
                if self.crashed is not None:
                    raise self.crashed
                race.handle_timer(self.loop.time())
        finally:
            if self.tasks:
                await cancel_and_wait(*self.tasks)
            self._release_hole(race.winner, race.started_at)
            winner = race.winner
            for attempt_id, (_, writer) in self.verified.items():
                if winner is None or attempt_id != winner.attempt_id:
                    writer.transport.abort()
        if isinstance(event, RaceFailed):
            log.info("connect failed: %s\n%s", event.reason, event.describe())
            raise PathRaceError(event)
        assert isinstance(event, RaceWon)
        attempt = event.attempt
        log.info("connected by %s in %.1f ms", attempt.describe(), event.elapsed * 1000)
        reader, writer = self.verified[attempt.attempt_id]
        return Connection(
            reader=reader,
            writer=writer,
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
        if winner is None or hole.connect_session_id is None or not connector._entered:
            hole.release.set()
            return
        transaction = connection_result_transaction(
            hole.connect_session_id,
            path=RESULT_PATHS[winner.kind],
            duration_ms=round((self.loop.time() - started_at) * 1000),
            now=self.loop.time(),
        )
        connector._reports += 1
        connector._spawn(connector._report_result(hole, transaction))

    def _act(self, action: RaceAction) -> None:
        if isinstance(action, StartLanSearch):
            self._spawn(self._search_lan())
        elif isinstance(action, AskMediator):
            self._spawn(self._ask_mediator())
        elif isinstance(action, StartAttempt):
            attempt = action.attempt
            self.attempts[attempt.attempt_id] = self._spawn(self._attempt(attempt))
        elif isinstance(action, CancelAttempt):
            running = self.attempts.get(action.attempt.attempt_id)
            if running is not None and not running.done():
                log.debug("cancelling %s: %s", action.attempt.describe(), action.reason)
                running.cancel()

    # --- the sources ------------------------------------------------------------------

    async def _search_lan(self) -> None:
        connector = self.connector

        def found(server: ServerFound) -> None:
            self.race.offer_lan(server.endpoints, self.loop.time())
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
        self.race.lan_search_finished(self.loop.time())
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
            self.race.mediator_failed(str(exc), self.loop.time())
        else:
            self.hole.connect_session_id = answer.connect_session_id
            self.hole.server_id = self.server_id = answer.response.server_id
            self.race.offer_connect_response(answer.response, self.loop.time())
        self.changed()

    # --- the attempts -----------------------------------------------------------------

    async def _attempt(self, attempt: Attempt) -> None:
        race = self.race
        try:
            reader, writer, session_id = await self._open(attempt)
        except (OSError, RelayConnectError, ValueError) as exc:
            race.attempt_failed(attempt.attempt_id, describe_failure(exc), self.loop.time())
            self.changed()
            return
        race.attempt_connected(attempt.attempt_id, self.loop.time())
        try:
            await verify_server(
                reader,
                writer,
                server_id=self.server_id,
                system_id=None if self.server_id else self.connector.system_id,
                connect_session_id=session_id,
                timeout=self.connector._verify_timeout,
            )
        except VerificationError as exc:
            writer.transport.abort()
            race.attempt_failed(attempt.attempt_id, describe_failure(exc), self.loop.time())
            self.changed()
            return
        except BaseException:
            writer.transport.abort()  # cancelled by the race: nobody takes this stream
            raise
        self.verified[attempt.attempt_id] = (reader, writer)
        if isinstance(writer.transport, UdtTransport):
            self._keep_hole(attempt, writer.transport.connection.peer_address)
        race.attempt_verified(attempt.attempt_id, self.loop.time())
        self.changed()

    async def _open(
        self, attempt: Attempt
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes | None]:
        """The attempt's stream pair, and the connect session its tunnel_syn names."""
        timeout = self.connector._deadline
        if attempt.kind in (PathKind.TCP, PathKind.LAN):
            assert attempt.tcp_endpoint is not None
            host, port = attempt.tcp_endpoint
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(host, port)
            return reader, writer, self.hole.connect_session_id if self.hole else None
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
            return relayed.reader, relayed.writer, None
        if attempt.reuse:
            hole = self.reuse_hole
            assert hole is not None
            assert hole.peer is not None
            reader, writer = await open_udt_connection(hole.peer, endpoint=hole.endpoint)
            return reader, writer, hole.connect_session_id
        punched = self.hole
        if punched is None:  # the race offers UDP only after a connect response
            raise OSError("no punched socket for a UDP attempt")
        reader, writer = await open_udt_rendezvous(
            attempt.udp_candidates, endpoint=punched.endpoint
        )
        return reader, writer, punched.connect_session_id

    def _keep_hole(self, attempt: Attempt, peer: Endpoint | None) -> None:
        """A verified UDT stream proves the hole: later connects may reuse it."""
        hole = self.reuse_hole if attempt.reuse else self.hole
        if hole is None or peer is None or self.server_id is None:
            return
        hole.peer = peer
        hole.server_id = self.server_id
        self.connector._holes[self.server_id] = hole
