"""tunnel_syn on anyio: prove that a new stream reaches the intended server before using it.

Thin by design: ``TunnelSynInitiator`` and ``TunnelSynResponder`` (the sans-I/O machines in
``wavesync_proto.tunnel_syn``) decide everything; this module moves the bytes and anyio's
clock between them and a stream, and turns the outcome into a stream or an exception.
Neither call closes the stream: whoever opened it decides, and may log or retry first.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable

import anyio
import anyio.abc

from wavesync_proto.tunnel_syn import (
    SynAccepted,
    SynAnswered,
    SynFailed,
    SynRejected,
    TunnelSynInitiator,
    TunnelSynResponder,
)

from ..errors import VerificationError
from ._streams import PrefixedStream

__all__ = ["VerificationError", "answer_client", "verify_server"]

# A tunnel_syn message is at most 1024 bytes; a larger read only brings the
# application's first bytes along, which the machine hands back as leftover.
_RECEIVE_BYTES = 65536


#: How a stream tells that its peer is gone; during tunnel_syn that is a failed exchange,
#: so callers handle one exception, ``VerificationError``, whatever the stream type.
_GONE = (anyio.EndOfStream, anyio.BrokenResourceError, OSError)


async def _exchange(
    stream: anyio.abc.ByteStream, machine: TunnelSynInitiator | TunnelSynResponder
) -> None:
    """Move bytes and time between ``stream`` and ``machine`` until the machine is done."""
    while not machine.done:
        deadline = machine.get_timer()
        assert deadline is not None  # a machine that is not done waits for its deadline
        with anyio.move_on_after(max(0.0, deadline - anyio.current_time())):
            try:
                data = await stream.receive(_RECEIVE_BYTES)
            except _GONE:
                machine.eof_received(anyio.current_time())
            else:
                machine.receive_data(data, anyio.current_time())
            continue
        machine.handle_timer(anyio.current_time())


async def verify_server(
    stream: anyio.abc.ByteStream,
    *,
    server_id: uuid.UUID | None = None,
    system_id: uuid.UUID | None = None,
    connect_session_id: bytes | None = None,
    timeout: float = 5.0,
) -> tuple[anyio.abc.ByteStream, SynAnswered]:
    """Send tunnel_syn on a new ``stream`` and check that the answer comes from the target.

    The target is ``server_id`` (that server) or ``system_id`` (any server of that system);
    ``connect_session_id`` is the connect attempt's, when the stream was punched for one.
    Returns the stream, wrapped so that bytes the server sent right after its answer are
    read first, and the answer. Raises ``VerificationError`` when the far end refuses, is
    not a wavesync server, closes, or does not answer within ``timeout`` seconds.
    """
    initiator = TunnelSynInitiator(
        server_id=server_id,
        system_id=system_id,
        connect_session_id=connect_session_id,
        # The core takes its randomness as an argument: RFC 8489 §6 wants it cryptographic.
        transaction_id=os.urandom(12),
        now=anyio.current_time(),
        timeout=timeout,
    )
    try:
        await stream.send(initiator.data_to_send())
    except _GONE:
        initiator.eof_received(anyio.current_time())
    await _exchange(stream, initiator)
    event = initiator.next_event()
    if isinstance(event, SynFailed):
        raise VerificationError(event.reason, code=event.code)
    assert isinstance(event, SynAnswered)
    return PrefixedStream(stream, event.leftover), event


async def answer_client(
    stream: anyio.abc.ByteStream,
    *,
    system_id: uuid.UUID,
    server_id: uuid.UUID,
    require_session: bool = False,
    known_session: Callable[[bytes], bool] | None = None,
    timeout: float = 5.0,
) -> tuple[anyio.abc.ByteStream, SynAccepted]:
    """Read a client's tunnel_syn on a new ``stream`` and answer it as this server.

    With ``require_session`` (a punched UDT stream) the request must carry a connect
    session id that ``known_session`` recognises. Returns the stream, wrapped so that
    bytes the client pipelined after its request are read first, and what it asked for.
    Raises ``VerificationError`` when the request is refused (after sending the error
    answer), is not tunnel_syn at all, does not come within ``timeout`` seconds, or the
    client goes away before the answer.
    """
    responder = TunnelSynResponder(
        system_id=system_id,
        server_id=server_id,
        now=anyio.current_time(),
        timeout=timeout,
        require_session=require_session,
        known_session=known_session,
    )
    await _exchange(stream, responder)
    event = responder.next_event()
    answer = responder.data_to_send()
    if isinstance(event, SynRejected):
        if answer:
            # The client learns why it was refused; it may already be gone, which is its loss.
            with contextlib.suppress(*_GONE):
                await stream.send(answer)
        raise VerificationError(event.reason, code=event.code)
    assert isinstance(event, SynAccepted)
    try:
        await stream.send(answer)
    except _GONE:
        raise VerificationError("the client went away before the answer", code=None) from None
    return PrefixedStream(stream, event.leftover), event
