"""A wavesync relay on trio (the anyio adapter runs on trio as is).

``python examples/trio/relay.py``. Settings: WAVESYNC_* environment variables
(examples/README.md). SIGINT/SIGTERM stop it.
"""

import os
import signal
from pathlib import Path

import trio

from wavesync_adapters.anyio.relay import RelayDaemon
from wavesync_adapters.programs import relay_ready
from wavesync_proto.addresses import parse_endpoint
from wavesync_proto.mediator.systems import parse_systems
from wavesync_proto.relay import RelayService

SYSTEMS = parse_systems(Path(os.environ.get("WAVESYNC_SYSTEMS", "systems.toml")).read_text())
LISTEN = parse_endpoint(os.environ.get("WAVESYNC_LISTEN", "127.0.0.1:3479"))


async def main() -> None:
    daemon = RelayDaemon(RelayService(SYSTEMS))
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(daemon.serve, *LISTEN)
            print(relay_ready(bound), flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


if __name__ == "__main__":
    trio.run(main)
