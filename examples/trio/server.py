"""A wavesync server on trio (the anyio adapter runs on trio as is).

``python examples/trio/server.py``: forwards every verified stream to a local TCP
service. Settings: WAVESYNC_* environment variables (examples/README.md).
SIGINT/SIGTERM stop it.
"""

import os
import signal
import uuid
from pathlib import Path

import trio

from wavesync_adapters.anyio.agent import AcceptedStream, ServerAgent
from wavesync_adapters.anyio.forward import forward_to_service
from wavesync_adapters.programs import server_ready
from wavesync_proto.addresses import parse_endpoint
from wavesync_proto.mediator.systems import parse_systems

SYSTEMS = parse_systems(Path(os.environ.get("WAVESYNC_SYSTEMS", "systems.toml")).read_text())
SYSTEM_ID, KEY = next(iter(SYSTEMS.items()))
MEDIATOR = parse_endpoint(os.environ.get("WAVESYNC_MEDIATOR", "127.0.0.1:3478"))
RELAY = os.environ.get("WAVESYNC_RELAY", "http://127.0.0.1:3479")
FORWARD = parse_endpoint(os.environ.get("WAVESYNC_FORWARD", "127.0.0.1:8000"))


async def forward(accepted: AcceptedStream) -> None:
    await forward_to_service(accepted, FORWARD)  # the stream is closed when this returns


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
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(agent.serve, forward)
            with trio.fail_after(10):
                await agent.wait_ready()  # registered, and standing by at the relay
            print(server_ready(agent.server_id, SYSTEM_ID, bound, FORWARD), flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


if __name__ == "__main__":
    trio.run(main)
