"""Small anyio helpers the adapter's programs share: name resolution and UDP sockets."""

from __future__ import annotations

import socket

import anyio
import anyio.abc

from wavesync_proto.addresses import Endpoint

__all__ = ["open_udp_for", "resolve", "sleep_until_or"]


async def resolve(endpoint: Endpoint) -> Endpoint:
    """``endpoint`` with its host turned into an address (the first the resolver gives).

    Done once per program: a datagram's source is compared with this address, and a
    hostname in every ``sendto`` would mean a blocking lookup per packet.
    """
    host, port = endpoint
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
