"""tunnel_syn on a blocking socket: prove that a new stream reaches the intended server.

The twin of ``anyio/verify.py``: ``TunnelSynInitiator`` and ``TunnelSynResponder`` (the
sans-I/O machines in ``wavesync_proto.tunnel_syn``) decide everything; this module moves
bytes and ``time.monotonic()`` between them and a ``socket.socket``.

The caller keeps using the very socket afterwards (a user gets a real socket, so that
``ssl`` and ``http.client`` work on it), so not one byte past the exchange may be read:
the STUN header comes first (20 bytes), then exactly the length it announces (RFC 8489
§6.2.2). The machines' ``leftover`` is therefore always empty here. Neither call closes
the socket; both leave its timeout as they found it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator

from wavesync_proto.stun.errors import StunDecodeError
from wavesync_proto.stun.message import HEADER_LENGTH, stream_message_length
from wavesync_proto.tunnel_syn import (
    SynAccepted,
    SynAnswered,
    SynFailed,
    SynRejected,
    TunnelSynInitiator,
    TunnelSynResponder,
)

from ..errors import VerificationError

__all__ = ["VerificationError", "answer_client", "verify_server"]


def _wanted(message: bytearray) -> int:
    """How many more bytes the message at hand needs: the header's first, then the rest
    its length field announces (0 when the bytes cannot be a message: the machine, fed
    the same bytes, has refused them already)."""
    if len(message) < HEADER_LENGTH:
        return HEADER_LENGTH - len(message)
    try:
        length = stream_message_length(message)
    except StunDecodeError:
        return 0
    assert length is not None  # a whole header is there
    return max(0, length - len(message))


@contextlib.contextmanager
def _timeout_restored(sock: socket.socket) -> Iterator[None]:
    previous = sock.gettimeout()
    try:
        yield
    finally:
        with contextlib.suppress(OSError):  # closed meanwhile: nothing to restore
            sock.settimeout(previous)


def _exchange(sock: socket.socket, machine: TunnelSynInitiator | TunnelSynResponder) -> None:
    """Move bytes and time between ``sock`` and ``machine`` until the machine is done,
    reading no byte past the one message it waits for."""
    message = bytearray()
    while not machine.done:
        deadline = machine.get_timer()
        assert deadline is not None  # a machine that is not done waits for its deadline
        wanted = _wanted(message)
        if wanted == 0:
            # Cannot happen with a machine that sees the same bytes; never spin on it.
            machine.handle_timer(deadline)
            continue
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            machine.handle_timer(time.monotonic())
            continue
        sock.settimeout(remaining)
        try:
            data = sock.recv(wanted)
        except TimeoutError:
            machine.handle_timer(time.monotonic())
            continue
        except OSError:
            machine.eof_received(time.monotonic())
            continue
        if not data:
            machine.eof_received(time.monotonic())
            continue
        message += data
        machine.receive_data(data, time.monotonic())


def _send_all(sock: socket.socket, data: bytes, timeout: float) -> None:
    sock.settimeout(timeout)
    sock.sendall(data)


def verify_server(
    sock: socket.socket,
    *,
    server_id: uuid.UUID | None = None,
    system_id: uuid.UUID | None = None,
    connect_session_id: bytes | None = None,
    timeout: float = 5.0,
) -> SynAnswered:
    """Send tunnel_syn on a new connected ``sock`` and check that the answer comes from
    the target (``server_id``: that server; ``system_id``: any server of that system).

    Returns the answer; the socket's next byte is the server's first application byte.
    Raises ``VerificationError`` when the far end refuses, is not a wavesync server,
    closes, or does not answer within ``timeout`` seconds.
    """
    initiator = TunnelSynInitiator(
        server_id=server_id,
        system_id=system_id,
        connect_session_id=connect_session_id,
        # The core takes its randomness as an argument: RFC 8489 §6 wants it cryptographic.
        transaction_id=os.urandom(12),
        now=time.monotonic(),
        timeout=timeout,
    )
    with _timeout_restored(sock):
        try:
            _send_all(sock, initiator.data_to_send(), timeout)
        except OSError:  # includes a send that timed out
            initiator.eof_received(time.monotonic())
        _exchange(sock, initiator)
    event = initiator.next_event()
    if isinstance(event, SynFailed):
        raise VerificationError(event.reason, code=event.code)
    assert isinstance(event, SynAnswered)
    assert not event.leftover  # nothing past the answer was read
    return event


def answer_client(
    sock: socket.socket,
    *,
    system_id: uuid.UUID,
    server_id: uuid.UUID,
    require_session: bool = False,
    known_session: Callable[[bytes], bool] | None = None,
    timeout: float = 5.0,
) -> SynAccepted:
    """Read a client's tunnel_syn on a new ``sock`` and answer it as this server.

    With ``require_session`` (a punched UDT stream) the request must carry a connect
    session id that ``known_session`` recognises. Returns what the client asked for;
    the socket's next byte is the client's first application byte. Raises
    ``VerificationError`` when the request is refused (after sending the error answer),
    is not tunnel_syn at all, does not come within ``timeout`` seconds, or the client
    goes away before the answer.
    """
    responder = TunnelSynResponder(
        system_id=system_id,
        server_id=server_id,
        now=time.monotonic(),
        timeout=timeout,
        require_session=require_session,
        known_session=known_session,
    )
    with _timeout_restored(sock):
        _exchange(sock, responder)
        event = responder.next_event()
        answer = responder.data_to_send()
        if isinstance(event, SynRejected):
            if answer:
                # The client learns why it was refused; it may already be gone, its loss.
                with contextlib.suppress(OSError):
                    _send_all(sock, answer, timeout)
            raise VerificationError(event.reason, code=event.code)
        assert isinstance(event, SynAccepted)
        try:
            _send_all(sock, answer, timeout)
        except OSError:
            raise VerificationError("the client went away before the answer", code=None) from None
    assert not event.leftover  # nothing past the request was read
    return event
