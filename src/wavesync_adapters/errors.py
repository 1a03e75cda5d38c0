"""The errors every adapter raises: the same class whichever runtime moved the bytes.

An application that switches from the anyio adapter to the asyncio or blocking one
(or runs two of them) catches one set of exceptions. No runtime is imported here.
"""

from __future__ import annotations

from wavesync_proto.mediator.connect import ConnectFailed
from wavesync_proto.race import AttemptFailure, RaceFailed
from wavesync_proto.tunnel import TunnelKind
from wavesync_proto.udt.connection_types import CloseReason

__all__ = [
    "ConnectError",
    "PathRaceError",
    "RegistrationError",
    "RelayConnectError",
    "TunnelError",
    "UdtConnectError",
    "VerificationError",
]


class RegistrationError(Exception):
    """The mediator refused the registration (``code`` 401: the system key is wrong)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"the mediator refused the registration: {code} {reason}")
        self.code = code
        self.reason = reason


class ConnectError(Exception):
    """The mediator could not connect us: ``code`` is its STUN error code, or None."""

    def __init__(self, failure: ConnectFailed) -> None:
        code = "" if failure.code is None else f"{failure.code} "
        super().__init__(f"connect failed: {code}{failure.reason}")
        self.code = failure.code
        self.reason = failure.reason


class RelayConnectError(Exception):
    """The relay did not pair us; ``status`` is its HTTP status (None: no answer)."""

    def __init__(self, message: str, *, status: int | None, retry_after: float | None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class VerificationError(Exception):
    """The tunnel_syn exchange failed: the stream must not carry application data."""

    def __init__(self, reason: str, *, code: int | None) -> None:
        super().__init__(reason if code is None else f"{code} {reason}")
        #: What went wrong (the far end's reason phrase when it sent an error answer).
        self.reason = reason
        #: The STUN error code answered (403, 404, ...); None when no error answer was sent.
        self.code = code


class UdtConnectError(ConnectionError):
    """A UDT connect or rendezvous did not produce a connection; ``reason`` says why."""

    def __init__(self, message: str, *, reason: CloseReason, detail: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.detail = detail


class PathRaceError(OSError):
    """Every path failed, or the deadline passed; ``failures`` says why each did."""

    def __init__(self, result: RaceFailed) -> None:
        super().__init__(result.describe())
        self.reason = result.reason
        self.failures: tuple[AttemptFailure, ...] = result.failures


class TunnelError(Exception):
    """A tunnel could not be opened: ``kind``, the HTTP ``status`` behind it (None: no
    HTTP answer, e.g. a timeout or a refused TCP connect) and the ``reason``."""

    def __init__(
        self,
        kind: TunnelKind | None,
        reason: str,
        *,
        status: int | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        where = f"{kind} tunnel" if kind is not None else "tunnel"
        super().__init__(f"{where}: {reason}")
        self.kind = kind
        self.reason = reason
        self.status = status
        self.headers = headers
