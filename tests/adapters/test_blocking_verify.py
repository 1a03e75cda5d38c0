"""tunnel_syn on blocking sockets: both ends, against each other and against anyio's.

The blocking adapter hands the user the very socket the exchange ran on, so the
point of every test here is that no byte past the exchange is lost: what a peer
pipelined after its tunnel_syn message must be the socket's next bytes.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections.abc import Iterator

import anyio
import anyio.abc
import pytest

from wavesync_adapters.anyio import verify as anyio_verify
from wavesync_adapters.blocking.verify import VerificationError, answer_client, verify_server
from wavesync_proto.tunnel_syn import (
    SynAnswered,
    TunnelSynInitiator,
    TunnelSynResponder,
)

SYSTEM = uuid.uuid4()
SERVER = uuid.uuid4()
SESSION = os.urandom(16)
WAIT = 10.0


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    left, right = socket.socketpair()
    with left, right:
        left.settimeout(WAIT)
        right.settimeout(WAIT)
        yield left, right


def receive_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"EOF after {len(data)} of {size} bytes"
        data += chunk
    return bytes(data)


def raw_request(session: bytes | None = SESSION, server_id: uuid.UUID = SERVER) -> bytes:
    initiator = TunnelSynInitiator(
        server_id=server_id, connect_session_id=session, transaction_id=os.urandom(12), now=0.0
    )
    return initiator.data_to_send()


def test_the_client_pipelined_bytes_stay_in_the_socket(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    client, server = pair
    client.sendall(raw_request() + b"first application bytes")
    accepted = answer_client(
        server,
        system_id=SYSTEM,
        server_id=SERVER,
        require_session=True,
        known_session=SESSION.__eq__,
    )
    assert accepted.connect_session_id == SESSION
    assert accepted.leftover == b""
    assert receive_exactly(server, 23) == b"first application bytes"
    assert server.gettimeout() == WAIT  # left as it was found


def test_the_server_first_bytes_stay_in_the_socket(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    client, server = pair
    outcome: list[SynAnswered | BaseException] = []

    def run_client() -> None:
        try:
            outcome.append(verify_server(client, server_id=SERVER, connect_session_id=SESSION))
        except BaseException as exc:  # reported to the test thread
            outcome.append(exc)

    thread = threading.Thread(target=run_client)
    thread.start()
    responder = TunnelSynResponder(system_id=SYSTEM, server_id=SERVER, now=0.0)
    while not responder.done:
        responder.receive_data(server.recv(1), 0.0)  # one byte at a time: the worst framing
    server.sendall(responder.data_to_send() + b"server speaks first")
    thread.join(WAIT)
    [answered] = outcome
    assert isinstance(answered, SynAnswered)
    assert answered.server_id == SERVER
    assert receive_exactly(client, 19) == b"server speaks first"


def test_blocking_client_and_blocking_server(pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = pair
    accepted: list[object] = []
    thread = threading.Thread(
        target=lambda: accepted.append(
            answer_client(server, system_id=SYSTEM, server_id=SERVER, timeout=WAIT)
        )
    )
    thread.start()
    answered = verify_server(client, system_id=SYSTEM, timeout=WAIT)
    thread.join(WAIT)
    assert answered.system_id == SYSTEM
    assert len(accepted) == 1
    client.sendall(b"ping")
    assert receive_exactly(server, 4) == b"ping"


def test_a_foreign_client_is_refused_at_its_first_bytes(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    client, server = pair
    client.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
    with pytest.raises(VerificationError) as refused:
        answer_client(server, system_id=SYSTEM, server_id=SERVER, timeout=WAIT)
    assert "SSH-2.0" in refused.value.reason


def test_a_foreign_server_is_refused(pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = pair
    server.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    with pytest.raises(VerificationError) as refused:
        verify_server(client, server_id=SERVER, timeout=WAIT)
    assert "not a wavesync server" in refused.value.reason


def test_an_unknown_session_is_answered_403_and_raised_on_both_ends(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    client, server = pair
    refusals: list[VerificationError] = []

    def serve() -> None:
        with pytest.raises(VerificationError) as refused:
            answer_client(
                server,
                system_id=SYSTEM,
                server_id=SERVER,
                require_session=True,
                known_session=lambda _: False,
                timeout=WAIT,
            )
        refusals.append(refused.value)

    thread = threading.Thread(target=serve)
    thread.start()
    with pytest.raises(VerificationError) as answered:
        verify_server(client, server_id=SERVER, connect_session_id=SESSION, timeout=WAIT)
    thread.join(WAIT)
    assert answered.value.code == 403
    assert [r.code for r in refusals] == [403]


def test_the_wrong_server_is_not_accepted(pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = pair
    client.sendall(raw_request(server_id=uuid.uuid4()))
    with pytest.raises(VerificationError) as refused:
        answer_client(server, system_id=SYSTEM, server_id=SERVER, timeout=WAIT)
    assert refused.value.code == 404


def test_a_silent_peer_times_out(pair: tuple[socket.socket, socket.socket]) -> None:
    client, _ = pair
    with pytest.raises(VerificationError) as silent:
        verify_server(client, server_id=SERVER, timeout=0.05)
    assert "no tunnel_syn answer within" in silent.value.reason


def test_a_peer_gone_is_a_verification_error(pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = pair
    client.sendall(raw_request()[:10])
    client.shutdown(socket.SHUT_WR)
    with pytest.raises(VerificationError) as gone:
        answer_client(server, system_id=SYSTEM, server_id=SERVER, timeout=WAIT)
    assert "closed" in gone.value.reason


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_blocking_client_against_anyio_server(backend: str) -> None:
    """Cross-runtime: the anyio responder in its own thread, the blocking initiator here."""
    ready = threading.Event()
    port: list[int] = []
    served: list[bytes] = []

    async def server() -> None:
        async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listeners:
            [listener] = listeners.listeners
            assert isinstance(listener, anyio.abc.SocketListener)
            port.append(int(listener.extra(anyio.abc.SocketAttribute.local_port)))
            ready.set()
            with anyio.fail_after(WAIT):
                stream = await listener.accept()
                async with stream:
                    verified, _ = await anyio_verify.answer_client(
                        stream, system_id=SYSTEM, server_id=SERVER
                    )
                    await verified.send(b"from anyio")
                    received = b""
                    while len(received) < 13:
                        received += await verified.receive()
                    served.append(received)

    thread = threading.Thread(target=anyio.run, args=(server,), kwargs={"backend": backend})
    thread.start()
    assert ready.wait(WAIT)
    with socket.create_connection(("127.0.0.1", port[0]), timeout=WAIT) as sock:
        answered = verify_server(sock, server_id=SERVER, timeout=WAIT)
        assert answered.system_id == SYSTEM
        assert receive_exactly(sock, 10) == b"from anyio"
        sock.sendall(b"from blocking")
        thread.join(WAIT)
    assert served == [b"from blocking"]
