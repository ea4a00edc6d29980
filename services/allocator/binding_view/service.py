"""The allocator's read model of the binding service's state: consumed from the binding's events, one
transaction per batch, so that the API shows holders, history, flags and refusals from the allocator's own tables.

`handle` is the handler of the allocator's own durable queue (`allocator.events`, shared/messaging.py
BatchConsumer: acknowledged after the commit, dead-lettered after bounded tries, redelivered on failure). It is
idempotent: a transition is recognised by its per-HAVIP `sequence` (domain.py), a refusal by its event id, a
condition edge by its time. A sequence gap is applied at once (the newest state is the truth for the current
holder), logged and counted; `request_repairs`, run every few seconds, asks the binding service to publish the
missing transitions again (`havip.binding.replay_requested` → `havip.binding.replayed`) once a gap has stayed
open longer than a late event would take, and asks again while it stays open, a bounded number of times.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Literal

from services.allocator import metrics
from services.allocator.binding_view import repository
from services.allocator.binding_view.domain import Applied, Change, ViewRecord, apply_change, apply_condition
from services.allocator.binding_view.domain import replay_ranges as cut_ranges
from services.allocator.database import Database
from shared import events
from shared.messaging import Delivery

log = logging.getLogger(__name__)

QUEUE = "allocator.events"
CHANGED = ("havip.binding.changed", "havip.binding.replayed")
CONDITIONS = (
    "havip.flapping.started",
    "havip.flapping.stopped",
    "havip.split_brain.started",
    "havip.split_brain.stopped",
)
SUBSCRIPTIONS = (*CHANGED, "havip.claim.rejected", *CONDITIONS)

EventKind = Literal["transition", "refusal", "condition"]


def _change(data: events.BindingChanged) -> Change:
    return Change(
        havip_id=data.havip_id,
        sequence=data.sequence,
        previous_instance_id=data.previous.instance_id if data.previous else None,
        instance_id=data.current.instance_id if data.current else None,
        mac=data.current.mac if data.current else None,
        captured_at=data.captured_at,
        committed_at=data.committed_at,
        watcher_id=data.watcher_id,
        reason=data.reason,
        cause=data.cause,
    )


class BindingView:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def handle(self, deliveries: Sequence[Delivery]) -> None:
        """Take one batch of binding events into the view, in one transaction."""
        havip_ids: set[uuid.UUID] = set()
        for delivery in deliveries:
            data = delivery.data
            if isinstance(data, events.BindingChanged | events.HavipCondition):
                havip_ids.add(data.havip_id)
            elif not isinstance(data, events.ClaimRejected):
                raise events.InvalidEvent(f"the allocator's view does not take {delivery.envelope.type!r}")
        outcomes: Counter[tuple[str, str]] = Counter()
        delays: list[tuple[EventKind, datetime]] = []
        gaps: list[tuple[uuid.UUID, tuple[int, int]]] = []
        async with self._db.transaction() as tx:
            records = await repository.lock_records(tx.conn, havip_ids)
            touched: dict[uuid.UUID, ViewRecord] = {}
            history: list[Change] = []
            refusals: list[tuple[uuid.UUID, events.ClaimRejected]] = []
            refusal_times: dict[uuid.UUID, datetime] = {}
            now = datetime.now(UTC)
            for delivery in deliveries:
                data, event_type = delivery.data, delivery.envelope.type
                if isinstance(data, events.BindingChanged):
                    record = records[data.havip_id]
                    change = _change(data)
                    applied = apply_change(record, change, now)
                    if applied.recorded:
                        history.append(change)
                        touched[record.havip_id] = record
                    replayed = event_type == "havip.binding.replayed"
                    outcomes[("replayed" if replayed else "transition", applied.outcome)] += 1
                    if applied.gap is not None:
                        gaps.append((record.havip_id, applied.gap))
                    if _fresh(applied) and not replayed:
                        delays.append(("transition", data.committed_at))
                elif isinstance(data, events.HavipCondition):
                    record = records[data.havip_id]
                    condition: Literal["flapping", "split_brain"] = (
                        "flapping" if event_type.startswith("havip.flapping.") else "split_brain"
                    )
                    started = event_type.endswith(".started")
                    if apply_condition(record, condition, started, delivery.envelope.occurred_at):
                        touched[record.havip_id] = record
                        outcomes[("condition", "applied")] += 1
                        delays.append(("condition", delivery.envelope.occurred_at))
                    else:
                        outcomes[("condition", "stale")] += 1
                elif isinstance(data, events.ClaimRejected):
                    refusals.append((delivery.envelope.event_id, data))
                    refusal_times[delivery.envelope.event_id] = delivery.envelope.occurred_at
            await repository.save(tx.conn, list(touched.values()), history)
            new_refusals = await repository.insert_refusals(tx.conn, refusals)
        committed = datetime.now(UTC)
        for event_id in refusal_times:
            if event_id in new_refusals:
                delays.append(("refusal", refusal_times[event_id]))
        outcomes[("refusal", "applied")] += len(new_refusals)
        outcomes[("refusal", "duplicate")] += len(refusals) - len(new_refusals)
        for kind, since in delays:
            metrics.VIEW_DELAY.labels(kind).observe(max(0.0, (committed - since).total_seconds()))
        for (event, outcome), count in outcomes.items():
            if count:
                metrics.VIEW_EVENTS.labels(event, outcome).inc(count)
        for havip_id, (first, last) in gaps:
            metrics.VIEW_GAPS.inc()
            log.warning(
                "history gap: transitions %d to %d of havip %s are missing; the newer state is shown, a replay "
                "will be asked for if they do not arrive",
                first,
                last,
                havip_id,
                extra={"havip_id": str(havip_id), "first_missing": first, "last_missing": last},
            )

    async def seed(self) -> bool:
        """Once per database, at the first start: ask the binding service for the newest transition of every
        HAVIP (a deployment that had bindings before this view existed starts from them; the sequences before
        each show up as gaps and are asked for in turn). True if asked now."""
        async with self._db.transaction() as tx:
            first = await tx.conn.fetchval(
                "INSERT INTO allocator.view_seed (seeded) VALUES (true) ON CONFLICT DO NOTHING RETURNING seeded"
            )
            if first:
                tx.publish("havip.binding.replay_requested", events.ReplayRequested(newest_of_every_havip=True))
        if first:
            log.info("asked the binding service for the newest transition of every HAVIP (the view's start)")
        return bool(first)

    async def request_repairs(self, *, grace_s: float, retry_s: float, max_attempts: int) -> int:
        """Ask the binding service to publish again the transitions missing from histories whose gap has lasted
        longer than `grace_s`; returns how many ranges were asked for."""
        ranges: list[tuple[uuid.UUID, int, int]] = []
        async with self._db.transaction() as tx:
            gapped = await repository.gapped_records(
                tx.conn,
                grace_s=grace_s,
                retry_s=retry_s,
                max_attempts=max_attempts,
                limit=events.MAX_REPLAY_RANGES,
            )
            asked: list[repository.Gapped] = []
            for record in gapped:
                pieces = cut_ranges(record.havip_id, record.missing, events.MAX_REPLAY_SPAN)
                room = events.MAX_REPLAY_RANGES - len(ranges)
                if len(pieces) > room and ranges:
                    break  # the rest at the next pass
                ranges += pieces[:room]
                asked.append(record)
            if not ranges:
                return 0
            await repository.mark_repair_requested(tx.conn, [r.havip_id for r in asked])
            tx.publish(
                "havip.binding.replay_requested",
                events.ReplayRequested(
                    ranges=[
                        events.ReplayRange(havip_id=h, first_sequence=first, last_sequence=last)
                        for h, first, last in ranges
                    ]
                ),
            )
        metrics.VIEW_REPLAYS_REQUESTED.inc(len(ranges))
        for record in asked:
            if record.attempts + 1 == max_attempts:
                log.error(
                    "history gap of havip %s still open after %d replay requests; not asking again",
                    record.havip_id,
                    max_attempts,
                    extra={"havip_id": str(record.havip_id), "missing": record.missing},
                )
        log.info("replay of missing transitions requested", extra={"ranges": len(ranges), "havips": len(asked)})
        return len(ranges)

    async def count_open_gaps(self) -> int:
        async with self._db.connection() as conn:
            open_gaps = await repository.count_open_gaps(conn)
        metrics.VIEW_OPEN_GAPS.set(open_gaps)
        return open_gaps

    async def expire_refusals(self, retention_days: float) -> int:
        """Audit retention, as the binding service keeps its own: refusals older than that are deleted."""
        older_than = datetime.now(UTC) - timedelta(days=retention_days)
        async with self._db.connection() as conn:
            return await repository.delete_old_refusals(conn, older_than)


def _fresh(applied: Applied) -> bool:
    """A transition that changed the current state (not a late one filling the history)."""
    return applied.outcome in ("applied", "gap")
