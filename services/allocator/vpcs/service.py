"""VPCs: create, list, show, delete (refused while the VPC has subnets)."""

from __future__ import annotations

import uuid

from services.allocator.database import Database
from services.allocator.errors import Conflict, NotFound
from services.allocator.pagination import Where, next_token
from services.allocator.schemas import Page
from services.allocator.vpcs.schemas import Vpc, VpcCreate
from shared.db import Connection, fetch_one

_COLUMNS = "id, name, cidr, created_at"


async def fetch_vpc(conn: Connection, vpc_id: uuid.UUID) -> Vpc:
    row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM allocator.vpcs WHERE id = $1", vpc_id)
    if row is None:
        raise NotFound.of("vpc", vpc_id)
    return Vpc.from_row(row)


async def create_vpc(db: Database, request: VpcCreate) -> Vpc:
    async with db.transaction() as tx:
        row = await fetch_one(
            tx.conn,
            f"INSERT INTO allocator.vpcs (id, name, cidr) VALUES ($1, $2, $3) RETURNING {_COLUMNS}",
            uuid.uuid4(),
            request.name,
            request.cidr,
        )
        vpc = Vpc.from_row(row)
        tx.publish("vpc.created", vpc.event_data())
    return vpc


async def get_vpc(db: Database, vpc_id: uuid.UUID) -> Vpc:
    async with db.connection() as conn:
        return await fetch_vpc(conn, vpc_id)


async def list_vpcs(db: Database, *, limit: int, page_token: str | None) -> Page[Vpc]:
    where = Where()
    where.after("created_at", "id", page_token)
    sql = (
        f"SELECT {_COLUMNS} FROM allocator.vpcs {where.sql} ORDER BY created_at, id LIMIT {where.param(limit + 1)}"
    )
    async with db.connection() as conn:
        rows = await conn.fetch(sql, *where.params)
    rows, token = next_token(rows, limit)
    return Page[Vpc](items=[Vpc.from_row(r) for r in rows], next_page_token=token)


async def delete_vpc(db: Database, vpc_id: uuid.UUID) -> None:
    async with db.transaction() as tx:
        # Subnet creation holds the same lock: no subnet can appear between the check and the delete.
        await tx.lock("vpc", vpc_id)
        vpc = await fetch_vpc(tx.conn, vpc_id)
        subnets = await tx.conn.fetchval("SELECT count(*) FROM allocator.subnets WHERE vpc_id = $1", vpc_id)
        if subnets:
            raise Conflict(f"vpc {vpc_id} still has {subnets} subnet(s); delete them first", code="VPC_IN_USE")
        await tx.conn.execute("DELETE FROM allocator.vpcs WHERE id = $1", vpc_id)
        tx.publish("vpc.deleted", vpc.event_data())
