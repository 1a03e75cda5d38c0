"""The asyncio verify_server and answer_client on real loopback TCP (and one UDT pair).

Each test opens one connection in the process; the far end is the other call, or a
hand-written peer (an HTTP server, a silent one, a raw tunnel_syn writer). Nothing
sleeps to wait: every step is bounded by ``asyncio.timeout`` and ends on bytes or an
exception. The asyncio calls never read past the STUN message, so the bytes that came
with it stay in the ``StreamReader``: the tests check that none is lost or reordered.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

try:
    import uvloop  # noqa: F401 - only whether it is there
except ImportError:
    HAVE_UVLOOP = False
else:
    HAVE_UVLOOP = True

from wavesync_adapters.asyncio.udt import (
    create_udt_endpoint,
    open_udt_connection,
    start_udt_server,
)
from wavesync_adapters.asyncio.verify import VerificationError, answer_client, verify_server
from wavesync_proto.stun import decode_message, encode_message, stream_message_length
from wavesync_proto.tunnel_syn import SynAccepted, TunnelSyn, TunnelSynAnswer

pytestmark = pytest.mark.anyio
WAIT = 10.0  # seconds any one test may take before it fails
SYSTEM = uuid.UUID("04f5a9ea-3cb8-44b0-bb62-401b420701de")
SERVER = uuid.UUID("9b2f4c0e-1d7a-4e63-8a55-0c3f6b1e2d44")
OTHER = uuid.UUID("11111111-2222-4333-8444-555555555555")
SESSION = bytes(range(16))
Pair = tuple[asyncio.StreamReader, asyncio.StreamWriter]


#: The loops the adapter must run on: asyncio's own, and uvloop (skipped, with the
#: reason printed, where it is not installed).
ASYNCIO_LOOPS = [
    "asyncio",
    pytest.param(
        ("asyncio", {"use_uvloop": True}),
        id="uvloop",
        marks=pytest.mark.skipif(not HAVE_UVLOOP, reason="uvloop is not installed here"),
    ),
]


@pytest.fixture(params=ASYNCIO_LOOPS)
def anyio_backend(request: pytest.FixtureRequest) -> object:
    """Plain asyncio, and uvloop where it is installed (public asyncio APIs only)."""
    return request.param


@asynccontextmanager
async def tcp_pair() -> AsyncIterator[tuple[Pair, Pair]]:
    """(client end, server end) of one loopback TCP connection, as stream pairs."""
    accepted: asyncio.Queue[Pair] = asyncio.Queue()

    async def take(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accepted.put((reader, writer))

    server = await asyncio.start_server(take, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        client = await asyncio.open_connection("127.0.0.1", port)
        far = await accepted.get()
        try:
            yield client, far
        finally:
            for _, writer in (client, far):
                writer.close()


async def read_message(reader: asyncio.StreamReader) -> bytes:
    """One whole STUN message and nothing after it."""
    header = await reader.readexactly(20)
    length = stream_message_length(header)
    assert length is not None
    return header + await reader.readexactly(length - 20)


async def test_both_ends_verify_and_the_services_first_bytes_come_first() -> None:
    accepted: list[SynAccepted] = []
    async with asyncio.timeout(WAIT), tcp_pair() as (client, server):

        async def serve() -> None:
            accepted.append(await answer_client(*server, system_id=SYSTEM, server_id=SERVER))
            server[1].write(b"SSH-2.0-banner\r\n")
            assert await server[0].readexactly(5) == b"hello"

        async with asyncio.TaskGroup() as group:
            group.create_task(serve())
            answered = await verify_server(*client, system_id=SYSTEM)
            assert (answered.server_id, answered.system_id) == (SERVER, SYSTEM)
            assert await client[0].readexactly(16) == b"SSH-2.0-banner\r\n"
            client[1].write(b"hello")
    assert accepted == [SynAccepted(connect_session_id=None, target_was_system=True, leftover=b"")]


async def test_bytes_sent_with_the_answer_stay_in_the_reader_in_order() -> None:
    async with asyncio.timeout(WAIT), tcp_pair() as (client, (s_reader, s_writer)):

        async def raw_server() -> None:
            request = decode_message(await read_message(s_reader))
            syn = TunnelSynAnswer(server_id=SERVER, system_id=SYSTEM, connect_session_id=SESSION)
            # One write: the banner arrives in the same segment as the answer.
            s_writer.write(encode_message(syn.to_stun(request.transaction_id)) + b"first ")
            assert await s_reader.readexactly(2) == b"go"
            s_writer.write(b"second")

        async with asyncio.TaskGroup() as group:
            group.create_task(raw_server())
            answered = await verify_server(*client, server_id=SERVER, connect_session_id=SESSION)
            assert answered.leftover == b""  # never read: it is still in the reader
            client[1].write(b"go")
            assert await client[0].readexactly(12) == b"first second"


async def test_bytes_pipelined_after_the_request_stay_in_the_reader() -> None:
    async with asyncio.timeout(WAIT), tcp_pair() as ((c_reader, c_writer), server):
        request = TunnelSyn(server_id=SERVER, connect_session_id=SESSION)
        c_writer.write(encode_message(request.to_stun(b"\x05" * 12)) + b"GET / ")
        accepted = await answer_client(
            *server,
            system_id=SYSTEM,
            server_id=SERVER,
            require_session=True,
            known_session=lambda session: session == SESSION,
        )
        assert accepted == SynAccepted(
            connect_session_id=SESSION, target_was_system=False, leftover=b""
        )
        c_writer.write(b"HTTP/1.1")
        assert await server[0].readexactly(14) == b"GET / HTTP/1.1"
        answer = decode_message(await read_message(c_reader))
        assert TunnelSynAnswer.from_stun(answer).connect_session_id == SESSION


async def refused_on_both_ends(
    client_kwargs: dict[str, Any], server_kwargs: dict[str, Any]
) -> tuple[VerificationError, VerificationError]:
    """Run both ends against each other; each must raise, and neither closes its stream."""
    errors: dict[str, VerificationError] = {}
    async with asyncio.timeout(WAIT), tcp_pair() as (client, server):

        async def serve() -> None:
            with pytest.raises(VerificationError) as refused:
                await answer_client(*server, system_id=SYSTEM, server_id=SERVER, **server_kwargs)
            errors["server"] = refused.value
            assert await server[0].readexactly(3) == b"bye"  # still open

        async with asyncio.TaskGroup() as group:
            group.create_task(serve())
            with pytest.raises(VerificationError) as failed:
                await verify_server(*client, **client_kwargs)
            errors["client"] = failed.value
            client[1].write(b"bye")
    return errors["client"], errors["server"]


async def test_a_wrong_server_is_refused_404_on_both_ends() -> None:
    client_error, server_error = await refused_on_both_ends({"server_id": OTHER}, {})
    assert (client_error.code, client_error.reason) == (404, "Unknown Server")
    assert (server_error.code, server_error.reason) == (404, "the request names another server")


async def test_an_unknown_session_is_refused_403_on_both_ends() -> None:
    known: Callable[[bytes], bool] = lambda session: session == SESSION  # noqa: E731
    client_error, server_error = await refused_on_both_ends(
        {"server_id": SERVER, "connect_session_id": b"\xee" * 16},
        {"require_session": True, "known_session": known},
    )
    assert (client_error.code, client_error.reason) == (403, "Unknown Session")
    assert (server_error.code, server_error.reason) == (403, "the request carries an unknown one")


async def test_an_http_server_fails_at_once_showing_its_first_bytes() -> None:
    async with asyncio.timeout(WAIT), tcp_pair() as (client, (_, s_writer)):
        s_writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        # A timeout far beyond WAIT: only the bytes themselves can end this in time.
        with pytest.raises(VerificationError) as failed:
            await verify_server(*client, server_id=SERVER, timeout=3600.0)
    assert failed.value.code is None
    assert failed.value.reason.startswith("not a wavesync server: b'HTTP/1.1 400")


async def test_an_http_client_is_rejected_at_once_without_an_answer() -> None:
    async with asyncio.timeout(WAIT), tcp_pair() as ((c_reader, c_writer), server):
        c_writer.write(b"GET / HTTP/1.1\r\n\r\n")
        with pytest.raises(VerificationError) as rejected:
            await answer_client(*server, system_id=SYSTEM, server_id=SERVER, timeout=3600.0)
        server[1].write_eof()
        assert await c_reader.read() == b""  # nothing was answered before the EOF
    assert rejected.value.code is None
    assert rejected.value.reason.startswith("not a tunnel_syn: b'G")


async def test_a_silent_server_fails_after_the_timeout() -> None:
    async with asyncio.timeout(WAIT), tcp_pair() as (client, (s_reader, _)):
        with pytest.raises(VerificationError) as failed:
            await verify_server(*client, server_id=SERVER, timeout=0.2)
        request = TunnelSyn.from_stun(decode_message(await read_message(s_reader)))
    assert request == TunnelSyn(server_id=SERVER)
    assert (failed.value.code, failed.value.reason) == (None, "no tunnel_syn answer within 0.2 s")


async def test_a_silent_client_is_rejected_after_the_timeout() -> None:
    async with asyncio.timeout(WAIT), tcp_pair() as (_client, server):
        with pytest.raises(VerificationError) as rejected:
            await answer_client(*server, system_id=SYSTEM, server_id=SERVER, timeout=0.2)
    assert (rejected.value.code, rejected.value.reason) == (
        None,
        "no tunnel_syn request within 0.2 s",
    )


async def test_a_server_that_closes_fails_verification() -> None:
    async with asyncio.timeout(WAIT), tcp_pair() as (client, (_, s_writer)):
        s_writer.write_eof()
        with pytest.raises(VerificationError) as failed:
            await verify_server(*client, server_id=SERVER, timeout=3600.0)
    assert failed.value.reason == "the stream closed before the tunnel_syn answer"


async def test_a_client_whose_request_is_cut_short_is_rejected() -> None:
    async with asyncio.timeout(WAIT), tcp_pair() as ((_, c_writer), server):
        whole = encode_message(TunnelSyn(server_id=SERVER).to_stun(b"\x07" * 12))
        c_writer.write(whole[:25])
        c_writer.write_eof()
        with pytest.raises(VerificationError) as rejected:
            await answer_client(*server, system_id=SYSTEM, server_id=SERVER, timeout=3600.0)
    assert rejected.value.reason == "the stream closed before the tunnel_syn request after 25 bytes"


async def test_over_udt_the_first_bytes_follow_the_exchange_in_order() -> None:
    """The punched path's streams are UDT stream pairs: the same calls, nothing lost."""
    payload = bytes(range(256)) * 64
    async with asyncio.timeout(WAIT), await create_udt_endpoint(("127.0.0.1", 0)) as endpoint:
        done: asyncio.Queue[bytes] = asyncio.Queue()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await answer_client(reader, writer, system_id=SYSTEM, server_id=SERVER)
            await done.put(await reader.readexactly(len(payload)))
            writer.close()

        server = await start_udt_server(serve, endpoint=endpoint)
        reader, writer = await open_udt_connection(endpoint.local_address)
        # Pipelined: the payload leaves with the request, before the answer arrives.
        syn = TunnelSyn(server_id=SERVER)
        writer.write(encode_message(syn.to_stun(b"\x09" * 12)) + payload)
        answer = TunnelSynAnswer.from_stun(decode_message(await read_message(reader)))
        assert answer.server_id == SERVER
        assert await done.get() == payload
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()
