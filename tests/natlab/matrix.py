"""The NAT lab matrix: the real ``wavesync`` programs through real kernel NAT, cell by cell.

``python -m tests.natlab.matrix --runs 5`` builds one lab per cell (tests/natlab/topology.py),
starts the relay and the mediator (and squid, for proxy-only) in the public namespace and
``wavesync server`` in front of a 10 MB byte service on host A, then for every run starts a
fresh ``wavesync client`` on host B three times: racing every path (``auto``), racing with the
relay held back 100 ms, and with ``--path udp`` forced, so "does punching work through this
NAT" is answered apart from "who wins the race". Each run fetches the 10 MB through the client
and checks them byte-exact; the winning path and connect time come from the client's own log
line ("connected by PATH TARGET in X ms"). Every subprocess and every fetch has a hard
timeout, so no run can hang.

It prints the table and writes it, with the command that produced it, to docs/natlab.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.daemons import new_system
from tests.natlab.payload import SIZE
from tests.natlab.topology import PUBLIC, SQUID_PORT, Daemon, Lab, Nat, lab_unavailable, nat_lab
from tests.squid import PERMISSIVE, squid_binary

__all__ = ["CELLS", "Cell", "CellResult", "Outcome", "format_table", "run_cell"]

WAVESYNC = str(Path(sys.executable).parent / "wavesync")
PYTHON = sys.executable
SERVICE_PORT = 8080
RELAY_PORT = 7000
MEDIATOR_PORT = 3478
MEDIATOR_HTTP_PORT = 8081
SERVER_ID = "5e1f0000-0000-4000-8000-00000000aaaa"
#: The client's own bound on connecting (its --deadline); the fetch gets this plus the transfer.
CONNECT_DEADLINE = 10.0
FETCH_TIMEOUT = 60.0
#: Each run's clients: racing every path as shipped (a verified relay waits up to 100 ms
#: for a punch still under way: --relay-grace's default); racing with no grace (the first
#: path up wins); UDT punching alone.
MODES: dict[str, tuple[str, ...]] = {
    "auto": ("--path", "auto"),
    "auto, no relay grace": ("--path", "auto", "--relay-grace", "0"),
    "udp": ("--path", "udp"),
}
REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "natlab.md"

_CONNECTED = re.compile(r"connected by (\S+) (.*?) in ([\d.]+) ms")
_FAILED = re.compile(r"connect failed: (.*)")
_TUNNEL = re.compile(r"tunnel to (\S+) via \S+: (\S+)")


@dataclass(frozen=True, kw_only=True)
class Cell:
    """Server behind ``server_nat`` (host A), client behind ``client_nat`` (host B)."""

    name: str
    server_nat: Nat
    client_nat: Nat


CELLS = (
    Cell(name="cone<->cone", server_nat=Nat(kind="cone"), client_nat=Nat(kind="cone")),
    Cell(name="cone<->symmetric", server_nat=Nat(kind="cone"), client_nat=Nat(kind="symmetric")),
    Cell(
        name="symmetric<->symmetric",
        server_nat=Nat(kind="symmetric"),
        client_nat=Nat(kind="symmetric"),
    ),
    Cell(
        name="udp-blocked<->cone", server_nat=Nat(kind="udp-blocked"), client_nat=Nat(kind="cone")
    ),
    Cell(name="proxy-only<->cone", server_nat=Nat(kind="proxy-only"), client_nat=Nat(kind="cone")),
    Cell(
        name="cone<->cone 10% loss",
        server_nat=Nat(kind="cone", loss=0.1),
        client_nat=Nat(kind="cone"),
    ),
)


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """One client run: connected or not, by which path, how fast, and the transfer's check."""

    cell: str
    mode: str
    run: int
    connected: bool
    path: str | None
    target: str
    connect_ms: float | None
    exact: bool
    received: int
    seconds: float
    failure: str


@dataclass(frozen=True, kw_only=True)
class CellResult:
    """A cell's runs, and the HTTP tunnels the server opened (target -> methods, in order)."""

    cell: Cell
    outcomes: list[Outcome]
    server_tunnels: dict[str, list[str]]


def _server_args(cell: Cell) -> list[str]:
    relay = f"http://{PUBLIC}:{RELAY_PORT}"
    args = ["--mediator", PUBLIC, "--relay", relay]
    if cell.server_nat.kind == "proxy-only":
        args += [
            "--tunnel",
            "auto",
            "--proxy",
            f"http://{PUBLIC}:{SQUID_PORT}",
            "--mediator-http",
            f"{PUBLIC}:{MEDIATOR_HTTP_PORT}",
        ]
    return args


def _start_public(lab: Lab, systems: Path, cell: Cell) -> None:
    lab.spawn(
        lab.pub,
        [WAVESYNC, "relay", "--listen", f"0.0.0.0:{RELAY_PORT}", "--systems", str(systems)],
        name="relay",
        ready=r"relay listening on tcp",
    )
    lab.spawn(
        lab.pub,
        [
            WAVESYNC,
            "mediator",
            "--listen",
            f"0.0.0.0:{MEDIATOR_PORT}",
            "--systems",
            str(systems),
            "--relay-url",
            f"http://{PUBLIC}:{RELAY_PORT}",
            "--http",
            f"0.0.0.0:{MEDIATOR_HTTP_PORT}",
        ],
        name="mediator",
        ready=r"mediator listening on udp\+tcp",
    )
    if cell.server_nat.kind == "proxy-only":
        _start_squid(lab)


def _start_squid(lab: Lab) -> None:
    binary = squid_binary()
    if binary is None:
        raise RuntimeError("squid is not installed (apt-get install squid)")
    config = lab.folder / "squid.conf"
    # The hosts reach squid masqueraded as their router's WAN address: allow the lab's
    # public range, then the permissive rules of tests/squid.py (CONNECT to any port).
    config.write_text(
        f"http_port 0.0.0.0:{SQUID_PORT}\ncache deny all\ncache_mem 0 MB\naccess_log none\n"
        "cache_log /dev/stderr\npid_filename none\npinger_enable off\n"
        "shutdown_lifetime 0 seconds\nacl natlab src 203.0.113.0/24\nhttp_access allow natlab\n"
        + PERMISSIVE,
        encoding="utf-8",
    )
    lab.spawn(
        lab.pub,
        [binary, "-N", "-n", f"{lab.prefix}squid", "-f", str(config)],
        name="squid",
        ready=r"Accepting HTTP Socket connections",
        ready_on_stderr=True,
    )


def _start_server(lab: Lab, system_id: str, key: str, cell: Cell) -> Daemon:
    host = lab.left.host
    lab.spawn(
        host,
        [PYTHON, "-m", "tests.natlab.payload", "serve", str(SERVICE_PORT)],
        name="service",
        ready=r"serving",
    )
    return lab.spawn(
        host,
        [
            WAVESYNC,
            "--log-level",
            "info",
            "server",
            "--system-id",
            system_id,
            f"--key={key}",
            "--server-id",
            SERVER_ID,
            *_server_args(cell),
            "--forward",
            f"127.0.0.1:{SERVICE_PORT}",
        ],
        name="server",
        ready=r"server \S+ of system \S+ accepting on tcp",
        timeout=30.0,
    )


def _one_client(
    lab: Lab, cell: Cell, mode: str, *, run: int, port: int, deadline: float
) -> Outcome:
    relay = f"http://{lab.right.pub_address}:{RELAY_PORT}"
    client = lab.spawn(
        lab.right.host,
        [
            WAVESYNC,
            "--log-level",
            "info",
            "client",
            "--server-id",
            SERVER_ID,
            "--mediator",
            lab.right.pub_address,
            "--relay",
            relay,
            "--listen",
            f"127.0.0.1:{port}",
            *MODES[mode],
            "--deadline",
            f"{deadline:g}",
        ],
        name=f"client-{mode.split(',', maxsplit=1)[0]}{len(mode)}-{run}",
        ready=r"client listening on tcp",
    )
    fetch: dict[str, object] = {"received": 0, "exact": False, "seconds": 0.0, "error": ""}
    try:
        done = lab.run(
            lab.right.host,
            PYTHON,
            "-m",
            "tests.natlab.payload",
            "fetch",
            str(port),
            f"{FETCH_TIMEOUT:g}",
            timeout=FETCH_TIMEOUT + deadline + 10,
        )
        fetch = json.loads(done.stdout.strip().splitlines()[-1])
    except (RuntimeError, subprocess.TimeoutExpired, ValueError, IndexError) as exc:
        fetch["error"] = f"fetch: {exc}"
    finally:
        lab.stop(client)
    log = client.stderr_text()
    won = _CONNECTED.search(log)
    failed = _FAILED.search(log)
    failure = str(fetch["error"])
    if won is None:
        failure = (failed.group(1) if failed else "no connect line in the client log") + (
            f"; {failure}" if failure else ""
        )
        # The race's own account of every path, for the report (its indented lines).
        details = list(
            dict.fromkeys(line.strip() for line in log.splitlines() if line.startswith("  "))
        )
        failure += "".join(f" | {line}" for line in details[:6])
    received = fetch["received"]
    seconds = fetch["seconds"]
    return Outcome(
        cell=cell.name,
        mode=mode,
        run=run,
        connected=won is not None,
        path=won.group(1) if won else None,
        target=won.group(2) if won else "",
        connect_ms=float(won.group(3)) if won else None,
        exact=fetch["exact"] is True,
        received=received if isinstance(received, int) else 0,
        seconds=float(seconds) if isinstance(seconds, (int, float)) else 0.0,
        failure=failure,
    )


def run_cell(
    cell: Cell,
    runs: int,
    folder: Path,
    *,
    modes: Sequence[str] = tuple(MODES),
    deadline: float = CONNECT_DEADLINE,
    report: Callable[[Outcome], None] | None = None,
) -> CellResult:
    """Build ``cell``'s lab, run ``runs`` fresh clients per mode, tear the lab down."""
    folder.mkdir(parents=True, exist_ok=True)
    systems, system_id, key = new_system(folder)
    outcomes: list[Outcome] = []
    with nat_lab(folder / "lab", cell.server_nat, cell.client_nat) as lab:
        _start_public(lab, systems, cell)
        server = _start_server(lab, str(system_id), key, cell)
        port = 9000
        for run in range(1, runs + 1):
            for mode in modes:
                outcome = _one_client(lab, cell, mode, run=run, port=port, deadline=deadline)
                port += 1
                outcomes.append(outcome)
                if report is not None:
                    report(outcome)
        lab.stop(server)
        tunnels: dict[str, list[str]] = {}
        for target, method in _TUNNEL.findall(server.stderr_text()):
            tunnels.setdefault(target, []).append(method)
    return CellResult(cell=cell, outcomes=outcomes, server_tunnels=tunnels)


def _p50(values: list[float], digits: int = 1) -> str:
    return f"{statistics.median(values):.{digits}f}" if values else "-"


def format_table(outcomes: Sequence[Outcome]) -> str:
    """One Markdown row per cell and mode: counts, winning paths, p50 connect and transfer."""
    rows = [
        "| cell | mode | connected | 10 MB byte-exact | winning paths | connect p50 (ms) "
        "| 10 MB fetch p50 (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    keys = list(dict.fromkeys((outcome.cell, outcome.mode) for outcome in outcomes))
    for cell, mode in keys:
        group = [o for o in outcomes if (o.cell, o.mode) == (cell, mode)]
        paths = Counter(o.path or "none" for o in group)
        winners = ", ".join(f"{path} {count}" for path, count in paths.most_common())
        connect = [o.connect_ms for o in group if o.connect_ms is not None]
        fetched = [o.seconds for o in group if o.exact]
        rows.append(
            f"| {cell} | {mode} | {sum(o.connected for o in group)}/{len(group)}"
            f" | {sum(o.exact for o in group)}/{len(group)} | {winners}"
            f" | {_p50(connect)} | {_p50(fetched, 2)} |"
        )
    return "\n".join(rows)


def _failures(outcomes: Sequence[Outcome]) -> str:
    """Per cell and mode: how many runs failed, and the first one's account."""
    failed: dict[tuple[str, str], list[Outcome]] = {}
    for outcome in outcomes:
        if not (outcome.connected and outcome.exact):
            failed.setdefault((outcome.cell, outcome.mode), []).append(outcome)
    lines = [
        f"- {cell} {mode}: {len(group)} run(s), e.g. run {group[0].run}:"
        f" {group[0].failure or 'not byte-exact'} ({group[0].received} of {SIZE} bytes)"
        for (cell, mode), group in failed.items()
    ]
    return "\n".join(lines) or "- none"


def _commit() -> str:
    git = shutil.which("git") or "/usr/bin/git"
    done = subprocess.run(  # noqa: S603 - git, to stamp the table with what it measured
        [git, "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    dirty = subprocess.run(  # noqa: S603
        [git, "status", "--porcelain", "--", "src"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    return done.stdout.strip() + (" (with uncommitted changes under src/)" if dirty.stdout else "")


def _describe_tunnels(result: CellResult) -> str:
    """``203.0.113.1:7000 by websocket 1, upgrade 7``: what the server's sessions rode."""
    return "; ".join(
        f"{target} by " + ", ".join(f"{m} {n}" for m, n in Counter(methods).items())
        for target, methods in result.server_tunnels.items()
    )


def write_doc(
    outcomes: Sequence[Outcome], tunnels: Sequence[str], command: str, seconds: float
) -> str:
    header = DOC.read_text(encoding="utf-8").split(_GENERATED)[0] if DOC.exists() else _PREAMBLE
    body = (
        f"{_GENERATED}\n\n"
        f"Command: `{command}` (as root), at commit {_commit()}, Linux {platform.release()},"
        f" {seconds:.0f} s in all.\n\n"
        f"{format_table(outcomes)}\n\n"
        "The server's HTTP tunnels (target, method the probe chose, sessions opened):\n\n"
        + ("\n".join(tunnels) or "- none")
        + "\n\nRuns that did not connect or were not byte-exact:\n\n"
        f"{_failures(outcomes)}\n"
    )
    DOC.write_text(header.rstrip("\n") + "\n\n" + body, encoding="utf-8")
    return body


_GENERATED = "## Results (generated by tests/natlab/matrix.py; everything below is rewritten)"
_PREAMBLE = "# The NAT lab\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.natlab.matrix", description=__doc__)
    parser.add_argument("--runs", type=int, default=5, help="fresh clients per cell and mode")
    parser.add_argument("--cell", action="append", help="only these cells (by name, repeatable)")
    parser.add_argument("--no-doc", action="store_true", help="print only; leave docs/natlab.md")
    parser.add_argument("--keep", type=Path, help="keep every program's logs in this folder")
    args = parser.parse_args(argv)
    # A SIGTERM (a CI timeout, kill) unwinds like Ctrl-C, so every lab is still torn down.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    reason = lab_unavailable()
    if reason is not None:
        print(f"natlab: skipped: {reason}", file=sys.stderr)
        return 2
    cells = [cell for cell in CELLS if not args.cell or cell.name in args.cell]
    started = time.monotonic()
    outcomes: list[Outcome] = []
    tunnels: list[str] = []

    def report(outcome: Outcome) -> None:
        where = f"{outcome.path} {outcome.target}" if outcome.connected else outcome.failure
        print(
            f"{outcome.cell} {outcome.mode} #{outcome.run}: connected={outcome.connected}"
            f" exact={outcome.exact} {outcome.connect_ms} ms {outcome.seconds} s {where}",
            flush=True,
        )

    with tempfile.TemporaryDirectory(prefix="natlab") as scratch:
        logs = args.keep or Path(scratch)
        for index, cell in enumerate(cells):
            result = run_cell(cell, args.runs, logs / f"cell{index}", report=report)
            outcomes += result.outcomes
            tunnels += (
                [f"- {cell.name}: {_describe_tunnels(result)}"] if result.server_tunnels else []
            )
    command = "python -m tests.natlab.matrix " + " ".join(sys.argv[1:] if argv is None else argv)
    table = format_table(outcomes)
    print(table)
    print("\n".join(tunnels))
    if not args.no_doc:
        write_doc(outcomes, tunnels, command.strip(), time.monotonic() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
