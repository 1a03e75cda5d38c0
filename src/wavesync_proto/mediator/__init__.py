"""The mediator protocol (docs/protocol.md §2): rendezvous for UDP hole punching over STUN.

Importing this package registers the mediator's attributes in the STUN codec.
"""

from __future__ import annotations

from .attributes import ConnectionPath, MediatorAttributeType
from .auth import DEFAULT_REALM, NonceIssuer, credential_key
from .messages import (
    Connect,
    ConnectionAck,
    ConnectionAckResponse,
    ConnectionRequested,
    ConnectionResult,
    ConnectionUpdate,
    ConnectResponse,
    Listen,
    ListenResponse,
    MediatorMessage,
    MediatorMessageError,
    MediatorMethod,
    parse_mediator_message,
)

__all__ = [
    "DEFAULT_REALM",
    "Connect",
    "ConnectResponse",
    "ConnectionAck",
    "ConnectionAckResponse",
    "ConnectionPath",
    "ConnectionRequested",
    "ConnectionResult",
    "ConnectionUpdate",
    "Listen",
    "ListenResponse",
    "MediatorAttributeType",
    "MediatorMessage",
    "MediatorMessageError",
    "MediatorMethod",
    "NonceIssuer",
    "credential_key",
    "parse_mediator_message",
]
