"""HAVIPs: allocate (the given address or the lowest free one), list, show with binding, release, history.

Allocation runs in one transaction that takes the VPC's lock (quota) and then the subnet's lock (addresses,
shared with instance registration), reads what is taken, chooses, inserts and writes the `havip.allocated`
event to the outbox. The unique (vpc_id, address) constraint is the safety net.

The binding columns come from the binding service's table `binding.bindings`, read only.
"""

from __future__ import annotations

import uuid
from ipaddress import IPv4Address
from typing import Any

from services.allocator.database import Database, Transaction
from services.allocator.domain import addressing
from services.allocator.errors import Conflict, Invalid, NotFound, QuotaExceeded
from services.allocator.havips.schemas import Havip, HavipCreate, HavipState, Transition
from services.allocator.metrics import ALLOCATIONS
from services.allocator.pagination import Where, decode_sequence, encode_sequence, next_token
from services.allocator.schemas import Page
from services.allocator.subnets.schemas import SubnetRef
from services.allocator.subnets.service import fetch_subnet_ref, taken_addresses

_SELECT = """
    SELECT h.id, h.name, h.vpc_id, h.subnet_id, h.address, h.candidates, h.eip, h.created_at,
           b.instance_id AS bound_instance_id, b.mac AS bound_mac,
           b.last_transition_at, b.last_seen_at,
           coalesce(b.flapping, false) AS flapping, coalesce(b.split_brain, false) AS split_brain
    FROM allocator.havips h
    LEFT JOIN binding.bindings b ON b.havip_id = h.id"""


async def _find_havip(conn: Any, havip_id: uuid.UUID) -> Havip | None:
    row = await conn.fetchrow(f"{_SELECT} WHERE h.id = $1", havip_id)
    return None if row is None else Havip.from_row(row)


async def _fetch_havip(conn: Any, havip_id: uuid.UUID) -> Havip:
    havip = await _find_havip(conn, havip_id)
    if havip is None:
        raise NotFound.of("havip", havip_id)
    return havip


# ---- allocate ----------------------------------------------------------------------------------------------


async def _replay(tx: Transaction, key: str, fingerprint: str, new_id: uuid.UUID) -> Havip | None:
    """Claim the Idempotency-Key for `new_id`; or, when an earlier request holds it, that request's HAVIP.

    A concurrent request with the same key waits on the key's unique index until the first one commits
    (then it replays) or rolls back (then it proceeds).
    """
    claimed = await tx.conn.fetchval(
        """INSERT INTO allocator.idempotency_keys (key, request_hash, havip_id) VALUES ($1, $2, $3)
           ON CONFLICT (key) DO NOTHING RETURNING havip_id""",
        key,
        fingerprint,
        new_id,
    )
    if claimed is not None:
        return None
    earlier = await tx.conn.fetchrow(
        "SELECT request_hash, havip_id FROM allocator.idempotency_keys WHERE key = $1", key
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


async def _check_candidates(conn: Any, subnet: SubnetRef, candidates: list[uuid.UUID]) -> None:
    if not candidates:
        return
    found = {
        row["id"]
        for row in await conn.fetch(
            "SELECT id FROM allocator.instances WHERE id = ANY($1::uuid[]) AND subnet_id = $2",
            candidates,
            subnet.id,
        )
    }
    missing = [str(c) for c in candidates if c not in found]
    if missing:
        raise Invalid(
            f"candidates must be registered instances of subnet {subnet.id}: {', '.join(missing)}",
            code="INVALID_CANDIDATES",
        )


async def allocate_havip(
    db: Database, request: HavipCreate, *, quota: int, idempotency_key: str | None = None
) -> tuple[Havip, bool]:
    """The new HAVIP and False; or, for a retried Idempotency-Key, the earlier one and True."""
    new_id = uuid.uuid4()
    async with db.transaction() as tx:
        if idempotency_key is not None:
            earlier = await _replay(tx, idempotency_key, request.fingerprint(), new_id)
            if earlier is not None:
                return earlier, True
        subnet = await fetch_subnet_ref(tx.conn, request.subnet_id)
        # Lock order: VPC, then subnet (as everywhere else).
        await tx.lock("vpc", subnet.vpc_id)
        await tx.lock("subnet", subnet.id)
        subnet = await fetch_subnet_ref(tx.conn, subnet.id)  # it may have been deleted meanwhile
        in_vpc = await tx.conn.fetchval("SELECT count(*) FROM allocator.havips WHERE vpc_id = $1", subnet.vpc_id)
        if in_vpc >= quota:
            raise QuotaExceeded(f"vpc {subnet.vpc_id} already has {in_vpc} HAVIP(s); the quota is {quota}")
        await _check_candidates(tx.conn, subnet, request.candidates)
        address = addressing.choose_address(
            subnet.cidr, await taken_addresses(tx.conn, subnet.id), request.address
        )
        row = await tx.conn.fetchrow(
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
                   OR EXISTS (SELECT 1 FROM binding.transitions WHERE havip_id = $1)""",
            havip_id,
        )
        if not known:
            raise NotFound.of("havip", havip_id)
        rows = await conn.fetch(
            """SELECT sequence, from_instance_id, to_instance_id, mac, captured_at, committed_at,
                      watcher_id, reason
               FROM binding.transitions
               WHERE havip_id = $1 AND ($2::bigint IS NULL OR sequence < $2)
               ORDER BY sequence DESC LIMIT $3""",
            havip_id,
            before,
            limit + 1,
        )
    token = encode_sequence(rows[limit - 1]["sequence"]) if len(rows) > limit else None
    return Page[Transition](items=[Transition.from_row(r) for r in rows[:limit]], next_page_token=token)


# ---- release -----------------------------------------------------------------------------------------------


async def release_havip(db: Database, havip_id: uuid.UUID, *, force: bool = False) -> None:
    """409 while an EIP is associated; 409 while bound, unless forced (the binding service then ends the
    binding with a final history row when it sees `havip.released`)."""
    async with db.transaction() as tx:
        found = await _fetch_havip(tx.conn, havip_id)
        await tx.lock("subnet", found.subnet_id)
        havip = await _fetch_havip(tx.conn, havip_id)
        if havip.eip is not None:
            raise Conflict(
                f"havip {havip_id} has EIP {havip.eip} associated; dissociate it first", code="EIP_ASSOCIATED"
            )
        if havip.state == "BOUND" and not force:
            raise Conflict(
                f"havip {havip_id} is bound to instance {havip.bound_instance_id}; "
                "release it with ?force=true to end the binding",
                code="HAVIP_BOUND",
            )
        await tx.conn.execute("DELETE FROM allocator.havips WHERE id = $1", havip_id)
        tx.publish("havip.released", havip.event_data())
