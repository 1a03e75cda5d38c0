"""A server agent's registration with the mediator on asyncio, driven by ``ListenSession``.

The twin of ``wavesync_adapters.anyio.listen``: this module opens the TCP connection
when the session asks, moves bytes and the loop's clock, and hands the session's
events to the application. Back-off, keep-alives, authentication and what counts as a
dead session are ``ListenSession``'s decisions. The session may ride an HTTP tunnel to
the mediator's HTTP face (``tunnel=``), opened by the ``Dialer``. Imports nothing of
anyio.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import uuid
from collections import deque
from collections.abc import Sequence

from wavesync_proto.addresses import Endpoint, format_endpoint
from wavesync_proto.errors import LocalProtocolError
from wavesync_proto.mediator.listen import (
    MAX_PENDING_EVENTS,
    ClientUdpEndpointLearned,
    ConnectionRequestReceived,
    ListenSession,
    Registered,
    RegistrationRefused,
    SessionLost,
)
from wavesync_proto.stun.transaction import TransactionTimedOut
from wavesync_proto.tunnel import ProxyConfig, TunnelMemory

from ..errors import RegistrationError
from ._dial import TunnelChoice, dialer_for
from ._net import DatagramPort, resolve, run_transaction

__all__ = ["ListenerEvent", "MediatorListener", "RegistrationError"]

log = logging.getLogger("wavesync.listen")

_RECEIVE_BYTES = 65536
# Connection requests the application has not taken yet; ListenSession bounds its own
# queue the same way, so a stalled application costs bounded memory on both sides.
_REQUEST_QUEUE = MAX_PENDING_EVENTS

ListenerEvent = ConnectionRequestReceived | ClientUdpEndpointLearned


async def _wait_until_or(wake: asyncio.Event, deadline: float | None) -> None:
    """Return at ``deadline`` (on the loop's clock; None: never) or when ``wake`` is set."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout_at(deadline):
            await wake.wait()


class MediatorListener:
    """Keeps one server registered with a mediator and yields the clients that ask for it.

    Run ``run()`` in a task (``started``, a future, is resolved once the first TCP
    connection attempt is about to begin); take connection requests with
    ``next_request()``; answer each with ``acknowledge()`` from the UDP socket the
    server will punch from (a ``UdtEndpoint.datagram_port()``).
    """

    def __init__(
        self,
        mediator: Endpoint,
        *,
        system_id: uuid.UUID,
        server_id: uuid.UUID,
        system_key: str,
        local_endpoints: Sequence[Endpoint] = (),
        forwarded_endpoints: Sequence[Endpoint] = (),
        connect_timeout: float = 5.0,
        rng: random.Random | None = None,
        tunnel: TunnelChoice | None = None,
        http: str | None = None,
        proxy: ProxyConfig | None = None,
        ssl_context: ssl.SSLContext | None = None,
        tunnel_memory: TunnelMemory | None = None,
    ) -> None:
        """``tunnel``: reach the mediator through an HTTP tunnel of that kind, or the
        one the probe picks (``"auto"``), at its HTTP face ``http`` (``host:port`` or
        a URL; default: ``mediator``), through ``proxy`` when given; None: plain TCP.
        ``connect_timeout`` bounds a TCP connect or a tunnel's opening (a probe:
        three times that). ``acknowledge`` always goes over UDP."""
        if connect_timeout <= 0:
            raise LocalProtocolError("connect_timeout must be positive")
        self.mediator = mediator
        self.server_id = server_id
        self.dialer = dialer_for(
            mediator,
            tunnel=tunnel,
            target=http,
            proxy=proxy,
            ssl_context=ssl_context,
            memory=tunnel_memory,
        )
        self._connect_timeout = connect_timeout
        self._loop = asyncio.get_running_loop()
        self.session = ListenSession(
            system_id=system_id,
            server_id=server_id,
            system_key=system_key,
            local_endpoints=local_endpoints,
            forwarded_endpoints=forwarded_endpoints,
            now=self._loop.time(),
            rng=rng or random.Random(),  # noqa: S311 - jitter, not a secret
        )
        self._events: deque[ListenerEvent] = deque()
        self._events_ready = asyncio.Event()
        self._ended = False
        self._outcome_changed = asyncio.Event()
        #: The last registration, while it holds; None before the first and after a loss.
        self.registration: Registered | None = None
        #: The mediator's last refusal, cleared by the next successful registration.
        self.refusal: RegistrationRefused | None = None
        #: Requests dropped because the application did not take them in time.
        self.dropped_requests = 0

    # --- the application's side -----------------------------------------------------------

    async def wait_registered(self) -> Registered:
        """Wait until the mediator holds this server as online (bound it with a timeout).

        Raises ``RegistrationError`` if the mediator refuses first: the session keeps
        retrying with back-off, but a refused key rarely fixes itself.
        """
        while True:
            if self.registration is not None:
                return self.registration
            if self.refusal is not None:
                raise RegistrationError(self.refusal.code, self.refusal.reason)
            await self._outcome_changed.wait()

    async def next_request(self) -> ListenerEvent:
        """The next client that asked for this server, or a late UDP address for one.

        Raises ``EOFError`` once ``run()`` has ended (anyio's twin: ``anyio.EndOfStream``).
        """
        while not self._events:
            if self._ended:
                raise EOFError("the mediator listener has stopped")
            self._events_ready.clear()
            await self._events_ready.wait()
        return self._events.popleft()

    async def acknowledge(self, connect_session_id: bytes, udp: DatagramPort) -> Endpoint | None:
        """Send the signed connection_ack from ``udp``; the server's punched endpoint, or None.

        ``udp`` is the socket the server punches from: the mediator reports the
        address it saw the ack come from to the client. Datagrams from anyone but
        the mediator that arrive meanwhile are dropped, so call this before the
        socket carries anything else. Returns None if the mediator did not answer
        within the RFC 8489 schedule or refused the ack (logged).
        """
        mediator = await resolve(self.mediator)
        transaction = self.session.connection_ack(connect_session_id, self._loop.time())
        event = await run_transaction(transaction, udp, mediator)
        if isinstance(event, TransactionTimedOut):
            log.warning("connection_ack %s: no answer from the mediator", _sid(connect_session_id))
            return None
        answer = self.session.ack_response(event.message)
        if answer is None:
            log.warning(
                "connection_ack %s refused: %s",
                _sid(connect_session_id),
                event.message.error_code or "unsigned or malformed answer",
            )
            return None
        return answer.server_udp_endpoint

    # --- the session's driver -------------------------------------------------------------

    async def run(self, *, started: asyncio.Future[None] | None = None) -> None:
        """Stay registered until cancelled: connect, re-connect after losses, forward events."""
        if started is not None and not started.done():
            started.set_result(None)
        try:
            await self._stay_registered()
        finally:
            # Readers of next_request() see the end instead of waiting forever.
            self._ended = True
            self._events_ready.set()

    async def _stay_registered(self) -> None:
        session = self.session
        loop = self._loop
        wake = asyncio.Event()  # never set: between connections only the timer matters
        while True:
            if not session.should_connect(loop.time()):
                await _wait_until_or(wake, session.get_timer())
                session.handle_timer(loop.time())
                continue
            try:
                reader, writer = await self.dialer.open(self._connect_timeout)
            except (OSError, TimeoutError) as exc:
                log.info("mediator %s unreachable: %s", self.dialer.describe(), exc)
                session.connection_lost(loop.time())
            else:
                await self._drive_connection(reader, writer)
            self._dispatch_events()

    async def _drive_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        session = self.session
        loop = self._loop
        wake = asyncio.Event()
        ended = False

        async def read() -> None:
            nonlocal ended
            try:
                while data := await reader.read(_RECEIVE_BYTES):
                    session.data_received(data, loop.time())
                    wake.set()
            except OSError:
                pass
            ended = True
            wake.set()

        session.connection_made(loop.time())
        reading = asyncio.create_task(read())
        try:
            while not ended and not session.should_close():
                outgoing = session.data_to_send()
                if outgoing:
                    writer.write(outgoing)
                    await writer.drain()
                self._dispatch_events()
                await _wait_until_or(wake, session.get_timer())
                wake.clear()
                session.handle_timer(loop.time())
        except OSError as exc:
            log.info("mediator session broke: %s", exc)
        finally:
            reading.cancel()
            writer.close()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await reading
        session.connection_lost(loop.time())

    def _dispatch_events(self) -> None:
        while (event := self.session.next_event()) is not None:
            if isinstance(event, Registered):
                log.info(
                    "registered with mediator %s as %s (public %s)",
                    format_endpoint(self.mediator),
                    self.server_id,
                    format_endpoint(event.public_endpoint),
                )
                self.registration, self.refusal = event, None
                self._signal_outcome()
            elif isinstance(event, RegistrationRefused):
                log.warning("mediator refused registration: %d %s", event.code, event.reason)
                self.refusal = event
                self._signal_outcome()
            elif isinstance(event, SessionLost):
                log.info(
                    "mediator session lost (%s); retry in %.1f s",
                    event.reason,
                    max(0.0, event.retry_at - self._loop.time()),
                )
                self.registration = None
            elif isinstance(event, ConnectionRequestReceived | ClientUdpEndpointLearned):
                if len(self._events) >= _REQUEST_QUEUE:
                    self.dropped_requests += 1
                    log.warning("dropping a connection request: the application is not reading")
                    continue
                self._events.append(event)
                self._events_ready.set()

    def _signal_outcome(self) -> None:
        self._outcome_changed.set()
        self._outcome_changed = asyncio.Event()


def _sid(connect_session_id: bytes) -> str:
    return connect_session_id.hex()[:12]
