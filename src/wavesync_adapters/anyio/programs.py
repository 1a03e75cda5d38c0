"""The four daemons on anyio, on its asyncio or its trio backend.

What ``wavesync mediator|relay|server|client --adapter anyio`` (or ``trio``) runs;
``wavesync_adapters.programs`` says what every adapter's programs promise.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import signal
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
import anyio.abc

from wavesync_proto.addresses import Endpoint
from wavesync_proto.errors import LocalProtocolError
from wavesync_proto.mediator.service import MediatorService
from wavesync_proto.relay import RelayService

from ..programs import (
    READY_SECONDS,
    Announce,
    client_ready,
    mediator_ready,
    relay_ready,
    server_ready,
)
from .agent import AcceptedStream, AgentCounters, ServerAgent
from .connector import Connector
from .forward import forward_to_service, serve_local_port
from .mediator import MediatorDaemon
from .relay import RelayDaemon

__all__ = ["AnyioPrograms", "programs"]

log = logging.getLogger("wavesync")


class AnyioPrograms:
    """``Programs`` on anyio with ``backend`` ("asyncio" or "trio")."""

    def __init__(self, backend: str) -> None:
        self.backend = backend

    def _run(self, program: Callable[[], Awaitable[None]]) -> None:
        if self.backend == "trio" and importlib.util.find_spec("trio") is None:
            # anyio would end in a LookupError traceback; say what to install instead.
            raise LocalProtocolError("--adapter trio needs pip install 'wavesync[trio]'")
        anyio.run(program, backend=self.backend)

    def run_mediator(
        self,
        service: MediatorService,
        *,
        listen: Endpoint,
        http: Endpoint | None,
        announce: Announce,
    ) -> None:
        daemon = MediatorDaemon(service, http=http)

        async def program() -> None:
            async with anyio.create_task_group() as group:
                bound = await group.start(daemon.serve, *listen)
                announce(mediator_ready(bound, daemon.http_bound))
                await until_signal(group)

        self._run(program)

    def run_relay(self, service: RelayService, *, listen: Endpoint, announce: Announce) -> None:
        daemon = RelayDaemon(service)

        async def program() -> None:
            async with anyio.create_task_group() as group:
                bound = await group.start(daemon.serve, *listen)
                announce(relay_ready(bound))
                await until_signal(group)

        self._run(program)

    def run_server(
        self, options: Mapping[str, Any], *, forward: Endpoint, announce: Announce
    ) -> AgentCounters:
        agent = ServerAgent(**options)

        async def pipe(accepted: AcceptedStream) -> None:
            await forward_to_service(accepted, forward)

        async def program() -> None:
            async with anyio.create_task_group() as group:
                bound = await group.start(agent.serve, pipe)
                # "Ready" means reachable: registered, and a standby at each relay.
                with anyio.move_on_after(READY_SECONDS) as waiting:
                    await agent.wait_ready()
                if waiting.cancelled_caught:
                    log.warning("not yet registered or in every relay pool; serving anyway")
                announce(server_ready(agent.server_id, agent.system_id, bound, forward))
                await until_signal(group)

        self._run(program)
        return agent.counters

    def run_client(
        self, options: Mapping[str, Any], *, listen: Endpoint, announce: Announce
    ) -> None:
        connector = Connector(**options)

        async def program() -> None:
            async with connector, anyio.create_task_group() as group:
                bound = await group.start(functools.partial(serve_local_port, connector, listen))
                announce(client_ready(bound))
                await until_signal(group)

        self._run(program)


async def until_signal(group: anyio.abc.TaskGroup) -> None:
    """Cancel ``group`` at the first SIGTERM or SIGINT."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("stopping on %s", signal.Signals(signum).name)
            group.cancel_scope.cancel()
            return


def programs(adapter: str) -> AnyioPrograms:
    """``programs_for``'s hook: "anyio" runs on asyncio, "trio" on trio."""
    return AnyioPrograms("trio" if adapter == "trio" else "asyncio")
