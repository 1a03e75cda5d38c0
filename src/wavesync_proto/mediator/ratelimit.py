"""Per-source token buckets for the mediator's unauthenticated requests (DESIGN.md §6).

This module owns how many requests one source may make and how many sources
are remembered. It does not know which requests are limited or what happens
to a refused one: the service asks ``allow`` and drops the request on False.

The table is bounded: past ``max_sources`` the least recently seen source is
forgotten (it comes back with a full bucket, which only errs towards letting
a legitimate client through).
"""

from __future__ import annotations

from collections import OrderedDict

from ..addresses import FAMILY_IPV6, pack_host
from ..errors import LocalProtocolError

__all__ = ["SourceRateLimiter", "source_key"]

# ::ffff:a.b.c.d is how a dual-stack socket reports an IPv4 peer (RFC 4291 §2.5.5.2).
_V4_MAPPED_PREFIX = bytes(10) + b"\xff\xff"


def source_key(host: str) -> bytes:
    """The bucket a host's requests are charged to.

    An IPv4 address is its own bucket. An IPv6 host gets its /64: one customer
    usually holds a whole /64 (RFC 6177) and could otherwise rotate through it
    to dodge the limit. IPv4-mapped IPv6 addresses count as the IPv4 address,
    so a dual-stack socket does not lump every IPv4 client into one bucket.
    """
    family, packed = pack_host(host)
    if family == FAMILY_IPV6:
        if packed[:12] == _V4_MAPPED_PREFIX:
            return packed[12:]
        return packed[:8]
    return packed


class SourceRateLimiter:
    """A token bucket per source: ``rate`` tokens a second, at most ``burst`` saved up."""

    def __init__(self, *, rate: float, burst: int, max_sources: int) -> None:
        if not rate > 0 or burst < 1 or max_sources < 1:
            raise LocalProtocolError("rate, burst and max_sources must be positive")
        self.rate = rate
        self.burst = burst
        self.max_sources = max_sources
        # source key -> [tokens, time of the last refill]; the order is recency of use.
        self._buckets: OrderedDict[bytes, list[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, host: str, now: float) -> bool:
        """Take one token from ``host``'s bucket; False when it is empty."""
        key = source_key(host)
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_sources:
                self._buckets.popitem(last=False)
            self._buckets[key] = [self.burst - 1.0, now]
            return True
        self._buckets.move_to_end(key)
        tokens, last = bucket
        # max(): a clock that steps back must not drain or overfill the bucket.
        tokens = min(float(self.burst), tokens + max(0.0, now - last) * self.rate)
        bucket[1] = max(now, last)
        if tokens < 1.0:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1.0
        return True
