"""The STUN codec's own error: every malformed input ends here and nowhere else."""

from __future__ import annotations

from ..errors import RemoteProtocolError

__all__ = ["StunDecodeError"]


class StunDecodeError(RemoteProtocolError):
    """Bytes that are not a well-formed STUN message (RFC 8489 §5, §14).

    The hint is 400 Bad Request: that is what a responder answers when the
    header was good enough to know the peer sent a request.
    """

    def __init__(self, message: str, *, error_code_hint: int | None = 400) -> None:
        super().__init__(message, error_code_hint=error_code_hint)
