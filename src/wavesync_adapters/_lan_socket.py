"""The LAN discovery sockets every adapter uses: plain ``socket`` code, no runtime.

What to send, when, and which answers count are ``DiscoverySearch``'s and
``DiscoveryResponder``'s (wavesync_proto.discovery); this module only opens the
non-blocking IPv4 multicast sockets, sends a list of datagrams and reads what waits.
Each adapter (anyio, asyncio, blocking) adds its own way to wait until readable.
"""

from __future__ import annotations

import logging
import socket
import sys
from collections.abc import Callable, Sequence

from wavesync_proto.addresses import Endpoint, format_endpoint
from wavesync_proto.discovery import DiscoveryResponder
from wavesync_proto.errors import LocalProtocolError

__all__ = [
    "check_group",
    "check_interfaces",
    "open_responder_socket",
    "open_search_socket",
    "receive_waiting",
    "respond",
    "send_datagrams",
]

log = logging.getLogger("wavesync.lan")

# A search is 576 bytes and an answer at most 444: anything longer is not ours, and a
# truncated read of it fails to decode like any other garbage.
_RECEIVE_BYTES = 2048
# Datagrams read per wake-up, so that a flood on the group cannot starve the other tasks.
_RECEIVE_BATCH = 64
# <linux/in.h> IP_MULTICAST_ALL (Python's socket module lacks it): on by default, it hands
# a socket bound to the wildcard every group that any process joined on its port.
_IP_MULTICAST_ALL = 49


def check_group(group: Endpoint) -> None:
    """Refuse an IPv6 group: discovery runs over IPv4 multicast."""
    if ":" in group[0]:
        raise LocalProtocolError("LAN discovery runs over IPv4 multicast; the group is IPv6")


def check_interfaces(interfaces: Sequence[str]) -> None:
    """Refuse an empty interface list: a responder must join the group somewhere."""
    if not interfaces:
        raise LocalProtocolError("a LAN responder joins the group on at least one interface")


def open_search_socket(interface: str | None) -> socket.socket:
    """A non-blocking UDP socket for one search; ``interface`` is the IPv4 address to
    send the multicast from (None: the kernel's choice)."""
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


def open_responder_socket(group: Endpoint, interfaces: Sequence[str]) -> socket.socket:
    """A non-blocking UDP socket on the group's port, joined to the group on ``interfaces``."""
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


def send_datagrams(sock: socket.socket, datagrams: list[tuple[bytes, Endpoint]]) -> None:
    """Send each datagram; one that fails is logged and lost (the search resends)."""
    for data, destination in datagrams:
        try:
            sock.sendto(data, destination)
        except OSError as exc:
            # No multicast route, a full buffer: the search resends, or ends empty-handed.
            log.debug("lan: could not send to %s: %s", format_endpoint(destination), exc)


def receive_waiting(sock: socket.socket, feed: Callable[[bytes, Endpoint], None]) -> None:
    """Feed up to a batch of the datagrams waiting on ``sock``, without blocking."""
    for _ in range(_RECEIVE_BATCH):
        try:
            data, source = sock.recvfrom(_RECEIVE_BYTES)
        except BlockingIOError:
            return
        except OSError as exc:  # an ICMP error for an earlier send
            log.debug("lan: receive error: %s", exc)
            continue
        feed(data, (str(source[0]), int(source[1])))


def respond(
    responder: DiscoveryResponder, sock: socket.socket, data: bytes, source: Endpoint, now: float
) -> None:
    """Hand one datagram heard on the group to ``responder`` and send its answers."""
    counters = responder.counters
    limited = counters.rate_limited
    answers = responder.receive_datagram(data, source, now)
    if counters.rate_limited != limited:
        log.info("lan: search from %s rate-limited", format_endpoint(source))
    for answer, destination in answers:
        log.debug(
            "lan: answering a search from %s (%d bytes)",
            format_endpoint(destination),
            len(answer),
        )
    send_datagrams(sock, answers)
