"""``wavesync demo --adapter blocking``: the anyio demo's twin on plain sockets and threads.

The same parts on loopback (a relay and a mediator each serving in a thread of
its own, a tiny HTTP service, a server agent forwarding to it in its background
threads), the same rows (each path alone, a second UDT connection through the
same hole, then ``auto``) and the same table: ``wavesync_adapters._demo`` holds
all three. Never imports asyncio, anyio or trio.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator

from wavesync_proto.addresses import Endpoint
from wavesync_proto.race import ALL_PATHS, PathKind

from .._demo import (
    AUTO,
    FETCH_SECONDS,
    HEAD_LIMIT,
    HEAD_SECONDS,
    LOOPBACK,
    PAGE_BYTES,
    READY_SECONDS,
    REUSED_UDP,
    SINGLE_PATHS,
    DemoRow,
    DemoSystem,
    failed_row,
    fetched_row,
    header_line,
    intro_line,
    page_request,
    received_head,
    relay_url,
    response_head,
)
from .agent import AcceptedStream, ServerAgent
from .connector import Connector, PathRaceError
from .forward import forward_to_service
from .listen import JOIN_TIMEOUT, STOP_POLL
from .mediator import MediatorDaemon
from .relay import RelayDaemon

__all__ = ["DemoRow", "run_demo"]

log = logging.getLogger("wavesync.demo")

_CHUNK = 65536
#: Seconds a daemon thread may take to bind and call ``started``.
_BIND_SECONDS = 10.0


def run_demo(
    *, page_bytes: int = PAGE_BYTES, announce: Callable[[str], None] = print
) -> list[DemoRow]:
    """Run the demo; ``announce`` gets the table line by line. Returns its rows."""
    system = DemoSystem.new()
    rows: list[DemoRow] = []
    with contextlib.ExitStack() as stack:
        relay = relay_url(stack.enter_context(_serving(RelayDaemon(system.relay_service()))))
        mediator = stack.enter_context(_serving(MediatorDaemon(system.mediator_service(relay))))
        page = stack.enter_context(_page_service(page_bytes))
        agent = ServerAgent(**system.agent_options(mediator, relay))

        def forward(accepted: AcceptedStream) -> None:
            forward_to_service(accepted, page)

        stack.enter_context(agent.running(forward))
        agent.wait_ready(READY_SECONDS)
        announce(intro_line(mediator, relay, system.server_id, page))
        announce(header_line())

        def connector(paths: frozenset[PathKind]) -> Connector:
            return Connector(**system.connector_options(mediator, relay, paths))

        for kind in SINGLE_PATHS:
            with connector(frozenset({kind})) as client:
                rows.append(_fetch(client, kind.value, page_bytes, announce))
                if kind is PathKind.UDP and rows[-1].connected:
                    # A second connection through the hole the first one punched.
                    rows.append(_fetch(client, REUSED_UDP, page_bytes, announce))
        with connector(ALL_PATHS) as client:
            rows.append(_fetch(client, AUTO, page_bytes, announce))
    return rows


def _fetch(
    client: Connector, label: str, page_bytes: int, announce: Callable[[str], None]
) -> DemoRow:
    try:
        connection = client.connect()
    except PathRaceError as exc:
        row, line = failed_row(label, exc.reason)
        announce(line)
        return row
    with connection.sock as sock:
        sock.settimeout(FETCH_SECONDS)
        started = time.monotonic()
        sock.sendall(page_request())
        received = 0
        while chunk := sock.recv(_CHUNK):
            received += len(chunk)
        seconds = time.monotonic() - started
    row, line = fetched_row(
        label,
        target=connection.target,
        elapsed=connection.elapsed,
        received=received,
        seconds=seconds,
        page_bytes=page_bytes,
    )
    announce(line)
    return row


@contextlib.contextmanager
def _serving(daemon: MediatorDaemon | RelayDaemon) -> Iterator[Endpoint]:
    """``daemon.serve_forever`` on loopback in a thread for the block; yields where it
    listens. Leaving the block shuts it down and joins the thread."""
    # Where it listens, or why it could not start (an address not bound).
    outcome: queue.Queue[Endpoint | Exception] = queue.Queue(maxsize=1)

    def serve() -> None:
        try:
            daemon.serve_forever(LOOPBACK, 0, started=outcome.put)
        except Exception as exc:  # raised again in the demo's thread below
            outcome.put(exc)

    thread = threading.Thread(target=serve, name=f"wavesync-demo-{type(daemon).__name__}")
    thread.start()
    try:
        try:
            endpoint = outcome.get(timeout=_BIND_SECONDS)
        except queue.Empty:
            raise TimeoutError("a demo daemon did not start") from None
        if isinstance(endpoint, Exception):
            raise endpoint
        yield endpoint
    finally:
        daemon.shutdown()
        thread.join(JOIN_TIMEOUT)


@contextlib.contextmanager
def _page_service(page_bytes: int) -> Iterator[Endpoint]:
    """The service behind the server: answers any request with ``page_bytes`` bytes,
    each connection in a thread of its own; leaving the block joins them all."""
    answer_bytes = response_head(page_bytes) + bytes(page_bytes)
    stop = threading.Event()
    answering: set[threading.Thread] = set()

    def answer(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(HEAD_SECONDS)
            head = b""
            while not received_head(head):
                chunk = conn.recv(HEAD_LIMIT)
                if not chunk:
                    break
                head += chunk
            conn.settimeout(FETCH_SECONDS)
            conn.sendall(answer_bytes)

    def accept(listener: socket.socket) -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue  # a look at the stop flag
            except OSError:
                return
            thread = threading.Thread(target=answer, args=(conn,), name="wavesync-demo-page")
            answering.add(thread)
            thread.start()

    with socket.create_server((LOOPBACK, 0)) as listener:
        listener.settimeout(STOP_POLL)
        accepting = threading.Thread(
            target=accept, args=(listener,), name="wavesync-demo-page-accept"
        )
        accepting.start()
        try:
            bound = listener.getsockname()
            yield (str(bound[0]), int(bound[1]))
        finally:
            stop.set()
            accepting.join(JOIN_TIMEOUT)
            for thread in list(answering):
                thread.join(JOIN_TIMEOUT)
