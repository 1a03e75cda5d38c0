"""The blocking Connector end to end: the real mediator and relay, the real anyio agent.

The mediator and the relay are ``wavesync`` subprocesses; the server is the anyio
``ServerAgent`` on a blocking portal (its own thread), so the blocking client meets the
reference implementation on every path. Each path is forced alone, then raced; a second
connection must reuse the punched hole; ``http.client`` must run unchanged over the
socket a connect returns; an offline server and a TCP server that is not wavesync must
fail with reasons. Every blocking step has a timeout; nothing sleeps to wait.
"""

from __future__ import annotations

import http.client
import os
import queue
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from tests.adapters.test_blocking_connect import (
    LOOPBACK,
    WAIT,
    Services,
    anyio_agent,
    running_services,
)
from wavesync_adapters.anyio.agent import AcceptedStream
from wavesync_adapters.blocking.agent import AcceptedStream as BlockingAccepted
from wavesync_adapters.blocking.agent import ServerAgent as BlockingAgent
from wavesync_adapters.blocking.connector import Connection, Connector, PathRaceError
from wavesync_adapters.blocking.forward import (
    LocalPortStop,
    copy_both_ways,
    forward_to_service,
    serve_local_port,
)
from wavesync_proto.addresses import Endpoint
from wavesync_proto.race import ALL_PATHS, PathKind

DIRECT_AND_RELAYED = [PathKind.LAN, PathKind.TCP, PathKind.UDP, PathKind.RELAY]


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Services]:
    """A relay and a mediator that offers it, both real subprocesses, for one test."""
    with running_services(tmp_path) as running:
        yield running


def connector_for(
    services: Services,
    server_id: uuid.UUID,
    paths: frozenset[PathKind] = ALL_PATHS,
    **options: Any,
) -> Connector:
    return Connector(
        server_id=server_id,
        mediator=services.mediator,
        relays=(services.relay_url,),
        paths=paths,
        lan_group=services.lan_group,
        lan_interface=LOOPBACK,
        lan_timeout=0.5,
        udp_host=LOOPBACK,
        deadline=8.0,
        **options,
    )


def receive_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"EOF after {len(data)} of {size} bytes"
        data += chunk
    return bytes(data)


def echoed(connection: Connection, size: int = 256 * 1024) -> bool:
    """Send ``size`` random bytes (from a second thread, so neither side's buffers need
    to hold them all) and read the echo back byte for byte."""
    payload = os.urandom(size)
    sock = connection.sock
    with sock:
        sock.settimeout(WAIT)
        sender = threading.Thread(target=sock.sendall, args=(payload,), name="test-send")
        sender.start()
        try:
            back = receive_exactly(sock, size)
        finally:
            sender.join(WAIT)
    return back == payload


@pytest.mark.parametrize("kind", DIRECT_AND_RELAYED)
def test_each_path_alone_reaches_the_server(services: Services, kind: PathKind) -> None:
    server_id = uuid.uuid4()
    with (
        anyio_agent(services, server_id) as agent,
        connector_for(services, server_id, frozenset({kind})) as client,
    ):
        connection = client.connect()
        assert connection.path is kind
        assert not connection.reused_hole
        assert isinstance(connection.sock, socket.socket)
        assert connection.sock.gettimeout() is None
        assert echoed(connection)
    # The server cannot tell a LAN client from a direct one: both dialled its TCP port.
    seen_as = PathKind.TCP if kind is PathKind.LAN else kind
    assert agent.counters.accepted[seen_as.value] == 1
    assert agent.counters.rejected == 0
    # After a mediator's answer the client tells it which path won (connection_result).
    asked_mediator = kind in (PathKind.TCP, PathKind.UDP)
    assert client.results_reported == (1 if asked_mediator else 0)
    assert client.mediator_requests == (1 if asked_mediator else 0)


def test_auto_races_every_path_and_one_socket_wins(services: Services) -> None:
    server_id = uuid.uuid4()
    with anyio_agent(services, server_id), connector_for(services, server_id) as client:
        first = client.connect()
        second = client.connect()
        assert echoed(first)
        assert echoed(second)


async def http_hello(accepted: AcceptedStream) -> None:
    """A one-request HTTP/1.1 service: enough for ``http.client`` on the other end."""
    reader = BufferedByteReceiveStream(accepted.stream)
    head = await reader.receive_until(b"\r\n\r\n", 8192)
    body = b"hello over " + accepted.path.value.encode() + b": " + head.split(b" ")[1]
    await accepted.stream.send(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    with anyio.move_on_after(WAIT):
        await reader.receive()  # until the client closes


@pytest.mark.parametrize("kind", [PathKind.TCP, PathKind.UDP, PathKind.RELAY])
def test_http_client_runs_over_the_socket(services: Services, kind: PathKind) -> None:
    server_id = uuid.uuid4()
    with (
        anyio_agent(services, server_id, http_hello),
        connector_for(services, server_id, frozenset({kind})) as client,
    ):
        connection = client.connect()
        web = http.client.HTTPConnection("wavesync.invalid", timeout=WAIT)
        web.sock = connection.sock  # already connected: http.client never dials
        try:
            web.request("GET", "/status")
            response = web.getresponse()
            assert response.status == 200
            assert response.read() == f"hello over {kind.value}: /status".encode()
        finally:
            web.close()


def test_a_second_connection_reuses_the_punched_hole(services: Services) -> None:
    server_id = uuid.uuid4()
    with (
        anyio_agent(services, server_id) as agent,
        connector_for(services, server_id, frozenset({PathKind.UDP})) as client,
    ):
        first = client.connect()
        second = client.connect()
        assert (first.reused_hole, second.reused_hole) == (False, True)
        assert second.target.startswith(first.target)
        assert echoed(first)
        assert echoed(second)
    # Observable on both ends: one connect request, two UDP streams.
    assert client.mediator_requests == 1
    assert agent.counters.connect_requests == 1
    assert agent.counters.accepted["udp"] == 2


def test_an_offline_server_fails_with_every_paths_reason(services: Services) -> None:
    with connector_for(services, uuid.uuid4()) as client, pytest.raises(PathRaceError) as failure:
        client.connect()
    report = str(failure.value)
    assert "lan search: no server answered" in report
    assert "mediator: connect failed: 404" in report  # no such server online
    assert f"relay {services.relay_url}: " in report
    assert failure.value.reason == "every path failed"  # all said no before the deadline


@contextmanager
def not_wavesync() -> Iterator[Endpoint]:
    """A TCP service that answers anything with an HTTP 400, like a web server would."""
    with socket.create_server((LOOPBACK, 0)) as listener:
        listener.settimeout(WAIT)

        def answer_once() -> None:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(WAIT)
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

        server = threading.Thread(target=answer_once, name="not-wavesync")
        server.start()
        try:
            yield listener.getsockname()[:2]
        finally:
            server.join(WAIT)


def test_a_tcp_server_that_is_not_wavesync_fails_verification(services: Services) -> None:
    # The agent advertises someone else's port: the dial works, tunnel_syn must not.
    server_id = uuid.uuid4()
    with (
        not_wavesync() as impostor,
        anyio_agent(services, server_id, advertise=(impostor,)),
        connector_for(services, server_id, frozenset({PathKind.TCP}), lan=False) as client,
        pytest.raises(PathRaceError) as failure,
    ):
        client.connect()
    assert "not a wavesync server" in str(failure.value)
    assert f"tcp {impostor[0]}:{impostor[1]}" in str(failure.value)


def test_importing_the_blocking_connector_loads_no_async_runtime() -> None:
    probe = (
        "import sys, wavesync_adapters.blocking.connector, wavesync_adapters.blocking.forward\n"
        "import wavesync_adapters.blocking.agent, wavesync_adapters.blocking.tunnel\n"
        "print(sorted({'asyncio', 'anyio', 'trio', 'sniffio'} & set(sys.modules)))"
    )
    result = subprocess.run(  # noqa: S603 - this interpreter with a fixed script
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=WAIT, check=True
    )
    assert result.stdout.strip() == "[]"


# --- forwarding ----------------------------------------------------------------------


def read_to_eof(sock: socket.socket) -> bytes:
    data = bytearray()
    while chunk := sock.recv(65536):
        data += chunk
    return bytes(data)


def test_copy_both_ways_passes_each_end_on_as_a_half_close() -> None:
    client, near = socket.socketpair()
    far, service = socket.socketpair()
    with client, near, far, service:
        for sock in (client, service):
            sock.settimeout(WAIT)
        total: list[int] = []
        copier = threading.Thread(target=lambda: total.append(copy_both_ways(near, far)))
        copier.start()
        request, answer = os.urandom(100_000), os.urandom(70_000)
        client.sendall(request)
        client.shutdown(socket.SHUT_WR)
        assert read_to_eof(service) == request  # the client's end reached the service
        service.sendall(answer)  # which still answers, then ends too
        service.shutdown(socket.SHUT_WR)
        assert read_to_eof(client) == answer
        copier.join(WAIT)
    assert total == [len(request) + len(answer)]


@dataclass(frozen=True)
class Accepted:
    sock: socket.socket
    path: PathKind


def test_forward_to_service_pipes_an_accepted_socket_to_a_local_port() -> None:
    payload = os.urandom(200_000)
    with socket.create_server((LOOPBACK, 0)) as listener:
        listener.settimeout(WAIT)

        def echo_once() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(WAIT)
                conn.sendall(read_to_eof(conn))

        service = threading.Thread(target=echo_once, name="test-service")
        service.start()
        client, accepted = socket.socketpair()
        with client:
            client.settimeout(WAIT)
            forwarder = threading.Thread(
                target=forward_to_service,
                args=(Accepted(accepted, PathKind.UDP), listener.getsockname()),
            )
            forwarder.start()
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)
            assert read_to_eof(client) == payload
            forwarder.join(WAIT)
            service.join(WAIT)
        accepted.close()
        assert not forwarder.is_alive()


def test_serve_local_port_carries_each_local_connection_and_stops(services: Services) -> None:
    server_id = uuid.uuid4()
    stop = LocalPortStop()
    bound: queue.Queue[Endpoint] = queue.Queue()
    with (
        anyio_agent(services, server_id),
        connector_for(services, server_id, frozenset({PathKind.TCP, PathKind.UDP})) as client,
    ):
        serving = threading.Thread(
            target=serve_local_port,
            args=(client, (LOOPBACK, 0)),
            kwargs={"started": bound.put, "stop": stop},
            name="test-local-port",
        )
        serving.start()
        try:
            port = bound.get(timeout=WAIT)
            with socket.create_connection(port, timeout=WAIT) as first:
                payload = os.urandom(100_000)
                first.sendall(payload)
                assert receive_exactly(first, len(payload)) == payload
            idle = socket.create_connection(port, timeout=WAIT)
            with idle:
                idle.sendall(b"ping")
                assert receive_exactly(idle, 4) == b"ping"
                stop.stop()
                serving.join(WAIT)
                assert not serving.is_alive()
                assert idle.recv(1) == b""  # the carried connection was ended with it
        finally:
            stop.stop()
            serving.join(WAIT)
            stop.close()


# --- the blocking twins together, and what is left behind -----------------------------


def blocking_echo(accepted: BlockingAccepted) -> None:
    sock = accepted.sock
    sock.settimeout(WAIT)
    while data := sock.recv(65536):
        sock.sendall(data)


def our_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("wavesync-")}


@pytest.mark.parametrize("kind", DIRECT_AND_RELAYED)
def test_the_blocking_agent_and_connector_meet_on_every_path(
    services: Services, kind: PathKind
) -> None:
    server_id = uuid.uuid4()
    before = our_threads()
    agent = BlockingAgent(
        system_id=services.system_id,
        server_id=server_id,
        key=services.key,
        mediator=services.mediator,
        relays=(services.relay_url,),
        tcp_listen=(LOOPBACK, 0),
        udp_host=LOOPBACK,
        lan_group=services.lan_group,
        lan_interfaces=(LOOPBACK,),
        standby_count=2,
    )
    with agent.running(blocking_echo):
        agent.wait_ready(WAIT)
        with connector_for(services, server_id, frozenset({kind})) as client:
            first = client.connect()
            second = client.connect()
            assert first.path is second.path is kind
            assert second.reused_hole == (kind is PathKind.UDP)
            assert echoed(first)
            assert echoed(second)
        connector_threads = {t for t in our_threads() - before if "connect" in t.name}
        assert not connector_threads  # the workers, the keeper and the UDT threads are gone
    assert not our_threads() - before
