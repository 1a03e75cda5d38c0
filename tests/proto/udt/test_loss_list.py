"""The loss list both ends of a UDT connection keep: merging, splitting, popping, reporting."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wavesync_proto.udt.loss_list import LossList


def make(*ranges: tuple[int, int]) -> LossList:
    losses = LossList()
    for first, last in ranges:
        losses.insert(first, last)
    return losses


def test_insert_merges_overlapping_and_touching_ranges() -> None:
    losses = make((10, 12), (20, 25))
    assert losses.insert(13, 14) == 2  # touches 10..12
    assert losses.ranges() == [(10, 14), (20, 25)]
    assert losses.insert(15, 19) == 5  # fills the hole: one range
    assert losses.ranges() == [(10, 25)]
    assert losses.insert(5, 30) == 10
    assert losses.ranges() == [(5, 30)]
    assert len(losses) == 26


def test_insert_of_what_is_there_adds_nothing() -> None:
    losses = make((10, 20))
    assert losses.insert(12, 18) == 0
    assert losses.insert(20, 20) == 0
    assert losses.insert(5, 4) == 0  # empty range
    assert losses.ranges() == [(10, 20)]


def test_insert_keeps_ranges_sorted() -> None:
    losses = make((50, 50), (10, 10), (30, 31))
    assert losses.ranges() == [(10, 10), (30, 31), (50, 50)]
    assert losses.first() == 10
    assert 31 in losses
    assert 32 not in losses


def test_remove_splits_a_range() -> None:
    losses = make((10, 20))
    assert losses.remove(15)
    assert not losses.remove(15)
    assert losses.ranges() == [(10, 14), (16, 20)]
    assert losses.remove(10)
    assert losses.remove(20)
    assert losses.ranges() == [(11, 14), (16, 19)]
    assert len(losses) == 8


def test_remove_range_across_several_ranges() -> None:
    losses = make((1, 3), (5, 7), (9, 11))
    assert losses.remove_range(2, 10) == 7
    assert losses.ranges() == [(1, 1), (11, 11)]


def test_remove_below_is_an_ack() -> None:
    losses = make((1, 3), (5, 7), (9, 11))
    assert losses.remove_below(6) == 4
    assert losses.ranges() == [(6, 7), (9, 11)]
    assert losses.remove_below(6) == 0
    assert losses.remove_below(100) == 5
    assert not losses


def test_pop_first_takes_numbers_in_order() -> None:
    losses = make((7, 8), (3, 3))
    assert [losses.pop_first() for _ in range(4)] == [3, 7, 8, None]
    assert len(losses) == 0


def test_numbers_past_two_to_the_31_need_no_wrapping() -> None:
    # The ends keep unwrapped numbers: a range across the wire's wrap is an ordinary one.
    top = 0x7FFFFFFF
    losses = make((top - 1, top + 2))
    assert len(losses) == 4
    assert [losses.pop_first() & top for _ in range(4)] == [top - 1, top, 0, 1]  # type: ignore[operator]


def test_due_reports_only_ranges_not_reported_within_the_interval() -> None:
    losses = LossList()
    losses.insert(1, 2, stamp=0.0)
    losses.insert(10, 10, stamp=0.5)
    assert losses.due(0.55, 0.1, max_ranges=10) == [(1, 2)]
    assert losses.due(0.6, 0.1, max_ranges=10) == [(10, 10)]
    assert losses.due(0.6, 0.1, max_ranges=10) == []
    assert losses.due(1.0, 0.1, max_ranges=1) == [(1, 2)]  # at most max_ranges


def test_a_merged_range_keeps_the_earliest_stamp() -> None:
    losses = LossList()
    losses.insert(1, 1, stamp=5.0)
    losses.insert(2, 2, stamp=1.0)
    assert losses.due(1.5, 0.5, max_ranges=5) == [(1, 2)]


operations = st.lists(
    st.tuples(
        st.sampled_from(["insert", "remove", "remove_range", "remove_below", "pop"]),
        st.integers(0, 60),
        st.integers(0, 8),
    ),
    max_size=60,
)


@pytest.mark.property
@given(operations)
def test_the_list_behaves_like_a_set_of_numbers(ops: list[tuple[str, int, int]]) -> None:
    losses = LossList()
    model: set[int] = set()
    for name, number, width in ops:
        if name == "insert":
            added = losses.insert(number, number + width)
            new = set(range(number, number + width + 1))
            assert added == len(new - model)
            model |= new
        elif name == "remove":
            assert losses.remove(number) == (number in model)
            model.discard(number)
        elif name == "remove_range":
            gone = set(range(number, number + width + 1)) & model
            assert losses.remove_range(number, number + width) == len(gone)
            model -= gone
        elif name == "remove_below":
            gone = {n for n in model if n < number}
            assert losses.remove_below(number) == len(gone)
            model -= gone
        else:
            expected = min(model) if model else None
            assert losses.pop_first() == expected
            if expected is not None:
                model.discard(expected)
        assert len(losses) == len(model)
        ranges = losses.ranges()
        assert {n for first, last in ranges for n in range(first, last + 1)} == model
        # Disjoint, sorted, and never touching (touching ranges are merged).
        assert all(a[1] + 1 < b[0] for a, b in itertools.pairwise(ranges))
