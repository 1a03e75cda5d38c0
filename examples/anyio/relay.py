"""A wavesync relay on anyio: ``python examples/anyio/relay.py``.

Settings: WAVESYNC_* environment variables (examples/README.md). SIGINT/SIGTERM stop it.
"""

import os
import signal
from pathlib import Path

import anyio

from wavesync_adapters.anyio.relay import RelayDaemon
from wavesync_adapters.programs import relay_ready
from wavesync_proto.addresses import parse_endpoint
from wavesync_proto.mediator.systems import parse_systems
from wavesync_proto.relay import RelayService

SYSTEMS = parse_systems(Path(os.environ.get("WAVESYNC_SYSTEMS", "systems.toml")).read_text())
LISTEN = parse_endpoint(os.environ.get("WAVESYNC_LISTEN", "127.0.0.1:3479"))


async def main() -> None:
    daemon = RelayDaemon(RelayService(SYSTEMS))
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with anyio.create_task_group() as group:
            bound = await group.start(daemon.serve, *LISTEN)
            print(relay_ready(bound), flush=True)
            async for _ in signals:
                group.cancel_scope.cancel()
                break


if __name__ == "__main__":
    anyio.run(main)
