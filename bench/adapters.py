"""The four runtimes side by side: UDT goodput, relay throughput, connect latency (issue 8).

Issue 8 target: the blocking and asyncio adapters within 20 % of the fastest adapter.
One run measures, for each adapter: anyio on asyncio, anyio on trio, asyncio (the
plain-asyncio twins) and blocking (sockets and threads):

1. UDT goodput: a receiver process and a sender process (this script as ``--child
   udt-recv|udt-send ADAPTER``), each on that adapter's own ``UdtEndpoint``, a
   regular connect on 127.0.0.1; the sender makes ``--udt-mb`` MB in memory (one
   seeded 1 MiB block, repeated) and closes gracefully; the receiver hashes what it
   gets (SHA-256, checked) and times it from its first chunk to its last, as
   bench/udt.py does.
2. Relay throughput: one ``wavesync relay --adapter X`` process per adapter (all four
   up for the stage); the SAME sender and sink (bench/relay.py's ``transfer_relay``:
   blocking sockets in this process, a standby connection, a paired client) move
   ``--relay-mib`` MiB through each, so only the relay differs. The relay process's
   CPU seconds per GB moved are printed next to it.
3. Connect latency: an anyio (asyncio) world in its own process (bench/connect.py's
   ``world``: relay, mediator and an echo ``ServerAgent``, all anyio, rate limits
   lifted); per adapter and path (tcp, udp, relay) a client process runs that
   adapter's ``Connector`` with the path forced, a NEW Connector per connect (so udp
   punches afresh every time), one untimed connect then ``--connects`` timed ones,
   each proven by a 1-byte echo through the server. The clock is ``perf_counter``
   around ``connect()``. The server side is the same for every adapter: only the
   client's runtime differs.

Rounds are interleaved: each round runs every adapter once per measure, the adapters'
order rotating from round to round, so machine noise falls on all of them alike.
Figures are medians over rounds (latency: p50/p90 over every timed connect). "vs best"
is how many times slower than the fastest adapter of that column (1.00: the fastest;
for a rate, best/rate; for a latency, latency/best); a figure more than 20 % slower is
flagged "SLOW". A second table gives what other load disturbs least: CPU time (UDT:
both processes per GB; the relay process per GB; the client per connect) and the
client's context switches per connect (getrusage), which tell an adapter's own cost
from time spent waiting for a core.

    python bench/adapters.py [--rounds R] [--udt-mb N] [--relay-mib N] [--connects C]
                             [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import selectors
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import relay as relay_bench
from adapters_children import (
    ADAPTERS,
    CHUNK,
    LOOPBACK,
    MB,
    PATHS,
    STEP_TIMEOUT,
    TARGET_SLOWDOWN,
    Latencies,
    child,
    payload_digest,
)
from connect_stamps import percentile
from wavesync_proto import __version__
from wavesync_proto.mediator.systems import format_system_entry


def this_script(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", *args]


def first_line(process: subprocess.Popen[str], timeout: float) -> str:
    """The child's first stdout line, within ``timeout`` seconds."""
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise TimeoutError(f"{process.args!r} printed nothing in {timeout:g} s")
    return process.stdout.readline()


def stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(10)
    for pipe in (process.stdout, process.stdin):
        if pipe is not None:
            pipe.close()


def udt_transfer(adapter: str, total: int, digest: str, workdir: Path) -> tuple[float, float]:
    """One UDT transfer between two processes of ``adapter``: MB/s at the receiver, and
    CPU seconds per GB of both processes (from the endpoint's start to the end)."""
    log = workdir / "udt-stderr.log"
    with log.open("w") as errors:
        receiver = subprocess.Popen(  # noqa: S603 - this script
            this_script("udt-recv", adapter), stdout=subprocess.PIPE, stderr=errors, text=True
        )
        sender = None
        try:
            port = first_line(receiver, 60).removeprefix("port ").strip()
            sender = subprocess.Popen(  # noqa: S603 - this script
                this_script("udt-send", adapter, port, str(total)),
                stdout=subprocess.PIPE,
                stderr=errors,
                text=True,
            )
            out, _ = receiver.communicate(timeout=STEP_TIMEOUT)
            sent_out, _ = sender.communicate(timeout=60)
            sent = sender.returncode
        finally:
            stop(receiver)
            if sender is not None:
                stop(sender)
    if receiver.returncode != 0 or sent != 0:
        raise RuntimeError(f"{adapter} UDT: exit {receiver.returncode}/{sent}: {log.read_text()}")
    result = json.loads(out)
    if result["size"] != total or result["sha256"] != digest:
        raise RuntimeError(f"{adapter} UDT: stream differs ({result['size']} of {total} bytes)")
    cpu = float(result["cpu"]) + float(json.loads(sent_out)["cpu"])
    return float(result["rate"]), cpu / (total / 1e9)


@contextlib.contextmanager
def relay_process(workdir: Path, system: relay_bench.System, adapter: str) -> Iterator[Any]:
    """``wavesync relay --adapter X`` on a free loopback port (bench/relay.py's, + adapter)."""
    systems = workdir / "systems.toml"
    systems.write_text(format_system_entry(system.system_id, system.key, "bench"))
    stderr_path = workdir / f"relay-{adapter}.log"
    command = [sys.executable, "-m", "wavesync_adapters.cli", "relay", "--adapter"]
    command += [ADAPTERS[adapter], "--listen", f"{LOOPBACK}:0", "--systems", str(systems)]
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(  # noqa: S603 - our own package
            command, stdout=subprocess.PIPE, stderr=stderr, text=True
        )
    try:
        line = first_line(process, 60)
        prefix = "relay listening on tcp "
        if not line.startswith(prefix):
            raise RuntimeError(f"{adapter} relay did not start: {line!r} {stderr_path.read_text()}")
        host, _, port = line[len(prefix) :].strip().rpartition(":")
        yield relay_bench.Relay(process, (host, int(port)), stderr_path)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


@contextlib.contextmanager
def world_process(workdir: Path) -> Iterator[dict[str, Any]]:
    """The anyio relay, mediator and echo ServerAgent in one process; their addresses."""
    log = workdir / "world.log"
    with log.open("w") as errors:
        process = subprocess.Popen(  # noqa: S603 - this script
            this_script("world"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
        )
    try:
        line = first_line(process, 60)
        if not line.strip():
            raise RuntimeError(f"the world did not start: {log.read_text()[-3000:]}")
        yield json.loads(line)
    finally:
        assert process.stdin is not None
        process.stdin.close()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def client_connects(adapter: str, path: str, count: int, info: dict[str, Any]) -> Latencies:
    result = subprocess.run(  # noqa: S603 - this script
        this_script("connect", adapter, path, str(count), json.dumps(info)),
        capture_output=True,
        text=True,
        timeout=STEP_TIMEOUT,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{adapter} {path} client: {result.stderr[-3000:]}")
    data = json.loads(result.stdout.strip().splitlines()[-1])
    return Latencies(**data)


def rotated(round_number: int) -> list[str]:
    names = list(ADAPTERS)
    shift = round_number % len(names)
    return names[shift:] + names[:shift]


@dataclass
class Results:
    udt: dict[str, list[float]] = field(default_factory=lambda: {a: [] for a in ADAPTERS})
    relay: dict[str, list[float]] = field(default_factory=lambda: {a: [] for a in ADAPTERS})
    relay_cpu: dict[str, list[float]] = field(default_factory=lambda: {a: [] for a in ADAPTERS})
    udt_cpu: dict[str, list[float]] = field(default_factory=lambda: {a: [] for a in ADAPTERS})
    connect: dict[tuple[str, str], Latencies] = field(
        default_factory=lambda: {(a, p): Latencies() for a in ADAPTERS for p in PATHS}
    )
    errors: list[str] = field(default_factory=list)


def measure(args: argparse.Namespace, workdir: Path) -> Results:
    results = Results()
    udt_total, relay_total = int(args.udt_mb * MB), args.relay_mib * 2**20
    digest = payload_digest(udt_total)
    system = relay_bench.System()
    with contextlib.ExitStack() as stack:
        relays = {a: stack.enter_context(relay_process(workdir, system, a)) for a in ADAPTERS}
        info = stack.enter_context(world_process(workdir))
        for name, relay in relays.items():  # warm-up: a small transfer through each relay
            relay_bench.transfer_relay(min(relay_total, 16 * CHUNK), relay, system)
            client_connects(name, "tcp", 1, info)
        for round_number in range(args.rounds):
            order = rotated(round_number)
            print(f"round {round_number + 1}/{args.rounds}: {', '.join(order)}", file=sys.stderr)
            for adapter in order:
                try:
                    rate, cpu = udt_transfer(adapter, udt_total, digest, workdir)
                except (RuntimeError, TimeoutError, subprocess.TimeoutExpired) as exc:
                    results.errors.append(f"UDT {adapter}: {exc}")
                    continue
                results.udt[adapter].append(rate)
                results.udt_cpu[adapter].append(cpu)
            for adapter in order:
                relay = relays[adapter]
                cpu_before = relay_bench.cpu_seconds(relay.process.pid)
                seconds = relay_bench.transfer_relay(relay_total, relay, system)
                cpu = relay_bench.cpu_seconds(relay.process.pid) - cpu_before
                results.relay[adapter].append(relay_total / seconds / MB)
                results.relay_cpu[adapter].append(cpu / (relay_total / 1e9))
                relay.check_alive()
            for path in PATHS:
                for adapter in order:
                    try:
                        got = client_connects(adapter, path, args.connects, info)
                    except (RuntimeError, subprocess.TimeoutExpired) as exc:
                        results.errors.append(f"connect {adapter} {path}: {exc}")
                        continue
                    results.connect[adapter, path].ms.extend(got.ms)
                    results.connect[adapter, path].failures.extend(got.failures)
                    results.connect[adapter, path].cpu_ms.extend(got.cpu_ms)
                    results.connect[adapter, path].switches.extend(got.switches)
    return results


# --- the report -------------------------------------------------------------------------


def slowdowns(values: dict[str, float | None], higher_is_better: bool) -> dict[str, float | None]:
    """How many times slower than the best adapter each one is (1.0: the best)."""
    known = [v for v in values.values() if v]
    if not known:
        return dict.fromkeys(values)
    best = max(known) if higher_is_better else min(known)
    return {
        name: None if not value else (best / value if higher_is_better else value / best)
        for name, value in values.items()
    }


def cell(value: float | None, slowdown: float | None, digits: int) -> str:
    if value is None or slowdown is None:
        return f"{'-':>8} {'':>10}"
    flag = " SLOW" if slowdown > TARGET_SLOWDOWN else ""
    return f"{value:>8.{digits}f} {f'{slowdown:.2f}{flag}':>10}"


Column = tuple[dict[str, float | None], bool, int]


def print_rows(title: str, columns: dict[str, Column]) -> list[str]:
    """Rows of figures, adapters side by side, each against the best; the misses."""
    print(title)
    print(f"{'measure':32}" + "".join(f" {a:>19}" for a in ADAPTERS))
    print(f"{'':32}" + f" {'value':>8} {'vs best':>10}" * len(ADAPTERS))
    misses = []
    for name, (values, higher, digits) in columns.items():
        slower = slowdowns(values, higher)
        print(f"{name:32}" + "".join(" " + cell(values[a], slower[a], digits) for a in ADAPTERS))
        misses += [
            f"{a}: {name} {slower[a]:.2f} x the fastest"
            for a in ADAPTERS
            if (slower[a] or 0) > TARGET_SLOWDOWN
        ]
    return misses


def report(results: Results, args: argparse.Namespace) -> list[str]:
    """Print the table (one row per measure, adapters side by side); the misses."""
    columns: dict[str, Column] = {
        f"UDT goodput, {args.udt_mb:g} MB, MB/s": (
            {a: statistics.median(r) if r else None for a, r in results.udt.items()},
            True,
            1,
        ),
        f"relay throughput, {args.relay_mib} MiB, MB/s": (
            {a: statistics.median(r) if r else None for a, r in results.relay.items()},
            True,
            1,
        ),
    }
    for path in PATHS:
        for mark, q in (("p50", 0.5), ("p90", 0.9)):
            values = {
                a: percentile(results.connect[a, path].ms, q)
                if results.connect[a, path].ms
                else None
                for a in ADAPTERS
            }
            columns[f"connect {path} {mark}, ms"] = (values, False, 2)
    misses = print_rows("wall clock (the target)", columns)
    medians = {a: statistics.median(c) if c else None for a, c in results.udt_cpu.items()}
    costs = {"UDT, both processes, s per GB": (medians, False, 2)}
    medians = {a: statistics.median(c) if c else None for a, c in results.relay_cpu.items()}
    costs["relay process, s per GB"] = (medians, False, 2)
    for path in PATHS:
        cpu = {a: results.connect[a, path].cpu_ms for a in ADAPTERS}
        medians = {a: statistics.median(c) if c else None for a, c in cpu.items()}
        costs[f"client per {path} connect, ms"] = (medians, False, 2)
    for path in PATHS:
        switches = {a: results.connect[a, path].switches for a in ADAPTERS}
        medians = {a: statistics.median(c) if c else None for a, c in switches.items()}
        costs[f"switches per {path} connect"] = (medians, False, 1)
    print()
    title = "CPU time (user + system) and context switches of every thread; less disturbed by load"
    print_rows(title, costs)
    print("\nevery run (UDT and relay: MB/s per round; connect: timed connects, failures):")
    for adapter in ADAPTERS:
        udt = ", ".join(f"{r:.1f}" for r in results.udt[adapter])
        relay = ", ".join(f"{r:.1f}" for r in results.relay[adapter])
        counts = ", ".join(
            f"{p} {len(results.connect[adapter, p].ms)}/{len(results.connect[adapter, p].failures)}"
            for p in PATHS
        )
        print(f"  {adapter:14} UDT [{udt}]  relay [{relay}]  connects ok/failed: {counts}")
        for path in PATHS:
            for failure in sorted(set(results.connect[adapter, path].failures))[:3]:
                print(f"    {path} failed: {failure[:200]}")
    for error in results.errors:
        print(f"  ERROR {error[:600]}")
    return misses


def loadavg() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2:])
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--udt-mb", type=float, default=100, help="MB per UDT transfer")
    parser.add_argument("--relay-mib", type=int, default=200, help="MiB per relay transfer")
    parser.add_argument("--connects", type=int, default=30, help="timed connects per client")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.udt_mb, args.relay_mib, args.connects = 1, 2, 4, 2
    print(
        f"wavesync {__version__} adapters, Python {platform.python_version()},"
        f" anyio {importlib.metadata.version('anyio')}, trio {importlib.metadata.version('trio')},"
        f" {platform.system()} {platform.release()}, {os.cpu_count()} CPUs"
    )
    print("command: " + " ".join(["python", "bench/adapters.py", *sys.argv[1:]]))
    print(f"load average at start: {loadavg()}")
    print(
        f"{args.rounds} round(s), interleaved, adapters' order rotating; UDT: two processes"
        " of the adapter; relay: `wavesync relay --adapter X`, bench/relay.py's sender and"
        f" sink; connect: the adapter's Connector, {args.connects} timed connects per round"
        " and path, against an anyio (asyncio) relay + mediator + echo ServerAgent process\n"
    )
    relay_bench.raise_fd_limit()
    with tempfile.TemporaryDirectory(prefix="wavesync-adapters-bench-") as folder:
        results = measure(args, Path(folder))
    misses = report(results, args)
    print(f"\nload average at the end: {loadavg()}")
    target = "met" if not misses and not results.errors else "NOT met"
    print(
        f"targets: every adapter within {TARGET_SLOWDOWN - 1:.0%} of the fastest: {target}"
        + "".join(f"\n  {miss}" for miss in misses)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
