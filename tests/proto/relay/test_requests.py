"""RequestReader: one request per connection, what follows it kept; and the answers' bytes."""

from __future__ import annotations

import pytest

from wavesync_proto.errors import RemoteProtocolError
from wavesync_proto.relay import CONNECT_PATH, UPGRADE_PROTOCOL
from wavesync_proto.relay.requests import (
    ClientRequest,
    RequestError,
    RequestReader,
    StandbyRequest,
    error_response,
    switching_response,
)

from .helpers import (
    RELAY_HOST,
    SERVER_1,
    SYSTEM_A,
    connect_request,
    parse_answer,
    request_bytes,
    standby_request,
)

LIMIT = 8192
NONCE = bytes(range(16))


def reader() -> RequestReader:
    return RequestReader(max_request_bytes=LIMIT)


def feed_in_pieces(machine: RequestReader, data: bytes, size: int) -> None:
    """Feed ``data`` in reads of ``size`` bytes; none of them may complete a request."""
    for start in range(0, len(data), size):
        assert machine.feed(data[start : start + size]) is None


def refusal(data: bytes, *, pieces: int = 1) -> RequestError:
    """The RequestError feeding ``data`` (in ``pieces`` reads) raises."""
    with pytest.raises(RequestError) as caught:
        feed_in_pieces(reader(), data, -(-len(data) // pieces))
    assert caught.value.error_code_hint == caught.value.status
    assert isinstance(caught.value, RemoteProtocolError)
    return caught.value


def raw_request(head: str) -> bytes:
    return head.replace("\n", "\r\n").encode("latin-1")


# --- requests that are ours -------------------------------------------------------------------


def test_a_standby_request_carries_its_credentials_and_host() -> None:
    data = standby_request(SERVER_1, nonce=NONCE)
    request = reader().feed(data)
    assert isinstance(request, StandbyRequest)
    assert request.host == RELAY_HOST
    assert request.credentials.server_id == SERVER_1
    assert request.credentials.system_id == SYSTEM_A
    assert request.credentials.nonce == NONCE.hex()
    assert request.credentials.verify("system-a-secret-key-0123", RELAY_HOST)


def test_a_client_request_names_a_server_or_a_system() -> None:
    assert reader().feed(connect_request(SERVER_1)) == ClientRequest(
        server_id=SERVER_1, system_id=None
    )
    assert reader().feed(connect_request(system_id=SYSTEM_A)) == ClientRequest(
        server_id=None, system_id=SYSTEM_A
    )


@pytest.mark.parametrize(
    "data",
    [standby_request(SERVER_1, nonce=NONCE), connect_request(SERVER_1)],
    ids=["standby", "client"],
)
def test_a_request_fed_byte_by_byte(data: bytes) -> None:
    machine = reader()
    for index in range(len(data) - 1):
        assert machine.feed(data[index : index + 1]) is None
    assert machine.feed(data[-1:]) is not None
    assert machine.trailing_data == b""


def test_bytes_after_the_request_are_kept() -> None:
    data = connect_request(SERVER_1)
    machine = reader()
    assert machine.feed(data + b"first tunnel bytes\r\n\r\nGET / HTTP/1.1") is not None
    assert machine.trailing_data == b"first tunnel bytes\r\n\r\nGET / HTTP/1.1"


def test_bytes_after_a_request_that_ended_in_a_later_read_are_kept() -> None:
    data = connect_request(SERVER_1)
    machine = reader()
    assert machine.feed(data[:-1]) is None
    assert machine.feed(data[-1:] + b"\x00\x01early") is not None
    assert machine.trailing_data == b"\x00\x01early"


def test_a_request_of_exactly_the_limit_is_accepted() -> None:
    short = connect_request(SERVER_1)
    padding = LIMIT - len(short) - len("X-Pad: \r\n")
    data = request_bytes(
        CONNECT_PATH, [("Wavesync-Server", str(SERVER_1)), ("X-Pad", "p" * padding)]
    )
    assert len(data) == LIMIT
    assert reader().feed(data) is not None


def test_other_headers_may_repeat_and_are_joined() -> None:
    data = raw_request(
        f"GET {CONNECT_PATH} HTTP/1.1\nHost: relay\nConnection: keep-alive\nConnection: Upgrade\n"
        f"Upgrade: h2c\nUpgrade: {UPGRADE_PROTOCOL}\nX-Trace: 1\nX-Trace: 2\n"
        f"Wavesync-Server: {SERVER_1}\n\n"
    )
    assert reader().feed(data) == ClientRequest(server_id=SERVER_1, system_id=None)


def test_upgrade_tokens_are_matched_in_lists() -> None:
    data = request_bytes(
        CONNECT_PATH,
        [
            ("Connection", "keep-alive, UPGRADE"),
            ("Upgrade", f"websocket, {UPGRADE_PROTOCOL}"),
            ("Wavesync-Server", str(SERVER_1)),
        ],
        upgrade=False,
    )
    assert reader().feed(data) is not None


def test_the_upgrade_token_is_matched_without_regard_to_case() -> None:
    data = request_bytes(
        CONNECT_PATH,
        [
            ("Connection", "Upgrade"),
            ("Upgrade", UPGRADE_PROTOCOL.upper()),
            ("Wavesync-Server", str(SERVER_1)),
        ],
        upgrade=False,
    )
    assert reader().feed(data) is not None


def test_an_http_1_0_client_request_is_served() -> None:
    data = raw_request(
        f"GET {CONNECT_PATH} HTTP/1.0\nConnection: Upgrade\nUpgrade: {UPGRADE_PROTOCOL}\n"
        f"Wavesync-Server: {SERVER_1}\n\n"
    )
    assert reader().feed(data) == ClientRequest(server_id=SERVER_1, system_id=None)


def test_a_standby_request_with_a_body_length_of_zero_is_fine() -> None:
    data = standby_request(SERVER_1, nonce=NONCE)
    data = data.replace(b"\r\n\r\n", b"\r\nContent-Length: 0\r\n\r\n")
    assert isinstance(reader().feed(data), StandbyRequest)


# --- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/wavesync/relay/v1", CONNECT_PATH + "?x=1", "*"])
def test_an_unknown_path_is_404(path: str) -> None:
    error = refusal(request_bytes(path, [("Wavesync-Server", str(SERVER_1))]))
    assert error.status == 404


@pytest.mark.parametrize("method", ["POST", "PUT", "HEAD", "OPTIONS"])
def test_a_method_other_than_get_is_405(method: str) -> None:
    data = request_bytes(CONNECT_PATH, [("Wavesync-Server", str(SERVER_1))], method=method)
    assert refusal(data).status == 405


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [("Connection", "Upgrade")],
        [("Upgrade", UPGRADE_PROTOCOL)],
        [("Connection", "keep-alive"), ("Upgrade", UPGRADE_PROTOCOL)],
        [("Connection", "Upgrade"), ("Upgrade", "websocket")],
        [("Connection", "Upgrade"), ("Upgrade", "wavesync-relay/2")],
    ],
)
def test_a_request_without_our_upgrade_is_426(headers: list[tuple[str, str]]) -> None:
    data = request_bytes(
        CONNECT_PATH, [*headers, ("Wavesync-Server", str(SERVER_1))], upgrade=False
    )
    error = refusal(data)
    assert error.status == 426
    assert UPGRADE_PROTOCOL in str(error)


@pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: 5\r\n\r\nhello",
        b"Content-Length: 5\r\n\r\n",
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ],
)
def test_a_request_with_a_body_is_400(framing: bytes) -> None:
    data = connect_request(SERVER_1).replace(b"\r\n\r\n", b"\r\n" + framing)
    error = refusal(data)
    assert error.status == 400
    assert "no body" in str(error)


def test_an_oversized_head_is_431_before_it_ends() -> None:
    # Fed in small pieces, the refusal comes once the buffer passes the limit, without
    # waiting for an end that a slow-loris would never send.
    data = request_bytes(CONNECT_PATH, [("Wavesync-Server", str(SERVER_1)), ("X-Pad", "p" * LIMIT)])
    with pytest.raises(RequestError) as caught:
        feed_in_pieces(reader(), data[: LIMIT + 1], 512)
    assert caught.value.status == 431


def test_an_oversized_head_that_arrives_whole_is_431_too() -> None:
    # h11 measures only incomplete heads; the limit must not depend on how reads split.
    data = request_bytes(CONNECT_PATH, [("Wavesync-Server", str(SERVER_1)), ("X-Pad", "p" * LIMIT)])
    assert refusal(data).status == 431
    # Early tunnel bytes after a small head do not count against the head.
    machine = reader()
    assert machine.feed(connect_request(SERVER_1) + b"e" * (4 * LIMIT)) is not None
    assert len(machine.trailing_data) == 4 * LIMIT


@pytest.mark.parametrize("name", ["Wavesync-Server", "wavesync-server", "WAVESYNC-SERVER"])
def test_a_repeated_wavesync_header_is_400(name: str) -> None:
    # Even when both copies agree: a second copy is a sign of a confused or hostile proxy.
    data = request_bytes(
        CONNECT_PATH,
        [("Wavesync-Server", str(SERVER_1)), (name, str(SERVER_1))],
    )
    error = refusal(data)
    assert error.status == 400
    assert "given twice" in str(error)


def test_a_repeated_wavesync_header_on_a_standby_request_is_400() -> None:
    data = standby_request(SERVER_1, nonce=NONCE)
    data = data.replace(b"\r\n\r\n", b"\r\nWavesync-Time: 1\r\n\r\n")
    assert refusal(data).status == 400


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [("Wavesync-Server", str(SERVER_1)), ("Wavesync-System", str(SYSTEM_A))],
    ],
    ids=["neither", "both"],
)
def test_a_client_names_exactly_one_target(headers: list[tuple[str, str]]) -> None:
    error = refusal(request_bytes(CONNECT_PATH, headers))
    assert error.status == 400
    assert "exactly one" in str(error)


@pytest.mark.parametrize(
    "headers",
    [[("Wavesync-Server", "not-a-uuid")], [("Wavesync-System", "")]],
)
def test_a_client_target_must_be_a_uuid(headers: list[tuple[str, str]]) -> None:
    assert refusal(request_bytes(CONNECT_PATH, headers)).status == 400


def test_a_standby_request_with_bad_credentials_is_400() -> None:
    data = standby_request(SERVER_1, nonce=NONCE).replace(b"wavesync-nonce: ", b"wavesync-nonce: X")
    error = refusal(data)
    assert error.status == 400
    assert "wavesync-nonce" in str(error)


def test_a_standby_request_without_a_host_is_400() -> None:
    # HTTP/1.0 lets a request leave Host out; the signature covers it, so it must be there.
    data = standby_request(SERVER_1, nonce=NONCE)
    data = data.replace(b"HTTP/1.1", b"HTTP/1.0").replace(f"Host: {RELAY_HOST}\r\n".encode(), b"")
    assert b"Host" not in data
    error = refusal(data)
    assert error.status == 400
    assert "Host" in str(error)


@pytest.mark.parametrize(
    "data",
    [
        b"GARBAGE\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40) + b"\r\n\r\n",  # TLS hello
        b"GET / HTTP/1.1\r\nHost: relay\r\nno colon here\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
        b"GET  / HTTP/1.1\r\nHost: relay\r\n\r\n",
        b"\r\n\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: relay\r\nContent-Length: -1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: relay\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    ],
)
def test_malformed_http_is_400(data: bytes) -> None:
    error = refusal(data)
    assert error.status == 400
    assert "malformed HTTP" in str(error)


def test_malformed_http_is_400_byte_by_byte_too() -> None:
    assert refusal(b"GET / HTTP/1.1\r\nbad header line\r\n\r\n", pieces=40).status == 400


# --- the answers' bytes -----------------------------------------------------------------------


def test_a_switching_response_is_a_101_with_the_headers_given() -> None:
    data = switching_response([("Wavesync-Session", "ab" * 16), ("Wavesync-Server", "s")])
    answer = parse_answer(data + b"raw")
    assert answer.status == 101
    assert answer.headers["upgrade"] == UPGRADE_PROTOCOL
    assert answer.headers["connection"] == "Upgrade"
    assert answer.headers["wavesync-session"] == "ab" * 16
    assert answer.trailing == b"raw"


@pytest.mark.parametrize(
    ("status", "text"), [(400, "Bad Request"), (413, "Content Too Large"), (599, "Error")]
)
def test_an_error_response_carries_its_reason_as_text_and_closes(status: int, text: str) -> None:
    data = error_response(status, "why \u00e9", [("Retry-After", "1")])
    assert data.startswith(f"HTTP/1.1 {status} {text}\r\n".encode())
    answer = parse_answer(data)
    assert answer.status == status
    assert answer.body == "why \u00e9\n".encode()
    assert answer.headers["connection"] == "close"
    assert answer.headers["retry-after"] == "1"
    assert answer.headers["content-type"] == "text/plain; charset=utf-8"
