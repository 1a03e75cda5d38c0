"""A UDT loss list: sorted, merged ranges of lost sequence numbers (UDT 4.11 list.cpp).

This module owns one data structure, used by both ends of a connection: the
sender's list of packets to retransmit (``CSndLossList``) and the receiver's list
of packets still missing (``CRcvLossList``). It does not know about wire sequence
numbers: the sender and receiver keep *unwrapped* sequence numbers (plain ints
that count on past 2**31; the wire value is ``n & SEQ_MAX``), so no comparison
here has to go round the circle, and each end converts at its boundary.

Ranges are inclusive ``(first, last)`` pairs kept as two sorted lists, so that
finding a number is a bisection, not a scan; each range also carries the time it
was last reported (the receiver's periodic NAK resends only ranges not reported
within the NAK interval).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right

__all__ = ["LossList"]


class LossList:
    """Disjoint, non-adjacent inclusive ranges of ints, ascending."""

    __slots__ = ("_ends", "_length", "_stamps", "_starts")

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._stamps: list[float] = []
        self._length = 0

    def __len__(self) -> int:
        """How many numbers the list holds (not ranges)."""
        return self._length

    def __bool__(self) -> bool:
        return self._length > 0

    def __repr__(self) -> str:
        return f"LossList({self.ranges()!r})"

    @property
    def range_count(self) -> int:
        return len(self._starts)

    def ranges(self) -> list[tuple[int, int]]:
        """Every range, ascending."""
        return list(zip(self._starts, self._ends, strict=True))

    def first(self) -> int | None:
        """The smallest number in the list."""
        return self._starts[0] if self._starts else None

    def __contains__(self, number: int) -> bool:
        index = bisect_right(self._starts, number) - 1
        return index >= 0 and self._ends[index] >= number

    def insert(self, first: int, last: int, stamp: float = 0.0) -> int:
        """Add ``first..last``, merging with what overlaps or touches it; return how many were new.

        The merged range keeps the earliest stamp of its parts (the most overdue).
        """
        if last < first:
            return 0
        starts, ends, stamps = self._starts, self._ends, self._stamps
        # Ranges [i, j) overlap or touch first..last.
        i = bisect_left(ends, first - 1)
        j = bisect_right(starts, last + 1)
        if i >= j:
            starts.insert(i, first)
            ends.insert(i, last)
            stamps.insert(i, stamp)
            added = last - first + 1
        else:
            existing = 0
            for k in range(i, j):
                existing += ends[k] - starts[k] + 1
            new_first = min(first, starts[i])
            new_last = max(last, ends[j - 1])
            new_stamp = min(stamp, *stamps[i:j])
            starts[i:j] = [new_first]
            ends[i:j] = [new_last]
            stamps[i:j] = [new_stamp]
            added = new_last - new_first + 1 - existing
        self._length += added
        return added

    def remove(self, number: int) -> bool:
        """Take one number out (a retransmission arrived); False if it was not there."""
        return self.remove_range(number, number) == 1

    def remove_range(self, first: int, last: int) -> int:
        """Take ``first..last`` out, splitting ranges as needed; return how many were there."""
        if last < first or not self._starts:
            return 0
        starts, ends, stamps = self._starts, self._ends, self._stamps
        # Ranges [i, j) overlap first..last.
        i = bisect_left(ends, first)
        j = bisect_right(starts, last)
        if i >= j:
            return 0
        removed = 0
        for k in range(i, j):
            removed += min(ends[k], last) - max(starts[k], first) + 1
        new_starts: list[int] = []
        new_ends: list[int] = []
        new_stamps: list[float] = []
        if starts[i] < first:
            new_starts.append(starts[i])
            new_ends.append(first - 1)
            new_stamps.append(stamps[i])
        if ends[j - 1] > last:
            new_starts.append(last + 1)
            new_ends.append(ends[j - 1])
            new_stamps.append(stamps[j - 1])
        starts[i:j] = new_starts
        ends[i:j] = new_ends
        stamps[i:j] = new_stamps
        self._length -= removed
        return removed

    def remove_below(self, number: int) -> int:
        """Take out everything before ``number`` (an ACK); return how many were there."""
        if not self._starts or self._starts[0] >= number:
            return 0
        return self.remove_range(self._starts[0], number - 1)

    def pop_first(self) -> int | None:
        """Take out and return the smallest number (the next retransmission)."""
        starts = self._starts
        if not starts:
            return None
        number = starts[0]
        if number == self._ends[0]:
            del starts[0]
            del self._ends[0]
            del self._stamps[0]
        else:
            starts[0] = number + 1
        self._length -= 1
        return number

    def clear(self) -> None:
        self._starts.clear()
        self._ends.clear()
        self._stamps.clear()
        self._length = 0

    def due(self, now: float, interval: float, max_ranges: int) -> list[tuple[int, int]]:
        """Ranges last reported ``interval`` or more before ``now`` (at most ``max_ranges``).

        They are stamped ``now``: the caller reports them.
        """
        result: list[tuple[int, int]] = []
        starts, ends, stamps = self._starts, self._ends, self._stamps
        horizon = now - interval
        for k in range(len(starts)):
            if stamps[k] <= horizon:
                result.append((starts[k], ends[k]))
                stamps[k] = now
                if len(result) >= max_ranges:
                    break
        return result
