"""Start the real ``wavesync`` programs as subprocesses and wait for their ready line.

Waiting is event-driven: the daemon prints a line once its socket is bound and
we block on that line (with a deadline), never on a sleep.
"""

from __future__ import annotations

import os
import re
import selectors
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from wavesync_proto.mediator.systems import parse_systems

__all__ = [
    "MEDIATOR_READY",
    "RELAY_READY",
    "WAVESYNC",
    "RelayAndMediator",
    "free_udp_port",
    "new_system",
    "relay_and_mediator",
    "run_wavesync",
    "started_program",
    "wavesync_daemon",
]

# The console script installed next to this interpreter: tests run the real entry point.
WAVESYNC = str(Path(sys.executable).parent / "wavesync")
READY_TIMEOUT = 10.0
LOOPBACK = "127.0.0.1"
#: The ready lines of ``wavesync relay`` and ``wavesync mediator`` (without --http).
RELAY_READY = r"relay listening on tcp (?P<host>[\d.]+):(?P<port>\d+)"
MEDIATOR_READY = r"mediator listening on udp\+tcp (?P<host>[\d.]+):(?P<port>\d+)"


def free_udp_port() -> int:
    """A loopback UDP port nobody uses right now (for a peer that must be named first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def run_wavesync(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run ``wavesync ARGS`` to completion and capture its output."""
    return subprocess.run(  # noqa: S603 - our own program with test-chosen arguments
        [WAVESYNC, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def new_system(folder: Path, name: str | None = None) -> tuple[Path, uuid.UUID, str]:
    """``wavesync keygen`` one system into ``folder/systems.toml``: (its path, id, key)."""
    entry = run_wavesync("keygen", *(("--name", name) if name else ()))
    assert entry.returncode == 0, entry.stderr
    path = folder / "systems.toml"
    path.write_text(entry.stdout, encoding="utf-8")
    [(system_id, key)] = parse_systems(entry.stdout).items()
    return path, system_id, key


def _wait_ready(
    process: subprocess.Popen[str] | subprocess.Popen[bytes], ready: str, what: str
) -> tuple[re.Match[str], tuple[str, ...]]:
    """Read ``process``'s stdout until a line matches ``ready`` (READY_TIMEOUT in all).

    Read from the descriptor a byte at a time, never through the pipe's buffered
    reader: two lines written at once must not both vanish into a buffer the
    selector cannot see (the wait would then time out with the line already read).
    """
    assert process.stdout is not None
    descriptor = process.stdout.fileno()
    deadline = time.monotonic() + READY_TIMEOUT
    seen: list[str] = []
    line = bytearray()
    with selectors.DefaultSelector() as selector:
        selector.register(descriptor, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                raise AssertionError(f"{what} not ready: {seen} {bytes(line)!r}")
            byte = os.read(descriptor, 1)
            if not byte:
                _, err = process.communicate(timeout=READY_TIMEOUT)
                raise AssertionError(f"{what} exited: {seen} {err!r}")
            line += byte
            if byte != b"\n":
                continue
            text = line.decode(errors="replace")
            line.clear()
            seen.append(text)
            match = re.search(ready, text)
            if match:
                return match, tuple(seen)


@contextmanager
def wavesync_daemon(
    *args: str, ready: str
) -> Iterator[tuple[subprocess.Popen[str], re.Match[str]]]:
    """Run ``wavesync ARGS`` until the block ends; yield it once stdout matches ``ready``."""
    process = subprocess.Popen(  # noqa: S603
        [WAVESYNC, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        match, _ = _wait_ready(process, ready, f"wavesync {' '.join(args)}")
        yield process, match
    finally:
        process.terminate()
        try:
            process.communicate(timeout=READY_TIMEOUT)  # reaps it and closes both pipes
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()


@dataclass(frozen=True)
class RelayAndMediator:
    relay_url: str
    mediator: tuple[str, int]
    relay_process: subprocess.Popen[str]
    mediator_process: subprocess.Popen[str]


@contextmanager
def relay_and_mediator(
    systems: Path, *, adapter: str = "anyio", relay_port: int = 0, mediator_port: int = 0
) -> Iterator[RelayAndMediator]:
    """``wavesync relay`` and a ``wavesync mediator`` that offers it, on loopback, both
    on ``adapter``'s runtime (a port of 0 picks a free one)."""
    with ExitStack() as stack:
        relay, relay_ready = stack.enter_context(
            wavesync_daemon(
                "relay",
                "--adapter",
                adapter,
                "--listen",
                f"{LOOPBACK}:{relay_port}",
                "--systems",
                str(systems),
                ready=RELAY_READY,
            )
        )
        relay_url = f"http://{LOOPBACK}:{relay_ready['port']}"
        mediator, mediator_ready = stack.enter_context(
            wavesync_daemon(
                "mediator",
                "--adapter",
                adapter,
                "--listen",
                f"{LOOPBACK}:{mediator_port}",
                "--systems",
                str(systems),
                "--relay-url",
                relay_url,
                ready=MEDIATOR_READY,
            )
        )
        yield RelayAndMediator(relay_url, (LOOPBACK, int(mediator_ready["port"])), relay, mediator)


@dataclass(frozen=True)
class StartedProgram:
    #: Its pipes are binary: ``communicate()`` gives bytes.
    process: subprocess.Popen[bytes]
    #: The ready line's match.
    ready: re.Match[str]
    #: Every stdout line up to and including the ready line.
    lines: tuple[str, ...]


@contextmanager
def started_program(
    command: Sequence[str], *, ready: str, env: Mapping[str, str] | None = None
) -> Iterator[StartedProgram]:
    """Run ``command`` (any program, e.g. ``python examples/...``) until the block ends;
    yield it once a stdout line matches ``ready``. A test may stop it itself (and check
    its exit status); one still running when the block ends is terminated.

    """
    process = subprocess.Popen(  # noqa: S603 - the test's own command line
        list(command),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,
        env=None if env is None else dict(env),
    )
    try:
        match, seen = _wait_ready(process, ready, " ".join(command))
        yield StartedProgram(process, match, tuple(seen))
    finally:
        if process.returncode is None:  # not stopped and reaped by the test
            process.terminate()
            try:
                process.communicate(timeout=READY_TIMEOUT)  # reaps it, closes both pipes
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()
