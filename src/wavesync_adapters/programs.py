"""``--adapter``: which runtime runs a program, and what every runtime prints alike.

``wavesync mediator|relay|server|client --adapter anyio|asyncio|trio|blocking`` runs
the same program on another runtime: each adapter package has a ``programs``
module with the four ``run_*`` functions below (``Programs``). They block until
SIGTERM or SIGINT, raise ``OSError`` when an address cannot be bound and
``errors.RegistrationError`` when the mediator refuses the key, and print their
ready line through ``announce`` with the functions here, so a script (or a test)
that waits for "relay listening on tcp ..." works whatever runs it.

No runtime is imported here; ``programs_for`` imports only the one asked for.
"""

from __future__ import annotations

import importlib
import uuid
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from wavesync_proto.addresses import Endpoint, format_endpoint
from wavesync_proto.mediator.service import MediatorService
from wavesync_proto.relay import RelayService

__all__ = [
    "ADAPTERS",
    "READY_SECONDS",
    "Announce",
    "Programs",
    "client_ready",
    "mediator_ready",
    "programs_for",
    "relay_ready",
    "server_ready",
]

#: The runtimes a program can run on; trio runs through the anyio adapter.
ADAPTERS = ("anyio", "asyncio", "trio", "blocking")

#: How long ``wavesync server`` waits to be reachable before it says it is ready anyway.
READY_SECONDS = 10.0

Announce = Callable[[str], None]


class Programs(Protocol):
    """The four daemons on one runtime (each ``wavesync_adapters.<adapter>.programs``)."""

    def run_mediator(
        self,
        service: MediatorService,
        *,
        listen: Endpoint,
        http: Endpoint | None,
        announce: Announce,
    ) -> None: ...

    def run_relay(self, service: RelayService, *, listen: Endpoint, announce: Announce) -> None: ...

    def run_server(
        self, options: Mapping[str, Any], *, forward: Endpoint, announce: Announce
    ) -> object:
        """Run a ServerAgent built with ``options`` until a signal; return its counters."""
        ...

    def run_client(
        self, options: Mapping[str, Any], *, listen: Endpoint, announce: Announce
    ) -> None:
        """Run a Connector built with ``options`` behind a local port until a signal."""
        ...


def programs_for(adapter: str) -> Programs:
    """The programs of ``adapter`` (one of ``ADAPTERS``), importing only that runtime."""
    if adapter not in ADAPTERS:
        raise ValueError(f"no such adapter: {adapter!r} (one of {', '.join(ADAPTERS)})")
    package = "anyio" if adapter == "trio" else adapter
    module = importlib.import_module(f"wavesync_adapters.{package}.programs")
    programs: Programs = module.programs(adapter)
    return programs


def mediator_ready(bound: Endpoint, http_bound: Endpoint | None) -> str:
    line = f"mediator listening on udp+tcp {format_endpoint(bound)}"
    if http_bound is not None:
        line += f", http {format_endpoint(http_bound)}"
    return line


def relay_ready(bound: Endpoint) -> str:
    return f"relay listening on tcp {format_endpoint(bound)}"


def server_ready(
    server_id: uuid.UUID, system_id: uuid.UUID, bound: Endpoint, forward: Endpoint
) -> str:
    return (
        f"server {server_id} of system {system_id} accepting on tcp"
        f" {format_endpoint(bound)}, forwarding to {format_endpoint(forward)}"
    )


def client_ready(bound: Endpoint) -> str:
    return f"client listening on tcp {format_endpoint(bound)}"
