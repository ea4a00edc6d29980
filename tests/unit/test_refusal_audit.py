"""The refusal audit (pure): rows folded per (address, MAC, reason) and window, paced, every frame counted once
whatever writes fail. Times are passed in: the tests are their clock."""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from hypothesis import given, settings
from hypothesis import strategies as st

from services.binding.audit_pacing import AuditPacer
from services.binding.refusal_audit import (
    MAX_REFUSAL_FOLD_NS,
    REFUSAL_FOLD_NS,
    AuditWrite,
    Refusal,
    RefusalAudit,
    RejectedClaim,
)

S = 1_000_000_000
ADDRESSES = [IPv4Address("192.0.2.1") + i for i in range(4)]
SPOOFER = "02:ee:ee:ee:ee:01"


def refusal(at_ns: int, *, address: int = 0, frames: int = 1, mac: str = SPOOFER) -> Refusal:
    return Refusal(uuid.uuid4(), None, ADDRESSES[address], mac, "unknown_mac", at_ns, "w", frames)


@dataclass
class Database:
    """What the repository would hold: rows by claim id (INSERT … ON CONFLICT DO NOTHING, UPDATE count)."""

    rows: dict[uuid.UUID, RejectedClaim] = field(default_factory=dict)
    lost_updates: int = 0

    def commit(self, write: AuditWrite) -> None:
        for row in write.rows:
            assert row.claim_id not in self.rows, "one claim id, one row"
            self.rows[row.claim_id] = RejectedClaim(**{f: getattr(row, f) for f in row.__slots__})
        for claim_id, frames in write.folded.items():
            if claim_id in self.rows:
                self.rows[claim_id].count += frames
            else:
                self.lost_updates += frames

    def frames(self) -> int:
        return sum(row.count for row in self.rows.values())


def drain(audit: RefusalAudit, db: Database, now_s: float) -> float:
    """Release every waiting row and the ledger, a second at a time."""
    for _ in range(10_000):
        write = audit.take_write(now_s, release=True)
        db.commit(write)
        audit.committed(write)
        if not audit.refusals_waiting and not write:
            return now_s
        now_s += 1.0
    raise AssertionError("the audit never drained")


def test_repeats_within_the_window_fold_into_one_row_and_stored_rows_grow_by_update() -> None:
    audit, db = RefusalAudit(AuditPacer(100, 10)), Database()
    first = refusal(0, frames=2)
    audit.refuse(first, 0.0)
    audit.refuse(refusal(S // 2, frames=3), 0.0)
    write = audit.take_write(0.0)
    assert [(r.claim_id, r.count) for r in write.rows] == [(first.claim_id, 5)]
    db.commit(write)
    audit.committed(write)
    audit.refuse(refusal(S - 1), 0.0)
    write = audit.take_write(0.0)
    assert (write.rows, write.folded) == ([], {first.claim_id: 1})


def test_one_frame_seen_by_two_watchers_is_one_row_whichever_clock_is_behind() -> None:
    """Two watchers on a segment refuse the same spoofed frame, their stamps a few µs apart either way: one row
    (and one event) counting both claims — whether the later-arriving one is stamped later or earlier."""
    for second_stamp in (5_000, -5_000):
        audit, db = RefusalAudit(AuditPacer(100, 10)), Database()
        first = refusal(10 * S)
        audit.refuse(first, 0.0)
        audit.refuse(
            Refusal(uuid.uuid4(), None, ADDRESSES[0], SPOOFER, "unknown_mac", 10 * S + second_stamp, "w2"), 0.0
        )
        write = audit.take_write(0.0)
        assert [(r.claim_id, r.count) for r in write.rows] == [(first.claim_id, 2)]
        db.commit(write)
        audit.committed(write)
        # A refusal a whole window before the row's first is another burst: a row of its own.
        audit.refuse(refusal(10 * S - REFUSAL_FOLD_NS), 0.0)
        assert len(audit.take_write(0.0).rows) == 1


def test_a_refusal_back_right_after_its_window_doubles_it_and_a_pause_resets_it() -> None:
    audit, db = RefusalAudit(AuditPacer(1000, 100)), Database()
    t, windows = 0, []
    for _ in range(8):  # a flood without pause: every row's window twice the one before, up to the maximum
        audit.refuse(refusal(t), 0.0)
        write = audit.take_write(0.0)
        db.commit(write)
        audit.committed(write)
        windows.append(t)
        t += REFUSAL_FOLD_NS * 2 ** min(len(windows) - 1, 6)
    gaps = [b - a for a, b in itertools.pairwise(windows)]
    assert gaps == [REFUSAL_FOLD_NS * 2**i for i in range(6)] + [MAX_REFUSAL_FOLD_NS]
    audit.refuse(refusal(t + 2 * MAX_REFUSAL_FOLD_NS), 0.0)  # after a pause as long as two windows
    audit.refuse(refusal(t + 2 * MAX_REFUSAL_FOLD_NS + REFUSAL_FOLD_NS), 0.0)  # a second later: a new row
    assert len(audit.take_write(0.0).rows) == 2


def test_rows_over_the_budget_wait_first_refusals_before_repeats_frames_folding_into_them() -> None:
    audit, db = RefusalAudit(AuditPacer(1, 1)), Database()
    audit.refuse(refusal(0, address=0), 0.0)  # the burst: written now
    write = audit.take_write(0.0)
    db.commit(write)
    audit.committed(write)
    audit.refuse(refusal(3 * S, address=0), 0.0)  # a repeat of address 0 (its window ended): waits
    audit.refuse(refusal(3 * S, address=1), 0.0)  # a first refusal: waits, ahead of the repeat
    audit.refuse(refusal(60 * S, address=1, frames=4), 0.0)  # long after its window, but it waits: folded
    write = audit.take_write(0.0)
    assert not write
    audit.committed(write)
    assert audit.refusals_waiting == 2
    released = audit.take_write(1.0, release=True)
    assert [(r.address, r.count) for r in released.rows] == [(ADDRESSES[1], 5)]
    audit.committed(released)
    assert [r.address for r in audit.take_write(2.0, release=True).rows] == [ADDRESSES[0]]


def test_a_released_row_whose_write_fails_waits_again_at_the_front_with_every_frame() -> None:
    audit, db = RefusalAudit(AuditPacer(1, 1)), Database()
    for address in range(3):
        audit.refuse(refusal(0, address=address), 0.0)
    write = audit.take_write(0.0)
    db.commit(write)
    audit.committed(write)
    released = audit.take_write(1.0, release=True)
    assert [r.address for r in released.rows] == [ADDRESSES[1]]
    audit.failed(released)
    for address in range(3):
        audit.refuse(refusal(1_000, address=address, frames=2), 1.0)
    write = audit.take_write(1.0)
    db.commit(write)
    audit.committed(write)
    again = audit.take_write(2.0, release=True)
    assert [(r.address, r.count) for r in again.rows] == [(ADDRESSES[1], 3)]
    db.commit(again)
    audit.committed(again)
    drain(audit, db, 3.0)
    assert db.frames() == 9
    assert db.lost_updates == 0


def test_a_failed_batch_counts_none_of_its_frames_and_its_retry_counts_them_once() -> None:
    audit, db = RefusalAudit(AuditPacer(1, 1)), Database()
    audit.refuse(refusal(0), 0.0)
    write = audit.take_write(0.0)
    db.commit(write)
    audit.committed(write)
    audit.refuse(refusal(0, address=1), 0.0)  # over the budget: would wait
    batch = [refusal(10, address=a, frames=3) for a in (0, 1)]
    for r in batch:
        audit.refuse(r, 0.0)
    audit.failed(audit.take_write(0.0))
    assert audit.refusals_waiting == 0
    for r in batch:  # the consumer retries the batch
        audit.refuse(r, 0.0)
    write = audit.take_write(0.0)
    db.commit(write)
    audit.committed(write)
    drain(audit, db, 1.0)
    assert db.frames() == 1 + 3 + 3


def test_a_draft_whose_decisions_failed_is_abandoned() -> None:
    audit = RefusalAudit(AuditPacer(1, 1))
    audit.refuse(refusal(0), 0.0)
    audit.refuse(refusal(0, address=1), 0.0)
    audit.abandon_draft()
    assert audit.refusals_waiting == 0
    assert not audit.take_write(5.0, release=True)


def test_the_summary_counts_frames_by_reason_and_claimants() -> None:
    audit = RefusalAudit(AuditPacer(10))
    assert audit.take_summary() is None
    audit.refuse(refusal(0, frames=3), 0.0)
    audit.refuse(refusal(0, address=1, mac="02:00:00:00:00:09"), 0.0)
    summary = audit.take_summary()
    assert summary is not None
    assert (summary.frames_by_reason, summary.claimants) == ({"unknown_mac": 4}, 2)
    assert audit.take_summary() is None


# A story: batches of refusals (address, capture step, frames), each written as the service writes it — possibly
# while the previous batch's write is still under way — and each write committing or failing; a failed batch is
# retried until it commits, as the consumer retries it.
batches = st.lists(
    st.tuples(
        st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1500), st.integers(1, 5)), min_size=0, max_size=6),
        st.booleans(),  # its write stays under way while the next batch is decided
        st.lists(st.just(True), max_size=3),  # failed attempts before it commits
        st.floats(0, 2),  # seconds before the next batch
        st.booleans(),  # a release write after it, which may fail
    ),
    max_size=25,
)


@settings(max_examples=300, deadline=None)
@given(story=batches, rate=st.sampled_from([1.0, 5.0, 50.0]), burst=st.integers(1, 3))
def test_every_frame_is_counted_exactly_once_whatever_writes_fail(
    story: list[tuple[list[tuple[int, int, int]], bool, list[bool], float, bool]], rate: float, burst: int
) -> None:
    audit, db = RefusalAudit(AuditPacer(rate, burst)), Database()
    now_s, t_ns, expected = 0.0, 0, 0
    under_way: list[tuple[AuditWrite, list[Refusal], list[bool]]] = []

    def settle(write: AuditWrite, refusals: list[Refusal], failures: list[bool]) -> None:
        nonlocal expected
        while failures:
            failures = failures[1:]
            audit.failed(write)
            for r in refusals:  # retried
                audit.refuse(r, now_s)
            write = audit.take_write(now_s)
        db.commit(write)
        audit.committed(write)
        expected += sum(r.frames for r in refusals)

    for claims, linger, failures, pause, release in story:
        refusals = []
        for address, step_ms, frames in claims:
            t_ns += step_ms * 1_000_000
            refusals.append(refusal(t_ns, address=address, frames=frames))
        for r in refusals:
            audit.refuse(r, now_s)
        write = audit.take_write(now_s)
        for earlier in under_way:
            settle(*earlier)
        under_way = []
        if linger:
            under_way.append((write, refusals, failures))
        else:
            settle(write, refusals, failures)
        now_s += pause
        if release:
            released = audit.take_write(now_s, release=True)
            if failures:
                audit.failed(released)
            else:
                db.commit(released)
                audit.committed(released)
    for earlier in under_way:
        settle(*earlier)
    drain(audit, db, now_s + 1)
    assert db.lost_updates == 0
    assert db.frames() == expected


@settings(max_examples=300, deadline=None)
@given(story=batches, rate=st.sampled_from([1.0, 5.0, 50.0]), burst=st.integers(1, 3))
def test_at_most_one_row_per_window_per_refusal_and_no_more_than_burst_plus_rate_times_span(
    story: list[tuple[list[tuple[int, int, int]], bool, list[bool], float, bool]], rate: float, burst: int
) -> None:
    audit, db = RefusalAudit(AuditPacer(rate, burst)), Database()
    now_s, t_ns, rows_taken = 0.0, 0, 0
    for claims, _linger, failures, pause, release in story:
        refusals = []
        for address, step_ms, frames in claims:
            t_ns += step_ms * 1_000_000
            refusals.append(refusal(t_ns, address=address, frames=frames))
        for attempt_fails in [True] * len(failures) + [False]:
            for r in refusals:
                audit.refuse(r, now_s)
            write = audit.take_write(now_s, release=release)
            rows_taken += len(write.rows)
            if attempt_fails:
                audit.failed(write)
            else:
                db.commit(write)
                audit.committed(write)
        assert rows_taken <= burst + rate * now_s + 1e-6  # every row written or attempted took the pacer's token
        now_s += pause
        audit.forget_windows(t_ns)
    drain(audit, db, now_s + 1)
    by_key: dict[tuple[IPv4Address, str], list[int]] = {}
    for row in db.rows.values():
        by_key.setdefault((row.address, row.reason), []).append(int(row.captured_at.timestamp() * 1e9))
    for starts in by_key.values():
        starts.sort()
        for a, b in itertools.pairwise(starts):
            assert b - a >= REFUSAL_FOLD_NS - 1_000, (a, b)  # the earliest window is a second (µs rounding)
