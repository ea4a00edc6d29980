"""Postgres adapter of the allocator's read model (tables `view_*` of the allocator's schema, migration 0004).

Every function runs in the caller's transaction. The records of a batch are locked in one order (by HAVIP id),
so two consumers of the view never deadlock, and a release's HAVIP_BOUND check (havips/service.py), which
locks its record too, sees either the state before a batch or after it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from services.allocator.binding_view.domain import Change, SequenceRange, ViewRecord
from shared.db import Connection
from shared.events import ClaimRejected

# One statement creates the missing records and locks them all (ON CONFLICT DO UPDATE locks the existing row),
# in HAVIP-id order, and returns them.
_LOCK = """
    INSERT INTO allocator.view_bindings AS v (havip_id) SELECT id FROM unnest($1::uuid[]) AS u(id) ORDER BY id
    ON CONFLICT (havip_id) DO UPDATE SET havip_id = v.havip_id
    RETURNING havip_id, sequence, instance_id, mac::text AS mac, last_transition_at, last_seen_at, flapping,
              flapping_changed_at, split_brain, split_brain_changed_at, missing, gap_since"""
# The records and the new history rows in one statement: one round trip less on the way to the API.
_SAVE_AND_RECORD = """
    WITH saved AS (
    UPDATE allocator.view_bindings AS v SET
        sequence = r.sequence, instance_id = r.instance_id, mac = r.mac,
        last_transition_at = r.last_transition_at, last_seen_at = r.last_seen_at,
        flapping = r.flapping, flapping_changed_at = r.flapping_changed_at,
        split_brain = r.split_brain, split_brain_changed_at = r.split_brain_changed_at,
        missing = r.missing::int8multirange, gap_since = r.gap_since,
        repair_requested_at = CASE WHEN r.gap_since IS NULL THEN NULL ELSE v.repair_requested_at END,
        repair_attempts = CASE WHEN r.gap_since IS NULL THEN 0 ELSE v.repair_attempts END
    FROM unnest($1::uuid[], $2::bigint[], $3::uuid[], $4::macaddr[], $5::timestamptz[], $6::timestamptz[],
                $7::boolean[], $8::timestamptz[], $9::boolean[], $10::timestamptz[], $11::text[],
                $12::timestamptz[])
        AS r(havip_id, sequence, instance_id, mac, last_transition_at, last_seen_at, flapping,
             flapping_changed_at, split_brain, split_brain_changed_at, missing, gap_since)
    WHERE v.havip_id = r.havip_id
    RETURNING 1)
    INSERT INTO allocator.view_transitions (havip_id, sequence, from_instance_id, to_instance_id, mac,
        captured_at, committed_at, watcher_id, reason, cause)
    SELECT * FROM unnest($13::uuid[], $14::bigint[], $15::uuid[], $16::uuid[], $17::macaddr[],
                         $18::timestamptz[], $19::timestamptz[], $20::text[], $21::text[], $22::text[])
    ON CONFLICT (havip_id, sequence) DO NOTHING"""
_INSERT_REFUSALS = """
    INSERT INTO allocator.view_refusals (event_id, havip_id, address, mac, reason, captured_at, watcher_id, count)
    SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::inet[], $4::macaddr[], $5::text[], $6::timestamptz[],
                         $7::text[], $8::bigint[])
    ON CONFLICT (event_id) DO NOTHING
    RETURNING event_id"""


def _multirange_text(missing: Sequence[SequenceRange]) -> str:
    """int8multirange literal of closed ranges: [(3, 5)] → '{[3,6)}'."""
    return "{" + ",".join(f"[{first},{last + 1})" for first, last in missing) + "}"


def _closed(ranges: Iterable[asyncpg.Range[int]]) -> list[SequenceRange]:
    """asyncpg's canonical int8 ranges [lower, upper) as closed (first, last)."""
    return [_closed_range(r) for r in ranges]


def _closed_range(r: asyncpg.Range[int]) -> SequenceRange:
    if r.lower is None or r.upper is None:
        raise ValueError(f"a gap of sequence numbers is bounded on both sides, not {r}")
    return (r.lower, r.upper - 1)


async def lock_records(conn: Connection, havip_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, ViewRecord]:
    """The records of these HAVIPs (created empty where missing), locked until the caller's commit."""
    ids = sorted(set(havip_ids))
    if not ids:
        return {}
    return {
        r["havip_id"]: ViewRecord(
            havip_id=r["havip_id"],
            sequence=r["sequence"],
            instance_id=r["instance_id"],
            mac=r["mac"],
            last_transition_at=r["last_transition_at"],
            last_seen_at=r["last_seen_at"],
            flapping=r["flapping"],
            flapping_changed_at=r["flapping_changed_at"],
            split_brain=r["split_brain"],
            split_brain_changed_at=r["split_brain_changed_at"],
            missing=_closed(r["missing"]),
            gap_since=r["gap_since"],
        )
        for r in await conn.fetch(_LOCK, ids)
    }


async def save(conn: Connection, records: Sequence[ViewRecord], history: Sequence[Change]) -> None:
    """Write the records a batch changed and the transitions it added to the history (a transition already
    recorded is left as it is)."""
    if not records and not history:
        return
    await conn.execute(
        _SAVE_AND_RECORD,
        [r.havip_id for r in records],
        [r.sequence for r in records],
        [r.instance_id for r in records],
        [r.mac for r in records],
        [r.last_transition_at for r in records],
        [r.last_seen_at for r in records],
        [r.flapping for r in records],
        [r.flapping_changed_at for r in records],
        [r.split_brain for r in records],
        [r.split_brain_changed_at for r in records],
        [_multirange_text(r.missing) for r in records],
        [r.gap_since for r in records],
        [c.havip_id for c in history],
        [c.sequence for c in history],
        [c.previous_instance_id for c in history],
        [c.instance_id for c in history],
        [c.mac for c in history],
        [c.captured_at for c in history],
        [c.committed_at for c in history],
        [c.watcher_id for c in history],
        [c.reason for c in history],
        [c.cause for c in history],
    )


async def insert_refusals(conn: Connection, refusals: Sequence[tuple[uuid.UUID, ClaimRejected]]) -> set[uuid.UUID]:
    """Store the refusals not stored yet (by event id); returns the event ids that were new."""
    if not refusals:
        return set()
    # In event-id order: two replicas given the same redelivered refusals insert them in one order, so their
    # waits on the unique index never cross.
    refusals = sorted(refusals, key=lambda refusal: refusal[0])
    rows = await conn.fetch(
        _INSERT_REFUSALS,
        [event_id for event_id, _ in refusals],
        [r.havip_id for _, r in refusals],
        [r.address for _, r in refusals],
        [r.mac for _, r in refusals],
        [r.reason for _, r in refusals],
        [r.captured_at for _, r in refusals],
        [r.watcher_id for _, r in refusals],
        [r.count for _, r in refusals],
    )
    return {row["event_id"] for row in rows}


@dataclass(frozen=True, slots=True)
class Gapped:
    havip_id: uuid.UUID
    missing: list[SequenceRange]
    attempts: int


async def gapped_records(
    conn: Connection, *, grace_s: float, retry_s: float, max_attempts: int, limit: int
) -> list[Gapped]:
    """Records whose history has had a gap for longer than `grace_s` (a late event may still fill a younger
    one) and for which no replay was asked within `retry_s`, oldest gap first; locked (others skipped)."""
    rows = await conn.fetch(
        """SELECT havip_id, missing, repair_attempts FROM allocator.view_bindings
           WHERE gap_since IS NOT NULL AND gap_since < now() - make_interval(secs => $1)
             AND (repair_requested_at IS NULL OR repair_requested_at < now() - make_interval(secs => $2))
             AND repair_attempts < $3
           ORDER BY gap_since LIMIT $4 FOR UPDATE SKIP LOCKED""",
        grace_s,
        retry_s,
        max_attempts,
        limit,
    )
    return [Gapped(r["havip_id"], _closed(r["missing"]), r["repair_attempts"]) for r in rows]


async def mark_repair_requested(conn: Connection, havip_ids: Sequence[uuid.UUID]) -> None:
    await conn.execute(
        """UPDATE allocator.view_bindings SET repair_requested_at = now(), repair_attempts = repair_attempts + 1
           WHERE havip_id = ANY($1::uuid[])""",
        list(havip_ids),
    )


async def count_open_gaps(conn: Connection) -> int:
    count: int = await conn.fetchval("SELECT count(*) FROM allocator.view_bindings WHERE gap_since IS NOT NULL")
    return count


async def holder_for_release(conn: Connection, havip_id: uuid.UUID) -> uuid.UUID | None:
    """The holder the view shows, with the HAVIP's record locked until the caller's commit: a batch of binding
    events touching it waits (or was committed before), so the release decides on one state."""
    holder: uuid.UUID | None = await conn.fetchval(
        """INSERT INTO allocator.view_bindings AS v (havip_id) VALUES ($1)
           ON CONFLICT (havip_id) DO UPDATE SET havip_id = v.havip_id
           RETURNING instance_id""",
        havip_id,
    )
    return holder


async def havips_held_by(conn: Connection, instance_id: uuid.UUID) -> list[uuid.UUID]:
    """The HAVIPs the view shows the instance holding, their records locked until the caller's commit (in
    HAVIP-id order, as the view's consumer locks them)."""
    rows = await conn.fetch(
        """SELECT havip_id FROM allocator.view_bindings WHERE instance_id = $1 ORDER BY havip_id FOR UPDATE""",
        instance_id,
    )
    return [row["havip_id"] for row in rows]


async def delete_old_refusals(conn: Connection, older_than: datetime, limit: int = 10_000) -> int:
    """Audit retention: remove refusals recorded before `older_than` (at most `limit` a call)."""
    status: str = await conn.execute(
        """DELETE FROM allocator.view_refusals WHERE id IN (
               SELECT id FROM allocator.view_refusals WHERE recorded_at < $1 ORDER BY id LIMIT $2)""",
        older_than,
        limit,
    )
    return int(status.rsplit(" ", 1)[-1])
