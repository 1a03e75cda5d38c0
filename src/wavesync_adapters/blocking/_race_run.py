"""One ``Connector.connect()`` on plain sockets: the race's actions run by the pool.

``RaceRun`` drives one ``PathRace`` (wavesync_proto.race) on the calling thread and
hands each action to the connector's worker pool: a LAN search, a connect request to
the mediator, a TCP dial, a UDT punch, a relay stream; each new stream passes
``tunnel_syn`` (``verify_server``) before it is reported. ``Connection`` is what a
connect returns, ``Hole`` a punched socket the connector keeps for the next connect.
Split from ``connector.py``, which keeps the ``Connector`` (its holes, its keeper
thread, its pool) and re-exports ``Connection``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from wavesync_proto.addresses import Endpoint
from wavesync_proto.discovery import ServerFound
from wavesync_proto.holes import PunchedSocket
from wavesync_proto.mediator.connect import connection_result_transaction
from wavesync_proto.race import (
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

from .._common import describe_failure, parse_target
from ..errors import PathRaceError, VerificationError
from .connect import ConnectError, request_connection
from .lan import search_lan
from .relay_client import RelayConnectError, open_relay_stream
from .udt import UdtEndpoint
from .verify import verify_server

if TYPE_CHECKING:
    from .connector import Connector

__all__ = ["Connection", "Hole", "RaceRun", "RunningAttempt", "dial", "logged"]

log = logging.getLogger("wavesync.connector")


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
class Hole:
    """A punched socket and the peer it reaches; the connector's keeper thread closes it."""

    endpoint: UdtEndpoint
    peer: Endpoint | None = None
    connect_session_id: bytes | None = None
    server_id: uuid.UUID | None = None
    #: Set once no connect uses it any more: from then on it lingers by this account.
    use: PunchedSocket | None = None


class RunningAttempt:
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


class RaceRun:
    """One ``connect()``: runs the race's actions and feeds it what the workers found."""

    def __init__(self, connector: Connector, race: PathRace, reuse_hole: Hole | None) -> None:
        self.connector = connector
        self.race = race
        self.reuse_hole = reuse_hole
        self.hole: Hole | None = None  # the one this run punched, if it asked the mediator
        self.server_id = connector.server_id  # learned from the connect response
        self.ends_at = race.started_at + connector._deadline
        #: Guards the race (not thread-safe) and what follows; workers notify it.
        self.condition = threading.Condition()
        self.finished = False
        self.running: dict[int, RunningAttempt] = {}
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

    def _release_hole(self, hole: Hole | None, winner: Attempt | None, started_at: float) -> None:
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
            running = RunningAttempt()
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

    def _take_first_attempt(self) -> tuple[Attempt, RunningAttempt] | None:
        """The first attempt the race just started, for this worker to run itself rather
        than hand it to the connecting thread and on to another worker; the other actions
        are left for the connecting thread. Called holding the condition."""
        actions = self.race.actions()
        if not actions or not isinstance(actions[0], StartAttempt) or self.pending:
            self.pending.extend(actions)
            return None
        attempt, running = actions[0].attempt, RunningAttempt()
        self.running[attempt.attempt_id] = running
        self.pending.extend(actions[1:])
        return attempt, running

    # --- the attempts -----------------------------------------------------------------

    def _attempt(self, attempt: Attempt, running: RunningAttempt) -> None:
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
        self, attempt: Attempt, running: RunningAttempt
    ) -> tuple[socket.socket, bytes | None, UdtEndpoint | None]:
        """The attempt's connected socket, the connect session its tunnel_syn names, and
        the UDT endpoint it came from (for a UDP attempt)."""
        timeout = max(0.0, self.ends_at - time.monotonic())
        with self.condition:
            hole = self.reuse_hole if attempt.reuse else self.hole
        if attempt.kind in (PathKind.TCP, PathKind.LAN):
            assert attempt.tcp_endpoint is not None
            sock = dial(attempt.tcp_endpoint, timeout, running)
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


def dial(endpoint: Endpoint, timeout: float, running: RunningAttempt) -> socket.socket:
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


def logged(work: Callable[[], None]) -> None:
    """A worker's task: what escapes it is a bug, logged rather than lost in a future."""
    try:
        work()
    except Exception:
        log.exception("connector worker failed")
