"""The binding service's use case: turn a batch of consumed events into one committed transaction.

Entry point for every message of the service's queue (claims from the watchers, inventory from the
allocator). Decisions come from the pure BindingBook; this module only translates events into calls, collects
the writes, commits them with their outgoing events, and reports metrics after the commit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from services.binding import metrics
from services.binding.audit_pacing import DEFAULT_REFUSAL_AUDIT_RATE, AuditPacer
from services.binding.domain import (
    DEFAULT_MAX_CLOCK_SKEW_NS,
    Attachment,
    BindingBook,
    Claim,
    ConditionEdge,
    ConditionPolicy,
    Havip,
    Holder,
    Instance,
    NotAHavip,
    Refreshed,
    Rejected,
    Stale,
    Transition,
)
from services.binding.hops import ClaimHops
from services.binding.repository import (
    BatchWrite,
    BatchWritten,
    RejectedClaim,
    Renewal,
    delete_old_refusals,
    load_book,
    ns_to_datetime,
    renewals_of,
    write_batch,
    write_refusals,
    write_renewals,
)
from shared import events
from shared.messaging import Delivery

log = logging.getLogger(__name__)

SOURCE = "binding"

# Routing keys the service's queue is bound to.
SUBSCRIPTIONS = (
    events.CLAIMS_EVENT,
    "subnet.created",
    "subnet.deleted",
    "instance.registered",
    "instance.deregistered",
    "havip.allocated",
    "havip.updated",
    "havip.released",
    "havip.binding.replay_requested",
)


class BindingService:
    def __init__(
        self,
        pool: Any,
        on_commit: Callable[[], None] = lambda: None,
        *,
        max_clock_skew_s: float = DEFAULT_MAX_CLOCK_SKEW_NS / 1e9,
        policy: ConditionPolicy | None = None,
        refusal_audit_rate: float = DEFAULT_REFUSAL_AUDIT_RATE,
        hops: ClaimHops | None = None,
    ) -> None:
        self._pool = pool
        self._hops = hops or ClaimHops()
        self._on_commit = on_commit
        self._max_skew_ns = int(max_clock_skew_s * 1e9)
        self._policy = policy or ConditionPolicy()
        # handle() and tick() both change the book and write what changed: one at a time.
        self._lock = asyncio.Lock()
        self.book = BindingBook(policy=self._policy)
        self._folds: dict[tuple[object, str, str], _Fold] = {}
        # Audit rows over the pacer's budget, waiting (frames still fold into them), by claim id (a key may have
        # a row waiting again after a failed write and a newer one): first refusals of a key are written before
        # repeats (AuditPacer).
        self._pacer = AuditPacer(refusal_audit_rate, now_s=time.monotonic())
        self._waiting_first: OrderedDict[uuid.UUID, _Fold] = OrderedDict()
        self._waiting_repeat: OrderedDict[uuid.UUID, _Fold] = OrderedDict()
        # Frames folded into audit rows while their INSERT was on its way (written with the next batch).
        self._late_folds: dict[uuid.UUID, int] = {}
        # Claim ids committed lately (bounded): a message redelivered without a restart is recognised even
        # where nothing stored would tell (a refusal folded into an earlier row). After a restart, the
        # audit's unique claim_id and the capture-time order do it.
        # Kept as integers: 100,000 UUID objects would each be walked by every full garbage collection.
        self._recent_claims: OrderedDict[int, None] = OrderedDict()
        # Refused frames since the last summary line, by reason, and who sent them (bounded).
        self._refused_frames: Counter[str] = Counter()
        self._refused_claimants: set[tuple[object, str]] = set()
        self._book_stale = True
        # True from take_over to stand_by: while another process decides (this one waits as a standby) its book
        # is not the truth, and its per-HAVIP gauges would show stale holders beside the deciding process's.
        self.deciding = False
        metrics.export_book(lambda: self.book.bindings.values() if self.deciding else ())
        metrics.CONSUMING.set_function(lambda: self.deciding)
        metrics.REFUSALS_WAITING.set_function(lambda: self.refusals_waiting)

    async def load(self) -> None:
        async with self._pool.acquire() as conn:
            self.book = await load_book(conn, self._policy)
        self.book.hold_conditions(time.time_ns())
        self._book_stale = False
        log.info(
            "binding state loaded",
            extra={"havips": len(self.book.havips_by_id), "instances": len(self.book.instances_by_id)},
        )

    def stand_by(self) -> None:
        """Another process decides: what this book holds goes stale from now on; reloaded before deciding."""
        self.deciding = False
        self._book_stale = True

    async def take_over(self) -> None:
        """This process decides from now on: its book is what is committed, not what it loaded earlier."""
        async with self._lock:
            await self.ensure_current()
        self.deciding = True

    async def handle(self, deliveries: Sequence[Delivery]) -> None:
        """Decide and commit a batch. A batch whose writes commute with every other — holders' refreshes and
        refusals only — is written after the decision lock is released: a change of holder decided meanwhile
        never waits for it (a spoofer's flood or a wave of refreshes costs a takeover nothing but CPU)."""
        async with self._lock:
            deferred = await self._decide_and_commit(deliveries, None, defer=True)
        if deferred is not None:
            await self._write_deferred(deferred)

    async def handle_routine(self, deliveries: Sequence[Delivery]) -> None:
        """The routine lane (messages a watcher marked as renewals): decided one message at a time, letting any
        other batch in between, and what commutes written together at the end. A message of the lane that does
        change something (the watcher's view is not the binding's) is committed at once, as in `handle`."""
        pending: list[_Deferred] = []
        for delivery in deliveries:
            async with self._lock:
                deferred = await self._decide_and_commit((delivery,), None, defer=True)
            if deferred is not None:
                pending.append(deferred)
            await asyncio.sleep(0)  # let a change of holder that arrived meanwhile take the lock
        if pending:
            await self._write_deferred(_Deferred.merged(pending))

    async def _write_deferred(self, deferred: _Deferred) -> None:
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                if not deferred.rejected and not deferred.folded:
                    # Holders' refreshes only: one lost in a crash is written again by the next, so this commit
                    # need not wait for the disk — nor a takeover's commit queue behind its flush.
                    await conn.execute("SET LOCAL synchronous_commit = off")
                if deferred.renewals:
                    await write_renewals(conn, deferred.renewals)
                new_rejections = await write_refusals(conn, deferred.rejected, deferred.folded)
        except BaseException:
            self._book_stale = True  # the next decision reloads the book from what is committed
            self._folds.clear()
            self._wait_again(deferred.released)
            raise
        for fold in deferred.folds:
            self._fold_committed(fold)
        self._remember(deferred.claim_ids)
        for refused, count in Counter(r.reason for r in new_rejections).items():
            metrics.CLAIMS_REJECTED.labels(refused).inc(count)
        if new_rejections:
            self._on_commit()

    def _fold_of(self, row: RejectedClaim) -> _Fold | None:
        """The fold whose audit row this is, if it is still the current one of its (address, MAC, reason)."""
        fold = self._folds.get((row.address, row.mac, row.reason))
        return fold if fold is not None and fold.row is row else None

    def _committed(self, rows: Sequence[RejectedClaim]) -> None:
        """Audit rows now committed: later frames of their folds are added to them by UPDATE."""
        for row in rows:
            fold = self._fold_of(row)
            if fold is not None:
                self._fold_committed(fold)

    def _fold_committed(self, fold: _Fold) -> None:
        fold.committed = True
        if fold.late:  # frames folded while its row was being written
            claim_id = fold.row.claim_id
            self._late_folds[claim_id] = self._late_folds.get(claim_id, 0) + fold.late
            fold.late = 0

    @property
    def refusals_waiting(self) -> int:
        return len(self._waiting_first) + len(self._waiting_repeat)

    async def release_refusals(self) -> None:
        """Write the audit rows the pacer lets go now; called about ten times a second while some wait, so that
        the budget is used when no claim comes to carry them."""
        if not self.refusals_waiting:
            return
        async with self._lock:
            deferred = await self._decide_and_commit((), None, defer=True, release=True)
        if deferred is not None:
            await self._write_deferred(deferred)

    async def tick(self) -> None:
        """Let the book see time pass (flapping and split brain end after a quiet window) and commit the
        edges; called about once a second."""
        async with self._lock:
            await self._decide_and_commit((), time.time_ns(), release=True)

    def take_refusal_summary(self) -> RefusalSummary | None:
        """The refusals decided since the last call (None if there were none), for one log line."""
        if not self._refused_frames:
            return None
        summary = RefusalSummary(dict(self._refused_frames), len(self._refused_claimants))
        self._refused_frames = Counter()
        self._refused_claimants = set()
        return summary

    async def expire_audit(self, older_than_days: float) -> int:
        """Audit retention: delete refusals older than that (a bounded number per call)."""
        async with self._pool.acquire() as conn:
            return await delete_old_refusals(conn, older_than_days)

    async def ensure_current(self) -> None:
        """After a failure the book may hold decisions that were never committed: rebuild it from Postgres."""
        if self._book_stale:
            await self.load()

    async def _decide_and_commit(
        self, deliveries: Sequence[Delivery], now_ns: int | None, *, defer: bool = False, release: bool = False
    ) -> _Deferred | None:
        """Decide, and commit what changed; if `defer` and the batch's writes commute (BatchWrite.commutes),
        return what to write instead of writing it. With `release`, audit rows waiting for the pacer that it
        lets go are written too — never in a batch of claims, so that a takeover's transaction carries none."""
        await self.ensure_current()
        deferred: _Deferred | None = None
        batch = BatchWrite()
        if self._late_folds:  # counts for rows committed since: any write may carry them
            batch.folded.update(self._late_folds)
            self._late_folds = {}
        released = self._release_waiting(batch) if release else []
        new_rejections: list[RejectedClaim] = []
        written: BatchWritten | None = None
        returned_ns = 0
        latencies_from: list[int] = []
        outcomes: list[str] = []
        decided: list[tuple[Delivery, int]] = []  # claims messages that moved a holder, when decided (hops)
        edges: list[ConditionEdge] = []
        try:
            # The book takes each decision as it is made; if anything fails before the commit — deciding a
            # message or writing the batch — the book is rebuilt from what is really committed (one truth).
            for delivery in deliveries:
                moves_before = len(batch.transitions)
                self._apply(delivery, batch, latencies_from, outcomes)
                if len(batch.transitions) > moves_before and isinstance(delivery.data, events.ClaimsObserved):
                    decided.append((delivery, time.time_ns()))
            if now_ns is not None:
                self.book.tick(now_ns)
            edges = self.book.take_edges()
            for edge in edges:
                self._record_edge(edge, batch)
            if defer and batch.commutes():
                deferred = self._defer(batch, released)
            elif batch:
                async with self._pool.acquire() as conn:
                    async with conn.transaction():
                        written = await write_batch(conn, batch)
                    returned_ns = time.time_ns()  # COMMIT returned; the pool's reset on release is a round trip
                new_rejections = written.new_rejections
        except (asyncpg.IntegrityConstraintViolationError, asyncpg.DataError) as exc:
            # Not transient: retrying cannot help. Refusing it lets the consumer isolate and dead-letter the
            # message at fault instead of blocking the queue behind it.
            self._book_stale = True
            self._wait_again(released)
            raise events.InvalidEvent(f"conflicts with stored state: {exc}") from exc
        except BaseException:
            self._book_stale = True
            self._wait_again(released)
            raise
        finally:
            if self._book_stale:
                self._folds.clear()  # their rows may not exist: the next refusal starts a new one
        committed_ns = time.time_ns()
        if deferred is None:
            self._committed(batch.rejected)
            self._remember(batch.claim_ids)
            if written is not None and written.committed_at is not None:
                self._stamp_transitions(batch, written.committed_at)
                self._hops.committed(decided, written.committed_at, returned_ns, written.last_event_id)
        if now_ns is not None:
            self._folds = {
                k: f for k, f in self._folds.items() if f.waiting or now_ns - f.first_ns < 2 * f.window_ns
            }
        for captured_ns in latencies_from:
            metrics.BINDING_LATENCY.observe(max(0, committed_ns - captured_ns) / 1e9)
        for outcome, count in Counter(outcomes).items():
            metrics.CLAIMS.labels(outcome).inc(count)
        for moved, count in Counter(t.reason for t in batch.transitions).items():
            metrics.TRANSITIONS.labels(moved).inc(count)
        for refused, count in Counter(r.reason for r in new_rejections).items():
            metrics.CLAIMS_REJECTED.labels(refused).inc(count)
        for edge in edges:
            metrics.CONDITION_EDGES.labels(edge.condition, "started" if edge.started else "stopped").inc()
        if deliveries:
            metrics.BATCH_SIZE.observe(len(deliveries))
        if batch.events or batch.replays:
            self._on_commit()
        return deferred

    def _defer(self, batch: BatchWrite, released: list[_Fold]) -> _Deferred:
        """A snapshot of what the batch writes: the book and the folds move on while it is written."""
        folds = [fold for row in batch.rejected if (fold := self._fold_of(row)) is not None]
        for fold in folds:
            fold.frozen = True  # frames folded from now on wait in `late` until the row is committed
        rejected = [dataclasses.replace(row) for row in batch.rejected]
        return _Deferred(renewals_of(batch), rejected, dict(batch.folded), set(batch.claim_ids), folds, released)

    def _release_waiting(self, batch: BatchWrite) -> list[_Fold]:
        """Audit rows the pacer lets go now, into `batch`: first refusals, then repeats, oldest first."""
        waiting = self.refusals_waiting
        if not waiting:
            return []
        released: list[_Fold] = []
        for _ in range(self._pacer.take(waiting, time.monotonic())):
            queue = self._waiting_first or self._waiting_repeat
            _key, fold = queue.popitem(last=False)
            fold.waiting = False
            batch.rejected.append(fold.row)
            released.append(fold)
        return released

    def _wait_again(self, released: Sequence[_Fold]) -> None:
        """Rows released into a write that failed: they were never stored; they wait again, at the front, with
        the frames folded in while the write was on its way."""
        for fold in reversed(released):
            fold.waiting = True
            fold.frozen = False
            fold.row.count += fold.late
            fold.late = 0
            queue = self._waiting_repeat if fold.repeat else self._waiting_first
            queue[fold.row.claim_id] = fold
            queue.move_to_end(fold.row.claim_id, last=False)

    def _remember(self, claim_ids: set[uuid.UUID]) -> None:
        recent = self._recent_claims
        recent.update(dict.fromkeys(claim_id.int for claim_id in claim_ids))
        while len(recent) > RECENT_CLAIMS:
            recent.popitem(last=False)

    def _record_edge(self, edge: ConditionEdge, batch: BatchWrite) -> None:
        binding = self.book.bindings.get(edge.havip_id)
        if binding is not None:
            batch.touch(binding)
        event_type = f"havip.{edge.condition}.{'started' if edge.started else 'stopped'}"
        batch.events.append(
            events.envelope(
                event_type,
                events.HavipCondition(
                    havip_id=edge.havip_id,
                    address=edge.address,
                    transitions_in_window=edge.transitions_in_window,
                    claimants_in_window=edge.claimants_in_window,
                ),
                SOURCE,
            )
        )

    def _apply(
        self, delivery: Delivery, batch: BatchWrite, latencies_from: list[int], outcomes: list[str]
    ) -> None:
        data = delivery.data
        event_type = delivery.envelope.type
        if isinstance(data, events.ClaimsObserved):
            for observed in data.claims:
                self._apply_claim(observed, data, batch, latencies_from, outcomes)
        elif isinstance(data, events.SubnetData):
            if event_type == "subnet.created":
                attachment = Attachment(data.segment, data.vlan)
                if self.book.attachments.get(data.id) != attachment:
                    self.book.attach_subnet(data.id, attachment)
                    batch.attach_subnet(data.id, attachment)
            else:
                self.book.detach_subnet(data.id)
                batch.detach_subnet(data.id)
        elif isinstance(data, events.InstanceData):
            if event_type == "instance.registered":
                instance = Instance(data.id, data.vpc_id, data.subnet_id, data.mac, data.private_ip)
                if self.book.put_instance(instance):
                    batch.put_instance(instance)
            else:
                for transition in self.book.remove_instance(data.id):
                    self._record_transition(transition, batch)
                batch.remove_instance(data.id)
        elif isinstance(data, events.HavipData):
            if event_type == "havip.released":
                final = self.book.remove_havip(data.id)
                batch.remove_havip(data.id)
                if final is not None:
                    self._record_transition(final, batch)
            else:
                havip = Havip(data.id, data.vpc_id, data.subnet_id, data.address, frozenset(data.candidates))
                put = self.book.put_havip(havip)
                if put == "released":
                    return
                if put == "new":
                    batch.touch(self.book.bindings[havip.id])
                batch.put_havip(havip)
                released = self.book.release_unless_candidate(havip.id)
                if released is not None:
                    self._record_transition(released, batch)
        elif isinstance(data, events.ReplayRequested):
            batch.replays.append(data)  # answered from the history, in the batch's transaction
        else:
            raise events.InvalidEvent(f"binding does not handle {event_type!r}")

    def _apply_claim(
        self,
        data: events.ObservedClaim,
        seen_by: events.ClaimsObserved,
        batch: BatchWrite,
        latencies_from: list[int],
        outcomes: list[str],
    ) -> None:
        if data.claim_id in batch.claim_ids or data.claim_id.int in self._recent_claims:
            outcomes.append("duplicate")  # a redelivery: decided once is enough
            return
        batch.claim_ids.add(data.claim_id)
        claim = Claim(
            data.sender_ip,
            data.sender_mac,
            data.eth_src,
            data.captured_at,
            seen_by.watcher_id,
            seen_by.segment,
            data.vlan,
        )
        outcome = self.book.apply_claim(claim, now_ns=time.time_ns(), max_skew_ns=self._max_skew_ns)
        if isinstance(outcome, Transition):
            self._record_transition(outcome, batch)
            latencies_from.append(claim.captured_ns)
            outcomes.append("transition")
        elif isinstance(outcome, Refreshed):
            if outcome.write:
                batch.refresh(self.book.bindings[outcome.havip_id])
            outcomes.append("refresh")
        elif isinstance(outcome, Stale):
            outcomes.append("stale")
        elif isinstance(outcome, Rejected):
            self._fold_or_audit(data, claim, outcome, batch)
            outcomes.append("rejected")
        else:
            assert isinstance(outcome, NotAHavip)
            outcomes.append("not_havip")

    def _fold_or_audit(
        self, data: events.ObservedClaim, claim: Claim, outcome: Rejected, batch: BatchWrite
    ) -> None:
        """SPEC §5.1: repeats of one refusal (address, MAC, reason) within a window become one audit row and one
        event, counting the frames (`repeats`: the watcher's own folding included). The window is a second, and
        doubles (up to a minute) each time the same refusal comes back in the window after: a spoofer flooding
        without pause costs an audit row and an event per minute and address, not per second; a pause as long as
        the window resets it."""
        self._refused_frames[outcome.reason] += data.repeats
        if len(self._refused_claimants) < MAX_SUMMARISED_CLAIMANTS:
            self._refused_claimants.add((claim.address, claim.sender_mac))
        key = (claim.address, claim.sender_mac, outcome.reason)
        fold = self._folds.get(key)
        since = claim.captured_ns - fold.first_ns if fold is not None else -1
        if fold is not None and (fold.waiting or 0 <= since < fold.window_ns):
            if fold.committed:
                batch.folded[fold.row.claim_id] = batch.folded.get(fold.row.claim_id, 0) + data.repeats
            elif fold.frozen:
                fold.late += data.repeats
            else:
                fold.row.count += data.repeats  # the row is still to be written by this batch or one before
            return
        row = RejectedClaim(
            data.claim_id,
            outcome.havip_id,
            claim.address,
            claim.sender_mac,
            outcome.reason,
            ns_to_datetime(claim.captured_ns),
            claim.watcher_id,
            data.repeats,
        )
        window = REFUSAL_FOLD_NS
        if fold is not None and 0 <= since < 2 * fold.window_ns:  # back right after its window: a flood
            window = min(2 * fold.window_ns, MAX_REFUSAL_FOLD_NS)
        new = _Fold(row, claim.captured_ns, window, repeat=fold is not None)
        self._folds[key] = new
        ahead = len(self._waiting_first) + (len(self._waiting_repeat) if new.repeat else 0)
        if ahead == 0 and self._pacer.take(1, time.monotonic()):
            batch.rejected.append(row)
        elif self.refusals_waiting < MAX_WAITING_REFUSALS:
            new.waiting = True  # written when the pacer lets it; frames fold into it meanwhile
            queue = self._waiting_repeat if new.repeat else self._waiting_first
            queue[row.claim_id] = new
        else:  # bounded memory: counted, not audited
            del self._folds[key]
            metrics.REFUSALS_UNAUDITED.inc(data.repeats)

    def _record_transition(self, transition: Transition, batch: BatchWrite) -> None:
        binding = self.book.bindings.get(transition.havip_id)
        if binding is not None:
            batch.touch(binding)
        batch.transitions.append(transition)
        batch.events.append(binding_changed(transition))  # its committed_at is stamped as it is written

    def _stamp_transitions(self, batch: BatchWrite, committed_at: datetime) -> None:
        """The book's bindings take the committed stamp of their transitions (repository._WRITE_DECISIONS)."""
        for transition in batch.transitions:
            binding = self.book.bindings.get(transition.havip_id)
            if binding is not None:
                binding.last_transition_at = committed_at


RECENT_CLAIMS = 100_000  # claim ids remembered for redeliveries (~15 MB at most)
# (address, MAC) pairs counted per refusal summary at most (a flood of random MACs must not grow memory).
MAX_SUMMARISED_CLAIMANTS = 10_000


@dataclass(frozen=True, slots=True)
class RefusalSummary:
    frames_by_reason: dict[str, int]
    claimants: int  # distinct (address, MAC), at most MAX_SUMMARISED_CLAIMANTS


# Refusals of one (address, MAC, reason) within this span of capture time share an audit row (SPEC §5.1); the
# span doubles while the refusal keeps coming back, up to the maximum.
REFUSAL_FOLD_NS = 1_000_000_000
MAX_REFUSAL_FOLD_NS = 64_000_000_000
# Refusal audit rows that may wait for the pacer's budget (about 30 MB); past it a refusal is only counted.
MAX_WAITING_REFUSALS = 100_000


@dataclass(frozen=True, slots=True)
class _Deferred:
    """What a batch that commutes leaves to write after the decision lock (BatchWrite.commutes)."""

    renewals: list[Renewal]
    rejected: list[RejectedClaim]
    folded: dict[uuid.UUID, int]
    claim_ids: set[uuid.UUID]
    folds: list[_Fold]  # of the rows in `rejected`: committed with them
    released: list[_Fold]  # rows that had waited for the pacer: if the write fails they wait again

    @staticmethod
    def merged(parts: Sequence[_Deferred]) -> _Deferred:
        renewals = {r.havip_id: r for p in parts for r in p.renewals}  # the newest per HAVIP
        folded: dict[uuid.UUID, int] = {}
        for part in parts:
            for claim_id, frames in part.folded.items():
                folded[claim_id] = folded.get(claim_id, 0) + frames
        return _Deferred(
            list(renewals.values()),
            [row for p in parts for row in p.rejected],
            folded,
            set().union(*(p.claim_ids for p in parts)),
            [fold for p in parts for fold in p.folds],
            [fold for p in parts for fold in p.released],
        )


@dataclass(slots=True)
class _Fold:
    row: RejectedClaim
    first_ns: int
    window_ns: int = REFUSAL_FOLD_NS
    committed: bool = False  # the row is in the database: later frames are added by UPDATE
    frozen: bool = False  # the row is being written by a deferred batch: later frames wait in `late`
    late: int = 0
    repeat: bool = False  # a key audited before (its window ended): waits behind first refusals
    waiting: bool = False  # over the pacer's budget: not yet in any write; every frame folds into it


def binding_changed(transition: Transition) -> events.Envelope:
    """The `havip.binding.changed` event of a transition, built as JSON-ready data without validation: up to
    10,000 of them leave in one batch during a mass failover. Its `committed_at` is left null here: the statement
    that writes the event stamps it (repository.COMMITTED_AT_SLOT). tests/unit/test_binding_events.py proves
    the stamped event validates against the BindingChanged model."""
    captured_at = events.rfc3339(ns_to_datetime(transition.captured_ns)) if transition.captured_ns else None
    return events.trusted_envelope(
        "havip.binding.changed",
        {
            "havip_id": str(transition.havip_id),
            "address": str(transition.address),
            "previous": _holder(transition.previous),
            "current": _holder(transition.current),
            "captured_at": captured_at,
            "committed_at": None,  # stamped as it is written: repository.COMMITTED_AT_SLOT
            "watcher_id": transition.watcher_id,
            "sequence": transition.sequence,
            "reason": transition.reason,
            "cause": transition.cause,
        },
        SOURCE,
    )


def _holder(holder: Holder | None) -> dict[str, str] | None:
    return None if holder is None else {"instance_id": str(holder.instance_id), "mac": holder.mac}
