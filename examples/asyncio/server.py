"""A wavesync server on plain asyncio (uvloop too): ``python examples/asyncio/server.py``.

Forwards every verified stream, a (StreamReader, StreamWriter) pair whichever path it
came by, to a local TCP service. Settings: WAVESYNC_* environment variables
(examples/README.md). SIGINT/SIGTERM stop it.
"""

import asyncio
import os
import signal
import uuid
from pathlib import Path

from wavesync_adapters.asyncio.agent import AcceptedStream, ServerAgent
from wavesync_adapters.asyncio.forward import forward_to_service
from wavesync_adapters.programs import server_ready
from wavesync_proto.addresses import parse_endpoint
from wavesync_proto.mediator.systems import parse_systems

SYSTEMS = parse_systems(Path(os.environ.get("WAVESYNC_SYSTEMS", "systems.toml")).read_text())
SYSTEM_ID, KEY = next(iter(SYSTEMS.items()))
MEDIATOR = parse_endpoint(os.environ.get("WAVESYNC_MEDIATOR", "127.0.0.1:3478"))
RELAY = os.environ.get("WAVESYNC_RELAY", "http://127.0.0.1:3479")
FORWARD = parse_endpoint(os.environ.get("WAVESYNC_FORWARD", "127.0.0.1:8000"))


async def forward(accepted: AcceptedStream) -> None:
    await forward_to_service(accepted, FORWARD)  # the writer is closed when this returns


async def main() -> None:
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
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    async with agent.running(forward) as bound:  # leaving the block stops every task
        await asyncio.wait_for(agent.wait_ready(), 10)  # registered, at the relay
        print(server_ready(agent.server_id, SYSTEM_ID, bound, FORWARD), flush=True)
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
