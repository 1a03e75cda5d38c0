"""An in-memory harness for RelayService: a hand-moved clock, connections, and request builders.

The harness plays the adapter: it feeds connections, bytes and time to the
service, keeps what every connection was sent, and checks on the way that no
action names a connection the service already let go of. The builders play the
server agent and the client with plain HTTP bytes (h11 on the client side
reads the answers), so the service is tested against the wire, not against
its own helpers.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import h11

from wavesync_proto.addresses import Endpoint
from wavesync_proto.relay import (
    CONNECT_PATH,
    STANDBY_PATH,
    UPGRADE_PROTOCOL,
    Action,
    CloseConnection,
    ConnectionHandle,
    HandOffTunnel,
    RelayLimits,
    RelayService,
    SendBytes,
    StartSplice,
    sign_standby,
)
from wavesync_proto.relay.wire import (
    ControlLine,
    Open,
    Ready,
    encode_control,
    parse_control,
)

SYSTEM_A = uuid.UUID("0a000000-0000-4000-8000-00000000000a")
SYSTEM_B = uuid.UUID("0b000000-0000-4000-8000-00000000000b")
SYSTEM_UNKNOWN = uuid.UUID("0c000000-0000-4000-8000-00000000000c")
KEY_A = "system-a-secret-key-0123"
KEY_B = "system-b-secret-key-4567"
SYSTEM_KEYS = {SYSTEM_A: KEY_A, SYSTEM_B: KEY_B}
#: Servers 1 and 2 belong to system A, server 3 to system B.
SERVER_1 = uuid.UUID("51000000-0000-4000-8000-000000000001")
SERVER_2 = uuid.UUID("52000000-0000-4000-8000-000000000002")
SERVER_3 = uuid.UUID("53000000-0000-4000-8000-000000000003")
SERVER_UNKNOWN = uuid.UUID("5f000000-0000-4000-8000-00000000000f")
SYSTEM_OF = {SERVER_1: SYSTEM_A, SERVER_2: SYSTEM_A, SERVER_3: SYSTEM_B}

RELAY_HOST = "relay.example:8443"
SERVER_ADDRESS: Endpoint = ("198.51.100.1", 40001)
CLIENT_ADDRESS: Endpoint = ("203.0.113.9", 61001)
CLIENT_V6_ADDRESS: Endpoint = ("2001:db8::9", 61002)

#: Limits under which nothing times out in the middle of a test that is not about timeouts.
PATIENT = RelayLimits(open_timeout=1000.0, pair_timeout=1000.0)

#: The harness's monotonic clock starts here, its wall clock at UNIX_START.
START = 1000.0
UNIX_START = 1_700_000_000
# More timer firings than any test needs in one advance(): beyond it the timer is stuck.
MAX_TIMER_FIRINGS = 10_000


def counting_random() -> Callable[[int], bytes]:
    """A deterministic stand-in for os.urandom: 1, 2, 3, ... as big-endian bytes."""
    counter = itertools.count(1)

    def random_bytes(size: int) -> bytes:
        return next(counter).to_bytes(size, "big")

    return random_bytes


def session_id(number: int) -> bytes:
    """The ``number``-th session id a harness service hands out (see counting_random)."""
    return number.to_bytes(16, "big")


# --- request builders -------------------------------------------------------------------------


def request_bytes(
    path: str,
    headers: Sequence[tuple[str, str]],
    *,
    host: str = RELAY_HOST,
    upgrade: bool = True,
    method: str = "GET",
) -> bytes:
    """One HTTP/1.1 request as h11 writes it (so the request itself is never the bug)."""
    http = h11.Connection(h11.CLIENT)
    all_headers = [("Host", host)]
    if upgrade:
        all_headers += [("Connection", "Upgrade"), ("Upgrade", UPGRADE_PROTOCOL)]
    all_headers += list(headers)
    request = h11.Request(method=method, target=path, headers=all_headers)
    return http.send(request) + http.send(h11.EndOfMessage())


def standby_request(
    server_id: uuid.UUID,
    *,
    nonce: bytes,
    system_id: uuid.UUID | None = None,
    key: str | None = None,
    host: str = RELAY_HOST,
    signed_host: str | None = None,
    unix_time: int = UNIX_START,
) -> bytes:
    """A signed standby request; by default signed for the Host header it carries."""
    system_id = system_id if system_id is not None else SYSTEM_OF.get(server_id, SYSTEM_A)
    credentials = sign_standby(
        key=key if key is not None else SYSTEM_KEYS.get(system_id, KEY_A),
        system_id=system_id,
        server_id=server_id,
        unix_time=unix_time,
        nonce=nonce,
        relay_host=signed_host if signed_host is not None else host,
    )
    return request_bytes(STANDBY_PATH, credentials.headers(), host=host)


def connect_request(
    server_id: uuid.UUID | None = None,
    system_id: uuid.UUID | None = None,
    *,
    host: str = RELAY_HOST,
) -> bytes:
    """A client's connect request naming a server or a system."""
    headers = []
    if server_id is not None:
        headers.append(("Wavesync-Server", str(server_id)))
    if system_id is not None:
        headers.append(("Wavesync-System", str(system_id)))
    return request_bytes(CONNECT_PATH, headers, host=host)


def ready_line(session: bytes) -> bytes:
    return encode_control(Ready(session_id=session))


# --- reading answers --------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Answer:
    """One relay answer as a client reads it with h11."""

    status: int
    #: Lower-case header name → value.
    headers: dict[str, str]
    body: bytes
    #: Bytes after a 101 (the tunnel's first bytes); empty for other answers.
    trailing: bytes


def parse_answer(data: bytes) -> Answer:
    """Read one complete answer; fails the test if it is not exactly one HTTP/1.1 answer."""
    assert data, "no answer at all"  # (h11 would take b"" for the end of the stream)
    http = h11.Connection(h11.CLIENT)
    http.send(
        h11.Request(
            method="GET",
            target=CONNECT_PATH,
            headers=[
                ("Host", RELAY_HOST),
                ("Connection", "Upgrade"),
                ("Upgrade", UPGRADE_PROTOCOL),
            ],
        )
    )
    http.send(h11.EndOfMessage())
    http.receive_data(data)
    response: h11.Response | None = None
    body = bytearray()
    for _ in range(len(data) + 3):
        event = http.next_event()
        if isinstance(event, h11.InformationalResponse):
            assert event.status_code == 101, event
            return Answer(
                status=101,
                headers=_headers(event.headers),
                body=b"",
                trailing=bytes(http.trailing_data[0]),
            )
        if isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert response is not None
            assert http.trailing_data[0] == b"", "bytes after an error answer"
            return Answer(
                status=response.status_code,
                headers=_headers(response.headers),
                body=bytes(body),
                trailing=b"",
            )
        else:
            raise AssertionError(f"incomplete answer: {event!r} after {data!r}")
    raise AssertionError(f"no answer in {data!r}")


def _headers(headers: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    return {name.decode("ascii"): value.decode("latin-1") for name, value in headers}


def control_lines(data: bytes) -> list[ControlLine]:
    """Every control line in ``data`` (which must end with a whole line)."""
    assert not data or data.endswith(b"\r\n"), data
    return [parse_control(line) for line in data.split(b"\r\n")[:-1]]


# --- the adapter ------------------------------------------------------------------------------


@dataclass
class Harness:
    """Plays the adapter: one service, a hand-moved clock, and what each connection got."""

    service: RelayService
    now: float = START
    #: The wall clock the harness passes as ``unix_time`` (it moves with ``now``).
    unix_offset: float = UNIX_START - START
    #: Bytes written to each connection and not yet read by the test.
    outbox: dict[ConnectionHandle, bytearray] = field(default_factory=dict)
    #: Connections the service closed, with the reason.
    closed: dict[ConnectionHandle, str] = field(default_factory=dict)
    #: Every splice, by session id.
    splices: dict[bytes, StartSplice] = field(default_factory=dict)
    #: Connections the adapter holds open (made, not lost, not closed, not spliced).
    live: set[ConnectionHandle] = field(default_factory=set)
    #: Connections ever made: a handle is never reused.
    seen: set[ConnectionHandle] = field(default_factory=set)
    actions: list[Action] = field(default_factory=list)
    _nonces: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    @classmethod
    def create(
        cls,
        limits: RelayLimits | None = None,
        *,
        host_names: Sequence[str] | None = None,
        systems: dict[uuid.UUID, str] | None = None,
    ) -> Harness:
        service = RelayService(
            systems if systems is not None else SYSTEM_KEYS,
            limits=limits,
            host_names=host_names,
            random_bytes=counting_random(),
        )
        return cls(service=service)

    @property
    def unix_time(self) -> float:
        return self.now + self.unix_offset

    def next_nonce(self) -> bytes:
        return next(self._nonces).to_bytes(16, "big")

    # --- the adapter's side -------------------------------------------------------------------

    def record(self, actions: list[Action]) -> list[Action]:
        """Carry out ``actions`` as an adapter would, checking each one's target is live."""
        for action in actions:
            self.actions.append(action)
            if isinstance(action, SendBytes):
                assert action.connection in self.live, f"write to a gone connection: {action}"
                self.outbox[action.connection] += action.data
            elif isinstance(action, CloseConnection):
                assert action.connection in self.live, f"close of a gone connection: {action}"
                self.live.discard(action.connection)
                self.closed[action.connection] = action.reason
            elif isinstance(action, HandOffTunnel):
                assert action.connection in self.live, f"hand-off of a gone connection: {action}"
                self.live.discard(action.connection)
            else:
                assert action.client != action.server
                assert action.client in self.live, f"splice of a gone client: {action}"
                assert action.server in self.live, f"splice of a gone server: {action}"
                assert action.session_id not in self.splices, "a session id used twice"
                self.live -= {action.client, action.server}
                self.splices[action.session_id] = action
        for action in actions:
            if isinstance(action, CloseConnection):
                # The adapter reports the close it carried out: the service has forgotten it.
                assert self.service.connection_lost(action.connection, self.now) == []
        return actions

    def connect(self, handle: ConnectionHandle, remote: Endpoint = CLIENT_ADDRESS) -> list[Action]:
        assert handle not in self.seen, f"handle {handle!r} reused"
        self.seen.add(handle)
        self.live.add(handle)
        self.outbox[handle] = bytearray()
        return self.record(self.service.connection_made(handle, remote, self.now))

    def send(
        self, handle: ConnectionHandle, data: bytes, *, unix_time: float | None = None
    ) -> list[Action]:
        assert handle in self.live, f"send on a gone connection {handle!r}"
        when = self.unix_time if unix_time is None else unix_time
        return self.record(self.service.data_received(handle, data, self.now, unix_time=when))

    def lose(self, handle: ConnectionHandle) -> list[Action]:
        """The peer went away."""
        assert handle in self.live, f"lose of a gone connection {handle!r}"
        self.live.discard(handle)
        return self.record(self.service.connection_lost(handle, self.now))

    def end_splice(self, session: bytes) -> None:
        self.service.splice_ended(session, self.now)

    def advance(self, seconds: float) -> list[Action]:
        """Move the clock, firing every timer that falls due on the way, as an adapter would."""
        target = self.now + seconds
        actions: list[Action] = []
        for _ in range(MAX_TIMER_FIRINGS):
            deadline = self.service.get_timer()
            if deadline is None or deadline > target:
                break
            self.now = max(self.now, deadline)
            actions += self.record(self.service.handle_timer(self.now))
        else:  # a timer that fires without moving would hang the adapter too
            raise AssertionError(f"timer stuck at {self.service.get_timer()}")
        self.now = target
        return actions

    # --- reading what connections got ---------------------------------------------------------

    def read(self, handle: ConnectionHandle) -> bytes:
        """What the service wrote to ``handle`` since the last read."""
        data = bytes(self.outbox[handle])
        self.outbox[handle].clear()
        return data

    def answer(self, handle: ConnectionHandle) -> Answer:
        """The one HTTP answer ``handle`` got (and, for a 101, what followed it)."""
        return parse_answer(self.read(handle))

    def refused(self, handle: ConnectionHandle) -> Answer:
        """The error answer ``handle`` got; it must have been closed after it."""
        answer = self.answer(handle)
        assert answer.status >= 400, answer
        assert handle in self.closed
        assert handle not in self.live
        return answer

    def lines(self, handle: ConnectionHandle) -> list[ControlLine]:
        return control_lines(self.read(handle))

    def opened(self, standby: ConnectionHandle) -> Open:
        """The one OPEN line ``standby`` got since the last read."""
        [line] = self.lines(standby)
        assert isinstance(line, Open), line
        return line

    # --- a server agent's and a client's side -------------------------------------------------

    def standby(
        self,
        handle: ConnectionHandle,
        server_id: uuid.UUID,
        *,
        remote: Endpoint = SERVER_ADDRESS,
        system_id: uuid.UUID | None = None,
        key: str | None = None,
        host: str = RELAY_HOST,
        signed_host: str | None = None,
        unix_time: int | None = None,
        nonce: bytes | None = None,
    ) -> list[Action]:
        """Connect and send a signed standby request (fresh, with a new nonce, unless told
        otherwise); return the request's actions."""
        self.connect(handle, remote)
        data = standby_request(
            server_id,
            nonce=nonce if nonce is not None else self.next_nonce(),
            system_id=system_id,
            key=key,
            host=host,
            signed_host=signed_host,
            unix_time=unix_time if unix_time is not None else int(self.unix_time),
        )
        return self.send(handle, data)

    def idle_standby(
        self,
        handle: ConnectionHandle,
        server_id: uuid.UUID,
        *,
        system_id: uuid.UUID | None = None,
        key: str | None = None,
        unix_time: int | None = None,
        nonce: bytes | None = None,
    ) -> None:
        """A standby connection that the relay accepted and holds idle."""
        self.standby(
            handle, server_id, system_id=system_id, key=key, unix_time=unix_time, nonce=nonce
        )
        answer = self.answer(handle)
        assert answer.status == 101, answer
        assert answer.trailing == b""

    def client(
        self,
        handle: ConnectionHandle,
        server_id: uuid.UUID | None = None,
        system_id: uuid.UUID | None = None,
        *,
        early: bytes = b"",
        remote: Endpoint = CLIENT_ADDRESS,
    ) -> list[Action]:
        """Connect and send a connect request (and ``early`` bytes in the same read)."""
        self.connect(handle, remote)
        return self.send(handle, connect_request(server_id, system_id) + early)

    def ready(
        self, standby: ConnectionHandle, after: bytes = b"", *, session: bytes | None = None
    ) -> StartSplice:
        """Answer the OPEN ``standby`` got (read here unless ``session`` is given) with
        READY, and ``after`` in the same read; return the splice that follows."""
        if session is None:
            session = self.opened(standby).session_id
        actions = self.send(standby, ready_line(session) + after)
        [splice] = [a for a in actions if isinstance(a, StartSplice)]
        assert splice.session_id == session
        assert splice.server == standby
        return splice


def splice_answer(splice: StartSplice) -> Answer:
    """The 101 that a splice writes to its client (and the server's bytes after it)."""
    return parse_answer(splice.to_client)
