"""UDT: one bulk transfer beside N idle connections on the same socket, N = 0, 100, 1000.

A server agent keeps punched holes and reused connections open, so one endpoint
carries one busy connection and many idle ones. This measures whether the idle ones
cost the busy one anything: the goodput of one transfer with N idle connections
established on the same two sockets, and its ratio to N = 0. Two rows per N:

- in memory: two ``UdtMultiplexer``s wired back to back through the core alone (no
  sockets), driven as an adapter drives them on the real clock: a turn fires the
  timer, sends, delivers, and pumps the events of the connections that have some
  (``ready_connections()``; every connection where the multiplexer has no such call);
- loopback: the anyio adapter (``UdtEndpoint``) over 127.0.0.1, asyncio backend.

The clock runs from the first byte received to the last; the bytes are counted, not
hashed (the test suite checks content). To compare with older code, run the same
script against another checkout of the tree, e.g. ``git worktree add /tmp/base <commit>``
and ``PYTHONPATH=/tmp/base/src python bench/udt_many.py``: the report names the
``wavesync_proto`` it imported.

    python bench/udt_many.py [--idle 0,100,1000] [--memory-bytes N] [--loopback-bytes N]
                             [--rounds R] [--quick]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import wavesync_proto
from wavesync_adapters.anyio.udt import UdtEndpoint, UdtStream
from wavesync_proto.addresses import Endpoint
from wavesync_proto.udt.connection import UdtConnection
from wavesync_proto.udt.connection_types import ConnectionState, DataReceived
from wavesync_proto.udt.multiplexer import ConnectionAccepted, UdtMultiplexer

CLIENT: Endpoint = ("192.0.2.1", 4000)
SERVER: Endpoint = ("198.51.100.2", 5000)
LOOPBACK: Endpoint = ("127.0.0.1", 0)
MB = 1_000_000


# --- in memory, through the core ---------------------------------------------------------


def _with_news(mux: UdtMultiplexer) -> Iterable[UdtConnection]:
    """What a driver pumps: the ready connections, or every one on older code."""
    ready: Callable[[], list[UdtConnection]] | None = getattr(mux, "ready_connections", None)
    return list(mux.connections.values()) if ready is None else ready()


def _turn(mux: UdtMultiplexer, source: Endpoint, peer: UdtMultiplexer, now: float) -> None:
    deadline = mux.get_timer()
    if deadline is not None and deadline <= now:
        mux.handle_timer(now)
    for data, _ in mux.datagrams_to_send(now):
        peer.receive_datagram(data, source, now)


def memory_goodput(idle: int, size: int) -> float:
    """Bytes per second of one transfer beside ``idle`` connections, core only."""
    clock = time.monotonic
    muxes = [
        UdtMultiplexer(
            now=clock(),
            random_bits=random.Random(seed).getrandbits,  # noqa: S311 - a benchmark's ids
            cookie_secret=bytes(16),
            max_connections=idle + 1,
        )
        for seed in (1, 2)
    ]
    client, server = muxes
    server.listen()
    outgoing = [client.connect(SERVER, clock()) for _ in range(idle + 1)]
    incoming: dict[int, UdtConnection] = {}
    while any(c.state is not ConnectionState.CONNECTED for c in outgoing):
        now = clock()
        _turn(client, CLIENT, server, now)
        _turn(server, SERVER, client, now)
        for accepted in iter(server.next_event, None):
            assert isinstance(accepted, ConnectionAccepted)
            incoming[accepted.connection.peer_socket_id or 0] = accepted.connection
    busy, sink = outgoing[-1], incoming[outgoing[-1].socket_id]
    for mux in muxes:
        for connection in _with_news(mux):
            for _ in iter(connection.next_event, None):
                pass
    chunk = bytes(1 << 20)
    sent = received = 0
    started = 0.0
    while received < size:
        while sent < size and (space := busy.send_space) > 0:
            sent += busy.send(chunk[: min(space, size - sent, len(chunk))])
        now = clock()
        _turn(client, CLIENT, server, now)
        _turn(server, SERVER, client, now)
        for mux in muxes:
            for connection in _with_news(mux):
                for event in iter(connection.next_event, None):
                    if type(event) is DataReceived and connection is sink:
                        if not received:
                            started = time.perf_counter()
                        received += len(event.data)
    return received / (time.perf_counter() - started)


# --- loopback, the anyio adapter ----------------------------------------------------------


async def _open_idle(client: UdtEndpoint, server: UdtEndpoint, count: int) -> list[UdtStream]:
    streams: list[UdtStream] = []

    async def connect() -> None:
        streams.append(await client.connect(server.local_address))

    for start in range(0, count, 100):  # in batches: a burst of 1000 SYNs overflows
        batch = min(100, count - start)
        async with anyio.create_task_group() as group:
            for _ in range(batch):
                group.start_soon(connect)
            for _ in range(batch):
                streams.append(await server.accept())
    return streams


async def _loopback(idle: int, size: int) -> float:
    async with UdtEndpoint.bind(LOOPBACK) as server, UdtEndpoint.bind(LOOPBACK) as client:
        server.listen()
        with anyio.fail_after(120):
            kept = await _open_idle(client, server, idle)
            outgoing = await client.connect(server.local_address)
            incoming = await server.accept()
            chunk = bytes(1 << 20)

            async def send() -> None:
                left = size
                while left:
                    await outgoing.send(chunk[: min(left, len(chunk))])
                    left -= min(left, len(chunk))

            async with anyio.create_task_group() as group:
                group.start_soon(send)
                received = len(await incoming.receive())
                started = time.perf_counter()
                while received < size:
                    received += len(await incoming.receive())
            elapsed = time.perf_counter() - started
        assert len(kept) == 2 * idle
    return size / elapsed


def loopback_goodput(idle: int, size: int) -> float:
    return anyio.run(_loopback, idle, size)


# --- the report --------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--idle", default="0,100,1000", help="idle connection counts")
    parser.add_argument("--memory-bytes", type=int, default=20 * MB)
    parser.add_argument("--loopback-bytes", type=int, default=50 * MB)
    parser.add_argument("--rounds", type=int, default=2, help="runs per cell (median shown)")
    parser.add_argument("--quick", action="store_true", help="small sizes, one round")
    args = parser.parse_args()
    if args.quick:
        args.memory_bytes, args.loopback_bytes, args.rounds = 2 * MB, 5 * MB, 1
    counts = [int(n) for n in args.idle.split(",")]
    source = Path(wavesync_proto.__file__).resolve().parent.parent
    print(f"wavesync_proto from {source}; python {sys.version.split()[0]}; ", end="")
    print(f"load {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(
        f"one transfer beside N idle connections: in memory {args.memory_bytes / MB:g} MB, "
        f"loopback (anyio) {args.loopback_bytes / MB:g} MB, median of {args.rounds}"
    )
    rows: dict[str, list[float]] = {"memory": [], "loopback": []}
    for count in counts:
        for name, run, size in (
            ("memory", memory_goodput, args.memory_bytes),
            ("loopback", loopback_goodput, args.loopback_bytes),
        ):
            runs = [run(count, size) / MB for _ in range(args.rounds)]
            rows[name].append(statistics.median(runs))
            shown = ", ".join(f"{r:.1f}" for r in runs)
            print(f"  N={count:<5} {name:<8} {shown} MB/s", flush=True)
    print(
        f"\n{'N idle':>7} | {'in memory MB/s':>14} | {'ratio':>5} | {'loopback MB/s':>13} | ratio"
    )
    for index, count in enumerate(counts):
        memory, loopback = rows["memory"][index], rows["loopback"][index]
        print(
            f"{count:>7} | {memory:>14.1f} | {memory / rows['memory'][0]:>5.2f} | "
            f"{loopback:>13.1f} | {loopback / rows['loopback'][0]:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
