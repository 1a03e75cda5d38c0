"""Connect latency per path on loopback, next to aioice's gather + connect (issue 7).

Issue 7 targets, loopback: a punched UDT connect p50 ≤ 5 ms; a relay or direct
(TCP) connect p50 ≤ 3 ms; i.e. ≥ 4 x faster than aioice's ICE (≈ 21 ms measured).

One run, one process, one anyio (asyncio) event loop, as ``wavesync demo``: a
RelayDaemon, a MediatorDaemon offering it, a ServerAgent whose handler echoes, and a
client ``Connector`` per row with its path forced alone: lan, tcp, udp (a NEW
Connector per connect, so a fresh punch every time), udp-reused (one Connector: the
connects after its first reuse the hole), relay, and auto (every path, a new
Connector each time). Every connect is proven: one byte sent through the stream comes
back through the server's handler, then the stream is closed. Before a relay connect
the agent's standby pool is full again. The latency is ``time.perf_counter()`` around
``await connector.connect()`` (the user's view); ``Connection.elapsed`` (the
connector's own clock) is printed next to it.

The daemons run in this process on purpose: the figures are the protocol's cost, not
the cost of waking three processes on 2 cores, and ``wavesync demo`` runs this way.
In-process, each daemon's work is serialised with the client's on one loop, so a
figure here is an upper bound of what separate daemons would add on an idle machine.

aioice (the reference): two ``aioice.Connection`` agents (controlling and controlled),
one component, IPv4, no STUN/TURN server, host candidates on 127.0.0.1 only (aioice
leaves loopback out of its host addresses: ``get_host_addresses`` is replaced for
the run). Per pair: both gather, exchange credentials and candidates in-process, both
``connect()``; the clock runs from the first gather to both connected. Closed after.

``--breakdown N``: N more connects per forced path with time stamps around the
connector's and the agent's steps (wrappers installed by this script, nothing in
src/ is changed): when each step starts and how long it takes, median over the N.

    python bench/connect.py [--connects 200] [--pairs N] [--breakdown N] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import importlib.metadata
import os
import platform
import secrets
import socket
import statistics
import sys
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc

from connect_stamps import STAMPS, install_stamps, percentile, summarise_stamps
from wavesync_adapters.anyio import agent as agent_module
from wavesync_adapters.anyio.agent import AcceptedStream, ServerAgent
from wavesync_adapters.anyio.connector import Connection, Connector, PathRaceError
from wavesync_adapters.anyio.mediator import MediatorDaemon
from wavesync_adapters.anyio.relay import RelayDaemon
from wavesync_proto import __version__
from wavesync_proto.addresses import Endpoint, format_endpoint
from wavesync_proto.discovery import DEFAULT_GROUP, DiscoveryResponder
from wavesync_proto.mediator.service import MediatorService
from wavesync_proto.mediator.service_types import MediatorLimits
from wavesync_proto.race import ALL_PATHS, PathKind
from wavesync_proto.relay import RelayService
from wavesync_proto.udt.connection_types import ConnectionState

LOOPBACK = "127.0.0.1"
TARGET_UDT_P50_MS = 5.0
TARGET_DIRECT_P50_MS = 3.0
TARGET_RATIO = 4.0
STANDBY = 2
#: Any one connect, echo or pool refill taking longer than this stops the bench.
STEP_TIMEOUT = 10.0
#: The agent's punching sockets linger this long after their last connection: short,
#: so hundreds of fresh punches do not pile up, yet over the agent's 1 s idle poll (with
#: less, a hole between two reused connects 100 ms apart can be closed under the client).
SERVER_HOLE_LINGER = 2.0
#: A punch for a client that never rendezvouses (TCP or relay forced, or another path
#: won) keeps a UDT rendezvous connecting until it times out (30 s before commit bab946e,
#: 10 s since); each row starts once they are gone, so none loads the next row's loop.
SETTLE_TIMEOUT = 35.0


@dataclass
class Samples:
    """Milliseconds: the user's view (perf_counter) and the connector's (elapsed)."""

    user: list[float] = field(default_factory=list)
    connector: list[float] = field(default_factory=list)
    winners: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    #: Connects that raised PathRaceError: (ms it took, the race's reason, each failure).
    failures: list[tuple[float, str]] = field(default_factory=list)
    #: The agent's UDT connections still open 0.1 s after the row's last connect closed.
    left_open: str = ""
    #: Seconds the row waited for the agent's leftover rendezvous to end before it began.
    settled: float = 0.0


# --- the wavesync side ------------------------------------------------------------------------


@dataclass
class World:
    server_id: uuid.UUID
    mediator: Endpoint
    relay_url: str
    lan_group: Endpoint
    agent: ServerAgent
    close_checkpoint: bool = True
    settle_timeout: float = SETTLE_TIMEOUT

    def connecting(self) -> int:
        """UDT rendezvous the agent still runs, for clients long gone."""
        return sum(
            connection.state is ConnectionState.CONNECTING
            for punch in self.agent._punches.values()
            for connection in punch.endpoint.multiplexer.connections.values()
        )

    async def settle(self) -> float:
        """Wait until the agent runs no rendezvous left from earlier rows; seconds waited."""
        start = time.perf_counter()
        with anyio.move_on_after(self.settle_timeout):
            while self.connecting():
                await anyio.sleep(0.25)
        return time.perf_counter() - start

    def server_connections(self) -> str:
        """The UDT connections the agent's punching sockets still hold, by state."""
        states: dict[str, int] = defaultdict(int)
        for punch in self.agent._punches.values():
            for connection in punch.endpoint.multiplexer.connections.values():
                states[connection.state.value] += 1
        held = ", ".join(f"{count} {state}" for state, count in sorted(states.items()))
        return f"{held or 'none'} ({len(self.agent._punches)} punching sockets open)"

    def connector(self, paths: frozenset[PathKind]) -> Connector:
        return Connector(
            server_id=self.server_id,
            mediator=self.mediator,
            relays=(self.relay_url,),
            paths=paths,
            lan_group=self.lan_group,
            lan_interface=LOOPBACK,
            udp_host=LOOPBACK,
            deadline=5.0,
        )


async def echo(accepted: AcceptedStream) -> None:
    """The server's handler: every byte straight back, until the client closes."""
    with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, OSError):
        while True:
            await accepted.stream.send(await accepted.stream.receive())


async def timed_connect(connector: Connector, samples: Samples) -> None:
    """One connect, proven by a byte through the server and back; the stream closed."""
    with anyio.fail_after(STEP_TIMEOUT):
        start = time.perf_counter()
        try:
            connection: Connection = await connector.connect()
        except PathRaceError as exc:
            # Counted and shown, not hidden in the figures: a failed connect has no latency.
            failed_after = (time.perf_counter() - start) * 1e3
            why = "; ".join(f.describe() for f in exc.failures) or exc.reason
            samples.failures.append((failed_after, why))
            return
        took = time.perf_counter() - start
        async with connection.stream:
            await connection.stream.send(b"!")
            if await connection.stream.receive() != b"!":
                raise RuntimeError(f"{connection.target}: the echo came back wrong")
    samples.user.append(took * 1e3)
    samples.connector.append(connection.elapsed * 1e3)
    samples.winners[connection.path.value + (" (reused)" if connection.reused_hole else "")] += 1


async def run_row(
    world: World, row: str, count: int, *, gap: float = 0.0, stamped: bool = False
) -> Samples:
    """``count`` timed connects (after one untimed), ``gap`` seconds of idle loop before each."""
    samples = Samples(settled=await world.settle())
    # One untimed connect first: imports, first-use caches, the first hole for "reused".
    rounds = [(False, None)] + [(True, index) for index in range(count)]
    if row == "udp-reused":
        async with world.connector(frozenset({PathKind.UDP})) as client:
            for timed, _ in rounds:
                await anyio.sleep(gap)
                await _one(world, client, samples if timed else Samples(), stamped and timed)
        await anyio.sleep(0.1)
        samples.left_open = world.server_connections()
        return samples
    paths = ALL_PATHS if row == "auto" else frozenset({PathKind(row)})
    for timed, _ in rounds:
        await anyio.sleep(gap)
        async with world.connector(paths) as client:
            await _one(world, client, samples if timed else Samples(), stamped and timed)
    await anyio.sleep(0.1)
    samples.left_open = world.server_connections()
    return samples


async def _one(world: World, client: Connector, samples: Samples, stamped: bool) -> None:
    with anyio.fail_after(STEP_TIMEOUT):
        await world.agent.relay_agents[0].wait_for_idle(STANDBY)
    if stamped:
        with STAMPS.connect():
            await timed_connect(client, samples)
    else:
        await timed_connect(client, samples)
    if world.close_checkpoint:
        # Before a9ab22b, the stream's aclose() left UDT's Shutdown queued, and leaving
        # the Connector at once cancelled the punching socket's driver before it went
        # out (the agent held the connection ~10 s). Kept so old and new runs compare.
        await anyio.lowlevel.checkpoint()


async def floors(count: int) -> dict[str, Samples]:
    """What this loop needs for a bare TCP connect + 1-byte echo, and a UDP echo."""
    results = {"tcp": Samples(), "udp": Samples()}

    async def answer(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                while True:
                    await stream.send(await stream.receive())

    async with (
        await anyio.create_tcp_listener(local_host=LOOPBACK, local_port=0) as listener,
        await anyio.create_udp_socket(local_host=LOOPBACK) as server_udp,
        anyio.create_task_group() as group,
    ):
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        group.start_soon(listener.serve, answer)

        async def udp_echo() -> None:
            async for data, source in server_udp:
                await server_udp.send((data, source))

        group.start_soon(udp_echo)
        udp_port = server_udp.extra(anyio.abc.SocketAttribute.local_port)
        for _ in range(count):
            start = time.perf_counter()
            async with await anyio.connect_tcp(LOOPBACK, port) as stream:
                await stream.send(b"!")
                await stream.receive()
                results["tcp"].user.append((time.perf_counter() - start) * 1e3)
            async with await anyio.create_connected_udp_socket(LOOPBACK, udp_port) as udp:
                start = time.perf_counter()
                await udp.send(b"!")
                await udp.receive()
                results["udp"].user.append((time.perf_counter() - start) * 1e3)
        group.cancel_scope.cancel()
    return results


#: Rates no bench row reaches: every client here is 127.0.0.1, hundreds of times a second.
UNLIMITED_RATE, UNLIMITED_BURST = 1e6, 1_000_000


def lift_rate_limits() -> MediatorLimits:
    """The mediator's per-source limits, and the agent's LAN responder's, out of the way."""
    vars(agent_module)["DiscoveryResponder"] = functools.partial(
        DiscoveryResponder, per_source_rate=UNLIMITED_RATE, burst=UNLIMITED_BURST
    )
    return MediatorLimits(rate_limit_per_second=UNLIMITED_RATE, rate_limit_burst=UNLIMITED_BURST)


@contextlib.asynccontextmanager
async def world(
    *, default_limits: bool, close_checkpoint: bool = True, settle: float = SETTLE_TIMEOUT
) -> Any:
    """Relay, mediator, echo agent on loopback, ready (registered, standby pool full)."""
    limits = MediatorLimits() if default_limits else lift_rate_limits()
    system_id, server_id = uuid.uuid4(), uuid.uuid4()
    key = secrets.token_urlsafe(32)
    systems = {system_id: key}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((LOOPBACK, 0))
        lan_group = (DEFAULT_GROUP[0], int(probe.getsockname()[1]))
    async with anyio.create_task_group() as group:
        relay_bound = await group.start(RelayDaemon(RelayService(systems)).serve, LOOPBACK, 0)
        relay_url = f"http://{format_endpoint(relay_bound)}"
        service = MediatorService(
            systems=systems,
            relay_urls=(relay_url,),
            nonce_secret=secrets.token_bytes(32),
            limits=limits,
        )
        mediator = await group.start(MediatorDaemon(service).serve, LOOPBACK, 0)
        agent = ServerAgent(
            system_id=system_id,
            server_id=server_id,
            key=key,
            mediator=mediator,
            relays=(relay_url,),
            tcp_listen=(LOOPBACK, 0),
            udp_host=LOOPBACK,
            lan_group=lan_group,
            lan_interfaces=(LOOPBACK,),
            standby_count=STANDBY,
            hole_linger=SERVER_HOLE_LINGER,
            max_punch_sockets=1024,
        )
        await group.start(agent.serve, echo)
        with anyio.fail_after(STEP_TIMEOUT):
            assert agent.listener is not None
            await agent.listener.wait_registered()
            await agent.relay_agents[0].wait_for_idle(STANDBY)
        yield World(server_id, mediator, relay_url, lan_group, agent, close_checkpoint, settle)
        group.cancel_scope.cancel()


#: The rows that leave rendezvous behind (tcp, auto) come last: fewer waits to settle.
ROWS = ("lan", "udp", "udp-reused", "relay", "tcp", "auto")
TARGETS = {
    "tcp": TARGET_DIRECT_P50_MS,
    "relay": TARGET_DIRECT_P50_MS,
    "udp": TARGET_UDT_P50_MS,
    "udp-reused": TARGET_UDT_P50_MS,
}


@dataclass(frozen=True, kw_only=True)
class Options:
    connects: int
    paced: int
    gap: float
    breakdown: int
    default_limits: bool
    close_checkpoint: bool
    settle: float


def paced_name(row: str, gap: float) -> str:
    return f"{row}, {gap * 1000:g} ms idle before"


async def wavesync_rows(options: Options) -> tuple[dict[str, Samples], list[str]]:
    results: dict[str, Samples] = {}
    report: list[str] = []
    async with world(
        default_limits=options.default_limits,
        close_checkpoint=options.close_checkpoint,
        settle=options.settle,
    ) as bench_world:
        for row in ROWS:
            results[row] = await run_row(bench_world, row, options.connects)
        if options.paced:
            for row in ROWS:
                name = paced_name(row, options.gap)
                results[name] = await run_row(bench_world, row, options.paced, gap=options.gap)
        floor = await floors(options.connects)
        results.update({f"floor: {kind}": samples for kind, samples in floor.items()})
        if options.breakdown:
            install_stamps()
            gaps = (0.0, options.gap) if options.paced else (0.0,)
            for row in ROWS[:-1]:
                for gap in gaps:
                    STAMPS.per_connect = []
                    samples = await run_row(
                        bench_world, row, options.breakdown, gap=gap, stamped=True
                    )
                    name = paced_name(row, gap) if gap else f"{row}, back to back"
                    report.append(
                        f"breakdown, {name}: {options.breakdown} stamped connects,"
                        f" p50 {percentile(samples.user, 0.5):.2f} ms (the wrappers add a little)"
                    )
                    report.append(
                        f"  {'step':48} {'count':>5} {'start':>8} {'took':>8} {'took p95':>8}"
                    )
                    report.extend(summarise_stamps(STAMPS.per_connect))
    return results, report


# --- aioice ------------------------------------------------------------------------------------


async def aioice_pairs(pairs: int, gap: float = 0.0) -> Samples:
    """Gather + connect of two local aioice agents on 127.0.0.1, ``pairs`` times."""
    import aioice  # noqa: PLC0415 - the reference, imported only where it runs
    import aioice.ice  # noqa: PLC0415

    def loopback_only(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [LOOPBACK]

    aioice.ice.get_host_addresses = loopback_only
    samples = Samples()
    for index in range(pairs + 1):  # the first pair is the untimed warm-up
        await asyncio.sleep(gap)
        controlling = aioice.Connection(ice_controlling=True, use_ipv6=False)
        controlled = aioice.Connection(ice_controlling=False, use_ipv6=False)
        start = time.perf_counter()
        await asyncio.gather(controlling.gather_candidates(), controlled.gather_candidates())
        for local, remote in ((controlling, controlled), (controlled, controlling)):
            local.remote_username = remote.local_username
            local.remote_password = remote.local_password
            for candidate in remote.local_candidates:
                await local.add_remote_candidate(candidate)
            await local.add_remote_candidate(None)
        await asyncio.wait_for(asyncio.gather(controlling.connect(), controlled.connect()), 10)
        took = time.perf_counter() - start
        await controlling.send(b"!")
        if await asyncio.wait_for(controlled.recv(), 10) != b"!":
            raise RuntimeError("aioice: the datagram came back wrong")
        await controlling.close()
        await controlled.close()
        if index:
            samples.user.append(took * 1e3)
    return samples


# --- the report --------------------------------------------------------------------------------


AIOICE = "aioice gather+connect"


def reference_p50(results: dict[str, Samples], name: str) -> float:
    """aioice's p50 run the same way as row ``name``: back to back, or after idle time."""
    _, comma, paced = name.partition(", ")
    return percentile(results[AIOICE + comma + paced if paced else AIOICE].user, 0.5)


def print_table(results: dict[str, Samples]) -> None:
    """The rows side by side, failures and what the agent still holds."""
    print(
        f"{'path, milliseconds':42} {'p50':>7} {'p95':>7} {'min':>7} {'max':>7}"
        f" {'elapsed p50':>11} {'aioice/p50':>10} {'failed':>6}  won by"
    )
    failed_lines: list[str] = []
    for name, samples in results.items():
        values = samples.user
        failed = len(samples.failures)
        if not values:
            print(f"{name:42} every connect failed ({failed})")
        else:
            marks = [percentile(values, 0.5), percentile(values, 0.95), min(values), max(values)]
            own = f"{percentile(samples.connector, 0.5):>11.2f}" if samples.connector else " " * 11
            winners = ", ".join(f"{k} {v}" for k, v in sorted(samples.winners.items()))
            print(
                f"{name:42}"
                + "".join(f" {mark:>7.2f}" for mark in marks)
                + f" {own} {reference_p50(results, name) / marks[0]:>10.1f} {failed:>6}"
                + f"  {winners}".rstrip()
            )
        reasons: dict[str, list[float]] = defaultdict(list)
        for after, why in samples.failures:
            reasons[why].append(after)
        failed_lines += [
            f"  {name}: {len(times)} x after {statistics.median(times):.0f} ms: {why}"
            for why, times in reasons.items()
        ]
    print(
        "\np50/p95/min/max: perf_counter around `await connector.connect()`, successful connects"
        " only; elapsed: the connector's own Connection.elapsed; failed: PathRaceError (listed"
        " below); floor rows: a bare TCP connect + 1-byte echo and a UDP echo on this loop"
        " (no wavesync); aioice: gather + connect of both agents\n"
    )
    print(
        "UDT connections the agent still held 0.1 s after each row (the next row waited"
        " until none was connecting; how long: 'waited'):"
    )
    for name, samples in results.items():
        if samples.left_open:
            print(f"  {name}: {samples.left_open}; waited {samples.settled:.1f} s before")
    print()
    if failed_lines:
        print("failed connects (the race's failures, and when the connect gave up):")
        print("\n".join(failed_lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--connects", type=int, default=200, help="timed connects per row")
    parser.add_argument("--pairs", type=int, default=0, help="aioice pairs (default: --connects)")
    parser.add_argument(
        "--paced", type=int, default=100, help="timed connects per row with idle time before"
    )
    parser.add_argument("--gap", type=float, default=0.1, help="seconds idle before those")
    parser.add_argument("--breakdown", type=int, default=50, help="stamped connects per path")
    parser.add_argument(
        "--default-limits",
        action="store_true",
        help="keep the mediator's and LAN responder's per-source rate limits",
    )
    parser.add_argument(
        "--no-close-checkpoint",
        action="store_true",
        help="leave each Connector right after closing its stream (loses UDT's Shutdown)",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=SETTLE_TIMEOUT,
        help="at most this many seconds before a row for the agent's leftover rendezvous to end",
    )
    parser.add_argument("--quick", action="store_true", help="tiny counts, for the smoke test")
    args = parser.parse_args()
    if args.quick:
        args.connects, args.paced, args.gap, args.breakdown, args.settle = 5, 3, 0.01, 3, 0.0
    pairs = args.pairs or args.connects
    print(
        f"wavesync {__version__} connect latency, Python {platform.python_version()},"
        f" anyio {importlib.metadata.version('anyio')} (asyncio),"
        f" aioice {importlib.metadata.version('aioice')},"
        f" {platform.system()} {platform.release()}, {os.cpu_count()} CPUs"
    )
    print("command: " + " ".join(["python", "bench/connect.py", *sys.argv[1:]]))
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(
        "setup: relay, mediator, echo server agent and client on one asyncio loop in this"
        f" process (pid {os.getpid()}), loopback; {args.connects} connects per row after one"
        " untimed; each proven by a 1-byte echo through the server, then closed"
    )
    limits = "defaults" if args.default_limits else "lifted (every client here is 127.0.0.1)"
    checkpoint = "no" if args.no_close_checkpoint else "yes (see --no-close-checkpoint)"
    print(
        f"mediator + LAN responder per-source rate limits: {limits}; one checkpoint between"
        f" closing the stream and leaving the Connector: {checkpoint}\n"
    )
    references = {AIOICE: asyncio.run(aioice_pairs(pairs))}
    if args.paced:
        paced = asyncio.run(aioice_pairs(args.paced, args.gap))
        references[paced_name(AIOICE, args.gap)] = paced
    options = Options(
        connects=args.connects,
        paced=args.paced,
        gap=args.gap,
        breakdown=args.breakdown,
        default_limits=args.default_limits,
        close_checkpoint=not args.no_close_checkpoint,
        settle=args.settle,
    )
    results, breakdown = anyio.run(wavesync_rows, options)
    results.update(references)
    print_table(results)
    if breakdown:
        print("where the time goes (ms since connect() began; c: client, s: server):")
        print("\n".join(breakdown) + "\n")
    verdicts = []
    for name in results:
        target = TARGETS.get(name.partition(",")[0])
        if target is None:
            continue
        if not results[name].user:
            verdicts.append(f"{name}: NOT met (no connect succeeded)")
            continue
        p50 = percentile(results[name].user, 0.5)
        ratio = reference_p50(results, name) / p50
        verdicts.append(
            f"{name}: p50 {p50:.2f} ≤ {target:g} ms {'met' if p50 <= target else 'NOT met'},"
            f" aioice/p50 {ratio:.1f} ≥ {TARGET_RATIO:g} "
            f"{'met' if ratio >= TARGET_RATIO else 'NOT met'}"
        )
    print(f"load average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print("targets:\n  " + "\n  ".join(verdicts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
