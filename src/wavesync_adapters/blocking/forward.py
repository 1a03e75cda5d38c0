"""Port forwarding over wavesync sockets: what ``wavesync server`` and ``client`` run.

The twin of ``anyio/forward.py``. The server side pipes each accepted socket to a local
TCP service; the client side listens on a local TCP port and carries each connection to
the server over a ``Connector``. Both copy bytes with ``copy_both_ways``: one direction
on the calling thread, the other on a second, joined before it returns.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
from collections.abc import Callable
from typing import Protocol

from wavesync_proto.addresses import Endpoint, format_endpoint
from wavesync_proto.race import PathKind

from .connector import Connector, PathRaceError

__all__ = [
    "AcceptedSocket",
    "LocalPortStop",
    "copy_both_ways",
    "forward_to_service",
    "serve_local_port",
]

log = logging.getLogger("wavesync.forward")

_CHUNK = 65536
#: How long a dial of the local service may take.
_SERVICE_CONNECT_SECONDS = 10.0
#: Local connections carried at once; more are refused (closed) with a warning.
_MAX_CARRIED = 256


class AcceptedSocket(Protocol):
    """What forwarding needs of an accepted stream (the blocking agent's AcceptedStream)."""

    @property
    def sock(self) -> socket.socket: ...

    @property
    def path(self) -> PathKind: ...


def copy_both_ways(first: socket.socket, second: socket.socket) -> int:
    """Copy between two connected sockets until both directions end; return the bytes copied.

    An end is passed on as a half-close (``shutdown(SHUT_WR)``); on a UDT socket that
    closes the UDT connection gracefully (UDT4 has no half-close: what was sent is still
    delivered), as a service that closes after its answer expects. A failure on either
    side shuts both down, which ends the other direction too. Waits for data without a
    timeout (an idle session is a live one): ``shutdown`` either socket to end it early.
    """
    copied = [0, 0]

    def one_way(source: socket.socket, sink: socket.socket, slot: int) -> None:
        try:
            while True:
                data = source.recv(_CHUNK)
                if not data:
                    with contextlib.suppress(OSError):
                        sink.shutdown(socket.SHUT_WR)
                    return
                sink.sendall(data)
                copied[slot] += len(data)
        except OSError:
            # One side broke: the session is over, and the other direction must hear it.
            for sock in (first, second):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    for sock in (first, second):
        sock.settimeout(None)
    back = threading.Thread(
        target=one_way, args=(second, first, 1), name="wavesync-copy", daemon=False
    )
    back.start()
    try:
        one_way(first, second, 0)
    finally:
        back.join()
    return copied[0] + copied[1]


def forward_to_service(accepted: AcceptedSocket, service: Endpoint) -> None:
    """Pipe a verified socket to the local TCP ``service`` (``wavesync server --forward``)."""
    try:
        local = socket.create_connection(service, timeout=_SERVICE_CONNECT_SECONDS)
    except OSError as exc:
        log.warning("forward to %s failed: %s", format_endpoint(service), exc)
        return
    with local:
        copied = copy_both_ways(accepted.sock, local)
    log.info(
        "%s stream forwarded to %s ended: %d bytes",
        accepted.path.value,
        format_endpoint(service),
        copied,
    )


class LocalPortStop:
    """Ends a ``serve_local_port`` from any thread: ``stop()`` wakes its accept loop,
    which closes the listener, shuts down every carried connection and joins them."""

    def __init__(self) -> None:
        self._wake_out, self._wake_in = socket.socketpair()
        self._wake_out.setblocking(False)
        self._stopped = threading.Event()

    def stop(self) -> None:
        if not self._stopped.is_set():
            self._stopped.set()
            with contextlib.suppress(OSError):
                self._wake_in.send(b"\0")

    def is_stopped(self) -> bool:
        return self._stopped.is_set()

    def fileno(self) -> int:
        return self._wake_out.fileno()

    def close(self) -> None:
        self._wake_out.close()
        self._wake_in.close()


def serve_local_port(
    connector: Connector,
    listen: Endpoint,
    *,
    started: Callable[[Endpoint], None] | None = None,
    stop: LocalPortStop,
) -> None:
    """Accept local TCP connections on ``listen`` and carry each to the server
    (``wavesync client --listen``) until ``stop.stop()``; ``started`` gets the bound
    address. Each connection has a thread of its own (at most 256 at once)."""
    carried = _Carried(connector, stop)
    with socket.create_server(listen) as listener, selectors.DefaultSelector() as selector:
        listener.setblocking(False)
        selector.register(listener, selectors.EVENT_READ, "accept")
        selector.register(stop, selectors.EVENT_READ, "stop")
        bound = listener.getsockname()
        if started is not None:
            started((str(bound[0]), int(bound[1])))
        try:
            while not stop.is_stopped():
                for key, _ in selector.select():
                    if key.data != "accept":
                        continue
                    try:
                        local, _ = listener.accept()
                    except (BlockingIOError, InterruptedError):
                        continue
                    carried.start(local)
        finally:
            carried.end_all()


class _Carried:
    """The local connections being carried, one thread each, and how to end them all."""

    def __init__(self, connector: Connector, stop: LocalPortStop) -> None:
        self.connector = connector
        self.stop = stop
        self.guard = threading.Lock()
        self.sockets: dict[threading.Thread, list[socket.socket]] = {}

    def start(self, local: socket.socket) -> None:
        local.setblocking(True)
        with self.guard:
            full = len(self.sockets) >= _MAX_CARRIED
        if full:
            log.warning("%d local connections carried: refusing one", _MAX_CARRIED)
            local.close()
            return
        sockets = [local]
        worker = threading.Thread(
            target=self._carry, args=(local, sockets), name="wavesync-carry", daemon=False
        )
        with self.guard:
            self.sockets[worker] = sockets
        worker.start()

    def end_all(self) -> None:
        """Shut every carried socket down (their copies end at once) and join the threads;
        one still connecting ends within the connector's deadline."""
        with self.guard:
            workers = list(self.sockets.items())
        for _, sockets in workers:
            for sock in sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        for worker, _ in workers:
            worker.join()

    def _carry(self, local: socket.socket, sockets: list[socket.socket]) -> None:
        try:
            with local:
                try:
                    connection = self.connector.connect()
                except PathRaceError as exc:
                    log.warning("a local connection could not reach the server: %s", exc)
                    return
                with self.guard:
                    sockets.append(connection.sock)
                    stopping = self.stop.is_stopped()
                with connection.sock:
                    copied = 0 if stopping else copy_both_ways(local, connection.sock)
                log.info("connection by %s ended: %d bytes", connection.target, copied)
        finally:
            with self.guard:
                self.sockets.pop(threading.current_thread(), None)
