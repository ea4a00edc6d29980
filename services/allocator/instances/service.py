"""Instances (a server's network interface: private IP + MAC): register, list, show, deregister.

Registration takes the subnet's lock, like HAVIP allocation: an instance's IP can never be a HAVIP's
address, nor the other way round.
"""

from __future__ import annotations

import uuid

from services.allocator.binding_view.repository import havips_held_by
from services.allocator.database import Database
from services.allocator.errors import FORCE_HINT, Conflict, NotFound
from services.allocator.instances.schemas import Instance, InstanceCreate
from services.allocator.pagination import Where, next_token
from services.allocator.schemas import Page
from services.allocator.subnets.service import check_address_free, fetch_subnet_ref
from shared.db import Connection, fetch_one

_COLUMNS = "id, vpc_id, subnet_id, name, private_ip, mac, created_at"


async def _fetch_instance(conn: Connection, instance_id: uuid.UUID) -> Instance:
    row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM allocator.instances WHERE id = $1", instance_id)
    if row is None:
        raise NotFound.of("instance", instance_id)
    return Instance.from_row(row)


async def register_instance(db: Database, request: InstanceCreate) -> Instance:
    async with db.transaction() as tx:
        await tx.lock("subnet", request.subnet_id)
        subnet = await fetch_subnet_ref(tx.conn, request.subnet_id)
        await check_address_free(tx.conn, subnet, request.private_ip)
        holder = await tx.conn.fetchval("SELECT id FROM allocator.instances WHERE mac = $1", request.mac)
        if holder is not None:
            raise Conflict(f"MAC {request.mac} is already registered (instance {holder})", code="MAC_IN_USE")
        row = await fetch_one(
            tx.conn,
            f"""INSERT INTO allocator.instances (id, vpc_id, subnet_id, name, private_ip, mac)
                VALUES ($1, $2, $3, $4, $5, $6) RETURNING {_COLUMNS}""",
            uuid.uuid4(),
            subnet.vpc_id,
            subnet.id,
            request.name,
            request.private_ip,
            request.mac,
        )
        instance = Instance.from_row(row)
        tx.publish("instance.registered", instance.event_data())
    return instance


async def get_instance(db: Database, instance_id: uuid.UUID) -> Instance:
    async with db.connection() as conn:
        return await _fetch_instance(conn, instance_id)


async def list_instances(
    db: Database,
    *,
    vpc_id: uuid.UUID | None,
    subnet_id: uuid.UUID | None,
    limit: int,
    page_token: str | None,
) -> Page[Instance]:
    where = Where()
    if vpc_id is not None:
        where.add("vpc_id = {}", vpc_id)
    if subnet_id is not None:
        where.add("subnet_id = {}", subnet_id)
    where.after("created_at", "id", page_token)
    sql = (
        f"SELECT {_COLUMNS} FROM allocator.instances {where.sql} "
        f"ORDER BY created_at, id LIMIT {where.param(limit + 1)}"
    )
    async with db.connection() as conn:
        rows = await conn.fetch(sql, *where.params)
    rows, token = next_token(rows, limit)
    return Page[Instance](items=[Instance.from_row(r) for r in rows], next_page_token=token)


async def deregister_instance(db: Database, instance_id: uuid.UUID, *, force: bool = False) -> None:
    """Refused unless forced while the instance holds a HAVIP (INSTANCE_HOLDS_HAVIP: the binding service would
    end the binding; decided on the view, the held records locked, as a release is) or is a candidate of one
    (INSTANCE_IN_USE). Forced, candidate lists keep its id, which authorises nobody any more: taking it out could
    empty a list, and an empty list means "any instance of the subnet" — a deregistration never widens who may
    hold a HAVIP."""
    async with db.transaction() as tx:
        found = await _fetch_instance(tx.conn, instance_id)
        await tx.lock("subnet", found.subnet_id)
        instance = await _fetch_instance(tx.conn, instance_id)
        held = await havips_held_by(tx.conn, instance_id)
        if held and not force:
            raise Conflict(
                f"instance {instance_id} holds HAVIP(s) {_listed(held)}: deregistering it ends those bindings; "
                f"{FORCE_HINT}",
                code="INSTANCE_HOLDS_HAVIP",
            )
        havips = await tx.conn.fetch(
            "SELECT id FROM allocator.havips WHERE candidates @> ARRAY[$1::uuid] ORDER BY id LIMIT 6", instance_id
        )
        if havips and not force:
            listed = _listed([r["id"] for r in havips])
            raise Conflict(
                f"instance {instance_id} is a candidate of HAVIP(s) {listed}; remove it from their candidate "
                f"lists first, or {FORCE_HINT} (the lists keep its id, which then authorises nobody)",
                code="INSTANCE_IN_USE",
            )
        await tx.conn.execute("DELETE FROM allocator.instances WHERE id = $1", instance_id)
        tx.publish("instance.deregistered", instance.event_data())


def _listed(ids: list[uuid.UUID], shown: int = 5) -> str:
    more = " and more" if len(ids) > shown else ""
    return ", ".join(str(i) for i in ids[:shown]) + more
