"""A client's connect request to the mediator on asyncio, driven by ``ConnectRequest``.

The twin of ``wavesync_adapters.anyio.connect`` (uvloop too; no anyio import). Thin by
design: the same request goes out over UDP (from the socket the client will punch
from) and over a TCP connection at once; which answer counts, when to resend and when
to give up are ``ConnectRequest``'s decisions. The TCP copy may ride an HTTP tunnel
(``tunnel=``), opened by the ``Dialer`` as on anyio.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import uuid

from wavesync_proto.addresses import Endpoint, format_endpoint
from wavesync_proto.mediator.connect import ConnectFailed, ConnectRequest, ConnectSucceeded
from wavesync_proto.tunnel import ProxyConfig, TunnelMemory

from ..errors import ConnectError
from ._dial import Dialer, TunnelChoice, dialer_for
from ._net import DatagramPort, cancel_and_wait, open_udp_port, resolve, sleep_until_or

__all__ = ["ConnectError", "DatagramPort", "request_connection"]

log = logging.getLogger("wavesync.connect")

_RECEIVE_BYTES = 65536


async def request_connection(
    mediator: Endpoint,
    *,
    server_id: uuid.UUID | None = None,
    system_id: uuid.UUID | None = None,
    udp: DatagramPort | None = None,
    timeout: float = 10.0,
    tunnel: TunnelChoice | None = None,
    http: str | None = None,
    proxy: ProxyConfig | None = None,
    ssl_context: ssl.SSLContext | None = None,
    tunnel_memory: TunnelMemory | None = None,
) -> ConnectSucceeded:
    """Ask the mediator for a server (by id, or any online server of a system).

    ``udp`` is the socket the client will punch from: the mediator tells the server
    the address it saw this request come from. Without one, a fresh socket is used
    and closed (the answer is then good for TCP paths and the relay only). Datagrams
    on ``udp`` from anyone but the mediator are dropped while the request runs.
    Raises ``ConnectError`` when the mediator says no or nothing answered within
    ``timeout`` seconds, ``OSError`` when ``udp`` breaks.

    ``tunnel`` sends the TCP copy through an HTTP tunnel of that kind (or the
    one the probe picks: ``"auto"``) to the mediator's HTTP face ``http``
    (default: ``mediator``), through ``proxy`` when given; the UDP copy still
    goes to ``mediator``. ``tunnel_memory`` keeps the probe's winner between
    requests.
    """
    dialer = dialer_for(
        mediator,
        tunnel=tunnel,
        target=http,
        proxy=proxy,
        ssl_context=ssl_context,
        memory=tunnel_memory,
    )
    loop = asyncio.get_running_loop()
    target = await resolve(mediator)
    request = ConnectRequest(
        server_id=server_id, system_id=system_id, now=loop.time(), timeout=timeout
    )
    if udp is not None:
        return await _run(request, udp, target, dialer, timeout)
    own_port = await open_udp_port(target)
    try:
        return await _run(request, own_port, target, dialer, timeout)
    finally:
        own_port.close()


async def _run(
    request: ConnectRequest,
    port: DatagramPort,
    target: Endpoint,
    dialer: Dialer,
    timeout: float,
) -> ConnectSucceeded:
    """Send both copies, feed the request every answer and its timer until it is done."""
    loop = asyncio.get_running_loop()
    sid = request.connect_session_id.hex()[:12]
    wake = asyncio.Event()

    async def receive_udp() -> None:
        try:
            while True:
                data, source = await port.receive()
                if (str(source[0]), int(source[1])) == target:
                    request.datagram_received(data, loop.time())
                    wake.set()
        finally:
            wake.set()  # a broken port is news too

    async def tcp_copy() -> None:
        writer = None
        try:
            reader, writer = await dialer.open(timeout)
            writer.write(request.tcp_data_to_send())
            while not request.done:
                data = await reader.read(_RECEIVE_BYTES)
                if not data:
                    raise ConnectionResetError("the mediator closed the connection")
                request.tcp_data_received(data, loop.time())
                wake.set()
        except (OSError, TimeoutError) as exc:
            log.debug("connect %s: TCP copy ended: %r", sid, exc)
            request.tcp_connection_lost(loop.time())
            wake.set()
        finally:
            if writer is not None:
                writer.close()

    receiving = asyncio.create_task(receive_udp())
    copying = asyncio.create_task(tcp_copy())
    try:
        while not request.done:
            for data in request.datagrams_to_send(loop.time()):
                await port.send((data, target))
            await sleep_until_or(wake, request.get_timer())
            wake.clear()
            if receiving.done():
                raise OSError(f"the UDP socket broke: {receiving.exception()!r}")
            request.handle_timer(loop.time())
    finally:
        await cancel_and_wait(receiving, copying)
    return _outcome(request, dialer.endpoint)


def _outcome(request: ConnectRequest, mediator: Endpoint) -> ConnectSucceeded:
    """The finished request's answer, logged; ``ConnectError`` if it failed."""
    sid = request.connect_session_id.hex()[:12]
    event = request.next_event()
    if isinstance(event, ConnectSucceeded):
        log.info(
            "connect %s: server %s answered via %s in %.0f ms",
            sid,
            event.response.server_id,
            event.via,
            event.elapsed * 1000,
        )
        return event
    assert isinstance(event, ConnectFailed)  # a done request has reported exactly one
    log.info("connect %s via %s failed: %s", sid, format_endpoint(mediator), event.reason)
    raise ConnectError(event)
