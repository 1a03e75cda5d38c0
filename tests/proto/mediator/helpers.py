"""An in-memory harness for MediatorService: a hand-moved clock, peers, and message builders.

The harness plays the adapter: it feeds bytes and time to the service and
keeps every action. The builders play servers and clients, through the same
public API they will use (typed messages, ``auth.sign_listen``/``sign_ack``).
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from wavesync_proto.addresses import Endpoint
from wavesync_proto.mediator.auth import DEFAULT_REALM, credential_key, sign_ack, sign_listen
from wavesync_proto.mediator.messages import (
    Connect,
    ConnectionAck,
    ConnectionResult,
    Listen,
    MediatorMessage,
    parse_mediator_message,
)
from wavesync_proto.mediator.service import (
    Action,
    CloseTcp,
    MediatorLimits,
    MediatorService,
    PeerHandle,
    SendDatagram,
    SendTcp,
)
from wavesync_proto.stun import (
    Message,
    MessageClass,
    Nonce,
    RawAttribute,
    decode_message,
    encode_message,
)

SYSTEM_A = uuid.UUID("0a000000-0000-4000-8000-00000000000a")
SYSTEM_B = uuid.UUID("0b000000-0000-4000-8000-00000000000b")
SYSTEM_UNKNOWN = uuid.UUID("0c000000-0000-4000-8000-00000000000c")
KEY_A = "system-a-secret-key-0123"
KEY_B = "system-b-secret-key-4567"
SERVER_1 = uuid.UUID("51000000-0000-4000-8000-000000000001")
SERVER_2 = uuid.UUID("52000000-0000-4000-8000-000000000002")
SERVER_3 = uuid.UUID("53000000-0000-4000-8000-000000000003")
NONCE_SECRET = b"nonce-secret-for-tests-000000000"
RELAYS = ("https://relay-1.example/", "https://relay-2.example/")

SERVER_1_PUBLIC: Endpoint = ("198.51.100.1", 40001)
SERVER_2_PUBLIC: Endpoint = ("198.51.100.2", 40002)
SERVER_1_PUNCH: Endpoint = ("198.51.100.1", 50001)
CLIENT_UDP: Endpoint = ("203.0.113.9", 61000)
CLIENT_TCP: Endpoint = ("203.0.113.9", 61001)
LOCAL: tuple[Endpoint, ...] = (("10.0.0.5", 8000), ("fd00::5", 8000))
FORWARDED: tuple[Endpoint, ...] = (("198.51.100.1", 8443),)

#: What the client pads its UDP connect to, so a full answer fits three times over.
PADDED_CONNECT_SIZE = 576
PADDING_TYPE = 0xC005

SYSTEM_KEYS = {SYSTEM_A: KEY_A, SYSTEM_B: KEY_B}
# More timer firings than any test needs in one advance(): beyond it the timer is stuck.
MAX_TIMER_FIRINGS = 10_000


def server_key(server_id: uuid.UUID, system_key: str = KEY_A) -> bytes:
    return credential_key(str(server_id), DEFAULT_REALM, system_key)


def counting_random() -> Callable[[int], bytes]:
    """A deterministic stand-in for os.urandom: 1, 2, 3, ... as big-endian bytes."""
    counter = itertools.count(1)

    def random_bytes(size: int) -> bytes:
        return next(counter).to_bytes(size, "big")

    return random_bytes


def tid(label: str) -> bytes:
    """A readable 12-byte transaction id."""
    encoded = label.encode()
    assert len(encoded) <= 12
    return encoded.ljust(12, b".")


def session_id(number: int) -> bytes:
    return number.to_bytes(16, "big")


# --- message builders -------------------------------------------------------------------------


def listen_message(
    server_id: uuid.UUID,
    system_id: uuid.UUID = SYSTEM_A,
    *,
    transaction_id: bytes = b"listen-00001",
    local: tuple[Endpoint, ...] = (),
    forwarded: tuple[Endpoint, ...] = (),
) -> Message:
    listen = Listen(
        system_id=system_id,
        server_id=server_id,
        local_endpoints=local,
        forwarded_endpoints=forwarded,
    )
    return listen.to_stun(transaction_id)


def signed_listen(message: Message, nonce: str, *, key: bytes, username: str) -> bytes:
    return sign_listen(message, username=username, realm=DEFAULT_REALM, nonce=nonce, key=key)


def connect_bytes(
    number: int,
    *,
    transaction_id: bytes,
    server_id: uuid.UUID | None = None,
    system_id: uuid.UUID | None = None,
    pad_to: int | None = None,
) -> bytes:
    """A connect request; ``pad_to`` adds the optional PADDING attribute up to that size."""
    message = Connect(
        connect_session_id=session_id(number), server_id=server_id, system_id=system_id
    ).to_stun(transaction_id)
    if pad_to is not None:
        unpadded = len(encode_message(message))
        padding = RawAttribute(PADDING_TYPE, bytes(pad_to - unpadded - 4))
        message = Message(
            message_class=message.message_class,
            method=message.method,
            transaction_id=transaction_id,
            attributes=(*message.attributes, padding),
        )
    data = encode_message(message)
    assert pad_to is None or len(data) == pad_to
    return data


def ack_bytes(
    number: int,
    server_id: uuid.UUID,
    *,
    transaction_id: bytes,
    key: bytes | None = None,
    username: str | None = None,
) -> bytes:
    message = ConnectionAck(connect_session_id=session_id(number), server_id=server_id).to_stun(
        transaction_id
    )
    return sign_ack(
        message,
        username=username if username is not None else str(server_id),
        key=key if key is not None else server_key(server_id),
    )


def result_bytes(number: int, path: int, *, transaction_id: bytes, duration_ms: int = 120) -> bytes:
    result = ConnectionResult(
        connect_session_id=session_id(number), path=path, duration_ms=duration_ms
    )
    return encode_message(result.to_stun(transaction_id))


# --- reading actions --------------------------------------------------------------------------


def decoded(data: bytes) -> Message:
    return decode_message(data)


def typed(data: bytes) -> MediatorMessage:
    return parse_mediator_message(decode_message(data))


def sent_tcp(actions: Iterable[Action], peer: PeerHandle) -> list[bytes]:
    return [a.data for a in actions if isinstance(a, SendTcp) and a.peer == peer]


def sent_udp(actions: Iterable[Action], address: Endpoint) -> list[bytes]:
    return [a.data for a in actions if isinstance(a, SendDatagram) and a.address == address]


def closed(actions: Iterable[Action]) -> dict[PeerHandle, str]:
    return {a.peer: a.reason for a in actions if isinstance(a, CloseTcp)}


def only(actions: list[Action]) -> Action:
    assert len(actions) == 1, actions
    return actions[0]


def error_of(data: bytes) -> tuple[int, str]:
    message = decode_message(data)
    assert message.message_class is MessageClass.ERROR
    error = message.error_code
    assert error is not None
    return error.code, error.reason


@dataclass
class Harness:
    """Plays the adapter: one service, a hand-moved clock and a log of every action."""

    service: MediatorService
    now: float = 1000.0

    @classmethod
    def create(
        cls,
        *,
        limits: MediatorLimits | None = None,
        software: str | None = None,
        relay_urls: tuple[str, ...] = (),
        now: float = 1000.0,
    ) -> Harness:
        service = MediatorService(
            systems=SYSTEM_KEYS,
            relay_urls=relay_urls,
            nonce_secret=NONCE_SECRET,
            limits=limits if limits is not None else MediatorLimits(),
            software=software,
            random_bytes=counting_random(),
        )
        return cls(service=service, now=now)

    # --- the adapter's side -------------------------------------------------------------------

    def udp(self, data: bytes, source: Endpoint) -> list[Action]:
        return self.service.datagram_received(data, source, self.now)

    def connect_peer(self, peer: PeerHandle, remote: Endpoint) -> list[Action]:
        return self.service.tcp_connected(peer, remote, self.now)

    def tcp(self, peer: PeerHandle, data: bytes) -> list[Action]:
        return self.service.tcp_data_received(peer, data, self.now)

    def tcp_closed(self, peer: PeerHandle) -> list[Action]:
        return self.service.tcp_closed(peer, self.now)

    def advance(self, seconds: float) -> list[Action]:
        """Move the clock, firing every timer that falls due on the way, as an adapter would."""
        target = self.now + seconds
        actions: list[Action] = []
        for _ in range(MAX_TIMER_FIRINGS):
            deadline = self.service.get_timer()
            if deadline is None or deadline > target:
                break
            self.now = max(self.now, deadline)
            actions += self.service.handle_timer(self.now)
        else:  # a timer that fires without moving would hang the adapter too
            raise AssertionError(f"timer stuck at {self.service.get_timer()}")
        self.now = target
        return actions

    # --- a server's side ----------------------------------------------------------------------

    def register(
        self,
        peer: PeerHandle,
        server_id: uuid.UUID,
        *,
        system_id: uuid.UUID = SYSTEM_A,
        remote: Endpoint = SERVER_1_PUBLIC,
        local: tuple[Endpoint, ...] = (),
        forwarded: tuple[Endpoint, ...] = (),
        connect: bool = True,
    ) -> list[Action]:
        """Connect (optionally) and run the 401-then-signed listen; return the last actions."""
        if connect:
            assert self.connect_peer(peer, remote) == []
        message = listen_message(server_id, system_id, local=local, forwarded=forwarded)
        challenge = sent_tcp(self.tcp(peer, encode_message(message)), peer)
        nonce = decode_message(challenge[0]).get(Nonce)
        assert nonce is not None
        retry = listen_message(
            server_id,
            system_id,
            transaction_id=b"listen-00002",
            local=local,
            forwarded=forwarded,
        )
        key = server_key(server_id, SYSTEM_KEYS[system_id])
        return self.tcp(peer, signed_listen(retry, nonce.value, key=key, username=str(server_id)))
