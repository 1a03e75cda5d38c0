"""A wavesync relay on plain asyncio (uvloop too): ``python examples/asyncio/relay.py``.

Settings: WAVESYNC_* environment variables (examples/README.md). SIGINT/SIGTERM stop it.
"""

import asyncio
import contextlib
import os
import signal
from pathlib import Path

from wavesync_adapters.asyncio.relay import RelayDaemon
from wavesync_adapters.programs import relay_ready
from wavesync_proto.addresses import parse_endpoint
from wavesync_proto.mediator.systems import parse_systems
from wavesync_proto.relay import RelayService

SYSTEMS = parse_systems(Path(os.environ.get("WAVESYNC_SYSTEMS", "systems.toml")).read_text())
LISTEN = parse_endpoint(os.environ.get("WAVESYNC_LISTEN", "127.0.0.1:3479"))


async def main() -> None:
    daemon = RelayDaemon(RelayService(SYSTEMS))
    ready = lambda bound: print(relay_ready(bound), flush=True)  # noqa: E731
    serving = asyncio.ensure_future(daemon.serve(*LISTEN, started=ready))
    for signum in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(signum, serving.cancel)
    with contextlib.suppress(asyncio.CancelledError):  # a signal: a normal end
        await serving


if __name__ == "__main__":
    asyncio.run(main())
