"""The mediator service's parts on their own: timeout lanes, rate limiter, registry, settings."""

from __future__ import annotations

import uuid

import pytest

from wavesync_proto.errors import LocalProtocolError
from wavesync_proto.mediator.connect_sessions import ConnectEvent, ConnectSession, ConnectState
from wavesync_proto.mediator.ratelimit import SourceRateLimiter, source_key
from wavesync_proto.mediator.registry import OnlineServer, ServerRegistry
from wavesync_proto.mediator.service import MediatorLimits, MediatorService
from wavesync_proto.mediator.timeouts import TimeoutLane

from .helpers import NONCE_SECRET, SERVER_1, SERVER_2, SERVER_3, SYSTEM_A, SYSTEM_B, SYSTEM_KEYS


def test_a_lane_expires_keys_in_deadline_order_and_touch_postpones() -> None:
    lane: TimeoutLane[str] = TimeoutLane(10.0)
    assert lane.next_deadline() is None
    assert lane.touch("a", 0.0) == 10.0
    lane.touch("b", 1.0)
    lane.touch("c", 2.0)
    lane.touch("a", 5.0)  # a moves behind c
    assert lane.next_deadline() == 11.0
    assert lane.pop_expired(11.5) == "b"
    assert lane.pop_expired(11.5) is None
    lane.discard("c")
    lane.discard("missing")
    assert ("c" in lane, len(lane), lane.deadline("a")) == (False, 1, 15.0)
    assert lane.pop_expired(15.0) == "a"
    assert lane.next_deadline() is None


def test_a_lane_stays_ordered_when_the_clock_steps_back() -> None:
    lane: TimeoutLane[str] = TimeoutLane(10.0)
    lane.touch("late", 100.0)
    assert lane.touch("early", 50.0) == 110.0  # clamped: expires late rather than out of order
    assert [lane.pop_expired(200.0), lane.pop_expired(200.0)] == ["late", "early"]


def test_a_lane_needs_a_positive_timeout() -> None:
    with pytest.raises(LocalProtocolError):
        TimeoutLane(0.0)


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("192.0.2.1", bytes((192, 0, 2, 1))),
        ("::ffff:192.0.2.1", bytes((192, 0, 2, 1))),
        ("2001:db8:aa:bb:1:2:3:4", bytes.fromhex("20010db800aa00bb")),
    ],
)
def test_source_keys(host: str, key: bytes) -> None:
    assert source_key(host) == key


def test_a_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    limiter = SourceRateLimiter(rate=2.0, burst=3, max_sources=10)
    assert [limiter.allow("192.0.2.1", 0.0) for _ in range(4)] == [True, True, True, False]
    assert [limiter.allow("192.0.2.1", 0.5) for _ in range(2)] == [True, False]
    assert [limiter.allow("192.0.2.1", 100.0) for _ in range(4)] == [True, True, True, False]
    # A clock that steps back neither refills nor breaks the bucket.
    assert limiter.allow("192.0.2.1", 50.0) is False


def test_the_limiter_forgets_the_least_recently_seen_source() -> None:
    limiter = SourceRateLimiter(rate=1.0, burst=1, max_sources=2)
    assert limiter.allow("192.0.2.1", 0.0)
    assert limiter.allow("192.0.2.2", 0.0)
    assert not limiter.allow("192.0.2.1", 0.0)  # .1 is now the most recent
    assert limiter.allow("192.0.2.3", 0.0)  # evicts .2
    assert len(limiter) == 2
    assert limiter.allow("192.0.2.2", 0.0)  # back with a full bucket; evicts .1
    assert limiter.allow("192.0.2.1", 0.0)


def test_the_limiter_refuses_nonsense_settings() -> None:
    with pytest.raises(LocalProtocolError):
        SourceRateLimiter(rate=0.0, burst=1, max_sources=1)


def server(server_id: uuid.UUID, system_id: uuid.UUID = SYSTEM_A, peer: str = "p") -> OnlineServer:
    return OnlineServer(
        system_id=system_id, server_id=server_id, peer=peer, public_endpoint=("192.0.2.1", 1)
    )


def test_the_registry_picks_round_robin_and_forgets_empty_systems() -> None:
    registry = ServerRegistry()
    for server_id in (SERVER_1, SERVER_2, SERVER_3):
        registry.put(server(server_id), b"key")
    picks = [registry.pick(SYSTEM_A) for _ in range(4)]
    assert [p.info.server_id for p in picks if p is not None] == [
        SERVER_1,
        SERVER_2,
        SERVER_3,
        SERVER_1,
    ]
    registry.remove(SERVER_2)
    assert [getattr(registry.pick(SYSTEM_A), "key", None) for _ in range(2)] == [b"key", b"key"]
    registry.remove(SERVER_1)
    registry.remove(SERVER_3)
    assert registry.pick(SYSTEM_A) is None
    assert (len(registry), registry.system_count(), dict(registry.view)) == (0, 0, {})
    with pytest.raises(LocalProtocolError):
        registry.remove(SERVER_1)


def test_a_registry_replacement_keeps_the_pending_set_and_moves_systems() -> None:
    registry = ServerRegistry()
    session, previous = registry.put(server(SERVER_1, peer="old"), b"old key")
    session.pending.add(b"s" * 16)
    again, previous = registry.put(server(SERVER_1, SYSTEM_B, peer="new"), b"new key")
    assert again is session
    assert previous == server(SERVER_1, peer="old")
    assert (session.key, session.pending, session.info.peer) == (b"new key", {b"s" * 16}, "new")
    assert registry.pick(SYSTEM_A) is None
    assert registry.pick(SYSTEM_B) is session


def test_a_connect_session_refuses_a_transition_not_in_the_table() -> None:
    session = ConnectSession(
        session_id=bytes(16),
        named_server=SERVER_1,
        named_system=None,
        server_id=SERVER_1,
        system_id=SYSTEM_A,
    )
    session.move(ConnectEvent.ACK_TIMEOUT)
    assert session.state is ConnectState.ANSWERED
    session.move(ConnectEvent.ACK)
    with pytest.raises(LocalProtocolError):
        session.move(ConnectEvent.SERVER_LOST)


@pytest.mark.parametrize(
    "field",
    [
        "max_servers",
        "ack_timeout",
        "rate_limit_burst",
        "udp_amplification_factor",
        "keepalive_interval",
    ],
)
def test_limits_must_be_positive(field: str) -> None:
    with pytest.raises(LocalProtocolError, match=field):
        MediatorLimits(**{field: 0})


def test_the_tcp_buffer_must_hold_a_header() -> None:
    with pytest.raises(LocalProtocolError):
        MediatorLimits(max_tcp_buffer=19)


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param({"relay_urls": ["https://r.example/"] * 9}, id="more than 8 relay URLs"),
        pytest.param({"relay_urls": ["https://" + "r" * 600]}, id="a relay URL over 509 bytes"),
        pytest.param({"software": "s" * 100}, id="SOFTWARE too long for the Binding bound"),
        pytest.param({"systems": {SYSTEM_A: "bad\u0007key"}}, id="a key SASLprep refuses"),
        pytest.param({"nonce_secret": b"short"}, id="a short nonce secret"),
    ],
)
def test_the_service_refuses_bad_settings_up_front(settings: dict[str, object]) -> None:
    arguments: dict[str, object] = {
        "systems": SYSTEM_KEYS,
        "nonce_secret": NONCE_SECRET,
        **settings,
    }
    with pytest.raises(LocalProtocolError):
        MediatorService(**arguments)  # type: ignore[arg-type]
