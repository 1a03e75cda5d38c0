"""LAN discovery (DESIGN §1 step 1): a multicast search for a server or system, unicast answers.

This module owns the search messages (STUN method 0x108), when a client sends its search and
which answers it believes, and whether a server agent answers a search and with what. It does
not know sockets, multicast groups or clocks: the adapter joins the group, moves the bytes and
passes ``now``; the TCP dial to what was found belongs to the client's path race.

A search request names one target, a SERVER-ID or a SYSTEM-ID, and is padded to 576 bytes like
the UDP copy of connect (docs/protocol.md §2.6). Every server agent of that target that hears
it answers by unicast to the request's source with a success response: SERVER-ID, SYSTEM-ID and
its TCP endpoints as LOCAL-ENDPOINT attributes. The answer is never more than 3 times the
request: the search is unauthenticated and its source can be spoofed, so an agent must not be a
reflector. A full answer (16 IPv6 endpoints, 444 bytes) fits the padded request's budget.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Self

from .addresses import Endpoint, pack_host
from .errors import LocalProtocolError
from .mediator.attributes import LocalEndpoint, ServerId, SystemId
from .mediator.connect import PADDING_ATTRIBUTE
from .mediator.messages import (
    MAX_ENDPOINTS,
    MediatorMessage,
    MediatorMessageError,
    MediatorMethod,
    check_target,
    read_target,
    target_attribute,
)
from .mediator.ratelimit import SourceRateLimiter
from .stun.attributes import Attribute, RawAttribute
from .stun.errors import StunDecodeError
from .stun.message import HEADER_LENGTH, Message, MessageClass, decode_message, encode_message

__all__ = [
    "AMPLIFICATION_FACTOR",
    "DEFAULT_GROUP",
    "MAX_ENDPOINTS",
    "MAX_SERVERS_FOUND",
    "RESEND_OFFSETS",
    "SEARCH_REQUEST_SIZE",
    "DiscoveryEvent",
    "DiscoveryResponder",
    "DiscoverySearch",
    "ResponderCounters",
    "SearchAnswer",
    "SearchFinished",
    "SearchRequest",
    "ServerFound",
    "answer_size",
    "encode_search_request",
]

#: An IPv4 group in the administratively scoped block 239.0.0.0/8 (RFC 2365): routers at
#: the organization's edge do not forward it, and the sender's TTL of 1 keeps it on the link.
DEFAULT_GROUP: Endpoint = ("239.255.77.77", 47115)
#: Search requests are padded to this, the datagram size every IPv4 host must accept
#: (RFC 791), as the UDP copy of connect is: it buys the answer a 1728-byte budget.
SEARCH_REQUEST_SIZE = 576
#: No answer is larger than this many times the request (docs/protocol.md §2.6).
AMPLIFICATION_FACTOR = 3
#: A search by system id remembers at most this many servers; later ones are dropped.
MAX_SERVERS_FOUND = 64
#: When the request is sent again, in seconds after the start: the gaps double (100, 200,
#: 400 ms), so a datagram lost on a busy Wi-Fi link costs 100 ms, and the group hears at
#: most four copies in the default one-second search.
RESEND_OFFSETS = (0.1, 0.3, 0.7)

# Sizes on the wire: the STUN header, then each attribute's 4-byte header and value.
_ID_ATTRIBUTE_BYTES = 4 + 16
_ANSWER_FIXED_BYTES = HEADER_LENGTH + 2 * _ID_ATTRIBUTE_BYTES
_IPV4_ENDPOINT_BYTES = 4 + 8
_IPV6_ENDPOINT_BYTES = 4 + 20
_IPV4_PACKED_BYTES = 4


# --- messages ------------------------------------------------------------------------------


def _check_kind(message: Message, message_class: MessageClass, name: str) -> None:
    if message.method != MediatorMethod.SEARCH or message.message_class is not message_class:
        raise MediatorMessageError(
            f"{name}: expected method 0x{MediatorMethod.SEARCH:03x} {message_class.name}, "
            f"got 0x{message.method:03x} {message.message_class.name}"
        )
    unknown = message.unknown_comprehension_required
    if unknown:
        names = ", ".join(f"0x{code:04x}" for code in unknown)
        raise MediatorMessageError(f"{name}: unknown comprehension-required attributes {names}")


def _check_endpoint(endpoint: Endpoint) -> None:
    host, port = endpoint
    pack_host(host)  # raises LocalProtocolError for a name or garbage
    if not 0 < port <= 0xFFFF:
        raise LocalProtocolError(f"a TCP endpoint's port must be in 1..65535, not {port}")


@dataclass(frozen=True, kw_only=True)
class SearchRequest(MediatorMessage):
    """search (request, client → multicast group): "who serves this server or system?".

    Names exactly one target. The padding a sender adds (``encode_search_request``) is not
    part of the message: a decoder skips it as an optional attribute it does not know.
    """

    METHOD: ClassVar[int] = MediatorMethod.SEARCH
    CLASS: ClassVar[MessageClass] = MessageClass.REQUEST
    #: The one server wanted; None when searching by system.
    server_id: uuid.UUID | None = None
    #: Any server of this system will do; None when searching for one server.
    system_id: uuid.UUID | None = None

    def __post_init__(self) -> None:
        check_target("a search", self.server_id, self.system_id)

    def stun_attributes(self) -> tuple[Attribute, ...]:
        return (target_attribute(self.server_id, self.system_id),)

    @classmethod
    def from_stun(cls, message: Message) -> Self:
        _check_kind(message, MessageClass.REQUEST, "search")
        server_id, system_id = read_target(message, "search")
        return cls(server_id=server_id, system_id=system_id)


@dataclass(frozen=True, kw_only=True)
class SearchAnswer(MediatorMessage):
    """search success (server agent → the searching client, unicast): "here I am".

    Carries the transaction id of the search it answers.
    """

    METHOD: ClassVar[int] = MediatorMethod.SEARCH
    CLASS: ClassVar[MessageClass] = MessageClass.SUCCESS
    server_id: uuid.UUID
    system_id: uuid.UUID
    #: TCP addresses the server accepts tunnels on, most preferred first (at most 16). A
    #: wildcard host (0.0.0.0, ::) means "the address you reached me at".
    endpoints: tuple[Endpoint, ...] = ()

    def __post_init__(self) -> None:
        if len(self.endpoints) > MAX_ENDPOINTS:
            raise LocalProtocolError(f"a search answer carries at most {MAX_ENDPOINTS} endpoints")

    def stun_attributes(self) -> tuple[Attribute, ...]:
        return (
            ServerId(self.server_id),
            SystemId(self.system_id),
            *(LocalEndpoint(e) for e in self.endpoints),
        )

    @classmethod
    def from_stun(cls, message: Message) -> Self:
        _check_kind(message, MessageClass.SUCCESS, "search answer")
        server, system = message.get(ServerId), message.get(SystemId)
        if server is None or system is None:
            raise MediatorMessageError("search answer must carry SERVER-ID and SYSTEM-ID")
        endpoints = message.get_all(LocalEndpoint)
        if len(endpoints) > MAX_ENDPOINTS:
            raise MediatorMessageError(
                f"search answer lists {len(endpoints)} LOCAL-ENDPOINTs, at most {MAX_ENDPOINTS}"
            )
        return cls(
            server_id=server.value,
            system_id=system.value,
            endpoints=tuple(e.address for e in endpoints),
        )


def encode_search_request(request: SearchRequest, transaction_id: bytes) -> bytes:
    """``request`` as a datagram padded to ``SEARCH_REQUEST_SIZE`` bytes."""
    message = request.to_stun(transaction_id)
    # 40 bytes of request, then a PADDING attribute whose 4-byte header is counted too.
    filler = SEARCH_REQUEST_SIZE - len(encode_message(message)) - 4
    padded = Message(
        message_class=message.message_class,
        method=message.method,
        transaction_id=transaction_id,
        attributes=(*message.attributes, RawAttribute(PADDING_ATTRIBUTE, bytes(filler))),
    )
    return encode_message(padded)


def answer_size(endpoints: Sequence[Endpoint]) -> int:
    """The encoded size of a search answer carrying ``endpoints``."""
    return _ANSWER_FIXED_BYTES + sum(_endpoint_bytes(e) for e in endpoints)


def _endpoint_bytes(endpoint: Endpoint) -> int:
    packed = pack_host(endpoint[0])[1]
    return _IPV4_ENDPOINT_BYTES if len(packed) == _IPV4_PACKED_BYTES else _IPV6_ENDPOINT_BYTES


def _is_unspecified(host: str) -> bool:
    try:
        return not any(pack_host(host)[1])
    except LocalProtocolError:
        return False


# --- the client's side -----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DiscoveryEvent:
    """Base class of what a ``DiscoverySearch`` reports."""


@dataclass(frozen=True, kw_only=True)
class ServerFound(DiscoveryEvent):
    """A server of the target answered (once per server id, however many copies it sent)."""

    server_id: uuid.UUID
    """The server that answered."""
    system_id: uuid.UUID
    """The system it belongs to."""
    endpoints: tuple[Endpoint, ...]
    """Its TCP endpoints to dial, wildcard hosts replaced by the answer's source address."""
    source: Endpoint
    """Where the answer came from."""
    elapsed: float
    """Seconds from the search's start to this answer."""


@dataclass(frozen=True, kw_only=True)
class SearchFinished(DiscoveryEvent):
    """The search is over: its timeout passed, or the one server searched for was found."""

    found: int
    """How many ``ServerFound`` events came before this one."""
    elapsed: float
    """Seconds from the search's start to its end."""


class DiscoverySearch:
    """One search: the padded request to the group on a doubling schedule, and its answers.

    Events: a ``ServerFound`` per distinct server that answers, then exactly one
    ``SearchFinished``, after which nothing is sent and every datagram is ignored.
    """

    def __init__(
        self,
        *,
        server_id: uuid.UUID | None = None,
        system_id: uuid.UUID | None = None,
        transaction_id: bytes,
        now: float,
        timeout: float = 1.0,
        group: Endpoint = DEFAULT_GROUP,
    ) -> None:
        if not timeout > 0:  # also refuses NaN
            raise LocalProtocolError("the search timeout must be positive")
        if len(transaction_id) != 12:
            raise LocalProtocolError("a transaction id is 12 bytes")
        _check_endpoint(group)
        #: What is searched for.
        self.request = SearchRequest(server_id=server_id, system_id=system_id)
        self.transaction_id = transaction_id
        self.group = group
        self._datagram = encode_search_request(self.request, transaction_id)
        self._start = now
        self._deadline = now + timeout
        self._send_times = deque(
            now + offset for offset in (0.0, *RESEND_OFFSETS) if offset < timeout
        )
        self._found: set[uuid.UUID] = set()
        self._events: deque[DiscoveryEvent] = deque()
        self._finished = False
        #: Datagrams ignored: not STUN, not an answer to this search, or not usable.
        self.dropped_datagrams = 0

    @property
    def done(self) -> bool:
        """True once ``SearchFinished`` is queued."""
        return self._finished

    def get_timer(self) -> float | None:
        """The next send or the end of the search, whichever is first; None once done."""
        if self._finished:
            return None
        if self._send_times:
            return min(self._send_times[0], self._deadline)
        return self._deadline

    def next_event(self) -> ServerFound | SearchFinished | None:
        """The next ``ServerFound`` or the final ``SearchFinished``."""
        if not self._events:
            return None
        event = self._events.popleft()
        assert isinstance(event, ServerFound | SearchFinished)
        return event

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Endpoint]]:
        """The padded request to the group when a send is due; one copy for any sends missed."""
        if self._finished or not self._send_times or now < self._send_times[0]:
            return []
        while self._send_times and self._send_times[0] <= now:
            self._send_times.popleft()
        return [(self._datagram, self.group)]

    def handle_timer(self, now: float) -> None:
        """Move time: at the search's deadline it finishes."""
        if not self._finished and now >= self._deadline:
            self._finish(now)

    def receive_datagram(self, data: bytes, source: Endpoint, now: float) -> None:
        """A datagram on the search's socket; anything but a fitting answer is dropped."""
        self.handle_timer(now)  # an answer after the deadline is too late, however it queued
        if self._finished:
            return
        found = self._read_answer(data, source)
        if found is None:
            self.dropped_datagrams += 1
            return
        answer, endpoints = found
        self._found.add(answer.server_id)
        self._events.append(
            ServerFound(
                server_id=answer.server_id,
                system_id=answer.system_id,
                endpoints=endpoints,
                source=source,
                elapsed=now - self._start,
            )
        )
        if self.request.server_id is not None:
            self._finish(now)  # the one server wanted: nothing more to wait for

    def _read_answer(
        self, data: bytes, source: Endpoint
    ) -> tuple[SearchAnswer, tuple[Endpoint, ...]] | None:
        answer = self._decode_answer(data)
        if answer is None or not self._is_target(answer):
            return None
        if answer.server_id in self._found or len(self._found) >= MAX_SERVERS_FOUND:
            return None
        # A server bound to the wildcard cannot know which of its addresses we reach: the
        # one its answer came from is one that works.
        endpoints = tuple(
            dict.fromkeys(
                (source[0], port) if _is_unspecified(host) else (host, port)
                for host, port in answer.endpoints
                if port != 0
            )
        )
        if not endpoints:
            return None
        return answer, endpoints

    def _decode_answer(self, data: bytes) -> SearchAnswer | None:
        try:
            message = decode_message(data)
        except StunDecodeError:
            return None
        # Our own request looped back, other clients' searches and strangers' answers.
        if (
            message.message_class is not MessageClass.SUCCESS
            or message.method != MediatorMethod.SEARCH
            or message.transaction_id != self.transaction_id
        ):
            return None
        try:
            return SearchAnswer.from_stun(message)
        except MediatorMessageError:
            return None

    def _is_target(self, answer: SearchAnswer) -> bool:
        wanted = self.request
        if wanted.server_id is not None:
            return answer.server_id == wanted.server_id
        return answer.system_id == wanted.system_id

    def _finish(self, now: float) -> None:
        self._finished = True
        self._send_times.clear()
        self._events.append(SearchFinished(found=len(self._found), elapsed=now - self._start))


# --- the server agent's side -----------------------------------------------------------------


@dataclass(slots=True)
class ResponderCounters:
    """What a ``DiscoveryResponder`` did with each datagram, one counter per outcome."""

    #: Searches answered (with every endpoint or, see ``truncated``, with fewer).
    answered: int = 0
    #: Answers that left endpoints out to stay within 3x the request.
    truncated: int = 0
    #: Searches for us refused by the per-source token bucket.
    rate_limited: int = 0
    #: Not STUN, or a search request that is not a valid search.
    malformed: int = 0
    #: STUN that is not a search request: answers (ours too), indications, other methods.
    ignored: int = 0
    #: Valid searches for another server or system.
    not_for_us: int = 0
    #: Searches for us while no endpoint was configured.
    no_endpoints: int = 0


class DiscoveryResponder:
    """A server agent's answers to searches for its server id or its system id."""

    def __init__(
        self,
        *,
        system_id: uuid.UUID,
        server_id: uuid.UUID,
        endpoints: Sequence[Endpoint] = (),
        per_source_rate: float = 10.0,
        burst: int = 20,
        max_sources: int = 1024,
    ) -> None:
        self.system_id = system_id
        self.server_id = server_id
        self._limiter = SourceRateLimiter(
            rate=per_source_rate, burst=burst, max_sources=max_sources
        )
        self._endpoints: tuple[Endpoint, ...] = ()
        self._endpoint_sizes: tuple[int, ...] = ()
        self.counters = ResponderCounters()
        self.set_endpoints(endpoints)

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        """The TCP endpoints answered with, most preferred first."""
        return self._endpoints

    def set_endpoints(self, endpoints: Sequence[Endpoint]) -> None:
        """Replace the endpoints (an agent learns its TCP port after it binds)."""
        chosen = tuple((str(host), int(port)) for host, port in endpoints)
        if len(chosen) > MAX_ENDPOINTS:
            raise LocalProtocolError(f"at most {MAX_ENDPOINTS} endpoints")
        for endpoint in chosen:
            _check_endpoint(endpoint)
        self._endpoints = chosen
        self._endpoint_sizes = tuple(_endpoint_bytes(e) for e in chosen)

    def receive_datagram(
        self, data: bytes, source: Endpoint, now: float
    ) -> list[tuple[bytes, Endpoint]]:
        """The answer to send back for a datagram heard on the group, if any."""
        counters = self.counters
        message = self._search_for_us(data)
        if message is None:
            return []
        if not self._endpoints:
            counters.no_endpoints += 1
            return []
        if source[1] == 0:  # nowhere to answer to; a real socket never sends from port 0
            counters.malformed += 1
            return []
        # Only searches we would answer spend tokens: strangers' searches cost nothing.
        if not self._limiter.allow(source[0], now):
            counters.rate_limited += 1
            return []
        # The smallest valid search (40 bytes, unpadded) buys 120 bytes: the ids and one
        # IPv6 endpoint take 84, so every search for us gets at least one endpoint.
        count = self._endpoints_that_fit(AMPLIFICATION_FACTOR * len(data))
        assert count > 0
        if count < len(self._endpoints):
            counters.truncated += 1
        answer = SearchAnswer(
            server_id=self.server_id,
            system_id=self.system_id,
            endpoints=self._endpoints[:count],
        )
        counters.answered += 1
        return [(encode_message(answer.to_stun(message.transaction_id)), source)]

    def _search_for_us(self, data: bytes) -> Message | None:
        """The decoded search if ``data`` is a valid search for us; counts everything else."""
        counters = self.counters
        try:
            message = decode_message(data)
        except StunDecodeError:
            counters.malformed += 1
            return None
        if message.method != MediatorMethod.SEARCH or (
            message.message_class is not MessageClass.REQUEST
        ):
            counters.ignored += 1
            return None
        try:
            request = SearchRequest.from_stun(message)
        except MediatorMessageError:
            counters.malformed += 1
            return None
        if request.server_id != self.server_id and request.system_id != self.system_id:
            counters.not_for_us += 1
            return None
        return message

    def _endpoints_that_fit(self, budget: int) -> int:
        size = _ANSWER_FIXED_BYTES
        for count, endpoint_size in enumerate(self._endpoint_sizes):
            size += endpoint_size
            if size > budget:
                return count
        return len(self._endpoint_sizes)
