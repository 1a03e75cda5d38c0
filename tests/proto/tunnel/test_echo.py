"""The probe's echo: what the prober sends, what a tunnel server answers, and when it decides."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wavesync_proto.errors import LocalProtocolError, RemoteProtocolError
from wavesync_proto.tunnel.echo import (
    ECHO_ANSWER,
    ECHO_REQUEST,
    EchoAnswer,
    EchoCheck,
    EchoReader,
    NotEcho,
    starts_http,
)

NONCE = bytes(range(16))


def test_the_server_answers_the_request_and_keeps_what_follows() -> None:
    check = EchoCheck(NONCE)
    assert check.request == ECHO_REQUEST + NONCE
    reader = EchoReader()
    assert reader.feed(check.request[:10]) is None
    decision = reader.feed(check.request[10:] + b"app")
    assert decision == EchoAnswer(answer=ECHO_ANSWER + NONCE, rest=b"app")
    assert not check.feed(decision.answer[:5])
    assert check.feed(decision.answer[5:] + b"more")
    assert check.rest == b"more"


@pytest.mark.parametrize("first", [b"GET / HTTP/1.1\r\n", b"\x00\x01\x00\x08", b"\x16\x03\x01"])
def test_any_other_start_is_decided_at_the_first_byte_and_given_back(first: bytes) -> None:
    assert EchoReader().feed(first) == NotEcho(data=first)


def test_a_stream_that_ends_early_is_not_an_echo() -> None:
    reader = EchoReader()
    assert reader.feed(ECHO_REQUEST[:4]) is None
    assert reader.feed(b"") == NotEcho(data=ECHO_REQUEST[:4])


def test_a_garbled_or_short_answer_fails_the_check() -> None:
    with pytest.raises(RemoteProtocolError, match="garbled"):
        EchoCheck(NONCE).feed(ECHO_ANSWER + bytes(16))
    with pytest.raises(RemoteProtocolError, match="garbled"):
        EchoCheck(NONCE).feed(b"HTTP/1.1 200 OK\r\n")
    check = EchoCheck(NONCE)
    assert not check.feed(ECHO_ANSWER)
    with pytest.raises(RemoteProtocolError, match="ended after 16 of 32"):
        check.feed(b"")
    with pytest.raises(LocalProtocolError):
        EchoCheck(b"short")


def test_http_is_told_from_raw_streams_by_the_first_byte() -> None:
    assert starts_http(b"GET")
    assert starts_http(b"POST /")
    assert not starts_http(b"")
    assert not starts_http(ECHO_REQUEST)
    assert not starts_http(b"\x00\x01")  # STUN
    assert not starts_http(b"\x16\x03")  # TLS


@pytest.mark.property
@given(st.binary(max_size=64), st.integers(min_value=1, max_value=40))
def test_the_reader_holds_at_most_32_bytes_and_gives_every_byte_back(
    data: bytes, piece: int
) -> None:
    reader = EchoReader()
    decision = None
    fed = 0
    for start in range(0, len(data), piece):
        decision = reader.feed(data[start : start + piece])
        fed = start + piece
        if decision is not None:
            break
    if decision is None:
        decision = reader.feed(b"")
        fed = len(data)
    if isinstance(decision, NotEcho):
        assert decision.data == data[: min(fed, len(data))]
    else:
        assert decision is not None
        assert data.startswith(ECHO_REQUEST)
        assert ECHO_REQUEST + decision.answer[len(ECHO_ANSWER) :] + decision.rest == data[:fed]
