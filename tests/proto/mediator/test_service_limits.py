"""MediatorService rate limiting and the UDP amplification bound."""

from __future__ import annotations

import pytest

from wavesync_proto.mediator.messages import ConnectResponse
from wavesync_proto.mediator.service import MediatorLimits
from wavesync_proto.stun import (
    BINDING,
    Message,
    MessageClass,
    Software,
    XorMappedAddress,
    decode_message,
    encode_message,
)

from .helpers import (
    CLIENT_TCP,
    CLIENT_UDP,
    FORWARDED,
    LOCAL,
    RELAYS,
    SERVER_1,
    SERVER_1_PUBLIC,
    SERVER_1_PUNCH,
    SERVER_3,
    SYSTEM_A,
    Harness,
    ack_bytes,
    connect_bytes,
    error_of,
    listen_message,
    sent_tcp,
    sent_udp,
    tid,
    typed,
)


def binding(number: int) -> bytes:
    return encode_message(
        Message(
            message_class=MessageClass.REQUEST,
            method=BINDING,
            transaction_id=number.to_bytes(12, "big"),
        )
    )


def answered(h: Harness, count: int, source: tuple[str, int]) -> int:
    return sum(len(sent_udp(h.udp(binding(n), source), source)) for n in range(count))


def test_a_source_gets_its_burst_then_is_dropped_then_refills() -> None:
    h = Harness.create()
    assert answered(h, 41, CLIENT_UDP) == 40
    assert h.service.counters.rate_limited == 1
    h.advance(0.1)  # 20 tokens a second: two more
    assert answered(h, 3, CLIENT_UDP) == 2
    h.advance(10.0)  # full again, never more than the burst
    assert answered(h, 45, CLIENT_UDP) == 40
    # Other sources have their own buckets.
    assert answered(h, 1, ("203.0.113.10", 1)) == 1


def test_connect_and_results_cost_tokens_and_tcp_shares_the_bucket() -> None:
    h = Harness.create()
    h.connect_peer("c1", CLIENT_TCP)  # same IP as CLIENT_UDP
    for number in range(20):
        data = connect_bytes(number, transaction_id=tid("u"), server_id=SERVER_3)
        assert len(h.udp(data, CLIENT_UDP)) == 1
        assert (
            len(h.tcp("c1", connect_bytes(number, transaction_id=tid("t"), server_id=SERVER_3)))
            == 1
        )
    assert h.udp(connect_bytes(99, transaction_id=tid("u"), server_id=SERVER_3), CLIENT_UDP) == []
    assert h.tcp("c1", connect_bytes(99, transaction_id=tid("t"), server_id=SERVER_3)) == []
    assert (h.service.counters.rate_limited, h.service.counters.connects_received) == (2, 40)


@pytest.mark.parametrize(
    ("first", "second", "shared"),
    [
        pytest.param("2001:db8:1:2::1", "2001:db8:1:2:ffff::9", True, id="one IPv6 /64"),
        pytest.param("2001:db8:1:2::1", "2001:db8:1:3::1", False, id="two IPv6 /64s"),
        pytest.param("::ffff:192.0.2.1", "192.0.2.1", True, id="IPv4-mapped is the IPv4 address"),
        pytest.param("::ffff:192.0.2.1", "::ffff:192.0.2.2", False, id="two mapped IPv4s"),
    ],
)
def test_sources_are_grouped_by_address_or_ipv6_prefix(
    first: str, second: str, shared: bool
) -> None:
    h = Harness.create()
    assert answered(h, 40, (first, 1)) == 40
    assert answered(h, 1, (second, 2)) == (0 if shared else 1)


def test_servers_listens_and_acks_are_not_rate_limited() -> None:
    h = Harness.create()
    h.register("s1", SERVER_1)
    for number in range(60):
        assert len(h.tcp("s1", binding(number))) == 1
    h.connect_peer("x", SERVER_1_PUBLIC)
    for _ in range(60):
        [challenge] = sent_tcp(h.tcp("x", encode_message(listen_message(SERVER_1))), "x")
        assert error_of(challenge) == (401, "Unauthorized")
    for number in range(60):
        [refusal] = sent_udp(
            h.udp(ack_bytes(number, SERVER_1, transaction_id=tid("a")), SERVER_1_PUBLIC),
            SERVER_1_PUBLIC,
        )
        assert error_of(refusal) == (404, "Unknown Session")
    assert h.service.counters.rate_limited == 0


def test_the_rate_limit_table_is_bounded() -> None:
    h = Harness.create(limits=MediatorLimits(max_rate_limited_sources=3, rate_limit_burst=1))
    assert answered(h, 2, ("192.0.2.1", 1)) == 1
    for host in ("192.0.2.2", "192.0.2.3", "192.0.2.4"):
        answered(h, 1, (host, 1))
    assert h.service.table_sizes()["rate_limited_sources"] == 3
    # 192.0.2.1 was evicted as least recently seen: it starts over with a full bucket.
    assert answered(h, 1, ("192.0.2.1", 1)) == 1


def full_answer(
    *,
    local: bool = True,
    relays: bool = True,
    forwarded: bool = True,
    client_mapped: tuple[str, int] = CLIENT_UDP,
) -> ConnectResponse:
    return ConnectResponse(
        server_id=SERVER_1,
        system_id=SYSTEM_A,
        forwarded_endpoints=FORWARDED if forwarded else (),
        local_endpoints=LOCAL if local else (),
        udp_endpoints=(SERVER_1_PUNCH,),
        relay_urls=RELAYS if relays else (),
        client_mapped=client_mapped,
    )


@pytest.mark.parametrize(
    ("factor", "pad_to", "software", "expected"),
    [
        pytest.param(3, 576, "wavesync test", full_answer(), id="padded: everything"),
        pytest.param(3, 64, "wavesync test", full_answer(), id="SOFTWARE dropped first"),
        pytest.param(3, None, None, full_answer(local=False), id="then local endpoints"),
        pytest.param(2, None, None, full_answer(local=False, relays=False), id="then relay URLs"),
        pytest.param(
            1,
            88,
            None,
            full_answer(local=False, relays=False, forwarded=False),
            id="then forwarded endpoints",
        ),
        pytest.param(1, None, None, None, id="nothing when even that is too big"),
    ],
)
def test_a_udp_connect_answer_is_trimmed_to_three_times_the_request(
    factor: int, pad_to: int | None, software: str | None, expected: ConnectResponse | None
) -> None:
    limits = MediatorLimits(udp_amplification_factor=factor)
    h = Harness.create(limits=limits, software=software, relay_urls=RELAYS)
    h.register("s1", SERVER_1, local=LOCAL, forwarded=FORWARDED)
    h.connect_peer("c1", CLIENT_TCP)
    request = connect_bytes(1, transaction_id=tid("c"), server_id=SERVER_1, pad_to=pad_to)
    h.udp(request, CLIENT_UDP)
    h.tcp("c1", connect_bytes(1, transaction_id=tid("t"), server_id=SERVER_1))
    actions = h.udp(ack_bytes(1, SERVER_1, transaction_id=tid("ack")), SERVER_1_PUNCH)
    answers = sent_udp(actions, CLIENT_UDP)
    if expected is None:
        assert answers == []
        assert h.service.counters.udp_answers_suppressed == 1
    else:
        [answer] = answers
        assert len(answer) <= factor * len(request)
        assert typed(answer) == expected
        has_software = decode_message(answer).get(Software) is not None
        assert has_software == (pad_to == 576)
    # The TCP copy's answer is always complete.
    [over_tcp] = sent_tcp(actions, "c1")
    assert typed(over_tcp) == full_answer(client_mapped=CLIENT_TCP)


def test_error_answers_drop_software_or_stay_silent_to_fit() -> None:
    software = "wavesync-test-" + "x" * 16  # the longest the Binding responder allows
    h = Harness.create(software=software, limits=MediatorLimits(udp_amplification_factor=1))
    request = connect_bytes(1, transaction_id=tid("c"), server_id=SERVER_3)
    [answer] = sent_udp(h.udp(request, CLIENT_UDP), CLIENT_UDP)
    assert answer == encode_message(decode_message(request).error_response(404, "Server Offline"))
    assert len(answer) <= len(request)
    # Over TCP, where nobody can spoof the source, SOFTWARE is always there.
    h.connect_peer("c1", CLIENT_TCP)
    [over_tcp] = sent_tcp(h.tcp("c1", request), "c1")
    assert decode_message(over_tcp).get(Software) == Software(software)
    # A bare 20-byte header earns 20 bytes back at factor 1: not even its 400 fits.
    header_only = encode_message(
        Message(message_class=MessageClass.REQUEST, method=0x102, transaction_id=tid("h"))
    )
    assert h.udp(header_only, CLIENT_UDP) == []
    assert h.service.counters.udp_answers_suppressed == 1


def test_a_small_binding_request_from_ipv6_loses_software_to_fit() -> None:
    software = "wavesync-test-" + "x" * 16
    source = ("2001:db8::99", 5000)
    h = Harness.create(software=software)
    request = Message(message_class=MessageClass.REQUEST, method=BINDING, transaction_id=tid("b"))
    [answer] = sent_udp(h.udp(encode_message(request), source), source)
    assert answer == encode_message(request.success_response(XorMappedAddress(source)))
    # A bigger request earns the SOFTWARE back.
    padded = Message(
        message_class=MessageClass.REQUEST,
        method=BINDING,
        transaction_id=tid("p"),
        attributes=(Software("padding-" + "p" * 20),),
    )
    [full] = sent_udp(h.udp(encode_message(padded), source), source)
    assert decode_message(full).get(Software) == Software(software)
    strict = Harness.create(software=software, limits=MediatorLimits(udp_amplification_factor=1))
    assert strict.udp(encode_message(request), source) == []
    assert strict.service.counters.udp_answers_suppressed == 1


def test_listen_answer_over_tcp_carries_software_when_configured() -> None:
    h = Harness.create(software="wavesync test")
    actions = h.register("s1", SERVER_1)
    assert decode_message(sent_tcp(actions, "s1")[0]).get(Software) == Software("wavesync test")
