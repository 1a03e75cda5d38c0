"""A real squid of our own on loopback: private config, own port, no cache, stopped after.

Two access policies: ``DEFAULT`` has the ``http_access`` rules of Debian's
/etc/squid/squid.conf (CONNECT only to port 443); ``PERMISSIVE`` allows CONNECT
to any port and passes our two Upgrade protocols (squid matches the names
case-sensitively). squid runs in the foreground (``-N``); started as root it
drops to its ``cache_effective_user`` (Debian's ``proxy``), so it gets no
file to write: its log goes to the stderr we gave it (it says it cannot open
/dev/stderr, then writes there anyway), no pid file, no access log, no cache.
The bench uses this module too.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DEFAULT", "PERMISSIVE", "Squid", "squid_binary", "squid_proxy"]

#: Debian's default access rules (squid 5.7's /etc/squid/squid.conf, comments dropped).
DEFAULT = """\
acl SSL_ports port 443
acl Safe_ports port 80 21 443 70 210 1025-65535 280 488 591 777
http_access deny !Safe_ports
http_access deny CONNECT !SSL_ports
http_access allow localhost manager
http_access deny manager
http_access allow localhost
http_access deny all
"""

#: CONNECT to any port, and Upgrade passed for our two protocol names.
PERMISSIVE = """\
http_access allow localhost
http_access deny all
http_upgrade_request_protocols wavesync-tunnel/1 allow all
http_upgrade_request_protocols websocket allow all
"""

_COMMON = """\
http_port {host}:{port}
cache deny all
cache_mem 0 MB
access_log none
cache_log /dev/stderr
pid_filename none
pinger_enable off
shutdown_lifetime 0 seconds
"""

START_TIMEOUT = 20.0


@dataclass(frozen=True)
class Squid:
    host: str
    port: int
    version: str
    log: Path

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def squid_binary() -> str | None:
    """The squid to run: on PATH, or Debian's /usr/sbin/squid (not on a user's PATH)."""
    return shutil.which("squid") or shutil.which("squid", path="/usr/sbin:/usr/local/sbin")


def _free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


@contextmanager
def squid_proxy(folder: Path, access: str, *, host: str = "127.0.0.1") -> Iterator[Squid]:
    """Run squid with ``access`` rules until the block ends; yield once it accepts."""
    binary = squid_binary()
    if binary is None:
        raise FileNotFoundError("squid is not installed (apt-get install squid)")
    version = subprocess.run(  # noqa: S603 - the installed squid
        [binary, "-v"], capture_output=True, text=True, check=True
    ).stdout.splitlines()[0]
    port = _free_port(host)
    config = folder / "squid.conf"
    config.write_text(_COMMON.format(host=host, port=port) + access, encoding="utf-8")
    log = folder / "squid.log"
    process = subprocess.Popen(  # noqa: S603 - the installed squid, our config
        # Our own service name: squid names its shared memory after it, so a second squid
        # (or the system's, or one still shutting down) does not collide with this one.
        [binary, "-N", "-n", f"wavesync{port}", "-f", str(config)],
        cwd=folder,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    ready = threading.Event()
    # The log is read to its end by a thread, so squid never blocks on a full pipe; the
    # line that says the port is open is the readiness signal (no polling, no sleeping).
    drain = threading.Thread(target=_drain, args=(process, log, ready), daemon=True)
    drain.start()
    try:
        if not ready.wait(START_TIMEOUT) or process.poll() is not None:
            process.kill()
            process.wait()
            drain.join(5)
            raise RuntimeError(
                f"squid not ready within {START_TIMEOUT:g} s (exit code {process.returncode}):"
                f" {log.read_text()[-2000:]}"
            )
        deadline = time.monotonic() + START_TIMEOUT
        while True:  # the log line comes a moment before the port accepts, now and then
            try:
                socket.create_connection((host, port), timeout=START_TIMEOUT).close()
                break
            except OSError as exc:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(0.02)  # returns at once if squid exits
                if process.returncode is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"squid does not accept: {exc}: {log.read_text()[-2000:]}"
                    ) from exc
        yield Squid(host, port, version.removeprefix("Squid Cache: "), log)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        drain.join(5)


def _drain(process: subprocess.Popen[bytes], log: Path, ready: threading.Event) -> None:
    assert process.stderr is not None
    with log.open("wb") as out, process.stderr:
        for line in process.stderr:
            out.write(line)
            out.flush()
            if b"Accepting HTTP Socket connections" in line:
                ready.set()
    ready.set()  # squid exited: the waiter sees that at once rather than at its deadline
