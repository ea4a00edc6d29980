"""HAVIPs: allocate (the given address or the lowest free one), list, show with binding, update, EIPs,
release, history; and the expiry of idempotency keys.

Allocation runs in one transaction that takes the subnet's lock (addresses, shared with instance
registration), chooses the address (one probe of the subnet's free ranges, kept by the database in step with
the rows: migration 0005), inserts and writes the `havip.allocated` event to the outbox, and only then takes
the VPC's lock to check the quota (the sum of the VPC's per-subnet HAVIP counts, kept by the same migration),
so that the lock every allocation of a VPC passes through is held for the shortest time. The unique
(vpc_id, address) constraint and the free-range trigger (which refuses an address that is not free) are the
safety nets.

Every later change of a HAVIP (update, EIP association, release) takes its subnet's lock first, so it is
serialised with the others and with the registration and deregistration of its subnet's instances (candidates
are checked against them). EIP association then takes the one EIP pool lock; the unique index on havips.eip is
the safety net.

The binding columns (state, holder, times, flags) and the history come from the allocator's own view of the
binding service's events (binding_view/, tables `view_bindings` and `view_transitions`): eventually
consistent, within milliseconds. A release decides HAVIP_BOUND on that view, with the HAVIP's record locked.
"""

from __future__ import annotations

import uuid
from ipaddress import IPv4Address

from services.allocator.binding_view.repository import holder_for_release
from services.allocator.database import EIP_POOL, Database, Transaction
from services.allocator.domain.eips import EipPool
from services.allocator.errors import FORCE_HINT, Conflict, Invalid, NotFound, QuotaExceeded
from services.allocator.havips.schemas import EipAssociate, Havip, HavipCreate, HavipState, HavipUpdate, Transition
from services.allocator.metrics import ALLOCATIONS
from services.allocator.pagination import Where, decode_sequence, encode_sequence, next_token
from services.allocator.schemas import Page
from services.allocator.subnets.service import choose_address, fetch_subnet_ref
from shared.db import Connection, fetch_one
from shared.events import EipData

DEFAULT_IDEMPOTENCY_TTL_HOURS = 24
PURGE_BATCH = 10_000

_SELECT = """
    SELECT h.id, h.name, h.vpc_id, h.subnet_id, h.address, h.candidates, h.eip, h.created_at,
           b.instance_id AS bound_instance_id, b.mac AS bound_mac,
           b.last_transition_at, b.last_seen_at,
           coalesce(b.flapping, false) AS flapping, coalesce(b.split_brain, false) AS split_brain
    FROM allocator.havips h
    LEFT JOIN allocator.view_bindings b ON b.havip_id = h.id"""


async def _find_havip(conn: Connection, havip_id: uuid.UUID) -> Havip | None:
    row = await conn.fetchrow(f"{_SELECT} WHERE h.id = $1", havip_id)
    return None if row is None else Havip.from_row(row)


async def _fetch_havip(conn: Connection, havip_id: uuid.UUID) -> Havip:
    havip = await _find_havip(conn, havip_id)
    if havip is None:
        raise NotFound.of("havip", havip_id)
    return havip


# ---- allocate ----------------------------------------------------------------------------------------------


async def _replay(tx: Transaction, key: str, fingerprint: str, new_id: uuid.UUID, ttl_hours: int) -> Havip | None:
    """Claim the Idempotency-Key for `new_id`; or, when an earlier request holds it, that request's HAVIP.

    A key older than `ttl_hours` is forgotten: it is taken over as if it were new (whether or not the purge
    has deleted it yet). A concurrent request with the same key waits on the key's unique index until the
    first one commits (then it replays) or rolls back (then it proceeds).
    """
    claimed = await tx.conn.fetchval(
        """INSERT INTO allocator.idempotency_keys AS k (key, request_hash, havip_id) VALUES ($1, $2, $3)
           ON CONFLICT (key) DO UPDATE
               SET request_hash = EXCLUDED.request_hash, havip_id = EXCLUDED.havip_id, created_at = now()
               WHERE k.created_at < now() - make_interval(hours => $4)
           RETURNING havip_id""",
        key,
        fingerprint,
        new_id,
        ttl_hours,
    )
    if claimed is not None:
        return None
    earlier = await fetch_one(
        tx.conn, "SELECT request_hash, havip_id FROM allocator.idempotency_keys WHERE key = $1", key
    )
    if earlier["request_hash"] != fingerprint:
        raise Conflict(
            "this Idempotency-Key was used with a different request body", code="IDEMPOTENCY_KEY_REUSED"
        )
    havip = await _find_havip(tx.conn, earlier["havip_id"])
    if havip is None:
        raise Conflict(
            f"the HAVIP allocated with this Idempotency-Key ({earlier['havip_id']}) was released; "
            "use a new key to allocate another",
            code="IDEMPOTENCY_KEY_REUSED",
        )
    return havip


async def _check_candidates(conn: Connection, subnet_id: uuid.UUID, candidates: list[uuid.UUID]) -> None:
    """Every candidate must be a registered instance of the subnet (call with the subnet locked)."""
    if not candidates:
        return
    found = {
        row["id"]
        for row in await conn.fetch(
            "SELECT id FROM allocator.instances WHERE id = ANY($1::uuid[]) AND subnet_id = $2",
            candidates,
            subnet_id,
        )
    }
    missing = [str(c) for c in candidates if c not in found]
    if missing:
        raise Invalid(
            f"candidates must be registered instances of subnet {subnet_id}: {', '.join(missing)}",
            code="INVALID_CANDIDATES",
        )


async def allocate_havip(
    db: Database,
    request: HavipCreate,
    *,
    quota: int,
    idempotency_key: str | None = None,
    idempotency_ttl_hours: int = DEFAULT_IDEMPOTENCY_TTL_HOURS,
) -> tuple[Havip, bool]:
    """The new HAVIP and False; or, for a retried Idempotency-Key, the earlier one and True."""
    new_id = uuid.uuid4()
    async with db.transaction() as tx:
        if idempotency_key is not None:
            earlier = await _replay(tx, idempotency_key, request.fingerprint(), new_id, idempotency_ttl_hours)
            if earlier is not None:
                return earlier, True
        subnet = await fetch_subnet_ref(tx.conn, request.subnet_id)
        await tx.lock("subnet", subnet.id)
        subnet = await fetch_subnet_ref(tx.conn, subnet.id)  # it may have been deleted meanwhile
        await _check_candidates(tx.conn, subnet.id, request.candidates)
        address = await choose_address(tx.conn, subnet, request.address)
        row = await fetch_one(
            tx.conn,
            """INSERT INTO allocator.havips (id, vpc_id, subnet_id, name, address, candidates)
               VALUES ($1, $2, $3, $4, $5, $6)
               RETURNING id, name, vpc_id, subnet_id, address, candidates, eip, created_at,
                         NULL::uuid AS bound_instance_id, NULL::macaddr AS bound_mac,
                         NULL::timestamptz AS last_transition_at, NULL::timestamptz AS last_seen_at,
                         false AS flapping, false AS split_brain""",
            new_id,
            subnet.vpc_id,
            subnet.id,
            request.name,
            address,
            request.candidates,
        )
        havip = Havip.from_row(row)
        tx.publish("havip.allocated", havip.event_data())
        await tx.flush_events()
        # The quota's VPC lock is taken last, so that it is held only for the count and the commit: every
        # allocation in the VPC passes through it one at a time. Read after the lock, the sum of the VPC's
        # per-subnet counts (kept by the INSERT's trigger, migration 0005: one row per subnet, however many
        # HAVIPs) includes every committed HAVIP of the VPC and our own new row.
        await tx.lock("vpc", subnet.vpc_id)
        in_vpc = await tx.conn.fetchval(
            "SELECT sum(havips) FROM allocator.subnet_havip_counts WHERE vpc_id = $1", subnet.vpc_id
        )
        if in_vpc > quota:
            raise QuotaExceeded(f"vpc {subnet.vpc_id} already has {in_vpc - 1} HAVIP(s); the quota is {quota}")
    ALLOCATIONS.inc()
    return havip, False


# ---- read --------------------------------------------------------------------------------------------------


async def get_havip(db: Database, havip_id: uuid.UUID) -> Havip:
    async with db.connection() as conn:
        return await _fetch_havip(conn, havip_id)


async def list_havips(
    db: Database,
    *,
    vpc_id: uuid.UUID | None,
    subnet_id: uuid.UUID | None,
    state: HavipState | None,
    address: IPv4Address | None,
    limit: int,
    page_token: str | None,
) -> Page[Havip]:
    where = Where()
    if vpc_id is not None:
        where.add("h.vpc_id = {}", vpc_id)
    if subnet_id is not None:
        where.add("h.subnet_id = {}", subnet_id)
    if state is not None:
        where.add("(b.instance_id IS NOT NULL) = {}", state == "BOUND")
    if address is not None:
        where.add("h.address = {}::inet", address)
    where.after("h.created_at", "h.id", page_token)
    sql = f"{_SELECT} {where.sql} ORDER BY h.created_at, h.id LIMIT {where.param(limit + 1)}"
    async with db.connection() as conn:
        rows = await conn.fetch(sql, *where.params)
    rows, token = next_token(rows, limit)
    return Page[Havip](items=[Havip.from_row(r) for r in rows], next_page_token=token)


async def list_transitions(
    db: Database, havip_id: uuid.UUID, *, limit: int, page_token: str | None
) -> Page[Transition]:
    """Ownership history, newest first. Kept after release: 404 only when nothing ever existed."""
    before = decode_sequence(page_token) if page_token is not None else None
    async with db.connection() as conn:
        known = await conn.fetchval(
            """SELECT EXISTS (SELECT 1 FROM allocator.havips WHERE id = $1)
                   OR EXISTS (SELECT 1 FROM allocator.view_transitions WHERE havip_id = $1)""",
            havip_id,
        )
        if not known:
            raise NotFound.of("havip", havip_id)
        rows = await conn.fetch(
            """SELECT sequence, from_instance_id, to_instance_id, mac, captured_at, committed_at,
                      watcher_id, reason, cause
               FROM allocator.view_transitions
               WHERE havip_id = $1 AND ($2::bigint IS NULL OR sequence < $2)
               ORDER BY sequence DESC LIMIT $3""",
            havip_id,
            before,
            limit + 1,
        )
    token = encode_sequence(rows[limit - 1]["sequence"]) if len(rows) > limit else None
    return Page[Transition](items=[Transition.from_row(r) for r in rows[:limit]], next_page_token=token)


# ---- change --------------------------------------------------------------------------------------------------


async def _lock_havip(tx: Transaction, havip_id: uuid.UUID) -> Havip:
    """Take the lock of the HAVIP's subnet and read it again: every change of one HAVIP (update, EIP,
    release) and every change of its subnet's instances is then serialised."""
    found = await _fetch_havip(tx.conn, havip_id)
    await tx.lock("subnet", found.subnet_id)
    return await _fetch_havip(tx.conn, havip_id)  # 404 if it was released meanwhile


async def update_havip(db: Database, havip_id: uuid.UUID, request: HavipUpdate, *, force: bool = False) -> Havip:
    """Rename and/or replace the candidate list. Publishes `havip.updated` when something changed. A list that
    no longer names the holder would end the binding: 409 HOLDER_NOT_IN_CANDIDATES unless forced (decided on
    the view, its record locked, as a release is)."""
    async with db.transaction() as tx:
        havip = await _lock_havip(tx, havip_id)
        name = request.name if request.changes_name else havip.name
        candidates = request.candidates if request.changes_candidates else havip.candidates
        if name == havip.name and candidates == havip.candidates:
            return havip
        if request.changes_candidates:
            await _check_candidates(tx.conn, havip.subnet_id, candidates)
            if candidates:
                holder = await holder_for_release(tx.conn, havip_id)
                if holder is not None and holder not in candidates and not force:
                    raise Conflict(
                        f"havip {havip_id} is bound to instance {holder}, which the new candidate list leaves "
                        f"out: the binding would end; {FORCE_HINT}",
                        code="HOLDER_NOT_IN_CANDIDATES",
                    )
        await tx.conn.execute(
            "UPDATE allocator.havips SET name = $2, candidates = $3 WHERE id = $1", havip_id, name, candidates
        )
        updated = await _fetch_havip(tx.conn, havip_id)
        tx.publish("havip.updated", updated.event_data())
    return updated


async def associate_eip(db: Database, havip_id: uuid.UUID, request: EipAssociate, pool: EipPool) -> Havip:
    """Give the HAVIP the requested EIP of the pool, or the lowest free one. One EIP per HAVIP, one HAVIP per
    EIP: the pool's lock serialises associations (the unique index on havips.eip is the safety net)."""
    async with db.transaction() as tx:
        havip = await _lock_havip(tx, havip_id)
        if havip.eip is not None:
            raise Conflict(
                f"havip {havip_id} already has EIP {havip.eip}; dissociate it first", code="EIP_ASSOCIATED"
            )
        if not pool.ranges:
            raise Conflict(
                "no EIP pool is configured (HAVIP_EIP_POOL); EIPs cannot be associated",
                code="EIP_POOL_NOT_CONFIGURED",
            )
        if request.address is not None and request.address not in pool:
            raise Invalid(f"{request.address} is not in the EIP pool ({pool.describe()})", code="EIP_NOT_IN_POOL")
        await tx.lock("eip_pool", EIP_POOL)  # lock order: subnet, then the pool
        if request.address is not None:
            holder = await tx.conn.fetchval(
                "SELECT id FROM allocator.havips WHERE eip = $1::inet", request.address
            )
            if holder is not None:
                raise Conflict(f"EIP {request.address} is associated with havip {holder}", code="EIP_IN_USE")
            eip = request.address
        else:
            taken = [
                r["eip"] for r in await tx.conn.fetch("SELECT eip FROM allocator.havips WHERE eip IS NOT NULL")
            ]
            free = pool.lowest_free(taken)
            if free is None:
                raise Conflict(
                    f"every EIP of the pool ({pool.size} addresses) is associated", code="EIP_POOL_EXHAUSTED"
                )
            eip = free
        await tx.conn.execute("UPDATE allocator.havips SET eip = $2::inet WHERE id = $1", havip_id, eip)
        tx.publish("havip.eip.associated", EipData(havip_id=havip_id, eip=eip))
        associated = await _fetch_havip(tx.conn, havip_id)
    return associated


async def dissociate_eip(db: Database, havip_id: uuid.UUID) -> Havip:
    """Take the EIP off the HAVIP (whether or not the address is still in the configured pool)."""
    async with db.transaction() as tx:
        havip = await _lock_havip(tx, havip_id)
        if havip.eip is None:
            raise Conflict(f"havip {havip_id} has no EIP associated", code="EIP_NOT_ASSOCIATED")
        await tx.conn.execute("UPDATE allocator.havips SET eip = NULL WHERE id = $1", havip_id)
        tx.publish("havip.eip.dissociated", EipData(havip_id=havip_id, eip=havip.eip))
        dissociated = await _fetch_havip(tx.conn, havip_id)
    return dissociated


# ---- idempotency keys --------------------------------------------------------------------------------------


async def purge_idempotency_keys(db: Database, ttl_hours: int) -> int:
    """Delete the keys older than `ttl_hours`, in batches; returns how many were deleted."""
    deleted = 0
    while True:
        async with db.connection() as conn:
            status = await conn.execute(
                """DELETE FROM allocator.idempotency_keys WHERE key IN (
                       SELECT key FROM allocator.idempotency_keys
                       WHERE created_at < now() - make_interval(hours => $1)
                       LIMIT $2)""",
                ttl_hours,
                PURGE_BATCH,
            )
        count = int(status.split()[-1])
        deleted += count
        if count < PURGE_BATCH:
            return deleted


# ---- release -----------------------------------------------------------------------------------------------


async def release_havip(db: Database, havip_id: uuid.UUID, *, force: bool = False) -> None:
    """409 while an EIP is associated; 409 while bound, unless forced (the binding service then ends the
    binding with a final history row when it sees `havip.released`).

    Bound or not is what the allocator's view shows, read with the HAVIP's view record locked: a batch of
    binding events that touches it either committed before (and is seen) or waits for this release to commit
    (and the binding service, which sees `havip.released` after the claim, ends that binding).
    """
    async with db.transaction() as tx:
        havip = await _lock_havip(tx, havip_id)
        if havip.eip is not None:
            raise Conflict(
                f"havip {havip_id} has EIP {havip.eip} associated; dissociate it first", code="EIP_ASSOCIATED"
            )
        holder = await holder_for_release(tx.conn, havip_id)
        if holder is not None and not force:
            raise Conflict(
                f"havip {havip_id} is bound to instance {holder}: releasing it ends the binding; {FORCE_HINT}",
                code="HAVIP_BOUND",
            )
        await tx.conn.execute("DELETE FROM allocator.havips WHERE id = $1", havip_id)
        tx.publish("havip.released", havip.event_data())
