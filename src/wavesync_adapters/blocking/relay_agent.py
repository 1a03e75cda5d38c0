"""The server agent's relay side on blocking sockets: keep standby connections open,
hand over each tunnel as the connected socket itself.

The twin of ``anyio/relay_agent.py``: ``StandbyPool`` decides how many connections to
keep and when to back off, ``StandbyConnection`` speaks each one; this module opens
TCP connections when the pool says so (one thread per standby connection, which
becomes the tunnel's handler thread), moves bytes and time, and reports what happened.

The relay writes nothing of the client's before our READY (it splices only then), so
the socket is handed over with no byte of the tunnel read; should a relay send some
anyway (``TunnelOpened.first_bytes``), the tunnel is refused rather than handed over
with bytes missing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from types import TracebackType
from typing import Self

from wavesync_proto.addresses import Endpoint, format_endpoint
from wavesync_proto.errors import LocalProtocolError
from wavesync_proto.relay.standby import (
    StandbyAccepted,
    StandbyConnection,
    StandbyEnded,
    StandbyEvent,
    StandbyRefused,
    TunnelOpened,
)
from wavesync_proto.relay.standby_pool import StandbyPool
from wavesync_proto.tunnel import ProxyConfig, TunnelMemory

from .._common import RelayTunnelInfo
from ._dial import TunnelChoice, dialer_for
from .listen import JOIN_TIMEOUT, STOP_POLL

__all__ = ["RelayAgent", "RelayTunnelInfo", "TunnelHandler"]

log = logging.getLogger("wavesync.relay.agent")

_RECEIVE_BYTES = 65536


#: Runs in the tunnel's own thread; the socket is closed when it returns.
TunnelHandler = Callable[[socket.socket, RelayTunnelInfo], None]


class RelayAgent:
    """Keeps ``target`` standby connections to one relay and serves each tunnel."""

    def __init__(
        self,
        relay: Endpoint,
        *,
        system_id: uuid.UUID,
        server_id: uuid.UUID,
        key: str,
        relay_host: str | None = None,
        target: int = 7,
        handshake_timeout: float = 10.0,
        tunnel: TunnelChoice | None = None,
        proxy: ProxyConfig | None = None,
        tunnel_target: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        tunnel_memory: TunnelMemory | None = None,
    ) -> None:
        """The anyio agent's arguments. ``tunnel``: each standby connection rides an
        HTTP tunnel of that kind, or the one the probe picks (``"auto"``), to the
        relay's own port (or ``tunnel_target``), through ``proxy`` when given; None:
        plain TCP. ``handshake_timeout`` also bounds a TCP connect or a tunnel's
        opening, and each send. A tunnelled standby is handed over as the tunnel's
        socket (one end of a pair its thread pumps)."""
        self.dialer = dialer_for(
            relay,
            tunnel=tunnel,
            target=tunnel_target,
            proxy=proxy,
            ssl_context=ssl_context,
            memory=tunnel_memory,
        )
        self.relay = relay
        self._relay_host = relay_host or format_endpoint(relay)
        self._system_id, self._server_id, self._key = system_id, server_id, key
        self._handshake_timeout = handshake_timeout
        # Jitter only spreads reconnects over time; it protects nothing.
        self.pool = StandbyPool(random=random.SystemRandom().random, target=target)
        # Guards the pool (not thread-safe) and wakes whoever waits for a change.
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._handler: TunnelHandler | None = None
        self._thread: threading.Thread | None = None
        self._workers: set[threading.Thread] = set()
        self._tunnels: set[socket.socket] = set()

    # --- running ---------------------------------------------------------------------------

    def start(self, handler: TunnelHandler) -> None:
        """Keep the pool full and run ``handler`` on each tunnel, in threads, until ``close()``."""
        if self._thread is not None:
            raise LocalProtocolError("the relay agent runs already")
        self._handler = handler
        self._thread = threading.Thread(
            target=self._serve, name=f"wavesync-relay-pool-{format_endpoint(self.relay)}"
        )
        self._thread.daemon = True
        self._thread.start()

    def close(self) -> None:
        """Stop: standby connections close within ``STOP_POLL``; tunnels still being
        handled are shut down (their handlers see EOF) and their threads joined."""
        self._stop.set()
        with self._changed:
            self.pool.stop()
            self._changed.notify_all()
            tunnels = list(self._tunnels)
        for sock in tunnels:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + JOIN_TIMEOUT
        for thread in [self._thread, *list(self._workers)]:
            if thread is not None and thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
                if thread.is_alive():
                    log.warning("%s did not stop in %.0f s", thread.name, JOIN_TIMEOUT)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def wait_for_idle(self, count: int, timeout: float) -> None:
        """Return once at least ``count`` standby connections are idle; ``TimeoutError``
        after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self.pool.idle < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"fewer than {count} idle standby connections in time")
                self._changed.wait(remaining)

    def _serve(self) -> None:
        while not self._stop.is_set():
            with self._changed:
                attempts = self.pool.poll(time.monotonic())
                timer = self.pool.get_timer()
                for attempt in attempts:
                    worker = threading.Thread(
                        target=self._standby,
                        args=(attempt.attempt_id,),
                        name=f"wavesync-standby-{attempt.attempt_id}",
                    )
                    self._workers.add(worker)
                    worker.start()
                if attempts:
                    continue
                pause = STOP_POLL if timer is None else timer - time.monotonic()
                self._changed.wait(max(0.0, min(pause, STOP_POLL)))
            self._workers = {t for t in self._workers if t.is_alive()}

    def _wake(self) -> None:
        # Every report to the pool is followed by this: the serve loop may have new
        # connections to open, and wait_for_idle a count to check.
        with self._changed:
            self._changed.notify_all()

    def _report(self, report: Callable[[float], object]) -> None:
        with self._changed:
            report(time.monotonic())
            self._changed.notify_all()

    # --- one standby connection ------------------------------------------------------------

    def _standby(self, attempt_id: int) -> None:
        pool = self.pool
        try:
            sock = self.dialer.open(self._handshake_timeout)
        except OSError as exc:
            log.info("relay %s unreachable: %s", self.dialer.describe(), exc)
            self._report(lambda now: pool.attempt_failed(attempt_id, now))
            return
        handed_over = False
        try:
            handed_over = self._speak(attempt_id, sock)
        finally:
            if not handed_over:
                sock.close()
            self._wake()

    def _speak(self, attempt_id: int, sock: socket.socket) -> bool:
        """Run one standby connection; True once it became a tunnel given to the handler."""
        pool = self.pool
        machine = StandbyConnection(
            key=self._key,
            system_id=self._system_id,
            server_id=self._server_id,
            relay_host=self._relay_host,
            unix_time=time.time(),
            nonce=os.urandom(16),
            now=time.monotonic(),
            handshake_timeout=self._handshake_timeout,
        )
        accepted = False
        sock.settimeout(self._handshake_timeout)
        try:
            sock.sendall(machine.data_to_send())
        except OSError as exc:
            log.info("relay %s broke the standby request: %s", format_endpoint(self.relay), exc)
            self._report(lambda now: pool.attempt_failed(attempt_id, now))
            return False
        while True:
            if self._stop.is_set():
                return False  # the pool was stopped: its news is moot
            events = _read_events(machine, sock)
            now = time.monotonic()
            for event in events:
                if isinstance(event, StandbyAccepted):
                    accepted = True
                    with self._changed:
                        pool.attempt_accepted(attempt_id, now, standby_count=event.standby_count)
                    log.debug("standby %d accepted (idle: %d)", attempt_id, pool.idle)
                elif isinstance(event, StandbyRefused):
                    log.warning("relay refused standby: %d %s", event.status, event.reason)
                    with self._changed:
                        pool.attempt_failed(
                            attempt_id, now, status=event.status, retry_after=event.retry_after
                        )
                    return False
                elif isinstance(event, StandbyEnded):
                    log.info("standby %d ended: %s", attempt_id, event.reason)
                    with self._changed:
                        if accepted:
                            pool.standby_lost(attempt_id, now)
                        else:
                            pool.attempt_failed(attempt_id, now)
                    return False
                else:
                    self._open_tunnel(attempt_id, sock, machine, event)
                    return True
            self._wake()

    def _open_tunnel(
        self,
        attempt_id: int,
        sock: socket.socket,
        machine: StandbyConnection,
        opened: TunnelOpened,
    ) -> None:
        """Answer READY and run the handler on the socket, in this thread."""
        with self._changed:
            self.pool.standby_taken(attempt_id, time.monotonic())
            self._tunnels.add(sock)
            self._changed.notify_all()  # a replacement is due at once
        try:
            sock.settimeout(self._handshake_timeout)
            try:
                sock.sendall(machine.data_to_send())  # READY
            except OSError as exc:
                log.info("tunnel %s broke before READY: %s", opened.session_id.hex(), exc)
                return
            sock.settimeout(None)  # the handler gets a plain blocking socket
            info = RelayTunnelInfo(
                session_id=opened.session_id, client_address=opened.client_address
            )
            log.debug(
                "tunnel %s from %s", opened.session_id.hex(), format_endpoint(opened.client_address)
            )
            if opened.first_bytes:
                log.warning(
                    "tunnel %s: the relay sent %d bytes before READY; refused",
                    opened.session_id.hex(),
                    len(opened.first_bytes),
                )
                return
            assert self._handler is not None
            self._handler(sock, info)
        except Exception:
            # One tunnel's failure is the application's bug or its peer's doing; the
            # agent and its other tunnels carry on.
            log.exception("tunnel %s handler failed", opened.session_id.hex())
        finally:
            sock.close()
            with self._changed:
                self._tunnels.discard(sock)
                self.pool.tunnel_closed(attempt_id)
                self._changed.notify_all()


def _read_events(machine: StandbyConnection, sock: socket.socket) -> list[StandbyEvent]:
    """Wait for the relay's bytes (at most until the machine's deadline or ``STOP_POLL``),
    feed them, and move time."""
    deadline = machine.get_timer()
    pause = STOP_POLL if deadline is None else deadline - time.monotonic()
    sock.settimeout(max(0.001, min(pause, STOP_POLL)))
    events: list[StandbyEvent] = []
    try:
        data = sock.recv(_RECEIVE_BYTES)
    except TimeoutError:
        pass
    except OSError:
        events = machine.connection_lost()
    else:
        if data:
            events = machine.data_received(data, time.monotonic())
        else:
            events = machine.connection_lost()
    return events or machine.handle_timer(time.monotonic())
