"""End to end: the real `wavesync mediator` program, an anyio server agent and client on loopback.

The mediator runs as a subprocess exactly as an operator starts it; the server
registers over TCP and acks over UDP, the client asks over UDP and TCP. Each
test runs on asyncio and on trio (anyio's pytest plugin), and every wait is
bounded by ``fail_after`` so a broken exchange fails instead of hanging.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.abc
import pytest

from tests.daemons import run_wavesync, wavesync_daemon
from wavesync_adapters.anyio.connect import ConnectError, request_connection
from wavesync_adapters.anyio.listen import MediatorListener, RegistrationError
from wavesync_proto.addresses import Endpoint
from wavesync_proto.mediator.listen import ConnectionRequestReceived
from wavesync_proto.mediator.systems import parse_systems
from wavesync_proto.stun.attributes import XorMappedAddress
from wavesync_proto.stun.message import (
    BINDING,
    Message,
    MessageClass,
    decode_message,
    encode_message,
)

READY = r"mediator listening on udp\+tcp (?P<host>[\d.]+):(?P<port>\d+)"
RELAY = "https://relay.test.invalid:8443/"
WAIT = 15.0  # seconds any one step may take before the test fails
LOCAL_TCP: Endpoint = ("192.0.2.10", 4433)
FORWARDED_TCP: Endpoint = ("198.51.100.7", 443)

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    backend: str = request.param
    return backend


@dataclass(frozen=True)
class Mediator:
    address: Endpoint
    systems: Mapping[uuid.UUID, str]


@pytest.fixture(scope="module")
def mediator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mediator]:
    # Two systems made by `wavesync keygen`, as an operator would.
    entries = [run_wavesync("keygen", "--name", name) for name in ("alpha", "beta")]
    assert all(entry.returncode == 0 for entry in entries)
    path: Path = tmp_path_factory.mktemp("mediator") / "systems.toml"
    path.write_text("\n".join(entry.stdout for entry in entries), encoding="utf-8")
    systems = parse_systems(path.read_text(encoding="utf-8"))
    assert len(systems) == 2
    with wavesync_daemon(
        "mediator", "--listen", "127.0.0.1:0", "--systems", str(path), "--relay-url", RELAY,
        ready=READY,
    ) as (_, ready):  # fmt: skip
        yield Mediator(("127.0.0.1", int(ready["port"])), systems)


def listener_for(
    mediator: Mediator, system_id: uuid.UUID, key: str | None = None
) -> MediatorListener:
    return MediatorListener(
        mediator.address,
        system_id=system_id,
        server_id=uuid.uuid4(),
        system_key=mediator.systems[system_id] if key is None else key,
        local_endpoints=[LOCAL_TCP],
        forwarded_endpoints=[FORWARDED_TCP],
    )


def local(udp: anyio.abc.UDPSocket) -> Endpoint:
    address = udp.extra(anyio.abc.SocketAttribute.local_address)
    return (str(address[0]), int(address[1]))


async def serve_one_request(
    listener: MediatorListener, udp: anyio.abc.UDPSocket
) -> tuple[ConnectionRequestReceived, Endpoint | None]:
    request = await listener.next_request()
    assert isinstance(request, ConnectionRequestReceived)
    return request, await listener.acknowledge(request.connect_session_id, udp)


async def test_a_client_reaches_a_server_by_its_id_and_both_learn_each_others_udp_address(
    mediator: Mediator,
) -> None:
    system_id = next(iter(mediator.systems))
    listener = listener_for(mediator, system_id)
    served: list[tuple[ConnectionRequestReceived, Endpoint | None]] = []
    with anyio.fail_after(WAIT):
        async with (
            anyio.create_task_group() as group,
            await anyio.create_udp_socket(local_host="127.0.0.1") as server_udp,
            await anyio.create_udp_socket(local_host="127.0.0.1") as client_udp,
        ):
            server_address, client_address = local(server_udp), local(client_udp)
            await group.start(listener.run)
            registered = await listener.wait_registered()
            assert registered.public_endpoint[0] == "127.0.0.1"

            async def server_side() -> None:
                served.append(await serve_one_request(listener, server_udp))

            group.start_soon(server_side)
            answer = await request_connection(
                mediator.address, server_id=listener.server_id, udp=client_udp
            )
            group.cancel_scope.cancel()
    [(request, acked_endpoint)] = served
    # The server learned the client's UDP mapping (on loopback, the socket itself)...
    assert request.client_udp_endpoint == client_address
    # ...and the mediator saw the server's ack come from the server's punching socket,
    assert acked_endpoint == server_address
    # which is what the client is told, with every TCP endpoint and the relay.
    response = answer.response
    assert response.server_id == listener.server_id
    assert response.system_id == system_id
    assert response.udp_endpoints == (server_address,)
    assert response.local_endpoints == (LOCAL_TCP,)
    assert response.forwarded_endpoints == (FORWARDED_TCP,)
    assert response.relay_urls == (RELAY,)
    assert response.client_mapped == client_address or answer.via == "tcp"


async def test_a_client_asking_for_a_system_gets_one_of_its_online_servers(
    mediator: Mediator,
) -> None:
    system_id = list(mediator.systems)[1]
    listeners = [listener_for(mediator, system_id) for _ in range(2)]
    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as group:
            for listener in listeners:
                await group.start(listener.run)
                await listener.wait_registered()

            async def serve(listener: MediatorListener) -> None:
                async with await anyio.create_udp_socket(local_host="127.0.0.1") as udp:
                    while True:
                        await serve_one_request(listener, udp)

            for listener in listeners:
                group.start_soon(serve, listener)
            chosen = [
                (await request_connection(mediator.address, system_id=system_id)).response
                for _ in range(4)
            ]
            group.cancel_scope.cancel()
    assert {response.system_id for response in chosen} == {system_id}
    # Round robin over the system's online servers: both are used, in turn.
    ids = [response.server_id for response in chosen]
    assert set(ids) == {listener.server_id for listener in listeners}
    assert ids[0] != ids[1]
    assert ids[:2] == ids[2:]
    assert all(response.udp_endpoints for response in chosen)


async def test_a_server_with_the_wrong_key_is_refused_and_cannot_be_reached(
    mediator: Mediator,
) -> None:
    system_id = next(iter(mediator.systems))
    impostor = listener_for(mediator, system_id, key="not-the-system-key")
    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as group:
            await group.start(impostor.run)
            with pytest.raises(RegistrationError) as refused:
                await impostor.wait_registered()
            with pytest.raises(ConnectError) as offline:
                await request_connection(mediator.address, server_id=impostor.server_id)
            group.cancel_scope.cancel()
    assert refused.value.code == 401
    assert offline.value.code == 404


async def test_an_unknown_system_is_not_found(mediator: Mediator) -> None:
    with anyio.fail_after(WAIT), pytest.raises(ConnectError) as failed:
        await request_connection(mediator.address, system_id=uuid.uuid4())
    assert failed.value.code == 404


def test_the_mediator_refuses_to_start_without_a_readable_systems_file(tmp_path: Path) -> None:
    missing = run_wavesync("mediator", "--listen", "127.0.0.1:0", "--systems", str(tmp_path / "x"))
    assert missing.returncode == 1
    assert missing.stderr.startswith("wavesync mediator: ")
    assert "No such file" in missing.stderr
    broken = tmp_path / "systems.toml"
    broken.write_text('[[system]]\nid = "not-a-uuid"\nkey = "k"\n', encoding="utf-8")
    result = run_wavesync("mediator", "--listen", "127.0.0.1:0", "--systems", str(broken))
    assert result.returncode == 1
    assert "not-a-uuid" in result.stderr


def test_the_mediator_answers_binding_over_tcp_drops_garbage_and_reports_on_sigterm(
    tmp_path: Path,
) -> None:
    systems = tmp_path / "systems.toml"
    systems.write_text(run_wavesync("keygen").stdout, encoding="utf-8")
    with wavesync_daemon(
        "mediator", "--listen", "127.0.0.1:0", "--systems", str(systems), "--log-level", "info",
        ready=READY,
    ) as (process, ready):  # fmt: skip
        address = ("127.0.0.1", int(ready["port"]))
        with socket.create_connection(address, timeout=WAIT) as tcp:
            request = Message(
                message_class=MessageClass.REQUEST, method=BINDING, transaction_id=bytes(12)
            )
            tcp.sendall(encode_message(request))
            answer = decode_message(tcp.recv(2048))
            assert answer.get(XorMappedAddress) == XorMappedAddress(tcp.getsockname())
        with socket.create_connection(address, timeout=WAIT) as tcp:
            tcp.sendall(b"GET / HTTP/1.1\r\n\r\n")
            assert tcp.recv(2048) == b""  # closed on the first bytes that are not STUN
        process.terminate()
        _, log = process.communicate(timeout=WAIT)
    assert process.returncode == 0
    assert "stopping on SIGTERM" in log
    assert "bindings_answered=1" in log
    assert "malformed=1" in log
