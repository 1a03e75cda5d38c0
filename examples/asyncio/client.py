"""A wavesync client on plain asyncio (uvloop too): ``python examples/asyncio/client.py``.

Connects once to show which path wins, then carries every connection to a local port
to the server. Settings: WAVESYNC_* environment variables (examples/README.md).
SIGINT/SIGTERM stop it.
"""

import asyncio
import contextlib
import os
import signal
from pathlib import Path

from wavesync_adapters.asyncio.connector import Connector
from wavesync_adapters.asyncio.forward import serve_local_port
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
        first.writer.close()
        print(f"connected by {first.target} in {first.elapsed:.3f} s", flush=True)
        ready = lambda bound: print(client_ready(bound), flush=True)  # noqa: E731
        serving = asyncio.ensure_future(serve_local_port(connector, LISTEN, started=ready))
        for signum in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(signum, serving.cancel)
        with contextlib.suppress(asyncio.CancelledError):  # a signal: a normal end
            await serving


if __name__ == "__main__":
    asyncio.run(main())
