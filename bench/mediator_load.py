"""A cheap connect-handshake load for the mediator daemon: raw sockets, pre-encoded templates.

``mediator.py``'s "machines" rows drive the daemon with the full ``ListenSession`` and
``ConnectRequest`` state machines on anyio. That load costs as much CPU per handshake as the
mediator itself, so on a two-core machine it, not the mediator, sets the wall-clock rate.
This process puts the same traffic on the wire for less, and checks every answer:

- Registration is the real thing and is not timed: each server runs ``ListenSession`` over
  a blocking TCP socket through the 401 challenge and the signed listen.
- Every handshake has a fresh random connect session id and transaction id. The client's
  datagram is the padded connect ``ConnectRequest`` sends, with those two patched in.
- A server reads connection_requested off its TCP session (STUN framing, message type,
  CONNECT-SESSION-ID one this load sent to that very server, PEER-UDP-ENDPOINT the client's
  socket) and answers from its own UDP socket with a connection_ack: a template patched the
  same way, its MESSAGE-INTEGRITY-SHA256 an HMAC-SHA256 computed afresh under the server's
  key. At start-up every server's template is checked byte for byte against what
  ``ListenSession.connection_ack`` encodes for the same ids.
- The ack's answer must be a success with the ack's transaction id, signed with the server's
  key, and name the server's UDP socket.
- The client's connect_response must be a success with its transaction id, on the socket
  that asked, naming the target server and system and the UDP endpoint the server acked from.

It does not retransmit (a lost datagram is counted as a failure), send the TCP copy of a
connect, send keep-alives (a run lasts seconds; a server is dead after 75 s of silence) or
report connection_result. Each client socket runs one handshake at a time, as a real client.

``mediator.py`` starts it with ``raw_load_in_process``; it prints ``registered`` once its
servers are online, waits for ``go`` on stdin, then prints one ``result`` line of JSON.
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import select
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
from anyio.streams.buffered import BufferedByteReceiveStream

from mediator_fixture import SYSTEM_ID, SYSTEM_KEY, new_session, server_id
from wavesync_proto.addresses import Endpoint
from wavesync_proto.mediator.attributes import MediatorAttributeType
from wavesync_proto.mediator.auth import DEFAULT_REALM, credential_key
from wavesync_proto.mediator.connect import ConnectRequest
from wavesync_proto.mediator.listen import ListenSession, Registered
from wavesync_proto.mediator.messages import Connect, MediatorMethod, parse_mediator_message
from wavesync_proto.stun import Message, MessageClass, decode_message, encode_message
from wavesync_proto.stun.attribute_codecs import pack_xor_address
from wavesync_proto.stun.attributes import MAGIC_COOKIE, AttributeType

__all__ = ["RawLoad", "raw_load_in_process"]

_ATTRIBUTE_HEADER = struct.Struct("!HH")
_COOKIE = MAGIC_COOKIE.to_bytes(4, "big")
_INTEGRITY = AttributeType.MESSAGE_INTEGRITY_SHA256
_INTEGRITY_HEADER = _ATTRIBUTE_HEADER.pack(_INTEGRITY, 32)
_SESSION_ID = MediatorAttributeType.CONNECT_SESSION_ID
_SERVER_ID = MediatorAttributeType.SERVER_ID
_SYSTEM_ID = MediatorAttributeType.SYSTEM_ID
_UDP_ENDPOINT = MediatorAttributeType.UDP_ENDPOINT
_PEER_UDP_ENDPOINT = MediatorAttributeType.PEER_UDP_ENDPOINT
_MAPPED = AttributeType.XOR_MAPPED_ADDRESS
#: A load process that hears nothing for this long has lost what it is waiting for.
_IDLE_SECONDS = 5.0


def _type_bytes(method: int, message_class: MessageClass) -> bytes:
    """The first two bytes of a message of this method and class, as the codec writes them."""
    return encode_message(
        Message(message_class=message_class, method=method, transaction_id=bytes(12))
    )[:2]


_CONNECT_SUCCESS = _type_bytes(MediatorMethod.CONNECT, MessageClass.SUCCESS)
_ACK_SUCCESS = _type_bytes(MediatorMethod.CONNECTION_ACK, MessageClass.SUCCESS)
_REQUESTED = _type_bytes(MediatorMethod.CONNECTION_REQUESTED, MessageClass.INDICATION)


# --- what the parent process sees --------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class RawLoad:
    """One raw-load run; every count but ``succeeded`` and ``acks_verified`` must be 0."""

    registration: float
    """Wall-clock seconds to register the servers (ListenSession, one after the other)."""
    handshakes: int
    seconds: float
    """Wall clock from the first connect sent to the last connect_response checked."""
    load_cpu: float
    """CPU seconds the load process spent meanwhile."""
    daemon_cpu: float
    """CPU seconds the daemon's process spent meanwhile (filled in by the parent)."""
    succeeded: int
    failed: int
    """connect answers that were errors or named the wrong server, system or endpoint."""
    unanswered: int
    """connects with no answer at all (no retransmission here)."""
    unexpected: int
    """Datagrams or TCP messages that were not what this load was waiting for."""
    acks_verified: int
    acks_bad: int
    """Ack answers that failed a check, or never came."""

    @property
    def valid(self) -> bool:
        """Every handshake succeeded and nothing else went wrong: the rate counts."""
        return (
            self.succeeded == self.handshakes
            and self.acks_verified == self.handshakes
            and self.failed == self.unanswered == self.unexpected == self.acks_bad == 0
        )

    @property
    def problems(self) -> str:
        return (
            f"{self.failed} failed, {self.unanswered} unanswered, {self.unexpected} unexpected,"
            f" {self.acks_bad} bad or missing ack answers"
        )


async def raw_load_in_process(
    mediator: Endpoint, servers: int, handshakes: int, clients: int, first: int
) -> RawLoad:
    """Run this module as a second process against ``mediator``, served by this process.

    The daemon's CPU is read from the ``go`` to the result, so it covers the handshakes
    only (and the last pipe round trip), not the registrations.
    """
    command = [
        sys.executable, str(Path(__file__)), f"{mediator[0]}:{mediator[1]}",
        "--servers", str(servers), "--handshakes", str(handshakes),
        "--clients", str(clients), "--first-server", str(first),
    ]  # fmt: skip
    async with await anyio.open_process(command) as process:
        assert process.stdin is not None
        assert process.stdout is not None
        assert process.stderr is not None
        lines = BufferedByteReceiveStream(process.stdout)
        try:
            ready = await lines.receive_until(b"\n", 1024)
            assert ready.startswith(b"registered"), ready
            cpu = time.process_time()
            await process.stdin.send(b"go\n")
            answer = await lines.receive_until(b"\n", 65536)
            daemon_cpu = time.process_time() - cpu
        except (anyio.IncompleteRead, anyio.EndOfStream):
            with anyio.move_on_after(5):
                await process.wait()
            tail = b"".join([chunk async for chunk in process.stderr])
            raise RuntimeError(f"raw load process failed:\n{tail.decode()}") from None
        await process.wait()
    kind, _, payload = answer.partition(b" ")
    assert kind == b"result", answer
    return RawLoad(**{**json.loads(payload), "daemon_cpu": daemon_cpu})


# --- templates ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    """An encoded request cut around its transaction id and connect session id.

    ``head + transaction id + middle + session id + tail`` is the request with new ids.
    """

    head: bytes
    middle: bytes
    tail: bytes

    @classmethod
    def cut(cls, encoded: bytes, session_id: bytes) -> Template:
        at = encoded.index(session_id)
        assert at >= 20, "the session id is in the header"
        assert encoded.count(session_id) == 1, "the session id is there twice"
        return cls(encoded[:8], encoded[20:at], encoded[at + 16 :])

    def fill(self, transaction_id: bytes, session_id: bytes) -> bytes:
        return b"".join((self.head, transaction_id, self.middle, session_id, self.tail))


def connect_template(target: int) -> Template:
    """The padded UDP connect ``ConnectRequest`` sends to server ``target``."""
    request = ConnectRequest(server_id=server_id(target), now=0.0)
    [datagram] = request.datagrams_to_send(0.0)
    return Template.cut(datagram, request.connect_session_id)


def ack_template(session: ListenSession, key: bytes) -> Template:
    """The server's connection_ack without its MAC, checked against ``ListenSession``'s."""
    session_id = os.urandom(16)
    [reference] = session.connection_ack(session_id, 0.0).messages_to_send(0.0)
    assert reference[-36:-32] == _INTEGRITY_HEADER, "the ack no longer ends with its MAC"
    template = Template.cut(reference[:-36], session_id)
    assert sign(template, key, reference[8:20], session_id) == reference
    return template


def sign(template: Template, key: bytes, transaction_id: bytes, session_id: bytes) -> bytes:
    """The template with new ids and MESSAGE-INTEGRITY-SHA256 computed for them."""
    # The template's length field already counts the MAC and nothing follows it, so
    # the HMAC input is exactly the bytes before the attribute (RFC 8489 §14.6).
    covered = template.fill(transaction_id, session_id)
    return covered + _INTEGRITY_HEADER + hmac.digest(key, covered, "sha256")


def attribute_spans(data: bytes) -> dict[int, tuple[int, int]] | None:
    """Where the first value of each attribute type sits; None if not one framed STUN message."""
    size = len(data)
    if size < 20 or data[4:8] != _COOKIE or 20 + int.from_bytes(data[2:4]) != size:
        return None
    spans: dict[int, tuple[int, int]] = {}
    position = 20
    while position < size:
        if position + 4 > size:
            return None
        kind, length = _ATTRIBUTE_HEADER.unpack_from(data, position)
        start = position + 4
        if start + length > size:
            return None
        spans.setdefault(kind, (start, start + length))
        position = start + ((length + 3) & ~3)
    return spans


def value(data: bytes, spans: dict[int, tuple[int, int]], kind: int) -> bytes | None:
    span = spans.get(kind)
    return None if span is None else data[span[0] : span[1]]


def signed_with(data: bytes, spans: dict[int, tuple[int, int]], key: bytes) -> bool:
    """Whether MESSAGE-INTEGRITY-SHA256 holds (full length, anything after it not covered)."""
    span = spans.get(_INTEGRITY)
    if span is None or span[1] - span[0] != 32:
        return False
    at = span[0] - 4
    covered = data[:2] + (at + 36 - 20).to_bytes(2, "big") + data[4:at]
    return hmac.compare_digest(hmac.digest(key, covered, "sha256"), data[span[0] : span[1]])


# --- the load process ------------------------------------------------------------------------


def xor_endpoint(address: tuple[str, int]) -> bytes:
    # An IPv4 XOR address does not depend on the transaction id (RFC 8489 §14.2), so one
    # encoding per socket is the value every answer must carry.
    assert "." in address[0], "loopback over IPv4 only"
    return pack_xor_address("bench", (address[0], address[1]), bytes(12))


@dataclass(eq=False)
class RawServer:
    """A registered server: its TCP session, its punching UDP socket, its signed-ack template."""

    tcp: socket.socket
    udp: socket.socket
    key: bytes
    server_id: bytes
    ack: Template
    connect: Template
    #: This server's UDP socket as a UDP-ENDPOINT / XOR-MAPPED-ADDRESS value.
    udp_endpoint: bytes
    buffer: bytearray


def register(number: int, mediator: Endpoint) -> RawServer:
    """The full 401 + signed listen through ``ListenSession`` on a blocking socket."""
    tcp = socket.create_connection(mediator)
    tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    session = new_session(number, time.monotonic())
    session.connection_made(time.monotonic())
    while not session.registered:
        if data := session.data_to_send():
            tcp.sendall(data)
        data = tcp.recv(65536)
        assert data, f"server {number}: the mediator closed the session"
        session.data_received(data, time.monotonic())
    event = session.next_event()
    assert isinstance(event, Registered), event
    tcp.setblocking(False)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.connect(mediator)
    udp.setblocking(False)
    key = credential_key(str(server_id(number)), DEFAULT_REALM, SYSTEM_KEY)
    connect = connect_template(number)
    # One patched connect through the real decoder: the ids land where Connect reads them.
    fresh = os.urandom(28)
    patched = decode_message(connect.fill(fresh[:12], fresh[12:]))
    parsed = parse_mediator_message(patched)
    assert isinstance(parsed, Connect), parsed
    assert patched.transaction_id == fresh[:12]
    assert parsed.connect_session_id == fresh[12:]
    assert parsed.server_id == server_id(number)
    return RawServer(
        tcp=tcp,
        udp=udp,
        key=key,
        server_id=server_id(number).bytes,
        ack=ack_template(session, key),
        connect=connect,
        udp_endpoint=xor_endpoint(udp.getsockname()),
        buffer=bytearray(),
    )


class RawRun:
    """The timed part: ``clients`` sockets, one handshake each at a time, round robin targets."""

    def __init__(self, servers: list[RawServer], clients: int, total: int, mediator: Endpoint):
        self.servers = servers
        self.total = total
        self.clients: list[socket.socket] = []
        for _ in range(clients):
            client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            client.bind(("127.0.0.1", 0))
            client.connect(mediator)
            client.setblocking(False)
            self.clients.append(client)
        self.client_endpoints = [xor_endpoint(c.getsockname()) for c in self.clients]
        self.system_id = SYSTEM_ID.bytes
        self.started = self.answered = 0
        self.succeeded = self.failed = self.unexpected = 0
        self.acks_verified = self.acks_bad = 0
        #: connect transaction id -> (client, server)
        self.connects: dict[bytes, tuple[int, int]] = {}
        #: connect session id -> (client, server), until the server has been told
        self.sessions: dict[bytes, tuple[int, int]] = {}
        #: ack transaction id -> server, until its answer
        self.acks: dict[bytes, int] = {}

    def start(self, client: int) -> None:
        if self.started == self.total:
            return
        target = self.started % len(self.servers)
        self.started += 1
        fresh = os.urandom(28)
        transaction_id, session_id = fresh[:12], fresh[12:]
        self.connects[transaction_id] = (client, target)
        self.sessions[session_id] = (client, target)
        self.clients[client].send(self.servers[target].connect.fill(transaction_id, session_id))

    def client_readable(self, client: int) -> None:
        sock = self.clients[client]
        while True:
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                return
            entry = self.connects.pop(data[8:20], None)
            if entry is None or entry[0] != client:
                self.unexpected += 1
                continue
            server = self.servers[entry[1]]
            spans = attribute_spans(data)
            if (
                spans is not None
                and data[:2] == _CONNECT_SUCCESS
                and value(data, spans, _SERVER_ID) == server.server_id
                and value(data, spans, _SYSTEM_ID) == self.system_id
                and value(data, spans, _UDP_ENDPOINT) == server.udp_endpoint
                and value(data, spans, _MAPPED) == self.client_endpoints[client]
            ):
                self.succeeded += 1
            else:
                self.failed += 1
            self.answered += 1
            self.start(client)

    def tcp_readable(self, number: int) -> None:
        server = self.servers[number]
        data = server.tcp.recv(65536)
        if not data:
            raise ConnectionError(f"the mediator closed server {number}'s session")
        buffer = server.buffer
        buffer += data
        while len(buffer) >= 20:
            length = 20 + int.from_bytes(buffer[2:4])
            if len(buffer) < length:
                return
            message = bytes(buffer[:length])
            del buffer[:length]
            spans = attribute_spans(message)
            session_id = None if spans is None else value(message, spans, _SESSION_ID)
            entry = None if session_id is None else self.sessions.pop(session_id, None)
            if (
                entry is None
                or spans is None
                or session_id is None
                or message[:2] != _REQUESTED
                or entry[1] != number
                or value(message, spans, _PEER_UDP_ENDPOINT) != self.client_endpoints[entry[0]]
            ):
                self.unexpected += 1
                continue
            transaction_id = os.urandom(12)
            self.acks[transaction_id] = number
            server.udp.send(sign(server.ack, server.key, transaction_id, session_id))

    def udp_readable(self, number: int) -> None:
        server = self.servers[number]
        while True:
            try:
                data = server.udp.recv(4096)
            except BlockingIOError:
                return
            spans = attribute_spans(data)
            if (
                self.acks.pop(data[8:20], None) == number
                and spans is not None
                and data[:2] == _ACK_SUCCESS
                and value(data, spans, _MAPPED) == server.udp_endpoint
                and signed_with(data, spans, server.key)
            ):
                self.acks_verified += 1
            else:
                self.acks_bad += 1

    def run(self) -> tuple[float, float]:
        """Every handshake; wall-clock and CPU seconds, until the last connect is answered."""
        poller = select.epoll()
        handlers: dict[int, tuple[Callable[[int], None], int]] = {}
        for index, client in enumerate(self.clients):
            handlers[client.fileno()] = (self.client_readable, index)
        for index, server in enumerate(self.servers):
            handlers[server.tcp.fileno()] = (self.tcp_readable, index)
            handlers[server.udp.fileno()] = (self.udp_readable, index)
        for fd in handlers:
            poller.register(fd, select.EPOLLIN)
        start, cpu = time.perf_counter(), time.process_time()
        for index in range(len(self.clients)):
            self.start(index)
        while self.answered < self.total and self.poll(poller, handlers):
            pass
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        # Untimed: the answers to the last acks may still be on their way.
        while self.acks and self.poll(poller, handlers):
            pass
        poller.close()
        return elapsed, cpu

    def poll(
        self, poller: select.epoll, handlers: dict[int, tuple[Callable[[int], None], int]]
    ) -> bool:
        """Handle what is readable; False once nothing has come for ``_IDLE_SECONDS``."""
        events = poller.poll(_IDLE_SECONDS)
        for fd, _ in events:
            handler, index = handlers[fd]
            handler(index)
        return bool(events)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("mediator", metavar="HOST:PORT")
    parser.add_argument("--servers", type=int, default=200)
    parser.add_argument("--handshakes", type=int, default=20_000)
    parser.add_argument("--clients", type=int, default=32, help="client sockets")
    parser.add_argument("--first-server", type=int, default=0, help="number of the first server")
    args = parser.parse_args()
    host, port = args.mediator.rsplit(":", 1)
    mediator = (host, int(port))

    start = time.perf_counter()
    numbers = range(args.first_server, args.first_server + args.servers)
    servers = [register(number, mediator) for number in numbers]
    registration = time.perf_counter() - start
    print("registered", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    run = RawRun(servers, args.clients, args.handshakes, mediator)
    seconds, load_cpu = run.run()
    result = {
        "registration": registration,
        "handshakes": args.handshakes,
        "seconds": seconds,
        "load_cpu": load_cpu,
        "succeeded": run.succeeded,
        "failed": run.failed,
        "unanswered": args.handshakes - run.answered,
        "unexpected": run.unexpected,
        "acks_verified": run.acks_verified,
        "acks_bad": run.acks_bad + len(run.acks),
    }
    print("result", json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
