"""The client connector on plain sockets: one call, a verified socket by whichever path won.

The twin of ``anyio/connector.py``. ``Connector.connect()`` runs a ``PathRace``
(wavesync_proto.race) on the calling thread: the race says when to search the LAN, when to
ask the mediator, which attempts to start and which to cancel; the connector's bounded pool
of worker threads dials TCP, punches UDT from the socket the connect request left from, asks
relays, passes ``tunnel_syn`` on each new stream (``verify_server``) and reports back. The
first verified socket is returned, the others are closed. Cancelling an attempt shuts its
socket down (a dial, a read in ``tunnel_syn``); what cannot be interrupted (a UDT handshake,
a relay's answer) is bounded by the race's deadline and closed when it comes in late.

A punched socket outlives the connect that made it: while it holds a connection (and
``hole_linger`` seconds after), the next ``connect()`` to the same server first tries a new
UDT connection through the same hole, without the mediator (DESIGN.md §1 step 7). One
named thread keeps the holes and closes each when ``PunchedSocket`` says so; it starts with
the first hole that lingers (a hole worth nothing at its release closes there and then), so
a connector that never keeps a hole starts no keeper: each thread start and each hand-off
is a context switch, which a loaded machine turns into latency.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType

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
from wavesync_proto.tunnel import ProxyConfig
from wavesync_proto.udt.connection_types import UdtConfig

from .._common import describe_failure, parse_target
from ..errors import PathRaceError, VerificationError
from ._dial import SharedTunnelMemory, TunnelChoice
from ._net import resolve, run_transaction
from .connect import ConnectError, request_connection
from .lan import search_lan
from .relay_client import RelayConnectError, open_relay_stream
from .udt import UdtEndpoint
from .verify import verify_server

__all__ = ["Connection", "Connector", "PathRaceError"]

log = logging.getLogger("wavesync.connector")

#: Worker threads per Connector: a LAN search, a connect request and the attempts of a few
#: connects at once (``wavesync client --listen`` connects once per local connection).
_WORKERS = 32


@dataclass(frozen=True, kw_only=True)
class Connection:
    """A verified, connected socket to the server, and how it was reached."""

    #: Blocking, no timeout; for a UDP path one end of a socketpair the hole's UDT
    #: endpoint pumps (closing it closes the UDT connection gracefully).
    sock: socket.socket
    path: PathKind
    #: The winning attempt, e.g. "udp 203.0.113.5:40000" or "relay http://relay:3479".
    target: str
    #: Seconds from ``connect()`` to the verified socket.
    elapsed: float
    #: A new connection through a hole an earlier connect punched (no mediator asked).
    reused_hole: bool
    #: What failed before the winner came in (or was still running).
    failures: tuple[AttemptFailure, ...]


@dataclass(eq=False)
class _Hole:
    """A punched socket and the peer it reaches; the connector's keeper thread closes it."""

    endpoint: UdtEndpoint
    peer: Endpoint | None = None
    connect_session_id: bytes | None = None
    server_id: uuid.UUID | None = None
    #: Set once no connect uses it any more: from then on it lingers by this account.
    use: PunchedSocket | None = None


class Connector:
    """Connects to one server (``server_id``) or any server of a system (``system_id``).

    Use as ``with Connector(...) as connector: connection = connector.connect()``;
    leaving the block closes the punched sockets it keeps (and the UDT connections on
    them) and joins its threads. ``connect()`` may be called from several threads.
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
        for later connects in one ``TunnelMemory`` per connector), through ``proxy``
        when given; the mediator's at its HTTP face ``mediator_http``. Direct TCP, LAN
        and UDT are never tunnelled. A relayed ``Connection.sock`` is then the tunnel's
        socket (one end of a pair its thread pumps).

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
        self._tunnel, self._mediator_http, self._proxy = tunnel, mediator_http, proxy
        self._tunnel_memory = SharedTunnelMemory()
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
        #: Guards the holes, the counters and the reports; the keeper thread waits on it.
        self._condition = threading.Condition()
        self._pool: ThreadPoolExecutor | None = None
        self._keeper: threading.Thread | None = None
        self._closing = False
        #: Every punched socket still open, and the reusable ones by the server they reach.
        self._open_holes: list[_Hole] = []
        self._holes: dict[uuid.UUID, _Hole] = {}
        #: Connect requests sent to the mediator (a reused hole sends none).
        self.mediator_requests = 0
        #: connection_result reports the mediator answered.
        self.results_reported = 0
        self._reports = 0

    def __enter__(self) -> Connector:
        if self._pool is not None or self._closing:
            raise RuntimeError("a Connector runs in one `with` block")
        # Its threads start with the first tasks, and are reused by later ones.
        self._pool = ThreadPoolExecutor(_WORKERS, thread_name_prefix="wavesync-connector")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            # Leaving normally: let the mediator hear which paths won (each report gives
            # up 2.5 s after it began on its own).
            with self._condition:
                self._condition.wait_for(lambda: not self._reports, RESULT_REPORTS_WAIT)
        self.close()

    def close(self) -> None:
        """Close every punched socket (aborting UDT connections still on them), stop the
        keeper and join the workers: each of them ends within the race's deadline."""
        with self._condition:
            if self._closing:
                return
            self._closing = True
            holes, self._open_holes = self._open_holes, []
            self._holes.clear()
            self._condition.notify_all()
            keeper = self._keeper  # none starts once closing
        if keeper is not None:
            keeper.join()
        for hole in holes:
            hole.endpoint.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def connect(self) -> Connection:
        """A verified socket to the server by the first path that works.

        Raises ``PathRaceError`` (listing each path's failure) when none does within
        the deadline.
        """
        if self._pool is None or self._closing:
            raise RuntimeError("use the Connector in a `with` block")
        with self._condition:
            hole = self._hole_for(self.server_id)
            reuse: tuple[Endpoint, ...] = ()
            if hole is not None and hole.peer is not None and PathKind.UDP in self.paths:
                reuse = (hole.peer,)
        race = PathRace(
            now=time.monotonic(),
            paths=self.paths,
            deadline=self._deadline,
            start_delays=self._start_delays,
            relay_grace=self._relay_grace,
            lan=self._lan,
            mediator=self.mediator is not None,
            relays=self.relays,
            reuse=reuse,
        )
        return _RaceRun(self, race, hole).run()

    def _hole_for(self, server_id: uuid.UUID | None) -> _Hole | None:
        if server_id is not None:
            return self._holes.get(server_id)
        # A system target: any server of it that we reach already will do.
        return next(iter(self._holes.values()), None)

    def _submit(self, work: Callable[[], None]) -> None:
        assert self._pool is not None
        self._pool.submit(_logged, work)

    def _open_hole(self) -> _Hole:
        """A new punching socket, kept open until released (and then while in use)."""
        hole = _Hole(endpoint=UdtEndpoint.bind((self._udp_host, 0), config=self._udt_config))
        with self._condition:
            if not self._closing:
                self._open_holes.append(hole)
                return hole
        hole.endpoint.close()
        raise ConnectionAbortedError("the Connector is closed")

    def _release(self, hole: _Hole) -> None:
        """No connect uses ``hole`` now: it lingers while it carries connections (kept
        by the keeper thread, started now if need be), else it closes here."""
        with self._condition:
            now = time.monotonic()
            hole.use = PunchedSocket(
                linger=self._hole_linger,
                unproven_linger=0.0,
                idle_since=now,
                proven=hole.peer is not None,
                tried=True,
            )
            connections = len(hole.endpoint.multiplexer.connections)
            expired = hole.use.poll_interval(now, open_connections=connections) <= 0
            if expired and hole in self._open_holes:
                self._forget(hole)
            else:
                expired = False  # lingers, or close() has it
                if self._keeper is None and not self._closing:
                    self._keeper = threading.Thread(
                        target=self._keep_holes, name="wavesync-connector-holes", daemon=False
                    )
                    self._keeper.start()
                self._condition.notify_all()
        if expired:
            hole.endpoint.close()
            log.debug("punched socket %s closed", format_endpoint(hole.endpoint.local_address))

    def _forget(self, hole: _Hole) -> None:
        """Take ``hole`` off the open and the reusable ones (the caller closes it)."""
        self._open_holes.remove(hole)
        if hole.server_id is not None and self._holes.get(hole.server_id) is hole:
            del self._holes[hole.server_id]

    def _report_result(self, hole: _Hole, transaction: ClientTransaction) -> None:
        """Send connection_result from the punched socket, then release it."""
        try:
            assert self.mediator is not None
            mediator = resolve(self.mediator)
            event = run_transaction(transaction, hole.endpoint.datagram_port(), mediator)
            if isinstance(event, TransactionTimedOut):
                log.debug("connection_result: no answer from the mediator")
            elif event.message.error_code is None:
                with self._condition:
                    self.results_reported += 1
        except OSError as exc:
            log.debug("connection_result not sent: %s", exc)
        finally:
            self._release(hole)
            with self._condition:
                self._reports -= 1
                self._condition.notify_all()

    def _keep_holes(self) -> None:
        """The keeper thread: close each released hole once ``PunchedSocket`` says so."""
        while True:
            expired: list[_Hole] = []
            with self._condition:
                if self._closing:
                    return
                now = time.monotonic()
                pause: float | None = None
                for hole in self._open_holes:
                    if hole.use is None:
                        continue
                    wait = hole.use.poll_interval(
                        now, open_connections=len(hole.endpoint.multiplexer.connections)
                    )
                    if wait <= 0:
                        expired.append(hole)
                    else:
                        pause = wait if pause is None else min(pause, wait)
                for hole in expired:
                    self._forget(hole)
                if not expired:
                    self._condition.wait(pause)
            for hole in expired:
                hole.endpoint.close()
                log.debug("punched socket %s closed", format_endpoint(hole.endpoint.local_address))


class _Running:
    """An attempt under way: cancelling it shuts its socket down, which ends a dial or
    a ``tunnel_syn`` read at once; the attempt's own thread closes the socket."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.cancelled = False
        self.sock: socket.socket | None = None

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            if self.sock is not None:
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_RDWR)

    def attach(self, sock: socket.socket) -> None:
        with self._lock:
            if self.cancelled:
                sock.close()
                raise ConnectionAbortedError("cancelled")
            self.sock = sock


class _RaceRun:
    """One ``connect()``: runs the race's actions and feeds it what the workers found."""

    def __init__(self, connector: Connector, race: PathRace, reuse_hole: _Hole | None) -> None:
        self.connector = connector
        self.race = race
        self.reuse_hole = reuse_hole
        self.hole: _Hole | None = None  # the one this run punched, if it asked the mediator
        self.server_id = connector.server_id  # learned from the connect response
        self.ends_at = race.started_at + connector._deadline
        #: Guards the race (not thread-safe) and what follows; workers notify it.
        self.condition = threading.Condition()
        self.finished = False
        self.running: dict[int, _Running] = {}
        self.verified: dict[int, socket.socket] = {}
        #: Actions a worker's report brought, for the connecting thread to run.
        self.pending: list[RaceAction] = []

    def run(self) -> Connection:
        race = self.race
        try:
            with self.condition:
                while True:
                    actions, self.pending = [*self.pending, *race.actions()], []
                    for action in actions:
                        self._act(action)
                    event = race.next_event()
                    if event is not None:
                        break
                    timer = race.get_timer()
                    self.condition.wait(None if timer is None else timer - time.monotonic())
                    race.handle_timer(time.monotonic())
        finally:
            with self.condition:
                self.finished = True
                winner = race.winner
                for attempt_id, running in self.running.items():
                    if winner is None or attempt_id != winner.attempt_id:
                        running.cancel()
                losers = [
                    sock
                    for attempt_id, sock in self.verified.items()
                    if winner is None or attempt_id != winner.attempt_id
                ]
                hole = self.hole
            for sock in losers:
                sock.close()
            self._release_hole(hole, winner, race.started_at)
        if isinstance(event, RaceFailed):
            log.info("connect failed: %s\n%s", event.reason, event.describe())
            raise PathRaceError(event)
        assert isinstance(event, RaceWon)
        attempt = event.attempt
        log.info("connected by %s in %.1f ms", attempt.describe(), event.elapsed * 1000)
        sock = self.verified[attempt.attempt_id]
        sock.settimeout(None)
        return Connection(
            sock=sock,
            path=attempt.kind,
            target=attempt.describe(),
            elapsed=event.elapsed,
            reused_hole=attempt.reuse,
            failures=event.failures,
        )

    def _release_hole(self, hole: _Hole | None, winner: Attempt | None, started_at: float) -> None:
        """Hand the punched socket back to the keeper; after the mediator answered, first
        tell it which path won (connection_result, from that socket, by a worker)."""
        if hole is None:
            return
        connector = self.connector
        if winner is None or hole.connect_session_id is None:
            connector._release(hole)
            return
        now = time.monotonic()
        transaction = connection_result_transaction(
            hole.connect_session_id,
            path=RESULT_PATHS[winner.kind],
            duration_ms=round((now - started_at) * 1000),
            now=now,
        )
        with connector._condition:
            connector._reports += 1
        connector._submit(lambda: connector._report_result(hole, transaction))

    def _act(self, action: RaceAction) -> None:
        if isinstance(action, StartLanSearch):
            self.connector._submit(self._search_lan)
        elif isinstance(action, AskMediator):
            self.connector._submit(self._ask_mediator)
        elif isinstance(action, StartAttempt):
            running = _Running()
            self.running[action.attempt.attempt_id] = running
            attempt = action.attempt
            self.connector._submit(lambda: self._attempt(attempt, running))
        elif isinstance(action, CancelAttempt):
            cancelled = self.running.pop(action.attempt.attempt_id, None)
            if cancelled is not None:
                log.debug("cancelling %s: %s", action.attempt.describe(), action.reason)
                cancelled.cancel()

    def _tell(self, report: Callable[[float], None]) -> None:
        """Feed the race one report (on a worker thread) and wake the connecting thread."""
        with self.condition:
            timer = self.race.get_timer()
            report(time.monotonic())
            self._wake(timer)

    def _wake(self, timer_before: float | None) -> None:
        """Wake the connecting thread if the last report gave it something to do: an
        action, the outcome, or another timer (a report that changes nothing, such as
        ``attempt_connected``, costs no hand-off). Called holding the condition."""
        self.pending.extend(self.race.actions())
        if self.pending or self.race.done or self.race.get_timer() != timer_before:
            self.condition.notify_all()

    # --- the sources ------------------------------------------------------------------

    def _search_lan(self) -> None:
        connector = self.connector

        def found(server: ServerFound) -> None:
            self._tell(lambda now: self.race.offer_lan(server.endpoints, now))

        try:
            search_lan(
                found,
                server_id=connector.server_id,
                system_id=connector.system_id,
                timeout=connector._lan_timeout,
                group=connector._lan_group,
                interface=connector._lan_interface,
            )
        except OSError as exc:
            log.info("lan search failed: %s", exc)
        self._tell(self.race.lan_search_finished)

    def _ask_mediator(self) -> None:
        connector = self.connector
        assert connector.mediator is not None
        try:
            hole = connector._open_hole()
            with self.condition:
                if self.finished:  # the race ended before the socket was up
                    connector._release(hole)
                    return
                self.hole = hole
            with connector._condition:
                connector.mediator_requests += 1
            answer = request_connection(
                connector.mediator,
                server_id=connector.server_id,
                system_id=connector.system_id,
                udp=hole.endpoint.datagram_port(),
                timeout=connector._deadline,
                tunnel=connector._tunnel,
                http=connector._mediator_http,
                proxy=connector._proxy,
                tunnel_memory=connector._tunnel_memory,
            )
        except (ConnectError, OSError) as exc:
            reason = str(exc)
            self._tell(lambda now: self.race.mediator_failed(reason, now))
            return
        with self.condition:
            hole.connect_session_id = answer.connect_session_id
            hole.server_id = self.server_id = answer.response.server_id
            timer = self.race.get_timer()
            self.race.offer_connect_response(answer.response, time.monotonic())
            first = self._take_first_attempt()
            self._wake(timer)
        if first is not None:
            self._attempt(*first)

    def _take_first_attempt(self) -> tuple[Attempt, _Running] | None:
        """The first attempt the race just started, for this worker to run itself rather
        than hand it to the connecting thread and on to another worker; the other actions
        are left for the connecting thread. Called holding the condition."""
        actions = self.race.actions()
        if not actions or not isinstance(actions[0], StartAttempt) or self.pending:
            self.pending.extend(actions)
            return None
        attempt, running = actions[0].attempt, _Running()
        self.running[attempt.attempt_id] = running
        self.pending.extend(actions[1:])
        return attempt, running

    # --- the attempts -----------------------------------------------------------------

    def _attempt(self, attempt: Attempt, running: _Running) -> None:
        race, attempt_id = self.race, attempt.attempt_id
        try:
            sock, session_id, endpoint = self._open(attempt, running)
        except (OSError, RelayConnectError, ValueError) as exc:
            why = describe_failure(exc)
            self._tell(lambda now: race.attempt_failed(attempt_id, why, now))
            return
        except Exception as exc:  # a bug: say so, and let the race go on without it
            log.exception("%s failed", attempt.describe())
            why = describe_failure(exc)
            self._tell(lambda now: race.attempt_failed(attempt_id, why, now))
            return
        try:
            running.attach(sock)
            self._tell(lambda now: race.attempt_connected(attempt_id, now))
            verify_server(
                sock,
                server_id=self.server_id,
                system_id=None if self.server_id else self.connector.system_id,
                connect_session_id=session_id,
                timeout=self.connector._verify_timeout,
            )
            peer = endpoint.peer_of(sock) if endpoint is not None else None
        except (VerificationError, OSError) as exc:
            sock.close()
            why = describe_failure(exc)
            self._tell(lambda now: race.attempt_failed(attempt_id, why, now))
            return
        except BaseException:
            sock.close()
            raise
        with self.condition:
            if self.finished or running.cancelled:
                sock.close()  # a loser that came in late
                return
            self.verified[attempt_id] = sock
            if peer is not None:
                self._keep_hole(attempt, peer)
            race.attempt_verified(attempt_id, time.monotonic())
            self.condition.notify_all()

    def _open(
        self, attempt: Attempt, running: _Running
    ) -> tuple[socket.socket, bytes | None, UdtEndpoint | None]:
        """The attempt's connected socket, the connect session its tunnel_syn names, and
        the UDT endpoint it came from (for a UDP attempt)."""
        timeout = max(0.0, self.ends_at - time.monotonic())
        with self.condition:
            hole = self.reuse_hole if attempt.reuse else self.hole
        if attempt.kind in (PathKind.TCP, PathKind.LAN):
            assert attempt.tcp_endpoint is not None
            sock = _dial(attempt.tcp_endpoint, timeout, running)
            return sock, hole.connect_session_id if hole else None, None
        if attempt.kind is PathKind.RELAY:
            assert attempt.relay_url is not None
            relayed = open_relay_stream(
                parse_target(attempt.relay_url),
                server_id=self.server_id,
                system_id=None if self.server_id else self.connector.system_id,
                timeout=timeout,
                tunnel=self.connector._tunnel,
                proxy=self.connector._proxy,
                tunnel_memory=self.connector._tunnel_memory,
            )
            return relayed.sock, None, None
        if hole is None:  # the race offers UDP only after a connect response
            raise OSError("no punched socket for a UDP attempt")
        if attempt.reuse:
            assert hole.peer is not None
            sock = hole.endpoint.connect(hole.peer, timeout)
        else:
            sock = hole.endpoint.rendezvous(attempt.udp_candidates, timeout)
        return sock, hole.connect_session_id, hole.endpoint

    def _keep_hole(self, attempt: Attempt, peer: Endpoint) -> None:
        """A verified UDT stream proves the hole: later connects may reuse it."""
        hole = self.reuse_hole if attempt.reuse else self.hole
        if hole is None or self.server_id is None:
            return
        hole.peer = peer
        hole.server_id = self.server_id
        connector = self.connector
        with connector._condition:
            if hole in connector._open_holes:
                connector._holes[self.server_id] = hole
            if hole.use is not None:
                hole.use.connection_proven()


def _dial(endpoint: Endpoint, timeout: float, running: _Running) -> socket.socket:
    """A TCP connection to ``endpoint`` that ``running.cancel()`` can break off."""
    host, port = endpoint
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return socket.create_connection(endpoint, timeout=timeout)
    sock = socket.socket(family, socket.SOCK_STREAM)
    running.attach(sock)
    try:
        sock.settimeout(timeout)
        sock.connect((host, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return sock


def _logged(work: Callable[[], None]) -> None:
    """A worker's task: what escapes it is a bug, logged rather than lost in a future."""
    try:
        work()
    except Exception:
        log.exception("connector worker failed")
