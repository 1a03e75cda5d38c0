"""Tunnels through a real squid (Debian's 5.7) started on loopback with a private config.

Two configs (tests/squid.py): Debian's default access rules, where CONNECT goes
to port 443 only and squid strips ``Upgrade``, and a permissive one. Each
method runs through each config, the probe's choice is checked per config with
a few MB both ways through the chosen tunnel, and a second probe for the same
location goes straight to the remembered method. The ``ssl+`` kinds reach a TLS
tunnel server on 127.0.0.2:443 (CONNECT's one allowed port; binding it needs
root, as on CI: without it those cases skip, saying so).
"""

from __future__ import annotations

import errno
import os
import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc
import pytest
import trustme

from tests.adapters.tunnels import echo_server, round_trip
from tests.squid import DEFAULT, PERMISSIVE, Squid, squid_binary, squid_proxy
from wavesync_adapters.anyio.tunnel import ALL_KINDS, TunnelError, open_tunnel, probe_tunnel
from wavesync_adapters.anyio.tunnel_server import TunnelServer
from wavesync_proto.tunnel import (
    ProxyConfig,
    TunnelKind,
    TunnelLocation,
    TunnelMemory,
    TunnelMethod,
)

WAIT = 30.0
TLS_HOST = "127.0.0.2"
PLAIN_KINDS = [kind for kind in ALL_KINDS if not kind.tls]
CONNECT, UPGRADE, WEBSOCKET, GETPOST = PLAIN_KINDS

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(squid_binary() is None, reason="squid is not installed"),
]

#: What Debian's default rules refuse, and how (everything else passes both configs).
REFUSED_BY_DEFAULT = {
    CONNECT: (403, "CONNECT refused: 403 Forbidden"),  # CONNECT !SSL_ports
    UPGRADE: (426, "upgrade refused: 426 Upgrade Required"),  # squid strips Upgrade
    WEBSOCKET: (426, "websocket refused: 426"),
}


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    backend: str = request.param
    return backend


@pytest.fixture(scope="module")
def squids(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Squid]]:
    with (
        squid_proxy(tmp_path_factory.mktemp("squid-default"), DEFAULT) as default,
        squid_proxy(tmp_path_factory.mktemp("squid-permissive"), PERMISSIVE) as permissive,
    ):
        yield {"default": default, "permissive": permissive}


@pytest.fixture(scope="module")
def tls_contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(TLS_HOST).configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


@asynccontextmanager
async def tunnel_server(
    kind: TunnelKind, server_context: ssl.SSLContext
) -> AsyncIterator[TunnelServer]:
    if not kind.tls:
        async with echo_server() as server:
            yield server
        return
    try:
        async with echo_server(host=TLS_HOST, port=443, ssl_context=server_context) as server:
            yield server
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EADDRINUSE, errno.EADDRNOTAVAIL):
            raise
        pytest.skip(f"ssl kinds need {TLS_HOST}:443, CONNECT's one port: {exc}")


def proxy_of(squid: Squid) -> ProxyConfig:
    return ProxyConfig(host=squid.host, port=squid.port)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("config", ["default", "permissive"])
@pytest.mark.parametrize("kind", ALL_KINDS, ids=str)
async def test_each_method_through_each_squid_config(
    squids: dict[str, Squid],
    tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext],
    config: str,
    kind: TunnelKind,
) -> None:
    server_context, client_context = tls_contexts
    refused = REFUSED_BY_DEFAULT.get(kind) if config == "default" else None
    async with tunnel_server(kind, server_context) as server:
        assert server.bound is not None
        target = f"{server.bound[0]}:{server.bound[1]}"
        with anyio.fail_after(WAIT):
            if refused is not None:
                with pytest.raises(TunnelError) as caught:
                    await open_tunnel(
                        target, kind, proxy=proxy_of(squids[config]), ssl_context=client_context
                    )
                assert (caught.value.status, caught.value.kind) == (refused[0], kind)
                assert caught.value.reason.startswith(refused[1])
                return
            stream = await open_tunnel(
                target, kind, proxy=proxy_of(squids[config]), ssl_context=client_context
            )
            async with stream:
                # A raw stream to a tunnel server must not start like an HTTP request
                # (A-Z): it would be read as one. wavesync's (STUN, TLS, the echo) never do.
                payload = b"\x00" + os.urandom(300_000)
                # Squid's CONNECT does not pass a half-close: read back by length.
                assert await round_trip(stream, payload, half_close=False) == payload
    assert server.served == {str(kind): 1}


@pytest.mark.parametrize("config", ["default", "permissive"])
async def test_the_probe_chooses_per_config_carries_megabytes_and_remembers(
    squids: dict[str, Squid], config: str, caplog: pytest.LogCaptureFixture
) -> None:
    memory = TunnelMemory()
    proxy = proxy_of(squids[config])
    caplog.set_level("DEBUG", logger="wavesync.tunnel")
    async with echo_server() as server:
        assert server.bound is not None
        target = f"127.0.0.1:{server.bound[1]}"
        with anyio.fail_after(WAIT):
            stream, kind = await probe_tunnel(target, PLAIN_KINDS, proxy=proxy, memory=memory)
            async with stream:
                payload = os.urandom(4 << 20)
                assert await round_trip(stream, payload, half_close=False) == payload
        first_round = [r.getMessage() for r in caplog.records if "trying" in r.getMessage()]
        caplog.clear()
        with anyio.fail_after(WAIT):
            again, second = await probe_tunnel(target, PLAIN_KINDS, proxy=proxy, memory=memory)
            async with again:
                assert await round_trip(again, b"second", half_close=False) == b"second"
    second_round = [r.getMessage() for r in caplog.records if "trying" in r.getMessage()]
    location = TunnelLocation(proxy=f"{proxy.host}:{proxy.port}", target=target)
    assert first_round == [f"probe: trying {k}" for k in PLAIN_KINDS]  # all at once
    assert second == kind
    assert memory.winner(location) == kind
    assert second_round == [f"probe: trying {kind}"]  # straight to the remembered one
    if config == "default":
        assert kind == GETPOST
        demoted = memory.demoted(location, anyio.current_time())
        assert {k: reason.split(":")[0] for k, reason in demoted.items()} == {
            CONNECT: "CONNECT refused",
            UPGRADE: "upgrade refused",
            WEBSOCKET: "websocket refused",
        }
    else:
        # The one-connection methods finish a round trip before getpost has its POST leg.
        assert kind.method is not TunnelMethod.GETPOST


async def test_getpost_through_default_squid_ends_cleanly_both_ways(
    squids: dict[str, Squid],
) -> None:
    async with echo_server() as server:
        assert server.bound is not None
        with anyio.fail_after(WAIT):
            stream = await open_tunnel(
                f"127.0.0.1:{server.bound[1]}", GETPOST, proxy=proxy_of(squids["default"])
            )
            async with stream:
                payload = os.urandom(3 << 20)
                # getpost's ends are in band: the half-close survives squid.
                assert await round_trip(stream, payload, block=100_000) == payload


async def test_getpost_upload_to_a_slow_reader_through_squid_is_not_cut(
    squids: dict[str, Squid],
) -> None:
    """An origin that reads slower than the client sends lets squid's request buffer fill.
    Squid 5.7 (bug 5405) then reads the client with no room, takes that for its EOF and
    aborts the POST: with one 10**9-byte POST this broke within ~5 MB here, every time.
    POSTs of the default ``post_length`` (496 KiB) cannot fill the 512 KiB buffer."""
    payload = os.urandom(8 << 20)
    received = bytearray()

    async def slow_reader(stream: anyio.abc.ByteStream) -> None:
        while len(received) < len(payload):
            await anyio.sleep(0.01)  # ~6 MB/s: the client and squid get ahead
            received.extend(await stream.receive(65536))
        await stream.send(b"k")

    async with anyio.create_task_group() as group:
        server = TunnelServer(slow_reader)
        bound = await group.start(server.serve, "127.0.0.1", 0)
        with anyio.fail_after(WAIT):
            stream = await open_tunnel(
                f"127.0.0.1:{bound[1]}", GETPOST, proxy=proxy_of(squids["default"])
            )
            async with stream:
                for start in range(0, len(payload), 65536):
                    await stream.send(payload[start : start + 65536])
                assert await stream.receive() == b"k"
        group.cancel_scope.cancel()
    assert received == payload


def test_the_squid_fixture_writes_nothing_but_its_config_and_log(
    squids: dict[str, Squid],
) -> None:
    folder = Path(squids["default"].log).parent
    assert sorted(path.name for path in folder.iterdir()) == ["squid.conf", "squid.log"]
    assert squids["default"].version.startswith("Version ")
