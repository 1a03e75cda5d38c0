"""The four daemons on plain asyncio (uvloop too): ``wavesync ... --adapter asyncio``.

Each program runs in ``asyncio.run`` until SIGTERM or SIGINT, which cancel its
main task; ``wavesync_adapters.programs`` says what every adapter's programs promise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from wavesync_proto.addresses import Endpoint
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

__all__ = ["AsyncioPrograms", "programs"]

log = logging.getLogger("wavesync")


class AsyncioPrograms:
    """``Programs`` on asyncio."""

    def run_mediator(
        self,
        service: MediatorService,
        *,
        listen: Endpoint,
        http: Endpoint | None,
        announce: Announce,
    ) -> None:
        daemon = MediatorDaemon(service, http=http)

        def started(bound: Endpoint) -> None:
            announce(mediator_ready(bound, daemon.http_bound))

        _run_until_signal(lambda: daemon.serve(*listen, started=started))

    def run_relay(self, service: RelayService, *, listen: Endpoint, announce: Announce) -> None:
        daemon = RelayDaemon(service)
        _run_until_signal(
            lambda: daemon.serve(*listen, started=lambda bound: announce(relay_ready(bound)))
        )

    def run_server(
        self, options: Mapping[str, Any], *, forward: Endpoint, announce: Announce
    ) -> AgentCounters:
        agent = ServerAgent(**options)

        async def pipe(accepted: AcceptedStream) -> None:
            await forward_to_service(accepted, forward)

        async def program() -> None:
            async with agent.running(pipe) as bound:
                # "Ready" means reachable: registered, and a standby at each relay.
                try:
                    async with asyncio.timeout(READY_SECONDS):
                        await agent.wait_ready()
                except TimeoutError:
                    log.warning("not yet registered or in every relay pool; serving anyway")
                announce(server_ready(agent.server_id, agent.system_id, bound, forward))
                await asyncio.get_running_loop().create_future()  # until cancelled

        _run_until_signal(program)
        return agent.counters

    def run_client(
        self, options: Mapping[str, Any], *, listen: Endpoint, announce: Announce
    ) -> None:
        connector = Connector(**options)

        async def program() -> None:
            async with connector:
                await serve_local_port(
                    connector, listen, started=lambda bound: announce(client_ready(bound))
                )

        _run_until_signal(program)


def _run_until_signal(program: Callable[[], Awaitable[None]]) -> None:
    """Run ``program`` in a new event loop; SIGTERM or SIGINT cancels it, and that end
    is a normal one. Its own exceptions (an address not bound) propagate."""

    async def main() -> None:
        task = asyncio.ensure_future(program())
        loop = asyncio.get_running_loop()
        stopping: list[str] = []

        def stop(signum: signal.Signals) -> None:
            log.info("stopping on %s", signum.name)
            stopping.append(signum.name)
            task.cancel()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop, signum)
        try:
            await task
        except asyncio.CancelledError:
            if not stopping:
                raise
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(RuntimeError):
                    loop.remove_signal_handler(signum)

    asyncio.run(main())


def programs(adapter: str) -> AsyncioPrograms:
    """``programs_for``'s hook."""
    return AsyncioPrograms()
