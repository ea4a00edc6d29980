"""The binding service's coordinator: a batch of consumed events in, one committed transaction out.

Each event goes to its handler (HANDLERS, from which the queue's subscriptions are derived); decisions come from
the pure BindingBook, which rows a refusal costs from the pure RefusalAudit. This module holds the decision lock,
writes what was decided through the repository in one unit of work (rows and events, the relay woken after the
commit), tells the audit how the write ended and reports metrics. Its one clock is injected.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from ipaddress import IPv4Address
from typing import Any

import asyncpg

from services.binding import metrics
from services.binding.audit_pacing import DEFAULT_REFUSAL_AUDIT_RATE, AuditPacer
from services.binding.clock import Clock
from services.binding.domain import (
    DEFAULT_MAX_CLOCK_SKEW_NS,
    Attachment,
    BindingBook,
    Claim,
    ConditionEdge,
    ConditionPolicy,
    Havip,
    Instance,
    NotAHavip,
    Refreshed,
    Rejected,
    Stale,
    Transition,
)
from services.binding.hops import ClaimHops
from services.binding.outgoing import binding_changed, condition_edge
from services.binding.redeliveries import RecentClaims
from services.binding.refusal_audit import AuditWrite, Refusal, RefusalAudit, RefusalSummary, RejectedClaim
from services.binding.repository import (
    SCHEMA,
    BatchWrite,
    Renewal,
    WriteConflict,
    delete_old_inventory_log,
    delete_old_refusals,
    inventory_since,
    last_inventory_seq,
    load_bindings,
    load_book,
    renewals_of,
    until_inventory_written,
    write_batch,
    write_refusals,
    write_renewals,
)
from services.binding.watcher_users import publishers, sort_by_publisher, watcher_user
from services.binding.watchers import WatcherBook
from shared import events
from shared.db import ConnectionPool
from shared.messaging import Delivery
from shared.partitions import DEFAULT_PARTITIONS, partition_of
from shared.unit_of_work import unit_of_work

log = logging.getLogger(__name__)

# A batch whose write conflicts (another process committed for one of its HAVIPs meanwhile) is decided again from
# what is committed, at most this many times in all; then it fails as a transient error and the consumer retries.
MAX_DECISION_ATTEMPTS = 5


@dataclass(slots=True)
class _Decisions:
    """What deciding one batch produced, beside the writes: for the metrics and the hops."""

    messages: int
    batch: BatchWrite = field(default_factory=BatchWrite)
    outcomes: Counter[str] = field(default_factory=Counter)
    latencies_from: list[int] = field(default_factory=list)  # capture times of the claims that moved a holder
    moved_by: list[tuple[Delivery, int]] = field(default_factory=list)  # claims messages that moved a holder


@dataclass(frozen=True, slots=True)
class _Deferred:
    """What a batch that commutes leaves to write after the decision lock (BatchWrite.commutes)."""

    renewals: list[Renewal]
    audits: list[AuditWrite]
    claim_ids: set[uuid.UUID]
    deliveries: tuple[Delivery, ...]  # decided again if the write conflicts

    @staticmethod
    def merged(parts: Sequence[_Deferred]) -> _Deferred:
        renewals = {r.havip_id: r for p in parts for r in p.renewals}  # the newest per HAVIP
        return _Deferred(
            list(renewals.values()),
            [audit for p in parts for audit in p.audits],
            set().union(*(p.claim_ids for p in parts)),
            tuple(d for p in parts for d in p.deliveries),
        )


class BindingService:
    def __init__(
        self,
        pool: ConnectionPool,
        on_commit: Callable[[], None] = lambda: None,
        *,
        clock: Clock,
        max_clock_skew_s: float = DEFAULT_MAX_CLOCK_SKEW_NS / 1e9,
        policy: ConditionPolicy | None = None,
        refusal_audit_rate: float = DEFAULT_REFUSAL_AUDIT_RATE,
        hops: ClaimHops | None = None,
        partitions: int = DEFAULT_PARTITIONS,
        owned: Iterable[int] | None = None,
        watcher_user_template: str | None = None,
    ) -> None:
        self._pool = pool
        # Who may publish a segment's claims and heartbeats (watcher_users.py); None: anyone the broker lets in.
        self._watcher_user_template = watcher_user_template
        self._impostors_told: set[tuple[str | None, str]] = set()
        self.partitions = partitions
        # The partitions this replica decides (services/binding/leases.py): claims come from their queues only,
        # and of what the inventory changes, this replica writes the bindings of these partitions only (their
        # releases, their new rows) — the projection of the inventory itself is written by whichever replica
        # applies a change first. Its book holds every HAVIP; the others' bindings in it are not the truth, and are
        # reloaded when a partition is taken over.
        self.owned: set[int] = set(range(partitions) if owned is None else owned)
        # Partitions taken over whose bindings are still to be read from Postgres, and partitions read (or the
        # whole book loaded) whose strays are still to be ended (`_end_strays`) — both before the next decision.
        self._unread: set[int] = set()
        # partition -> the inventory log's row this book must have applied before its strays are ended: only then
        # is the book as new as the bindings read (a binding of a HAVIP the book has not learnt yet is not a
        # stray, a holder it has not learnt yet not a deregistered one).
        self._reconcile: dict[int, int] = {}
        # Claims and inventory come on different queues: a claim naming an address or MAC this book does not know
        # may be of a registration still on its way here. Before such a claim is decided, this replica's inventory
        # queue is drained (main wires the inventory consumer's `until_drained`); once per moment: a claim that
        # arrived before the last drain began needs none.
        self.drain_inventory: Callable[[], Awaitable[None]] = _nothing
        self._drained_ns = 0
        self._inventory_seq = 0  # the last row of the inventory log this book has applied
        self._clock = clock
        self._hops = hops or ClaimHops()
        self._on_commit = on_commit  # after a commit that wrote events: wakes the outbox relay
        self._max_skew_ns = int(max_clock_skew_s * 1e9)
        self._policy = policy or ConditionPolicy()
        # handle() and tick() both change the book and write what changed: one at a time.
        self._lock = asyncio.Lock()
        self.book = BindingBook(policy=self._policy)
        self._audit = RefusalAudit(AuditPacer(refusal_audit_rate, now_s=clock.monotonic_s()))
        self._recent_claims = RecentClaims()
        self._book_stale = True
        # Set while this replica decides some partition (own/disown): the periodic work of a decider runs then.
        self._deciding = asyncio.Event()
        self._standing_by = asyncio.Event()
        self._standing_by.set()
        # The watchers' heartbeats: in memory only, never written (services/binding/watchers.py).
        self.watchers = WatcherBook()

    def owns(self, address: IPv4Address) -> bool:
        return partition_of(address, self.partitions) in self.owned

    async def load(self) -> None:
        """The book as committed: the projection and the bindings, and the inventory log's last row, in one
        snapshot — the log is followed from there (follow_inventory)."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            self.book = await load_book(conn, self._policy)
            self._inventory_seq = await last_inventory_seq(conn)
        self.book.hold_conditions(self._clock.wall_ns())
        self._book_stale = False
        self._unread.clear()
        self._reconcile = dict.fromkeys(self.owned, self._inventory_seq)
        log.info(
            "binding state loaded",
            extra={"havips": len(self.book.havips_by_id), "instances": len(self.book.instances_by_id)},
        )

    @property
    def deciding(self) -> bool:
        return self._deciding.is_set()

    async def own(self, partition: int) -> None:
        """This replica decides `partition` from now on (its lock is taken; its queue is consumed next): its
        bindings are read from Postgres before the next decision — another replica decided them until now. The
        other partitions' state (recent claims, flags' windows) is kept."""
        async with self._lock:
            self.owned.add(partition)
            self._unread.add(partition)
            self._standing_by.clear()
            self._deciding.set()
        self._export_metrics()

    async def disown(self, partition: int) -> None:
        """This replica no longer decides `partition` (its consumer is stopped: the batch under way, if any, is
        committed): its bindings leave this replica's gauges and writes."""
        async with self._lock:
            self.owned.discard(partition)
            self._unread.discard(partition)
            self._reconcile.pop(partition, None)
            if not self.owned:
                self._deciding.clear()
                self._standing_by.set()
        self._export_metrics()

    async def until_deciding(self) -> bool:
        return await self._deciding.wait()

    async def until_standing_by(self) -> bool:
        return await self._standing_by.wait()

    def channel_lost(self) -> None:
        """A partition's consumer channel closed (RabbitMQ away): what it delivered and this replica had not yet
        acknowledged goes out again; decide from what is committed when it comes back."""
        self._book_stale = True

    def _export_metrics(self) -> None:
        """The process's gauges read this service from now on — as it decides, or as a standby that says it does
        not (0, no per-HAVIP gauges); a service that is neither, e.g. one a test builds beside another, leaves
        them alone."""
        metrics.export_book(
            lambda: [b for b in self.book.bindings.values() if self.owns(b.address)] if self.owned else ()
        )
        metrics.PARTITIONS_OWNED.set_function(lambda: len(self.owned))
        metrics.CONSUMING.set_function(lambda: self.deciding)
        metrics.REFUSALS_WAITING.set_function(lambda: self.refusals_waiting)
        metrics.export_watchers(self._watchers_now)

    async def ensure_current(self) -> None:
        """After a failure the book may hold decisions that were never committed: rebuild it from Postgres."""
        if self._book_stale:
            await self.load()

    async def handle(self, deliveries: Sequence[Delivery]) -> None:
        """Decide and commit a batch. A batch whose writes commute with every other — holders' refreshes and
        refusals only — is written after the decision lock is released: a change of holder decided meanwhile
        never waits for it (a spoofer's flood or a wave of refreshes costs a takeover nothing but CPU)."""
        deliveries = self._entitled(deliveries)
        await self._inventory_first(deliveries)
        async with self._lock:
            deferred = await self._decide_and_commit(deliveries, defer=True)
        if deferred is not None:
            await self._write_deferred(deferred)

    def _entitled(self, deliveries: Sequence[Delivery]) -> Sequence[Delivery]:
        """The deliveries whose publisher may speak for their segment; the others are dropped (acknowledged with
        the batch: redelivering them could not make them entitled), counted, and said once per user and
        segment."""
        entitled, impostors = sort_by_publisher(deliveries, self._watcher_user_template)
        for impostor in impostors:
            metrics.WATCHER_MESSAGES_REFUSED.labels(impostor.segment).inc()
        for user, segment in publishers(impostors) - self._impostors_told:
            self._impostors_told.add((user, segment))
            log.error(
                "refusing the claims and heartbeats of segment %r published by broker user %r: only %r may "
                "publish them (HAVIP_WATCHER_USER_TEMPLATE)",
                segment,
                user,
                watcher_user(self._watcher_user_template or "", segment),
                extra={"segment": segment, "user": user},
            )
        return entitled

    async def _inventory_first(self, deliveries: Sequence[Delivery]) -> None:
        """A claim for an address or from a MAC this book does not know is decided only once the inventory this
        replica's queue held when it arrived is applied: a registration committed before the claim was captured
        is never missed because it came by the other queue."""
        havips, instances = self.book.havips_by_address, self.book.instances_by_mac
        for delivery in deliveries:
            data = delivery.data
            if not isinstance(data, events.ClaimsObserved) or delivery.received_ns <= self._drained_ns:
                continue  # a drain that began after this message arrived covered what was published before it
            if any(claim.sender_ip not in havips or claim.sender_mac not in instances for claim in data.claims):
                started_ns = time.time_ns()  # the consumer's clock, as Delivery.received_ns (not the injected one)
                await self.drain_inventory()
                self._drained_ns = started_ns
                return

    async def until_inventory_written(self) -> None:
        """Once the inventory write under way, if any (by whichever replica), has committed."""
        async with self._pool.acquire() as conn:
            await until_inventory_written(conn)

    async def follow_inventory(self) -> bool:
        """Apply the inventory log's rows past the last one applied (another replica, or this one as the log's
        writer, wrote their projection): the book learns them, and this replica writes what they change in its
        own partitions (releases, new bindings). True if there were any."""
        async with self._lock:
            await self.ensure_current()
            async with self._pool.acquire() as conn:
                logged = await inventory_since(conn, self._inventory_seq)
            if not logged:
                return False
            now_ns = time.time_ns()
            deliveries = []
            for _seq, body in logged:
                head, data = events.decode(body)
                deliveries.append(Delivery(head, data, False, now_ns))
            await self._decide_and_commit(deliveries, projection_written=True)
            self._inventory_seq = max(self._inventory_seq, logged[-1][0])
        return True

    async def handle_routine(self, deliveries: Sequence[Delivery]) -> None:
        """The routine lane (messages a watcher marked as renewals): decided one message at a time, letting any
        other batch in between, and what commutes written together at the end. A message of the lane that does
        change something (the watcher's view is not the binding's) is committed at once, as in `handle`."""
        pending: list[_Deferred] = []
        deliveries = self._entitled(deliveries)
        await self._inventory_first(deliveries)
        for delivery in deliveries:
            async with self._lock:
                deferred = await self._decide_and_commit((delivery,), defer=True)
            if deferred is not None:
                pending.append(deferred)
            await asyncio.sleep(0)  # let a change of holder that arrived meanwhile take the lock
        if pending:
            await self._write_deferred(_Deferred.merged(pending))

    def _watchers_now(self) -> metrics.WatchersNow:
        if not self.deciding:  # heartbeats go to the deciding process: a standby's would be stale
            return {}, ()
        now_s = self._clock.monotonic_s()
        return self.watchers.alive_by_segment(now_s), self.watchers.watchers(now_s)

    @property
    def refusals_waiting(self) -> int:
        return self._audit.refusals_waiting

    async def release_refusals(self) -> None:
        """Write the audit rows the pacer lets go now; called about ten times a second while some wait, so that
        the budget is used when no claim comes to carry them."""
        if not self.refusals_waiting:
            return
        async with self._lock:
            deferred = await self._decide_and_commit((), defer=True, release=True)
        if deferred is not None:
            await self._write_deferred(deferred)

    async def tick(self) -> None:
        """Let the book see time pass (flapping and split brain end after a quiet window) and commit the
        edges; called about once a second."""
        async with self._lock:
            await self._decide_and_commit((), tick_ns=self._clock.wall_ns(), release=True)

    def take_refusal_summary(self) -> RefusalSummary | None:
        """The refusals decided since the last call (None if there were none), for one log line."""
        return self._audit.take_summary()

    async def expire_inventory_log(self, older_than_s: float) -> int:
        """The inventory log's rows older than that (every replica has applied them long since)."""
        async with self._pool.acquire() as conn:
            return await delete_old_inventory_log(conn, older_than_s)

    async def expire_audit(self, older_than_days: float) -> int:
        """Audit retention: delete refusals older than that (a bounded number per call)."""
        async with self._pool.acquire() as conn:
            return await delete_old_refusals(conn, older_than_days)

    async def _decide_and_commit(
        self,
        deliveries: Sequence[Delivery],
        *,
        tick_ns: int | None = None,
        defer: bool = False,
        release: bool = False,
        projection_written: bool = False,
    ) -> _Deferred | None:
        """Decide, and commit what changed; if `defer` and the batch's writes commute (BatchWrite.commutes),
        return what to write instead of writing it. With `release`, audit rows waiting for the pacer that it
        lets go are written too — never in a batch of claims, so that a takeover's transaction carries none.

        A write that conflicts — another process committed for one of the batch's HAVIPs since this book was
        loaded — is rolled back; the book is loaded again and the same batch decided again against it, so that
        each claim is decided against what is committed (nothing dead-lettered, nothing published twice)."""
        conflicting: set[uuid.UUID] = set()
        try:
            for attempt in range(1, MAX_DECISION_ATTEMPTS + 1):
                try:
                    return await self._decide_and_commit_once(
                        deliveries,
                        tick_ns=tick_ns,
                        defer=defer,
                        release=release,
                        projection_written=projection_written,
                    )
                except WriteConflict as conflict:
                    metrics.WRITE_CONFLICTS.inc(len(conflict.havip_ids))
                    conflicting.update(conflict.havip_ids)
                    if attempt == MAX_DECISION_ATTEMPTS:
                        raise
            raise AssertionError("unreachable: the last attempt returns or raises")
        finally:
            if conflicting:
                log.warning(
                    "another process wrote bindings this batch had decided; reloaded the committed state and "
                    "decided the batch again",
                    extra={"havips": len(conflicting), "example_havip": str(min(conflicting))},
                )

    async def _decide_and_commit_once(
        self,
        deliveries: Sequence[Delivery],
        *,
        tick_ns: int | None,
        defer: bool,
        release: bool,
        projection_written: bool = False,
    ) -> _Deferred | None:
        await self.ensure_current()
        if self._unread:
            await self._read_partitions()
        decisions = _Decisions(len(deliveries))
        batch = decisions.batch
        # The book takes each decision as it is made; if anything fails before the commit — deciding a message
        # or writing the batch — the book is rebuilt from what is really committed (one truth).
        reconciled = {p for p, seq in self._reconcile.items() if seq <= self._inventory_seq}
        try:
            if reconciled:
                self._end_strays(batch, reconciled)
            for delivery in deliveries:
                self._apply(delivery, decisions)
            if tick_ns is not None:
                self.book.tick(tick_ns)
            # Edges of HAVIPs another replica decides are that replica's to write (this book is not their truth).
            edges = [edge for edge in self.book.take_edges() if self.owns(edge.address)]
            for edge in edges:
                self._record_edge(edge, batch)
        except BaseException:
            self._book_stale = True
            self._audit.abandon_draft()
            raise
        audit = self._audit.take_write(self._clock.monotonic_s(), release=release)
        batch.rejected, batch.folded = audit.rows, audit.folded
        if audit.unaudited_frames:
            metrics.REFUSALS_UNAUDITED.inc(audit.unaudited_frames)
        if tick_ns is not None:
            self._audit.forget_windows(tick_ns)
        if defer and batch.commutes():
            self._observe(decisions, edges, new_rejections=())
            return _Deferred(renewals_of(batch), [audit], set(batch.claim_ids), tuple(deliveries))
        batch.owned = (self.partitions, sorted(self.owned))
        if projection_written:
            batch.inventory.clear()  # the log's writer wrote it with the log's row
        if not batch:  # nothing to write: what was decided holds as it is
            self._reconciled(reconciled)
            self._audit.committed(audit)
            self._recent_claims.remember(batch.claim_ids)
            self._observe(decisions, edges, new_rejections=())
            return None
        try:
            async with self._pool.acquire() as conn:
                async with unit_of_work(conn, SCHEMA, self._on_commit) as work:
                    written = await write_batch(work, batch)
                returned_ns = self._clock.wall_ns()  # COMMIT returned; the pool's reset on release is a round trip
        except WriteConflict:
            self._failed([audit])  # rolled back: the book is loaded again before the batch is decided again
            raise
        except asyncpg.TransactionRollbackError as exc:
            # A deadlock with another process writing the same HAVIPs in another order: one of the two is rolled
            # back by Postgres — a conflict like any other.
            self._failed([audit])
            raise WriteConflict(sorted(batch.expected_sequences())) from exc
        except (asyncpg.IntegrityConstraintViolationError, asyncpg.DataError) as exc:
            # Not transient: retrying cannot help. Refusing it lets the consumer isolate and dead-letter the
            # message at fault instead of blocking the queue behind it.
            self._failed([audit])
            raise events.InvalidEvent(f"conflicts with stored state: {exc}") from exc
        except BaseException:
            self._failed([audit])
            raise
        self._reconciled(reconciled)
        self._audit.committed(audit)
        self._recent_claims.remember(batch.claim_ids)
        if written.committed_at is not None:
            self._stamp_transitions(batch, written.committed_at)
            self._hops.committed(decisions.moved_by, written.committed_at, returned_ns, written.last_event_id)
        self._observe(decisions, edges, new_rejections=written.new_rejections)
        return None

    async def _write_deferred(self, deferred: _Deferred) -> None:
        rows, folded = AuditWrite.combined(deferred.audits)
        try:
            async with self._pool.acquire() as conn, unit_of_work(conn, SCHEMA, self._on_commit) as work:
                if not rows and not folded:
                    # Holders' refreshes only: one lost in a crash is written again by the next, so this commit
                    # need not wait for the disk — nor a takeover's commit queue behind its flush.
                    await conn.execute("SET LOCAL synchronous_commit = off")
                if deferred.renewals:
                    await write_renewals(conn, deferred.renewals)
                new_rejections = await write_refusals(work, rows, folded)
        except WriteConflict as conflict:
            # A refresh decided from a book that missed another process's change of holder: rolled back, and
            # its claims decided again (under the lock) from what is committed.
            self._failed(deferred.audits)
            metrics.WRITE_CONFLICTS.inc(len(conflict.havip_ids))
            log.warning(
                "another process changed holders this batch had refreshed; deciding its claims again",
                extra={"havips": len(conflict.havip_ids), "example_havip": str(min(conflict.havip_ids))},
            )
            async with self._lock:
                await self._decide_and_commit(deferred.deliveries)
            return
        except BaseException:
            self._failed(deferred.audits)
            raise
        for audit in deferred.audits:
            self._audit.committed(audit)
        self._recent_claims.remember(deferred.claim_ids)
        for refused, count in Counter(r.reason for r in new_rejections).items():
            metrics.CLAIMS_REJECTED.labels(refused).inc(count)

    def _failed(self, audits: Sequence[AuditWrite]) -> None:
        self._book_stale = True  # the next decision reloads the book from what is committed
        for audit in audits:
            self._audit.failed(audit)

    def _observe(
        self, decisions: _Decisions, edges: Sequence[ConditionEdge], new_rejections: Sequence[RejectedClaim]
    ) -> None:
        """The metrics of a batch decided (and, unless deferred, committed)."""
        committed_ns = self._clock.wall_ns()
        for captured_ns in decisions.latencies_from:
            metrics.BINDING_LATENCY.observe(max(0, committed_ns - captured_ns) / 1e9)
        for outcome, count in decisions.outcomes.items():
            metrics.CLAIMS.labels(outcome).inc(count)
        for moved, count in Counter(t.reason for t in decisions.batch.transitions).items():
            metrics.TRANSITIONS.labels(moved).inc(count)
        for refused, count in Counter(r.reason for r in new_rejections).items():
            metrics.CLAIMS_REJECTED.labels(refused).inc(count)
        for edge in edges:
            metrics.CONDITION_EDGES.labels(edge.condition, "started" if edge.started else "stopped").inc()
        if decisions.messages:
            metrics.BATCH_SIZE.observe(decisions.messages)

    # Handlers: one per routing key (HANDLERS below).

    def _apply(self, delivery: Delivery, decisions: _Decisions) -> None:
        handler = HANDLERS.get(delivery.envelope.type)
        if handler is None:
            raise events.InvalidEvent(f"binding does not handle {delivery.envelope.type!r}")
        moves_before = len(decisions.batch.transitions)
        handler(self, delivery.data, decisions)
        if len(decisions.batch.transitions) > moves_before and isinstance(delivery.data, events.ClaimsObserved):
            decisions.moved_by.append((delivery, self._clock.wall_ns()))

    def _on_claims(self, data: events.ClaimsObserved, decisions: _Decisions) -> None:
        for observed in data.claims:
            self._decide_claim(observed, data, decisions)

    def _on_heartbeat(self, data: events.WatcherHeartbeat, _decisions: _Decisions) -> None:
        # Nothing to write: a batch of heartbeats only commits nothing (an empty BatchWrite).
        heard = self.watchers.heard(data, self._clock.monotonic_s(), self._clock.wall_ns() / 1e9)
        if heard == "shared_id":
            log.warning(
                "two watchers send heartbeats as %r on segment %r: give each its own HAVIP_WATCHER_ID",
                data.watcher_id,
                data.segment,
                extra={"watcher_id": data.watcher_id, "segment": data.segment},
            )

    def _on_subnet_created(self, data: events.SubnetData, decisions: _Decisions) -> None:
        attachment = Attachment(data.segment, data.vlan)
        if self.book.attachments.get(data.id) != attachment:
            self.book.attach_subnet(data.id, attachment)
            decisions.batch.attach_subnet(data.id, attachment)

    def _on_subnet_deleted(self, data: events.SubnetData, decisions: _Decisions) -> None:
        self.book.detach_subnet(data.id)
        decisions.batch.detach_subnet(data.id)

    def _on_instance_registered(self, data: events.InstanceData, decisions: _Decisions) -> None:
        instance = Instance(data.id, data.vpc_id, data.subnet_id, data.mac, data.private_ip)
        if self.book.put_instance(instance):
            decisions.batch.put_instance(instance)

    def _on_instance_deregistered(self, data: events.InstanceData, decisions: _Decisions) -> None:
        if data.id in self.book.deregistered:
            return  # a redelivery: the deregistration is committed (or in this batch already)
        for transition in self.book.remove_instance(data.id):
            if self.owns(transition.address):
                self._record_transition(transition, decisions.batch)
        decisions.batch.remove_instance(data.id)

    def _on_havip_put(self, data: events.HavipData, decisions: _Decisions) -> None:
        batch = decisions.batch
        havip = Havip(data.id, data.vpc_id, data.subnet_id, data.address, frozenset(data.candidates))
        put = self.book.put_havip(havip)
        if put == "released":
            return
        batch.put_havip(havip)
        if not self.owns(havip.address):
            return
        if put == "new":
            batch.create(self.book.bindings[havip.id])
        released = self.book.release_unless_candidate(havip.id)
        if released is not None:
            self._record_transition(released, batch)

    def _on_havip_released(self, data: events.HavipData, decisions: _Decisions) -> None:
        if data.id in self.book.released:
            return  # a redelivery: the release is committed (or in this batch already)
        final = self.book.remove_havip(data.id)
        if not self.owns(data.address):
            decisions.batch.forget_havip(data.id)  # its binding is ended by the replica deciding its partition
            return
        decisions.batch.remove_havip(data.id, data.address, bound=final is not None)
        if final is not None:
            self._record_transition(final, decisions.batch)

    def _on_replay_requested(self, data: events.ReplayRequested, decisions: _Decisions) -> None:
        decisions.batch.replays.append(data)  # answered from the history, in the batch's transaction

    def _decide_claim(
        self, data: events.ObservedClaim, seen_by: events.ClaimsObserved, decisions: _Decisions
    ) -> None:
        batch = decisions.batch
        if data.claim_id in batch.claim_ids or data.claim_id in self._recent_claims:
            decisions.outcomes["duplicate"] += 1  # a redelivery: decided once is enough
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
        outcome = self.book.apply_claim(claim, now_ns=self._clock.wall_ns(), max_skew_ns=self._max_skew_ns)
        if isinstance(outcome, Transition):
            self._record_transition(outcome, batch)
            decisions.latencies_from.append(claim.captured_ns)
            decisions.outcomes["transition"] += 1
        elif isinstance(outcome, Refreshed):
            if outcome.write:
                batch.refresh(self.book.bindings[outcome.havip_id])
            decisions.outcomes["refresh"] += 1
        elif isinstance(outcome, Stale):
            decisions.outcomes["stale"] += 1
        elif isinstance(outcome, Rejected):
            refusal = Refusal(
                data.claim_id,
                outcome.havip_id,
                claim.address,
                claim.sender_mac,
                outcome.reason,
                claim.captured_ns,
                claim.watcher_id,
                data.repeats,
            )
            self._audit.refuse(refusal, self._clock.monotonic_s())
            decisions.outcomes["rejected"] += 1
        else:
            assert isinstance(outcome, NotAHavip)
            decisions.outcomes["not_havip"] += 1

    async def _read_partitions(self) -> None:
        """The bindings of the partitions just taken over, as committed, in place of this book's."""
        unread = set(self._unread)

        def taken(address: IPv4Address) -> bool:
            return partition_of(address, self.partitions) in unread

        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            rows = await load_bindings(conn, self.partitions, sorted(unread))
            seq = await last_inventory_seq(conn)
        placed = self.book.replace_bindings(taken, rows)
        self.book.hold_conditions(self._clock.wall_ns(), placed)
        self._unread -= unread
        self._reconcile.update(dict.fromkeys(unread, seq))
        log.info(
            "partitions taken over: their bindings read",
            extra={"partitions": sorted(unread), "bindings": len(rows)},
        )

    def _reconciled(self, partitions: set[int]) -> None:
        for partition in partitions:
            self._reconcile.pop(partition, None)

    def _end_strays(self, batch: BatchWrite, partitions: set[int]) -> None:
        """For partitions just read: create the rows of their HAVIPs that have none, and end the bindings that
        inventory changes ended while nobody decided them (BindingBook.strays)."""

        def reconciled(address: IPv4Address) -> bool:
            return partition_of(address, self.partitions) in partitions

        for havip_id in sorted(self.book.rowless):
            binding = self.book.bindings.get(havip_id)
            if binding is not None and reconciled(binding.address):
                batch.create(binding)
                self.book.rowless.discard(havip_id)  # should the write fail, the book is loaded again
        for transition in self.book.strays(reconciled):
            if transition.reason == "release" and transition.cause == "released":
                batch.remove_havip(transition.havip_id, transition.address, bound=True)
            self._record_transition(transition, batch)

    def _record_transition(self, transition: Transition, batch: BatchWrite) -> None:
        binding = self.book.bindings.get(transition.havip_id)
        if binding is not None:
            batch.touch(binding)
        batch.transitions.append(transition)
        batch.publish(binding_changed(transition), transition.havip_id)  # committed_at stamped as it is written

    def _record_edge(self, edge: ConditionEdge, batch: BatchWrite) -> None:
        binding = self.book.bindings.get(edge.havip_id)
        if binding is not None:
            batch.touch(binding)
        batch.publish(condition_edge(edge), edge.havip_id)

    def _stamp_transitions(self, batch: BatchWrite, committed_at: datetime) -> None:
        """The book's bindings take the committed stamp of their transitions (repository._WRITE_DECISIONS)."""
        for transition in batch.transitions:
            binding = self.book.bindings.get(transition.havip_id)
            if binding is not None:
                binding.last_transition_at = committed_at


async def _nothing() -> None:
    return None


_Handler = Callable[[BindingService, Any, _Decisions], None]

# Every routing key the service's queue is bound to, and what handles it.
HANDLERS: dict[str, _Handler] = {
    events.CLAIMS_EVENT: BindingService._on_claims,
    events.WATCHER_HEARTBEAT_EVENT: BindingService._on_heartbeat,
    "subnet.created": BindingService._on_subnet_created,
    "subnet.deleted": BindingService._on_subnet_deleted,
    "instance.registered": BindingService._on_instance_registered,
    "instance.deregistered": BindingService._on_instance_deregistered,
    "havip.allocated": BindingService._on_havip_put,
    "havip.updated": BindingService._on_havip_put,
    "havip.released": BindingService._on_havip_released,
    events.REPLAY_REQUESTED: BindingService._on_replay_requested,
}
# The inventory events: logged by the active consumer of binding.inventory, followed by every replica from the log.
INVENTORY_EVENTS = tuple(
    k for k in HANDLERS if k not in (events.CLAIMS_EVENT, events.REPLAY_REQUESTED, events.WATCHER_HEARTBEAT_EVENT)
)
