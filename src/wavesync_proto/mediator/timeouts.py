"""Fixed-timeout expiry lanes for the mediator service: O(1) touch, expire and next deadline.

This module owns "this key expires a fixed time after it was last touched",
for any number of keys. It does not know what the keys are (TCP peers, connect
sessions) or what expiry means for them: the service pops expired keys and decides.

Every lane has one timeout, so deadlines grow in the order keys were touched:
an insertion-ordered dict is already a priority queue, and a touch is a
``move_to_end``. That replaces a heap and its stale entries (a TCP peer is
touched on every message) with constant-time work and exactly one entry per key.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

from ..errors import LocalProtocolError

__all__ = ["TimeoutLane"]

_K = TypeVar("_K", bound=Hashable)


class TimeoutLane(Generic[_K]):
    """Keys that expire ``timeout`` seconds after their last ``touch``."""

    def __init__(self, timeout: float) -> None:
        if not timeout > 0:
            raise LocalProtocolError(f"a timeout must be positive, not {timeout!r}")
        self.timeout = timeout
        self._deadlines: OrderedDict[_K, float] = OrderedDict()
        # The newest deadline handed out. A caller whose clock steps back would
        # otherwise put an earlier deadline behind later ones and break the order
        # the lane relies on; clamping only makes such a key expire a little late.
        self._latest = float("-inf")

    def __len__(self) -> int:
        return len(self._deadlines)

    def __contains__(self, key: object) -> bool:
        return key in self._deadlines

    def touch(self, key: _K, now: float) -> float:
        """(Re)start ``key``'s timeout at ``now``; return its deadline."""
        deadline = max(now + self.timeout, self._latest)
        self._latest = deadline
        self._deadlines[key] = deadline
        self._deadlines.move_to_end(key)
        return deadline

    def discard(self, key: _K) -> None:
        """Forget ``key`` (no error if it is not here)."""
        self._deadlines.pop(key, None)

    def deadline(self, key: _K) -> float | None:
        """When ``key`` expires, or None if it is not in the lane."""
        return self._deadlines.get(key)

    def next_deadline(self) -> float | None:
        """The earliest deadline in the lane, or None when it is empty."""
        for deadline in self._deadlines.values():
            return deadline
        return None

    def pop_expired(self, now: float) -> _K | None:
        """Remove and return one key whose deadline is at or before ``now``, oldest first."""
        for key, deadline in self._deadlines.items():
            if deadline > now:
                return None
            del self._deadlines[key]
            return key
        return None
