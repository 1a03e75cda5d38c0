"""The one error family of the wavesync core.

Split the way h11 and wsproto split theirs: a *local* error means the caller
misused the API (a bug in the program using wavesync); a *remote* error means
the peer sent something the protocol forbids, and carries a hint of what to
answer (a STUN error code or an HTTP status) so a responder can reply instead
of crashing.
"""

from __future__ import annotations

__all__ = ["LocalProtocolError", "ProtocolError", "RemoteProtocolError"]


class ProtocolError(Exception):
    """Base class of every exception the wavesync core raises on purpose."""


class LocalProtocolError(ProtocolError):
    """The caller asked for something the protocol or the API does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that violate the protocol.

    ``error_code_hint`` is the STUN error code (RFC 8489 §14.8) or HTTP status
    a responder should answer with, when an answer is appropriate at all.
    """

    def __init__(self, message: str, *, error_code_hint: int | None = None) -> None:
        super().__init__(message)
        self.error_code_hint = error_code_hint
