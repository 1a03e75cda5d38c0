"""A client's connect request to the mediator on anyio, driven by ``ConnectRequest``.

Thin by design: the same request goes out over UDP (from the socket the client
will punch from) and over a TCP connection at once; which answer counts, when
to resend and when to give up are ``ConnectRequest``'s decisions.
"""

from __future__ import annotations

import logging
import ssl
import uuid

import anyio
import anyio.abc

from wavesync_proto.addresses import Endpoint, format_endpoint
from wavesync_proto.mediator.connect import ConnectFailed, ConnectRequest, ConnectSucceeded
from wavesync_proto.tunnel import ProxyConfig, TunnelMemory

from ..errors import ConnectError
from ._dial import TunnelChoice, dialer_for
from ._net import DatagramPort, open_udp_for, resolve, sleep_until_or

__all__ = ["ConnectError", "request_connection"]

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

    ``udp`` is the socket the client will punch from: the mediator tells the
    server the address it saw this request come from. Without one, a fresh
    socket is used and closed (the answer is then good for TCP paths and the
    relay only). Datagrams on ``udp`` from anyone but the mediator are dropped
    while the request runs. Raises ``ConnectError`` when the mediator says no
    or nothing answered within ``timeout`` seconds.

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
    target = await resolve(mediator)
    request = ConnectRequest(
        server_id=server_id, system_id=system_id, now=anyio.current_time(), timeout=timeout
    )
    sid = request.connect_session_id.hex()[:12]
    own_socket = None if udp is not None else await open_udp_for(target)
    socket = udp or own_socket
    assert socket is not None  # exactly one of the two is set
    wake = anyio.Event()

    def changed() -> None:
        nonlocal wake
        wake.set()

    async def receive_udp() -> None:
        while True:
            data, source = await socket.receive()
            if (str(source[0]), int(source[1])) == target:
                request.datagram_received(data, anyio.current_time())
                changed()

    async def tcp_copy() -> None:
        try:
            stream = await dialer.open(timeout)
            async with stream:
                await stream.send(request.tcp_data_to_send())
                while not request.done:
                    data = await stream.receive(_RECEIVE_BYTES)
                    request.tcp_data_received(data, anyio.current_time())
                    changed()
        except (OSError, TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError) as exc:
            log.debug("connect %s: TCP copy ended: %r", sid, exc)
            request.tcp_connection_lost(anyio.current_time())
            changed()

    try:
        async with anyio.create_task_group() as group:
            group.start_soon(receive_udp)
            group.start_soon(tcp_copy)
            while not request.done:
                for data in request.datagrams_to_send(anyio.current_time()):
                    await socket.send((data, target))
                await sleep_until_or(wake, request.get_timer())
                wake = anyio.Event()
                request.handle_timer(anyio.current_time())
            group.cancel_scope.cancel()
    finally:
        if own_socket is not None:
            await own_socket.aclose()
    return _outcome(request, mediator)


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
