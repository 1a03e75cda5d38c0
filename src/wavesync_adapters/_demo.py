"""What ``wavesync demo`` is on every runtime: its parts' settings, its rows and its table.

Runtime-free, so the anyio, asyncio and blocking demos set up the same system,
try the same paths in the same order and print the same table; each runtime's
``demo.py`` only moves the bytes.
"""

from __future__ import annotations

import secrets
import socket
import uuid
from dataclasses import dataclass
from typing import Any

from wavesync_proto.addresses import Endpoint, format_endpoint
from wavesync_proto.discovery import DEFAULT_GROUP
from wavesync_proto.mediator.service import MediatorService
from wavesync_proto.race import PathKind
from wavesync_proto.relay import RelayService

__all__ = [
    "AUTO",
    "FETCH_SECONDS",
    "HEAD_SECONDS",
    "LOOPBACK",
    "PAGE_BYTES",
    "READY_SECONDS",
    "REUSED_UDP",
    "SINGLE_PATHS",
    "DemoRow",
    "DemoSystem",
    "failed_row",
    "fetched_row",
    "header_line",
    "intro_line",
    "page_request",
    "received_head",
    "relay_url",
    "response_head",
]

LOOPBACK = "127.0.0.1"
#: Bytes the demo's HTTP service sends per page: enough to show a rate, short enough
#: that the whole demo stays a few seconds.
PAGE_BYTES = 4 * 1024 * 1024
#: Most bytes the page service reads looking for the end of a request's head.
HEAD_LIMIT = 16384
#: Seconds the page service waits for a request's head, and a fetch for its page.
HEAD_SECONDS = 10.0
FETCH_SECONDS = 30.0
#: Seconds the demo waits for the agent to register and fill the relay pool.
READY_SECONDS = 10.0
#: The paths tried alone, in this order (a second UDP fetch reuses the first's hole);
#: then every path at once ("auto").
SINGLE_PATHS = (PathKind.LAN, PathKind.TCP, PathKind.UDP, PathKind.RELAY)
AUTO = "auto"
REUSED_UDP = "udp (reused)"


@dataclass(frozen=True, kw_only=True)
class DemoRow:
    """One line of the demo's table."""

    path: str
    connected: bool
    winner: str = ""
    connect_ms: float = 0.0
    mb_per_s: float = 0.0
    error: str = ""


@dataclass(frozen=True, kw_only=True)
class DemoSystem:
    """One system with one server, fresh for each demo run."""

    system_id: uuid.UUID
    server_id: uuid.UUID
    key: str
    #: A group port of the demo's own, so two demos (or a real agent) never answer ours.
    lan_group: Endpoint

    @classmethod
    def new(cls) -> DemoSystem:
        return cls(
            system_id=uuid.uuid4(),
            server_id=uuid.uuid4(),
            key=secrets.token_urlsafe(32),
            lan_group=(DEFAULT_GROUP[0], _free_udp_port()),
        )

    def relay_service(self) -> RelayService:
        return RelayService({self.system_id: self.key})

    def mediator_service(self, relay_url: str) -> MediatorService:
        return MediatorService(
            systems={self.system_id: self.key},
            relay_urls=(relay_url,),
            nonce_secret=secrets.token_bytes(32),
        )

    def agent_options(self, mediator: Endpoint, relay_url: str) -> dict[str, Any]:
        """The ``ServerAgent`` keyword arguments, the same on every runtime."""
        return {
            "system_id": self.system_id,
            "server_id": self.server_id,
            "key": self.key,
            "mediator": mediator,
            "relays": (relay_url,),
            "tcp_listen": (LOOPBACK, 0),
            "udp_host": LOOPBACK,
            "lan_group": self.lan_group,
            "lan_interfaces": (LOOPBACK,),
            "standby_count": 2,
        }

    def connector_options(
        self, mediator: Endpoint, relay_url: str, paths: frozenset[PathKind]
    ) -> dict[str, Any]:
        """The ``Connector`` keyword arguments for one row (``paths`` alone)."""
        return {
            "server_id": self.server_id,
            "mediator": mediator,
            "relays": (relay_url,),
            "paths": paths,
            "lan_group": self.lan_group,
            "lan_interface": LOOPBACK,
            "udp_host": LOOPBACK,
            "deadline": 5.0,
        }


def relay_url(bound: Endpoint) -> str:
    return f"http://{format_endpoint(bound)}"


def intro_line(mediator: Endpoint, relay: str, server_id: uuid.UUID, page: Endpoint) -> str:
    return (
        f"mediator {format_endpoint(mediator)}, relay {relay},"
        f" server {server_id} forwarding to http://{format_endpoint(page)}"
    )


def header_line() -> str:
    return f"{'path':<14} {'connected':<10} {'by':<34} {'connect':>10} {'download':>12}"


def failed_row(label: str, reason: str) -> tuple[DemoRow, str]:
    """A row whose connect failed, and its table line."""
    return DemoRow(path=label, connected=False, error=reason), f"{label:<14} {'no':<10} {reason}"


def fetched_row(
    label: str,
    *,
    target: str,
    elapsed: float,
    received: int,
    seconds: float,
    page_bytes: int,
) -> tuple[DemoRow, str]:
    """A row whose connect worked and whose fetch read ``received`` bytes (head and
    body) in ``seconds``, and its table line. It connected if the whole page came."""
    body = received - len(response_head(page_bytes))
    row = DemoRow(
        path=label,
        connected=body == page_bytes,
        winner=target,
        connect_ms=elapsed * 1000,
        mb_per_s=received / max(seconds, 1e-9) / 1e6,
        error="" if body == page_bytes else f"got {body} of {page_bytes} bytes",
    )
    line = (
        f"{label:<14} {'yes' if row.connected else 'no':<10} {row.winner:<34}"
        f" {row.connect_ms:>7.1f} ms {row.mb_per_s:>7.1f} MB/s {row.error}".rstrip()
    )
    return row, line


def page_request() -> bytes:
    return b"GET / HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n"


def response_head(page_bytes: int) -> bytes:
    return (
        f"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {page_bytes}\r\nConnection: close\r\n\r\n"
    ).encode("ascii")


def received_head(head: bytes) -> bool:
    """Whether the page service has read enough of a request to answer it."""
    return b"\r\n\r\n" in head or len(head) >= HEAD_LIMIT


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])
