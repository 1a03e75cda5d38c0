"""UDT: loopback bulk goodput of wavesync-UDT, plain TCP, aioquic and libudt 4.11, side by side.

Issue 4 targets: wavesync-UDT ≥ 3 x aioquic (one stream); the ratio to libudt reported
honestly; under 5 % loss, goodput above half the lossless figure. Every row is a
netcat: a receiver process that writes the stream to its stdout and a sender process
that reads ``--bytes`` from a file on its stdin, both started by this script, so every
row pays the same pipes:

- plain TCP: asyncio streams (this script as ``--child tcp-recv`` / ``tcp-send``);
- aioquic: one bidirectional stream, default configuration (congestion control,
  1 MiB flow-control windows), a self-signed P-256 certificate made at run time
  (``--child quic-recv`` / ``quic-send``);
- libudt 4.11: ``udt_peer`` (tests/interop/udt_peer.cpp, built here with g++) in
  stdin/stdout mode, a regular connect, and a rendezvous connect with and without a
  sleep between ``connect()`` and the first ``send()`` (the issue's "first packet lost,
  then crawls");
- wavesync-UDT: ``wavesync udt recv|send``, regular and rendezvous (see
  ``wavesync_commands``); "not available" while that command does not run.

The clock runs from the first byte the receiver writes to its stdout until that pipe's
end, so process start, the handshake and the rendezvous sleep are not in the figure;
the stream is checked (length and SHA-256) every time. Each row runs ``--rounds``
times, interleaved, and every run is printed.

Loss (``--loss P``, default 0.05; 0 leaves the rows out): this kernel has no netem,
so the "P loss" rows (libudt and wavesync-UDT, regular connect) drop datagrams with
iptables' ``statistic`` match: for the transfer's receiver port R, two rules in
INPUT on ``lo`` drop each UDP datagram to R (data) and from R (ACK, NAK, ...) with
probability P. They are inserted just before that transfer and deleted right after
it, in ``finally`` (Ctrl-C and SIGTERM included: SIGTERM is turned into SystemExit);
no other port or interface is touched. The rows are skipped, saying why, without
root or without iptables. ``--quick`` leaves them out unless ``--loss`` is given.
wavesync's loss row moves ``--bytes``, as its lossless row does (the target compares
the two); libudt's moves ``--loss-bytes`` (10 MB): it crawls under loss.

    python bench/udt.py [--bytes N] [--rounds R] [--loss P] [--loss-bytes N] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import os
import platform
import re
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.interop.libudt import (
    LibudtUnavailableError,
    build_udt_peer,
    default_cache_dir,
    stream,
)

from loopback_loss import free_port, loss_unavailable, packet_loss
from udt_children import CHUNK, LOOPBACK, child, self_signed, uvloop_missing
from wavesync_proto import __version__

MB = 1e6
SEED = 4
#: How long one transfer may take before it is reported as failed.
TRANSFER_TIMEOUT = 300.0
#: The rendezvous row "with sleep": what the application sleeps after connect().
RENDEZVOUS_SLEEP_MS = 500
TARGET_VS_AIOQUIC = 3.0
#: Under loss, goodput stays above this share of the lossless figure.
TARGET_UNDER_LOSS = 0.5
DEFAULT_LOSS = 0.05
#: Bytes per transfer of libudt's loss row: it does well under 1 MB/s at 5 % loss here.
#: wavesync's loss row moves ``--bytes``, as its lossless row does: the target compares
#: the two, and a ramp-up weighs more in a shorter transfer (20 MB lossless ran at 150-165
#: MB/s against 245 for 100 MB, which made 5 % loss at 20 MB look like 0.42 x).
DEFAULT_LOSS_BYTES = 10_000_000
#: The first line of udt_peer's stdout is its port; the stream follows.
FIRST_LINE = "first stdout line"


# --- one netcat transfer ---------------------------------------------------------------


@dataclass
class Run:
    """One transfer: its goodput, or why there is none."""

    rate: float | None = None
    error: str | None = None


@dataclass
class Row:
    name: str
    runs: list[Run] = field(default_factory=list)
    #: Set when the row cannot run at all (missing tool): printed instead of figures.
    unavailable: str | None = None
    #: The share of UDP datagrams dropped on the transfer's ports (0: none).
    loss: float = 0.0
    #: Moves ``--loss-bytes`` instead of ``--bytes`` (a row that crawls under loss).
    short: bool = False

    @property
    def rates(self) -> list[float]:
        return [run.rate for run in self.runs if run.rate is not None]

    @property
    def median(self) -> float | None:
        return statistics.median(self.rates) if self.rates else None


@dataclass
class Netcat:
    """A receiver and a sender command; ``ready`` says when the sender may start: a regex
    the receiver prints on stderr, ``FIRST_LINE`` (udt_peer's port line, which replaces
    ``{port}`` in the sender's arguments), or None (at once: rendezvous)."""

    receiver: list[str]
    sender: list[str]
    ready: str | None
    #: The receiver's stdout starts with a line that is not the stream (udt_peer's port).
    port_line: bool = False
    #: UDP ports fixed in advance whose datagrams (to and from) a loss row drops.
    ports: tuple[int, ...] = ()


def _kill(process: subprocess.Popen[bytes] | None) -> None:
    if process is not None and process.poll() is None:
        process.kill()
    if process is not None:
        process.wait(timeout=10)


@dataclass
class ReceivedStream:
    """What a receiver writes on stdout: hashed and timed as it arrives."""

    port_line: bool
    hashed: hashlib._Hash = field(default_factory=hashlib.sha256)
    size: int = 0
    first_at: float = 0.0
    last_at: float = 0.0
    first_chunk: int = 0
    #: udt_peer's port, once its first line is complete ("" when there is no such line).
    port: str | None = None
    _head: bytearray = field(default_factory=bytearray)

    def __post_init__(self) -> None:
        if not self.port_line:
            self.port = ""

    def feed(self, chunk: bytes) -> None:
        if self.port is None:
            self._head += chunk
            if b"\n" not in self._head:
                return
            line, _, chunk = bytes(self._head).partition(b"\n")
            self.port = line.decode().strip()
        if not chunk:
            return
        now = time.perf_counter()
        if self.size == 0:
            self.first_at, self.first_chunk = now, len(chunk)
        self.last_at = now
        self.size += len(chunk)
        self.hashed.update(chunk)

    @property
    def rate(self) -> float:
        """MB/s from the first chunk's arrival to the last's (the first one is not timed)."""
        return (self.size - self.first_chunk) / max(self.last_at - self.first_at, 1e-9) / MB


def transfer(netcat: Netcat, payload: Path, size: int, digest: str, workdir: Path) -> Run:
    """Run one transfer of ``payload`` through ``netcat``; its goodput, checked."""
    receiver: subprocess.Popen[bytes] | None = None
    sender: subprocess.Popen[bytes] | None = None
    sender_log = workdir / "sender.log"

    def start_sender(port: str) -> subprocess.Popen[bytes]:
        command = [arg.replace("{port}", port) for arg in netcat.sender]
        with payload.open("rb") as stdin, sender_log.open("wb") as log:
            return subprocess.Popen(  # noqa: S603 - commands built by this script
                command, stdin=stdin, stdout=subprocess.DEVNULL, stderr=log
            )

    try:
        receiver = subprocess.Popen(  # noqa: S603 - commands built by this script
            netcat.receiver,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert receiver.stdout is not None
        assert receiver.stderr is not None
        with contextlib.suppress(OSError):  # a larger pipe: fewer wake-ups per MB
            fcntl.fcntl(receiver.stdout.fileno(), fcntl.F_SETPIPE_SZ, CHUNK)
        received = ReceivedStream(netcat.port_line)
        errors = bytearray()

        def ready() -> bool:
            if netcat.ready is None:
                return True
            if netcat.ready == FIRST_LINE:
                return received.port is not None
            return re.search(netcat.ready, errors.decode(errors="replace")) is not None

        deadline = time.monotonic() + TRANSFER_TIMEOUT
        with selectors.DefaultSelector() as selector:
            selector.register(receiver.stdout, selectors.EVENT_READ, received.feed)
            selector.register(receiver.stderr, selectors.EVENT_READ, errors.extend)
            while selector.get_map():
                if sender is None and ready():
                    sender = start_sender(received.port or "")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return Run(error=f"timed out after {TRANSFER_TIMEOUT:g} s")
                for key, _ in selector.select(remaining):
                    chunk = os.read(key.fd, CHUNK)
                    if chunk:
                        key.data(chunk)
                    else:
                        selector.unregister(key.fileobj)
        status = receiver.wait(timeout=max(1.0, deadline - time.monotonic()))
        sent_status = None if sender is None else sender.wait(timeout=60)
        problems = []
        if status != 0:
            problems.append(f"receiver exited {status}: {errors.decode(errors='replace')[-300:]}")
        if sent_status != 0:
            problems.append(f"sender exited {sent_status}: {sender_log.read_text()[-300:]}")
        if received.size != size or received.hashed.hexdigest() != digest:
            problems.append(f"stream differs ({received.size:,} of {size:,} bytes)")
        return Run(error="; ".join(problems)) if problems else Run(rate=received.rate)
    finally:
        _kill(sender)
        _kill(receiver)


# --- the rows --------------------------------------------------------------------------


def python_child(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", *args]


def tcp_netcat() -> Netcat:
    port = str(free_port(socket.SOCK_STREAM))
    return Netcat(python_child("tcp-recv", port), python_child("tcp-send", port), ready="^ready")


def quic_netcat(cert: Path, key: Path) -> Netcat:
    port = str(free_port(socket.SOCK_DGRAM))
    receiver = python_child("quic-recv", port, "--cert", str(cert), "--key", str(key))
    return Netcat(receiver, python_child("quic-send", port), ready="^ready")


def libudt_netcat(binary: Path, mode: str) -> Netcat:
    """udt_peer in stdin/stdout mode: "regular", "rendezvous" or "rendezvous+sleep"."""
    common = ["--timeout", str(int(TRANSFER_TIMEOUT))]
    if mode == "regular":
        port = free_port(socket.SOCK_DGRAM)
        return Netcat(
            [str(binary), "recv", "--listen", f"{LOOPBACK}:{port}", *common],
            [str(binary), "send", "--connect", f"{LOOPBACK}:{{port}}", *common],
            ready=FIRST_LINE,
            port_line=True,
            ports=(port,),
        )
    a, b = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    sleep = ["--sleep-after-connect", str(RENDEZVOUS_SLEEP_MS)] if "sleep" in mode else []
    recv = [str(binary), "recv", "--rendezvous", "--local", f"{LOOPBACK}:{a}"]
    send = [str(binary), "send", "--rendezvous", "--local", f"{LOOPBACK}:{b}"]
    return Netcat(
        [*recv, "--peer", f"{LOOPBACK}:{b}", *common],
        [*send, "--peer", f"{LOOPBACK}:{a}", *sleep, *common],
        ready=None,
        port_line=True,
        ports=(a, b),
    )


# ===== wavesync-UDT plugs in here ========================================================
# The adapter's netcat: `wavesync udt recv --listen HOST:PORT` writes the stream to
# stdout, `wavesync udt send --connect HOST:PORT` reads stdin; `--rendezvous --local
# PORT --peer HOST:PORT` for both. A receiver with --listen says it is ready on stderr.


def wavesync_commands(mode: str, runtime: str = "anyio") -> Netcat:
    """wavesync's row: "regular" or "rendezvous" (no sleep: ours must not need one), on
    the CLI's default runtime (anyio on asyncio), "anyio, GSO" (the sender with
    ``--gso``) or "asyncio on uvloop" (the asyncio adapter on uvloop's loop, through
    ``--child wavesync-uvloop``)."""
    wavesync = [sys.executable, "-m", "wavesync_adapters.cli", "udt"]
    if runtime == "asyncio on uvloop":
        wavesync = python_child("wavesync-uvloop", "--", "udt")

    adapter = ["--adapter", "asyncio"] if runtime == "asyncio on uvloop" else []
    gso = ["--gso"] if runtime == "anyio, GSO" else []
    if mode == "regular":
        port = free_port(socket.SOCK_DGRAM)
        return Netcat(
            [*wavesync, "recv", *adapter, "--listen", f"{LOOPBACK}:{port}"],
            [*wavesync, "send", *adapter, *gso, "--connect", f"{LOOPBACK}:{port}"],
            ready="listening on udp",
            ports=(port,),
        )
    a, b = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    return Netcat(
        [
            *wavesync,
            "recv",
            *adapter,
            "--rendezvous",
            "--local",
            str(a),
            "--peer",
            f"{LOOPBACK}:{b}",
        ],
        [
            *wavesync,
            "send",
            *adapter,
            "--rendezvous",
            "--local",
            str(b),
            "--peer",
            f"{LOOPBACK}:{a}",
        ],
        ready=None,
        ports=(a, b),
    )


def wavesync_unavailable() -> str | None:
    """Why the wavesync rows cannot run yet, or None."""
    command = [sys.executable, "-m", "wavesync_adapters.cli", "udt", "recv", "--help"]
    result = subprocess.run(  # noqa: S603 - our own package
        command, capture_output=True, text=True, timeout=60, check=False
    )
    if result.returncode != 0:
        return "not available: `wavesync udt` does not run yet"
    return None


# =========================================================================================


# --- the report ------------------------------------------------------------------------


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def ratio(value: float | None, reference: float | None) -> str:
    if value is None or not reference:
        return "-"
    return f"{value / reference:.2f}"


def main() -> int:  # noqa: PLR0912, PLR0915 - one report, top to bottom
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2:])
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--bytes", type=int, default=200_000_000, help="bytes per transfer")
    parser.add_argument("--rounds", type=int, default=3, help="transfers per row")
    parser.add_argument(
        "--loss-bytes",
        type=int,
        default=DEFAULT_LOSS_BYTES,
        help="bytes per transfer in libudt's loss row (wavesync's moves --bytes)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
    parser.add_argument(
        "--loss",
        type=float,
        default=None,
        help=f"loss rows: drop this share of UDP datagrams (default {DEFAULT_LOSS}; 0: no rows;"
        " --quick: none unless given; needs root and iptables)",
    )
    args = parser.parse_args()
    if args.quick:
        args.bytes, args.rounds, args.loss_bytes = 2_000_000, 1, 2_000_000
    loss: float = (0.0 if args.quick else DEFAULT_LOSS) if args.loss is None else args.loss
    if not 0.0 <= loss < 1.0:
        parser.error("--loss is a share: 0 <= P < 1")
    size = args.bytes
    # SIGTERM and SIGHUP unwind like Ctrl-C, through every finally (iptables rules, children).
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda signum, frame: sys.exit(128 + signum))

    try:
        import aioquic  # noqa: PLC0415 - optional, see self_signed

        aioquic_version, aioquic_missing = aioquic.__version__, None
    except ImportError:
        aioquic_version = "missing"
        aioquic_missing = "not available: aioquic is not installed (the `bench` group has it)"
    print(
        f"wavesync {__version__} UDT goodput, Python {platform.python_version()},"
        f" aioquic {aioquic_version}, {platform.system()} {platform.release()},"
        f" {os.cpu_count()} CPUs"
    )
    print(f"load average at start: {loadavg()} (other processes share the cores)")
    try:
        udt_peer: Path | None = build_udt_peer(default_cache_dir())
        libudt_missing = None
    except LibudtUnavailableError as missing:
        udt_peer, libudt_missing = None, f"not available: {missing}"
    wavesync_missing = wavesync_unavailable()
    loss_label = f"{loss * 100:g} % loss"
    loss_missing = (
        "not measured: --loss 0 (--quick leaves the loss rows out unless --loss is given)"
        if loss == 0
        else loss_unavailable()
    )

    with tempfile.TemporaryDirectory(prefix="wavesync-udt-bench-") as folder:
        workdir = Path(folder)
        payload = workdir / "payload"
        data = stream(SEED, size)
        payload.write_bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        loss_payload = workdir / "loss-payload"
        loss_payload.write_bytes(data[: args.loss_bytes])
        loss_digest = hashlib.sha256(data[: args.loss_bytes]).hexdigest()
        loss_size = min(args.loss_bytes, size)
        del data
        cert, key = self_signed(workdir) if aioquic_missing is None else (payload, payload)

        rows: dict[str, tuple[Row, Callable[[], Netcat]]] = {}

        def add(
            label: str,
            make: Callable[[], Netcat],
            unavailable: str | None = None,
            row_loss: float = 0.0,
            *,
            short: bool = False,
        ) -> None:
            rows[label] = (Row(label, unavailable=unavailable, loss=row_loss, short=short), make)

        add("TCP (asyncio streams)", tcp_netcat)
        add("aioquic, one stream", lambda: quic_netcat(cert, key), aioquic_missing)
        for mode in ("regular", "rendezvous", "rendezvous+sleep"):
            label = {
                "regular": "libudt 4.11, regular",
                "rendezvous": "libudt 4.11, rendezvous",
                "rendezvous+sleep": f"libudt 4.11, rendezvous, {RENDEZVOUS_SLEEP_MS} ms sleep",
            }[mode]

            def make_libudt(mode: str = mode) -> Netcat:
                assert udt_peer is not None
                return libudt_netcat(udt_peer, mode)

            add(label, make_libudt, libudt_missing)
        for mode in ("regular", "rendezvous"):

            def make_wavesync(mode: str = mode) -> Netcat:
                return wavesync_commands(mode)

            add(f"wavesync-UDT, {mode}", make_wavesync, wavesync_missing)

        def make_uvloop() -> Netcat:
            return wavesync_commands("regular", "asyncio on uvloop")

        def make_gso() -> Netcat:
            return wavesync_commands("regular", "anyio, GSO")

        add("wavesync-UDT, regular, GSO", make_gso, wavesync_missing)
        add(
            "wavesync-UDT, regular, asyncio on uvloop",
            make_uvloop,
            wavesync_missing or uvloop_missing(),
        )
        # The loss rows: regular connects, datagrams dropped on the transfer's own ports.
        add(
            f"libudt 4.11, regular, {loss_label}",
            rows["libudt 4.11, regular"][1],
            libudt_missing or loss_missing,
            loss,
            short=True,
        )
        add(
            f"wavesync-UDT, regular, {loss_label}",
            rows["wavesync-UDT, regular"][1],
            wavesync_missing or loss_missing,
            loss,
        )

        for _ in range(args.rounds):
            for row, make in rows.values():
                if row.unavailable is not None:
                    continue
                netcat = make()
                if not row.loss:
                    row.runs.append(transfer(netcat, payload, size, digest, workdir))
                    continue
                with packet_loss(netcat.ports, row.loss):
                    if row.short:
                        run = transfer(netcat, loss_payload, loss_size, loss_digest, workdir)
                    else:
                        run = transfer(netcat, payload, size, digest, workdir)
                row.runs.append(run)

    print(
        f"\nbulk goodput over loopback, {size / MB:,.0f} MB per transfer, {args.rounds}"
        " round(s), interleaved (MB = 10^6 bytes; first to last byte at the receiver's"
        " stdout; every stream checked by SHA-256)"
    )
    if loss:
        print(
            f"{loss_label}: iptables drops {loss:g} of the UDP datagrams to and from the"
            f" receiver's port on lo; wavesync {size / MB:,.0f} MB per transfer, libudt"
            f" {loss_size / MB:,.0f} MB; /libudt is against libudt at the same loss"
        )
    aioquic_median = rows["aioquic, one stream"][0].median
    libudt_median = rows["libudt 4.11, regular"][0].median
    lossy_libudt_median = rows[f"libudt 4.11, regular, {loss_label}"][0].median
    print(f"{'path':44} {'MB/s':>8} {'/aioquic':>9} {'/libudt':>8}  runs (MB/s)")
    for row, _ in rows.values():
        if row.unavailable is not None:
            print(f"{row.name:44} {row.unavailable}")
            continue
        runs = ", ".join(
            f"{run.rate:,.1f}" if run.rate is not None else "FAILED" for run in row.runs
        )
        median = f"{row.median:,.1f}" if row.median is not None else "-"
        reference = lossy_libudt_median if row.loss else libudt_median
        print(
            f"{row.name:44} {median:>8} {ratio(row.median, aioquic_median):>9}"
            f" {ratio(row.median, reference):>8}  {runs}"
        )
        for run in row.runs:
            if run.error is not None:
                print(f"{'':44} failed: {run.error}")
    print(f"load average at the end: {loadavg()}")
    ours = rows["wavesync-UDT, regular"][0].median
    verdict = (
        "not measured (wavesync-UDT not available)"
        if ours is None or aioquic_median is None
        else ("met" if ours >= TARGET_VS_AIOQUIC * aioquic_median else "NOT met")
        + f" ({ours / aioquic_median:.2f} x)"
    )
    ours_lossy = rows[f"wavesync-UDT, regular, {loss_label}"][0].median
    loss_verdict = (
        "not measured"
        if ours is None or ours_lossy is None
        else ("met" if ours_lossy >= TARGET_UNDER_LOSS * ours else "NOT met")
        + f" ({ours_lossy / ours:.2f} x)"
    )
    print(
        f"targets: wavesync-UDT ≥ {TARGET_VS_AIOQUIC:g} x aioquic: {verdict};"
        f" wavesync-UDT at {loss_label or 'loss'} ≥ {TARGET_UNDER_LOSS:g} x its lossless"
        f" figure: {loss_verdict}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
