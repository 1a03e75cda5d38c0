"""The child processes of bench/adapters.py: one adapter's side of each measure.

``python bench/adapters.py --child ROLE ADAPTER ...`` runs ``child()`` here: a UDT
receiver or sender on that adapter's ``UdtEndpoint``, the connect-latency world (an
anyio relay, mediator and echo agent), or a client that times that adapter's
``Connector``. bench/adapters.py starts them, reads what they print (one JSON line
each) and makes the report; see its docstring for what is measured and how.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import resource
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

LOOPBACK = "127.0.0.1"
MB = 1e6
CHUNK = 1 << 20
SEED = 8
#: Each adapter's name here, and what ``--adapter`` calls it on the CLI.
ADAPTERS = {
    "anyio-asyncio": "anyio",
    "anyio-trio": "trio",
    "asyncio": "asyncio",
    "blocking": "blocking",
}
PATHS = ("tcp", "udp", "relay")
#: The issue's target: every adapter within this factor of the fastest.
TARGET_SLOWDOWN = 1.2
#: How long one child process (a transfer, a client's connects) may take.
STEP_TIMEOUT = 300.0
#: Idle time between two connects of a client, so the agent's standby pool refills.
CONNECT_GAP = 0.01
#: The world agent's standby connections (bench/connect.py keeps 2; a client here cannot
#: wait for the pool to refill, so it holds more).
WORLD_STANDBY = 8


# --- the payload -----------------------------------------------------------------------


def block() -> bytes:
    return random.Random(SEED).randbytes(CHUNK)  # noqa: S311 - a test pattern, not a secret


def payload_chunks(total: int) -> Iterator[bytes]:
    data = block()
    left = total
    while left:
        size = min(left, CHUNK)
        yield data if size == CHUNK else data[:size]
        left -= size


def payload_digest(total: int) -> str:
    hashed = hashlib.sha256()
    for chunk in payload_chunks(total):
        hashed.update(chunk)
    return hashed.hexdigest()


@dataclass
class Meter:
    """What a UDT receiver got: hashed and timed as it arrives (the first chunk untimed)."""

    hashed: Any = field(default_factory=hashlib.sha256)
    size: int = 0
    first_at: float = 0.0
    last_at: float = 0.0
    first_chunk: int = 0
    #: This process's CPU time (every thread) when the meter was made.
    cpu_start: float = field(default_factory=time.process_time)

    def feed(self, chunk: bytes) -> None:
        now = time.perf_counter()
        if self.size == 0:
            self.first_at, self.first_chunk = now, len(chunk)
        self.last_at = now
        self.size += len(chunk)
        self.hashed.update(chunk)

    def report(self) -> str:
        seconds = max(self.last_at - self.first_at, 1e-9)
        rate = (self.size - self.first_chunk) / seconds / MB
        cpu = time.process_time() - self.cpu_start
        digest = self.hashed.hexdigest()
        return json.dumps({"size": self.size, "rate": rate, "sha256": digest, "cpu": cpu})


def announce(port: int) -> None:
    print(f"port {port}", flush=True)


# --- child: UDT receiver and sender, per adapter ----------------------------------------


async def anyio_udt_recv() -> Meter:
    import anyio  # noqa: PLC0415 - each child imports only its own runtime

    from wavesync_adapters.anyio.udt import UdtEndpoint  # noqa: PLC0415

    meter = Meter()
    async with UdtEndpoint.bind((LOOPBACK, 0)) as endpoint:
        endpoint.listen()
        announce(endpoint.local_address[1])
        async with await endpoint.accept() as stream:
            while True:
                try:
                    meter.feed(await stream.receive(CHUNK))
                except anyio.EndOfStream:
                    break
    return meter


async def anyio_udt_send(port: int, total: int) -> None:
    from wavesync_adapters.anyio.udt import UdtEndpoint  # noqa: PLC0415

    async with UdtEndpoint.bind((LOOPBACK, 0)) as endpoint:
        stream = await endpoint.connect((LOOPBACK, port))
        for chunk in payload_chunks(total):
            await stream.send(chunk)
        await stream.aclose()  # graceful: returns once every byte is acknowledged


async def asyncio_udt_recv() -> Meter:
    import asyncio  # noqa: PLC0415

    from wavesync_adapters.asyncio.udt import create_udt_endpoint, start_udt_server  # noqa: PLC0415

    meter = Meter()
    done = asyncio.get_running_loop().create_future()

    async def take(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while chunk := await reader.read(CHUNK):
            meter.feed(chunk)
        writer.close()
        await writer.wait_closed()
        done.set_result(None)

    async with await create_udt_endpoint((LOOPBACK, 0)) as endpoint:
        server = await start_udt_server(take, endpoint=endpoint)
        announce(endpoint.local_address[1])
        await asyncio.wait_for(done, STEP_TIMEOUT)
        server.close()
    return meter


async def asyncio_udt_send(port: int, total: int) -> None:
    import asyncio  # noqa: PLC0415

    from wavesync_adapters.asyncio.udt import open_udt_connection  # noqa: PLC0415

    async with asyncio.timeout(STEP_TIMEOUT):
        _, writer = await open_udt_connection((LOOPBACK, port))
        for chunk in payload_chunks(total):
            writer.write(chunk)
            await writer.drain()
        writer.close()
        await writer.wait_closed()  # graceful: every byte acknowledged


def blocking_udt_recv() -> Meter:
    from wavesync_adapters.blocking.udt import UdtEndpoint  # noqa: PLC0415

    meter = Meter()
    with UdtEndpoint.bind((LOOPBACK, 0)) as endpoint:
        endpoint.listen()
        announce(endpoint.local_address[1])
        with endpoint.accept(timeout=STEP_TIMEOUT) as sock:
            sock.settimeout(STEP_TIMEOUT)
            while chunk := sock.recv(CHUNK):
                meter.feed(chunk)
    return meter


def blocking_udt_send(port: int, total: int) -> None:
    from wavesync_adapters.blocking.udt import UdtEndpoint  # noqa: PLC0415

    with (
        UdtEndpoint.bind((LOOPBACK, 0)) as endpoint,
        endpoint.connect((LOOPBACK, port), timeout=STEP_TIMEOUT) as sock,
    ):
        sock.settimeout(STEP_TIMEOUT)
        for chunk in payload_chunks(total):
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)  # a graceful UDT close (UDT has no half-close)
        if sock.recv(1):  # EOF once the close is acknowledged
            raise RuntimeError("the receiver sent bytes")


def run_on(adapter: str, function: Callable[..., Any], *args: Any) -> Any:
    """Run an async ``function`` on the adapter's event loop."""
    if adapter == "asyncio":
        import asyncio  # noqa: PLC0415

        return asyncio.run(function(*args))
    import anyio  # noqa: PLC0415

    return anyio.run(function, *args, backend=adapter.removeprefix("anyio-"))


def udt_child(role: str, adapter: str, args: list[str]) -> None:
    if role == "udt-recv":
        meter = (
            blocking_udt_recv()
            if adapter == "blocking"
            else run_on(adapter, asyncio_udt_recv if adapter == "asyncio" else anyio_udt_recv)
        )
        print(meter.report(), flush=True)
        return
    port, total = int(args[0]), int(args[1])
    cpu_start = time.process_time()
    if adapter == "blocking":
        blocking_udt_send(port, total)
    else:
        run_on(adapter, asyncio_udt_send if adapter == "asyncio" else anyio_udt_send, port, total)
    print(json.dumps({"cpu": time.process_time() - cpu_start}), flush=True)


# --- child: the connect world (anyio server side) and a client per adapter --------------


async def serve_world() -> None:
    import anyio  # noqa: PLC0415
    import anyio.to_thread  # noqa: PLC0415

    import connect as connect_bench  # noqa: PLC0415 - bench/connect.py, the same world

    connect_bench.STANDBY = WORLD_STANDBY
    async with connect_bench.world(default_limits=False, settle=0.0) as world:
        info = {
            "server_id": str(world.server_id),
            "mediator": list(world.mediator),
            "relay_url": world.relay_url,
            "lan_group": list(world.lan_group),
        }
        print(json.dumps(info), flush=True)
        await anyio.to_thread.run_sync(sys.stdin.read)  # until the parent closes it


def connector_options(info: dict[str, Any], path: str) -> dict[str, Any]:
    from wavesync_proto.race import PathKind  # noqa: PLC0415

    return {
        "server_id": uuid.UUID(info["server_id"]),
        "mediator": tuple(info["mediator"]),
        "relays": (info["relay_url"],),
        "paths": frozenset({PathKind(path)}),
        "lan_group": tuple(info["lan_group"]),
        "lan_interface": LOOPBACK,
        "udp_host": LOOPBACK,
        "deadline": 5.0,
    }


@dataclass
class Latencies:
    ms: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    #: Client CPU milliseconds per timed connect (connect, echo, close), one per client run.
    cpu_ms: list[float] = field(default_factory=list)
    #: Context switches (voluntary + involuntary, every thread) per timed connect.
    switches: list[float] = field(default_factory=list)

    def add_cost(self, before: tuple[float, int], count: int) -> None:
        cpu, switches = usage()
        self.cpu_ms.append((cpu - before[0]) * 1e3 / max(1, count))
        self.switches.append((switches - before[1]) / max(1, count))


def usage() -> tuple[float, int]:
    """This process's CPU seconds and context switches so far."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime, own.ru_nvcsw + own.ru_nivcsw


async def anyio_connects(options: dict[str, Any], count: int) -> Latencies:
    import anyio  # noqa: PLC0415

    from wavesync_adapters.anyio.connector import Connector, PathRaceError  # noqa: PLC0415

    result = Latencies()
    before = usage()
    for index in range(count + 1):
        await anyio.sleep(CONNECT_GAP)
        if index == 1:
            before = usage()
        with anyio.fail_after(30):
            async with Connector(**options) as client:
                start = time.perf_counter()
                try:
                    connection = await client.connect()
                except PathRaceError as exc:
                    result.failures.append(str(exc))
                    continue
                took = time.perf_counter() - start
                async with connection.stream:
                    await connection.stream.send(b"!")
                    if await connection.stream.receive() != b"!":
                        raise RuntimeError("the echo came back wrong")
        if index:
            result.ms.append(took * 1e3)
    result.add_cost(before, count)
    return result


async def asyncio_connects(options: dict[str, Any], count: int) -> Latencies:
    import asyncio  # noqa: PLC0415

    from wavesync_adapters.asyncio.connector import Connector, PathRaceError  # noqa: PLC0415

    result = Latencies()
    before = usage()
    for index in range(count + 1):
        await asyncio.sleep(CONNECT_GAP)
        if index == 1:
            before = usage()
        async with asyncio.timeout(30), Connector(**options) as client:
            start = time.perf_counter()
            try:
                connection = await client.connect()
            except PathRaceError as exc:
                result.failures.append(str(exc))
                continue
            took = time.perf_counter() - start
            connection.writer.write(b"!")
            if await connection.reader.readexactly(1) != b"!":
                raise RuntimeError("the echo came back wrong")
            connection.writer.close()
            with contextlib.suppress(OSError):
                await connection.writer.wait_closed()
        if index:
            result.ms.append(took * 1e3)
    result.add_cost(before, count)
    return result


def blocking_connects(options: dict[str, Any], count: int) -> Latencies:
    from wavesync_adapters.blocking.connector import Connector, PathRaceError  # noqa: PLC0415

    result = Latencies()
    before = usage()
    for index in range(count + 1):
        time.sleep(CONNECT_GAP)
        if index == 1:
            before = usage()
        with Connector(**options) as client:
            start = time.perf_counter()
            try:
                connection = client.connect()
            except PathRaceError as exc:
                result.failures.append(str(exc))
                continue
            took = time.perf_counter() - start
            with connection.sock as sock:
                sock.settimeout(30)
                sock.sendall(b"!")
                if sock.recv(1) != b"!":
                    raise RuntimeError("the echo came back wrong")
        if index:
            result.ms.append(took * 1e3)
    result.add_cost(before, count)
    return result


def connect_child(adapter: str, path: str, count: int, info: dict[str, Any]) -> None:
    options = connector_options(info, path)
    if adapter == "blocking":
        result = blocking_connects(options, count)
    else:
        connects = asyncio_connects if adapter == "asyncio" else anyio_connects
        result = run_on(adapter, connects, options, count)
    print(json.dumps(vars(result)), flush=True)


def child(args: list[str]) -> int:
    role = args[0]
    if role in ("udt-recv", "udt-send"):
        udt_child(role, args[1], args[2:])
    elif role == "world":
        run_on("anyio-asyncio", serve_world)
    elif role == "connect":
        connect_child(args[1], args[2], int(args[3]), json.loads(args[4]))
    else:
        raise SystemExit(f"unknown child role {role!r}")
    return 0


# --- the parent: processes and rounds ---------------------------------------------------
