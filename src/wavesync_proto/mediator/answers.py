"""How the mediator answers a request: over which transport, and within the amplification bound.

This module owns the shape of every answer the service sends back to a
request's origin: SOFTWARE, FINGERPRINT, integrity, and the rule that a UDP
answer to an unauthenticated request is at most ``amplification_factor``
times the request's size. It does not know what the answer says: callers
hand in the candidate messages, best first.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from ..addresses import Endpoint
from ..stun.attributes import Attribute, Software
from ..stun.message import Message, MessageClass, encode_message
from .registry import PeerHandle
from .service_types import Action, MediatorCounters, SendDatagram, SendTcp

__all__ = ["Origin", "Replier", "fit_response", "with_attributes"]

# RFC 8489 §14.8: the reason phrase is "fewer than 128 characters".
_MAX_REASON_CHARS = 127


@dataclass(frozen=True, slots=True, kw_only=True)
class Origin:
    """Where a request came from, which says how to answer it."""

    #: The sender's address as the mediator sees it (UDP source or TCP remote address).
    observed: Endpoint
    #: The TCP peer the request came on; None for a datagram.
    peer: PeerHandle | None
    #: Bytes in the request datagram: the UDP answer is bounded by a multiple of it.
    length: int = 0


def with_attributes(message: Message, extra: tuple[Attribute, ...]) -> Message:
    """``message`` with ``extra`` appended (SOFTWARE goes last, before integrity)."""
    return replace(message, attributes=(*message.attributes, *extra))


def fit_response(
    variants: Iterable[Message],
    *,
    budget: int | None,
    fingerprint: bool = False,
    integrity_sha256_key: bytes | None = None,
) -> bytes | None:
    """The first variant whose encoding fits in ``budget`` bytes (None: no limit), else None."""
    for message in variants:
        data = encode_message(
            message, fingerprint=fingerprint, integrity_sha256_key=integrity_sha256_key
        )
        if budget is None or len(data) <= budget:
            return data
    return None


class Replier:
    """Turns candidate answers into one ``SendTcp`` / ``SendDatagram``, or none."""

    def __init__(
        self, *, software: str | None, amplification_factor: int, counters: MediatorCounters
    ) -> None:
        #: SOFTWARE to append to answers (RFC 8489 §14.14 "SHOULD"); the first thing a
        #: tight UDP budget drops.
        self.software: tuple[Attribute, ...] = (Software(software),) if software else ()
        self.amplification_factor = amplification_factor
        self._counters = counters

    def budget(self, origin: Origin) -> int:
        """The most bytes an unauthenticated UDP answer to ``origin`` may have."""
        return self.amplification_factor * origin.length

    def send(
        self,
        origin: Origin,
        variants: Iterable[Message],
        *,
        fingerprint: bool,
        integrity_sha256_key: bytes | None = None,
    ) -> list[Action]:
        """Answer ``origin`` with the first variant that may be sent there."""
        if origin.peer is not None:
            data = fit_response(
                variants,
                budget=None,
                fingerprint=fingerprint,
                integrity_sha256_key=integrity_sha256_key,
            )
            assert data is not None  # without a budget the first variant is taken
            return [SendTcp(peer=origin.peer, data=data)]
        # No amplification (DESIGN.md §6): a datagram's source address can be spoofed,
        # so an unauthenticated request earns at most amplification_factor times its
        # own size back, the bound QUIC puts on unvalidated addresses (RFC 9000 §8.1).
        # A signed answer goes to a server that has just proved its key: no bound.
        budget = None if integrity_sha256_key is not None else self.budget(origin)
        data = fit_response(
            variants,
            budget=budget,
            fingerprint=fingerprint,
            integrity_sha256_key=integrity_sha256_key,
        )
        if data is None:
            self._counters.udp_answers_suppressed += 1
            return []
        return [SendDatagram(address=origin.observed, data=data)]

    def success(
        self,
        origin: Origin,
        message: Message,
        *,
        fingerprint: bool,
        integrity_sha256_key: bytes | None = None,
    ) -> list[Action]:
        """A success response, with SOFTWARE if it fits, else without."""
        return self.send(
            origin,
            self._variants(message),
            fingerprint=fingerprint,
            integrity_sha256_key=integrity_sha256_key,
        )

    def error(
        self,
        origin: Origin,
        method: int,
        transaction_id: bytes,
        code: int,
        reason: str,
        *attributes: Attribute,
        fingerprint: bool = False,
    ) -> list[Action]:
        """An error response to a request known only by its method and transaction id."""
        return self.send(
            origin,
            self.error_variants(method, transaction_id, code, reason, *attributes),
            fingerprint=fingerprint,
        )

    def error_variants(
        self, method: int, transaction_id: bytes, code: int, reason: str, *attributes: Attribute
    ) -> list[Message]:
        """An error response, with SOFTWARE and then without."""
        request = Message(
            message_class=MessageClass.REQUEST, method=method, transaction_id=transaction_id
        )
        return self._variants(request.error_response(code, reason[:_MAX_REASON_CHARS], *attributes))

    def _variants(self, message: Message) -> list[Message]:
        if not self.software:
            return [message]
        return [with_attributes(message, self.software), message]
