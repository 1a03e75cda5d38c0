"""``wavesync demo``: every part in one process on loopback, every path tried in turn.

It starts a relay, a mediator that offers it, a tiny HTTP service and a server
agent forwarding to it, then fetches a page through a client ``Connector`` with
each path forced alone (LAN, direct TCP, punched UDT, relay), with a second UDT
connection through the same hole, and with ``auto``. Each row says whether the
path connected, how long connecting took and how fast a short download ran.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import anyio.abc

from wavesync_proto.addresses import Endpoint, format_endpoint
from wavesync_proto.discovery import DEFAULT_GROUP
from wavesync_proto.mediator.service import MediatorService
from wavesync_proto.race import ALL_PATHS, PathKind
from wavesync_proto.relay import RelayService

from .agent import AcceptedStream, ServerAgent
from .connector import Connector, PathRaceError
from .forward import forward_to_service
from .mediator import MediatorDaemon
from .relay import RelayDaemon

__all__ = ["DemoRow", "run_demo"]

log = logging.getLogger("wavesync.demo")

LOOPBACK = "127.0.0.1"
#: Bytes the demo's HTTP service sends per page: enough to show a rate, short enough
#: that the whole demo stays a few seconds.
PAGE_BYTES = 4 * 1024 * 1024
_HEAD_LIMIT = 16384


@dataclass(frozen=True, kw_only=True)
class DemoRow:
    """One line of the demo's table."""

    path: str
    connected: bool
    winner: str = ""
    connect_ms: float = 0.0
    mb_per_s: float = 0.0
    error: str = ""


async def run_demo(
    *, page_bytes: int = PAGE_BYTES, announce: Callable[[str], None] = print
) -> list[DemoRow]:
    """Run the demo; ``announce`` gets the table line by line. Returns its rows."""
    system_id, server_id = uuid.uuid4(), uuid.uuid4()
    key = secrets.token_urlsafe(32)
    systems = {system_id: key}
    # A group port of the demo's own, so two demos (or a real agent) never answer ours.
    lan_group = (DEFAULT_GROUP[0], _free_udp_port())
    rows: list[DemoRow] = []
    async with anyio.create_task_group() as group:
        relay = RelayDaemon(RelayService(systems))
        relay_bound = await group.start(relay.serve, LOOPBACK, 0)
        relay_url = f"http://{format_endpoint(relay_bound)}"
        service = MediatorService(
            systems=systems, relay_urls=(relay_url,), nonce_secret=secrets.token_bytes(32)
        )
        mediator = await group.start(MediatorDaemon(service).serve, LOOPBACK, 0)
        page = await group.start(_serve_page, page_bytes)
        agent = ServerAgent(
            system_id=system_id,
            server_id=server_id,
            key=key,
            mediator=mediator,
            relays=(relay_url,),
            tcp_listen=(LOOPBACK, 0),
            udp_host=LOOPBACK,
            lan_group=lan_group,
            lan_interfaces=(LOOPBACK,),
            standby_count=2,
        )

        async def forward(accepted: AcceptedStream) -> None:
            await forward_to_service(accepted, page)

        await group.start(agent.serve, forward)
        with anyio.fail_after(10):
            await agent.wait_ready()
        announce(
            f"mediator {format_endpoint(mediator)}, relay {relay_url},"
            f" server {server_id} forwarding to http://{format_endpoint(page)}"
        )
        announce(f"{'path':<14} {'connected':<10} {'by':<34} {'connect':>10} {'download':>12}")

        def connector(paths: frozenset[PathKind]) -> Connector:
            return Connector(
                server_id=server_id,
                mediator=mediator,
                relays=(relay_url,),
                paths=paths,
                lan_group=lan_group,
                lan_interface=LOOPBACK,
                udp_host=LOOPBACK,
                deadline=5.0,
            )

        for kind in (PathKind.LAN, PathKind.TCP, PathKind.UDP, PathKind.RELAY):
            async with connector(frozenset({kind})) as client:
                rows.append(await _fetch(client, kind.value, page_bytes, announce))
                if kind is PathKind.UDP and rows[-1].connected:
                    # A second connection through the hole the first one punched.
                    rows.append(await _fetch(client, "udp (reused)", page_bytes, announce))
        async with connector(ALL_PATHS) as client:
            rows.append(await _fetch(client, "auto", page_bytes, announce))
        group.cancel_scope.cancel()
    return rows


async def _fetch(
    client: Connector, label: str, page_bytes: int, announce: Callable[[str], None]
) -> DemoRow:
    try:
        connection = await client.connect()
    except PathRaceError as exc:
        row = DemoRow(path=label, connected=False, error=exc.reason)
        announce(f"{label:<14} {'no':<10} {exc.reason}")
        return row
    async with connection.stream:
        started = anyio.current_time()
        await connection.stream.send(b"GET / HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n")
        received = 0
        with anyio.fail_after(30), contextlib.suppress(anyio.EndOfStream):
            while True:
                received += len(await connection.stream.receive())
        seconds = max(anyio.current_time() - started, 1e-9)
    body = received - _response_head_size(page_bytes)
    row = DemoRow(
        path=label,
        connected=body == page_bytes,
        winner=connection.target,
        connect_ms=connection.elapsed * 1000,
        mb_per_s=received / seconds / 1e6,
        error="" if body == page_bytes else f"got {body} of {page_bytes} bytes",
    )
    announce(
        f"{label:<14} {'yes' if row.connected else 'no':<10} {row.winner:<34}"
        f" {row.connect_ms:>7.1f} ms {row.mb_per_s:>7.1f} MB/s {row.error}".rstrip()
    )
    return row


def _response_head(page_bytes: int) -> bytes:
    return (
        f"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {page_bytes}\r\nConnection: close\r\n\r\n"
    ).encode("ascii")


def _response_head_size(page_bytes: int) -> int:
    return len(_response_head(page_bytes))


async def _serve_page(
    page_bytes: int, *, task_status: anyio.abc.TaskStatus[Endpoint] = anyio.TASK_STATUS_IGNORED
) -> None:
    """The service behind the server: answers any request with ``page_bytes`` bytes."""
    body = bytes(page_bytes)
    listener = await anyio.create_tcp_listener(local_host=LOOPBACK, local_port=0)
    bound = listener.extra(anyio.abc.SocketAttribute.local_address)

    async def answer(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                await _answer(stream)

    async def _answer(stream: anyio.abc.SocketStream) -> None:
        head = b""
        with anyio.move_on_after(10):
            while b"\r\n\r\n" not in head and len(head) < _HEAD_LIMIT:
                head += await stream.receive()
        await stream.send(_response_head(page_bytes) + body)

    async with listener:
        task_status.started((str(bound[0]), int(bound[1])))
        await listener.serve(answer)


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])
