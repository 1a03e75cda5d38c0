"""Start the real ``wavesync`` programs as subprocesses and wait for their ready line.

Waiting is event-driven: the daemon prints a line once its socket is bound and
we block on that line (with a deadline), never on a sleep.
"""

from __future__ import annotations

import re
import selectors
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from wavesync_proto.mediator.systems import parse_systems

__all__ = ["WAVESYNC", "new_system", "run_wavesync", "wavesync_daemon"]

# The console script installed next to this interpreter: tests run the real entry point.
WAVESYNC = str(Path(sys.executable).parent / "wavesync")
READY_TIMEOUT = 10.0


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
        deadline = time.monotonic() + READY_TIMEOUT
        seen: list[str] = []
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not selector.select(remaining):
                    raise AssertionError(f"wavesync {' '.join(args)} not ready: {seen}")
                line = process.stdout.readline()
                if not line:
                    _, err = process.communicate(timeout=READY_TIMEOUT)
                    raise AssertionError(f"wavesync {' '.join(args)} exited: {seen} {err}")
                seen.append(line)
                match = re.search(ready, line)
                if match:
                    break
        yield process, match
    finally:
        process.terminate()
        try:
            process.communicate(timeout=READY_TIMEOUT)  # reaps it and closes both pipes
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
