"""A wavesync relay on plain sockets and a thread: ``python examples/blocking/relay.py``.

Settings: WAVESYNC_* environment variables (examples/README.md). SIGINT/SIGTERM stop it.
"""

import os
import signal
from pathlib import Path

from wavesync_adapters.blocking.relay import RelayDaemon
from wavesync_adapters.programs import relay_ready
from wavesync_proto.addresses import parse_endpoint
from wavesync_proto.mediator.systems import parse_systems
from wavesync_proto.relay import RelayService

SYSTEMS = parse_systems(Path(os.environ.get("WAVESYNC_SYSTEMS", "systems.toml")).read_text())
LISTEN = parse_endpoint(os.environ.get("WAVESYNC_LISTEN", "127.0.0.1:3479"))


def main() -> None:
    daemon = RelayDaemon(RelayService(SYSTEMS))
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: daemon.shutdown())  # thread- and signal-safe
    daemon.serve_forever(*LISTEN, started=lambda b: print(relay_ready(b), flush=True))


if __name__ == "__main__":
    main()
