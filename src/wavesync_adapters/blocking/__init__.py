"""The blocking adapter: plain sockets, timeouts and threads."""

from __future__ import annotations

from .stun import (
    BindingResult,
    StunError,
    StunRejectedError,
    StunTimeoutError,
    binding_request,
    serve_binding,
)

__all__ = [
    "BindingResult",
    "StunError",
    "StunRejectedError",
    "StunTimeoutError",
    "binding_request",
    "serve_binding",
]
