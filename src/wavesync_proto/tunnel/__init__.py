"""HTTP tunnels (docs/tunnel.md): byte streams that ride HTTP through proxies, and probing them.

Every method is a client machine and a server machine with one interface
(``TunnelEndpoint``): bytes in and out per leg (TCP connection), stream bytes
and events out. ``TunnelRequestReader`` reads the first request on a server's
HTTP face and says which tunnel it opens; ``TunnelProbe`` chooses a method per
location. TLS (the ``ssl`` variants) is the adapter's: nothing here assumes
plaintext.
"""

from __future__ import annotations

from .getpost import DOWNSTREAM_LEG, GetPostClient, GetPostServer
from .probe import (
    ALL_KINDS,
    CancelAttempt,
    ProbeAction,
    ProbeChosen,
    ProbeFailed,
    ProbeState,
    StartAttempt,
    TunnelKind,
    TunnelLocation,
    TunnelMemory,
    TunnelProbe,
)
from .raw import ConnectClient, RawEndpoint, UpgradeClient, UpgradeServer
from .registry import GetPostRegistry
from .requests import RequestRejected, TunnelRequest, TunnelRequestReader
from .stream import (
    OpenLeg,
    StreamData,
    StreamEnded,
    TunnelEndpoint,
    TunnelEstablished,
    TunnelEvent,
    TunnelFailed,
    TunnelState,
)
from .websocket import WebSocketClient, WebSocketServer
from .wire import (
    PATH_PREFIX,
    UPGRADE_PROTOCOL,
    WEBSOCKET_SUBPROTOCOL,
    ProxyConfig,
    TunnelLimits,
    TunnelMethod,
)

__all__ = [
    "ALL_KINDS",
    "DOWNSTREAM_LEG",
    "PATH_PREFIX",
    "UPGRADE_PROTOCOL",
    "WEBSOCKET_SUBPROTOCOL",
    "CancelAttempt",
    "ConnectClient",
    "GetPostClient",
    "GetPostRegistry",
    "GetPostServer",
    "OpenLeg",
    "ProbeAction",
    "ProbeChosen",
    "ProbeFailed",
    "ProbeState",
    "ProxyConfig",
    "RawEndpoint",
    "RequestRejected",
    "StartAttempt",
    "StreamData",
    "StreamEnded",
    "TunnelEndpoint",
    "TunnelEstablished",
    "TunnelEvent",
    "TunnelFailed",
    "TunnelKind",
    "TunnelLimits",
    "TunnelLocation",
    "TunnelMemory",
    "TunnelMethod",
    "TunnelProbe",
    "TunnelRequest",
    "TunnelRequestReader",
    "TunnelState",
    "UpgradeClient",
    "UpgradeServer",
    "WebSocketClient",
    "WebSocketServer",
]
