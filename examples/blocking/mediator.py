"""A wavesync mediator on plain sockets and a thread: ``python examples/blocking/mediator.py``.

Settings: WAVESYNC_* environment variables (examples/README.md). SIGINT/SIGTERM stop it.
"""

import os
import secrets
import signal
from pathlib import Path

from wavesync_adapters.blocking.mediator import MediatorDaemon
from wavesync_adapters.programs import mediator_ready
from wavesync_proto.addresses import parse_endpoint
from wavesync_proto.mediator.service import MediatorService
from wavesync_proto.mediator.systems import parse_systems

SYSTEMS = parse_systems(Path(os.environ.get("WAVESYNC_SYSTEMS", "systems.toml")).read_text())
LISTEN = parse_endpoint(os.environ.get("WAVESYNC_LISTEN", "127.0.0.1:3478"))
RELAY = os.environ.get("WAVESYNC_RELAY", "http://127.0.0.1:3479")


def main() -> None:
    service = MediatorService(
        systems=SYSTEMS, relay_urls=[RELAY], nonce_secret=secrets.token_bytes(32)
    )
    daemon = MediatorDaemon(service)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: daemon.shutdown())  # thread- and signal-safe
    daemon.serve_forever(*LISTEN, started=lambda b: print(mediator_ready(b, None), flush=True))


if __name__ == "__main__":
    main()
