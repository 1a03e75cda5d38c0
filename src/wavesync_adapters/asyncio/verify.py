"""tunnel_syn on asyncio: prove that a new stream reaches the intended server before using it.

The twin of ``wavesync_adapters.anyio.verify``: ``TunnelSynInitiator`` and
``TunnelSynResponder`` (``wavesync_proto.tunnel_syn``) decide everything; this module
moves the bytes and the loop's clock between them and a ``(StreamReader, StreamWriter)``
pair, and turns the outcome into an event or ``VerificationError``.

Nothing is over-read: the reader is asked for at most what the STUN message still
lacks (up to its 20-byte header first, then up to the total its length field gives), so
the bytes the peer sent after its message stay in the ``StreamReader`` and the caller
reads them next. The reader is therefore not wrapped, and both calls return only the
event. Neither call closes the stream: whoever opened it decides.

This module imports nothing of anyio.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import Callable

from wavesync_proto.stun.errors import StunDecodeError
from wavesync_proto.stun.message import HEADER_LENGTH, stream_message_length
from wavesync_proto.tunnel_syn import (
    MAX_SYN_MESSAGE,
    SynAccepted,
    SynAnswered,
    SynFailed,
    SynRejected,
    TunnelSynInitiator,
    TunnelSynResponder,
)

from ..errors import VerificationError

__all__ = ["VerificationError", "answer_client", "verify_server"]

#: How a stream tells that its peer is gone; during tunnel_syn that is a failed exchange,
#: so callers handle one exception, ``VerificationError``.
_GONE = (ConnectionError, OSError)


def _wanted(received: bytearray) -> int:
    """How many more bytes the message at the start of ``received`` may need (at least 1).

    Past the header, the length field tells; a malformed or oversized header is the
    machine's to refuse (it sees the same bytes), so ask for one byte at most then.
    """
    try:
        total = stream_message_length(received)
    except StunDecodeError:
        return 1
    if total is None:
        return HEADER_LENGTH - len(received)
    if total > MAX_SYN_MESSAGE:
        return 1
    return max(1, total - len(received))


async def _exchange(
    reader: asyncio.StreamReader, machine: TunnelSynInitiator | TunnelSynResponder
) -> None:
    """Move bytes and time between ``reader`` and ``machine`` until the machine is done."""
    loop = asyncio.get_running_loop()
    received = bytearray()
    while not machine.done:
        deadline = machine.get_timer()
        assert deadline is not None  # a machine that is not done waits for its deadline
        try:
            async with asyncio.timeout_at(deadline):
                data = await reader.read(_wanted(received))
        except TimeoutError:
            machine.handle_timer(loop.time())
            continue
        except _GONE:
            machine.eof_received(loop.time())
            continue
        if not data:
            machine.eof_received(loop.time())
            continue
        received += data
        machine.receive_data(data, loop.time())


def _no_leftover(leftover: bytes) -> None:
    # We never asked for a byte past the message, so the machine cannot have any.
    assert not leftover, "tunnel_syn read past its message"


async def _send(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(data)
    await writer.drain()


async def verify_server(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    server_id: uuid.UUID | None = None,
    system_id: uuid.UUID | None = None,
    connect_session_id: bytes | None = None,
    timeout: float = 5.0,
) -> SynAnswered:
    """Send tunnel_syn on a new stream and check that the answer comes from the target.

    The target is ``server_id`` (that server) or ``system_id`` (any server of that system);
    ``connect_session_id`` is the connect attempt's, when the stream was punched for one.
    Returns the answer; the bytes the server sent right after it are still in ``reader``.
    Raises ``VerificationError`` when the far end refuses, is not a wavesync server,
    closes, or does not answer within ``timeout`` seconds. The loop's clock is the
    machine's (``loop.time()``), so the deadline is ``asyncio.timeout_at``'s.
    """
    loop = asyncio.get_running_loop()
    initiator = TunnelSynInitiator(
        server_id=server_id,
        system_id=system_id,
        connect_session_id=connect_session_id,
        # The core takes its randomness as an argument: RFC 8489 §6 wants it cryptographic.
        transaction_id=os.urandom(12),
        now=loop.time(),
        timeout=timeout,
    )
    try:
        await _send(writer, initiator.data_to_send())
    except _GONE:
        initiator.eof_received(loop.time())
    await _exchange(reader, initiator)
    event = initiator.next_event()
    if isinstance(event, SynFailed):
        raise VerificationError(event.reason, code=event.code)
    assert isinstance(event, SynAnswered)
    _no_leftover(event.leftover)
    return event


async def answer_client(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    system_id: uuid.UUID,
    server_id: uuid.UUID,
    require_session: bool = False,
    known_session: Callable[[bytes], bool] | None = None,
    timeout: float = 5.0,
) -> SynAccepted:
    """Read a client's tunnel_syn on a new stream and answer it as this server.

    With ``require_session`` (a punched UDT stream) the request must carry a connect
    session id that ``known_session`` recognises. Returns what the client asked for; the
    bytes it pipelined after its request are still in ``reader``. Raises
    ``VerificationError`` when the request is refused (after sending the error answer),
    is not tunnel_syn at all, does not come within ``timeout`` seconds, or the client
    goes away before the answer.
    """
    responder = TunnelSynResponder(
        system_id=system_id,
        server_id=server_id,
        now=asyncio.get_running_loop().time(),
        timeout=timeout,
        require_session=require_session,
        known_session=known_session,
    )
    await _exchange(reader, responder)
    event = responder.next_event()
    answer = responder.data_to_send()
    if isinstance(event, SynRejected):
        if answer:
            # The client learns why it was refused; it may already be gone, which is its loss.
            with contextlib.suppress(*_GONE):
                await _send(writer, answer)
        raise VerificationError(event.reason, code=event.code)
    assert isinstance(event, SynAccepted)
    _no_leftover(event.leftover)
    try:
        await _send(writer, answer)
    except _GONE:
        raise VerificationError("the client went away before the answer", code=None) from None
    return event
