"""The tunnel adapter on loopback without a proxy: every method, TLS, refusals, the probe.

An echoing ``TunnelServer`` runs in the test's own event loop; each test runs on
asyncio and trio, and every wait is bounded by ``fail_after``.
"""

from __future__ import annotations

import gc
import os
import socket
import ssl

import anyio
import anyio.abc
import anyio.lowlevel
import pytest
import trustme

from tests.adapters.tunnels import echo_server, round_trip
from wavesync_adapters.anyio.tunnel import (
    TunnelError,
    environment_proxy,
    open_tunnel,
    parse_target,
    probe_tunnel,
)
from wavesync_proto.tunnel import ProxyConfig, TunnelKind, TunnelMemory, TunnelMethod

WAIT = 20.0
FORBIDDEN = (
    b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n"
    b"Connection: close\r\n\r\nno\n"
)
pytestmark = pytest.mark.anyio

PLAIN = [TunnelKind(method=m) for m in (TunnelMethod.UPGRADE, TunnelMethod.WEBSOCKET)]
PLAIN.append(TunnelKind(method=TunnelMethod.GETPOST))


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    backend: str = request.param
    return backend


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


@pytest.fixture(scope="module")
def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.mark.parametrize("kind", PLAIN, ids=str)
async def test_each_method_carries_a_stream_both_ways_byte_exact(kind: TunnelKind) -> None:
    payload = os.urandom(2_000_000 + 17)
    async with echo_server() as server:
        assert server.bound is not None
        with anyio.fail_after(WAIT):
            stream = await open_tunnel(f"http://127.0.0.1:{server.bound[1]}", kind)
            async with stream:
                assert stream.kind == kind
                assert await round_trip(stream, payload, block=50_000) == payload
        assert server.served == {str(kind): 1}


@pytest.mark.parametrize("method", [TunnelMethod.UPGRADE, TunnelMethod.GETPOST], ids=str)
async def test_ssl_kinds_verify_the_certificate(
    method: TunnelMethod, server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    kind = TunnelKind(method=method, tls=True)
    async with echo_server(ssl_context=server_context) as server:
        assert server.bound is not None
        target = f"127.0.0.1:{server.bound[1]}"
        with anyio.fail_after(WAIT):
            stream = await open_tunnel(target, kind, ssl_context=client_context)
            async with stream:
                half_close = method is TunnelMethod.GETPOST
                echoed = await round_trip(stream, b"x" * 300_000, half_close=half_close)
                assert echoed == b"x" * 300_000
                if not half_close:
                    with pytest.raises(NotImplementedError, match="TLS has no half-close"):
                        await stream.send_eof()
            # Verification is on by default: the system's CAs do not know our test CA.
            with pytest.raises(TunnelError, match="CERTIFICATE_VERIFY_FAILED") as caught:
                await open_tunnel(target, kind)
        assert caught.value.kind == kind


@pytest.mark.parametrize("kind", PLAIN, ids=str)
async def test_a_refusal_names_the_method_and_the_status(kind: TunnelKind) -> None:
    # An HTTP server that refuses everything, as a proxy's 403 page does.
    async def refuse(client: anyio.abc.SocketStream) -> None:
        async with client:
            await client.receive()
            await client.send(FORBIDDEN)

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as group:
        group.start_soon(listener.serve, refuse)
        with anyio.fail_after(WAIT), pytest.raises(TunnelError) as caught:
            await open_tunnel(f"127.0.0.1:{port}", kind)
        group.cancel_scope.cancel()
    assert caught.value.kind == kind
    assert caught.value.status == 403
    assert str(caught.value).startswith(f"{kind} tunnel: ")
    assert "403" in caught.value.reason


async def test_nothing_listening_and_silence_are_clear_errors() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        kind = TunnelKind(method=TunnelMethod.UPGRADE)
        with pytest.raises(TunnelError, match=r"upgrade tunnel: not established within 0\.3 s"):
            await open_tunnel(f"127.0.0.1:{port}", kind, timeout=0.3)
    with pytest.raises(TunnelError, match=r"upgrade tunnel: .*Error") as caught:
        await open_tunnel(f"127.0.0.1:{port}", kind, timeout=5)
    assert caught.value.status is None


async def test_a_server_refuses_what_is_not_a_tunnel_with_its_status() -> None:
    async with echo_server() as server:
        assert server.bound is not None
        with anyio.fail_after(WAIT):
            client = await anyio.connect_tcp("127.0.0.1", server.bound[1])
            async with client:
                await client.send(b"GET /elsewhere HTTP/1.1\r\nHost: x\r\n\r\n")
                answer = await client.receive()
    assert answer.startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert server.served == {}


async def test_the_probe_picks_the_cheapest_validated_method_and_remembers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    memory = TunnelMemory()
    async with echo_server() as server:
        assert server.bound is not None
        target = f"127.0.0.1:{server.bound[1]}"
        with anyio.fail_after(WAIT):
            stream, kind = await probe_tunnel(target, PLAIN, proxy=None, memory=memory)
            async with stream:
                # The echo is the probe's: the stream starts clean after it.
                assert await round_trip(stream, b"after the echo") == b"after the echo"
            caplog.set_level("DEBUG", logger="wavesync.tunnel")
            again, second = await probe_tunnel(target, PLAIN, proxy=None, memory=memory)
            await again.aclose()
    assert second == kind
    assert [r.getMessage() for r in caplog.records if "trying" in r.getMessage()] == [
        f"probe: trying {kind}"
    ]


@pytest.mark.parametrize("after_checkpoints", range(0, 60, 3))
async def test_a_probe_cancelled_at_any_moment_leaves_no_connection_open(
    after_checkpoints: int,
) -> None:
    # A caller that gives up (its own deadline, its task group cancelled) must not
    # leave the attempts' sockets, not even the chosen one's, to the garbage
    # collector (a ResourceWarning is an error in this suite).
    async def probe_then_close(target: str) -> None:
        stream, _ = await probe_tunnel(target, PLAIN, proxy=None, memory=TunnelMemory())
        await stream.aclose()  # finished before the cancel came: closed as a caller would

    async with echo_server() as server:
        assert server.bound is not None
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as group:
                group.start_soon(probe_then_close, f"127.0.0.1:{server.bound[1]}")
                for _ in range(after_checkpoints):
                    await anyio.lowlevel.checkpoint()
                group.cancel_scope.cancel()
    gc.collect()


async def test_a_probe_where_nothing_works_says_why_for_each_method() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    with anyio.fail_after(WAIT), pytest.raises(TunnelError) as caught:
        await probe_tunnel(f"127.0.0.1:{port}", PLAIN, proxy=None, memory=TunnelMemory())
    message = str(caught.value)
    assert message.startswith("tunnel: no method works: upgrade: OSError: ")
    assert "websocket: " in message
    assert "getpost: " in message


def test_targets_and_the_environment_give_host_port_and_proxy() -> None:
    assert parse_target("http://relay.example") == ("relay.example", 80)
    assert parse_target("relay.example", tls=True) == ("relay.example", 443)
    assert parse_target("https://[::1]:8443/") == ("::1", 8443)
    with pytest.raises(ValueError, match="want"):
        parse_target("ftp://relay.example")
    environ = {"HTTPS_PROXY": "http://squid:3128", "no_proxy": ".internal"}
    assert environment_proxy("m.example:443", tls=True, environ=environ) == ProxyConfig(
        host="squid", port=3128
    )
    assert environment_proxy("m.example:80", tls=False, environ=environ) is None
    assert environment_proxy("db.internal:443", tls=True, environ=environ) is None
