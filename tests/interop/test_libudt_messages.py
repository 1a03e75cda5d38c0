"""Interop: DGRAM messages and their in-order bit between our UdtConnection and libudt 4.11.

Our ``UdtConnection`` runs over a real UDP socket on loopback, driven by a small
blocking loop (``selectors``, ``time.monotonic`` as ``now``); the other end is
``udt_peer --messages`` (udt_peer.cpp over Debian's libudt-dev), which sends with
``sendmsg(..., inorder)`` or reads with ``recvmsg`` and names every message on
stderr (index, length, FNV-1a 64). Each message starts with its index, so both
sides can tell which one arrived when.

Loopback loses nothing, so the loop drops the first copy (libudt to us: the first
two) of the first packet of every 10th message on its way to the receiver: the
message after such a hole is whole before the hole is filled, and a receiver that
honours the bit hands it out first if its bit is 0, and holds it if its bit is 1.
Checked: every message arrives exactly once and whole, every in-order message after
all messages sent before it, and the bit on the wire is the one ``sendmsg`` (or our
``send``) was given.
"""

from __future__ import annotations

import random
import re
import selectors
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pytest

from tests.interop.libudt import PeerProcess, fnv1a64, run_peer
from tests.proto.udt.connection_helpers import SECRET, ListenerSide
from wavesync_proto.addresses import Endpoint
from wavesync_proto.udt import DataPacket, SocketType, decode_packet
from wavesync_proto.udt.connection import UdtConnection
from wavesync_proto.udt.connection_types import (
    CloseReason,
    ConnectionClosed,
    ConnectionState,
    DataReceived,
    UdtConfig,
)
from wavesync_proto.udt.listener import UdtListener
from wavesync_proto.udt.packet_types import Boundary

LOOPBACK = "127.0.0.1"
COUNT = 300
MAX_MESSAGE = 20_000
SEED = 4711
#: The first copy of the first packet of every this many messages is dropped.
HOLE_EVERY = 10
#: Seconds the whole exchange may take (libudt's own --timeout is the same).
TIMEOUT = 60.0
CONFIG = UdtConfig(socket_type=SocketType.DGRAM, linger=TIMEOUT)
SENT = re.compile(r"sent message index=(\d+) bytes=(\d+) inorder=([01]) fnv=([0-9a-f]+)")
READ = re.compile(r"udt_peer: message index=(-?\d+) bytes=(\d+) fnv=([0-9a-f]+)")


class Machine(Protocol):
    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Endpoint]]: ...
    def receive_datagram(self, data: bytes, source: Endpoint, now: float) -> None: ...
    def get_timer(self) -> float | None: ...
    def handle_timer(self, now: float) -> None: ...


@dataclass
class Holes:
    """Drops the first ``copies`` of the first packet of every ``HOLE_EVERY``-th message."""

    copies: int = 1
    dropped: dict[int, int] = field(default_factory=dict)
    #: libudt's data packets as seen on the wire: message number -> in-order bits.
    bits: dict[int, set[bool]] = field(default_factory=dict)
    #: libudt's message number -> the index its FIRST or SOLO packet carries.
    indexes: dict[int, int] = field(default_factory=dict)

    def drop(self, data: bytes) -> bool:
        if data[0] & 0x80:
            return False  # control
        packet = decode_packet(data)
        assert isinstance(packet, DataPacket)
        self.bits.setdefault(packet.message_number, set()).add(packet.in_order)
        starts = packet.boundary in (Boundary.FIRST, Boundary.SOLO)
        if starts:
            self.indexes[packet.message_number] = int.from_bytes(packet.payload[:4], "big")
        seq = packet.sequence_number
        if starts and packet.message_number % HOLE_EVERY == 0:
            self.dropped[seq] = self.dropped.get(seq, 0) + 1
            return self.dropped[seq] <= self.copies
        return False


@dataclass
class Loop:
    """Our UDP socket on loopback and the loop that drives a machine against ``udt_peer``."""

    sock: socket.socket
    peer: PeerProcess | None = None
    drop_out: Callable[[bytes], bool] = lambda _: False
    drop_in: Callable[[bytes], bool] = lambda _: False

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def run(self, machine: Machine, step: Callable[[float], bool]) -> None:
        """Drive ``machine`` until ``step(now)`` (called every turn) returns True."""
        deadline = time.monotonic() + TIMEOUT
        assert self.peer is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self.sock, selectors.EVENT_READ)
            while True:
                now = time.monotonic()
                timer = machine.get_timer()
                if timer is not None and now >= timer:
                    machine.handle_timer(now)
                for data, destination in machine.datagrams_to_send(now):
                    if not self.drop_out(data):
                        self.sock.sendto(data, destination)
                if step(now):
                    return
                if now >= deadline:
                    raise AssertionError(
                        f"not done in {TIMEOUT} s; libudt:\n{self.peer.stderr_text}"
                    )
                timer = machine.get_timer()
                wake = now + 0.05 if timer is None else min(timer, now + 0.05)
                for fd in self.peer.fds:
                    if fd not in selector.get_map():
                        selector.register(fd, selectors.EVENT_READ)
                for key, _ in selector.select(max(0.0, wake - now)):
                    if key.fileobj is self.sock:
                        self._receive_all(machine)
                    else:
                        selector.unregister(key.fileobj)
                        self.peer.drain()

    def _receive_all(self, machine: Machine) -> None:
        while True:
            try:
                data, (host, port) = self.sock.recvfrom(65536)
            except BlockingIOError:
                return
            if not self.drop_in(data):
                machine.receive_datagram(data, (host, port), time.monotonic())


@pytest.fixture
def loop() -> Iterator[Loop]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((LOOPBACK, 0))
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    try:
        yield Loop(sock)
    finally:
        sock.close()


def overtakes(indexes: list[int]) -> int:
    """How many messages arrived before one with a smaller index."""
    count = 0
    highest = -1
    for index in indexes:
        if index < highest:
            count += 1
        highest = max(highest, index)
    return count


def check_order(arrived: list[int], in_order: list[bool]) -> None:
    """Each index exactly once; an in-order message after every message sent before it."""
    assert sorted(arrived) == list(range(len(in_order)))
    position = {index: place for place, index in enumerate(arrived)}
    for index, ordered in enumerate(in_order):
        if ordered:
            late = [before for before in range(index) if position[before] > position[index]]
            assert not late, f"in-order message {index} came before {late}"


def test_libudt_sendmsg_to_our_receiver(udt_peer: Path, loop: Loop) -> None:
    # The retransmission is lost too: the hole lasts until our periodic NAK (10 ms or
    # more), long enough for the next message to be whole behind it.
    holes = Holes(copies=2)
    loop.drop_in = holes.drop
    side = ListenerSide(socket_id=0x1234_5678, seed=SEED, config=CONFIG)
    # ListenerSide's listener takes STREAM callers; libudt calls with SOCK_DGRAM.
    side.listener = UdtListener(secret=SECRET, socket_type=SocketType.DGRAM)
    args = ["--messages", str(COUNT), "--max-message", str(MAX_MESSAGE), "--seed", str(SEED)]
    got: list[bytes] = []
    closed: list[ConnectionClosed] = []
    with run_peer(
        udt_peer,
        "send",
        "--connect",
        f"{LOOPBACK}:{loop.port}",
        *args,
        "--timeout",
        str(int(TIMEOUT)),
    ) as peer:
        loop.peer = peer
        peer.port()

        def step(now: float) -> bool:
            connection = side.connection
            if connection is not None:
                while (event := connection.next_event()) is not None:
                    if isinstance(event, DataReceived):
                        assert event.message_complete
                        got.append(event.data)
                    elif isinstance(event, ConnectionClosed):
                        closed.append(event)
            return bool(closed) and peer.process.poll() is not None

        loop.run(side, step)
        assert peer.wait_exit() == 0, peer.stderr_text
        stderr = peer.stderr_text
    sent = [(int(i), int(n), bit == "1", int(h, 16)) for i, n, bit, h in SENT.findall(stderr)]
    assert [index for index, *_ in sent] == list(range(COUNT))
    assert closed[0].reason is CloseReason.PEER_CLOSED
    # Whole: each message is the one libudt sent under its index (length and hash).
    arrived = [int.from_bytes(message[:4], "big") for message in got]
    check_order(arrived, [ordered for _, _, ordered, _ in sent])
    for message, index in zip(got, arrived, strict=True):
        assert (len(message), fnv1a64(message)) == (sent[index][1], sent[index][3])
    # The bit on the wire is sendmsg's inorder, on every packet of the message.
    for number, bits in holes.bits.items():
        assert bits == {sent[holes.indexes[number]][2]}, number
    # Bit-0 messages after the holes did overtake (4.11's sendmsg, our scanMsg rule).
    assert holes.dropped
    print(
        f"libudt -> ours: {COUNT} messages, {len(holes.dropped)} holes,"
        f" {overtakes(arrived)} handed out ahead"
    )
    assert overtakes(arrived) > 0


def test_our_messages_to_libudt_recvmsg(udt_peer: Path, loop: Loop) -> None:
    holes = Holes()
    loop.drop_out = holes.drop
    rng = random.Random(SEED)  # noqa: S311 - reproducible test data
    in_order = [rng.random() < 0.5 for _ in range(COUNT)]
    messages = [
        index.to_bytes(4, "big") + rng.randbytes(rng.randrange(0, MAX_MESSAGE - 3))
        for index in range(COUNT)
    ]
    closed: list[ConnectionClosed] = []
    with run_peer(
        udt_peer,
        "recv",
        "--listen",
        f"{LOOPBACK}:0",
        "--messages",
        str(COUNT),
        "--timeout",
        str(int(TIMEOUT)),
    ) as peer:
        loop.peer = peer
        port = peer.port()
        connection = UdtConnection.connect(
            (LOOPBACK, port),
            socket_id=0x2345_6789,
            isn=0x7FFF_FF00,
            now=time.monotonic(),
            random=rng.random,
            config=CONFIG,
        )
        queue = list(zip(messages, in_order, strict=True))

        def step(now: float) -> bool:
            while queue and connection.state in (
                ConnectionState.CONNECTING,
                ConnectionState.CONNECTED,
            ):
                message, ordered = queue[0]
                if not connection.send(message, in_order=ordered):
                    break
                queue.pop(0)
            # A 4.11 receiver may lose messages not yet read when the peer's Shutdown
            # comes (libudt to libudt: 1 run in 8 read fewer than 300): close once all
            # were read, as an application protocol over 4.11 would have to.
            read_all = peer.stderr.count(b"udt_peer: message index=") == COUNT
            if not queue and read_all and connection.state is ConnectionState.CONNECTED:
                connection.close(now)
            while (event := connection.next_event()) is not None:
                if isinstance(event, ConnectionClosed):
                    closed.append(event)
            return bool(closed) and peer.process.poll() is not None

        loop.run(connection, step)
        assert peer.wait_exit() == 0, peer.stderr_text
        stderr = peer.stderr_text
    assert closed[0].reason is CloseReason.LOCAL_CLOSE, closed
    read = [(int(i), int(n), int(h, 16)) for i, n, h in READ.findall(stderr)]
    arrived = [index for index, _, _ in read]
    check_order(arrived, in_order)
    for index, size, digest in read:
        assert (size, digest) == (len(messages[index]), fnv1a64(messages[index]))
    for number, bits in holes.bits.items():
        assert bits == {in_order[holes.indexes[number]]}, number
    assert holes.dropped
    print(
        f"ours -> libudt: {COUNT} messages, {len(holes.dropped)} holes,"
        f" {overtakes(arrived)} read ahead by libudt"
    )
