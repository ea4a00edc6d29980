"""Postgres adapter of the binding service: loads the book, writes one batch's changes in one transaction."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from ipaddress import IPv4Address, IPv4Interface
from typing import Any

import asyncpg

from services.binding.domain import (
    Attachment,
    Binding,
    BindingBook,
    ConditionPolicy,
    Havip,
    Holder,
    Instance,
    Transition,
    ns_to_datetime,
)
from services.binding.outgoing import binding_replayed, claim_rejected
from services.binding.refusal_audit import RejectedClaim
from shared.db import Queries, Row, fetch_one
from shared.events import (
    Envelope,
    EventData,
    EventHead,
    HavipData,
    InstanceData,
    ReplayRequested,
    SubnetData,
    encode,
)
from shared.outbox import outbox_rows
from shared.partitions import partition_sql
from shared.unit_of_work import UnitOfWork

SCHEMA = "binding"


def _host(value: IPv4Address | IPv4Interface) -> IPv4Address:
    return value.ip if isinstance(value, IPv4Interface) else value


@dataclass
class BatchWrite:
    """Everything one batch of messages changes, written in one transaction."""

    # Inventory changes in arrival order: (sql, args) pairs; consecutive runs of one statement are batched.
    inventory: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)
    bindings: dict[uuid.UUID, Binding] = field(default_factory=dict)
    refreshed: dict[uuid.UUID, Binding] = field(default_factory=dict)
    removed_bindings: set[uuid.UUID] = field(default_factory=set)
    transitions: list[Transition] = field(default_factory=list)  # stamped `committed_at` as they are written
    rejected: list[RejectedClaim] = field(default_factory=list)
    # Frames of later refusals folded into an audit row committed by an earlier batch: claim_id -> frames.
    folded: dict[uuid.UUID, int] = field(default_factory=dict)
    # Outgoing events of the decisions, in order (refusals' events are made when their rows are written: only a
    # refusal that was new is published), and the HAVIP each is about (it goes out only if that HAVIP's write
    # applied).
    events: list[Envelope] = field(default_factory=list)
    event_havips: list[uuid.UUID] = field(default_factory=list)
    # HAVIPs the book held no binding row for when the batch was decided (new, or released before this process
    # knew them): their rows are created first (`_CREATE_BINDINGS`), then written like any other.
    fresh: dict[uuid.UUID, IPv4Address] = field(default_factory=dict)
    # Instances deregistered and HAVIPs given candidates: once the inventory is written, no binding the batch does
    # not write may be held by an instance gone or no longer a candidate (`_UNRELEASED`).
    holders_checked: set[uuid.UUID] = field(default_factory=set)
    havips_checked: set[uuid.UUID] = field(default_factory=set)
    claim_ids: set[uuid.UUID] = field(default_factory=set)  # claims decided in this batch
    # Readers' requests to publish transitions again (havip.binding.replay_requested).
    replays: list[ReplayRequested] = field(default_factory=list)
    # (P, the partitions the writing replica decides): the bindings it checks after the inventory (`_UNRELEASED`)
    # are its own partitions' — the others' are ended by their own replicas.
    owned: tuple[int, list[int]] = (1, [0])

    def put_instance(self, i: Instance) -> None:
        self.inventory.append((_PUT_INSTANCE, (i.id, i.vpc_id, i.subnet_id, i.mac, i.private_ip)))

    def remove_instance(self, instance_id: uuid.UUID) -> None:
        self.inventory.append((_DELETE_INSTANCE, (instance_id,)))
        self.holders_checked.add(instance_id)

    def attach_subnet(self, subnet_id: uuid.UUID, a: Attachment) -> None:
        self.inventory.append((_ATTACH_SUBNET, (subnet_id, a.segment, a.vlan)))

    def detach_subnet(self, subnet_id: uuid.UUID) -> None:
        self.inventory.append((_DETACH_SUBNET, (subnet_id,)))

    def put_havip(self, h: Havip) -> None:
        self.inventory.append((_PUT_HAVIP, (h.id, h.vpc_id, h.subnet_id, h.address, sorted(h.candidates))))
        if h.candidates:
            self.havips_checked.add(h.id)

    def remove_havip(self, havip_id: uuid.UUID, address: IPv4Address, *, bound: bool) -> None:
        """`bound`: the book held a binding for it (its release is a transition); if not, none is expected in
        Postgres either — a row created in the meantime by another process makes the write conflict."""
        self.inventory.append((_DELETE_HAVIP, (havip_id,)))
        if not bound:
            self.fresh.setdefault(havip_id, address)
        self.bindings.pop(havip_id, None)
        self.refreshed.pop(havip_id, None)
        self.removed_bindings.add(havip_id)

    def forget_havip(self, havip_id: uuid.UUID) -> None:
        """A HAVIP released in a partition another replica decides: its record goes (the first replica to apply
        the release writes it), its binding is that replica's to end."""
        self.inventory.append((_DELETE_HAVIP, (havip_id,)))

    def refresh(self, binding: Binding) -> None:
        """Only the holder's last claim and last-seen time changed (a refresh): a narrow update."""
        if binding.havip_id not in self.bindings:
            self.refreshed[binding.havip_id] = binding

    def touch(self, binding: Binding) -> None:
        self.refreshed.pop(binding.havip_id, None)
        self.bindings[binding.havip_id] = binding

    def create(self, binding: Binding) -> None:
        """A HAVIP new to the book: its binding row does not exist yet."""
        self.fresh[binding.havip_id] = binding.address
        self.touch(binding)

    def publish(self, event: Envelope, havip_id: uuid.UUID) -> None:
        self.events.append(event)
        self.event_havips.append(havip_id)

    def expected_sequences(self) -> dict[uuid.UUID, int]:
        """Every HAVIP whose binding row the batch writes or deletes, and the sequence it was decided from: the
        one before its first transition in the batch, else the binding's own (a fresh row is created at 0)."""
        expected = {havip_id: 0 for havip_id in self.fresh}
        for t in self.transitions:
            expected.setdefault(t.havip_id, t.sequence - 1)
        for havip_id, binding in self.bindings.items():
            expected.setdefault(havip_id, binding.sequence)
        written = self.bindings.keys() | self.removed_bindings
        unwritten = expected.keys() - written | (set(self.event_havips) - written)
        if unwritten:
            raise ValueError(f"events of HAVIPs whose binding the batch does not write: {unwritten}")
        return expected

    def commutes(self) -> bool:
        """Only holders' refreshes and refusals: writes that commute with every other (a refresh only moves
        times forward, an audit row is keyed by its claim, a folded count only adds), so they may be written
        after the decision lock is released. No change of holder, flag or inventory, no event of a decision,
        no replay (answered from the history in the decision's order)."""
        return bool(self.refreshed or self.rejected or self.folded) and not (
            self.inventory
            or self.bindings
            or self.removed_bindings
            or self.transitions
            or self.events
            or self.replays
        )

    def __bool__(self) -> bool:
        return bool(
            self.inventory
            or self.bindings
            or self.refreshed
            or self.removed_bindings
            or self.transitions
            or self.rejected
            or self.folded
            or self.replays
        )


# Inventory writes are keyed (running one twice, from two processes, writes the same row) and never bring back what
# was removed: a process whose book missed the removal must not restore a released HAVIP or deregistered instance.
_PUT_INSTANCE = """
    INSERT INTO binding.instances (id, vpc_id, subnet_id, mac, private_ip)
    SELECT $1::uuid, $2::uuid, $3::uuid, $4::macaddr, $5::inet
    WHERE NOT EXISTS (SELECT 1 FROM binding.deregistered_instances WHERE id = $1::uuid)
    ON CONFLICT (id) DO UPDATE SET vpc_id = $2, subnet_id = $3, mac = $4, private_ip = $5"""
_DELETE_INSTANCE = """
    WITH gone AS (INSERT INTO binding.deregistered_instances (id) VALUES ($1) ON CONFLICT DO NOTHING)
    DELETE FROM binding.instances WHERE id = $1"""
_ATTACH_SUBNET = """
    INSERT INTO binding.subnets (id, segment, vlan) VALUES ($1, $2, $3)
    ON CONFLICT (id) DO UPDATE SET segment = $2, vlan = $3"""
_DETACH_SUBNET = "DELETE FROM binding.subnets WHERE id = $1"
_PUT_HAVIP = """
    INSERT INTO binding.havips (id, vpc_id, subnet_id, address, candidates)
    SELECT $1::uuid, $2::uuid, $3::uuid, $4::inet, $5::uuid[]
    WHERE NOT EXISTS (SELECT 1 FROM binding.released_havips WHERE id = $1::uuid)
    ON CONFLICT (id) DO UPDATE SET vpc_id = $2, subnet_id = $3, address = $4, candidates = $5"""
_DELETE_HAVIP = """
    WITH gone AS (INSERT INTO binding.released_havips (id) VALUES ($1) ON CONFLICT DO NOTHING)
    DELETE FROM binding.havips WHERE id = $1"""
# A binding whose holder this batch's inventory deregistered, or left out of the HAVIP's candidates, is released
# by the batch — unless the book did not know that holder (another process bound it meanwhile): then found here,
# a conflict.
_UNRELEASED = f"""
    SELECT b.havip_id FROM binding.bindings AS b LEFT JOIN binding.havips AS h ON h.id = b.havip_id
    WHERE b.instance_id IS NOT NULL AND (b.instance_id = ANY($1::uuid[]) OR b.havip_id = ANY($2::uuid[]))
        AND NOT b.havip_id = ANY($3::uuid[]) AND {partition_sql("b.address", "$4")} = ANY($5::int[])
        AND (NOT EXISTS (SELECT 1 FROM binding.instances AS i WHERE i.id = b.instance_id)
             OR cardinality(h.candidates) > 0 AND NOT b.instance_id = ANY(h.candidates))"""
# Batches are written set-based, one statement per table (unnest of one array per column): at thousands of
# rows a batch this is several times faster than executemany, which runs the statement once per row.
# Refreshes commute with every other write: times only move forward (GREATEST), and only while the refreshing
# instance still holds the HAVIP. Rows another transaction has locked are skipped, not waited for: every such
# transaction was decided after these refreshes, from a book that already held them, and writes their times
# itself — so a refresh write never waits and never deadlocks, and may run outside the decision lock.
# A refresh that finds another holder committed with an older claim than its own was decided from a book that
# missed another process's change: the statement returns those HAVIPs (the claim must be decided again — it may
# move the binding back), and the caller treats them as a conflict.
_REFRESH_BINDINGS = """
    WITH r AS (
        SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::bigint[], $4::timestamptz[])
            AS r(havip_id, instance_id, last_claim_ns, last_seen_at)),
    held AS (
        SELECT havip_id, instance_id, last_claim_ns FROM binding.bindings WHERE havip_id = ANY($1::uuid[])
        FOR UPDATE SKIP LOCKED),
    renewed AS (
        UPDATE binding.bindings AS b SET last_claim_ns = GREATEST(b.last_claim_ns, r.last_claim_ns),
            last_seen_at = GREATEST(b.last_seen_at, r.last_seen_at)
        FROM r WHERE b.havip_id = r.havip_id AND b.instance_id = r.instance_id
            AND b.havip_id IN (SELECT havip_id FROM held))
    SELECT r.havip_id FROM r JOIN held AS h ON h.havip_id = r.havip_id
    WHERE h.instance_id IS DISTINCT FROM r.instance_id AND h.last_claim_ns < r.last_claim_ns"""
# A transition's `committed_at`, and its binding's `last_transition_at`: the database's clock when the batch's
# last statement starts (clock_timestamp(); now() would be the transaction's start) — this statement, which writes
# the decisions' bindings, history rows and events together, after everything else of the batch. Only the COMMIT
# follows it, so the stamp is as late as a value written inside the transaction can be; the commit's own
# completion (its round trip, the WAL flush) comes after it and is measured apart (havip_claim_hop_seconds,
# hop "committed"). The events were encoded with `"committed_at":null` (COMMITTED_AT_SLOT): the statement
# writes the stamp into their bytes, in the form of every event time (shared.events.rfc3339) — one value for the
# history row, the binding row and the event. It returns the stamp and the last outbox id it wrote.
COMMITTED_AT_SLOT = '"committed_at":null'


def rfc3339_sql(column: str) -> str:
    """SQL that prints a timestamptz as events do (shared.events.rfc3339): RFC 3339, UTC, `Z`, microseconds
    unless there are none."""
    return f"""replace(to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'), '.000000Z', 'Z')"""


# Two processes may briefly decide for one HAVIP (one frozen and thawed, a replica whose queue moved on while its
# batch was under way): every write of a decision is conditional on the state it was decided from, and a batch with
# a condition that did not hold is rolled back whole and decided again from what is committed (WriteConflict).
# A fresh row is created first, in a statement of its own: its INSERT waits for a concurrent transaction that
# deletes or inserts the same key, so the decisions' statement, whose snapshot is taken later, sees that
# transaction's release (tombstone, history) and does not apply to a row that should not exist.
_CREATE_BINDINGS = """
    INSERT INTO binding.bindings AS b (havip_id, address)
    SELECT f.havip_id, f.address FROM unnest($1::uuid[], $2::inet[]) AS f(havip_id, address)
    WHERE NOT EXISTS (SELECT 1 FROM binding.released_havips r WHERE r.id = f.havip_id)
    ORDER BY f.havip_id
    ON CONFLICT (havip_id) DO NOTHING
    RETURNING b.havip_id"""
# A binding is written only where the stored row still has the sequence the book decided from, and no newer claim
# than the book's (another process's refresh) — a fresh row only if the HAVIP has no history and, unless this batch
# removes it, no tombstone; a removal only where the sequence is the expected one. The history rows and the events
# of a HAVIP go out only with its binding write that applied; the statement returns the HAVIPs whose write did not
# apply (`conflicts`), and the caller then rolls the whole batch back.
_WRITE_DECISIONS = f"""
    WITH stamp AS (
        SELECT at, '"committed_at":"' || {rfc3339_sql("at")} || '"' AS field
        FROM (SELECT clock_timestamp() AS at) AS clock),
    decided AS (
        SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::macaddr[], $4::bigint[], $5::bigint[], $6::timestamptz[],
                             $7::boolean[], $8::timestamptz[], $9::boolean[], $10::boolean[], $11::bigint[],
                             $12::boolean[])
            AS u(havip_id, instance_id, mac, sequence, last_claim_ns, last_transition_at, moved, last_seen_at,
                 flapping, split_brain, expected, fresh)),
    put_bindings AS (
        UPDATE binding.bindings AS b SET instance_id = u.instance_id, mac = u.mac, sequence = u.sequence,
            last_claim_ns = u.last_claim_ns,
            last_transition_at = CASE WHEN u.moved THEN stamp.at ELSE u.last_transition_at END,
            last_seen_at = u.last_seen_at, flapping = u.flapping, split_brain = u.split_brain
        FROM decided AS u, stamp
        WHERE b.havip_id = u.havip_id AND b.sequence = u.expected AND b.last_claim_ns <= u.last_claim_ns
            AND NOT (u.fresh AND (EXISTS (SELECT 1 FROM binding.released_havips r WHERE r.id = u.havip_id)
                                  OR EXISTS (SELECT 1 FROM binding.transitions t WHERE t.havip_id = u.havip_id)))
        RETURNING b.havip_id),
    removing AS (
        SELECT * FROM unnest($13::uuid[], $14::bigint[], $15::boolean[]) AS r(havip_id, expected, fresh)),
    removed AS (
        DELETE FROM binding.bindings AS b USING removing AS r
        WHERE b.havip_id = r.havip_id AND b.sequence = r.expected
            AND NOT (r.fresh AND EXISTS (SELECT 1 FROM binding.transitions t WHERE t.havip_id = r.havip_id))
        RETURNING b.havip_id),
    applied AS (SELECT havip_id FROM put_bindings UNION ALL SELECT havip_id FROM removed),
    history AS (
        INSERT INTO binding.transitions (havip_id, sequence, from_instance_id, to_instance_id, mac,
            captured_at, captured_ns, committed_at, watcher_id, reason, address, cause)
        SELECT t.havip_id, t.sequence, t.from_instance_id, t.to_instance_id, t.mac, t.captured_at, t.captured_ns,
               stamp.at, t.watcher_id, t.reason, t.address, t.cause
        FROM unnest($16::uuid[], $17::bigint[], $18::uuid[], $19::uuid[], $20::macaddr[], $21::timestamptz[],
                    $22::bigint[], $23::text[], $24::text[], $25::inet[], $26::text[])
            AS t(havip_id, sequence, from_instance_id, to_instance_id, mac, captured_at, captured_ns, watcher_id,
                 reason, address, cause), stamp
        WHERE t.havip_id IN (SELECT havip_id FROM applied)),
    outbox AS (
        INSERT INTO binding.outbox (routing_key, body)
        SELECT e.routing_key, replace(e.body, '{COMMITTED_AT_SLOT}', stamp.field)
        FROM unnest($27::text[], $28::text[], $29::uuid[]) WITH ORDINALITY AS e(routing_key, body, havip_id, n),
             stamp
        WHERE e.havip_id IN (SELECT havip_id FROM applied)
        ORDER BY e.n
        RETURNING id)
    SELECT stamp.at AS committed_at, (SELECT max(id) FROM outbox) AS last_event_id,
           ARRAY(SELECT havip_id FROM decided UNION ALL SELECT havip_id FROM removing
                 EXCEPT SELECT havip_id FROM applied) AS conflicts
    FROM stamp"""
_INSERT_REJECTED = """
    INSERT INTO binding.rejected_claims
        (claim_id, havip_id, address, mac, reason, captured_at, watcher_id, count)
    SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::inet[], $4::macaddr[], $5::text[], $6::timestamptz[],
                         $7::text[], $8::bigint[])
    ON CONFLICT (claim_id) DO NOTHING
    RETURNING claim_id"""


_BINDING_COLUMNS = """havip_id, address, instance_id, mac, sequence, last_claim_ns, last_transition_at,
    last_seen_at, flapping, split_brain"""


def _binding_of_row(r: Row) -> Binding:
    return Binding(
        havip_id=r["havip_id"],
        address=_host(r["address"]),
        instance_id=r["instance_id"],
        mac=str(r["mac"]) if r["mac"] is not None else None,
        sequence=r["sequence"],
        last_claim_ns=r["last_claim_ns"],
        last_seen_written_ns=int(r["last_seen_at"].timestamp() * 1e9) if r["last_seen_at"] else 0,
        last_transition_at=r["last_transition_at"],
        flapping=r["flapping"],
        split_brain=r["split_brain"],
    )


async def load_bindings(conn: Queries, partitions: int, which: Sequence[int]) -> list[Binding]:
    """The bindings of the partitions `which` (of `partitions`), as committed."""
    rows = await conn.fetch(
        f"SELECT {_BINDING_COLUMNS} FROM binding.bindings WHERE {partition_sql('address', '$1')} = ANY($2::int[])",
        partitions,
        list(which),
    )
    return [_binding_of_row(r) for r in rows]


async def load_book(conn: Queries, policy: ConditionPolicy | None = None) -> BindingBook:
    book = BindingBook(policy=policy or ConditionPolicy())
    instances = [
        Instance(r["id"], r["vpc_id"], r["subnet_id"], str(r["mac"]), _host(r["private_ip"]))
        for r in await conn.fetch("SELECT id, vpc_id, subnet_id, mac, private_ip FROM binding.instances")
    ]
    havips = [
        Havip(r["id"], r["vpc_id"], r["subnet_id"], _host(r["address"]), frozenset(r["candidates"]))
        for r in await conn.fetch("SELECT id, vpc_id, subnet_id, address, candidates FROM binding.havips")
    ]
    bindings = [_binding_of_row(r) for r in await conn.fetch(f"SELECT {_BINDING_COLUMNS} FROM binding.bindings")]
    released = [r["id"] for r in await conn.fetch("SELECT id FROM binding.released_havips")]
    deregistered = [r["id"] for r in await conn.fetch("SELECT id FROM binding.deregistered_instances")]
    book.load(instances, havips, bindings, released, deregistered)
    for r in await conn.fetch("SELECT id, segment, vlan FROM binding.subnets"):
        book.attach_subnet(r["id"], Attachment(r["segment"], r["vlan"]))
    return book


@dataclass(frozen=True, slots=True)
class BatchWritten:
    new_rejections: list[RejectedClaim]  # the refusals that were new (a redelivered one is already stored)
    committed_at: datetime | None  # the stamp of the batch's transitions (_WRITE_DECISIONS); None: no decision
    last_event_id: int | None  # the decisions' last outbox row: their events are out once the relay is past it


class WriteConflict(Exception):
    """A batch's write found a HAVIP's stored binding other than the one its decisions were made from (another
    process committed in between): nothing of the batch is written; it is to be decided again from what is
    committed."""

    def __init__(self, havip_ids: Sequence[uuid.UUID]) -> None:
        super().__init__(f"{len(havip_ids)} HAVIP(s) changed by another process since they were decided")
        self.havip_ids = list(havip_ids)


async def _execute_in_runs(conn: Queries, statements: Sequence[tuple[str, tuple[Any, ...]]]) -> None:
    """Statements in order, consecutive runs of one statement as one executemany."""
    run: list[tuple[Any, ...]] = []
    run_sql = ""
    for sql, args in statements:
        if sql != run_sql and run:
            await conn.executemany(run_sql, run)
            run = []
        run_sql = sql
        run.append(args)
    if run:
        await conn.executemany(run_sql, run)


async def write_batch(work: UnitOfWork[Queries], batch: BatchWrite) -> BatchWritten:
    """Write a batch in the caller's unit of work. The decisions' bindings, history rows and events go last, in
    one statement that stamps them (`_WRITE_DECISIONS`); the refusals' and replays' events are therefore
    published ahead of the decisions' of the same batch. Raises WriteConflict, the unit of work still open, if a
    binding was not the one decided from: the caller rolls back."""
    conn = work.conn
    expected = batch.expected_sequences()
    if batch.fresh:
        created = await conn.fetch(_CREATE_BINDINGS, list(batch.fresh), list(batch.fresh.values()))
        if len(created) != len(batch.fresh):
            raise WriteConflict(sorted(batch.fresh.keys() - {row["havip_id"] for row in created}))
    await _execute_in_runs(conn, batch.inventory)
    if batch.holders_checked or batch.havips_checked:
        unreleased = await conn.fetch(
            _UNRELEASED,
            list(batch.holders_checked),
            list(batch.havips_checked),
            list(expected),
            batch.owned[0],
            batch.owned[1],
        )
        if unreleased:
            raise WriteConflict([row["havip_id"] for row in unreleased])
    if batch.refreshed:
        await write_renewals(conn, renewals_of(batch))
    new_rejections = await write_refusals(work, batch.rejected, batch.folded)
    for request in batch.replays:
        work.publish(await replayed_transitions(conn, request))
        await work.flush()
    if not expected:
        return BatchWritten(new_rejections, None, None)
    bindings = list(batch.bindings.values())
    removed = list(batch.removed_bindings)
    moved = {t.havip_id for t in batch.transitions}
    moves = batch.transitions
    routing_keys, bodies = outbox_rows(batch.events)
    row = await fetch_one(
        conn,
        _WRITE_DECISIONS,
        [b.havip_id for b in bindings],
        [b.instance_id for b in bindings],
        [b.mac for b in bindings],
        [b.sequence for b in bindings],
        [b.last_claim_ns for b in bindings],
        [b.last_transition_at for b in bindings],
        [b.havip_id in moved for b in bindings],
        [ns_to_datetime(b.last_seen_written_ns) if b.last_seen_written_ns else None for b in bindings],
        [b.flapping for b in bindings],
        [b.split_brain for b in bindings],
        [expected[b.havip_id] for b in bindings],
        [b.havip_id in batch.fresh for b in bindings],
        removed,
        [expected[havip_id] for havip_id in removed],
        [havip_id in batch.fresh for havip_id in removed],
        [t.havip_id for t in moves],
        [t.sequence for t in moves],
        [t.previous.instance_id if t.previous else None for t in moves],
        [t.current.instance_id if t.current else None for t in moves],
        [t.current.mac if t.current else None for t in moves],
        [ns_to_datetime(t.captured_ns) if t.captured_ns is not None else None for t in moves],
        [t.captured_ns for t in moves],
        [t.watcher_id for t in moves],
        [t.reason for t in moves],
        [t.address for t in moves],
        [t.cause for t in moves],
        routing_keys,
        bodies,
        batch.event_havips,
    )
    if row["conflicts"]:
        raise WriteConflict(row["conflicts"])
    work.wrote_events(len(bodies))
    return BatchWritten(new_rejections, row["committed_at"], row["last_event_id"])


async def write_refusals(
    work: UnitOfWork[Queries], rejected: Sequence[RejectedClaim], folded: dict[uuid.UUID, int]
) -> list[RejectedClaim]:
    """Audit rows and their events, and frames folded into rows already committed; returns the refusals that
    were new (a redelivered claim's refusal is already stored: neither stored nor published again)."""
    conn = work.conn
    new_rejections: list[RejectedClaim] = []
    if rejected:
        rows = await conn.fetch(
            _INSERT_REJECTED,
            [r.claim_id for r in rejected],
            [r.havip_id for r in rejected],
            [r.address for r in rejected],
            [r.mac for r in rejected],
            [r.reason for r in rejected],
            [r.captured_at for r in rejected],
            [r.watcher_id for r in rejected],
            [r.count for r in rejected],
        )
        inserted = {row["claim_id"] for row in rows}
        new_rejections = [r for r in rejected if r.claim_id in inserted]
    if folded:
        await conn.execute(
            """UPDATE binding.rejected_claims AS r SET count = r.count + f.frames
               FROM unnest($1::uuid[], $2::bigint[]) AS f(claim_id, frames) WHERE r.claim_id = f.claim_id""",
            list(folded),
            list(folded.values()),
        )
    work.publish([claim_rejected(r) for r in new_rejections])
    await work.flush()
    return new_rejections


@dataclass(frozen=True, slots=True)
class Renewal:
    """A holder's refresh as it was decided (a snapshot: the book moves on while it is written)."""

    havip_id: uuid.UUID
    instance_id: uuid.UUID
    last_claim_ns: int
    last_seen_at: datetime


def renewals_of(batch: BatchWrite) -> list[Renewal]:
    return [
        Renewal(b.havip_id, b.instance_id, b.last_claim_ns, ns_to_datetime(b.last_seen_written_ns))
        for b in batch.refreshed.values()
        if b.instance_id is not None
    ]


async def write_renewals(conn: Queries, renewals: Sequence[Renewal]) -> None:
    """Raises WriteConflict (the caller's transaction still open) if a renewal found another holder committed
    with an older claim."""
    overridden = await conn.fetch(
        _REFRESH_BINDINGS,
        [r.havip_id for r in renewals],
        [r.instance_id for r in renewals],
        [r.last_claim_ns for r in renewals],
        [r.last_seen_at for r in renewals],
    )
    if overridden:
        raise WriteConflict([row["havip_id"] for row in overridden])


# At most this many transitions go out for one replay request: a reader asks again for what is still missing.
MAX_REPLAYED = 20_000

_REPLAY_COLUMNS = """
    SELECT t.havip_id, t.sequence, t.from_instance_id, t.to_instance_id, t.mac::text AS mac,
           p.mac::text AS from_mac, host(t.address) AS address, t.captured_ns, t.committed_at, t.watcher_id,
           t.reason, t.cause"""
_REPLAY_RANGES = f"""{_REPLAY_COLUMNS}
    FROM unnest($1::uuid[], $2::bigint[], $3::bigint[]) AS r(havip_id, first_sequence, last_sequence)
    JOIN binding.transitions t
        ON t.havip_id = r.havip_id AND t.sequence BETWEEN r.first_sequence AND r.last_sequence
    LEFT JOIN binding.transitions p ON p.havip_id = t.havip_id AND p.sequence = t.sequence - 1
    WHERE t.address IS NOT NULL
    ORDER BY t.havip_id, t.sequence LIMIT $4"""
_REPLAY_NEWEST = f"""{_REPLAY_COLUMNS}
    FROM (SELECT havip_id, max(sequence) AS sequence FROM binding.transitions GROUP BY havip_id) n
    JOIN binding.transitions t ON t.havip_id = n.havip_id AND t.sequence = n.sequence
    LEFT JOIN binding.transitions p ON p.havip_id = t.havip_id AND p.sequence = t.sequence - 1
    WHERE t.address IS NOT NULL
    ORDER BY t.havip_id LIMIT $1"""


async def replayed_transitions(conn: Queries, request: ReplayRequested) -> list[Envelope]:
    """The `havip.binding.replayed` events a replay request asks for, from the history (read in the caller's
    transaction): the same data as the `havip.binding.changed` each transition was first published with."""
    rows: list[asyncpg.Record] = []
    if request.ranges:
        rows += await conn.fetch(
            _REPLAY_RANGES,
            [r.havip_id for r in request.ranges],
            [r.first_sequence for r in request.ranges],
            [r.last_sequence for r in request.ranges],
            MAX_REPLAYED,
        )
    if request.newest_of_every_havip:
        rows += await conn.fetch(_REPLAY_NEWEST, MAX_REPLAYED)
    return [binding_replayed(transition_of_row(row), row["committed_at"]) for row in rows]


def transition_of_row(row: Row) -> Transition:
    """A history row (_REPLAY_COLUMNS) as the transition that wrote it: its event is built again from it."""
    previous = None
    if row["from_instance_id"] is not None and row["from_mac"] is not None:
        previous = Holder(row["from_instance_id"], row["from_mac"])
    current = None
    if row["to_instance_id"] is not None:
        current = Holder(row["to_instance_id"], row["mac"])
    return Transition(
        row["havip_id"],
        IPv4Address(row["address"]),
        previous,
        current,
        row["sequence"],
        row["reason"],
        row["captured_ns"],
        row["watcher_id"],
        row["cause"],
    )


async def delete_old_refusals(conn: Queries, older_than_days: float, limit: int = 10_000) -> int:
    """Audit retention: remove refusals recorded more than `older_than_days` ago (at most `limit` a call)."""
    result = await conn.execute(
        """DELETE FROM binding.rejected_claims WHERE id IN (
               SELECT id FROM binding.rejected_claims WHERE recorded_at < now() - make_interval(secs => $1)
               ORDER BY id LIMIT $2)""",
        older_than_days * 86_400,
        limit,
    )
    return int(result.rsplit(" ", 1)[-1])


# ---- the inventory log (migrations/0010_inventory_log.sql) ---------------------------------------------------

INVENTORY_CHANNEL = "havip_binding_inventory"  # NOTIFY'd after each commit that logged inventory
_INVENTORY_LOCK = 0x48415649  # pg_advisory_xact_lock: one writer at a time, so that seq grows in commit order
_LOG = """
    INSERT INTO binding.inventory_log (event_id, body)
    SELECT event_id, body FROM unnest($1::uuid[], $2::bytea[]) WITH ORDINALITY AS e(event_id, body, n) ORDER BY n
    ON CONFLICT (event_id) DO NOTHING RETURNING event_id"""


def projection_of(event_type: str, data: EventData) -> list[tuple[str, tuple[Any, ...]]]:
    """The statements that write an inventory event into the binding's projection (keyed, idempotent)."""
    batch = BatchWrite()
    if isinstance(data, SubnetData):
        if event_type == "subnet.deleted":
            batch.detach_subnet(data.id)
        else:
            batch.attach_subnet(data.id, Attachment(data.segment, data.vlan))
    elif isinstance(data, InstanceData):
        if event_type == "instance.deregistered":
            batch.remove_instance(data.id)
        else:
            batch.put_instance(Instance(data.id, data.vpc_id, data.subnet_id, data.mac, data.private_ip))
    elif isinstance(data, HavipData):
        if event_type == "havip.released":
            batch.forget_havip(data.id)
        else:
            batch.put_havip(Havip(data.id, data.vpc_id, data.subnet_id, data.address, frozenset(data.candidates)))
    return batch.inventory


async def log_inventory(conn: Queries, logged: Sequence[tuple[EventHead, EventData]]) -> int:
    """In the caller's transaction: append the events not logged yet (a redelivery is not) and write their
    projection; the followers are notified at the commit. Returns how many were new."""
    await conn.execute("SELECT pg_advisory_xact_lock($1)", _INVENTORY_LOCK)
    bodies = [encode(Envelope(**asdict(head), data=data.model_dump(mode="json"))) for head, data in logged]
    new = {r["event_id"] for r in await conn.fetch(_LOG, [head.event_id for head, _ in logged], bodies)}
    statements = [s for head, data in logged if head.event_id in new for s in projection_of(head.type, data)]
    await _execute_in_runs(conn, statements)
    if new:
        await conn.execute("SELECT pg_notify($1, '')", INVENTORY_CHANNEL)
    return len(new)


async def until_inventory_written(conn: Queries) -> None:
    """Returns once no inventory write is under way (the writer's transaction lock is free): what the writer had
    taken from binding.inventory is then in the log."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock_shared($1)", _INVENTORY_LOCK)


async def inventory_since(conn: Queries, seq: int, limit: int = 2000) -> list[tuple[int, bytes]]:
    """The logged inventory events after `seq`, oldest first: (seq, the envelope as published)."""
    rows = await conn.fetch(
        "SELECT seq, body FROM binding.inventory_log WHERE seq > $1 ORDER BY seq LIMIT $2", seq, limit
    )
    return [(r["seq"], bytes(r["body"])) for r in rows]


async def last_inventory_seq(conn: Queries) -> int:
    return int(await conn.fetchval("SELECT coalesce(max(seq), 0) FROM binding.inventory_log"))


async def delete_old_inventory_log(conn: Queries, older_than_s: float) -> int:
    result = await conn.execute(
        "DELETE FROM binding.inventory_log WHERE logged_at < now() - make_interval(secs => $1)", older_than_s
    )
    return int(result.split()[-1])
