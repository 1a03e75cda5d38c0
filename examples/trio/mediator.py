"""A wavesync mediator on trio (the anyio adapter runs on trio as is).

``python examples/trio/mediator.py``. Settings: WAVESYNC_* environment variables
(examples/README.md). SIGINT/SIGTERM stop it.
"""

import os
import secrets
import signal
from pathlib import Path

import trio

from wavesync_adapters.anyio.mediator import MediatorDaemon
from wavesync_adapters.programs import mediator_ready
from wavesync_proto.addresses import parse_endpoint
from wavesync_proto.mediator.service import MediatorService
from wavesync_proto.mediator.systems import parse_systems

SYSTEMS = parse_systems(Path(os.environ.get("WAVESYNC_SYSTEMS", "systems.toml")).read_text())
LISTEN = parse_endpoint(os.environ.get("WAVESYNC_LISTEN", "127.0.0.1:3478"))
RELAY = os.environ.get("WAVESYNC_RELAY", "http://127.0.0.1:3479")


async def main() -> None:
    service = MediatorService(
        systems=SYSTEMS, relay_urls=[RELAY], nonce_secret=secrets.token_bytes(32)
    )
    daemon = MediatorDaemon(service)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(daemon.serve, *LISTEN)
            print(mediator_ready(bound, None), flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()  # stops the daemon; main() returns
                break


if __name__ == "__main__":
    trio.run(main)
