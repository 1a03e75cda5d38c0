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
import socket
import sys
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
from wavesync_proto.errors import LocalProtocolError

from .listen import STOP_POLL

__all__ = ["LanResponder", "search_lan"]

log = logging.getLogger("wavesync.lan")

# A search is 576 bytes and an answer at most 444: anything longer is not ours, and a
# truncated read of it fails to decode like any other garbage.
_RECEIVE_BYTES = 2048
# Datagrams read per wake-up, so that a flood on the group cannot keep the stop flag unread.
_RECEIVE_BATCH = 64
# <linux/in.h> IP_MULTICAST_ALL (Python's socket module lacks it): on by default, it hands
# a socket bound to the wildcard every group that any process joined on its port.
_IP_MULTICAST_ALL = 49


def _check_group(group: Endpoint) -> None:
    if ":" in group[0]:
        raise LocalProtocolError("LAN discovery runs over IPv4 multicast; the group is IPv6")


def _search_socket(interface: str | None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        # TTL 1: the search never leaves the link; loop on: agents on this host hear it too.
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        if interface is not None:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(interface))
        sock.bind(("0.0.0.0", 0))  # noqa: S104 - answers come by unicast from any agent
    except BaseException:
        sock.close()
        raise
    return sock


def _group_socket(group: Endpoint, interfaces: Sequence[str]) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        # Several agents on one host all bind the group port, and every one of them
        # must hear each search: the kernel hands a multicast datagram to each socket.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if sys.platform.startswith("linux"):
            sock.setsockopt(socket.IPPROTO_IP, _IP_MULTICAST_ALL, 0)
        sock.bind(("0.0.0.0", group[1]))  # noqa: S104 - the group's port on every interface
        address = socket.inet_aton(group[0])
        for interface in interfaces:
            membership = address + socket.inet_aton(interface)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
    except BaseException:
        sock.close()
        raise
    return sock


def _send(sock: socket.socket, datagrams: list[tuple[bytes, Endpoint]]) -> None:
    for data, destination in datagrams:
        try:
            sock.sendto(data, destination)
        except OSError as exc:
            # No multicast route, a full buffer: the search resends, or ends empty-handed.
            log.debug("lan: could not send to %s: %s", format_endpoint(destination), exc)


def _receive_waiting(sock: socket.socket, feed: Callable[[bytes, Endpoint], None]) -> None:
    for _ in range(_RECEIVE_BATCH):
        try:
            data, source = sock.recvfrom(_RECEIVE_BYTES)
        except BlockingIOError:
            return
        except OSError as exc:  # an ICMP error for an earlier send
            log.debug("lan: receive error: %s", exc)
            continue
        feed(data, (str(source[0]), int(source[1])))


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
    _check_group(group)
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

    with _search_socket(interface) as sock, selectors.DefaultSelector() as selector:
        selector.register(sock, selectors.EVENT_READ)
        while True:
            now = time.monotonic()
            search.handle_timer(now)
            _send(sock, search.datagrams_to_send(now))
            while (event := search.next_event()) is not None:
                if isinstance(event, SearchFinished):
                    log.debug("lan: search finished, %d found", event.found)
                    return event.found
                found(event)
            deadline = search.get_timer()
            assert deadline is not None  # a search that is not done always has one
            if selector.select(max(0.0, deadline - time.monotonic())):
                _receive_waiting(sock, feed)


class LanResponder:
    """Answers searches heard on the group for a ``DiscoveryResponder``, until stopped."""

    def __init__(
        self,
        responder: DiscoveryResponder,
        *,
        group: Endpoint = DEFAULT_GROUP,
        interfaces: Sequence[str] = ("0.0.0.0",),  # noqa: S104 - the kernel's default interface
    ) -> None:
        _check_group(group)
        if not interfaces:
            raise LocalProtocolError("a LAN responder joins the group on at least one interface")
        self.responder = responder
        self.group = group
        #: The IPv4 addresses of the interfaces the group is joined on (0.0.0.0: the default).
        self.interfaces = tuple(interfaces)

    def run(self, stop: threading.Event, started: Callable[[], object] | None = None) -> None:
        """Listen on the group and answer until ``stop`` is set (noticed within
        ``STOP_POLL`` seconds); ``started()`` is called once the group is joined."""
        responder = self.responder
        counters = responder.counters

        def feed(data: bytes, source: Endpoint) -> None:
            limited = counters.rate_limited
            answers = responder.receive_datagram(data, source, time.monotonic())
            if counters.rate_limited != limited:
                log.info("lan: search from %s rate-limited", format_endpoint(source))
            for answer, destination in answers:
                log.debug(
                    "lan: answering a search from %s (%d bytes)",
                    format_endpoint(destination),
                    len(answer),
                )
            _send(sock, answers)

        with (
            _group_socket(self.group, self.interfaces) as sock,
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
                    _receive_waiting(sock, feed)
