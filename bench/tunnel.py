"""HTTP tunnels: bulk throughput and round-trip latency of each method through squid vs direct TCP.

One run measures, over loopback, with the client and the tunnel server on one
anyio event loop (asyncio) in this process and squid 5.7 in its own:

1. Bulk throughput, ``--mib`` MiB each way: upstream (client → server) and
   downstream (server → client), from the first byte sent to the receiver's
   acknowledgement of the last (upstream) or the last byte read (downstream).
2. Latency: ``--echoes`` echoes of 64 bytes one after another; p50 and p99.

Rows: direct TCP (an anyio TCP stream to the same handler: the floor); every
method straight to the tunnel server (no proxy); then every method through
squid with Debian's default access rules and with a permissive config (the
two configs of tests/squid.py), a row with the reason where squid refuses it.
The ``ssl+`` kinds need a TLS tunnel server on 127.0.0.2:443 (CONNECT's one
port under the default rules): rows say so when it cannot be bound. Ratios are
against direct TCP.

    python bench/tunnel.py [--mib N] [--echoes E] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import os
import platform
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.abc
import trustme

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.squid import DEFAULT, PERMISSIVE, squid_binary, squid_proxy

from wavesync_adapters.anyio.tunnel import ALL_KINDS, TunnelError, open_tunnel
from wavesync_adapters.anyio.tunnel_server import TunnelServer
from wavesync_proto import __version__
from wavesync_proto.tunnel import ProxyConfig, TunnelKind

TLS_HOST = "127.0.0.2"
BLOCK = 256 * 1024
ECHO = 64
MB = 1e6
#: Commands of the bench protocol: 1 byte + 8-byte size. Not letters: a connect tunnel's
#: first byte A-Z would read as an HTTP request on the tunnel server (docs/tunnel.md §4).
UP, DOWN, ECHOES = b"\x01", b"\x02", b"\x03"


async def read_exactly(stream: anyio.abc.ByteStream, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        data += await stream.receive(min(size - len(data), 1 << 20))
    return bytes(data)


async def bench_handler(stream: anyio.abc.ByteStream) -> None:
    """The server's side: UP n (read n, answer b'k'), DOWN n (send n), ECHOES n (n echoes)."""
    with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
        while True:
            head = await read_exactly(stream, 9)
            size = int.from_bytes(head[1:], "big")
            if head[:1] == UP:
                left = size
                while left:
                    left -= len(await stream.receive(min(left, 1 << 20)))
                await stream.send(b"k")
            elif head[:1] == DOWN:
                block = bytes(BLOCK)
                for start in range(0, size, BLOCK):
                    await stream.send(block[: min(BLOCK, size - start)])
            else:
                for _ in range(size):
                    await stream.send(await read_exactly(stream, ECHO))


@dataclass
class Row:
    up: float  # MB/s
    down: float
    p50: float  # ms
    p99: float


async def measure(stream: anyio.abc.ByteStream, total: int, echoes: int) -> Row:
    block = bytes(BLOCK)
    start = time.perf_counter()
    await stream.send(UP + total.to_bytes(8, "big"))
    for offset in range(0, total, BLOCK):
        await stream.send(block[: min(BLOCK, total - offset)])
    await read_exactly(stream, 1)
    up = total / (time.perf_counter() - start) / MB
    start = time.perf_counter()
    await stream.send(DOWN + total.to_bytes(8, "big"))
    await read_exactly(stream, total)
    down = total / (time.perf_counter() - start) / MB
    await stream.send(ECHOES + echoes.to_bytes(8, "big"))
    times = []
    message = os.urandom(ECHO)
    for _ in range(echoes):
        start = time.perf_counter()
        await stream.send(message)
        if await read_exactly(stream, ECHO) != message:
            raise RuntimeError("an echo came back different")
        times.append((time.perf_counter() - start) * 1000)
    quantiles = statistics.quantiles(times, n=100)
    return Row(up, down, quantiles[49], quantiles[98])


@contextlib.asynccontextmanager
async def servers(
    server_context: ssl.SSLContext,
) -> AsyncIterator[tuple[int, int, int | None, str]]:
    """Direct TCP port, plain tunnel server port, TLS tunnel server port (or None, why)."""

    async def tunnel_handler(stream: anyio.abc.ByteStream) -> None:
        await bench_handler(stream)

    async def tcp_handler(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await bench_handler(stream)

    async with anyio.create_task_group() as group:
        tcp = await anyio.create_tcp_listener(local_host="127.0.0.1")
        group.start_soon(tcp.serve, tcp_handler)
        plain = await group.start(TunnelServer(tunnel_handler).serve, "127.0.0.1", 0)
        tls_port, why = None, ""
        try:
            tls = TunnelServer(tunnel_handler, ssl_context=server_context)
            tls_port = (await group.start(tls.serve, TLS_HOST, 443))[1]
        except OSError as exc:
            why = f"cannot listen on {TLS_HOST}:443: {exc.strerror}"
        yield tcp.extra(anyio.abc.SocketAttribute.local_port), plain[1], tls_port, why
        group.cancel_scope.cancel()


async def run(args: argparse.Namespace, proxies: dict[str, ProxyConfig | None]) -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(TLS_HOST).configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    total = args.mib * 2**20
    print(
        f"{'path':40} {'up MB/s':>9} {'down MB/s':>10} {'up/TCP':>7} {'down/TCP':>9}"
        f" {'p50 ms':>8} {'p99 ms':>8}"
    )
    async with servers(server_context) as (tcp_port, plain_port, tls_port, why):
        direct = await _row(
            "direct TCP", lambda: anyio.connect_tcp("127.0.0.1", tcp_port), total, args, None
        )
        assert direct is not None
        for config, proxy in proxies.items():
            for kind in ALL_KINDS:
                name = f"{kind}, {config}"
                if kind.tls and tls_port is None:
                    print(f"{name:40} skipped: {why}")
                    continue
                if proxy is None and kind.method.value == "connect":
                    continue
                target = f"{TLS_HOST}:{tls_port}" if kind.tls else f"127.0.0.1:{plain_port}"

                def opener(
                    target: str = target, kind: TunnelKind = kind, proxy: ProxyConfig | None = proxy
                ) -> Awaitable[anyio.abc.ByteStream]:
                    return open_tunnel(target, kind, proxy=proxy, ssl_context=client_context)

                await _row(name, opener, total, args, direct)


async def _row(
    name: str,
    opener: Callable[[], Awaitable[anyio.abc.ByteStream]],
    total: int,
    args: argparse.Namespace,
    direct: Row | None,
) -> Row | None:
    try:
        with anyio.fail_after(600):
            stream = await opener()
            async with stream:
                row = await measure(stream, total, args.echoes)
    except TunnelError as exc:
        print(f"{name:40} refused: {exc.reason[:60]}")
        return None
    except (anyio.BrokenResourceError, anyio.EndOfStream, TimeoutError) as exc:
        print(f"{name:40} FAILED during the transfer: {exc!r}"[:160])
        return None
    ratios = (
        f" {row.up / direct.up:>7.2f} {row.down / direct.down:>9.2f}"
        if direct is not None
        else f" {'':>7} {'':>9}"
    )
    print(f"{name:40} {row.up:>9,.1f} {row.down:>10,.1f}{ratios} {row.p50:>8.3f} {row.p99:>8.3f}")
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=200, help="MiB per bulk transfer each way")
    parser.add_argument("--echoes", type=int, default=1000, help="timed 64-byte echoes")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
    args = parser.parse_args()
    if args.quick:
        args.mib, args.echoes = 2, 50
    binary = squid_binary()
    print(
        f"wavesync {__version__} tunnels, Python {platform.python_version()},"
        f" anyio {importlib.metadata.version('anyio')} (asyncio),"
        f" {platform.system()} {platform.release()}, {os.cpu_count()} CPUs;"
        f" {args.mib} MiB each way per row (MB = 10^6 bytes), {args.echoes} echoes of {ECHO} B;"
        " client and tunnel server on one event loop in this process"
    )
    with (
        tempfile.TemporaryDirectory(prefix="wavesync-tunnel-bench-") as folder,
        contextlib.ExitStack() as stack,
    ):
        proxies: dict[str, ProxyConfig | None] = {"no proxy": None}
        if binary is None:
            print("squid rows skipped: squid is not installed (apt-get install squid)")
        else:
            for config, access in (
                ("squid default", DEFAULT),
                ("squid permissive", PERMISSIVE),
            ):
                where = Path(folder) / config.replace(" ", "-")
                where.mkdir()
                squid = stack.enter_context(squid_proxy(where, access))
                proxies[config] = ProxyConfig(host=squid.host, port=squid.port)
            print(f"squid: {squid.version}, its own process per config, -N, no cache")
        anyio.run(run, args, proxies)
    return 0


if __name__ == "__main__":
    sys.exit(main())
