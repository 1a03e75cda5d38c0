"""MediatorService listen sessions: authentication, registration, replacement, keep-alive."""

from __future__ import annotations

import uuid

import pytest

from wavesync_proto.mediator.auth import DEFAULT_REALM, NonceIssuer, challenge_attributes
from wavesync_proto.mediator.messages import ListenResponse
from wavesync_proto.mediator.service import MediatorLimits, OnlineServer
from wavesync_proto.stun import (
    BINDING,
    Message,
    MessageClass,
    Nonce,
    XorMappedAddress,
    encode_message,
    verify_integrity_sha256,
)

from .helpers import (
    FORWARDED,
    KEY_A,
    KEY_B,
    LOCAL,
    NONCE_SECRET,
    SERVER_1,
    SERVER_1_PUBLIC,
    SERVER_2,
    SERVER_2_PUBLIC,
    SYSTEM_A,
    SYSTEM_B,
    SYSTEM_UNKNOWN,
    Harness,
    closed,
    decoded,
    error_of,
    listen_message,
    only,
    sent_tcp,
    sent_udp,
    server_key,
    signed_listen,
)


def challenge_for(
    request: Message, now: float, code: int = 401, reason: str = "Unauthorized"
) -> bytes:
    nonce = NonceIssuer(secret=NONCE_SECRET).issue(now)
    return encode_message(
        request.error_response(code, reason, *challenge_attributes(DEFAULT_REALM, nonce))
    )


def test_listen_is_challenged_then_accepted_with_a_signed_answer() -> None:
    h = Harness.create()
    assert h.connect_peer("s1", SERVER_1_PUBLIC) == []
    first = listen_message(SERVER_1, local=LOCAL, forwarded=FORWARDED)
    answer = only(h.tcp("s1", encode_message(first)))
    assert sent_tcp([answer], "s1") == [challenge_for(first, h.now)]
    assert h.service.online_servers() == {}

    nonce = NonceIssuer(secret=NONCE_SECRET).issue(h.now)
    retry = listen_message(
        SERVER_1, transaction_id=b"listen-00002", local=LOCAL, forwarded=FORWARDED
    )
    key = server_key(SERVER_1)
    response = only(h.tcp("s1", signed_listen(retry, nonce, key=key, username=str(SERVER_1))))

    expected = ListenResponse(public_endpoint=SERVER_1_PUBLIC, keepalive_interval=25)
    assert sent_tcp([response], "s1") == [
        encode_message(expected.to_stun(b"listen-00002"), integrity_sha256_key=key)
    ]
    assert verify_integrity_sha256(decoded(sent_tcp([response], "s1")[0]), key)
    assert dict(h.service.online_servers()) == {
        SERVER_1: OnlineServer(
            system_id=SYSTEM_A,
            server_id=SERVER_1,
            peer="s1",
            public_endpoint=SERVER_1_PUBLIC,
            local_endpoints=LOCAL,
            forwarded_endpoints=FORWARDED,
        )
    }
    counters = h.service.counters
    assert (counters.listen_challenges, counters.listens_accepted, counters.auth_failures) == (
        1,
        1,
        0,
    )
    assert counters.servers_online == 1


def test_the_view_is_read_only() -> None:
    h = Harness.create()
    h.register("s1", SERVER_1)
    view = h.service.online_servers()
    with pytest.raises(TypeError):
        view[SERVER_2] = view[SERVER_1]  # type: ignore[index]


@pytest.mark.parametrize(
    ("system_id", "key", "username"),
    [
        pytest.param(SYSTEM_A, server_key(SERVER_1, KEY_B), str(SERVER_1), id="wrong key"),
        pytest.param(
            SYSTEM_UNKNOWN, server_key(SERVER_1, KEY_A), str(SERVER_1), id="unknown system"
        ),
        pytest.param(SYSTEM_A, server_key(SERVER_2, KEY_A), str(SERVER_2), id="another username"),
    ],
)
def test_bad_credentials_get_the_same_401_challenge(
    system_id: uuid.UUID, key: bytes, username: str
) -> None:
    h = Harness.create()
    h.connect_peer("s1", SERVER_1_PUBLIC)
    nonce = NonceIssuer(secret=NONCE_SECRET).issue(h.now)
    request = listen_message(SERVER_1, system_id)
    answer = only(h.tcp("s1", signed_listen(request, nonce, key=key, username=username)))
    # Same bytes whatever was wrong: nothing tells which systems or servers exist.
    assert sent_tcp([answer], "s1") == [challenge_for(request, h.now)]
    assert h.service.online_servers() == {}
    assert h.service.counters.auth_failures == 1


def test_a_stale_nonce_gets_438_and_a_fresh_one_that_works() -> None:
    h = Harness.create()
    old_nonce = NonceIssuer(secret=NONCE_SECRET).issue(h.now)
    h.advance(601.0)  # the nonce lifetime is 600 s
    h.connect_peer("s1", SERVER_1_PUBLIC)
    request = listen_message(SERVER_1)
    key = server_key(SERVER_1)
    answer = sent_tcp(
        h.tcp("s1", signed_listen(request, old_nonce, key=key, username=str(SERVER_1))), "s1"
    )
    assert answer == [challenge_for(request, h.now, 438, "Stale Nonce")]
    fresh = decoded(answer[0]).get(Nonce)
    assert fresh is not None
    assert fresh.value != old_nonce
    response = sent_tcp(
        h.tcp("s1", signed_listen(request, fresh.value, key=key, username=str(SERVER_1))), "s1"
    )
    assert decoded(response[0]).message_class is MessageClass.SUCCESS
    assert SERVER_1 in h.service.online_servers()


def test_integrity_without_credentials_is_a_bad_request() -> None:
    h = Harness.create()
    h.connect_peer("s1", SERVER_1_PUBLIC)
    request = listen_message(SERVER_1)
    data = encode_message(request, integrity_sha256_key=server_key(SERVER_1))
    answer = sent_tcp(h.tcp("s1", data), "s1")
    assert answer == [encode_message(request.error_response(400, "Missing Credentials"))]
    assert h.service.counters.auth_failures == 1


def test_listen_over_udp_is_refused() -> None:
    h = Harness.create()
    request = listen_message(SERVER_1)
    answer = sent_udp(h.udp(encode_message(request), SERVER_1_PUBLIC), SERVER_1_PUBLIC)
    assert answer == [encode_message(request.error_response(400, "Listen Requires TCP"))]
    assert h.service.online_servers() == {}


def test_a_listen_without_its_ids_is_a_bad_request() -> None:
    h = Harness.create()
    h.connect_peer("s1", SERVER_1_PUBLIC)
    request = Message(
        message_class=MessageClass.REQUEST, method=0x101, transaction_id=b"listen-00001"
    )
    answer = sent_tcp(h.tcp("s1", encode_message(request)), "s1")
    assert error_of(answer[0]) == (400, "listen is missing its SystemId attribute")


def test_a_second_listen_from_another_peer_replaces_the_first() -> None:
    h = Harness.create()
    h.register("old", SERVER_1)
    actions = h.register("new", SERVER_1, remote=SERVER_2_PUBLIC, local=LOCAL)
    assert closed(actions) == {"old": "replaced by a new listen session"}
    assert len(sent_tcp(actions, "new")) == 1
    online = h.service.online_servers()[SERVER_1]
    assert (online.peer, online.public_endpoint, online.local_endpoints) == (
        "new",
        SERVER_2_PUBLIC,
        LOCAL,
    )
    # The adapter reports the old connection closed later: that must not unregister anyone.
    assert h.tcp_closed("old") == []
    assert h.tcp("old", encode_message(listen_message(SERVER_1))) == []
    assert SERVER_1 in h.service.online_servers()
    assert (h.service.counters.servers_replaced, h.service.counters.servers_online) == (1, 1)


def test_a_listen_may_move_a_server_to_another_system() -> None:
    h = Harness.create()
    h.register("s1", SERVER_1)
    h.register("s2", SERVER_1, system_id=SYSTEM_B, remote=SERVER_2_PUBLIC)
    assert h.service.online_servers()[SERVER_1].system_id == SYSTEM_B
    assert h.service.table_sizes()["systems"] == 1


def test_relisting_on_the_same_peer_updates_the_endpoints() -> None:
    h = Harness.create()
    h.register("s1", SERVER_1)
    actions = h.register("s1", SERVER_1, local=LOCAL, connect=False)
    assert closed(actions) == {}
    assert h.service.online_servers()[SERVER_1].local_endpoints == LOCAL
    assert h.service.counters.listens_accepted == 2


def test_one_peer_cannot_listen_as_two_servers() -> None:
    h = Harness.create()
    h.register("s1", SERVER_1)
    actions = h.register("s1", SERVER_2, connect=False)
    assert error_of(sent_tcp(actions, "s1")[0]) == (400, "Session Already Listening")
    assert set(h.service.online_servers()) == {SERVER_1}


def test_the_server_table_is_bounded() -> None:
    h = Harness.create(limits=MediatorLimits(max_servers=1))
    h.register("s1", SERVER_1)
    actions = h.register("s2", SERVER_2, remote=SERVER_2_PUBLIC)
    assert error_of(sent_tcp(actions, "s2")[0]) == (508, "Insufficient Capacity")
    assert set(h.service.online_servers()) == {SERVER_1}
    # A full table still takes a reconnecting server: it replaces, not adds.
    actions = h.register("s3", SERVER_1, remote=SERVER_2_PUBLIC)
    assert decoded(sent_tcp(actions, "s3")[0]).message_class is MessageClass.SUCCESS


def binding_request(transaction_id: bytes) -> bytes:
    return encode_message(
        Message(message_class=MessageClass.REQUEST, method=BINDING, transaction_id=transaction_id)
    )


def test_keepalives_hold_a_server_and_silence_drops_it() -> None:
    h = Harness.create()
    h.register("s1", SERVER_1)
    # A client peer's 10 s idle limit does not apply to a registered server.
    for number in range(5):
        assert h.advance(25.0) == []
        answer = sent_tcp(h.tcp("s1", binding_request(bytes(11) + bytes([number]))), "s1")
        assert decoded(answer[0]).get(XorMappedAddress) == XorMappedAddress(SERVER_1_PUBLIC)
    indication = Message(
        message_class=MessageClass.INDICATION, method=BINDING, transaction_id=bytes(12)
    )
    assert h.advance(74.0) == []
    assert h.tcp("s1", encode_message(indication)) == []
    assert h.service.counters.keepalives == 1
    assert h.advance(74.9) == []
    actions = h.advance(0.2)
    assert closed(actions) == {"s1": "keep-alive timeout: silent for 75 s"}
    assert h.service.online_servers() == {}
    assert (h.service.counters.servers_timed_out, h.service.counters.servers_online) == (1, 0)


def test_a_trickled_partial_message_is_not_a_keepalive() -> None:
    h = Harness.create()
    h.register("s1", SERVER_1)
    request = binding_request(b"trickled....")
    for offset in range(10):
        h.advance(7.0)
        assert h.tcp("s1", request[offset : offset + 1]) == []
    assert closed(h.advance(5.1)) == {"s1": "keep-alive timeout: silent for 75 s"}


def test_a_closed_server_connection_unregisters_it() -> None:
    h = Harness.create()
    h.register("s1", SERVER_1)
    assert h.tcp_closed("s1") == []
    assert h.service.online_servers() == {}
    assert h.service.get_timer() is None
