"""Free addresses kept by Postgres as ranges (allocator.free_ranges) and HAVIPs counted per VPC
(allocator.subnet_havip_counts), both by migration 0005, on the real database.

* through the API: allocation with holes (released HAVIPs, deregistered instances) returns the lowest free
  address, and a requested address inside a hole splits it;
* a property test: hypothesis draws allocations (lowest, at an address, many in one INSERT), registrations
  and releases (one or many per statement) on a small subnet; after every step the table equals the ranges
  computed by brute force from the rows, the production query finds the lowest free address, the VPC's
  count equals its rows, and a full rebuild (what the migration's back-fill runs) gives the same table;
* the database itself refuses an address taken twice, even by a writer that bypasses the subnet lock, and an
  address changed in place;
* the migration's back-fill on a database that already holds HAVIPs and instances.
"""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.allocator.errors import AddressInUse, AddressNotInSubnet, AddressReserved, SubnetFull
from services.allocator.subnets.schemas import SubnetRef
from services.allocator.subnets.service import choose_address
from shared.db import Connection, drop_database, ensure_database
from shared.migrations import apply_migrations
from tests.conftest import PG_BASE, RUN_ID
from tests.integration.allocator_support import error, make_havip, make_instance, make_subnet, make_vpc, ok
from tests.sandbox import MIGRATIONS
from tests.waiting import eventually

Range = tuple[int, int]
MIGRATION = "0005_free_ranges_and_counts.sql"


# ---- the reference: free ranges by brute force ---------------------------------------------------------------


def expected_ranges(net: IPv4Network, taken: Iterable[int]) -> list[Range]:
    """The maximal runs of usable addresses of `net` (network, gateway, broadcast excluded) not in `taken`."""
    used = set(taken)
    runs: list[Range] = []
    for a in range(int(net.network_address) + 2, int(net.broadcast_address)):
        if a in used:
            continue
        if runs and runs[-1][1] == a - 1:
            runs[-1] = (runs[-1][0], a)
        else:
            runs.append((a, a))
    return runs


def test_expected_ranges_reference() -> None:
    net = IPv4Network("192.0.2.0/29")  # usable .2 … .6
    base = int(net.network_address)
    assert expected_ranges(net, []) == [(base + 2, base + 6)]
    assert expected_ranges(net, [base + 3, base + 4]) == [(base + 2, base + 2), (base + 5, base + 6)]
    assert expected_ranges(net, range(base, base + 8)) == []


async def stored_ranges(conn: Connection, subnet_id: uuid.UUID) -> list[Range]:
    rows = await conn.fetch("SELECT lo, hi FROM allocator.free_ranges WHERE subnet_id = $1 ORDER BY lo", subnet_id)
    return [(r["lo"], r["hi"]) for r in rows]


async def taken_addresses(conn: Connection, subnet_id: uuid.UUID) -> set[int]:
    rows = await conn.fetch(
        """SELECT address - '0.0.0.0'::inet AS a FROM allocator.havips WHERE subnet_id = $1
           UNION ALL SELECT private_ip - '0.0.0.0'::inet FROM allocator.instances WHERE subnet_id = $1""",
        subnet_id,
    )
    return {r["a"] for r in rows}


async def counted_havips(conn: Connection, vpc_id: uuid.UUID) -> int:
    """The VPC's HAVIP count as the quota check reads it (no subnet: no row)."""
    count = await conn.fetchval("SELECT sum(havips) FROM allocator.subnet_havip_counts WHERE vpc_id = $1", vpc_id)
    return int(count or 0)


# ---- through the API -----------------------------------------------------------------------------------------


async def test_allocation_with_holes_returns_the_lowest_free_address(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    vpc = await make_vpc(client, "10.90.0.0/16")
    subnet = await make_subnet(client, vpc["id"], "10.90.1.0/24")
    sid = subnet["id"]
    havips = {(h := await make_havip(client, sid))["address"]: h for _ in range(12)}
    assert list(havips) == [f"10.90.1.{i}" for i in range(2, 14)]

    # holes: released HAVIPs at .4, .9, .10 and the highest, .13; an instance takes .9 again
    for address in ("10.90.1.4", "10.90.1.9", "10.90.1.10", "10.90.1.13"):
        assert (await client.delete(f"/v1/havips/{havips[address]['id']}")).status_code == 204
    instance = await make_instance(client, sid, "10.90.1.9")
    assert ok(await client.get(f"/v1/subnets/{sid}"))["free_addresses"] == 253 - 12 + 4 - 1

    assert (await make_havip(client, sid))["address"] == "10.90.1.4"
    assert (await make_havip(client, sid, address="10.90.1.200"))["address"] == "10.90.1.200"  # splits the tail
    assert (await make_havip(client, sid))["address"] == "10.90.1.10"
    # the instance leaves: its address is free again, and the lowest
    assert (await client.delete(f"/v1/instances/{instance['id']}")).status_code == 204
    assert (await make_havip(client, sid))["address"] == "10.90.1.9"
    assert (await make_havip(client, sid))["address"] == "10.90.1.13"
    assert (await make_havip(client, sid))["address"] == "10.90.1.14"
    error(
        await client.post("/v1/havips", json={"subnet_id": sid, "address": "10.90.1.200"}), 409, "ADDRESS_IN_USE"
    )

    net = IPv4Network(subnet["cidr"])
    subnet_id = uuid.UUID(sid)
    assert await stored_ranges(db, subnet_id) == expected_ranges(net, await taken_addresses(db, subnet_id))
    assert await stored_ranges(db, subnet_id) == [
        (int(IPv4Address("10.90.1.15")), int(IPv4Address("10.90.1.199"))),
        (int(IPv4Address("10.90.1.201")), int(IPv4Address("10.90.1.254"))),
    ]


async def test_a_subnet_comes_and_goes_with_its_free_range(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    vpc = await make_vpc(client, "10.91.0.0/16")
    subnet = await make_subnet(client, vpc["id"], "10.91.0.0/16")
    subnet_id = uuid.UUID(subnet["id"])
    assert await stored_ranges(db, subnet_id) == [
        (int(IPv4Address("10.91.0.2")), int(IPv4Address("10.91.255.254")))
    ]
    assert (await client.delete(f"/v1/subnets/{subnet['id']}")).status_code == 204
    assert await stored_ranges(db, subnet_id) == []


# ---- the property ----------------------------------------------------------------------------------------------

SMALL = 27  # 32 addresses, 29 usable: holes, full subnets and merges all happen within a few steps
OFFSETS = st.integers(0, 31)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("lowest"), st.integers(1, 4)),  # n allocations of the lowest free, one at a time
        st.tuples(st.just("at"), OFFSETS),  # a HAVIP at an address (refused unless usable and free)
        st.tuples(st.just("bulk"), st.sets(OFFSETS, max_size=12)),  # the free ones of these, in one INSERT
        st.tuples(st.just("instance"), OFFSETS),  # an instance at an address, by plain SQL (no app check)
        st.tuples(st.just("release"), st.sets(OFFSETS, max_size=12)),  # HAVIPs and instances, one DELETE each
    ),
    min_size=1,
    max_size=16,
)


async def new_subnet(conn: Connection, net: IPv4Network) -> SubnetRef:
    vpc_id, subnet_id = uuid.uuid4(), uuid.uuid4()
    await conn.execute("INSERT INTO allocator.vpcs (id, name, cidr) VALUES ($1, 'p', $2)", vpc_id, net)
    await conn.execute(
        "INSERT INTO allocator.subnets (id, vpc_id, name, cidr) VALUES ($1, $2, 'p', $3)", subnet_id, vpc_id, net
    )
    return SubnetRef(id=subnet_id, vpc_id=vpc_id, cidr=net)


async def insert_havips(conn: Connection, subnet: SubnetRef, addresses: list[IPv4Address]) -> None:
    await conn.execute(
        """INSERT INTO allocator.havips (id, vpc_id, subnet_id, address)
           SELECT gen_random_uuid(), $1, $2, a FROM unnest($3::inet[]) AS a""",
        subnet.vpc_id,
        subnet.id,
        addresses,
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(story=operations, block=st.integers(0, 2**17 // 32 - 1))
async def test_free_ranges_always_equal_the_complement_of_the_rows(
    pool: asyncpg.Pool, story: list[tuple[str, Any]], block: int
) -> None:
    net = IPv4Network((int(IPv4Address("198.18.0.0")) + block * 32, SMALL))  # somewhere in 198.18.0.0/15
    base = int(net.network_address)
    async with pool.acquire() as conn:
        subnet = await new_subnet(conn, net)
        for what, arg in story:
            taken = await taken_addresses(conn, subnet.id)
            free = [a for r in expected_ranges(net, taken) for a in range(r[0], r[1] + 1)]
            if what == "lowest":
                for _ in range(arg):
                    async with conn.transaction():
                        if not free:
                            with pytest.raises(SubnetFull):
                                await choose_address(conn, subnet, None)
                            break
                        address = await choose_address(conn, subnet, None)
                        assert int(address) == free.pop(0)
                        await insert_havips(conn, subnet, [address])
            elif what == "at":
                wanted = IPv4Address(base + arg)
                async with conn.transaction():
                    if base + arg in free:
                        assert await choose_address(conn, subnet, wanted) == wanted
                        await insert_havips(conn, subnet, [wanted])
                    else:
                        with pytest.raises((AddressInUse, AddressReserved, AddressNotInSubnet)):
                            await choose_address(conn, subnet, wanted)
            elif what == "bulk":
                await insert_havips(conn, subnet, [IPv4Address(base + o) for o in sorted(arg) if base + o in free])
            elif what == "instance":
                insert = conn.execute(
                    """INSERT INTO allocator.instances (id, vpc_id, subnet_id, name, private_ip, mac)
                       VALUES ($1, $2, $3, 'i', $4, $5)""",
                    uuid.uuid4(),
                    subnet.vpc_id,
                    subnet.id,
                    IPv4Address(base + arg),
                    ":".join(f"{b:02x}" for b in (2, *uuid.uuid4().bytes[:5])),
                )
                if base + arg in free:
                    await insert
                else:  # taken or reserved: refused by the table's unique key or the trigger (the app checks first)
                    with pytest.raises(asyncpg.UniqueViolationError):
                        await insert
            else:
                addresses = [IPv4Address(base + o) for o in arg]
                for table, column in (("havips", "address"), ("instances", "private_ip")):
                    await conn.execute(
                        f"DELETE FROM allocator.{table} WHERE subnet_id = $1 AND {column} = ANY($2::inet[])",
                        subnet.id,
                        addresses,
                    )

            assert await stored_ranges(conn, subnet.id) == expected_ranges(
                net, await taken_addresses(conn, subnet.id)
            ), (what, arg)
            assert await counted_havips(conn, subnet.vpc_id) == await conn.fetchval(
                "SELECT count(*) FROM allocator.havips WHERE vpc_id = $1", subnet.vpc_id
            )

        incremental = await stored_ranges(conn, subnet.id)
        async with conn.transaction():
            await conn.execute("SELECT allocator.rebuild_free_ranges()")
            assert await stored_ranges(conn, subnet.id) == incremental


# ---- the database's own guard ------------------------------------------------------------------------------


async def test_an_address_cannot_be_taken_twice_even_bypassing_the_lock(pool: asyncpg.Pool) -> None:
    """A HAVIP and an instance at one address, in two transactions that skip the subnet's advisory lock: the
    second waits on the free range the first consumed, then is refused. The unique constraints alone could
    not catch this (they are per table)."""
    net = IPv4Network("198.19.255.0/24")
    first = pool.acquire()
    second = pool.acquire()
    async with first as a, second as b:
        subnet = await new_subnet(a, net)
        address = IPv4Address("198.19.255.2")
        async with a.transaction():
            await insert_havips(a, subnet, [address])

            async def register() -> None:
                await b.execute(
                    """INSERT INTO allocator.instances (id, vpc_id, subnet_id, name, private_ip, mac)
                       VALUES ($1, $2, $3, 'i', $4, '02:00:5e:00:53:01')""",
                    uuid.uuid4(),
                    subnet.vpc_id,
                    subnet.id,
                    address,
                )

            racing = asyncio.create_task(register())
            blocked_pid = b.get_server_pid()

            async def waits_on_a_lock() -> bool:
                state = await a.fetchval(
                    "SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1", blocked_pid
                )
                return bool(state == "Lock")

            await eventually(waits_on_a_lock, what="the instance's INSERT waits on the HAVIP's free range")
        with pytest.raises(asyncpg.UniqueViolationError, match=r"198\.19\.255\.2 .* is not free"):
            await racing
        assert await stored_ranges(a, subnet.id) == expected_ranges(net, await taken_addresses(a, subnet.id))


async def test_an_address_cannot_change_in_place(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        subnet = await new_subnet(conn, IPv4Network("198.19.254.0/24"))
        await insert_havips(conn, subnet, [IPv4Address("198.19.254.7")])
        with pytest.raises(asyncpg.CheckViolationError, match="release it and allocate again"):
            await conn.execute(
                "UPDATE allocator.havips SET address = '198.19.254.8' WHERE subnet_id = $1", subnet.id
            )
        # other columns change freely
        await conn.execute("UPDATE allocator.havips SET name = 'renamed' WHERE subnet_id = $1", subnet.id)


# ---- the migration's back-fill ------------------------------------------------------------------------------


async def test_the_migration_fills_the_ranges_of_existing_subnets(tmp_path: Path) -> None:
    before = tmp_path / "before"
    before.mkdir()
    for path in sorted(MIGRATIONS["allocator"].glob("*.sql")):
        if path.name < MIGRATION:
            shutil.copy(path, before / path.name)
    dsn = f"{PG_BASE}/havip_test_{RUN_ID}_{uuid.uuid4().hex[:6]}"
    await ensure_database(dsn)
    try:
        await apply_migrations(dsn, "allocator", before)
        conn = await asyncpg.connect(dsn)
        try:
            net = IPv4Network("10.7.0.0/24")
            subnet = await new_subnet(conn, net)
            empty = await new_subnet(conn, IPv4Network("10.8.0.0/29"))
            await insert_havips(conn, subnet, [IPv4Address("10.7.0.2"), IPv4Address("10.7.0.5")])
            await conn.execute(
                """INSERT INTO allocator.instances (id, vpc_id, subnet_id, name, private_ip, mac)
                   VALUES ($1, $2, $3, 'i', '10.7.0.254', '02:00:5e:00:53:02')""",
                uuid.uuid4(),
                subnet.vpc_id,
                subnet.id,
            )
            applied = await apply_migrations(dsn, "allocator", MIGRATIONS["allocator"])
            assert applied[0] == MIGRATION
            base = int(net.network_address)
            assert await stored_ranges(conn, subnet.id) == [(base + 3, base + 4), (base + 6, base + 253)]
            assert await stored_ranges(conn, empty.id) == [
                (int(IPv4Address("10.8.0.2")), int(IPv4Address("10.8.0.6")))
            ]
            assert await choose_address(conn, subnet, None) == IPv4Address("10.7.0.3")
            assert await counted_havips(conn, subnet.vpc_id) == 2
            assert await counted_havips(conn, empty.vpc_id) == 0
        finally:
            await conn.close()
    finally:
        await drop_database(dsn)
