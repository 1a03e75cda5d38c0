"""LAN discovery on blocking sockets: the client's multicast search, the agent's answers.

The twin of ``anyio/lan.py``: sockets, multicast membership and the clock live here;
what to send, when, and which answers count are ``DiscoverySearch``'s and
``DiscoveryResponder``'s (wavesync_proto.discovery, docs/protocol.md "LAN discovery").
IPv4 multicast only.
"""

from __future__ import annotations

import logging
import os
import selectors
import threading
import time
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
from .listen import STOP_POLL

__all__ = ["LanResponder", "search_lan"]

log = logging.getLogger("wavesync.lan")


def search_lan(
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
    socket is closed when it returns or raises.
    """
    check_group(group)
    search = DiscoverySearch(
        server_id=server_id,
        system_id=system_id,
        transaction_id=os.urandom(12),
        now=time.monotonic(),
        timeout=timeout,
        group=group,
    )

    def feed(data: bytes, source: Endpoint) -> None:
        search.receive_datagram(data, source, time.monotonic())

    with open_search_socket(interface) as sock, selectors.DefaultSelector() as selector:
        selector.register(sock, selectors.EVENT_READ)
        while True:
            now = time.monotonic()
            search.handle_timer(now)
            send_datagrams(sock, search.datagrams_to_send(now))
            while (event := search.next_event()) is not None:
                if isinstance(event, SearchFinished):
                    log.debug("lan: search finished, %d found", event.found)
                    return event.found
                found(event)
            deadline = search.get_timer()
            assert deadline is not None  # a search that is not done always has one
            if selector.select(max(0.0, deadline - time.monotonic())):
                receive_waiting(sock, feed)


class LanResponder:
    """Answers searches heard on the group for a ``DiscoveryResponder``, until stopped."""

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

    def run(self, stop: threading.Event, started: Callable[[], object] | None = None) -> None:
        """Listen on the group and answer until ``stop`` is set (noticed within
        ``STOP_POLL`` seconds); ``started()`` is called once the group is joined."""
        responder = self.responder

        def feed(data: bytes, source: Endpoint) -> None:
            respond(responder, sock, data, source, time.monotonic())

        with (
            open_responder_socket(self.group, self.interfaces) as sock,
            selectors.DefaultSelector() as selector,
        ):
            selector.register(sock, selectors.EVENT_READ)
            log.debug(
                "lan: answering searches on %s via %s",
                format_endpoint(self.group),
                ", ".join(self.interfaces),
            )
            if started is not None:
                started()
            while not stop.is_set():
                if selector.select(STOP_POLL):
                    receive_waiting(sock, feed)
