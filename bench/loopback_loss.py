"""Packet loss on loopback for the benchmarks: iptables' ``statistic`` match on ``lo``.

This kernel has no netem. ``packet_loss(ports, P)`` inserts, for each port, two INPUT
rules on ``lo`` that drop UDP datagrams to and from it with probability P, and
deletes them when the block ends (Ctrl-C and SIGTERM included, if the caller turns
SIGTERM into SystemExit as bench/udt.py does). Each rule carries ``RULE_COMMENT``, so
a leftover one is easy to find (``iptables -S INPUT``). ``loss_unavailable()`` says
why it cannot run here (not root, no iptables, no statistic match), or None.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator

#: Tags our iptables rules, so that a leftover one is easy to find (iptables -S INPUT).
RULE_COMMENT = "wavesync-bench-udt-loss"


def free_port(kind: socket.SocketKind) -> int:
    """A port on 127.0.0.1 free a moment ago (the caller binds it soon after)."""
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _loss_rules(ports: tuple[int, ...], probability: float) -> list[list[str]]:
    """INPUT rules on ``lo`` dropping UDP to and from each port with ``probability``."""
    drop = ["-m", "statistic", "--mode", "random", "--probability", f"{probability:.4f}"]
    tag = ["-m", "comment", "--comment", RULE_COMMENT, "-j", "DROP"]
    return [
        ["-i", "lo", "-p", "udp", direction, str(port), *drop, *tag]
        for port in ports
        for direction in ("--dport", "--sport")
    ]


def _iptables(*args: str) -> subprocess.CompletedProcess[str]:
    iptables = shutil.which("iptables")
    if iptables is None:
        raise OSError("iptables is not installed (apt-get install iptables)")
    return subprocess.run(  # noqa: S603 - iptables with rules built here
        [iptables, "-w", "5", *args], capture_output=True, text=True, timeout=30, check=False
    )


def loss_unavailable() -> str | None:
    """Why the loss rows cannot run here, or None: root, iptables and its statistic match."""
    if os.geteuid() != 0:
        return "not measured: needs root (iptables)"
    if shutil.which("iptables") is None:
        return "not measured: iptables is not installed (apt-get install iptables)"
    try:
        with packet_loss((free_port(socket.SOCK_DGRAM),), 0.5):
            pass
    except OSError as exc:
        return f"not measured: {exc}"
    return None


@contextlib.contextmanager
def packet_loss(ports: tuple[int, ...], probability: float) -> Iterator[None]:
    """Drop ``probability`` of the UDP datagrams to and from ``ports`` on loopback while
    inside; every rule inserted is deleted on the way out, whatever happened."""
    installed: list[list[str]] = []
    try:
        for rule in _loss_rules(ports, probability):
            result = _iptables("-I", "INPUT", *rule)
            if result.returncode != 0:
                raise OSError(f"iptables -I INPUT {' '.join(rule)}: {result.stderr.strip()}")
            installed.append(rule)
        yield
    finally:
        for rule in reversed(installed):
            result = _iptables("-D", "INPUT", *rule)
            if result.returncode != 0:
                print(
                    f"WARNING: could not delete iptables rule (delete it by hand):"
                    f" iptables -D INPUT {' '.join(rule)}: {result.stderr.strip()}",
                    file=sys.stderr,
                )
