"""Small anyio helpers the adapter's programs share: name resolution, UDP sockets, timers."""

from __future__ import annotations

import contextlib
import ipaddress
import math
import socket
from collections.abc import Callable
from typing import Any, Protocol

import anyio
import anyio.abc
import anyio.lowlevel

from wavesync_proto.addresses import Endpoint
from wavesync_proto.stun.errors import StunDecodeError
from wavesync_proto.stun.message import decode_message
from wavesync_proto.stun.transaction import (
    ClientTransaction,
    ResponseReceived,
    TransactionTimedOut,
)

__all__ = [
    "DatagramPort",
    "ServiceTimer",
    "open_udp_for",
    "resolve",
    "run_transaction",
    "sleep_until_or",
]


class DatagramPort(Protocol):
    """What a STUN exchange needs of a UDP socket: an ``anyio.abc.UDPSocket``, or a
    ``UdtEndpoint``'s ``datagram_port()`` (the punching socket, shared with UDT)."""

    async def send(self, item: tuple[bytes, tuple[str, int]], /) -> None: ...

    async def receive(self) -> tuple[bytes, tuple[Any, ...]]: ...


async def run_transaction(
    transaction: ClientTransaction, port: DatagramPort, peer: Endpoint
) -> ResponseReceived | TransactionTimedOut:
    """Send a STUN request from ``port`` to ``peer`` on the transaction's RFC 8489
    schedule until it is answered or gives up. Datagrams from anyone else, and what
    is not STUN, are dropped: call it while the port carries nothing else of yours."""
    while True:
        for data in transaction.messages_to_send(anyio.current_time()):
            await port.send((data, peer))
        timer = transaction.get_timer()
        delay = None if timer is None else max(0.0, timer - anyio.current_time())
        with anyio.move_on_after(delay):
            data, source = await port.receive()
            if (str(source[0]), int(source[1])) == peer:
                with contextlib.suppress(StunDecodeError):  # not STUN: not our answer
                    transaction.receive_response(decode_message(data), anyio.current_time())
        transaction.handle_timer(anyio.current_time())
        event = transaction.next_event()
        if isinstance(event, ResponseReceived | TransactionTimedOut):
            return event


async def resolve(endpoint: Endpoint) -> Endpoint:
    """``endpoint`` with its host turned into an address (the first the resolver gives).

    Done once per program: a datagram's source is compared with this address, and a
    hostname in every ``sendto`` would mean a blocking lookup per packet.
    """
    host, port = endpoint
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        # Already an address: no resolver thread hop (0.05 ms on every connect request
        # and every connection_ack, docs/benchmarks.md "Connect latency").
        await anyio.lowlevel.checkpoint()
        return (host, port)
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    if not infos:
        raise OSError(f"{host!r} resolves to no address")
    address = infos[0][4]
    return (str(address[0]), int(address[1]))


async def open_udp_for(remote: Endpoint) -> anyio.abc.UDPSocket:
    """An unconnected UDP socket on every local address of ``remote``'s family, any port."""
    if ":" in remote[0]:
        return await anyio.create_udp_socket(family=socket.AF_INET6, local_host="::")
    # Every interface: a client socket, reachable only by whom it talks to first.
    return await anyio.create_udp_socket(family=socket.AF_INET, local_host="0.0.0.0")  # noqa: S104


async def sleep_until_or(wake: anyio.Event, deadline: float | None) -> None:
    """Return at ``deadline`` (on anyio's clock; None: never) or when ``wake`` is set."""
    delay = None if deadline is None else max(0.0, deadline - anyio.current_time())
    with anyio.move_on_after(delay):
        await wake.wait()


class ServiceTimer:
    """Runs a sans-I/O service's ``handle_timer`` when its ``get_timer`` says, on anyio's clock.

    The daemon calls ``changed()`` after every input it feeds the service: the timer
    task is woken only when the service now wants it sooner than it planned to sleep,
    so a busy daemon does not pay a task switch per input.
    """

    def __init__(
        self,
        get_timer: Callable[[], float | None],
        handle_timer: Callable[[float], None],
        clock: Callable[[], float],
    ) -> None:
        self._get_timer = get_timer
        self._handle_timer = handle_timer
        self._clock = clock
        self._wake: anyio.Event | None = None
        self._sleeping_until = math.inf

    def changed(self) -> None:
        """The service's deadline may have moved earlier: wake the timer task if so."""
        deadline = self._get_timer()
        if deadline is not None and deadline < self._sleeping_until and self._wake is not None:
            self._wake.set()

    async def run(self) -> None:
        """Sleep until each deadline (or an earlier one), handle it; until cancelled."""
        while True:
            deadline = self._get_timer()
            self._sleeping_until = math.inf if deadline is None else deadline
            delay = math.inf if deadline is None else max(0.0, deadline - self._clock())
            self._wake = anyio.Event()
            with anyio.move_on_after(delay):
                await self._wake.wait()
            self._sleeping_until = -math.inf  # awake: nobody needs to wake us
            self._handle_timer(self._clock())
