"""Hypothesis properties of tunnel_syn: never a crash, one event at most, any chunking the same.

Every loop here is bounded: an end whose timer does not move must fail a test, not hang it.
"""

from __future__ import annotations

import ast
import itertools
import uuid
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wavesync_proto.tunnel_syn import (
    MAX_SYN_MESSAGE,
    SynAccepted,
    SynAnswered,
    SynEvent,
    SynFailed,
    SynRejected,
    TunnelSynInitiator,
    TunnelSynResponder,
)

from .test_tunnel_syn import (
    SERVER,
    START,
    SYSTEM,
    TID,
    answer,
    error_answer,
    events,
    framed,
    new_initiator,
    new_responder,
    request,
)

SESSIONS = st.none() | st.binary(min_size=16, max_size=16)
UUIDS = st.uuids()
# Bytes that frame as STUN (so they reach the decoder and the checks) and bytes that do not.
STUN_ISH = st.builds(
    framed, st.integers(0, 0x3FFF), st.binary(max_size=60).map(lambda b: b + bytes(-len(b) % 4))
)
VALID = st.sampled_from(
    [request(), request(server_id=None, system_id=SYSTEM), answer(), error_answer(404, "x")]
)
CHUNKS = st.lists(st.binary(max_size=40) | STUN_ISH | VALID, max_size=12)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in itertools.pairwise([0, *points, len(data)])]


FOREIGN_PREFIXES = ("not a wavesync server: ", "not a tunnel_syn: ")


def same_cause(event: SynEvent, stream: bytes) -> SynEvent:
    """``event`` without the quote of a foreign peer's first bytes, which must open ``stream``.

    A peer that is not STUN is refused at the first byte that shows it, so how many bytes
    the reason quotes depends on how they were chunked; that they are the stream's first
    bytes does not.
    """
    if isinstance(event, SynFailed | SynRejected):
        for prefix in FOREIGN_PREFIXES:
            if event.reason.startswith(prefix):
                quoted = ast.literal_eval(event.reason.removeprefix(prefix))
                assert isinstance(quoted, bytes)
                assert quoted
                assert stream.startswith(quoted)
                return replace(event, reason=prefix)
    return event


def deliver(
    machine: TunnelSynInitiator | TunnelSynResponder, pieces: list[bytes], now: float
) -> list[SynEvent]:
    """Feed ``pieces`` as an adapter does: once the end is done, later bytes are the stream's.

    The returned event's ``leftover`` is everything the application reads first: the bytes
    the machine kept plus the ones that arrived after it was done.
    """
    after = bytearray()
    for piece in pieces:
        if machine.done:
            after += piece
        else:
            machine.receive_data(piece, now)
    found = events(machine)
    return [
        replace(e, leftover=e.leftover + after) if isinstance(e, SynAccepted | SynAnswered) else e
        for e in found
    ]


def feed(
    machine: TunnelSynInitiator | TunnelSynResponder, chunks: list[bytes], *, end: str
) -> list[SynEvent]:
    """Every chunk a quarter second apart, then EOF or the deadline; all events seen."""
    now = START
    for chunk in chunks:
        now += 0.25
        machine.receive_data(chunk, now)
        assert machine.buffered <= MAX_SYN_MESSAGE
    if end == "eof":
        machine.eof_received(now)
    else:
        machine.handle_timer(now + 100.0)
    found = events(machine)
    assert machine.done
    assert machine.get_timer() is None
    return found


@pytest.mark.property
@given(chunks=CHUNKS, end=st.sampled_from(["eof", "timer"]))
def test_arbitrary_bytes_never_raise_and_end_the_initiator_with_one_event(
    chunks: list[bytes], end: str
) -> None:
    assert len(feed(new_initiator(), chunks, end=end)) == 1


@pytest.mark.property
@given(chunks=CHUNKS, end=st.sampled_from(["eof", "timer"]), require=st.booleans())
def test_arbitrary_bytes_never_raise_and_end_the_responder_with_one_event(
    chunks: list[bytes], end: str, require: bool
) -> None:
    responder = new_responder(require_session=require, known=())
    (event,) = feed(responder, chunks, end=end)
    if not isinstance(event, SynAccepted):
        # An error answer, if any, fits the message bound and is the only thing sent.
        assert len(responder.data_to_send()) <= MAX_SYN_MESSAGE


@pytest.mark.property
@given(chunks=CHUNKS, cuts=st.lists(st.integers(min_value=0), max_size=20))
def test_the_chunking_of_a_stream_never_changes_what_either_end_decides(
    chunks: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(chunks)
    for make in (new_initiator, new_responder):
        whole, pieces = make(), make()
        whole_events = deliver(whole, [stream], START)
        pieces_events = deliver(pieces, split(stream, cuts), START)
        assert whole.data_to_send() == pieces.data_to_send()
        assert [same_cause(e, stream) for e in pieces_events] == [
            same_cause(e, stream) for e in whole_events
        ]


def exchange(
    *,
    server_id: uuid.UUID,
    system_id: uuid.UUID,
    target_system: bool,
    session: bytes | None,
    client_first: bytes,
    server_first: bytes,
    cut: int,
) -> tuple[list[SynEvent], list[SynEvent]]:
    """One tunnel_syn exchange with each direction split in two at ``cut`` (modulo its length)."""
    initiator = TunnelSynInitiator(
        server_id=None if target_system else server_id,
        system_id=system_id if target_system else None,
        connect_session_id=session,
        transaction_id=TID,
        now=START,
    )
    responder = TunnelSynResponder(
        system_id=system_id,
        server_id=server_id,
        now=START,
        require_session=session is not None,
        known_session=lambda candidate: candidate == session,
    )
    upstream = initiator.data_to_send() + client_first
    accepted = deliver(responder, split(upstream, [cut]), START + 0.5)
    downstream = responder.data_to_send() + server_first
    answered = deliver(initiator, split(downstream, [cut]), START + 1.0)
    return answered, accepted


@pytest.mark.property
@given(
    ids=st.tuples(UUIDS, UUIDS),
    target_system=st.booleans(),
    session=SESSIONS,
    first_bytes=st.tuples(st.binary(max_size=64), st.binary(max_size=64)),
    cut=st.integers(min_value=0),
)
def test_request_and_answer_round_trip_with_the_first_bytes_kept_exactly(
    ids: tuple[uuid.UUID, uuid.UUID],
    target_system: bool,
    session: bytes | None,
    first_bytes: tuple[bytes, bytes],
    cut: int,
) -> None:
    (server_id, system_id), (client_first, server_first) = ids, first_bytes
    answered, accepted = exchange(
        server_id=server_id,
        system_id=system_id,
        target_system=target_system,
        session=session,
        client_first=client_first,
        server_first=server_first,
        cut=cut,
    )
    assert accepted == [
        SynAccepted(
            connect_session_id=session, target_was_system=target_system, leftover=client_first
        )
    ]
    assert answered == [
        SynAnswered(server_id=server_id, system_id=system_id, leftover=server_first, elapsed=1.0)
    ]


def test_every_split_point_of_both_directions_gives_the_same_exchange() -> None:
    session = bytes(range(16))
    # Past the end of the longer message (the answer) and the data after it.
    length = len(answer(session=session)) + 8
    for cut in range(length + 1):
        answered, accepted = exchange(
            server_id=SERVER,
            system_id=SYSTEM,
            target_system=False,
            session=session,
            client_first=b"pipeline",
            server_first=b"banner\r\n",
            cut=cut,
        )
        assert accepted == [
            SynAccepted(connect_session_id=session, target_was_system=False, leftover=b"pipeline")
        ], cut
        assert answered == [
            SynAnswered(server_id=SERVER, system_id=SYSTEM, leftover=b"banner\r\n", elapsed=1.0)
        ], cut
