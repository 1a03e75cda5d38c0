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

import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType

from wavesync_proto.addresses import Endpoint, format_endpoint
from wavesync_proto.discovery import DEFAULT_GROUP
from wavesync_proto.errors import LocalProtocolError
from wavesync_proto.holes import PunchedSocket
from wavesync_proto.mediator.connect import RESULT_REPORTS_WAIT
from wavesync_proto.race import (
    ALL_PATHS,
    RELAY_GRACE,
    PathKind,
    PathRace,
)
from wavesync_proto.stun.transaction import ClientTransaction, TransactionTimedOut
from wavesync_proto.tunnel import ProxyConfig
from wavesync_proto.udt.connection_types import UdtConfig

from ..errors import PathRaceError
from ._dial import SharedTunnelMemory, TunnelChoice
from ._net import resolve, run_transaction
from ._race_run import Connection, Hole, RaceRun, logged
from .udt import UdtEndpoint

__all__ = ["Connection", "Connector", "PathRaceError"]

log = logging.getLogger("wavesync.connector")

#: Worker threads per Connector: a LAN search, a connect request and the attempts of a few
#: connects at once (``wavesync client --listen`` connects once per local connection).
_WORKERS = 32


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
        self._open_holes: list[Hole] = []
        self._holes: dict[uuid.UUID, Hole] = {}
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
        return RaceRun(self, race, hole).run()

    def _hole_for(self, server_id: uuid.UUID | None) -> Hole | None:
        if server_id is not None:
            return self._holes.get(server_id)
        # A system target: any server of it that we reach already will do.
        return next(iter(self._holes.values()), None)

    def _submit(self, work: Callable[[], None]) -> None:
        assert self._pool is not None
        self._pool.submit(logged, work)

    def _open_hole(self) -> Hole:
        """A new punching socket, kept open until released (and then while in use)."""
        hole = Hole(endpoint=UdtEndpoint.bind((self._udp_host, 0), config=self._udt_config))
        with self._condition:
            if not self._closing:
                self._open_holes.append(hole)
                return hole
        hole.endpoint.close()
        raise ConnectionAbortedError("the Connector is closed")

    def _release(self, hole: Hole) -> None:
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

    def _forget(self, hole: Hole) -> None:
        """Take ``hole`` off the open and the reusable ones (the caller closes it)."""
        self._open_holes.remove(hole)
        if hole.server_id is not None and self._holes.get(hole.server_id) is hole:
            del self._holes[hole.server_id]

    def _report_result(self, hole: Hole, transaction: ClientTransaction) -> None:
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
            expired: list[Hole] = []
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
