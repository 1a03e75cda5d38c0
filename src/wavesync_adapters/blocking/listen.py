"""A server agent's registration with the mediator on blocking sockets, driven by ``ListenSession``.

The twin of ``anyio/listen.py``: this module opens the TCP connection when the session
asks, moves bytes and ``time.monotonic()``, and hands the session's events to the
application through a bounded queue. Back-off, keep-alives, authentication and what
counts as a dead session are ``ListenSession``'s decisions. One thread (``run``) drives
the session; ``acknowledge`` may be called from any other thread (a lock guards the
session, which is not thread-safe).
"""

from __future__ import annotations

import logging
import queue
import random
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Sequence
from types import TracebackType
from typing import Self

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
#: The longest any wait in this adapter lasts before it looks at its stop flag: the
#: bound on how long ``close()`` takes to be noticed.
STOP_POLL = 0.2
#: How long joining a stopped thread may take before it is reported as stuck.
JOIN_TIMEOUT = 5.0

ListenerEvent = ConnectionRequestReceived | ClientUdpEndpointLearned


class MediatorListener:
    """Keeps one server registered with a mediator and yields the clients that ask for it.

    ``with listener:`` (or ``start()`` ... ``close()``) runs ``run`` in a thread; take
    connection requests with ``next_request(timeout)``; answer each with
    ``acknowledge()`` from the UDP socket the server will punch from.
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
        """The anyio listener's arguments. ``tunnel``: reach the mediator through an
        HTTP tunnel of that kind, or the one the probe picks (``"auto"``), at its HTTP
        face ``http`` (``host:port`` or a URL; default: ``mediator``), through
        ``proxy`` when given; None: plain TCP. ``connect_timeout`` bounds a TCP
        connect or a tunnel's opening (a probe: three times that), and each send."""
        self.dialer = dialer_for(
            mediator,
            tunnel=tunnel,
            target=http,
            proxy=proxy,
            ssl_context=ssl_context,
            memory=tunnel_memory,
        )
        if connect_timeout <= 0:
            raise LocalProtocolError("connect_timeout must be positive")
        self.mediator = mediator
        self.server_id = server_id
        self._connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self.session = ListenSession(
            system_id=system_id,
            server_id=server_id,
            system_key=system_key,
            local_endpoints=local_endpoints,
            forwarded_endpoints=forwarded_endpoints,
            now=time.monotonic(),
            rng=rng or random.Random(),  # noqa: S311 - jitter, not a secret
        )
        self._events: queue.Queue[ListenerEvent] = queue.Queue(_REQUEST_QUEUE)
        self._outcome = threading.Condition()
        self._ended = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: The last registration, while it holds; None before the first and after a loss.
        self.registration: Registered | None = None
        #: The mediator's last refusal, cleared by the next successful registration.
        self.refusal: RegistrationRefused | None = None
        #: Requests dropped because the application did not take them in time.
        self.dropped_requests = 0

    # --- the application's side -----------------------------------------------------------

    def wait_registered(self, timeout: float | None = None) -> Registered:
        """Wait until the mediator holds this server as online.

        Raises ``RegistrationError`` if the mediator refuses first (the session keeps
        retrying with back-off, but a refused key rarely fixes itself), ``TimeoutError``
        after ``timeout`` seconds, ``EOFError`` once ``run`` has ended.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._outcome:
            while True:
                if self.registration is not None:
                    return self.registration
                if self.refusal is not None:
                    raise RegistrationError(self.refusal.code, self.refusal.reason)
                if self._ended.is_set():
                    raise EOFError("the listener has stopped")
                wait = STOP_POLL if deadline is None else deadline - time.monotonic()
                if wait <= 0:
                    raise TimeoutError("not registered with the mediator in time")
                self._outcome.wait(min(wait, STOP_POLL))

    def next_request(self, timeout: float | None = None) -> ListenerEvent:
        """The next client that asked for this server, or a late UDP address for one.

        Raises ``TimeoutError`` after ``timeout`` seconds, ``EOFError`` once ``run`` has
        ended and every request was taken.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            ended = self._ended.is_set()
            wait = STOP_POLL if deadline is None else min(STOP_POLL, deadline - time.monotonic())
            try:
                return self._events.get(timeout=max(0.0, wait))
            except queue.Empty:
                if ended:
                    raise EOFError("the listener has stopped") from None
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError("no connection request in time") from None

    def acknowledge(self, connect_session_id: bytes, udp: DatagramPort) -> Endpoint | None:
        """Send the signed connection_ack from ``udp``; the server's punched endpoint, or None.

        ``udp`` is the socket the server punches from: the mediator reports the address
        it saw the ack come from to the client. Datagrams from anyone but the mediator
        that arrive meanwhile are dropped, so call this before the socket carries
        anything else. Returns None if the mediator did not answer within the RFC 8489
        schedule or refused the ack (logged). Safe to call from any thread.
        """
        mediator = resolve(self.mediator)
        with self._lock:
            transaction = self.session.connection_ack(connect_session_id, time.monotonic())
        event = run_transaction(transaction, udp, mediator)
        if isinstance(event, TransactionTimedOut):
            log.warning("connection_ack %s: no answer from the mediator", _sid(connect_session_id))
            return None
        with self._lock:
            answer = self.session.ack_response(event.message)
        if answer is None:
            log.warning(
                "connection_ack %s refused: %s",
                _sid(connect_session_id),
                event.message.error_code or "unsigned or malformed answer",
            )
            return None
        return answer.server_udp_endpoint

    # --- running ---------------------------------------------------------------------------

    def start(self) -> None:
        """Run ``run`` in a thread of its own until ``close()``."""
        if self._thread is not None:
            raise LocalProtocolError("the listener runs already")
        self._thread = threading.Thread(
            target=self.run, name=f"wavesync-listen-{self.server_id}", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Stop ``run`` (within ``STOP_POLL`` plus a send's timeout) and join its thread."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(JOIN_TIMEOUT)
            if self._thread.is_alive():
                log.warning("the mediator listener did not stop in %.0f s", JOIN_TIMEOUT)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def run(self) -> None:
        """Stay registered until ``close()``: connect, re-connect after losses, forward events."""
        try:
            self._stay_registered()
        finally:
            # Readers of next_request() see the end instead of waiting forever.
            self._ended.set()
            with self._outcome:
                self._outcome.notify_all()

    # --- the session's driver -------------------------------------------------------------

    def _stay_registered(self) -> None:
        session = self.session
        while not self._stop.is_set():
            with self._lock:
                connect = session.should_connect(time.monotonic())
                timer = session.get_timer()
            if not connect:
                pause = STOP_POLL if timer is None else timer - time.monotonic()
                self._stop.wait(max(0.0, min(pause, STOP_POLL)))
                with self._lock:
                    session.handle_timer(time.monotonic())
                continue
            try:
                sock = self.dialer.open(self._connect_timeout)
            except OSError as exc:
                log.info("mediator %s unreachable: %s", self.dialer.describe(), exc)
                with self._lock:
                    session.connection_lost(time.monotonic())
            else:
                with sock:
                    self._drive_connection(sock)
            self._dispatch_events()

    def _drive_connection(self, sock: socket.socket) -> None:
        session = self.session
        with self._lock:
            session.connection_made(time.monotonic())
        try:
            while not self._stop.is_set():
                with self._lock:
                    if session.should_close():
                        break
                    outgoing = session.data_to_send()
                    timer = session.get_timer()
                if outgoing:
                    sock.settimeout(self._connect_timeout)
                    sock.sendall(outgoing)
                self._dispatch_events()
                pause = STOP_POLL if timer is None else timer - time.monotonic()
                sock.settimeout(max(0.001, min(pause, STOP_POLL)))
                try:
                    data = sock.recv(_RECEIVE_BYTES)
                except TimeoutError:
                    data = None
                with self._lock:
                    if data == b"":
                        break
                    if data is not None:
                        session.data_received(data, time.monotonic())
                    session.handle_timer(time.monotonic())
        except OSError as exc:
            log.info("mediator session broke: %s", exc)
        with self._lock:
            session.connection_lost(time.monotonic())

    def _dispatch_events(self) -> None:
        while True:
            with self._lock:
                event = self.session.next_event()
            if event is None:
                return
            if isinstance(event, Registered):
                log.info(
                    "registered with mediator %s as %s (public %s)",
                    format_endpoint(self.mediator),
                    self.server_id,
                    format_endpoint(event.public_endpoint),
                )
                with self._outcome:
                    self.registration, self.refusal = event, None
                    self._outcome.notify_all()
            elif isinstance(event, RegistrationRefused):
                log.warning("mediator refused registration: %d %s", event.code, event.reason)
                with self._outcome:
                    self.refusal = event
                    self._outcome.notify_all()
            elif isinstance(event, SessionLost):
                log.info(
                    "mediator session lost (%s); retry in %.1f s",
                    event.reason,
                    max(0.0, event.retry_at - time.monotonic()),
                )
                self.registration = None
            elif isinstance(event, ConnectionRequestReceived | ClientUdpEndpointLearned):
                try:
                    self._events.put_nowait(event)
                except queue.Full:
                    self.dropped_requests += 1
                    log.warning("dropping a connection request: the application is not reading")


def _sid(connect_session_id: bytes) -> str:
    return connect_session_id.hex()[:12]
