"""The asyncio adapter's UDT on uvloop: its clock, and a transfer byte-exact.

uvloop's ``loop.time()`` counts libuv's whole milliseconds. The core is
given ``now`` for a 0.2 ms loopback RTT and for pacing periods of microseconds, so
the endpoint's default clock is ``time.monotonic`` on every loop (skipped, saying
so, where uvloop is not installed).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any

import pytest

from tests.adapters.test_udt_asyncio_batches import transfer
from wavesync_adapters.asyncio.udt import create_udt_endpoint
from wavesync_proto.addresses import Endpoint

uvloop = pytest.importorskip("uvloop", reason="uvloop is not installed here")
LOOPBACK: Endpoint = ("127.0.0.1", 0)


def on_uvloop(main: Coroutine[Any, Any, None]) -> None:
    uvloop.run(main)


def test_the_endpoints_clock_resolves_less_than_uvloops_millisecond() -> None:
    readings: dict[str, set[float]] = {"endpoint": set(), "loop": set()}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        endpoint = await create_udt_endpoint(LOOPBACK)
        try:
            until = time.monotonic() + 0.003
            while time.monotonic() < until:
                readings["endpoint"].add(endpoint.now())
                readings["loop"].add(loop.time())
        finally:
            endpoint.close()

    on_uvloop(main())
    # 3 ms of readings: uvloop's clock shows at most 4 values, one per millisecond.
    assert len(readings["loop"]) <= 4
    assert len(readings["endpoint"]) > 20


def test_four_megabytes_byte_exact_on_uvloop() -> None:
    async def main() -> None:
        async with (
            await create_udt_endpoint(LOOPBACK) as server,
            await create_udt_endpoint(LOOPBACK) as client,
        ):
            await transfer(server, client, 4 * 1024 * 1024)  # asserts the bytes' hash

    on_uvloop(main())
