"""The four daemons on plain sockets and threads: ``wavesync ... --adapter blocking``.

Each program runs in the main thread until SIGTERM or SIGINT, whose handler asks
it to stop (``shutdown``, a stop event) and returns; the program then winds down
within its own bounded time. ``wavesync_adapters.programs`` says what every
adapter's programs promise.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from types import FrameType
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
from .forward import LocalPortStop, forward_to_service, serve_local_port
from .mediator import MediatorDaemon
from .relay import RelayDaemon

__all__ = ["BlockingPrograms", "programs"]

log = logging.getLogger("wavesync")


class BlockingPrograms:
    """``Programs`` on blocking sockets and threads."""

    def run_mediator(
        self,
        service: MediatorService,
        *,
        listen: Endpoint,
        http: Endpoint | None,
        announce: Announce,
    ) -> None:
        daemon = MediatorDaemon(service, http=http)
        with _on_signal(daemon.shutdown):
            daemon.serve_forever(
                *listen, started=lambda bound: announce(mediator_ready(bound, daemon.http_bound))
            )

    def run_relay(self, service: RelayService, *, listen: Endpoint, announce: Announce) -> None:
        daemon = RelayDaemon(service)
        with _on_signal(daemon.shutdown):
            daemon.serve_forever(*listen, started=lambda bound: announce(relay_ready(bound)))

    def run_server(
        self, options: Mapping[str, Any], *, forward: Endpoint, announce: Announce
    ) -> AgentCounters:
        agent = ServerAgent(**options)
        stop = threading.Event()

        def pipe(accepted: AcceptedStream) -> None:
            forward_to_service(accepted, forward)

        with _on_signal(stop.set), agent.running(pipe) as bound:
            # "Ready" means reachable: registered, and a standby at each relay.
            try:
                agent.wait_ready(READY_SECONDS)
            except TimeoutError:
                log.warning("not yet registered or in every relay pool; serving anyway")
            announce(server_ready(agent.server_id, agent.system_id, bound, forward))
            stop.wait()
        return agent.counters

    def run_client(
        self, options: Mapping[str, Any], *, listen: Endpoint, announce: Announce
    ) -> None:
        stop = LocalPortStop()
        with _on_signal(stop.stop), contextlib.closing(stop), Connector(**options) as connector:
            serve_local_port(
                connector, listen, started=lambda bound: announce(client_ready(bound)), stop=stop
            )


@contextlib.contextmanager
def _on_signal(stop: Callable[[], None]) -> Iterator[None]:
    """Call ``stop`` on SIGTERM or SIGINT while the block runs (in the main thread)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        log.info("stopping on %s", signal.Signals(signum).name)
        stop()

    previous = {signum: signal.signal(signum, handler) for signum in _SIGNALS}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def programs(adapter: str) -> BlockingPrograms:
    """``programs_for``'s hook."""
    return BlockingPrograms()
