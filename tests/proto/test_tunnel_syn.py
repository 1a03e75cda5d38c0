"""tunnel_syn driven in memory: both ends, every answer and refusal, with a hand-moved clock."""

from __future__ import annotations

import struct
import uuid

import pytest

from wavesync_proto.errors import LocalProtocolError
from wavesync_proto.mediator import MediatorMessageError, MediatorMethod
from wavesync_proto.mediator.attributes import ConnectSessionId, ServerId, SystemId
from wavesync_proto.stun import (
    BINDING,
    MAGIC_COOKIE,
    ErrorCode,
    Message,
    MessageClass,
    RawAttribute,
    UnknownAttributes,
    decode_message,
    encode_message,
)
from wavesync_proto.tunnel_syn import (
    MAX_SYN_MESSAGE,
    SynAccepted,
    SynAnswered,
    SynEvent,
    SynFailed,
    SynRejected,
    TunnelSyn,
    TunnelSynAnswer,
    TunnelSynInitiator,
    TunnelSynResponder,
)

SYSTEM = uuid.UUID("04f5a9ea-3cb8-44b0-bb62-401b420701de")
SERVER = uuid.UUID("9b2f4c0e-1d7a-4e63-8a55-0c3f6b1e2d44")
OTHER = uuid.UUID("11111111-2222-4333-8444-555555555555")
SESSION = bytes(range(16))
OTHER_SESSION = b"\xee" * 16
TID = b"\x07" * 12
START = 100.0


def message_type(message_class: MessageClass) -> int:
    empty = Message(message_class=message_class, method=0x109, transaction_id=TID)
    value: int = struct.unpack_from("!H", encode_message(empty))[0]
    return value


REQUEST_TYPE = message_type(MessageClass.REQUEST)
SUCCESS_TYPE = message_type(MessageClass.SUCCESS)
INDICATION_TYPE = message_type(MessageClass.INDICATION)


def new_initiator(
    *,
    server_id: uuid.UUID | None = SERVER,
    system_id: uuid.UUID | None = None,
    session: bytes | None = None,
    timeout: float = 5.0,
) -> TunnelSynInitiator:
    return TunnelSynInitiator(
        server_id=server_id,
        system_id=system_id,
        connect_session_id=session,
        transaction_id=TID,
        now=START,
        timeout=timeout,
    )


def new_responder(
    *,
    require_session: bool = False,
    known: tuple[bytes, ...] | None = None,
    timeout: float = 5.0,
) -> TunnelSynResponder:
    return TunnelSynResponder(
        system_id=SYSTEM,
        server_id=SERVER,
        now=START,
        timeout=timeout,
        require_session=require_session,
        known_session=None if known is None else known.__contains__,
    )


def request(
    *,
    server_id: uuid.UUID | None = SERVER,
    system_id: uuid.UUID | None = None,
    session: bytes | None = None,
    transaction_id: bytes = TID,
) -> bytes:
    syn = TunnelSyn(server_id=server_id, system_id=system_id, connect_session_id=session)
    return encode_message(syn.to_stun(transaction_id))


def answer(
    *,
    server_id: uuid.UUID = SERVER,
    system_id: uuid.UUID = SYSTEM,
    session: bytes | None = None,
    transaction_id: bytes = TID,
) -> bytes:
    syn = TunnelSynAnswer(server_id=server_id, system_id=system_id, connect_session_id=session)
    return encode_message(syn.to_stun(transaction_id))


def error_answer(code: int, reason: str, transaction_id: bytes = TID) -> bytes:
    syn = Message(
        message_class=MessageClass.REQUEST,
        method=MediatorMethod.TUNNEL_SYN,
        transaction_id=transaction_id,
    )
    return encode_message(syn.error_response(code, reason))


def framed(message_type: int, body: bytes, transaction_id: bytes = TID) -> bytes:
    """A STUN header around ``body``, whatever the body holds."""
    return struct.pack("!HHI12s", message_type, len(body), MAGIC_COOKIE, transaction_id) + body


def events(machine: TunnelSynInitiator | TunnelSynResponder) -> list[SynEvent]:
    found: list[SynEvent] = []
    for _ in range(2):  # one event per exchange: a second means a bug
        event = machine.next_event()
        if event is None:
            break
        found.append(event)
    return found


def failure(initiator: TunnelSynInitiator) -> SynFailed:
    (event,) = events(initiator)
    assert isinstance(event, SynFailed)
    return event


def rejection(responder: TunnelSynResponder) -> SynRejected:
    (event,) = events(responder)
    assert isinstance(event, SynRejected)
    return event


def decoded_answer(responder: TunnelSynResponder) -> Message:
    data = responder.data_to_send()
    message = decode_message(data)
    assert message.transaction_id == TID
    assert message.method == MediatorMethod.TUNNEL_SYN
    return message


def assert_finished(machine: TunnelSynInitiator | TunnelSynResponder) -> None:
    """A finished end wants no timer, sends nothing more and ignores every input."""
    assert machine.done
    assert machine.get_timer() is None
    assert machine.data_to_send() == b""
    machine.receive_data(answer() if isinstance(machine, TunnelSynInitiator) else request(), 1e6)
    machine.eof_received(1e6)
    machine.handle_timer(1e6)
    assert machine.next_event() is None
    assert machine.buffered == 0


# --- messages ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("syn", "attributes"),
    [
        (TunnelSyn(server_id=SERVER), (ServerId(SERVER),)),
        (TunnelSyn(system_id=SYSTEM), (SystemId(SYSTEM),)),
        (
            TunnelSyn(server_id=SERVER, connect_session_id=SESSION),
            (ServerId(SERVER), ConnectSessionId(SESSION)),
        ),
    ],
)
def test_the_request_carries_its_target_and_session(
    syn: TunnelSyn, attributes: tuple[object, ...]
) -> None:
    message = decode_message(encode_message(syn.to_stun(TID)))
    assert (message.message_class, message.method) == (MessageClass.REQUEST, 0x109)
    assert message.attributes == attributes
    assert TunnelSyn.from_stun(message) == syn


def test_the_answer_carries_both_ids_and_the_echoed_session() -> None:
    syn = TunnelSynAnswer(server_id=SERVER, system_id=SYSTEM, connect_session_id=SESSION)
    message = decode_message(encode_message(syn.to_stun(TID)))
    assert (message.message_class, message.method) == (MessageClass.SUCCESS, 0x109)
    assert message.attributes == (ServerId(SERVER), SystemId(SYSTEM), ConnectSessionId(SESSION))
    assert TunnelSynAnswer.from_stun(message) == syn


@pytest.mark.parametrize(
    "attributes", [(), (ServerId(SERVER), SystemId(SYSTEM)), (ConnectSessionId(SESSION),)]
)
def test_a_request_naming_no_target_or_two_is_malformed(attributes: tuple[object, ...]) -> None:
    message = Message(
        message_class=MessageClass.REQUEST,
        method=MediatorMethod.TUNNEL_SYN,
        transaction_id=TID,
        attributes=attributes,  # type: ignore[arg-type]
    )
    with pytest.raises(MediatorMessageError, match="exactly one of SERVER-ID and SYSTEM-ID"):
        TunnelSyn.from_stun(message)


def test_an_answer_without_the_system_id_is_malformed() -> None:
    message = Message(
        message_class=MessageClass.SUCCESS,
        method=MediatorMethod.TUNNEL_SYN,
        transaction_id=TID,
        attributes=(ServerId(SERVER),),
    )
    with pytest.raises(MediatorMessageError, match="SERVER-ID and SYSTEM-ID"):
        TunnelSynAnswer.from_stun(message)


def test_caller_misuse_raises_local_errors() -> None:
    with pytest.raises(LocalProtocolError, match="exactly one"):
        TunnelSyn(server_id=SERVER, system_id=SYSTEM)
    with pytest.raises(LocalProtocolError, match="exactly one"):
        new_initiator(server_id=None)
    with pytest.raises(LocalProtocolError, match="16 bytes"):
        new_initiator(session=b"short")
    with pytest.raises(LocalProtocolError, match="12 bytes"):
        TunnelSynInitiator(server_id=SERVER, transaction_id=b"x", now=0.0)
    with pytest.raises(LocalProtocolError, match="positive"):
        new_initiator(timeout=0.0)
    with pytest.raises(LocalProtocolError, match="positive"):
        new_responder(timeout=-1.0)
    with pytest.raises(LocalProtocolError, match="known_session"):
        new_responder(require_session=True)


# --- the initiator -------------------------------------------------------------------------


def test_the_initiator_sends_its_request_once() -> None:
    initiator = new_initiator(session=SESSION)
    assert initiator.data_to_send() == request(session=SESSION)
    assert initiator.data_to_send() == b""
    assert initiator.get_timer() == START + 5.0
    assert not initiator.done


def test_a_matching_answer_verifies_the_server_and_hands_over_what_follows() -> None:
    initiator = new_initiator(session=SESSION)
    initiator.data_to_send()
    initiator.receive_data(answer(session=SESSION) + b"SSH-2.0-banner\r\n", START + 0.25)
    assert events(initiator) == [
        SynAnswered(
            server_id=SERVER, system_id=SYSTEM, leftover=b"SSH-2.0-banner\r\n", elapsed=0.25
        )
    ]
    assert_finished(initiator)


def test_any_server_of_the_target_system_may_answer() -> None:
    initiator = new_initiator(server_id=None, system_id=SYSTEM)
    initiator.receive_data(answer(server_id=OTHER), START + 1.0)
    assert events(initiator) == [
        SynAnswered(server_id=OTHER, system_id=SYSTEM, leftover=b"", elapsed=1.0)
    ]


def test_an_answer_split_into_single_bytes_verifies_once_whole() -> None:
    initiator = new_initiator()
    data = answer() + b"!"
    for index in range(len(data) - 2):
        initiator.receive_data(data[index : index + 1], START)
        assert initiator.next_event() is None
        assert initiator.buffered == index + 1
    initiator.receive_data(data[-2:], START + 2.0)
    assert events(initiator) == [
        SynAnswered(server_id=SERVER, system_id=SYSTEM, leftover=b"!", elapsed=2.0)
    ]


def test_an_http_server_fails_at_its_first_bytes_which_the_reason_shows() -> None:
    initiator = new_initiator()
    initiator.receive_data(b"HTTP/1.1 400 Bad Request\r\n", START + 0.5)
    assert failure(initiator) == SynFailed(
        reason="not a wavesync server: b'HTTP/1.1 400 Bad'", code=None, elapsed=0.5
    )
    assert_finished(initiator)


def test_a_wrong_magic_cookie_fails_before_the_header_is_whole() -> None:
    initiator = new_initiator()
    initiator.receive_data(b"\x01\x09\x00\x00\x21\x12", START)  # good so far
    assert initiator.next_event() is None
    initiator.receive_data(b"\x00", START)  # the cookie's third byte is 0xA4
    event = failure(initiator)
    assert event.reason == r"not a wavesync server: b'\x01\t\x00\x00!\x12\x00'"


def test_a_message_longer_than_the_limit_fails_without_being_buffered() -> None:
    initiator = new_initiator()
    initiator.receive_data(struct.pack("!HHI12s", SUCCESS_TYPE, 1024, MAGIC_COOKIE, TID), START)
    event = failure(initiator)
    assert event.reason == f"a 1044-byte message is longer than {MAX_SYN_MESSAGE} bytes"
    assert initiator.buffered == 0


def test_the_longest_allowed_answer_is_read() -> None:
    padding = RawAttribute(0xC0FF, bytes(MAX_SYN_MESSAGE - len(answer()) - 4))
    message = decode_message(answer())
    longest = encode_message(
        Message(
            message_class=message.message_class,
            method=message.method,
            transaction_id=TID,
            attributes=(*message.attributes, padding),
        )
    )
    assert len(longest) == MAX_SYN_MESSAGE
    initiator = new_initiator()
    initiator.receive_data(longest, START)
    assert isinstance(initiator.next_event(), SynAnswered)


@pytest.mark.parametrize(
    ("code", "reason"), [(404, "Unknown Server"), (403, "Unknown Session"), (400, "Bad Request")]
)
def test_an_error_answer_fails_with_the_servers_code_and_phrase(code: int, reason: str) -> None:
    initiator = new_initiator()
    initiator.receive_data(error_answer(code, reason), START + 1.5)
    assert failure(initiator) == SynFailed(reason=reason, code=code, elapsed=1.5)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (
            encode_message(
                Message(message_class=MessageClass.ERROR, method=0x109, transaction_id=TID)
            ),
            "tunnel_syn error response without ERROR-CODE",
        ),
        (answer(transaction_id=b"\x08" * 12), "a tunnel_syn answer to another transaction"),
        # An echo service sends our own request back: that is no answer.
        (request(), "not a tunnel_syn answer: method 0x109 REQUEST"),
        (
            encode_message(
                Message(message_class=MessageClass.SUCCESS, method=BINDING, transaction_id=TID)
            ),
            "not a tunnel_syn answer: method 0x001 SUCCESS",
        ),
        (answer(server_id=OTHER), f"answered by server {OTHER}, not {SERVER}"),
        (
            framed(SUCCESS_TYPE, b"\x40\x02\x00\x10" + SERVER.bytes),
            "malformed tunnel_syn answer (tunnel_syn answer must carry SERVER-ID and SYSTEM-ID)",
        ),
        (
            framed(SUCCESS_TYPE, b"\x40\x02\x00\x04abcd"),
            "malformed tunnel_syn answer (SERVER-ID must be 16 bytes, not 4)",
        ),
        (answer(session=SESSION), "the answer carries a connect session id the request did not"),
    ],
)
def test_anything_but_the_expected_answer_fails_naming_what(data: bytes, reason: str) -> None:
    initiator = new_initiator()
    initiator.receive_data(data + b"more", START + 0.5)
    assert failure(initiator) == SynFailed(reason=reason, code=None, elapsed=0.5)
    assert_finished(initiator)


def test_a_server_of_another_system_fails_a_system_target() -> None:
    initiator = new_initiator(server_id=None, system_id=SYSTEM)
    initiator.receive_data(answer(system_id=OTHER), START)
    assert failure(initiator).reason == f"answered by a server of system {OTHER}, not {SYSTEM}"


@pytest.mark.parametrize(
    ("echoed", "reason"),
    [
        (None, "the answer does not echo our connect session id"),
        (OTHER_SESSION, "the answer echoes another connect session id"),
    ],
)
def test_the_answer_must_echo_our_session(echoed: bytes | None, reason: str) -> None:
    initiator = new_initiator(session=SESSION)
    initiator.receive_data(answer(session=echoed), START)
    assert failure(initiator).reason == reason


def test_eof_before_the_answer_fails() -> None:
    initiator = new_initiator()
    initiator.eof_received(START + 0.25)
    assert failure(initiator) == SynFailed(
        reason="the stream closed before the tunnel_syn answer", code=None, elapsed=0.25
    )
    partial = new_initiator()
    partial.receive_data(answer()[:7], START)
    partial.eof_received(START)
    assert failure(partial).reason == "the stream closed before the tunnel_syn answer after 7 bytes"


def test_silence_fails_at_the_deadline_and_not_before() -> None:
    initiator = new_initiator(timeout=0.25)
    initiator.data_to_send()
    assert initiator.get_timer() == START + 0.25
    initiator.handle_timer(START + 0.125)
    assert initiator.next_event() is None
    assert initiator.get_timer() == START + 0.25
    initiator.handle_timer(START + 0.25)
    assert failure(initiator) == SynFailed(
        reason="no tunnel_syn answer within 0.25 s", code=None, elapsed=0.25
    )
    assert_finished(initiator)


def test_a_failed_initiator_sends_nothing_it_had_not_sent() -> None:
    initiator = new_initiator()
    initiator.handle_timer(START + 10.0)
    assert initiator.data_to_send() == b""


# --- the responder -------------------------------------------------------------------------


def test_a_request_for_this_server_is_answered_and_accepted() -> None:
    responder = new_responder()
    assert responder.get_timer() == START + 5.0
    assert responder.data_to_send() == b""
    responder.receive_data(request() + b"GET / HTTP/1.1\r\n", START + 0.5)
    assert events(responder) == [
        SynAccepted(
            connect_session_id=None, target_was_system=False, leftover=b"GET / HTTP/1.1\r\n"
        )
    ]
    assert responder.data_to_send() == answer()
    assert_finished(responder)


def test_a_request_for_this_system_is_accepted_and_says_so() -> None:
    responder = new_responder()
    responder.receive_data(request(server_id=None, system_id=SYSTEM), START)
    assert events(responder) == [
        SynAccepted(connect_session_id=None, target_was_system=True, leftover=b"")
    ]
    assert responder.data_to_send() == answer()


def test_without_require_session_any_session_is_echoed_unchecked() -> None:
    consulted: list[bytes] = []

    def known(session: bytes) -> bool:
        consulted.append(session)
        return False

    responder = TunnelSynResponder(
        system_id=SYSTEM, server_id=SERVER, now=START, known_session=known
    )
    responder.receive_data(request(session=OTHER_SESSION), START)
    assert events(responder) == [
        SynAccepted(connect_session_id=OTHER_SESSION, target_was_system=False, leftover=b"")
    ]
    assert responder.data_to_send() == answer(session=OTHER_SESSION)
    assert consulted == []


def test_require_session_accepts_a_known_session() -> None:
    responder = new_responder(require_session=True, known=(SESSION,))
    responder.receive_data(request(session=SESSION), START)
    assert isinstance(responder.next_event(), SynAccepted)
    assert responder.data_to_send() == answer(session=SESSION)


@pytest.mark.parametrize(
    ("session", "reason"),
    [
        (None, "the request carries no connect session id"),
        (OTHER_SESSION, "the request carries an unknown one"),
    ],
)
def test_require_session_refuses_403_without_a_known_session(
    session: bytes | None, reason: str
) -> None:
    responder = new_responder(require_session=True, known=(SESSION,))
    responder.receive_data(request(session=session), START)
    assert rejection(responder) == SynRejected(reason=reason, code=403)
    assert decoded_answer(responder).error_code == ErrorCode(403, "Unknown Session")
    assert_finished(responder)


@pytest.mark.parametrize(
    "data",
    [request(server_id=OTHER), request(server_id=None, system_id=OTHER)],
    ids=["server", "system"],
)
def test_another_target_is_refused_404_before_the_session_is_looked_at(data: bytes) -> None:
    responder = new_responder(require_session=True, known=())
    responder.receive_data(data, START)
    assert rejection(responder) == SynRejected(reason="the request names another server", code=404)
    assert decoded_answer(responder).error_code == ErrorCode(404, "Unknown Server")


def test_a_request_naming_both_targets_is_refused_400_saying_why() -> None:
    both = framed(
        REQUEST_TYPE,
        b"\x40\x01\x00\x10" + SYSTEM.bytes + b"\x40\x02\x00\x10" + SERVER.bytes,
    )
    responder = new_responder()
    responder.receive_data(both, START)
    why = "tunnel_syn must name exactly one of SERVER-ID and SYSTEM-ID"
    assert rejection(responder) == SynRejected(reason=why, code=400)
    assert decoded_answer(responder).error_code == ErrorCode(400, why)


def test_an_undecodable_request_is_refused_400_to_its_transaction() -> None:
    responder = new_responder()
    responder.receive_data(framed(REQUEST_TYPE, b"\x40\x02\x00\x04abcd"), START)
    why = "malformed tunnel_syn: SERVER-ID must be 16 bytes, not 4"
    assert rejection(responder) == SynRejected(reason=why, code=400)
    assert decoded_answer(responder).error_code == ErrorCode(400, why)


def test_an_unknown_required_attribute_is_refused_420_listing_it() -> None:
    responder = new_responder()
    responder.receive_data(
        framed(REQUEST_TYPE, b"\x40\x02\x00\x10" + SERVER.bytes + b"\x7f\x00\x00\x00"), START
    )
    assert rejection(responder) == SynRejected(reason="unknown attributes", code=420)
    message = decoded_answer(responder)
    assert message.error_code == ErrorCode(420, "Unknown Attribute")
    assert message.get(UnknownAttributes) == UnknownAttributes((0x7F00,))


def test_a_request_of_another_method_is_refused_400() -> None:
    responder = new_responder()
    responder.receive_data(
        encode_message(
            Message(message_class=MessageClass.REQUEST, method=BINDING, transaction_id=TID)
        ),
        START,
    )
    assert rejection(responder) == SynRejected(reason="a request of method 0x001", code=400)
    error = decode_message(responder.data_to_send())
    assert (error.method, error.message_class) == (BINDING, MessageClass.ERROR)


@pytest.mark.parametrize("data", [answer(), error_answer(404, "Unknown Server")])
def test_a_message_that_is_not_a_request_gets_no_answer(data: bytes) -> None:
    responder = new_responder()
    responder.receive_data(data, START)
    event = rejection(responder)
    assert event.code is None
    assert event.reason.startswith("not a request: method 0x109 ")
    assert responder.data_to_send() == b""


def test_a_peer_that_is_not_stun_is_rejected_at_once_without_an_answer() -> None:
    responder = new_responder()
    responder.receive_data(b"G", START)
    assert rejection(responder) == SynRejected(reason="not a tunnel_syn: b'G'", code=None)
    assert_finished(responder)


def test_an_overlong_request_is_refused_400_without_being_read() -> None:
    responder = new_responder()
    responder.receive_data(struct.pack("!HHI12s", REQUEST_TYPE, 1100, MAGIC_COOKIE, TID), START)
    why = f"a 1120-byte message is longer than {MAX_SYN_MESSAGE} bytes"
    assert rejection(responder) == SynRejected(reason=why, code=400)
    assert decoded_answer(responder).error_code == ErrorCode(400, why)
    assert responder.buffered == 0


def test_an_overlong_indication_gets_no_answer() -> None:
    responder = new_responder()
    responder.receive_data(struct.pack("!HHI12s", INDICATION_TYPE, 2000, MAGIC_COOKIE, TID), START)
    assert rejection(responder).code is None
    assert responder.data_to_send() == b""


def test_a_slow_loris_is_rejected_at_the_deadline_without_an_answer() -> None:
    responder = new_responder(timeout=0.2)
    data = request()
    for step in range(10):  # one byte every 10 ms: never whole before the deadline
        responder.receive_data(data[step : step + 1], START + step * 0.01)
        responder.handle_timer(START + step * 0.01)
    assert responder.next_event() is None
    assert responder.get_timer() == pytest.approx(START + 0.2)
    responder.handle_timer(START + 0.2)
    assert rejection(responder) == SynRejected(
        reason="no tunnel_syn request within 0.2 s", code=None
    )
    assert_finished(responder)


def test_eof_before_the_request_is_whole_is_rejected_without_an_answer() -> None:
    responder = new_responder()
    responder.receive_data(request()[:30], START)
    responder.eof_received(START)
    assert rejection(responder) == SynRejected(
        reason="the stream closed before the tunnel_syn request after 30 bytes", code=None
    )
    assert responder.data_to_send() == b""


# --- both ends -----------------------------------------------------------------------------


def test_initiator_and_responder_agree_and_each_keeps_the_others_first_bytes() -> None:
    initiator = new_initiator(server_id=None, system_id=SYSTEM, session=SESSION)
    responder = new_responder(require_session=True, known=(SESSION,))
    responder.receive_data(initiator.data_to_send() + b"client first", START + 0.125)
    initiator.receive_data(responder.data_to_send() + b"server first", START + 0.25)
    assert events(responder) == [
        SynAccepted(connect_session_id=SESSION, target_was_system=True, leftover=b"client first")
    ]
    assert events(initiator) == [
        SynAnswered(
            server_id=SERVER,
            system_id=SYSTEM,
            leftover=b"server first",
            elapsed=0.25,
        )
    ]


def test_a_refusal_reaches_the_initiator_with_code_and_phrase() -> None:
    initiator = new_initiator(server_id=OTHER)
    responder = new_responder()
    responder.receive_data(initiator.data_to_send(), START)
    initiator.receive_data(responder.data_to_send(), START + 0.5)
    assert rejection(responder).code == 404
    assert failure(initiator) == SynFailed(reason="Unknown Server", code=404, elapsed=0.5)
