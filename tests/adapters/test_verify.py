"""verify_server and answer_client on real loopback TCP, on asyncio and on trio.

Each test opens one TCP connection in the process; the far end is the other call, or a
hand-written peer (an HTTP server, a silent one, a raw tunnel_syn writer). Nothing sleeps
to wait: every step is bounded by ``fail_after`` and ends on bytes or an exception.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import pytest
from anyio.abc import SocketAttribute
from anyio.streams.buffered import BufferedByteReceiveStream

from wavesync_adapters.anyio.verify import VerificationError, answer_client, verify_server
from wavesync_proto.stun import decode_message, encode_message, stream_message_length
from wavesync_proto.tunnel_syn import SynAccepted, TunnelSyn, TunnelSynAnswer

pytestmark = pytest.mark.anyio
WAIT = 10.0  # seconds any one test may take before it fails
SYSTEM = uuid.UUID("04f5a9ea-3cb8-44b0-bb62-401b420701de")
SERVER = uuid.UUID("9b2f4c0e-1d7a-4e63-8a55-0c3f6b1e2d44")
OTHER = uuid.UUID("11111111-2222-4333-8444-555555555555")
SESSION = bytes(range(16))


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    backend: str = request.param
    return backend


@asynccontextmanager
async def tcp_pair() -> AsyncIterator[tuple[anyio.abc.SocketStream, anyio.abc.SocketStream]]:
    """(client end, server end) of one loopback TCP connection."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    async with listener:
        port = listener.extra(SocketAttribute.local_port)
        client = await anyio.connect_tcp("127.0.0.1", port)
        socket_listener = listener.listeners[0]
        assert isinstance(socket_listener, anyio.abc.SocketListener)
        server = await socket_listener.accept()
        async with client, server:
            yield client, server


async def read_message(stream: anyio.abc.ByteStream) -> bytes:
    """One whole STUN message and nothing after it."""
    buffered = BufferedByteReceiveStream(stream)
    header = await buffered.receive_exactly(20)
    length = stream_message_length(header)
    assert length is not None
    return header + await buffered.receive_exactly(length - 20)


async def receive_exactly(stream: anyio.abc.ByteStream, size: int) -> bytes:
    return await BufferedByteReceiveStream(stream).receive_exactly(size)


async def test_both_ends_verify_and_the_services_first_bytes_come_first() -> None:
    accepted: list[SynAccepted] = []
    with anyio.fail_after(WAIT):
        async with tcp_pair() as (client, server), anyio.create_task_group() as group:

            async def serve() -> None:
                stream, event = await answer_client(server, system_id=SYSTEM, server_id=SERVER)
                accepted.append(event)
                await stream.send(b"SSH-2.0-banner\r\n")
                assert await receive_exactly(stream, 5) == b"hello"

            group.start_soon(serve)
            stream, answered = await verify_server(client, system_id=SYSTEM)
            assert (answered.server_id, answered.system_id) == (SERVER, SYSTEM)
            assert await receive_exactly(stream, 16) == b"SSH-2.0-banner\r\n"
            await stream.send(b"hello")
    assert accepted == [SynAccepted(connect_session_id=None, target_was_system=True, leftover=b"")]


async def test_bytes_sent_with_the_answer_are_read_first_and_in_order() -> None:
    with anyio.fail_after(WAIT):
        async with tcp_pair() as (client, server), anyio.create_task_group() as group:

            async def raw_server() -> None:
                request = decode_message(await read_message(server))
                syn = TunnelSynAnswer(
                    server_id=SERVER, system_id=SYSTEM, connect_session_id=SESSION
                )
                # One write: the banner arrives in the same read as the answer.
                await server.send(encode_message(syn.to_stun(request.transaction_id)) + b"first ")
                # The rest only once the client has verified, so it cannot join that read.
                assert await receive_exactly(server, 2) == b"go"
                await server.send(b"second")

            group.start_soon(raw_server)
            stream, answered = await verify_server(
                client, server_id=SERVER, connect_session_id=SESSION
            )
            assert answered.leftover == b"first "
            await stream.send(b"go")
            assert await receive_exactly(stream, 12) == b"first second"


async def test_bytes_pipelined_after_the_request_are_read_first_and_in_order() -> None:
    with anyio.fail_after(WAIT):
        async with tcp_pair() as (client, server):
            request = TunnelSyn(server_id=SERVER, connect_session_id=SESSION)
            await client.send(encode_message(request.to_stun(b"\x05" * 12)) + b"GET / ")
            stream, accepted = await answer_client(
                server,
                system_id=SYSTEM,
                server_id=SERVER,
                require_session=True,
                known_session=lambda session: session == SESSION,
            )
            assert accepted == SynAccepted(
                connect_session_id=SESSION, target_was_system=False, leftover=b"GET / "
            )
            await client.send(b"HTTP/1.1")
            assert await receive_exactly(stream, 14) == b"GET / HTTP/1.1"
            answer = decode_message(await read_message(client))
            assert TunnelSynAnswer.from_stun(answer).connect_session_id == SESSION


async def refused_on_both_ends(
    client_kwargs: dict[str, object], server_kwargs: dict[str, object]
) -> tuple[VerificationError, VerificationError]:
    """Run both ends against each other; each must raise, and neither closes its stream."""
    errors: dict[str, VerificationError] = {}
    with anyio.fail_after(WAIT):
        async with tcp_pair() as (client, server), anyio.create_task_group() as group:

            async def serve() -> None:
                with pytest.raises(VerificationError) as refused:
                    await answer_client(server, system_id=SYSTEM, server_id=SERVER, **server_kwargs)  # type: ignore[arg-type]
                errors["server"] = refused.value
                # Still open: the client's next bytes arrive.
                assert await receive_exactly(server, 3) == b"bye"

            group.start_soon(serve)
            with pytest.raises(VerificationError) as failed:
                await verify_server(client, **client_kwargs)  # type: ignore[arg-type]
            errors["client"] = failed.value
            await client.send(b"bye")
    return errors["client"], errors["server"]


async def test_a_wrong_server_is_refused_404_on_both_ends() -> None:
    client_error, server_error = await refused_on_both_ends({"server_id": OTHER}, {})
    assert (client_error.code, client_error.reason) == (404, "Unknown Server")
    assert str(client_error) == "404 Unknown Server"
    assert (server_error.code, server_error.reason) == (404, "the request names another server")


async def test_an_unknown_session_is_refused_403_on_both_ends() -> None:
    client_error, server_error = await refused_on_both_ends(
        {"server_id": SERVER, "connect_session_id": b"\xee" * 16},
        {"require_session": True, "known_session": lambda session: session == SESSION},
    )
    assert (client_error.code, client_error.reason) == (403, "Unknown Session")
    assert (server_error.code, server_error.reason) == (403, "the request carries an unknown one")


async def test_an_http_server_fails_at_once_showing_its_first_bytes() -> None:
    with anyio.fail_after(WAIT):
        async with tcp_pair() as (client, server):
            await server.send(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            # A timeout far beyond fail_after: only the bytes themselves can end this in time.
            with pytest.raises(VerificationError) as failed:
                await verify_server(client, server_id=SERVER, timeout=3600.0)
    assert failed.value.code is None
    assert failed.value.reason.startswith("not a wavesync server: b'HTTP/1.1 400")


async def test_an_http_client_is_rejected_at_once_without_an_answer() -> None:
    with anyio.fail_after(WAIT):
        async with tcp_pair() as (client, server):
            await client.send(b"GET / HTTP/1.1\r\n\r\n")
            with pytest.raises(VerificationError) as rejected:
                await answer_client(server, system_id=SYSTEM, server_id=SERVER, timeout=3600.0)
            await server.send_eof()
            with pytest.raises(anyio.EndOfStream):
                await client.receive()  # nothing was answered before the EOF
    assert rejected.value.code is None
    assert rejected.value.reason.startswith("not a tunnel_syn: b'G")


async def test_a_silent_server_fails_after_the_timeout() -> None:
    with anyio.fail_after(WAIT):
        async with tcp_pair() as (client, server):
            with pytest.raises(VerificationError) as failed:
                await verify_server(client, server_id=SERVER, timeout=0.2)
            # The request went out; the silent end simply never answered it.
            request = TunnelSyn.from_stun(decode_message(await read_message(server)))
    assert request == TunnelSyn(server_id=SERVER)
    assert (failed.value.code, failed.value.reason) == (None, "no tunnel_syn answer within 0.2 s")


async def test_a_silent_client_is_rejected_after_the_timeout() -> None:
    with anyio.fail_after(WAIT):
        async with tcp_pair() as (_client, server):
            with pytest.raises(VerificationError) as rejected:
                await answer_client(server, system_id=SYSTEM, server_id=SERVER, timeout=0.2)
    assert (rejected.value.code, rejected.value.reason) == (
        None,
        "no tunnel_syn request within 0.2 s",
    )


async def test_a_server_that_closes_fails_verification() -> None:
    with anyio.fail_after(WAIT):
        async with tcp_pair() as (client, server):
            await server.send_eof()
            with pytest.raises(VerificationError) as failed:
                await verify_server(client, server_id=SERVER, timeout=3600.0)
    assert failed.value.reason == "the stream closed before the tunnel_syn answer"
