"""Real kernel NAT in network namespaces: a public network, two home routers, a host behind each.

::

    hA 10.1.0.2 --lan-- 10.1.0.1 rA 203.0.113.2 --wan-- 203.0.113.1 pub
    hB 10.2.0.2 --lan-- 10.2.0.1 rB 203.0.113.6 --wan-- 203.0.113.5 pub
    (pub runs the mediator, the relay and, for proxy-only, squid; it routes between rA and rB)

Every namespace name starts with a per-run prefix (``wsl<pid>x<n>``), so two labs never share
one and a leftover can be found by its prefix. Only documentation (203.0.113.0/24) and private
(10.x) addresses inside the namespaces are used; the machine's own network is never touched.

A router's behaviour (``Nat``) is one iptables ruleset loaded atomically with
iptables-restore. Every router masquerades its LAN behind its WAN address and drops
unsolicited NEW packets arriving on the WAN, both forwarded and addressed to itself: without
the INPUT rule an early punch packet to the router's own address is delivered locally, its
conntrack entry is confirmed, and the host's later outgoing flow is given a different source
port (the mapping is "stolen"; a hand test failed exactly so).

Teardown always runs (``finally``): every process we started is stopped, every process still
in a namespace is killed, and the namespaces are deleted (their veths go with them).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

__all__ = [
    "PUBLIC",
    "SQUID_PORT",
    "Daemon",
    "Lab",
    "Nat",
    "NatKind",
    "lab_unavailable",
    "nat_lab",
]

NatKind = Literal["cone", "symmetric", "udp-blocked", "proxy-only"]

#: pub's address on rA's link; the mediator, relay and squid listen on every pub address.
PUBLIC = "203.0.113.1"
SQUID_PORT = 3128
#: Bound on every short administrative command (ip, iptables-restore, tee).
COMMAND_TIMEOUT = 15.0
#: How long a stopped process gets between SIGTERM and SIGKILL.
STOP_TIMEOUT = 5.0

_counter = itertools.count()


@dataclass(frozen=True, kw_only=True)
class Nat:
    """One router's behaviour: the NAT kind, and the share of packets it drops (0 = none)."""

    kind: NatKind = "cone"
    loss: float = 0.0

    def describe(self) -> str:
        return self.kind + (f" ({self.loss:.0%} loss)" if self.loss else "")


@dataclass(frozen=True, kw_only=True)
class _Side:
    router: str
    host: str
    pub_address: str  # pub's end of this router's WAN link
    wan_address: str
    lan_prefix: str  # "10.1.0"


@dataclass(kw_only=True)
class Daemon:
    """A program started in a namespace: its stdout and stderr are written to files."""

    name: str
    process: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path
    ready_line: str = ""
    _reader: threading.Thread | None = field(default=None, repr=False)

    def stderr_text(self) -> str:
        return self.stderr.read_text(encoding="utf-8", errors="replace")


def lab_unavailable() -> str | None:
    """Why the lab cannot run here (not root, no ip / iptables), or None when it can."""
    if os.geteuid() != 0:
        return "the NAT lab needs root (network namespaces, iptables)"
    for tool in ("ip", "iptables-restore"):
        if shutil.which(tool) is None and shutil.which(tool, path="/usr/sbin:/sbin") is None:
            return f"the NAT lab needs {tool} (apt-get install iproute2 iptables)"
    probe = f"wsl{os.getpid()}p{next(_counter)}"
    made = subprocess.run(  # noqa: S603 - iproute2, a name of our own
        [_tool("ip"), "netns", "add", probe],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    if made.returncode != 0:
        return f"ip netns add fails here: {made.stderr.strip()}"
    subprocess.run(  # noqa: S603
        [_tool("ip"), "netns", "del", probe],
        capture_output=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    return None


def _tool(name: str) -> str:
    """The full path of an administrative tool (sbin is not on every PATH)."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if found is None:
        raise FileNotFoundError(f"{name} is not installed")
    return found


def _ruleset(nat: Nat, pub_address: str) -> str:
    """The iptables-restore input for a router of kind ``nat``."""
    masquerade = "-A POSTROUTING -o wan -j MASQUERADE"
    if nat.kind == "symmetric":
        masquerade += " --random-fully"  # a fresh random port for every new flow
    established = "-m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"
    forward: list[str] = []
    if nat.loss:
        # Both directions, every packet: sch_netem is not in this kernel, the statistic match is.
        forward.append(f"-A FORWARD -m statistic --mode random --probability {nat.loss} -j DROP")
    if nat.kind == "udp-blocked":
        forward.append("-A FORWARD -p udp -j DROP")
    if nat.kind == "proxy-only":
        forward += [
            f"-A FORWARD -i lan -o wan -p tcp -d {pub_address} --dport {SQUID_PORT} -j ACCEPT",
            f"-A FORWARD -i wan {established}",
            "-A FORWARD -j DROP",
        ]
    else:
        forward += [f"-A FORWARD -i wan {established}", "-A FORWARD -i wan -j DROP"]
    lines = [
        "*nat",
        ":PREROUTING ACCEPT [0:0]",
        ":INPUT ACCEPT [0:0]",
        ":OUTPUT ACCEPT [0:0]",
        ":POSTROUTING ACCEPT [0:0]",
        masquerade,
        "COMMIT",
        "*filter",
        ":INPUT ACCEPT [0:0]",
        ":FORWARD ACCEPT [0:0]",
        ":OUTPUT ACCEPT [0:0]",
        f"-A INPUT -i wan {established}",
        "-A INPUT -i wan -j DROP",
        *forward,
        "COMMIT",
    ]
    return "\n".join(lines) + "\n"


class Lab:
    """The namespaces of one lab, and the programs started in them."""

    def __init__(self, folder: Path, left: Nat, right: Nat) -> None:
        self.folder = folder
        self.left_nat = left
        self.right_nat = right
        self.prefix = f"wsl{os.getpid()}x{next(_counter)}"
        self.pub = f"{self.prefix}pub"
        self.left = _Side(
            router=f"{self.prefix}rA",
            host=f"{self.prefix}hA",
            pub_address=PUBLIC,
            wan_address="203.0.113.2",
            lan_prefix="10.1.0",
        )
        self.right = _Side(
            router=f"{self.prefix}rB",
            host=f"{self.prefix}hB",
            pub_address="203.0.113.5",
            wan_address="203.0.113.6",
            lan_prefix="10.2.0",
        )
        self.created: list[str] = []
        self.daemons: list[Daemon] = []

    @property
    def namespaces(self) -> tuple[str, ...]:
        return (self.pub, self.left.router, self.left.host, self.right.router, self.right.host)

    # --- commands ---------------------------------------------------------------------------

    def run(
        self, namespace: str | None, *argv: str, stdin: str | None = None, timeout: float = 0
    ) -> subprocess.CompletedProcess[str]:
        """Run a command (in ``namespace``) to completion; raise with its stderr if it fails."""
        prefix = [_tool("ip"), "netns", "exec", namespace] if namespace else []
        done = subprocess.run(  # noqa: S603 - administrative tools, lab-chosen arguments
            [*prefix, _tool(argv[0]), *argv[1:]],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout or COMMAND_TIMEOUT,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} in {namespace}: {done.stderr.strip()}")
        return done

    def spawn(
        self,
        namespace: str,
        argv: Sequence[str],
        *,
        name: str,
        ready: str | None = None,
        ready_on_stderr: bool = False,
        timeout: float = 20.0,
    ) -> Daemon:
        """Start ``argv`` in ``namespace``; with ``ready``, return once a line matches it."""
        out = self.folder / f"{name}.out"
        err = self.folder / f"{name}.err"
        with out.open("wb") as out_file, err.open("wb") as err_file:
            process = subprocess.Popen(  # noqa: S603 - our programs, lab-chosen arguments
                [_tool("ip"), "netns", "exec", namespace, *argv],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if ready and not ready_on_stderr else out_file,
                stderr=subprocess.PIPE if ready and ready_on_stderr else err_file,
                cwd=Path(__file__).resolve().parents[2],  # `python -m tests.natlab...` works
            )
        daemon = Daemon(name=name, process=process, stdout=out, stderr=err)
        self.daemons.append(daemon)
        if ready is None:
            return daemon
        found = threading.Event()
        pipe = process.stderr if ready_on_stderr else process.stdout
        copy = err if ready_on_stderr else out
        assert pipe is not None
        # A thread reads the pipe to its end (the program never blocks on a full pipe) and
        # copies it to the file; the matching line is the readiness signal, not a sleep.
        reader = threading.Thread(
            target=_watch, args=(pipe, copy, re.compile(ready), daemon, found), daemon=True
        )
        daemon._reader = reader
        reader.start()
        if not found.wait(timeout) or not daemon.ready_line:
            self.stop(daemon)
            raise RuntimeError(
                f"{name} not ready within {timeout:g} s (exit code {process.returncode}):"
                f"\n{out.read_text(errors='replace')[-1500:]}"
                f"\n{err.read_text(errors='replace')[-3000:]}"
            )
        return daemon

    def stop(self, daemon: Daemon) -> None:
        """SIGTERM, then SIGKILL after ``STOP_TIMEOUT``; reap it and its reader."""
        process = daemon.process
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if daemon._reader is not None:
            daemon._reader.join(STOP_TIMEOUT)

    # --- building and tearing down ----------------------------------------------------------

    def build(self) -> None:
        for namespace in self.namespaces:
            self.run(None, "ip", "netns", "add", namespace)
            self.created.append(namespace)
            self.run(None, "ip", "-n", namespace, "link", "set", "lo", "up")
        for side, nat in ((self.left, self.left_nat), (self.right, self.right_nat)):
            self._build_side(side, nat)

    def _build_side(self, side: _Side, nat: Nat) -> None:
        # Interface names are per namespace, so "wan"/"lan"/"eth0" repeat safely; the pub
        # end is named after the router so pub's two links differ.
        pub_end = "to" + side.router[-2:]
        self._veth(
            self.pub,
            pub_end,
            f"{side.pub_address}/30",
            ns_b=side.router,
            name_b="wan",
            ip_b=side.wan_address,
        )
        lan = f"{side.lan_prefix}.1"
        self._veth(
            side.router,
            "lan",
            f"{lan}/24",
            ns_b=side.host,
            name_b="eth0",
            ip_b=f"{side.lan_prefix}.2",
        )
        self.run(None, "ip", "-n", side.router, "route", "add", "default", "via", side.pub_address)
        self.run(None, "ip", "-n", side.host, "route", "add", "default", "via", lan)
        for namespace in (self.pub, side.router):
            # /proc/sys/net shows the opener's namespace; tee (coreutils) is everywhere.
            self.run(namespace, "tee", "/proc/sys/net/ipv4/ip_forward", stdin="1\n")
        self.run(side.router, "iptables-restore", stdin=_ruleset(nat, side.pub_address))

    def _veth(
        self, ns_a: str, name_a: str, addr_a: str, *, ns_b: str, name_b: str, ip_b: str
    ) -> None:
        length = addr_a.split("/")[1]
        temp_a, temp_b = f"{self.prefix}a", f"{self.prefix}b"  # created in the root namespace
        self.run(None, "ip", "link", "add", temp_a, "type", "veth", "peer", "name", temp_b)
        for temp, namespace, name, address in (
            (temp_a, ns_a, name_a, addr_a),
            (temp_b, ns_b, name_b, f"{ip_b}/{length}"),
        ):
            self.run(None, "ip", "link", "set", temp, "netns", namespace, "name", name)
            self.run(None, "ip", "-n", namespace, "addr", "add", address, "dev", name)
            self.run(None, "ip", "-n", namespace, "link", "set", name, "up")

    def teardown(self) -> None:
        for daemon in reversed(self.daemons):
            with contextlib.suppress(Exception):
                self.stop(daemon)
        for namespace in reversed(self.created):
            with contextlib.suppress(Exception):
                pids = self.run(None, "ip", "netns", "pids", namespace).stdout.split()
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(pid), signal.SIGKILL)
            with contextlib.suppress(Exception):
                self.run(None, "ip", "netns", "del", namespace)
        with contextlib.suppress(Exception):  # a veth left in the root namespace by a failure
            self.run(None, "ip", "link", "del", f"{self.prefix}a")
        self.created.clear()


def _watch(
    pipe: IO[bytes], copy: Path, ready: re.Pattern[str], daemon: Daemon, found: threading.Event
) -> None:
    with pipe, copy.open("wb") as out:
        for line in iter(pipe.readline, b""):
            out.write(line)
            out.flush()
            if not daemon.ready_line:
                text = line.decode("utf-8", "replace")
                if ready.search(text):
                    daemon.ready_line = text.strip()
                    found.set()
    found.set()  # it exited: the waiter learns at once rather than at its deadline


@contextmanager
def nat_lab(folder: Path, left: Nat, right: Nat) -> Iterator[Lab]:
    """Build the lab with ``left`` as A's router and ``right`` as B's; always tear it down."""
    folder.mkdir(parents=True, exist_ok=True)
    lab = Lab(folder, left, right)
    try:
        lab.build()
        yield lab
    finally:
        lab.teardown()
