"""Each service acts as its own database role, which owns its schema and has no right on another's: no service
can read another's tables, whatever user its URL names (tests/unit/test_schema_isolation.py checks the SQL)."""

from __future__ import annotations

import asyncpg
import pytest
from fastapi import FastAPI

from shared.db import create_pool
from shared.migrations import service_role

OWN_TABLES = {"allocator": "allocator.havips", "binding": "binding.bindings"}


@pytest.mark.parametrize(("service", "other"), [("allocator", "binding"), ("binding", "allocator")])
async def test_a_services_role_reaches_its_own_schema_and_nothing_else(
    database_url: str, service: str, other: str
) -> None:
    pool = await create_pool(database_url, role=service_role(service), min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT current_user") == f"havip_{service}"
            assert await conn.fetchval(f"SELECT count(*) FROM {OWN_TABLES[service]}") >= 0
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.fetchval(f"SELECT count(*) FROM {OWN_TABLES[other]}")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(f"CREATE TABLE {other}.intruder (x int)")
    finally:
        await pool.close()


async def test_each_schema_belongs_to_its_service_and_grants_nothing_to_anyone_else(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        for schema in ("allocator", "binding"):
            owner = await conn.fetchval(
                "SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = $1", schema
            )
            assert owner == service_role(schema)
            owners = {
                r[0] for r in await conn.fetch("SELECT tableowner FROM pg_tables WHERE schemaname = $1", schema)
            }
            assert owners == {service_role(schema)}
            granted = await conn.fetch(
                """SELECT grantee, table_name FROM information_schema.role_table_grants
                   WHERE table_schema = $1 AND grantee <> $2""",
                schema,
                service_role(schema),
            )
            assert granted == []
    finally:
        await conn.close()


async def test_the_running_allocator_acts_as_its_role(app: FastAPI) -> None:
    async with app.state.db.connection() as conn:
        assert await conn.fetchval("SELECT current_user") == "havip_allocator"
