"""End to end: `wavesync udt recv` and `wavesync udt send` as real programs on loopback.

Netcat over UDT: 20 MB of random bytes go in the sender's stdin and must come
out of the receiver's stdout with the same SHA-256, and both programs must exit
0 (the exit-status contract: the whole stream delivered and closed cleanly).
Pipes and regular files are both used for stdin/stdout, since the programs read
and write each differently. Every runtime (``--adapter anyio|asyncio|trio|blocking``)
runs the same programs: each carries a stream to itself, and the asyncio and
blocking ones to each other, by listen/connect and by rendezvous, and each fails
alike. Every wait has a deadline; none is a sleep.
"""

from __future__ import annotations

import hashlib
import os
import re
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.daemons import WAVESYNC, free_udp_port, run_wavesync

WAIT = 60.0  # seconds a whole transfer may take before the test fails
SIZE = 20 * 1024 * 1024
#: Per runtime and pair: a few MB, enough for many flow windows and ACK rounds.
PAIR_SIZE = 4 * 1024 * 1024
ADAPTERS = ("anyio", "asyncio", "trio", "blocking")
#: (sender, receiver): each runtime with itself, and asyncio and blocking across.
PAIRS = [(adapter, adapter) for adapter in ADAPTERS] + [
    ("blocking", "asyncio"),
    ("asyncio", "blocking"),
]
PAIR_IDS = [f"send-{sender}+recv-{receiver}" for sender, receiver in PAIRS]


@contextmanager
def wavesync_udt(*args: str, **streams: Any) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen([WAVESYNC, "udt", *args], **streams)  # noqa: S603
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()


def stderr_line(process: subprocess.Popen[bytes], pattern: str) -> re.Match[bytes]:
    """Wait (with a deadline) for the first stderr line and match it."""
    assert process.stderr is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stderr, selectors.EVENT_READ)
        assert selector.select(10.0), "no line on stderr"
    line = process.stderr.readline()
    match = re.search(pattern.encode(), line)
    assert match, line
    return match


def communicate_in_thread(
    process: subprocess.Popen[bytes], results: dict[str, tuple[bytes, bytes]], name: str
) -> threading.Thread:
    thread = threading.Thread(
        target=lambda: results.update({name: process.communicate(timeout=WAIT)}), daemon=True
    )
    thread.start()
    return thread


def test_twenty_megabytes_through_pipes_listen_and_connect() -> None:
    payload = os.urandom(SIZE)
    results: dict[str, tuple[bytes, bytes]] = {}
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    with wavesync_udt("recv", "--listen", "127.0.0.1:0", **pipes) as receiver:
        port = int(stderr_line(receiver, r"listening on udp 127\.0\.0\.1:(\d+)")[1])
        with wavesync_udt("send", "--connect", f"127.0.0.1:{port}", **pipes) as sender:
            reading = communicate_in_thread(receiver, results, "recv")
            _, send_err = sender.communicate(payload, timeout=WAIT)
            reading.join(WAIT)
            assert sender.returncode == 0, send_err
        assert receiver.wait(WAIT) == 0, results["recv"][1]
    received, _ = results["recv"]
    assert len(received) == SIZE
    assert hashlib.sha256(received).hexdigest() == hashlib.sha256(payload).hexdigest()


def carried(payload: bytes, recv: tuple[str, ...], send: tuple[str, ...]) -> bytes:
    """``payload`` from ``udt send *send --connect`` to ``udt recv *recv --listen``:
    what the receiver wrote, both having exited 0."""
    results: dict[str, tuple[bytes, bytes]] = {}
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    with wavesync_udt("recv", *recv, "--listen", "127.0.0.1:0", **pipes) as receiver:
        port = int(stderr_line(receiver, r"listening on udp 127\.0\.0\.1:(\d+)")[1])
        with wavesync_udt("send", *send, "--connect", f"127.0.0.1:{port}", **pipes) as sender:
            reading = communicate_in_thread(receiver, results, "recv")
            _, send_err = sender.communicate(payload, timeout=WAIT)
            reading.join(WAIT)
            assert sender.returncode == 0, send_err
        assert receiver.wait(WAIT) == 0, results["recv"][1]
    return results["recv"][0]


@pytest.mark.parametrize("congestion", ["native", "rate"])
def test_the_sender_takes_either_congestion_control(congestion: str) -> None:
    payload = os.urandom(4 * 1024 * 1024)
    assert carried(payload, (), ("--congestion", congestion)) == payload


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_each_runtime_sends_with_gso_and_the_stream_arrives_whole(adapter: str) -> None:
    payload = os.urandom(4 * 1024 * 1024)
    assert carried(payload, ("--adapter", adapter), ("--gso", "--adapter", adapter)) == payload


def test_the_sender_takes_a_bandwidth_cap() -> None:
    # How the cap paces is the core's (test_connection_transfer.py); here: the CLI
    # hands it over and the stream still arrives whole.
    payload = os.urandom(1024 * 1024)
    assert carried(payload, (), ("--max-bandwidth", "50000000")) == payload


@pytest.mark.parametrize("rate", ["0", "-5", "fast"])
def test_a_bandwidth_cap_that_is_not_a_positive_whole_number_is_refused(rate: str) -> None:
    result = run_wavesync("udt", "send", "--connect", "127.0.0.1:9", f"--max-bandwidth={rate}")
    assert result.returncode == 2
    assert "--max-bandwidth" in result.stderr


def test_an_unknown_congestion_control_is_refused() -> None:
    result = run_wavesync("udt", "send", "--connect", "127.0.0.1:9", "--congestion", "cubic")
    assert result.returncode == 2
    assert "invalid choice: 'cubic'" in result.stderr


def test_twenty_megabytes_by_rendezvous_from_a_file_to_a_file(tmp_path: Path) -> None:
    source, target = tmp_path / "source", tmp_path / "target"
    source.write_bytes(os.urandom(SIZE))
    left, right = free_udp_port(), free_udp_port()
    recv = ("recv", "--rendezvous", "--local", f"127.0.0.1:{left}", "--peer", f"127.0.0.1:{right}")
    send = ("send", "--rendezvous", "--local", str(right), "--peer", f"127.0.0.1:{left}")
    with (
        source.open("rb") as stdin,
        target.open("wb") as stdout,
        wavesync_udt(*recv, stdout=stdout, stderr=subprocess.PIPE) as receiver,
        wavesync_udt(*send, stdin=stdin, stderr=subprocess.PIPE) as sender,
    ):
        _, send_err = sender.communicate(timeout=WAIT)
        _, recv_err = receiver.communicate(timeout=WAIT)
        assert sender.returncode == 0, send_err
        assert receiver.returncode == 0, recv_err
        assert recv_err.startswith(b"rendezvous from udp 127.0.0.1:%d" % left)
    assert _sha256(target) == _sha256(source)


def test_send_to_nobody_exits_1_with_one_line() -> None:
    started = time.monotonic()
    result = run_wavesync("udt", "send", "--connect", f"127.0.0.1:{free_udp_port()}")
    assert result.returncode == 1
    assert re.fullmatch(
        r"wavesync udt send: udt connect to 127\.0\.0\.1:\d+ failed: .+\n", result.stderr
    )
    assert time.monotonic() - started < 15.0


def test_rendezvous_needs_local_and_peer() -> None:
    result = run_wavesync("udt", "recv", "--rendezvous", "--peer", "127.0.0.1:9")
    assert result.returncode == 2
    assert "--rendezvous needs --local and --peer" in result.stderr


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_an_interrupted_sender_makes_the_receiver_fail_not_succeed_with_less(
    adapter: str,
) -> None:
    # Ctrl-C on the sender aborts its connection; its Shutdown says so, and the
    # receiver must not exit 0 with a truncated stream on stdout.
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    runtime = ("--adapter", adapter)
    with wavesync_udt("recv", *runtime, "--listen", "127.0.0.1:0", **pipes) as receiver:
        port = int(stderr_line(receiver, r"listening on udp 127\.0\.0\.1:(\d+)")[1])
        connect = ("send", *runtime, "--connect", f"127.0.0.1:{port}")
        with wavesync_udt(*connect, **pipes) as sender:
            assert sender.stdin is not None
            assert receiver.stdout is not None
            sender.stdin.write(os.urandom(1024 * 1024))
            sender.stdin.flush()
            # Wait until bytes come out of the receiver: the stream is flowing.
            with selectors.DefaultSelector() as selector:
                selector.register(receiver.stdout, selectors.EVENT_READ)
                assert selector.select(WAIT), "nothing arrived"
            sender.send_signal(signal.SIGINT)
            sender.wait(timeout=WAIT)
            assert sender.returncode != 0
            _, receive_err = receiver.communicate(timeout=WAIT)
    assert receiver.returncode == 1, receive_err
    assert b"PEER_ABORTED" in receive_err, receive_err


# --- every runtime: --adapter anyio|asyncio|trio|blocking --------------------------------


@pytest.mark.parametrize(("sender_adapter", "receiver_adapter"), PAIRS, ids=PAIR_IDS)
def test_each_runtime_carries_a_stream_through_pipes_by_listen_and_connect(
    sender_adapter: str, receiver_adapter: str
) -> None:
    payload = os.urandom(PAIR_SIZE)
    results: dict[str, tuple[bytes, bytes]] = {}
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    recv = ("recv", "--adapter", receiver_adapter, "--listen", "127.0.0.1:0")
    with wavesync_udt(*recv, **pipes) as receiver:
        port = int(stderr_line(receiver, r"listening on udp 127\.0\.0\.1:(\d+)")[1])
        send = ("send", "--adapter", sender_adapter, "--connect", f"127.0.0.1:{port}")
        with wavesync_udt(*send, **pipes) as sender:
            reading = communicate_in_thread(receiver, results, "recv")
            _, send_err = sender.communicate(payload, timeout=WAIT)
            reading.join(WAIT)
            assert sender.returncode == 0, send_err
            assert send_err == b""  # nothing but the stream's own lines, and connect has none
        assert receiver.wait(WAIT) == 0, results["recv"][1]
    received, recv_err = results["recv"]
    assert recv_err == b""  # the listening line was read above; nothing else is said
    assert len(received) == PAIR_SIZE
    assert received == payload


@pytest.mark.parametrize(("sender_adapter", "receiver_adapter"), PAIRS, ids=PAIR_IDS)
def test_each_runtime_carries_a_stream_by_rendezvous_from_a_file_to_a_file(
    tmp_path: Path, sender_adapter: str, receiver_adapter: str
) -> None:
    source, target = tmp_path / "source", tmp_path / "target"
    source.write_bytes(os.urandom(PAIR_SIZE))
    left, right = free_udp_port(), free_udp_port()
    recv = (
        "recv", "--adapter", receiver_adapter, "--rendezvous",
        "--local", f"127.0.0.1:{left}", "--peer", f"127.0.0.1:{right}",
    )  # fmt: skip
    send = (
        "send", "--adapter", sender_adapter, "--rendezvous",
        "--local", str(right), "--peer", f"127.0.0.1:{left}",
    )  # fmt: skip
    with (
        source.open("rb") as stdin,
        target.open("wb") as stdout,
        wavesync_udt(*recv, stdout=stdout, stderr=subprocess.PIPE) as receiver,
        wavesync_udt(*send, stdin=stdin, stderr=subprocess.PIPE) as sender,
    ):
        _, send_err = sender.communicate(timeout=WAIT)
        _, recv_err = receiver.communicate(timeout=WAIT)
        assert sender.returncode == 0, send_err
        assert receiver.returncode == 0, recv_err
        # The announce lines are the same words on every runtime.
        assert recv_err == b"rendezvous from udp 127.0.0.1:%d with 127.0.0.1:%d\n" % (left, right)
        assert send_err == b"rendezvous from udp 0.0.0.0:%d with 127.0.0.1:%d\n" % (right, left)
    assert target.stat().st_size == PAIR_SIZE
    assert _sha256(target) == _sha256(source)


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_each_runtime_exits_1_with_one_line_when_nobody_answers(adapter: str) -> None:
    port = free_udp_port()
    result = run_wavesync("udt", "send", "--adapter", adapter, "--connect", f"127.0.0.1:{port}")
    assert result.returncode == 1
    assert result.stderr == (
        f"wavesync udt send: udt connect to 127.0.0.1:{port} failed:"
        " timeout: no answer before the connect timeout\n"
    )


def test_an_unknown_adapter_is_refused() -> None:
    result = run_wavesync("udt", "recv", "--adapter", "gevent", "--listen", "127.0.0.1:0")
    assert result.returncode == 2
    assert "invalid choice: 'gevent'" in result.stderr
