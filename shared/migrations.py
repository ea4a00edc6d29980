"""Plain-SQL migrations: numbered files applied once each, in order, under an advisory lock.

Each service owns one Postgres schema, one database role and one directory of files named
`NNNN_description.sql`. The role owns the schema and everything in it, and has no rights anywhere else: a
service connects as (or assumes) its role, so it can read and write its own tables and nobody else's. The
runner creates the role when it is missing (NOLOGIN: a deployment that wants the service to log in as it sets a
password itself), makes it the owner of the schema and of anything in it that another user created (by hand, or
with a runner that did not switch roles), and runs every migration as that role. It needs a user that may do so:
a superuser (the development set-up), or the role itself once a DBA created it with the right to create schemas
in the database.

An applied file's checksum is kept; editing a file after it was applied is refused rather than silently ignored.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from shared.db import Connection

_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class MigrationError(RuntimeError):
    pass


def service_role(schema: str) -> str:
    """The database role a service's schema belongs to unless configured otherwise (HAVIP_DATABASE_ROLE)."""
    return f"havip_{schema}"


def check_identifier(kind: str, name: str) -> str:
    """Schema and role names go into SQL text: lower-case letters, digits and underscores only."""
    if not _IDENTIFIER.match(name):
        raise MigrationError(f"invalid {kind} name {name!r}: lower-case letters, digits and underscores only")
    return name


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(directory: Path) -> list[Migration]:
    migrations: list[Migration] = []
    for path in sorted(directory.glob("*.sql")):
        match = _NAME.match(path.name)
        if match is None:
            raise MigrationError(f"{path}: migration files are named NNNN_description.sql")
        migrations.append(Migration(int(match.group(1)), path.name, path.read_text()))
    versions = [m.version for m in migrations]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"{directory}: two migrations share a number")
    return migrations


async def ensure_role(conn: Connection, role: str) -> None:
    """Create the role if it is missing (without login) and let the connected user act as it."""
    if not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role):
        # Created meanwhile by another runner? Roles are shared by every database of the cluster.
        with contextlib.suppress(asyncpg.DuplicateObjectError, asyncpg.UniqueViolationError):
            await conn.execute(f"CREATE ROLE {role} NOLOGIN")
    can_act_as = await conn.fetchval(
        "SELECT rolsuper OR pg_has_role(current_user, $1, 'MEMBER') FROM pg_roles WHERE rolname = current_user",
        role,
    )
    if not can_act_as:
        await conn.execute(f"GRANT {role} TO current_user")


async def _hand_over(conn: Connection, schema: str, role: str) -> None:
    """Make `role` the owner of the schema and of every table, view and sequence in it (objects created by another
    user, by hand or by a runner that did not switch roles, belong to whoever created them). A sequence owned by a
    table follows its table."""
    await conn.execute(f"ALTER SCHEMA {schema} OWNER TO {role}")
    await conn.execute(f"REVOKE ALL ON SCHEMA {schema} FROM PUBLIC")
    kinds = {"r": "TABLE", "p": "TABLE", "v": "VIEW", "m": "MATERIALIZED VIEW", "S": "SEQUENCE"}
    for relkinds in (["r", "p", "v", "m"], ["S"]):
        rows = await conn.fetch(
            """SELECT c.relname, c.relkind::text AS relkind FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE n.nspname = $1 AND c.relkind::text = ANY($2::text[]) AND pg_get_userbyid(c.relowner) <> $3""",
            schema,
            relkinds,
            role,
        )
        for row in rows:
            await conn.execute(f'ALTER {kinds[row["relkind"]]} {schema}."{row["relname"]}" OWNER TO {role}')


async def apply_migrations(dsn: str, schema: str, directory: Path, role: str | None = None) -> list[str]:
    """Apply the pending migrations of `directory` to `schema`, owned by `role` (default: `havip_<schema>`);
    returns the names applied now."""
    check_identifier("schema", schema)
    role = check_identifier("role", role or service_role(schema))
    migrations = load_migrations(directory)
    conn = await asyncpg.connect(dsn)
    applied_now: list[str] = []
    try:
        # A session lock: concurrent runners (several replicas starting) wait for each other.
        await conn.execute("SELECT pg_advisory_lock(hashtext($1))", f"havip.migrations.{schema}")
        await ensure_role(conn, role)
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema} AUTHORIZATION {role}")
        await _hand_over(conn, schema, role)
        async with conn.transaction():
            await conn.execute(f"SET LOCAL ROLE {role}")
            await conn.execute(
                f"""CREATE TABLE IF NOT EXISTS {schema}.schema_migrations (
                        version integer PRIMARY KEY,
                        name text NOT NULL,
                        checksum text NOT NULL,
                        applied_at timestamptz NOT NULL DEFAULT now())"""
            )
        done = {
            row["version"]: row
            for row in await conn.fetch(f"SELECT version, name, checksum FROM {schema}.schema_migrations")
        }
        for migration in migrations:
            previous = done.get(migration.version)
            if previous is not None:
                if previous["checksum"] != migration.checksum:
                    raise MigrationError(
                        f"{schema}: {migration.name} was changed after it was applied; add a new migration"
                    )
                continue
            async with conn.transaction():
                # As the service's role: what the migration creates is the role's, and it reaches nothing else.
                await conn.execute(f"SET LOCAL ROLE {role}")
                await conn.execute(f"SET LOCAL search_path TO {schema}, public")
                await conn.execute(migration.sql)
                await conn.execute(
                    f"INSERT INTO {schema}.schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
            applied_now.append(migration.name)
    finally:
        await conn.close()
    return applied_now
