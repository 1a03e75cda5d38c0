"""The blocking UDT endpoint's I/O thread on the shared ``BatchedUdpSocket``.

GSO runs out and GRO runs in over real loopback sockets (a test the kernel cannot
run says why), and a send burst through a socket whose kernel keeps refusing (EAGAIN:
loopback itself never refuses, so a thin wrapper plays a small send buffer): what is
refused waits in ``pending``, the loop asks the selector for EVENT_WRITE and sends it
when the socket is writable; every byte arrives, in order.
"""

from __future__ import annotations

import hashlib
import os
import queue
import selectors
import socket
import threading
from collections.abc import Callable
from typing import Any, cast

import pytest

from tests.adapters.test_udt_blocking import receive_exactly
from wavesync_adapters.blocking.udt import UdtEndpoint
from wavesync_proto.addresses import Endpoint

WAIT = 30.0  # seconds any one step may take before the test fails
LOOPBACK: Endpoint = ("127.0.0.1", 0)
SOL_UDP, UDP_GRO = 17, 104


def send_in_background(sock: socket.socket, payload: bytes) -> Callable[[], None]:
    """Start ``sock.sendall(payload)`` on a thread; the returned call waits for it."""
    errors: queue.Queue[BaseException | None] = queue.Queue()

    def run() -> None:
        try:
            sock.sendall(payload)
        except BaseException as exc:
            errors.put(exc)
        else:
            errors.put(None)

    thread = threading.Thread(target=run, name="test-sender")
    thread.start()

    def join() -> None:
        error = errors.get(timeout=WAIT)
        thread.join(WAIT)
        if error is not None:
            raise error

    return join


def transfer(client: UdtEndpoint, server: UdtEndpoint, payload: bytes) -> None:
    """``payload`` from ``client`` to ``server`` over one stream, checked byte-exact."""
    server.listen()
    outgoing = client.connect(server.local_address, timeout=WAIT)
    incoming = server.accept(timeout=WAIT)
    with outgoing, incoming:
        joined = send_in_background(outgoing, payload)
        received = receive_exactly(incoming, len(payload))
        joined()
        assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()


def kernel_has_gro() -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.setsockopt(SOL_UDP, UDP_GRO, 1)
        except OSError:
            return False
    return True


class RefusingSocket:
    """A UDP socket whose kernel send buffer holds ``capacity`` bytes and is found empty
    again once it has refused a send (by the time the selector says writable).

    Everything else is the real socket's (the selector watches the real descriptor).
    Only the endpoint's I/O thread sends on it.
    """

    def __init__(self, sock: socket.socket, capacity: int) -> None:
        self._sock = sock
        self._capacity = capacity
        self._queued = 0
        self.refused = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def _take(self, size: int) -> None:
        # As the kernel's check: an empty buffer takes any one send (a whole GSO run).
        if self._queued and self._queued + size > self._capacity:
            self.refused += 1
            self._queued = 0
            raise BlockingIOError(11, "Resource temporarily unavailable")
        self._queued += size

    def sendto(self, data: bytes, address: Endpoint) -> int:
        self._take(len(data))
        return self._sock.sendto(data, address)

    def sendmsg(self, buffers: list[bytes], *args: Any) -> int:
        self._take(sum(len(buffer) for buffer in buffers))
        return self._sock.sendmsg(buffers, *args)


def test_gso_out_and_gro_in_carry_a_transfer_byte_exact() -> None:
    payload = os.urandom(8 * 1024 * 1024)
    with (
        UdtEndpoint.bind(LOOPBACK, gso=True) as server,
        UdtEndpoint.bind(LOOPBACK, gso=True) as client,
    ):
        if not server._io._gro:
            reason = "this kernel refuses UDP_GRO (Linux >= 5.0 has it)"
            print(reason)
            pytest.skip(reason)
        transfer(client, server, payload)
        sent, read = client._io, server._io
    if sent.gso_batches == 0 and not sent._gso:
        reason = "this kernel refuses UDP_SEGMENT (Linux >= 4.18 has it)"
        print(reason)
        pytest.skip(reason)
    assert sent.gso_batches > 0
    # Loopback hands a GSO batch to a GRO socket whole; the receiver cuts it back.
    assert read.gro_batches > 0


def test_gso_is_off_by_default_and_gro_on_where_the_kernel_has_it() -> None:
    with UdtEndpoint.bind(LOOPBACK) as server, UdtEndpoint.bind(LOOPBACK) as client:
        transfer(client, server, os.urandom(1024 * 1024))
        assert client._io.gso_batches == 0
        assert server._io._gro is kernel_has_gro()


@pytest.mark.parametrize("gso", [False, True], ids=["sendto", "gso"])
def test_a_burst_the_kernel_keeps_refusing_waits_for_writable_and_arrives_whole(
    gso: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    payload = os.urandom(8 * 1024 * 1024)
    real = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    real.bind(LOOPBACK)
    # A send buffer of a few dozen datagrams against a flight of hundreds.
    tight = RefusingSocket(real, capacity=32 * 1024)
    with (
        UdtEndpoint.bind(LOOPBACK) as server,
        UdtEndpoint(cast(socket.socket, tight), gso=gso, owns_socket=True) as client,
    ):
        masks: list[int] = []
        loop = client._loop
        modify = loop._selector.modify

        def recording(fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
            if fileobj is loop.sock:
                masks.append(events)
            return modify(fileobj, events, data)

        # Set on the instance: the I/O thread looks it up on every change of mask.
        monkeypatch.setattr(loop._selector, "modify", recording)
        transfer(client, server, payload)
    assert tight.refused > 0
    # Refused datagrams waited for EVENT_WRITE, and the loop stopped asking once sent.
    assert any(mask & selectors.EVENT_WRITE for mask in masks)
    assert any(mask == selectors.EVENT_READ for mask in masks)
    assert real.fileno() == -1  # closed with the endpoint that owned it
