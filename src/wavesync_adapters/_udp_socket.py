"""The UDP socket under every adapter's UDT endpoint: bound, non-blocking, large buffers.

Standard library only, so that each runtime's adapter can share it: the asyncio
adapter must import nothing of anyio's (it runs on uvloop without it).
"""

from __future__ import annotations

import logging
import socket

from wavesync_proto.addresses import Endpoint

__all__ = ["SOCKET_BUFFER_BYTES", "open_udp_socket", "tune_udp_socket"]

log = logging.getLogger("wavesync.udt")

#: 4 MiB is the usual rmem_max/wmem_max, and at 100 MB/s about 40 ms of data: enough to
#: ride out a scheduling hiccup of the event loop without dropping a flight.
SOCKET_BUFFER_BYTES = 4 * 1024 * 1024


def tune_udp_socket(sock: socket.socket, buffer_bytes: int = SOCKET_BUFFER_BYTES) -> None:
    """Make ``sock`` non-blocking and ask for ``buffer_bytes`` of kernel buffer each way.

    The kernel caps the request at net.core.rmem_max / wmem_max (SO_RCVBUFFORCE would
    pass the cap, but only as root, and a library should not need root).
    """
    sock.setblocking(False)
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            if sock.getsockopt(socket.SOL_SOCKET, option) < buffer_bytes:
                sock.setsockopt(socket.SOL_SOCKET, option, buffer_bytes)
        except OSError as exc:  # pragma: no cover - a kernel that refuses the size
            log.debug("could not set socket buffer %d: %s", option, exc)


def open_udp_socket(local: Endpoint) -> socket.socket:
    """A bound, tuned, non-blocking UDP socket on ``local`` (an IPv6 host: an IPv6 socket)."""
    family = socket.AF_INET6 if ":" in local[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        tune_udp_socket(sock)
        sock.bind(local)
    except BaseException:
        sock.close()
        raise
    return sock
