"""Relay: bulk throughput, time to pair a client, and the daemon's memory, side by side.

Issue targets: relay throughput ≥ squid's CONNECT tunnel in the same run; a client
paired in ≤ 2 ms (p50) when standby connections are ready; 10,000 standby connections
+ 1,000 spliced sessions in under 1 GiB. One run measures:

1. Bulk throughput over loopback, one transfer of ``--mib`` MiB at a time, the same
   sender and sink code on every path (blocking sockets, 1 MiB ``sendall`` /
   ``recv_into`` buffers, the sink in a thread of this process, the sender in its main
   thread): direct TCP to the sink; through the relay (client → relay → the sink's
   standby connection, paired by the real handshakes); through squid's CONNECT tunnel
   (a squid of our own, generated minimal config, no cache; skipped with a reason when
   ``squid`` is not on PATH). The clock runs from the sender's first byte of payload to
   the sink's last; each path runs ``--rounds`` times, interleaved, and the median is
   reported, with the CPU time per GB of the relay or squid process and of this one.
2. Time to pair: ``--connects`` clients one after another, each timed from its TCP
   connect to the relay's 101 (``RelayConnect``), while a load-side server agent on
   the same event loop keeps ``--keep`` standby connections of one server ready (it
   answers OPEN with READY and opens a replacement at once; every client waits until
   the pool is full again). A second relay row has the agent open the replacement only
   once the client has its 101: the difference is what handling the replacement's
   handshake first costs the client. Side by side: the same client against a plain server on
   this event loop that answers the request head at once (the floor: TCP connect and
   one round trip), and squid's CONNECT (connect, request, 200) to a listener there.
3. Memory: a fresh ``wavesync relay`` process, its VmRSS (/proc/PID/status) when idle,
   holding ``--standby`` standby connections (``--servers`` server ids, signed requests,
   unique nonces), then with ``--sessions`` clients paired and their sessions spliced
   and idle (the agent replaced every standby connection it lost, so the standby count
   is back to ``--standby``).

The relay always runs as its own process (``python -m wavesync_adapters.cli relay``,
the ``wavesync relay`` command); squid too; the load (senders, sinks, agents, clients)
runs in this process. The machine has 2 cores and nothing is pinned.

    python bench/relay.py [--mib N] [--rounds R] [--connects C] [--keep K]
                          [--standby S] [--servers V] [--sessions A] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import importlib.metadata
import os
import platform
import resource
import secrets
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.abc

from wavesync_proto import __version__
from wavesync_proto.addresses import Endpoint
from wavesync_proto.mediator.systems import format_system_entry
from wavesync_proto.relay.client import RelayConnect, RelayPaired
from wavesync_proto.relay.standby import (
    StandbyAccepted,
    StandbyConnection,
    StandbyEnded,
    StandbyRefused,
    TunnelOpened,
)

LOOPBACK = "127.0.0.1"
#: The load's buffers: one sendall / recv_into call moves up to this much.
CHUNK = 1 << 20
RECEIVE = 65536
MB = 1e6
TARGET_PAIR_P50_MS = 2.0
TARGET_MEMORY = 1 << 30
#: How long any one stage may take before the bench gives up and says where it stuck;
#: ``--quick`` lowers it below the smoke test's own 120 s, so a stuck stage is named (and
#: the relay process stopped) instead of the whole bench being killed.
STAGE_TIMEOUT = 300.0
QUICK_STAGE_TIMEOUT = 30.0


# --- the relay and squid processes -------------------------------------------------------------


@dataclass
class System:
    """The one system every bench server belongs to: its id and key, as in systems.toml."""

    system_id: uuid.UUID = field(default_factory=uuid.uuid4)
    key: str = field(default_factory=lambda: secrets.token_urlsafe(32))


@dataclass
class Relay:
    process: subprocess.Popen[str]
    endpoint: Endpoint
    stderr_path: Path

    def check_alive(self) -> None:
        """Raise, with the end of its log, when the relay process has exited."""
        code = self.process.poll()
        if code is not None:
            log = self.stderr_path.read_text()[-4000:]
            raise RuntimeError(f"the relay process exited with {code}; its stderr:\n{log}")

    @property
    def host(self) -> str:
        """The Host header standby requests are signed for."""
        return f"{self.endpoint[0]}:{self.endpoint[1]}"


@contextlib.contextmanager
def relay_process(workdir: Path, system: System, log_level: str = "warning") -> Iterator[Relay]:
    """``wavesync relay`` on a free loopback port, with a systems file naming ``system``."""
    systems = workdir / "systems.toml"
    systems.write_text(format_system_entry(system.system_id, system.key, "bench"))
    stderr_path = workdir / f"relay-{time.monotonic_ns()}.log"
    command = [sys.executable, "-m", "wavesync_adapters.cli", "relay"]
    command += ["--listen", f"{LOOPBACK}:0", "--systems", str(systems), "--log-level", log_level]
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(  # noqa: S603 - our own package
            command, stdout=subprocess.PIPE, stderr=stderr, text=True
        )
    try:
        assert process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            if not selector.select(STAGE_TIMEOUT):
                raise TimeoutError(f"the relay printed nothing in {STAGE_TIMEOUT:.0f} s")
        line = process.stdout.readline()
        prefix = "relay listening on tcp "
        if not line.startswith(prefix):
            raise RuntimeError(f"the relay did not start: {line!r} {stderr_path.read_text()}")
        host, _, port = line[len(prefix) :].strip().rpartition(":")
        yield Relay(process, (host, int(port)), stderr_path)
    except BaseException:
        code = process.poll()
        print(
            f"relay process (pid {process.pid}, exit code {code}); its stderr:\n"
            + stderr_path.read_text()[-4000:],
            file=sys.stderr,
        )
        raise
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


SQUID_CONFIG = """\
http_port {host}:{port}
acl bench_local src {host}/32
http_access allow bench_local
http_access deny all
cache deny all
cache_mem 0 MB
access_log none
cache_log {dir}/cache.log
pid_filename {dir}/squid.pid
coredump_dir {dir}
shutdown_lifetime 0 seconds
"""


@dataclass
class Squid:
    process: subprocess.Popen[bytes]
    endpoint: Endpoint
    version: str


@contextlib.contextmanager
def squid_process(workdir: Path, squid: str) -> Iterator[Squid]:
    """Our own squid: CONNECT to any port from 127.0.0.1, no cache, in the foreground."""
    folder = workdir / "squid"
    folder.mkdir()
    folder.chmod(0o777)  # squid started as root drops to its cache_effective_user
    port = free_port()
    config = folder / "squid.conf"
    config.write_text(SQUID_CONFIG.format(host=LOOPBACK, port=port, dir=folder))
    version = subprocess.run(  # noqa: S603 - the squid on PATH
        [squid, "-v"], capture_output=True, text=True, check=True
    ).stdout.splitlines()[0]
    process = subprocess.Popen(  # noqa: S603 - the squid on PATH
        [squid, "-N", "-f", str(config)],
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                log = (folder / "cache.log").read_text() if (folder / "cache.log").exists() else ""
                raise RuntimeError(f"squid exited with {process.returncode}: {log[-2000:]}")
            try:
                socket.create_connection((LOOPBACK, port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield Squid(process, (LOOPBACK, port), version.removeprefix("Squid Cache: "))
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --- 1. throughput: the same sender and sink on every path ---------------------------------


def send_payload(sock: socket.socket, total: int) -> float:
    """Send ``total`` bytes, then half-close; the time the first byte was handed over."""
    block = memoryview(bytes(CHUNK))
    start = time.perf_counter()
    left = total
    while left:
        size = min(left, CHUNK)
        sock.sendall(block[:size])
        left -= size
    sock.shutdown(socket.SHUT_WR)
    return start


def sink_payload(sock: socket.socket, total: int, received: int = 0) -> float:
    """Read until ``total`` bytes (``received`` came already) and EOF; the time of the last."""
    buffer = bytearray(CHUNK)
    while received < total:
        size = sock.recv_into(buffer)
        if not size:
            raise RuntimeError(f"the sink got EOF after {received} of {total} bytes")
        received += size
    end = time.perf_counter()
    if sock.recv_into(buffer):
        raise RuntimeError("the sink got more than was sent")
    return end


class Worker(threading.Thread):
    """A thread whose result (or exception) the main thread collects with ``result()``."""

    def __init__(self, target: Callable[[], float]) -> None:
        super().__init__(daemon=True)
        self._target_function = target
        self._value: float | None = None
        self._error: BaseException | None = None

    def run(self) -> None:
        try:
            self._value = self._target_function()
        except BaseException as exc:  # handed to the main thread
            self._error = exc

    def result(self) -> float:
        self.join(STAGE_TIMEOUT)
        if self.is_alive():
            raise TimeoutError("the sink did not finish")
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value


def transfer_direct(total: int) -> float:
    with socket.create_server((LOOPBACK, 0)) as listener:

        def sink() -> float:
            connection, _ = listener.accept()
            with connection:
                return sink_payload(connection, total)

        worker = Worker(sink)
        worker.start()
        with socket.create_connection(listener.getsockname()) as sender:
            start = send_payload(sender, total)
        return worker.result() - start


def read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """A blocking read up to the blank line: (head, what followed it)."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(RECEIVE)
        if not more:
            raise RuntimeError(f"closed before the answer's end: {data!r}")
        data += more
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def transfer_squid(total: int, squid: Endpoint) -> float:
    with socket.create_server((LOOPBACK, 0)) as listener:

        def sink() -> float:
            connection, _ = listener.accept()
            with connection:
                return sink_payload(connection, total)

        worker = Worker(sink)
        worker.start()
        with socket.create_connection(squid) as sender:
            target = f"{LOOPBACK}:{listener.getsockname()[1]}"
            sender.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            head, rest = read_head(sender)
            if not head.startswith(b"HTTP/1.1 200") or rest:
                raise RuntimeError(f"squid answered {head!r}")
            start = send_payload(sender, total)
        return worker.result() - start


def new_standby(
    relay: Relay, system: System, server_id: uuid.UUID, now: float
) -> StandbyConnection:
    return StandbyConnection(
        key=system.key,
        system_id=system.system_id,
        server_id=server_id,
        relay_host=relay.host,
        unix_time=time.time(),
        nonce=os.urandom(16),
        now=now,
    )


def transfer_relay(total: int, relay: Relay, system: System) -> float:
    server_id = uuid.uuid4()
    standby_ready = threading.Event()

    def sink() -> float:
        with socket.create_connection(relay.endpoint) as connection:
            machine = new_standby(relay, system, server_id, time.monotonic())
            connection.sendall(machine.data_to_send())
            while True:
                data = connection.recv(RECEIVE)
                events = (
                    machine.data_received(data, time.monotonic())
                    if data
                    else machine.connection_lost()
                )
                for event in events:
                    if isinstance(event, StandbyAccepted):
                        standby_ready.set()
                    elif isinstance(event, TunnelOpened):
                        connection.sendall(machine.data_to_send())
                        return sink_payload(connection, total, len(event.first_bytes))
                    else:
                        raise RuntimeError(f"standby connection: {event}")

    worker = Worker(sink)
    worker.start()
    if not standby_ready.wait(30):
        worker.result()  # raises the sink's error, if it had one
        raise TimeoutError("the relay did not accept the standby connection")
    with socket.create_connection(relay.endpoint) as sender:
        connect = RelayConnect(relay_host=relay.host, now=time.monotonic(), server_id=server_id)
        sender.sendall(connect.data_to_send())
        result = None
        while result is None:
            data = sender.recv(RECEIVE)
            now = time.monotonic()
            result = connect.data_received(data, now) if data else connect.connection_lost()
        if not isinstance(result, RelayPaired) or result.first_bytes:
            raise RuntimeError(f"the relay did not pair the client: {result}")
        start = send_payload(sender, total)
        end = worker.result()
        # The sink closed after EOF: the relay passes that on, so the client sees EOF too.
        if sender.recv(RECEIVE):
            raise RuntimeError("the client got bytes it was never sent")
    return end - start


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of process ``pid`` (None: this process, all its threads)."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Transfers:
    """Per path, per round: MB/s, and CPU seconds per GB of the middle process and the load."""

    rates: list[float] = field(default_factory=list)
    middle_cpu: list[float] = field(default_factory=list)
    load_cpu: list[float] = field(default_factory=list)


def throughput(
    total: int, rounds: int, relay: Relay, system: System, squid: Squid | None
) -> dict[str, Transfers]:
    """The same transfer direct, through the relay and via squid, ``rounds`` times each."""
    paths: dict[str, tuple[Callable[[int], float], int | None]] = {
        "direct": (transfer_direct, None),
        "relay": (lambda size: transfer_relay(size, relay, system), relay.process.pid),
    }
    if squid is not None:
        squid_endpoint = squid.endpoint
        paths["squid"] = (lambda size: transfer_squid(size, squid_endpoint), squid.process.pid)
    for run, _ in paths.values():  # warm-up: a small transfer on every path
        run(min(total, 64 * CHUNK))
    results = {path: Transfers() for path in paths}
    gigabytes = total / 1e9
    for _ in range(rounds):
        for path, (run, middle) in paths.items():
            middle_before = cpu_seconds(middle) if middle is not None else 0.0
            load_before = cpu_seconds(None)
            seconds = run(total)
            load_cpu = cpu_seconds(None) - load_before
            results[path].rates.append(total / seconds / MB)
            results[path].load_cpu.append(load_cpu / gigabytes)
            if middle is not None:
                results[path].middle_cpu.append((cpu_seconds(middle) - middle_before) / gigabytes)
    return results


# --- non-blocking sockets on anyio, for the pairing and memory loads -----------------------


async def connect_raw(endpoint: Endpoint) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        code = sock.connect_ex(endpoint)
        if code == errno.EINPROGRESS:
            await anyio.wait_writable(sock)
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            raise OSError(code, os.strerror(code))
    except BaseException:
        sock.close()
        raise
    return sock


async def receive(sock: socket.socket) -> bytes:
    while True:
        try:
            return sock.recv(RECEIVE)
        except BlockingIOError:
            await anyio.wait_readable(sock)


async def send_all(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            await anyio.wait_writable(sock)


async def wait_closed(sock: socket.socket) -> None:
    """Read and drop until EOF (or a reset), then close."""
    with sock:
        try:
            while await receive(sock):
                pass
        except OSError:
            pass


async def relay_connect(relay: Relay, server_id: uuid.UUID) -> tuple[socket.socket, float]:
    """Connect through the relay; the socket (now a tunnel) and when the 101 arrived."""
    connect = RelayConnect(relay_host=relay.host, now=anyio.current_time(), server_id=server_id)
    sock = await connect_raw(relay.endpoint)
    try:
        await send_all(sock, connect.data_to_send())
        result = None
        while result is None:
            data = await receive(sock)
            now = anyio.current_time()
            result = connect.data_received(data, now) if data else connect.connection_lost()
        paired = time.perf_counter()
        if not isinstance(result, RelayPaired):
            raise RuntimeError(f"the relay did not pair the client: {result}")
    except BaseException:
        sock.close()
        raise
    return sock, paired


class Agent:
    """The load's server agent: keeps standby connections, answers OPEN, replaces them.

    ``servers`` server ids, ``keep`` standby connections each. A tunnel stays open (idle)
    until the client closes or the bench ends; a replacement is opened at once.
    """

    def __init__(
        self,
        relay: Relay,
        system: System,
        group: anyio.abc.TaskGroup,
        *,
        servers: int,
        keep: int,
        concurrency: int = 256,
        defer_replacements: bool = False,
    ) -> None:
        self.relay, self.system, self.group = relay, system, group
        #: Open a replacement only when ``replace_deferred()`` says so (not at OPEN).
        self.defer_replacements = defer_replacements
        self.deferred: list[uuid.UUID] = []
        self.server_ids = [uuid.uuid4() for _ in range(servers)]
        self.keep = keep
        self.idle = 0
        self.accepted = 0
        self.tunnels = 0
        self.changed = anyio.Event()
        self._handshakes = anyio.Semaphore(concurrency)

    def start(self) -> None:
        for server_id in self.server_ids:
            for _ in range(self.keep):
                self.group.start_soon(self.standby, server_id)

    def replace_deferred(self) -> None:
        for server_id in self.deferred:
            self.group.start_soon(self.standby, server_id)
        self.deferred.clear()

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await self.changed.wait()

    def notify(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()

    async def standby(self, server_id: uuid.UUID) -> None:
        async with self._handshakes:
            sock = await connect_raw(self.relay.endpoint)
            machine = new_standby(self.relay, self.system, server_id, anyio.current_time())
            try:
                await send_all(sock, machine.data_to_send())
                tunnel = await self._feed(sock, machine, server_id, until_accepted=True)
            except BaseException:
                sock.close()
                raise
        if not tunnel:
            await self._feed(sock, machine, server_id, until_accepted=False)

    async def _feed(
        self,
        sock: socket.socket,
        machine: StandbyConnection,
        server_id: uuid.UUID,
        *,
        until_accepted: bool,
    ) -> bool:
        """Feed the machine until it is accepted (False) or has become a tunnel (True).

        A tunnel gets READY, a replacement standby connection is started, and the
        tunnel is held (idle) until its client closes it.
        """
        while True:
            data = await receive(sock)
            now = anyio.current_time()
            for event in machine.data_received(data, now) if data else machine.connection_lost():
                if isinstance(event, StandbyAccepted):
                    self.idle += 1
                    self.accepted += 1
                    self.notify()
                    if until_accepted:
                        return False
                elif isinstance(event, TunnelOpened):
                    await send_all(sock, machine.data_to_send())
                    self.idle -= 1
                    self.tunnels += 1
                    if self.defer_replacements:
                        self.deferred.append(server_id)
                    else:
                        self.group.start_soon(self.standby, server_id)
                    self.notify()
                    await wait_closed(sock)
                    return True
                elif isinstance(event, StandbyRefused | StandbyEnded):
                    sock.close()
                    raise RuntimeError(f"standby connection of {server_id}: {event}")


# --- 2. time to pair ------------------------------------------------------------------------


@dataclass
class Latencies:
    """Milliseconds, one per connect."""

    values: list[float]

    def percentile(self, fraction: float) -> float:
        ordered = sorted(self.values)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def serve_listener(
    handler: Callable[[socket.socket], Coroutine[object, object, None]],
    *,
    task_status: anyio.abc.TaskStatus[Endpoint] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Accept on a loopback port forever, one ``handler`` task per connection."""
    with socket.create_server((LOOPBACK, 0), backlog=1024) as listener:
        listener.setblocking(False)
        async with anyio.create_task_group() as group:
            task_status.started((LOOPBACK, int(listener.getsockname()[1])))
            while True:
                await anyio.wait_readable(listener)
                with contextlib.suppress(BlockingIOError):
                    while True:
                        sock, _ = listener.accept()
                        sock.setblocking(False)
                        group.start_soon(handler, sock)


async def answer_head(sock: socket.socket) -> None:
    """The reference server: answer a request head at once, as the relay's 101 would be."""
    with sock:
        data = b""
        while b"\r\n\r\n" not in data:
            more = await receive(sock)
            if not more:
                return
            data += more
        await send_all(sock, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: bench\r\n\r\n")
        await wait_closed(sock)


async def timed_plain(endpoint: Endpoint, request: bytes, answer: bytes) -> float:
    """Connect, send ``request``, read until a head starting with ``answer``; milliseconds."""
    start = time.perf_counter()
    sock = await connect_raw(endpoint)
    with sock:
        await send_all(sock, request)
        data = b""
        while b"\r\n\r\n" not in data:
            more = await receive(sock)
            if not more:
                raise RuntimeError(f"closed before the answer: {data!r}")
            data += more
        elapsed = (time.perf_counter() - start) * 1000
        if not data.startswith(answer):
            raise RuntimeError(f"unexpected answer {data!r}")
    return elapsed


@dataclass
class Pairing:
    relay: Latencies
    relay_deferred: Latencies
    plain: Latencies
    squid: Latencies | None


async def relay_pairings(
    relay: Relay, system: System, group: anyio.abc.TaskGroup, count: int, keep: int, *, defer: bool
) -> Latencies:
    """``count`` clients one after another, each once ``keep`` standby connections are ready."""
    agent = Agent(relay, system, group, servers=1, keep=keep, defer_replacements=defer)
    agent.start()
    times: list[float] = []
    for _ in range(count):
        await agent.wait_until(lambda: agent.idle >= keep)
        start = time.perf_counter()
        sock, paired = await relay_connect(relay, agent.server_ids[0])
        sock.close()
        times.append((paired - start) * 1000)
        agent.replace_deferred()
    return Latencies(times)


async def pairing(
    relay: Relay, system: System, squid: Squid | None, connects: int, keep: int
) -> Pairing:
    warmup = max(5, connects // 20)
    with anyio.fail_after(STAGE_TIMEOUT):
        async with anyio.create_task_group() as group:
            await relay_pairings(relay, system, group, warmup, keep, defer=False)
            now = await relay_pairings(relay, system, group, connects, keep, defer=False)
            deferred = await relay_pairings(relay, system, group, connects, keep, defer=True)

            plain_endpoint = await group.start(serve_listener, answer_head)
            request = RelayConnect(relay_host="bench", now=0, server_id=uuid.uuid4())
            head = request.data_to_send()
            plain = [
                await timed_plain(plain_endpoint, head, b"HTTP/1.1 101")
                for _ in range(warmup + connects)
            ][warmup:]

            squid_times = None
            if squid is not None:
                sink_endpoint = await group.start(serve_listener, wait_closed)
                target = f"{sink_endpoint[0]}:{sink_endpoint[1]}"
                connect = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()
                squid_times = [
                    await timed_plain(squid.endpoint, connect, b"HTTP/1.1 200")
                    for _ in range(warmup + connects)
                ][warmup:]
            group.cancel_scope.cancel()
    return Pairing(
        now,
        deferred,
        Latencies(plain),
        None if squid_times is None else Latencies(squid_times),
    )


# --- 3. memory --------------------------------------------------------------------------------


def process_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in bytes, and its open file descriptors."""
    status: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            status[name] = int(value.split()[0]) * 1024
    status["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    # Kernel memory of all TCP sockets, system-wide (both ends, and anybody else's): pages.
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            fields = line.split()
            status["tcp_kernel"] = int(fields[fields.index("mem") + 1]) * os.sysconf("SC_PAGESIZE")
    return status


@dataclass
class Memory:
    pid: int
    idle: dict[str, int]
    standby: dict[str, int]
    sessions: dict[str, int]
    standby_seconds: float
    sessions_seconds: float


async def memory(
    workdir: Path,
    system: System,
    *,
    standby_total: int,
    servers: int,
    sessions: int,
    log_level: str = "warning",
) -> Memory:
    """A fresh relay process: idle, with the standby connections, then with the sessions."""
    with relay_process(workdir, system, log_level) as relay:
        pid = relay.process.pid
        await anyio.sleep(1)
        idle = process_status(pid)
        with anyio.fail_after(STAGE_TIMEOUT):
            async with anyio.create_task_group() as group:
                agent = Agent(relay, system, group, servers=servers, keep=standby_total // servers)
                start = time.perf_counter()
                agent.start()
                await agent.wait_until(lambda: agent.accepted >= standby_total)
                standby_seconds = time.perf_counter() - start
                await anyio.sleep(1)
                standby = process_status(pid)

                clients: list[socket.socket] = []
                limit = anyio.Semaphore(64)

                async def client(number: int) -> None:
                    async with limit:
                        sock, _ = await relay_connect(relay, agent.server_ids[number % servers])
                    clients.append(sock)
                    agent.notify()

                start = time.perf_counter()
                for number in range(sessions):
                    group.start_soon(client, number)
                await agent.wait_until(
                    lambda: (
                        len(clients) == sessions
                        and agent.tunnels == sessions
                        and agent.idle == standby_total
                    )
                )
                sessions_seconds = time.perf_counter() - start
                await anyio.sleep(1)
                with_sessions = process_status(pid)
                for sock in clients:
                    sock.close()
                group.cancel_scope.cancel()
        if relay.process.poll() is not None:
            raise RuntimeError(f"the relay died: {relay.stderr_path.read_text()[-2000:]}")
    return Memory(pid, idle, standby, with_sessions, standby_seconds, sessions_seconds)


# --- the report -------------------------------------------------------------------------------


def raise_fd_limit() -> int:
    """Soft limit of open files up to the hard one (the relay process inherits it)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def loadavg() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def mib(size: float) -> str:
    return f"{size / 2**20:,.1f}"


def main() -> int:  # noqa: PLR0915 - one report, top to bottom
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024, help="MiB per bulk transfer")
    parser.add_argument("--rounds", type=int, default=3, help="bulk transfers per path")
    parser.add_argument("--connects", type=int, default=500, help="timed pairings")
    parser.add_argument("--keep", type=int, default=8, help="standby connections kept ready")
    parser.add_argument("--standby", type=int, default=10_000, help="held for the memory row")
    parser.add_argument("--servers", type=int, default=200, help="server ids they belong to")
    parser.add_argument("--sessions", type=int, default=1_000, help="spliced sessions held")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
    parser.add_argument("--relay-log-level", default="warning", help="the relay's --log-level")
    args = parser.parse_args()
    if args.quick:
        global STAGE_TIMEOUT  # noqa: PLW0603 - one setting, read by every stage
        STAGE_TIMEOUT = QUICK_STAGE_TIMEOUT
        args.mib, args.rounds, args.connects = 20, 1, 50
        args.standby, args.servers, args.sessions = 100, 2, 10
    if args.standby % args.servers or args.standby // args.servers > 64:
        parser.error("--standby must be a multiple of --servers, ≤ 64 per server")
    fd_limit = raise_fd_limit()
    total = args.mib * 2**20
    squid_path = shutil.which("squid")

    print(
        f"wavesync {__version__} relay, Python {platform.python_version()},"
        f" anyio {importlib.metadata.version('anyio')} (asyncio),"
        f" {platform.system()} {platform.release()}, {os.cpu_count()} CPUs,"
        f" open files limit {fd_limit}"
    )
    print(f"load average at start: {loadavg()} (other processes share the 2 cores)")
    with tempfile.TemporaryDirectory(prefix="wavesync-relay-bench-") as folder:
        workdir = Path(folder)
        workdir.chmod(0o711)  # squid's user must reach its own folder inside
        system = System()
        with contextlib.ExitStack() as stack:
            relay = stack.enter_context(relay_process(workdir, system, args.relay_log_level))
            squid = None
            if squid_path is not None:
                squid = stack.enter_context(squid_process(workdir, squid_path))
            squid_where = (
                f"{squid.version}: its own process (pid {squid.process.pid}), -N, no cache"
                if squid is not None
                else "not on PATH, skipped"
            )
            print(
                f"processes: relay: `wavesync relay` (pid {relay.process.pid}); squid"
                f" {squid_where};\n           load: this process (pid {os.getpid()}):"
                " bulk sender in the main thread, sink in a second thread (blocking sockets,"
                f" {CHUNK >> 20} MiB sendall/recv_into);\n           pairing clients and"
                " the server agent on one anyio event loop (non-blocking sockets)\n"
            )

            transfers = throughput(total, args.rounds, relay, system, squid)
            relay.check_alive()
            print(
                f"throughput, loopback, {args.mib} MiB per transfer, median of {args.rounds}"
                " (MB = 10^6 bytes); CPU: seconds per GB moved, of the relay or squid process"
                " (middle) and of this process (load: sender + sink)"
            )
            print(
                f"{'path':52} {'MB/s':>9} {'min':>9} {'max':>9} {'middle CPU':>11} {'load CPU':>9}"
            )
            names = {
                "direct": "throughput: direct TCP (sender → sink)",
                "relay": "throughput: relay (client → relay → standby → sink)",
                "squid": "throughput: squid CONNECT (client → squid → sink)",
            }
            median = {path: statistics.median(t.rates) for path, t in transfers.items()}
            for path, name in names.items():
                if path not in transfers:
                    print(f"{name:52} skipped: `squid` is not on PATH (apt-get install squid)")
                    continue
                result = transfers[path]
                middle = (
                    f"{statistics.median(result.middle_cpu):>11.3f}" if result.middle_cpu else ""
                )
                print(
                    f"{name:52} {median[path]:>9,.1f} {min(result.rates):>9,.1f}"
                    f" {max(result.rates):>9,.1f} {middle:>11}"
                    f" {statistics.median(result.load_cpu):>9.3f}"
                )
            ratios = f"relay/direct {median['relay'] / median['direct']:.2f}"
            if "squid" in median:
                ratios += f", relay/squid {median['relay'] / median['squid']:.2f}"
            print(ratios + "\n")

            pairs = anyio.run(pairing, relay, system, squid, args.connects, args.keep)
            print(
                f"time to pair, {args.connects} connects one after another (after a warm-up),"
                f" {args.keep} standby connections ready before each"
            )
            print(f"{'measure, milliseconds':52} {'p50':>7} {'p90':>7} {'p99':>7} {'max':>7}")
            rows = {
                "pairing: relay (connect → request → 101)": pairs.relay,
                "pairing: relay, agent replaces after the 101": pairs.relay_deferred,
                "pairing: plain server on the load's loop (→ answer)": pairs.plain,
                "pairing: squid CONNECT (connect → request → 200)": pairs.squid,
            }
            for name, times in rows.items():
                if times is None:
                    print(f"{name:52} skipped: `squid` is not on PATH (apt-get install squid)")
                    continue
                marks = [times.percentile(q) for q in (0.5, 0.9, 0.99)] + [max(times.values)]
                print(f"{name:52}" + "".join(f" {mark:>7.3f}" for mark in marks))
            print()

        mem = anyio.run(
            functools.partial(
                memory,
                workdir,
                system,
                standby_total=args.standby,
                servers=args.servers,
                sessions=args.sessions,
                log_level=args.relay_log_level,
            )
        )
    per_standby = (mem.standby["VmRSS"] - mem.idle["VmRSS"]) / args.standby
    per_session = (mem.sessions["VmRSS"] - mem.standby["VmRSS"]) / args.sessions
    print(
        f"memory of a fresh `wavesync relay` process (pid {mem.pid}), VmRSS; standby"
        f" connections over {args.servers} server ids ({args.standby // args.servers} each);"
        " the load (one anyio loop, this process) replaced each standby connection a"
        " client took"
    )
    print(
        f"{'state':52} {'MiB':>9} {'bytes each':>11} {'fds':>7} {'seconds':>8} {'kernel TCP':>11}"
    )
    states = [
        ("memory: relay idle", mem.idle, "", ""),
        (
            f"memory: + {args.standby:,} standby connections",
            mem.standby,
            f"{per_standby:,.0f}",
            f"{mem.standby_seconds:.2f}",
        ),
        (
            f"memory: + {args.sessions:,} idle spliced sessions",
            mem.sessions,
            f"{per_session:,.0f}",
            f"{mem.sessions_seconds:.2f}",
        ),
    ]
    for name, status, each, took in states:
        print(
            f"{name:52} {mib(status['VmRSS']):>9} {each:>11} {status['fds']:>7}"
            f" {took:>8} {mib(status['tcp_kernel']):>11}"
        )
    connections = args.standby + 2 * args.sessions
    overall = (mem.sessions["VmRSS"] - mem.idle["VmRSS"]) / connections
    print(
        f"relay peak RSS (VmHWM) {mib(mem.sessions['VmHWM'])} MiB; {overall:,.0f} bytes per TCP"
        f" connection held ({connections:,}: the standby ones and both ends of each session)."
        "\n'bytes each': the step's RSS growth per connection (per session: both its ends,"
        " its splice, and the standby connection that replaced the one it took); kernel TCP:"
        " socket buffers of the whole machine (/proc/net/sockstat), both ends, not in any RSS\n"
    )

    verdicts = [
        "relay ≥ squid CONNECT: "
        + (
            ("met" if median["relay"] >= median["squid"] else "NOT met")
            if "squid" in median
            else "not measured (no squid)"
        ),
        f"pairing p50 ≤ {TARGET_PAIR_P50_MS:g} ms: "
        + ("met" if pairs.relay.percentile(0.5) <= TARGET_PAIR_P50_MS else "NOT met"),
        f"{args.standby:,} standby + {args.sessions:,} sessions < 1 GiB: "
        + ("met" if mem.sessions["VmRSS"] < TARGET_MEMORY else "NOT met")
        + f" ({mib(mem.sessions['VmRSS'])} MiB)",
    ]
    print(f"load average at the end: {loadavg()}")
    print("targets: " + "; ".join(verdicts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
