"""A wavesync server on plain sockets and threads: ``python examples/blocking/server.py``.

Forwards every verified stream, a real ``socket.socket`` whichever path it came by, to
a local TCP service; each runs in a thread of its own. Settings: WAVESYNC_* environment
variables (examples/README.md). SIGINT/SIGTERM stop it.
"""

import os
import signal
import threading
import uuid
from pathlib import Path

from wavesync_adapters.blocking.agent import AcceptedStream, ServerAgent
from wavesync_adapters.blocking.forward import forward_to_service
from wavesync_adapters.programs import server_ready
from wavesync_proto.addresses import parse_endpoint
from wavesync_proto.mediator.systems import parse_systems

SYSTEMS = parse_systems(Path(os.environ.get("WAVESYNC_SYSTEMS", "systems.toml")).read_text())
SYSTEM_ID, KEY = next(iter(SYSTEMS.items()))
MEDIATOR = parse_endpoint(os.environ.get("WAVESYNC_MEDIATOR", "127.0.0.1:3478"))
RELAY = os.environ.get("WAVESYNC_RELAY", "http://127.0.0.1:3479")
FORWARD = parse_endpoint(os.environ.get("WAVESYNC_FORWARD", "127.0.0.1:8000"))


def forward(accepted: AcceptedStream) -> None:
    forward_to_service(accepted, FORWARD)  # the socket is closed when this returns


def main() -> None:
    # Loopback and no LAN discovery for the demo; a real server keeps the defaults.
    agent = ServerAgent(
        system_id=SYSTEM_ID,
        server_id=uuid.uuid4(),
        key=KEY,
        mediator=MEDIATOR,
        relays=[RELAY],
        tcp_listen=("127.0.0.1", 0),
        udp_host="127.0.0.1",
        lan=False,
    )
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with agent.running(forward) as bound:  # leaving the block stops and joins every thread
        agent.wait_ready(10)  # registered, and standing by at the relay
        print(server_ready(agent.server_id, SYSTEM_ID, bound, FORWARD), flush=True)
        stop.wait()


if __name__ == "__main__":
    main()
