"""Interop: our sans-I/O UDT handshake against libudt 4.11 (Debian libudt-dev) on loopback.

``UdtHandshake`` and ``UdtListener`` run over a real UDP socket, driven by a small
blocking loop (``selectors`` on the socket and the peer's pipes, ``time.monotonic`` as
``now``); the other end is ``udt_peer`` (udt_peer.cpp). Every datagram both ways is
decoded and logged, so the tests can check what libudt put on the wire as well as what
both ends concluded. docs/protocol.md §4.6.7 lists what this verifies.
"""

from __future__ import annotations

import hashlib
import selectors
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import pytest

from tests.interop.libudt import PeerProcess, run_peer
from wavesync_proto.addresses import Endpoint
from wavesync_proto.udt import (
    Handshake,
    Packet,
    RequestType,
    Shutdown,
    SocketType,
    decode_packet,
    encode_packet,
    unpack_peer_ip,
)
from wavesync_proto.udt.handshake import (
    FailureReason,
    HandshakeEstablished,
    HandshakeFailed,
    UdtHandshake,
)
from wavesync_proto.udt.listener import (
    AcceptedHandshake,
    ConnectionKey,
    ConnectionRequest,
    UdtListener,
)

LOOPBACK = "127.0.0.1"
#: Ours: a socket id and an ISN just below the 31-bit wrap, so libudt sees an edge value.
OUR_SOCKET_ID = 0x2345_6789
OUR_ISN = 0x7FFF_FFF0
#: Seconds any one exchange may take: libudt gives up a regular connect after 3 s.
EXCHANGE_TIMEOUT = 10.0
#: The peer's own --timeout: it exits by itself even if the test forgot it.
PEER_TIMEOUT = "20"


class Machine(Protocol):
    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Endpoint]]: ...
    def receive_datagram(self, data: bytes, source: Endpoint, now: float) -> None: ...
    def get_timer(self) -> float | None: ...
    def handle_timer(self, now: float) -> None: ...


@dataclass
class Wire:
    """Every datagram of one exchange, decoded, in the order the test saw them."""

    sent: list[Packet] = field(default_factory=list)
    received: list[Packet] = field(default_factory=list)

    def handshakes(self, packets: list[Packet]) -> list[Handshake]:
        return [p for p in packets if isinstance(p, Handshake)]

    def received_types(self) -> list[int]:
        return [hs.request_type for hs in self.handshakes(self.received)]

    def sent_types(self) -> list[int]:
        return [hs.request_type for hs in self.handshakes(self.sent)]


@dataclass
class Loopback:
    """Our UDP socket on loopback and the loop that drives a machine against the peer."""

    sock: socket.socket
    peer: PeerProcess
    wire: Wire = field(default_factory=Wire)
    #: Datagrams held back from the machine until ``hold_until`` returns True for one.
    hold_until: Callable[[Packet], bool] | None = None
    _held: list[tuple[bytes, Endpoint]] = field(default_factory=list)

    @property
    def address(self) -> Endpoint:
        host, port = self.sock.getsockname()
        return (host, port)

    def send(self, data: bytes, destination: Endpoint) -> None:
        self.wire.sent.append(decode_packet(data))
        self.sock.sendto(data, destination)

    def run(self, machine: Machine, done: Callable[[], bool]) -> None:
        """Drive ``machine`` until ``done()``, reading the peer's pipes on the way."""
        deadline = time.monotonic() + EXCHANGE_TIMEOUT
        with selectors.DefaultSelector() as selector:
            selector.register(self.sock, selectors.EVENT_READ)
            while True:
                now = time.monotonic()
                timer = machine.get_timer()
                if timer is not None and now >= timer:
                    machine.handle_timer(now)
                for data, destination in machine.datagrams_to_send(now):
                    self.send(data, destination)
                if done():
                    return
                if now >= deadline:
                    raise AssertionError(
                        f"no result in {EXCHANGE_TIMEOUT} s; libudt said:\n{self.peer.stderr_text}"
                        f"\nwire: sent {self.wire.sent_types()} received"
                        f" {self.wire.received_types()}"
                    )
                timer = machine.get_timer()
                wake = deadline if timer is None else min(timer, deadline)
                for fd in self.peer.fds:
                    if fd not in selector.get_map():
                        selector.register(fd, selectors.EVENT_READ)
                for key, _ in selector.select(max(0.0, wake - now)):
                    if key.fileobj is self.sock:
                        self.receive(machine)
                    else:
                        selector.unregister(key.fileobj)
                        self.peer.drain()

    def receive(self, machine: Machine) -> None:
        """Pass one datagram from the socket to ``machine`` (or hold it back)."""
        data, (host, port) = self.sock.recvfrom(65536)
        packet = decode_packet(data)
        self.wire.received.append(packet)
        if self.hold_until is not None:
            self._held.append((data, (host, port)))
            if not self.hold_until(packet):
                return
            self.hold_until = None
        held, self._held = self._held or [(data, (host, port))], []
        for datagram, source in held:
            machine.receive_datagram(datagram, source, time.monotonic())


@pytest.fixture
def udp() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((LOOPBACK, 0))
    try:
        yield sock
    finally:
        sock.close()


def libudt_cookie(host: str, port: int, minute: int) -> bytes:
    """The 4 cookie bytes 4.11's listener puts on the wire for a caller at host:port.

    core.cpp ``listen``: MD5 of "host:port:minutes since the listener started", the first
    4 digest bytes read as a host-order (x86: little-endian) int, then ``htonl``'d.
    """
    digest = hashlib.md5(f"{host}:{port}:{minute}".encode()).digest()  # noqa: S324 - 4.11's
    return digest[:4][::-1]


def connected_socket_id(peer: PeerProcess) -> int:
    return int(peer.wait_for(r"connected socket=(\d+)").group(1))


def shut_down(loop: Loopback, established: HandshakeEstablished) -> int:
    """Close the connection the libudt way, a shutdown packet to the peer's socket; the
    peer's exit status.

    Sent again every 0.2 s until the peer exits: 4.11 drops a packet that arrives in the
    moment between its connect() returning and its receive thread filing the new socket
    (seen here after a rendezvous), and a shutdown is never retransmitted.
    """
    shutdown = encode_packet(Shutdown(destination_socket_id=established.peer_socket_id))
    deadline = time.monotonic() + EXCHANGE_TIMEOUT
    while loop.peer.process.poll() is None and time.monotonic() < deadline:
        loop.send(shutdown, established.peer_address)
        loop.peer.drain(0.2)
    return loop.peer.wait_exit()


# --- our caller → libudt listener -------------------------------------------------------


def test_our_caller_connects_to_a_libudt_listener(udt_peer: Path, udp: socket.socket) -> None:
    args = ["recv", "--listen", f"{LOOPBACK}:0", "--mss", "1400", "--fc", "5000"]
    with run_peer(udt_peer, *args, "--timeout", PEER_TIMEOUT) as peer:
        server = (LOOPBACK, peer.port())
        loop = Loopback(udp, peer)
        caller = UdtHandshake.caller(
            server, socket_id=OUR_SOCKET_ID, isn=OUR_ISN, now=time.monotonic()
        )
        loop.run(caller, lambda: caller.result is not None)
        established = caller.result
        assert isinstance(established, HandshakeEstablished), established
        libudt_id = connected_socket_id(peer)
        assert f"peer={LOOPBACK}:{loop.address[1]}" in peer.stderr_text

        assert established.peer_socket_id == libudt_id
        assert established.local_socket_id == OUR_SOCKET_ID
        # 4.11's listener adopts the caller's ISN for both directions.
        assert established.local_isn == established.peer_isn == OUR_ISN
        assert established.mss == 1400  # min(ours 1500, its --mss 1400)
        assert established.flow_window == 5000  # its min(receive buffer 8192, --fc 5000)
        assert established.peer_address == server
        assert unpack_peer_ip(established.reported_ip, ipv6=False) == LOOPBACK

        # The challenge: our request echoed to our socket id, with 4.11's MD5 cookie,
        # whose first 4 digest bytes go on the wire reversed (host-order int, htonl).
        request, confirm = loop.wire.handshakes(loop.wire.sent)[:2]
        challenge = loop.wire.handshakes(loop.wire.received)[0]
        assert challenge == replace(
            request, destination_socket_id=OUR_SOCKET_ID, cookie=challenge.cookie
        )
        raw_cookie = encode_packet(challenge)[44:48]
        assert raw_cookie in {libudt_cookie(LOOPBACK, loop.address[1], m) for m in (0, 1)}
        assert confirm.request_type == RequestType.RESPONSE
        assert confirm.cookie == challenge.cookie

        # The response comes from the new socket, to us, with our ISN back.
        response = loop.wire.handshakes(loop.wire.received)[-1]
        assert response.request_type == RequestType.RESPONSE
        assert response.destination_socket_id == OUR_SOCKET_ID
        assert response.socket_id == libudt_id
        assert (response.version, response.socket_type) == (4, SocketType.STREAM)

        # Our shutdown packet ends libudt's recv() as a closed connection, 0 bytes.
        assert shut_down(loop, established) == 0, peer.stderr_text
        assert "received bytes=0" in peer.stderr_text


def test_a_libudt_listener_refuses_another_socket_type_with_1002(
    udt_peer: Path, udp: socket.socket
) -> None:
    with run_peer(udt_peer, "recv", "--listen", f"{LOOPBACK}:0", "--timeout", "5") as peer:
        server = (LOOPBACK, peer.port())
        loop = Loopback(udp, peer)
        caller = UdtHandshake.caller(
            server,
            socket_id=OUR_SOCKET_ID,
            isn=OUR_ISN,
            now=time.monotonic(),
            socket_type=SocketType.DGRAM,
        )
        loop.run(caller, lambda: caller.result is not None)
        assert isinstance(caller.result, HandshakeFailed)
        assert caller.result.reason is FailureReason.REJECTED
        # A valid cookie first (type 1), then the refusal of the confirmed request.
        assert loop.wire.received_types()[:2] == [RequestType.REGULAR, RequestType.REJECTED]
        refusal = loop.wire.handshakes(loop.wire.received)[1]
        assert refusal.socket_type == SocketType.DGRAM  # our request, echoed


# --- libudt caller → our listener -------------------------------------------------------


@dataclass
class ListeningSocket:
    """The multiplexer's part, for one listening socket: accept, re-answer duplicates."""

    listener: UdtListener
    socket_id: int
    #: Seconds added to ``now`` from the second datagram on (a cookie that went stale).
    skew_after_first: float = 0.0
    refuse: bool = False
    accepted: dict[ConnectionKey, AcceptedHandshake] = field(default_factory=dict)
    requests: list[ConnectionRequest] = field(default_factory=list)
    received_by_connection: list[Packet] = field(default_factory=list)
    _outbox: list[tuple[bytes, Endpoint]] = field(default_factory=list)
    _seen: int = 0

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Endpoint]]:
        out, self._outbox = self._outbox, []
        return out

    def get_timer(self) -> float | None:
        return None

    def handle_timer(self, now: float) -> None:
        pass

    def receive_datagram(self, data: bytes, source: Endpoint, now: float) -> None:
        packet = decode_packet(data)
        if packet.destination_socket_id == self.socket_id:
            self.received_by_connection.append(packet)  # the accepted connection's
            return
        self._seen += 1
        reply = self.listener.receive_datagram(
            data, source, now + (self.skew_after_first if self._seen > 1 else 0.0)
        )
        if isinstance(reply, ConnectionRequest):
            self.requests.append(reply)
            accepted = self.accepted.get(reply.key)
            if self.refuse:
                refusal = self.listener.reject(reply)
                self._outbox.append((refusal.datagram, refusal.destination))
                return
            if accepted is None:
                accepted = self.listener.accept(reply, socket_id=self.socket_id)
                self.accepted[reply.key] = accepted
            self._outbox.append((accepted.response, accepted.destination))
        elif reply is not None:
            self._outbox.append((reply.datagram, reply.destination))


def listening(*, skew_after_first: float = 0.0, refuse: bool = False) -> ListeningSocket:
    listener = UdtListener(secret=b"interop test secret!", mss=1500)
    return ListeningSocket(
        listener, OUR_SOCKET_ID, skew_after_first=skew_after_first, refuse=refuse
    )


def test_a_libudt_caller_connects_to_our_listener(udt_peer: Path, udp: socket.socket) -> None:
    ours = listening()
    here = udp.getsockname()
    args = ["send", "--connect", f"{here[0]}:{here[1]}", "--connect-only", "--mss", "1300"]
    with run_peer(udt_peer, *args, "--fc", "3000", "--timeout", PEER_TIMEOUT) as peer:
        libudt_port = peer.port()
        loop = Loopback(udp, peer)
        # Connected, then closed: libudt's shutdown reaches the socket id we gave it.
        loop.run(ours, lambda: bool(ours.received_by_connection))
        assert peer.wait_exit() == 0, peer.stderr_text
        libudt_id = connected_socket_id(peer)
    assert f"peer={here[0]}:{here[1]}" in peer.stderr_text

    request = loop.wire.handshakes(loop.wire.received)[0]
    assert request.request_type == RequestType.REGULAR
    assert (request.version, request.socket_type) == (4, SocketType.STREAM)
    assert (request.destination_socket_id, request.cookie) == (0, 0)
    assert request.socket_id == libudt_id
    assert request.mss == 1300
    assert request.flow_window == 3000  # min(receive buffer 8192, --fc 3000)
    assert unpack_peer_ip(request.peer_ip, ipv6=False) == LOOPBACK  # where it sent to

    # It brought our cookie back in a -1 (and repeats exactly that until answered).
    confirms = [hs for hs in loop.wire.handshakes(loop.wire.received)[1:] if hs.cookie]
    assert confirms
    assert {hs.request_type for hs in confirms} == {RequestType.RESPONSE}
    challenge = loop.wire.handshakes(loop.wire.sent)[0]
    assert {hs.cookie for hs in confirms} == {challenge.cookie}

    [accepted] = ours.accepted.values()
    established = accepted.established
    assert accepted.key == ((LOOPBACK, libudt_port), libudt_id, request.initial_sequence_number)
    assert established.peer_socket_id == libudt_id
    assert established.local_isn == established.peer_isn == request.initial_sequence_number
    assert established.mss == 1300
    assert established.flow_window == 3000
    assert ours.received_by_connection == [Shutdown(destination_socket_id=OUR_SOCKET_ID)]


def test_a_libudt_caller_takes_a_fresh_challenge_after_a_stale_cookie(
    udt_peer: Path, udp: socket.socket
) -> None:
    # Our listener's clock jumps 3 minutes after the first challenge: the cookie libudt
    # brings back is stale, we challenge again, and 4.11 takes the new cookie.
    ours = listening(skew_after_first=180.0)
    here = udp.getsockname()
    args = ["send", "--connect", f"{here[0]}:{here[1]}", "--connect-only"]
    with run_peer(udt_peer, *args, "--timeout", PEER_TIMEOUT) as peer:
        peer.port()
        loop = Loopback(udp, peer)
        loop.run(ours, lambda: bool(ours.received_by_connection))
        assert peer.wait_exit() == 0, peer.stderr_text
    assert ours.listener.counters.wrong_peer >= 1
    challenges = [hs for hs in loop.wire.handshakes(loop.wire.sent) if hs.request_type == 1]
    assert len(challenges) >= 2
    assert challenges[0].cookie != challenges[-1].cookie
    assert len(ours.accepted) == 1


def test_a_libudt_caller_reports_our_1002_refusal(udt_peer: Path, udp: socket.socket) -> None:
    ours = listening(refuse=True)
    here = udp.getsockname()
    args = ["send", "--connect", f"{here[0]}:{here[1]}", "--connect-only"]
    with run_peer(udt_peer, *args, "--timeout", PEER_TIMEOUT) as peer:
        peer.port()
        loop = Loopback(udp, peer)
        loop.run(ours, lambda: peer.process.poll() is not None)
        assert peer.wait_exit() == 1
    assert "rejected" in peer.stderr_text, peer.stderr_text
    assert RequestType.REJECTED in loop.wire.sent_types()
    assert not ours.accepted


# --- rendezvous --------------------------------------------------------------------------


def rendezvous_with_libudt(
    udt_peer: Path,
    udp: socket.socket,
    *,
    first: str,
    extra_candidates: tuple[Endpoint, ...] = (),
) -> tuple[HandshakeEstablished, Loopback, int, UdtHandshake]:
    """One rendezvous between ``UdtHandshake.rendezvous`` and libudt; ``first`` is who hears
    the other's type-0 request first ("libudt" or "us")."""
    here = udp.getsockname()
    args = ["send", "--rendezvous", "--local", f"{LOOPBACK}:0", "--peer", f"{here[0]}:{here[1]}"]
    args += ["--connect-only", "--wait-connected", "--mss", "1400", "--timeout", PEER_TIMEOUT]
    with run_peer(udt_peer, *args) as peer:
        libudt = (LOOPBACK, peer.port())
        loop = Loopback(udp, peer)
        if first == "us":
            # libudt hears our 0 first: hold its datagrams back from our machine until one
            # shows that it heard us (anything but its own type 0).
            loop.hold_until = lambda p: not (isinstance(p, Handshake) and p.request_type == 0)
        ours = UdtHandshake.rendezvous(
            [*extra_candidates, libudt],
            socket_id=OUR_SOCKET_ID,
            isn=OUR_ISN,
            now=time.monotonic(),
        )
        if first == "libudt":
            # We hear libudt's 0 before we send anything: wait for its first request.
            with selectors.DefaultSelector() as selector:
                selector.register(udp, selectors.EVENT_READ)
                assert selector.select(EXCHANGE_TIMEOUT), "libudt sent no rendezvous request"
            loop.receive(ours)
        loop.run(ours, lambda: ours.result is not None and "connected" in peer.stderr_text)
        established = ours.result
        assert isinstance(established, HandshakeEstablished), established
        libudt_id = connected_socket_id(peer)
        assert shut_down(loop, established) == 0, peer.stderr_text
    return established, loop, libudt_id, ours


@pytest.mark.parametrize("first", ["libudt", "us"])
def test_rendezvous_with_libudt(udt_peer: Path, udp: socket.socket, first: str) -> None:
    established, loop, libudt_id, ours = rendezvous_with_libudt(udt_peer, udp, first=first)
    theirs = loop.wire.handshakes(loop.wire.received)
    assert {hs.socket_id for hs in theirs} == {libudt_id}
    assert theirs[0].request_type == RequestType.RENDEZVOUS
    assert theirs[0].destination_socket_id == 0
    # Once it has heard us, libudt addresses our socket id.
    assert all(hs.destination_socket_id == OUR_SOCKET_ID for hs in theirs if hs.request_type)
    assert established.peer_socket_id == libudt_id
    assert established.local_isn == OUR_ISN
    assert established.peer_isn == theirs[0].initial_sequence_number  # each side its own
    assert established.mss == 1400
    assert established.flow_window == 8192
    # libudt is finished by our -2 when it heard our -1 while it still said 0 (it heard
    # us first), or said -1 having heard only our 0 (we heard its 0 and -1 together and
    # were connected without sending a -1): its repeated -1 gets the -2. When both -1s
    # cross, our -1 finishes it (4.11: ours -1 and the peer's -1 connect) and nothing
    # follows. Which happens is a race on the wire (the -1 ending was seen once in about
    # twenty runs): both endings are right, and the loop above saw libudt connected.
    assert loop.wire.sent_types()[-1] in {RequestType.RESPONSE, RequestType.RENDEZVOUS_RESPONSE}
    assert ours.counters.wrong_peer == 0


def test_libudt_answers_a_late_rendezvous_handshake_with_minus_2(
    udt_peer: Path, udp: socket.socket
) -> None:
    # Connected 4.11 answers a repeated handshake with -2 from a default CHandShake:
    # version 0, socket type 0, its own ISN.
    here = udp.getsockname()
    args = ["send", "--rendezvous", "--local", f"{LOOPBACK}:0", "--peer", f"{here[0]}:{here[1]}"]
    args += ["--connect-only", "--wait-connected", "--timeout", PEER_TIMEOUT]
    with run_peer(udt_peer, *args) as peer:
        libudt = (LOOPBACK, peer.port())
        loop = Loopback(udp, peer)
        ours = UdtHandshake.rendezvous(
            [libudt], socket_id=OUR_SOCKET_ID, isn=OUR_ISN, now=time.monotonic()
        )
        loop.run(ours, lambda: ours.result is not None and "connected" in peer.stderr_text)
        established = ours.result
        assert isinstance(established, HandshakeEstablished)
        late = replace(
            loop.wire.handshakes(loop.wire.sent)[-1],
            request_type=RequestType.RESPONSE,
            destination_socket_id=established.peer_socket_id,
        )
        before = len(loop.wire.received)
        deadline = time.monotonic() + EXCHANGE_TIMEOUT
        with selectors.DefaultSelector() as selector:
            selector.register(udp, selectors.EVENT_READ)
            # Again every 0.2 s: the first may reach 4.11 before its new socket is filed.
            while not loop.wire.handshakes(loop.wire.received[before:]):
                assert time.monotonic() < deadline, peer.stderr_text
                loop.send(encode_packet(late), libudt)
                if selector.select(0.2):
                    loop.receive(ours)
        answer = loop.wire.handshakes(loop.wire.received[before:])[0]
        assert shut_down(loop, established) == 0, peer.stderr_text
    assert answer.request_type == RequestType.RENDEZVOUS_RESPONSE
    assert (answer.version, answer.socket_type) == (0, 0)
    assert answer.initial_sequence_number == established.peer_isn
    assert answer.socket_id == established.peer_socket_id
    assert answer.destination_socket_id == OUR_SOCKET_ID
    assert answer.flow_window == 25600  # its flight flag size, not min(buffer, flag)


def test_rendezvous_locks_onto_the_candidate_libudt_answers_from(
    udt_peer: Path, udp: socket.socket
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind((LOOPBACK, 0))  # a candidate that never answers
        dead: Endpoint = silent.getsockname()
        established, _, _, ours = rendezvous_with_libudt(
            udt_peer, udp, first="libudt", extra_candidates=(dead,)
        )
        assert established.peer_address != dead
        assert ours.peer_address == established.peer_address
