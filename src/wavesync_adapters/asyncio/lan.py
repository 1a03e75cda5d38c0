"""LAN discovery on asyncio: the client's multicast search, the agent's answers.

The twin of ``wavesync_adapters.anyio.lan``: what to send, when, and which answers
count are ``DiscoverySearch``'s and ``DiscoveryResponder``'s (wavesync_proto.discovery);
the sockets are ``wavesync_adapters._lan_socket``'s, shared by every adapter. This
module only waits for them with ``loop.add_reader`` (uvloop has it too) and gives the
core the loop's clock. IPv4 multicast only. It imports nothing of anyio.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import Callable, Sequence

from wavesync_proto.addresses import Endpoint, format_endpoint
from wavesync_proto.discovery import (
    DEFAULT_GROUP,
    DiscoveryResponder,
    DiscoverySearch,
    SearchFinished,
    ServerFound,
)

from .._lan_socket import (
    check_group,
    check_interfaces,
    open_responder_socket,
    open_search_socket,
    receive_waiting,
    respond,
    send_datagrams,
)

__all__ = ["LanResponder", "search_lan"]

log = logging.getLogger("wavesync.lan")


async def search_lan(
    found: Callable[[ServerFound], object],
    *,
    server_id: uuid.UUID | None = None,
    system_id: uuid.UUID | None = None,
    timeout: float = 1.0,
    group: Endpoint = DEFAULT_GROUP,
    interface: str | None = None,
) -> int:
    """Search the LAN for a server or a system; call ``found`` for each server as it answers.

    Returns how many servers were found once the search is over: at its ``timeout``, or
    as soon as the server asked for by ``server_id`` answers. ``interface`` is the IPv4
    address to send the multicast from (None: the kernel's choice). The search's own UDP
    socket is closed when it returns, raises or is cancelled.
    """
    check_group(group)
    loop = asyncio.get_running_loop()
    search = DiscoverySearch(
        server_id=server_id,
        system_id=system_id,
        transaction_id=os.urandom(12),
        now=loop.time(),
        timeout=timeout,
        group=group,
    )
    readable = asyncio.Event()

    def feed(data: bytes, source: Endpoint) -> None:
        search.receive_datagram(data, source, loop.time())

    with open_search_socket(interface) as sock:
        loop.add_reader(sock, readable.set)
        try:
            while True:
                now = loop.time()
                search.handle_timer(now)
                send_datagrams(sock, search.datagrams_to_send(now))
                while (event := search.next_event()) is not None:
                    if isinstance(event, SearchFinished):
                        log.debug("lan: search finished, %d found", event.found)
                        return event.found
                    found(event)
                deadline = search.get_timer()
                assert deadline is not None  # a search that is not done always has one
                try:
                    async with asyncio.timeout_at(deadline):
                        await readable.wait()
                except TimeoutError:
                    pass
                readable.clear()
                receive_waiting(sock, feed)
        finally:
            loop.remove_reader(sock)


class LanResponder:
    """Answers searches heard on the group for a ``DiscoveryResponder``, until cancelled."""

    def __init__(
        self,
        responder: DiscoveryResponder,
        *,
        group: Endpoint = DEFAULT_GROUP,
        interfaces: Sequence[str] = ("0.0.0.0",),  # noqa: S104 - the kernel's default interface
    ) -> None:
        check_group(group)
        check_interfaces(interfaces)
        self.responder = responder
        self.group = group
        #: The IPv4 addresses of the interfaces the group is joined on (0.0.0.0: the default).
        self.interfaces = tuple(interfaces)

    async def run(self, *, started: asyncio.Future[None] | None = None) -> None:
        """Listen on the group and answer until cancelled; ``started`` is resolved once joined.

        The answers are sent from the reader callback itself: a search costs no task switch.
        """
        loop = asyncio.get_running_loop()
        responder = self.responder

        def feed(data: bytes, source: Endpoint) -> None:
            respond(responder, sock, data, source, loop.time())

        with open_responder_socket(self.group, self.interfaces) as sock:
            log.debug(
                "lan: answering searches on %s via %s",
                format_endpoint(self.group),
                ", ".join(self.interfaces),
            )
            loop.add_reader(sock, receive_waiting, sock, feed)
            try:
                if started is not None and not started.done():
                    started.set_result(None)
                await loop.create_future()  # until cancelled
            finally:
                loop.remove_reader(sock)
