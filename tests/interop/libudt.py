"""libudt 4.11, our UDT conformance partner: build ``udt_peer.cpp`` and run it.

``udt_peer`` (tests/interop/udt_peer.cpp, our own netcat over Debian's libudt-dev) is
compiled with g++ once per cache directory and source version. ``PeerProcess`` runs it
with both pipes read through non-blocking polls, so a test can wait for a line with a
deadline while it drives a UDP socket of its own. The generated stream of ``--bytes N
--seed S`` is ``stream(S, N)`` here, so either side can check the other byte for byte;
in message mode (``--messages``) each message is named by its FNV-1a 64 (``fnv1a64``).
bench/udt.py uses this module too. `.ci/run` installs g++ and libudt-dev.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import selectors
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "PATTERN_LENGTH",
    "SOURCE",
    "LibudtUnavailableError",
    "PeerProcess",
    "build_udt_peer",
    "default_cache_dir",
    "fnv1a64",
    "missing_toolchain",
    "pattern",
    "run_peer",
    "stream",
    "stream_sha256",
]

SOURCE = Path(__file__).with_name("udt_peer.cpp")
UDT_HEADER = Path("/usr/include/udt/udt.h")
#: The generated stream repeats a pattern this long; a prime, so no packet-sized
#: reordering can line up with the period (udt_peer.cpp ``kPatternLength``).
PATTERN_LENGTH = 1_000_003
_MASK64 = (1 << 64) - 1
_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3


class LibudtUnavailableError(Exception):
    """g++ or libudt's header is missing here: the interop tests skip with this reason."""


def missing_toolchain() -> str | None:
    """Why ``udt_peer`` cannot be built on this machine, or None when it can."""
    if shutil.which("g++") is None:
        return "g++ is not installed (apt-get install g++)"
    if not UDT_HEADER.exists():
        return f"{UDT_HEADER} is missing (apt-get install libudt-dev)"
    return None


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "wavesync"


def build_udt_peer(cache_dir: Path) -> Path:
    """The ``udt_peer`` binary for the current source, compiled into ``cache_dir`` if needed.

    Raises ``LibudtUnavailableError`` without a toolchain; a compile error is a plain failure.
    """
    reason = missing_toolchain()
    if reason is not None:
        raise LibudtUnavailableError(reason)
    compiler = shutil.which("g++")
    assert compiler is not None
    source = SOURCE.read_bytes()
    binary = cache_dir / f"udt_peer-{hashlib.sha256(source).hexdigest()[:16]}"
    if binary.exists():
        return binary
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = binary.with_name(f"{binary.name}.{os.getpid()}.tmp")
    command = [compiler, "-O2", "-Wall", "-o", str(partial), str(SOURCE), "-ludt", "-lpthread"]
    result = subprocess.run(  # noqa: S603 - the system compiler on our own source
        command, capture_output=True, text=True, timeout=300, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"compiling {SOURCE.name} failed:\n{result.stderr}")
    partial.replace(binary)  # atomic: a concurrent build of the same source is harmless
    return binary


def _splitmix64(state: int) -> tuple[int, int]:
    state = (state + 0x9E3779B97F4A7C15) & _MASK64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return state, z ^ (z >> 31)


def pattern(seed: int) -> bytes:
    """The ``--seed`` pattern: splitmix64 words from ``seed``, little-endian."""
    words = bytearray()
    state = seed & _MASK64
    for _ in range(-(-PATTERN_LENGTH // 8)):
        state, word = _splitmix64(state)
        words += word.to_bytes(8, "little")
    return bytes(words[:PATTERN_LENGTH])


def stream(seed: int, size: int) -> bytes:
    """The first ``size`` bytes ``udt_peer send --bytes size --seed seed`` sends."""
    block = pattern(seed)
    whole, rest = divmod(size, PATTERN_LENGTH)
    return block * whole + block[:rest]


def stream_sha256(seed: int, size: int) -> str:
    """SHA-256 of ``stream(seed, size)``, without holding the stream in memory."""
    block = pattern(seed)
    digest = hashlib.sha256()
    whole, rest = divmod(size, PATTERN_LENGTH)
    for _ in range(whole):
        digest.update(block)
    digest.update(block[:rest])
    return digest.hexdigest()


def fnv1a64(data: bytes) -> int:
    """FNV-1a 64 of ``data``: how ``udt_peer --messages`` names a message on stderr."""
    digest = _FNV_OFFSET
    for byte in data:
        digest = ((digest ^ byte) * _FNV_PRIME) & _MASK64
    return digest


class PeerProcess:
    """A running ``udt_peer``: its stdout and stderr collected by polls with deadlines.

    stdout's first line is the peer's UDP port; in ``recv`` mode the stream follows.
    stderr holds its ``udt_peer: ...`` event lines.
    """

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        assert process.stderr is not None
        self.process = process
        self.stdout = bytearray()
        self.stderr = bytearray()
        self._selector = selectors.DefaultSelector()
        for pipe, sink in ((process.stdout, self.stdout), (process.stderr, self.stderr)):
            os.set_blocking(pipe.fileno(), False)
            self._selector.register(pipe, selectors.EVENT_READ, sink)

    @property
    def fds(self) -> list[int]:
        """The pipes still open, for a caller's own ``select`` (then call ``drain``)."""
        return [key.fd for key in self._selector.get_map().values()]

    def drain(self, timeout: float = 0.0) -> None:
        """Read whatever either pipe has, waiting up to ``timeout`` seconds for something."""
        if not self._selector.get_map():
            return
        for key, _ in self._selector.select(timeout):
            chunk = os.read(key.fd, 1 << 20)
            if chunk:
                sink: bytearray = key.data
                sink += chunk
            else:
                self._selector.unregister(key.fileobj)

    @property
    def stderr_text(self) -> str:
        return self.stderr.decode(errors="replace")

    def port(self, timeout: float = 10.0) -> int:
        """The local UDP port the peer printed as its first line."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.stdout:
            self._poll_until(deadline, "port line")
        line, _, rest = bytes(self.stdout).partition(b"\n")
        self.stdout[:] = rest
        return int(line)

    def wait_for(self, regex: str, timeout: float = 10.0) -> re.Match[str]:
        """The first match of ``regex`` in the peer's stderr, waiting for it."""
        deadline = time.monotonic() + timeout
        while (found := re.search(regex, self.stderr_text)) is None:
            self._poll_until(deadline, f"stderr line matching {regex!r}")
        return found

    def wait_exit(self, timeout: float = 10.0) -> int:
        """The exit status, once the peer has exited and both pipes are read to the end."""
        deadline = time.monotonic() + timeout
        while self._selector.get_map():
            self._poll_until(deadline, "exit")
        return self.process.wait(timeout=max(0.0, deadline - time.monotonic()))

    def _poll_until(self, deadline: float, what: str) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not self._selector.get_map():
            raise AssertionError(
                f"udt_peer: no {what} before the deadline (exit status"
                f" {self.process.poll()}); stderr:\n{self.stderr_text}"
            )
        self.drain(remaining)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        self._selector.close()
        for pipe in (self.process.stdout, self.process.stderr, self.process.stdin):
            if pipe is not None:
                pipe.close()


@contextlib.contextmanager
def run_peer(binary: Path, *args: str, stdin: bool = False) -> Iterator[PeerProcess]:
    """Start ``binary ARGS``; it is killed on the way out, whatever happened."""
    process = subprocess.Popen(  # noqa: S603 - our own test program
        [str(binary), *args],
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    peer = PeerProcess(process)
    try:
        yield peer
    finally:
        peer.kill()
