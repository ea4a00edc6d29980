"""The allocator's view of bindings (services/allocator/binding_view/domain.py): pure rules of sequence order,
duplicates, gaps and condition edges."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.allocator.binding_view.domain import (
    Change,
    ViewRecord,
    apply_change,
    apply_condition,
    missing_count,
    replay_ranges,
)

HAVIP = uuid.UUID("00000000-0000-4000-8000-000000000001")
HOLDERS = [uuid.UUID(f"00000000-0000-4000-8000-0000000000{i:02x}") for i in range(16, 20)]
T0 = datetime(2026, 11, 30, 8, 0, tzinfo=UTC)
NOW = T0 + timedelta(hours=1)


def change(sequence: int) -> Change:
    """Transition n of the HAVIP: to holder n % 4 (every fifth a release), at a time of its own."""
    released = sequence % 5 == 0
    holder = None if released else HOLDERS[sequence % 4]
    return Change(
        havip_id=HAVIP,
        sequence=sequence,
        previous_instance_id=None if sequence == 1 else HOLDERS[(sequence - 1) % 4],
        instance_id=holder,
        mac=None if released else f"02:00:00:00:00:{sequence % 4:02x}",
        captured_at=None if released else T0 + timedelta(seconds=sequence),
        committed_at=T0 + timedelta(seconds=sequence, milliseconds=2),
        watcher_id=None if released else "w1",
        reason="release" if released else "claim",
    )


def test_in_order_each_transition_is_applied_and_becomes_the_state() -> None:
    record = ViewRecord(HAVIP)
    for n in (1, 2, 3):
        assert apply_change(record, change(n), NOW).outcome == "applied"
    assert (record.sequence, record.instance_id, record.mac) == (3, HOLDERS[3], "02:00:00:00:00:03")
    assert record.last_transition_at == change(3).committed_at
    assert record.last_seen_at == change(3).captured_at
    assert record.missing == []
    assert record.gap_since is None


def test_a_repeat_is_a_duplicate_and_changes_nothing() -> None:
    record = ViewRecord(HAVIP)
    apply_change(record, change(1), NOW)
    apply_change(record, change(2), NOW)
    before = (record.sequence, record.instance_id, record.last_transition_at)
    applied = apply_change(record, change(1), NOW)
    assert (applied.outcome, applied.recorded) == ("duplicate", False)
    assert (record.sequence, record.instance_id, record.last_transition_at) == before


def test_a_gap_applies_the_newer_state_and_records_what_is_missing_until_it_arrives() -> None:
    record = ViewRecord(HAVIP)
    apply_change(record, change(1), NOW)
    applied = apply_change(record, change(4), NOW)
    assert (applied.outcome, applied.gap, applied.recorded) == ("gap", (2, 3), True)
    assert (record.sequence, record.instance_id) == (4, HOLDERS[0])  # the newest state, at once
    assert (record.missing, record.gap_since) == ([(2, 3)], NOW)

    later = NOW + timedelta(seconds=9)
    assert apply_change(record, change(3), later).outcome == "filled"
    assert (record.sequence, record.instance_id) == (4, HOLDERS[0])  # a late one changes only the history
    assert (record.missing, record.gap_since) == ([(2, 2)], NOW)
    assert apply_change(record, change(3), later).outcome == "duplicate"
    assert apply_change(record, change(2), later).outcome == "filled"
    assert (record.missing, record.gap_since) == ([], None)


def test_a_release_unbinds_and_keeps_when_the_holder_was_last_seen() -> None:
    record = ViewRecord(HAVIP)
    for n in range(1, 6):
        apply_change(record, change(n), NOW)
    assert (record.instance_id, record.mac, record.bound) == (None, None, False)
    assert record.last_seen_at == change(4).captured_at
    assert record.last_transition_at == change(5).committed_at


def test_changes_of_another_havip_or_without_a_sequence_are_refused() -> None:
    with pytest.raises(ValueError, match="applied to the record"):
        apply_change(ViewRecord(uuid.uuid4()), change(1), NOW)
    bad = Change(HAVIP, 0, None, None, None, None, T0, None, "release")
    with pytest.raises(ValueError, match="start at 1"):
        apply_change(ViewRecord(HAVIP), bad, NOW)


@given(
    last=st.integers(min_value=1, max_value=40),
    data=st.data(),
)
def test_any_order_with_repeats_and_losses_ends_in_the_newest_state_and_the_exact_gaps(
    last: int, data: st.DataObject
) -> None:
    """Whatever the order, the repeats and the losses: the state is that of the newest transition delivered,
    each delivered transition is recorded exactly once, and what is missing is exactly what was lost below it."""
    lost = data.draw(st.sets(st.integers(min_value=1, max_value=last)))
    delivered = [n for n in range(1, last + 1) if n not in lost]
    repeats = data.draw(st.lists(st.sampled_from(delivered), max_size=20)) if delivered else []
    order = data.draw(st.permutations(delivered + repeats))
    record = ViewRecord(HAVIP)
    recorded: list[int] = []
    for n in order:
        if apply_change(record, change(n), NOW).recorded:
            recorded.append(n)
    assert sorted(recorded) == delivered
    newest = max(delivered, default=0)
    assert record.sequence == newest
    if delivered:
        assert record.instance_id == change(newest).instance_id
        assert record.last_transition_at == change(newest).committed_at
    missing = {n for first, last_missing in record.missing for n in range(first, last_missing + 1)}
    assert missing == {n for n in lost if n < newest}
    assert missing_count(record.missing) == len(missing)
    assert record.missing == sorted(record.missing)
    assert all(a[1] < b[0] - 1 for a, b in zip(record.missing, record.missing[1:], strict=False))
    assert (record.gap_since is None) == (not record.missing)


@given(
    edges=st.lists(
        st.tuples(st.integers(0, 10_000), st.booleans()), min_size=1, max_size=30, unique_by=lambda e: e[0]
    )
)
def test_the_newest_condition_edge_wins_in_any_order(edges: list[tuple[int, bool]]) -> None:
    record = ViewRecord(HAVIP)
    for at, started in edges:
        apply_condition(record, "split_brain", started, T0 + timedelta(milliseconds=at))
    newest_at, newest_started = max(edges)
    assert record.split_brain is newest_started
    assert record.split_brain_changed_at == T0 + timedelta(milliseconds=newest_at)
    assert (record.flapping, record.flapping_changed_at) == (False, None)


def test_a_stale_edge_is_refused() -> None:
    record = ViewRecord(HAVIP)
    assert apply_condition(record, "flapping", True, T0 + timedelta(seconds=2))
    assert not apply_condition(record, "flapping", False, T0 + timedelta(seconds=1))
    assert record.flapping is True
    assert apply_condition(record, "flapping", False, T0 + timedelta(seconds=3))
    assert record.flapping is False


@given(
    ranges=st.lists(st.tuples(st.integers(1, 100), st.integers(0, 50)), max_size=5),
    span=st.integers(1, 20),
)
def test_replay_ranges_cover_the_gaps_in_pieces_no_longer_than_allowed(
    ranges: list[tuple[int, int]], span: int
) -> None:
    missing, start = [], 0
    for offset, length in ranges:  # sorted, disjoint
        first = start + offset
        missing.append((first, first + length))
        start = first + length + 1
    pieces = replay_ranges(HAVIP, missing, span)
    assert all(h == HAVIP and 1 <= last - first + 1 <= span for h, first, last in pieces)
    covered = [n for _, first, last in pieces for n in range(first, last + 1)]
    assert covered == [n for first, last in missing for n in range(first, last + 1)]
