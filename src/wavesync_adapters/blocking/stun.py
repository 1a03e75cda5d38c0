"""Blocking STUN on UDP sockets: a Binding client and a Binding responder loop.

Both are thin: ``ClientTransaction`` decides when to send and when to give up,
``BindingResponder`` decides what to answer. This module only resolves names,
moves datagrams and reads the clock.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from wavesync_proto.addresses import Endpoint, format_endpoint
from wavesync_proto.stun import (
    BINDING,
    DEFAULT_SOFTWARE,
    BindingResponder,
    ClientTransaction,
    MappedAddress,
    Message,
    MessageClass,
    ResponseReceived,
    StunDecodeError,
    TransactionTimedOut,
    XorMappedAddress,
    decode_message,
    encode_message,
    new_transaction_id,
)
from wavesync_proto.stun.transaction import DEFAULT_RC, DEFAULT_RM, DEFAULT_RTO

__all__ = [
    "BindingResult",
    "StunError",
    "StunRejectedError",
    "StunTimeoutError",
    "binding_request",
    "serve_binding",
]

log = logging.getLogger("wavesync.stun")

# A STUN response to a Binding request is small; anything bigger is not ours.
_RECEIVE_BUFFER = 2048
# How often the responder loop looks at its stop flag while the socket is idle.
_STOP_POLL_SECONDS = 0.2


class StunError(Exception):
    """A Binding request did not produce a mapped address."""


class StunTimeoutError(StunError):
    """No response arrived within the RFC 8489 retransmission schedule."""


class StunRejectedError(StunError):
    """The server answered with an error response."""

    def __init__(self, message: str, *, code: int, reason: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


@dataclass(frozen=True, kw_only=True)
class BindingResult:
    """What a Binding request learned."""

    #: Our address as the server saw it (XOR-MAPPED-ADDRESS, or MAPPED-ADDRESS from old servers).
    mapped: Endpoint
    #: The server address the request went to, after name resolution.
    server: Endpoint
    #: How many times the request was sent.
    attempts: int
    #: Seconds from the first send to the response.
    elapsed: float


def _resolve_udp(host: str, port: int) -> tuple[socket.AddressFamily, Endpoint]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM, proto=socket.IPPROTO_UDP)
    except socket.gaierror as exc:
        raise StunError(f"cannot resolve {host!r}: {exc.strerror}") from None
    family, _, _, _, sockaddr = infos[0]
    return family, (str(sockaddr[0]), int(sockaddr[1]))


def binding_request(
    host: str,
    port: int,
    *,
    rto: float = DEFAULT_RTO,
    rc: int = DEFAULT_RC,
    rm: int = DEFAULT_RM,
    clock: Callable[[], float] = time.monotonic,
) -> BindingResult:
    """Send a Binding request to ``host:port`` over UDP and return the mapped address.

    Retransmits on the RFC 8489 §6.2.1 schedule (by default 7 sends over 31.5 s,
    failure at 39.5 s) and raises ``StunTimeoutError`` when nothing answers,
    ``StunRejectedError`` for an error response.
    """
    family, server = _resolve_udp(host, port)
    request = Message(
        message_class=MessageClass.REQUEST, method=BINDING, transaction_id=new_transaction_id()
    )
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        transaction = ClientTransaction(
            encode_message(request, fingerprint=True), now=clock(), rto=rto, rc=rc, rm=rm
        )
        while (event := transaction.next_event()) is None:
            for datagram in transaction.messages_to_send(clock()):
                log.debug("binding request %d to %s", transaction.attempts, format_endpoint(server))
                sock.sendto(datagram, server)
            deadline = transaction.get_timer()
            assert deadline is not None  # a waiting transaction always has a next moment
            sock.settimeout(max(0.0, deadline - clock()))
            try:
                data, source = sock.recvfrom(_RECEIVE_BUFFER)
            except TimeoutError:
                transaction.handle_timer(clock())
                continue
            if (str(source[0]), int(source[1])) != server:
                log.debug("ignoring a datagram from %s", source)
                continue
            try:
                message = decode_message(data)
            except StunDecodeError as exc:
                log.debug("ignoring a malformed response: %s", exc)
                continue
            transaction.receive_response(message, clock())

    if isinstance(event, TransactionTimedOut):
        requests = "request" if event.attempts == 1 else "requests"
        raise StunTimeoutError(
            f"no response from {format_endpoint(server)} after {event.attempts} {requests}"
            f" in {event.elapsed:.2f} s (RFC 8489 retransmission schedule)"
        )
    assert isinstance(event, ResponseReceived)
    response = event.message
    error = response.error_code
    if response.message_class is MessageClass.ERROR or error is not None:
        code, reason = (error.code, error.reason) if error else (0, "no ERROR-CODE")
        raise StunRejectedError(
            f"{format_endpoint(server)} answered {code} {reason}", code=code, reason=reason
        )
    mapped = response.get(XorMappedAddress) or response.get(MappedAddress)
    if mapped is None:
        raise StunError(f"{format_endpoint(server)} answered without a mapped address")
    return BindingResult(
        mapped=mapped.address, server=server, attempts=event.attempts, elapsed=event.elapsed
    )


def serve_binding(
    host: str,
    port: int,
    *,
    software: str | None = DEFAULT_SOFTWARE,
    ready: Callable[[Endpoint], None] | None = None,
    stop: threading.Event | None = None,
) -> BindingResponder:
    """Answer Binding requests on UDP ``host:port`` until ``stop`` is set.

    ``ready`` is called with the bound address (useful with port 0). Returns the
    responder, whose counters say what was answered and what was dropped.
    """
    responder = BindingResponder(software=software)
    stop = stop or threading.Event()
    family, address = _resolve_udp(host, port)
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        bound = sock.getsockname()
        if ready is not None:
            ready((str(bound[0]), int(bound[1])))
        log.info(
            "answering STUN Binding on udp %s", format_endpoint((str(bound[0]), int(bound[1])))
        )
        sock.settimeout(_STOP_POLL_SECONDS)
        while not stop.is_set():
            try:
                data, source = sock.recvfrom(_RECEIVE_BUFFER)
            except TimeoutError:
                continue
            except ConnectionResetError:
                # An ICMP error for an earlier answer; nothing to do for this socket.
                continue
            peer = (str(source[0]), int(source[1]))
            answer = responder.handle_request(data, peer)
            if answer is None:
                log.debug("no answer for %d bytes from %s", len(data), format_endpoint(peer))
                continue
            try:
                sock.sendto(answer, source)
            except OSError as exc:
                log.debug("could not answer %s: %s", format_endpoint(peer), exc)
    log.info("stopped answering STUN Binding: %s", responder.counters)
    return responder
