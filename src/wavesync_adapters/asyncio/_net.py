"""Small asyncio helpers the adapter's programs share: name resolution and STUN transactions.

The twins of ``wavesync_adapters.anyio._net``'s ``resolve`` and ``run_transaction``,
on the running loop's clock (``loop.time()``). This module imports nothing of anyio.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from typing import Any, Protocol

from wavesync_proto.addresses import Endpoint
from wavesync_proto.stun.errors import StunDecodeError
from wavesync_proto.stun.message import decode_message
from wavesync_proto.stun.transaction import (
    ClientTransaction,
    ResponseReceived,
    TransactionTimedOut,
)

log = logging.getLogger("wavesync.net")

__all__ = [
    "DatagramPort",
    "UdpPort",
    "cancel_and_wait",
    "open_udp_port",
    "resolve",
    "run_transaction",
    "sleep_until_or",
]


class DatagramPort(Protocol):
    """What a STUN exchange needs of a UDP socket: a ``UdpPort``, or a ``UdtEndpoint``'s
    ``datagram_port()`` (the punching socket, shared with UDT)."""

    async def send(self, item: tuple[bytes, tuple[str, int]], /) -> None: ...

    async def receive(self) -> tuple[bytes, tuple[Any, ...]]: ...


async def run_transaction(
    transaction: ClientTransaction, port: DatagramPort, destination: Endpoint
) -> ResponseReceived | TransactionTimedOut:
    """Send a STUN request from ``port`` to ``destination`` on the transaction's RFC 8489
    schedule until it is answered or gives up. Datagrams from anyone else, and what
    is not STUN, are dropped: call it while the port carries nothing else of yours."""
    loop = asyncio.get_running_loop()
    while True:
        for data in transaction.messages_to_send(loop.time()):
            await port.send((data, destination))
        timer = transaction.get_timer()
        delay = None if timer is None else max(0.0, timer - loop.time())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                data, source = await port.receive()
                if (str(source[0]), int(source[1])) == destination:
                    with contextlib.suppress(StunDecodeError):  # not STUN: not our answer
                        transaction.receive_response(decode_message(data), loop.time())
        transaction.handle_timer(loop.time())
        event = transaction.next_event()
        if isinstance(event, ResponseReceived | TransactionTimedOut):
            return event


async def resolve(endpoint: Endpoint) -> Endpoint:
    """``endpoint`` with its host turned into an address (the first the resolver gives).

    Done once per program: a datagram's source is compared with this address, and a
    hostname in every ``sendto`` would mean a lookup per packet. An address is
    returned as it is, without the resolver's thread hop.
    """
    host, port = endpoint
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return (host, port)
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    if not infos:
        raise OSError(f"{host!r} resolves to no address")
    address = infos[0][4]
    return (str(address[0]), int(address[1]))


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, port: UdpPort) -> None:
        self._port = port

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._port._arrived(data, (str(addr[0]), int(addr[1])))

    def error_received(self, exc: Exception) -> None:
        # An ICMP error (port unreachable): the transaction's timers find out anyway.
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        self._port._lost()


#: Datagrams a ``UdpPort`` keeps unread; when full the oldest goes (bounded memory).
_PORT_QUEUE = 64


class UdpPort:
    """A plain UDP socket as a ``DatagramPort`` (``open_udp_port``); ``close()`` it."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[tuple[bytes, Endpoint]] = asyncio.Queue(_PORT_QUEUE)
        self._transport: asyncio.DatagramTransport | None = None
        self._closed = False
        self.local_address: Endpoint = ("", 0)

    async def send(self, item: tuple[bytes, tuple[str, int]], /) -> None:
        data, peer = item
        if self._transport is None or self._closed:
            raise ConnectionAbortedError("the UDP port is closed")
        self._transport.sendto(data, (peer[0], peer[1]))

    async def receive(self) -> tuple[bytes, Endpoint]:
        if self._closed and self._queue.empty():
            raise ConnectionAbortedError("the UDP port is closed")
        item = await self._queue.get()
        if not item[0] and item[1] == ("", 0):
            raise ConnectionAbortedError("the UDP port is closed")
        return item

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        self._lost()

    def _arrived(self, data: bytes, source: Endpoint) -> None:
        if self._queue.full():
            self._queue.get_nowait()
        self._queue.put_nowait((data, source))

    def _lost(self) -> None:
        if not self._closed:
            self._closed = True
            if self._queue.full():
                self._queue.get_nowait()
            self._queue.put_nowait((b"", ("", 0)))  # wakes a receiver: closed


async def open_udp_port(remote: Endpoint) -> UdpPort:
    """An unconnected UDP socket on every local address of ``remote``'s family, any port."""
    family = socket.AF_INET6 if ":" in remote[0] else socket.AF_INET
    # Every interface: a client socket, reachable only by whom it talks to first.
    host = "::" if family == socket.AF_INET6 else "0.0.0.0"  # noqa: S104
    port = UdpPort()
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: _UdpProtocol(port), local_addr=(host, 0), family=family
    )
    port._transport = transport
    local = transport.get_extra_info("sockname")
    port.local_address = (str(local[0]), int(local[1]))
    return port


async def sleep_until_or(wake: asyncio.Event, deadline: float | None) -> None:
    """Return at ``deadline`` (on the loop's clock; None: never) or when ``wake`` is set."""
    try:
        async with asyncio.timeout_at(deadline):
            await wake.wait()
    except TimeoutError:
        pass


async def cancel_and_wait(*tasks: asyncio.Task[Any]) -> None:
    """Cancel ``tasks`` and wait until they have ended; a failure is logged, not raised
    (the caller has its own outcome)."""
    for task in tasks:
        task.cancel()
    await asyncio.wait(tasks)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            log.debug("%s ended: %r", task.get_coro(), task.exception())
