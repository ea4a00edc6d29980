"""Subnets: create (inside the VPC, no overlap), list, show with free-address count, delete (not in use).

Also the subnet helpers that instance registration and HAVIP allocation share: the subnet's identity, and
whether an address is free or which is the lowest free one.
"""

from __future__ import annotations

import uuid
from ipaddress import IPv4Address

from services.allocator.database import Database
from services.allocator.domain import addressing
from services.allocator.errors import AddressInUse, Conflict, NotFound, SubnetFull
from services.allocator.pagination import Where, next_token
from services.allocator.schemas import Page
from services.allocator.subnets.schemas import Subnet, SubnetCreate, SubnetRef
from services.allocator.vpcs.service import fetch_vpc
from shared.db import Connection, fetch_one

_SELECT = """
    SELECT s.id, s.vpc_id, s.name, s.cidr, s.segment, s.vlan, s.created_at,
           (SELECT count(*) FROM allocator.instances i WHERE i.subnet_id = s.id)
           + (SELECT count(*) FROM allocator.havips h WHERE h.subnet_id = s.id) AS used
    FROM allocator.subnets s"""


async def fetch_subnet_ref(conn: Connection, subnet_id: uuid.UUID) -> SubnetRef:
    row = await conn.fetchrow("SELECT id, vpc_id, cidr FROM allocator.subnets WHERE id = $1", subnet_id)
    if row is None:
        raise NotFound.of("subnet", subnet_id)
    return SubnetRef(id=row["id"], vpc_id=row["vpc_id"], cidr=row["cidr"])


# Free addresses are kept as ranges of integers (address - 0.0.0.0) in allocator.free_ranges, in step with
# havips and instances through triggers (migration 0005); the primary key (subnet_id, hi) orders the ranges.
_LOWEST_FREE = "SELECT lo FROM allocator.free_ranges WHERE subnet_id = $1 ORDER BY hi LIMIT 1"
_IS_FREE = """SELECT lo <= $2 FROM allocator.free_ranges WHERE subnet_id = $1 AND hi >= $2
              ORDER BY hi LIMIT 1"""


async def check_address_free(conn: Connection, subnet: SubnetRef, address: IPv4Address) -> None:
    """A requested address must be usable in the subnet and held by no instance or HAVIP (call with the
    subnet locked). One index probe, whatever the subnet's fill."""
    addressing.check_requested_address(subnet.cidr, address)
    if not await conn.fetchval(_IS_FREE, subnet.id, int(address)):
        raise AddressInUse(f"{address} is already in use in {subnet.cidr}")


async def choose_address(conn: Connection, subnet: SubnetRef, requested: IPv4Address | None) -> IPv4Address:
    """The requested address after checking it, or the lowest free one (call with the subnet locked)."""
    if requested is not None:
        await check_address_free(conn, subnet, requested)
        return requested
    lowest = await conn.fetchval(_LOWEST_FREE, subnet.id)
    if lowest is None:
        raise SubnetFull(f"no free address left in {subnet.cidr}")
    return IPv4Address(lowest)


async def _fetch_subnet(conn: Connection, subnet_id: uuid.UUID) -> Subnet:
    row = await conn.fetchrow(f"{_SELECT} WHERE s.id = $1", subnet_id)
    if row is None:
        raise NotFound.of("subnet", subnet_id)
    return Subnet.from_row(row, row["used"])


async def create_subnet(db: Database, request: SubnetCreate) -> Subnet:
    async with db.transaction() as tx:
        # The VPC lock serialises subnet creation (overlap check) with itself and with VPC deletion.
        await tx.lock("vpc", request.vpc_id)
        vpc = await fetch_vpc(tx.conn, request.vpc_id)
        addressing.check_subnet_in_vpc(vpc.cidr, request.cidr)
        siblings = await tx.conn.fetch(
            "SELECT id, cidr FROM allocator.subnets WHERE vpc_id = $1 ORDER BY cidr", vpc.id
        )
        addressing.check_no_overlap(request.cidr, [(r["id"], r["cidr"]) for r in siblings])
        row = await fetch_one(
            tx.conn,
            """INSERT INTO allocator.subnets (id, vpc_id, name, cidr, segment, vlan)
               VALUES ($1, $2, $3, $4, $5, $6)
               RETURNING id, vpc_id, name, cidr, segment, vlan, created_at""",
            uuid.uuid4(),
            vpc.id,
            request.name,
            request.cidr,
            request.segment,
            request.vlan,
        )
        subnet = Subnet.from_row(row, used=0)
        tx.publish("subnet.created", subnet.event_data())
    return subnet


async def get_subnet(db: Database, subnet_id: uuid.UUID) -> Subnet:
    async with db.connection() as conn:
        return await _fetch_subnet(conn, subnet_id)


async def list_subnets(
    db: Database, *, vpc_id: uuid.UUID | None, limit: int, page_token: str | None
) -> Page[Subnet]:
    where = Where()
    if vpc_id is not None:
        where.add("s.vpc_id = {}", vpc_id)
    where.after("s.created_at", "s.id", page_token)
    sql = f"{_SELECT} {where.sql} ORDER BY s.created_at, s.id LIMIT {where.param(limit + 1)}"
    async with db.connection() as conn:
        rows = await conn.fetch(sql, *where.params)
    rows, token = next_token(rows, limit)
    return Page[Subnet](items=[Subnet.from_row(r, r["used"]) for r in rows], next_page_token=token)


async def subnet_usage(db: Database) -> list[tuple[uuid.UUID, int, int]]:
    """(subnet_id, usable, free) of every subnet, for the metrics."""
    async with db.connection() as conn:
        rows = await conn.fetch(
            """SELECT s.id, s.cidr, coalesce(i.n, 0) + coalesce(h.n, 0) AS used
               FROM allocator.subnets s
               LEFT JOIN (SELECT subnet_id, count(*) AS n FROM allocator.instances GROUP BY subnet_id) i
                      ON i.subnet_id = s.id
               LEFT JOIN (SELECT subnet_id, count(*) AS n FROM allocator.havips GROUP BY subnet_id) h
                      ON h.subnet_id = s.id"""
        )
    usage = []
    for row in rows:
        usable = addressing.usable_count(row["cidr"])
        usage.append((row["id"], usable, max(usable - row["used"], 0)))
    return usage


async def delete_subnet(db: Database, subnet_id: uuid.UUID) -> None:
    async with db.transaction() as tx:
        # Registration and allocation hold the same lock: nothing can move in between check and delete.
        await tx.lock("subnet", subnet_id)
        subnet = await _fetch_subnet(tx.conn, subnet_id)
        counts = await fetch_one(
            tx.conn,
            """SELECT (SELECT count(*) FROM allocator.instances WHERE subnet_id = $1) AS instances,
                      (SELECT count(*) FROM allocator.havips WHERE subnet_id = $1) AS havips""",
            subnet_id,
        )
        if counts["instances"] or counts["havips"]:
            raise Conflict(
                f"subnet {subnet_id} still has {counts['instances']} instance(s) and {counts['havips']} "
                "HAVIP(s); remove them first",
                code="SUBNET_IN_USE",
            )
        await tx.conn.execute("DELETE FROM allocator.subnets WHERE id = $1", subnet_id)
        tx.publish("subnet.deleted", subnet.event_data())
