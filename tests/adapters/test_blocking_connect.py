"""The blocking connect request and relay client against the real mediator, relay and agent.

The mediator and the relay are ``wavesync`` subprocesses; the server is the anyio
``ServerAgent`` on a blocking portal (its own thread), so the blocking code under test
talks to the reference implementation. A fake relay that sends the server's first bytes
in the same segment as its 101 shows that the relay client leaves them in the socket.
"""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import pytest

from tests.daemons import free_udp_port, new_system, relay_and_mediator
from wavesync_adapters._common import parse_tunnel_choice
from wavesync_adapters.anyio.agent import AcceptedStream, ServerAgent
from wavesync_adapters.blocking._net import SocketDatagramPort
from wavesync_adapters.blocking.connect import ConnectError, open_udp_for, request_connection
from wavesync_adapters.blocking.relay_client import RelayConnectError, open_relay_stream
from wavesync_proto.addresses import Endpoint
from wavesync_proto.discovery import DEFAULT_GROUP

WAIT = 20.0  # seconds any one blocking step may take before the test fails
LOOPBACK = "127.0.0.1"


@dataclass
class Services:
    system_id: uuid.UUID
    key: str
    mediator: Endpoint
    relay_url: str
    relay: Endpoint
    lan_group: Endpoint


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Services]:
    """A relay and a mediator that offers it, both real subprocesses, for one test."""
    with running_services(tmp_path) as running:
        yield running


@contextmanager
def running_services(tmp_path: Path) -> Iterator[Services]:
    """A relay and a mediator that offers it, both real subprocesses, until the block ends."""
    path, system_id, key = new_system(tmp_path, "blocking-connect")
    with relay_and_mediator(path) as daemons:
        host, port = daemons.relay_url.removeprefix("http://").rsplit(":", 1)
        yield Services(
            system_id=system_id,
            key=key,
            mediator=daemons.mediator,
            relay_url=daemons.relay_url,
            relay=(host, int(port)),
            lan_group=(DEFAULT_GROUP[0], free_udp_port()),
        )


async def echo(accepted: AcceptedStream) -> None:
    stream = accepted.stream
    while True:
        try:
            data = await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            return
        await stream.send(data)


@contextmanager
def anyio_agent(
    services: Services,
    server_id: uuid.UUID,
    handler: Callable[[AcceptedStream], Awaitable[None]] = echo,
    **options: Any,
) -> Iterator[ServerAgent]:
    """The anyio ``ServerAgent`` (echoing every stream) serving in its own thread."""
    agent = ServerAgent(
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
        **options,
    )
    with anyio.from_thread.start_blocking_portal() as portal:
        serving, _ = portal.start_task(agent.serve, handler)
        try:
            portal.call(_ready_within, agent, WAIT)
            yield agent
        finally:
            serving.cancel()


async def _ready_within(agent: ServerAgent, seconds: float) -> None:
    with anyio.fail_after(seconds):
        await agent.wait_ready()


def test_the_mediator_answers_over_both_copies(services: Services) -> None:
    server_id = uuid.uuid4()
    with anyio_agent(services, server_id):
        answer = request_connection(services.mediator, server_id=server_id, timeout=WAIT)
    assert answer.response.server_id == server_id
    assert answer.via in ("udp", "tcp")
    assert services.relay_url in answer.response.relay_urls


def test_the_request_leaves_from_a_given_port(services: Services) -> None:
    server_id = uuid.uuid4()
    with anyio_agent(services, server_id), open_udp_for(services.mediator) as sock:
        answer = request_connection(
            services.mediator, server_id=server_id, udp=SocketDatagramPort(sock), timeout=WAIT
        )
        assert sock.fileno() >= 0  # a port the caller gave stays open
    assert answer.response.server_id == server_id


def test_an_offline_server_is_the_mediators_404(services: Services) -> None:
    with pytest.raises(ConnectError) as failure:
        request_connection(services.mediator, server_id=uuid.uuid4(), timeout=WAIT)
    assert failure.value.code == 404


def test_a_silent_mediator_times_out() -> None:
    # A UDP port nobody reads and a TCP port nobody listens on: both copies fail.
    with pytest.raises(ConnectError) as failure:
        request_connection((LOOPBACK, free_udp_port()), system_id=uuid.uuid4(), timeout=0.5)
    assert failure.value.code is None


def test_a_tunnel_to_nowhere_fails_each_call_plainly() -> None:
    """Tunnel options are accepted (no more refusal): a tunnel that cannot open is the
    TCP copy's loss (the request fails with the mediator's silence), and the relay
    client's ``ConnectionError`` with the tunnel's reason."""
    upgrade = parse_tunnel_choice("upgrade")
    with pytest.raises(ConnectError):
        request_connection(
            (LOOPBACK, free_udp_port()), server_id=uuid.uuid4(), timeout=0.5, tunnel=upgrade
        )
    with pytest.raises(ConnectionError, match="upgrade tunnel: "):
        open_relay_stream((LOOPBACK, 1), server_id=uuid.uuid4(), tunnel=upgrade, timeout=2)


def test_the_relay_pairs_with_a_registered_server(services: Services) -> None:
    server_id = uuid.uuid4()
    with anyio_agent(services, server_id):
        tunnel = open_relay_stream(services.relay, server_id=server_id, timeout=WAIT)
        with tunnel.sock:
            assert tunnel.server_id == server_id
            assert tunnel.sock.gettimeout() is None
            assert len(tunnel.session_id) > 0


def test_the_relay_refuses_an_unknown_server(services: Services) -> None:
    with pytest.raises(RelayConnectError) as failure:
        open_relay_stream(services.relay, server_id=uuid.uuid4(), timeout=WAIT)
    assert failure.value.status == 404


@pytest.mark.parametrize("split", [None, 7, 1])
def test_bytes_after_the_101_stay_in_the_socket(split: int | None) -> None:
    # The server's first bytes ride in the 101's segment (or the head trickles in
    # ``split``-byte pieces, the blank line split across reads): none may be lost.
    server_id = uuid.uuid4()
    first = b"\r\n\r\nthe server spoke first" * 100
    answer = (
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: wavesync-relay/1\r\n"
        b"Wavesync-Session: "
        + b"ab" * 16
        + b"\r\nWavesync-Server: "
        + str(server_id).encode()
        + b"\r\n\r\n"
    )
    with socket.create_server((LOOPBACK, 0)) as listener:
        listener.settimeout(WAIT)

        def fake_relay() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(WAIT)
                request = b""
                while b"\r\n\r\n" not in request:
                    request += conn.recv(4096)
                whole = answer + first
                step = split or len(whole)
                for start in range(0, len(answer), step):
                    conn.sendall(whole[start : min(start + step, len(answer))])
                conn.sendall(first)
                conn.recv(1)  # until the client closes

        relay = threading.Thread(target=fake_relay, name="fake-relay")
        relay.start()
        try:
            tunnel = open_relay_stream(listener.getsockname(), server_id=server_id, timeout=WAIT)
            with tunnel.sock, tunnel.sock.makefile("rb") as reader:
                tunnel.sock.settimeout(WAIT)
                assert reader.read(len(first)) == first
            assert tunnel.session_id == bytes.fromhex("ab" * 16)
        finally:
            relay.join(WAIT)
