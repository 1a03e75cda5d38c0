"""A wavesync client on anyio: ``python examples/anyio/client.py``.

Settings: WAVESYNC_* environment variables (examples/README.md). SIGINT/SIGTERM stop it.
"""

import functools
import os
import signal
from pathlib import Path

import anyio

from wavesync_adapters.anyio.connector import Connector
from wavesync_adapters.anyio.forward import serve_local_port
from wavesync_adapters.programs import client_ready
from wavesync_proto.addresses import parse_endpoint
from wavesync_proto.mediator.systems import parse_systems

SYSTEMS = parse_systems(Path(os.environ.get("WAVESYNC_SYSTEMS", "systems.toml")).read_text())
SYSTEM_ID = next(iter(SYSTEMS))
MEDIATOR = parse_endpoint(os.environ.get("WAVESYNC_MEDIATOR", "127.0.0.1:3478"))
RELAY = os.environ.get("WAVESYNC_RELAY", "http://127.0.0.1:3479")
LISTEN = parse_endpoint(os.environ.get("WAVESYNC_LISTEN", "127.0.0.1:8080"))


async def main() -> None:
    connector = Connector(system_id=SYSTEM_ID, mediator=MEDIATOR, relays=[RELAY], lan=False)
    async with connector:
        first = await connector.connect()  # PathRaceError if no path works in 10 s
        await first.stream.aclose()
        print(f"connected by {first.target} in {first.elapsed:.3f} s", flush=True)
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with anyio.create_task_group() as group:
                serve = functools.partial(serve_local_port, connector, LISTEN)
                print(client_ready(await group.start(serve)), flush=True)
                async for _ in signals:
                    group.cancel_scope.cancel()
                    break


if __name__ == "__main__":
    anyio.run(main)
