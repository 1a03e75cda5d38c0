"""The asyncio mediator and relay daemons, driven by the real anyio clients and agents.

Each daemon runs on its own plain-asyncio event loop in a thread of this process
(as an application embedding it would run it); the other side is the anyio
adapter's ``MediatorListener``, ``request_connection``, ``RelayAgent`` and
``open_relay_stream`` on asyncio and on trio, or plain sockets for bad input.
Nothing sleeps to wait: every wait is bounded by ``fail_after`` and ends on an
event (an answer, a byte count, a close).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc
import pytest

from tests.adapters.test_relay_e2e import Relay, relay_answer, round_trip, running_agent
from wavesync_adapters.anyio.connect import ConnectError, request_connection
from wavesync_adapters.anyio.listen import MediatorListener, RegistrationError
from wavesync_adapters.anyio.relay_agent import RelayAgent, RelayTunnelInfo
from wavesync_adapters.anyio.relay_client import RelayConnectError, open_relay_stream
from wavesync_adapters.asyncio.mediator import MediatorDaemon
from wavesync_adapters.asyncio.relay import RelayDaemon
from wavesync_proto.addresses import Endpoint
from wavesync_proto.mediator.connect import ConnectRequest, ConnectSucceeded
from wavesync_proto.mediator.listen import ConnectionRequestReceived
from wavesync_proto.mediator.service import MediatorService
from wavesync_proto.relay import RelayLimits, RelayService
from wavesync_proto.stun.attributes import XorMappedAddress
from wavesync_proto.stun.message import (
    BINDING,
    Message,
    MessageClass,
    decode_message,
    encode_message,
)

pytestmark = pytest.mark.anyio
WAIT = 15.0  # seconds any one step may take before the test fails
RELAY_URL = "https://relay.test.invalid:8443/"
LOCAL_TCP: Endpoint = ("192.0.2.10", 4433)
BIG = 10 * 1024 * 1024


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    backend: str = request.param
    return backend


class DaemonThread:
    """A daemon's ``serve`` on a fresh asyncio loop in a thread, until ``stop()``."""

    def __init__(
        self,
        serve: Callable[..., Coroutine[Any, Any, None]],
        new_loop: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop,
    ) -> None:
        self._serve = serve
        self._loop = new_loop()
        self._task: asyncio.Task[None] | None = None
        self._bound: Endpoint | None = None
        self._ready = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="asyncio-daemon")

    def _run(self) -> None:
        def started(bound: Endpoint) -> None:
            self._bound = bound
            self._ready.set()

        self._task = self._loop.create_task(self._serve("127.0.0.1", 0, started=started))
        try:
            self._loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            pass
        except BaseException as exc:  # reported by the test that stops it
            self.error = exc
        finally:
            self._ready.set()
            self._loop.close()

    def start(self) -> Endpoint:
        self._thread.start()
        assert self._ready.wait(WAIT)
        if self._bound is None:
            raise AssertionError(f"the daemon did not start: {self.error!r}")
        return self._bound

    def call(self, function: Callable[[], Any]) -> Any:
        """Run ``function`` on the daemon's loop and return its result (state is read
        from the loop's own thread, never while it changes)."""

        async def on_loop() -> Any:
            return function()

        return asyncio.run_coroutine_threadsafe(on_loop(), self._loop).result(WAIT)

    def stop(self) -> None:
        if self._thread.is_alive():
            assert self._task is not None
            self._loop.call_soon_threadsafe(self._task.cancel)
            self._thread.join(WAIT)
        assert not self._thread.is_alive()


@contextlib.contextmanager
def in_thread(
    serve: Callable[..., Coroutine[Any, Any, None]],
    new_loop: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop,
) -> Iterator[DaemonThread]:
    daemon = DaemonThread(serve, new_loop)
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()
    assert daemon.error is None, daemon.error


# --- the mediator ------------------------------------------------------------------------


@dataclass(frozen=True)
class Mediator:
    address: Endpoint
    systems: dict[uuid.UUID, str]
    daemon: MediatorDaemon
    thread: DaemonThread


@pytest.fixture(scope="module")
def mediator() -> Iterator[Mediator]:
    systems = {uuid.uuid4(): os.urandom(16).hex() for _ in range(2)}
    service = MediatorService(systems=systems, relay_urls=(RELAY_URL,), nonce_secret=os.urandom(32))
    daemon = MediatorDaemon(service)
    with in_thread(daemon.serve) as thread:
        assert daemon.bound is not None
        yield Mediator(daemon.bound, systems, daemon, thread)


def listener_for(
    mediator: Mediator, system_id: uuid.UUID, key: str | None = None
) -> MediatorListener:
    return MediatorListener(
        mediator.address,
        system_id=system_id,
        server_id=uuid.uuid4(),
        system_key=mediator.systems[system_id] if key is None else key,
        local_endpoints=[LOCAL_TCP],
    )


def local(udp: anyio.abc.UDPSocket) -> Endpoint:
    address = udp.extra(anyio.abc.SocketAttribute.local_address)
    return (str(address[0]), int(address[1]))


class SilentPort:
    """A client's UDP port on a network that drops UDP: only the TCP copy gets through."""

    async def send(self, item: tuple[bytes, tuple[str, int]], /) -> None:
        pass

    async def receive(self) -> tuple[bytes, tuple[Any, ...]]:
        await anyio.sleep_forever()
        raise AssertionError  # pragma: no cover


async def connect_over_udp_only(
    mediator: Endpoint, server_id: uuid.UUID, udp: anyio.abc.UDPSocket
) -> ConnectSucceeded:
    """The client's connect request sent over UDP alone (no TCP copy), by the core."""
    request = ConnectRequest(server_id=server_id, now=anyio.current_time(), timeout=WAIT)
    while not request.done:
        for data in request.datagrams_to_send(anyio.current_time()):
            await udp.sendto(data, *mediator)
        timer = request.get_timer()
        with anyio.move_on_after(None if timer is None else timer - anyio.current_time()):
            data, _ = await udp.receive()
            request.datagram_received(data, anyio.current_time())
        request.handle_timer(anyio.current_time())
    event = request.next_event()
    assert isinstance(event, ConnectSucceeded), event
    return event


@pytest.mark.parametrize("transport", ["both", "udp", "tcp"])
async def test_a_registered_server_is_brokered_to_a_client_over_each_transport(
    mediator: Mediator, transport: str
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
                request = await listener.next_request()
                assert isinstance(request, ConnectionRequestReceived)
                acked = await listener.acknowledge(request.connect_session_id, server_udp)
                served.append((request, acked))
                acknowledged.set()

            acknowledged = anyio.Event()
            group.start_soon(server_side)
            if transport == "udp":
                answer = await connect_over_udp_only(
                    mediator.address, listener.server_id, client_udp
                )
            else:
                answer = await request_connection(
                    mediator.address,
                    server_id=listener.server_id,
                    udp=client_udp if transport == "both" else SilentPort(),
                )
            # The answer may overtake the mediator's reply to the server's ack.
            await acknowledged.wait()
            group.cancel_scope.cancel()
    [(request, acked)] = served
    assert acked == server_address
    response = answer.response
    assert (response.server_id, response.system_id) == (listener.server_id, system_id)
    assert response.udp_endpoints == (server_address,)
    assert response.local_endpoints == (LOCAL_TCP,)
    assert response.relay_urls == (RELAY_URL,)
    if transport == "tcp":
        assert answer.via == "tcp"
    if transport == "udp":
        assert answer.via == "udp"
        assert request.client_udp_endpoint == client_address


async def test_a_wrong_key_is_refused_and_an_unknown_system_is_not_found(
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
            with pytest.raises(ConnectError) as unknown:
                await request_connection(mediator.address, system_id=uuid.uuid4())
            group.cancel_scope.cancel()
    assert refused.value.code == 401
    assert offline.value.code == 404
    assert unknown.value.code == 404


def binding_request(transaction_id: bytes) -> bytes:
    request = Message(
        message_class=MessageClass.REQUEST, method=BINDING, transaction_id=transaction_id
    )
    return encode_message(request)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_binding_is_answered_on_both_transports_and_garbage_is_dropped(
    mediator: Mediator,
) -> None:
    def exchange() -> None:
        counters = mediator.daemon.service.counters
        answered, malformed = counters.bindings_answered, counters.malformed
        with socket.create_connection(mediator.address, timeout=WAIT) as tcp:
            tcp.sendall(binding_request(b"tcp-binding!"))
            answer = decode_message(tcp.recv(2048))
            assert answer.transaction_id == b"tcp-binding!"
            assert answer.get(XorMappedAddress) == XorMappedAddress(tcp.getsockname())
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.settimeout(WAIT)
            udp.bind(("127.0.0.1", 0))
            udp.sendto(b"not stun at all, not even close", mediator.address)
            udp.sendto(binding_request(b"udp-binding!"), mediator.address)
            # The garbage got no answer: the first datagram back answers the Binding.
            answer = decode_message(udp.recv(2048))
            assert answer.transaction_id == b"udp-binding!"
            assert answer.get(XorMappedAddress) == XorMappedAddress(udp.getsockname())
        with socket.create_connection(mediator.address, timeout=WAIT) as tcp:
            tcp.sendall(b"GET / HTTP/1.1\r\n\r\n")
            assert tcp.recv(2048) == b""  # closed on the first bytes that are not STUN
        seen = mediator.thread.call(lambda: (counters.bindings_answered, counters.malformed))
        assert seen == (answered + 2, malformed + 2)

    await anyio.to_thread.run_sync(exchange)


async def test_without_http_there_is_no_http_face() -> None:
    # The face itself (http=) is tested in test_asyncio_faces.py.
    daemon = MediatorDaemon(MediatorService(systems={}, nonce_secret=bytes(32)))
    assert daemon.http_bound is None


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_port_in_use_is_an_os_error_before_started() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        started: list[Endpoint] = []
        daemon = MediatorDaemon(MediatorService(systems={}, nonce_secret=bytes(32)))

        def run() -> None:
            asyncio.run(daemon.serve("127.0.0.1", port, started=started.append))

        with pytest.raises(OSError):  # noqa: PT011 - any bind error will do
            await anyio.to_thread.run_sync(run)
        assert started == []


# --- the relay ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AsyncioRelay(Relay):
    daemon: RelayDaemon
    thread: DaemonThread


@contextlib.contextmanager
def asyncio_relay(
    limits: RelayLimits | None = None,
    new_loop: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop,
) -> Iterator[AsyncioRelay]:
    system_id, key = uuid.uuid4(), os.urandom(16).hex()
    daemon = RelayDaemon(RelayService({system_id: key}, limits=limits))
    with in_thread(daemon.serve, new_loop) as thread:
        assert daemon.bound is not None
        yield AsyncioRelay(daemon.bound, system_id, key, daemon, thread)
    # Stopped: every pipe closed, every connection forgotten.
    assert daemon.pipes.open_pipes == 0


@pytest.fixture(scope="module")
def relay() -> Iterator[AsyncioRelay]:
    with asyncio_relay() as running:
        yield running


async def test_a_standby_pool_is_kept_and_ten_clients_each_get_their_own_echo(
    relay: AsyncioRelay,
) -> None:
    server_id = uuid.uuid4()
    async with running_agent(relay, server_id=server_id) as agent:
        with anyio.fail_after(WAIT):
            await agent.wait_for_idle(7)
        assert agent.pool.target == 7  # the relay's 101 asked for its default
        payloads = [os.urandom(64 * 1024 + n) for n in range(10)]
        echoed: dict[int, bytes] = {}

        async def client(number: int) -> None:
            tunnel = await open_relay_stream(relay.address, server_id=server_id)
            assert tunnel.server_id == server_id
            async with tunnel.stream:
                echoed[number] = await round_trip(tunnel.stream, payloads[number])

        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as group:
                for number in range(10):
                    group.start_soon(client, number)
            await agent.wait_for_idle(7)  # every taken connection was replaced
    assert [echoed[number] == payloads[number] for number in range(10)] == [True] * 10


async def test_ten_megabytes_each_way_arrive_byte_exact_and_half_closes_pass() -> None:
    upstream, downstream = os.urandom(BIG), os.urandom(BIG)
    seen_by_server: list[str] = []

    async def exchange(stream: anyio.abc.ByteStream, outgoing: bytes) -> str:
        """Send ``outgoing`` then a half-close, while reading to the peer's half-close."""
        digest = hashlib.sha256()

        async def read_all() -> None:
            while True:
                try:
                    digest.update(await stream.receive())
                except anyio.EndOfStream:
                    return

        async with anyio.create_task_group() as group:
            group.start_soon(read_all)
            for offset in range(0, len(outgoing), 1 << 20):
                await stream.send(outgoing[offset : offset + (1 << 20)])
            await stream.send_eof()
        return digest.hexdigest()

    async def server(stream: anyio.abc.ByteStream, info: RelayTunnelInfo) -> None:
        async with stream:
            seen_by_server.append(await exchange(stream, downstream))

    with asyncio_relay() as relay:
        server_id = uuid.uuid4()
        agent = RelayAgent(
            relay.address, system_id=relay.system_id, server_id=server_id, key=relay.key, target=1
        )
        with anyio.fail_after(WAIT * 2):
            async with anyio.create_task_group() as group:
                await group.start(agent.serve, server)
                await agent.wait_for_idle(1)
                tunnel = await open_relay_stream(relay.address, server_id=server_id)
                async with tunnel.stream:
                    seen_by_client = await exchange(tunnel.stream, upstream)
                while not seen_by_server:
                    await agent.wait_for_change()
                group.cancel_scope.cancel()
    assert seen_by_client == hashlib.sha256(downstream).hexdigest()
    assert seen_by_server == [hashlib.sha256(upstream).hexdigest()]
    # Stopped (the session ended, or was ended by the stop): every byte was counted.
    assert relay.daemon.bytes_client_to_server >= BIG
    assert relay.daemon.bytes_server_to_client >= BIG


async def test_an_unknown_server_is_a_clear_404(relay: AsyncioRelay) -> None:
    with anyio.fail_after(WAIT), pytest.raises(RelayConnectError) as caught:
        await open_relay_stream(relay.address, server_id=uuid.uuid4())
    assert caught.value.status == 404
    assert "no standby connection" in str(caught.value)


async def test_a_wrong_key_is_refused_and_the_agent_backs_off(relay: AsyncioRelay) -> None:
    bad = Relay(relay.address, relay.system_id, "not-the-system-key-0000")
    async with running_agent(bad) as agent:
        with anyio.fail_after(WAIT):
            while agent.pool.consecutive_failures == 0:
                await agent.wait_for_change()
    assert agent.pool.idle == 0


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n", b"404"),
        (b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n", b"404"),
        (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(40), b"400"),
        (b"GET / HTTP/1.1\r\nHost: relay\r\nX: " + b"x" * 9000 + b"\r\n\r\n", b"431"),
    ],
    ids=["connect-form", "not-ours", "tls", "too-large"],
)
async def test_bad_requests_are_answered_and_closed(
    relay: AsyncioRelay, request_bytes: bytes, status: bytes
) -> None:
    answer = await anyio.to_thread.run_sync(relay_answer, relay, request_bytes)
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_an_http_tunnel_request_goes_to_the_tunnel_face(relay: AsyncioRelay) -> None:
    # A POST of a getpost tunnel nobody opened: the face's registry answers 404 (the
    # tunnels themselves are tested in test_asyncio_faces.py).
    request = (
        b"POST /wavesync/tunnel/v1/getpost/" + b"ab" * 16 + b"/0 HTTP/1.1\r\n"
        b"Host: relay\r\nContent-Length: 5\r\n\r\n"
    )
    answer = await anyio.to_thread.run_sync(relay_answer, relay, request)
    assert answer.startswith(b"HTTP/1.1 404"), answer[:200]


async def test_limits_hold_the_pool_at_its_cap_and_a_silent_connection_times_out() -> None:
    limits = RelayLimits(max_standby_per_server=2, handshake_timeout=0.2)
    with asyncio_relay(limits) as relay:
        async with running_agent(relay) as agent:
            with anyio.fail_after(WAIT):
                await agent.wait_for_idle(2)
                while agent.pool.consecutive_failures == 0:  # the third is refused (503)
                    await agent.wait_for_change()
            assert agent.pool.idle == 2
        # A connection that never sends its request is closed by the service's timer.
        silent = await anyio.to_thread.run_sync(relay_answer, relay, b"")
        refused = relay.thread.call(lambda: relay.daemon.service.counters.handshake_timeouts)
    assert silent == b""
    assert refused >= 1


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_both_daemons_run_on_uvloop() -> None:
    uvloop = pytest.importorskip(
        "uvloop", reason="uvloop is not installed here; the daemons use public asyncio APIs only"
    )
    systems = {uuid.uuid4(): os.urandom(16).hex()}
    mediator_daemon = MediatorDaemon(MediatorService(systems=systems, nonce_secret=bytes(32)))
    payload = os.urandom(1 << 20)
    with (
        asyncio_relay(new_loop=uvloop.new_event_loop) as relay,
        in_thread(mediator_daemon.serve, uvloop.new_event_loop),
    ):
        assert mediator_daemon.bound is not None
        mediator = Mediator(mediator_daemon.bound, systems, mediator_daemon, relay.thread)
        listener = listener_for(mediator, next(iter(systems)))
        server_id = uuid.uuid4()
        with anyio.fail_after(WAIT):
            async with (
                anyio.create_task_group() as group,
                running_agent(relay, server_id=server_id) as agent,
                await anyio.create_udp_socket(local_host="127.0.0.1") as server_udp,
            ):
                await group.start(listener.run)
                await listener.wait_registered()

                async def server_side() -> None:
                    request = await listener.next_request()
                    assert isinstance(request, ConnectionRequestReceived)
                    await listener.acknowledge(request.connect_session_id, server_udp)

                group.start_soon(server_side)
                answer = await request_connection(mediator.address, server_id=listener.server_id)
                await agent.wait_for_idle(1)
                tunnel = await open_relay_stream(relay.address, server_id=server_id)
                async with tunnel.stream:
                    echoed = await round_trip(tunnel.stream, payload)
                group.cancel_scope.cancel()
    assert answer.response.server_id == listener.server_id
    assert echoed == payload


def test_importing_the_asyncio_daemons_loads_neither_anyio_nor_trio() -> None:
    code = (
        "import sys\n"
        "import wavesync_adapters.asyncio.mediator, wavesync_adapters.asyncio.relay\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('anyio', 'trio')))\n"
    )
    result = subprocess.run(  # noqa: S603 - this interpreter, our own code
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=WAIT, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
