"""The relay protocol (docs/protocol.md §3): standby pools, pairing clients, splicing bytes.

HTTP/1.1 (through h11) opens every connection; after a 101 the connection is a
raw byte tunnel that the relay copies without looking inside.
"""

from __future__ import annotations

from .service import RelayService
from .service_types import (
    Action,
    CloseConnection,
    ConnectionHandle,
    HandOffTunnel,
    RelayCounters,
    RelayLimits,
    SendBytes,
    StartSplice,
)
from .standby_pool import OpenStandby, PoolState, StandbyPool
from .wire import CONNECT_PATH, STANDBY_PATH, UPGRADE_PROTOCOL, StandbyCredentials, sign_standby

__all__ = [
    "CONNECT_PATH",
    "STANDBY_PATH",
    "UPGRADE_PROTOCOL",
    "Action",
    "CloseConnection",
    "ConnectionHandle",
    "HandOffTunnel",
    "OpenStandby",
    "PoolState",
    "RelayCounters",
    "RelayLimits",
    "RelayService",
    "SendBytes",
    "StandbyCredentials",
    "StandbyPool",
    "StartSplice",
    "sign_standby",
]
