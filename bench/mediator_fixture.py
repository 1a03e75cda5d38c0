"""The mediator benchmarks' world: one system, its key, and the servers' ids and addresses.

Shared by ``mediator.py`` (the runs and the report) and ``mediator_load.py`` (the raw-socket
load process), which must name the same servers with the same key.
"""

from __future__ import annotations

import random
import uuid

from wavesync_proto.addresses import Endpoint
from wavesync_proto.mediator.listen import ListenSession
from wavesync_proto.mediator.service import MediatorLimits, MediatorService

__all__ = [
    "LOOPBACK_LIMITS",
    "NONCE_SECRET",
    "SYSTEM_ID",
    "SYSTEM_KEY",
    "new_service",
    "new_session",
    "server_address",
    "server_id",
]

SYSTEM_ID = uuid.UUID("5e000000-0000-4000-8000-00000000005e")
SYSTEM_KEY = "bench-system-key-0123456789"
NONCE_SECRET = b"bench-nonce-secret-0000000000000"
#: Over loopback every client is 127.0.0.1: a limit no run can reach stands in for one
#: source IP per client (the sans-I/O pass keeps the default limit and distinct IPs).
LOOPBACK_LIMITS = MediatorLimits(rate_limit_per_second=1e9, rate_limit_burst=1_000_000_000)


def server_id(number: int) -> uuid.UUID:
    return uuid.UUID(int=(0x51 << 120) | number)


def server_address(number: int) -> Endpoint:
    """A distinct public address per server (198.18.0.0/15, the benchmarking range)."""
    return (f"198.{18 + (number >> 16 & 1)}.{number >> 8 & 255}.{number & 255}", 40000)


def new_service(limits: MediatorLimits) -> MediatorService:
    return MediatorService(
        systems={SYSTEM_ID: SYSTEM_KEY}, nonce_secret=NONCE_SECRET, limits=limits
    )


def new_session(number: int, now: float) -> ListenSession:
    return ListenSession(
        system_id=SYSTEM_ID,
        server_id=server_id(number),
        system_key=SYSTEM_KEY,
        now=now,
        rng=random.Random(number),  # noqa: S311 - back-off jitter, seeded to repeat runs
    )
