"""asyncpg connection pool, database creation, and which database errors are the environment's rather than
the message's."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import asyncpg

from shared.messaging import is_transient

log = logging.getLogger(__name__)


async def create_pool(
    dsn: str, *, role: str | None = None, min_size: int = 2, max_size: int = 10, attempts: int = 30
) -> Any:
    """A pool, retrying while Postgres is not up yet (start-up order is not guaranteed).

    With `role`, every connection acts as that role from its start (the `role` setting, as `SET ROLE`): a
    service then has the rights of its own schema's role only, whichever user the URL names — the same user
    for every service in a development set-up, or the role itself where it may log in.
    """
    server_settings = {"role": role} if role else None
    for attempt in range(1, attempts + 1):
        try:
            return await asyncpg.create_pool(
                dsn, min_size=min_size, max_size=max_size, server_settings=server_settings
            )
        except (OSError, asyncpg.CannotConnectNowError, asyncpg.ConnectionDoesNotExistError) as exc:
            if attempt == attempts:
                raise
            log.warning("postgres not reachable (%s), retrying", exc)
            await asyncio.sleep(1.0)
    raise AssertionError("unreachable")


def database_or_network_away(exc: BaseException) -> bool:
    """Failures a consumer retries for as long as they last (SPEC R1/R2); anything else is the message's
    fault after a few tries."""
    return is_transient(exc) or isinstance(
        exc,
        asyncpg.PostgresConnectionError
        | asyncpg.InterfaceError
        | asyncpg.CannotConnectNowError
        | asyncpg.TooManyConnectionsError
        | asyncpg.AdminShutdownError,
    )


def _split(dsn: str) -> tuple[str, str]:
    """('postgresql://host/maintenance-db', 'dbname') for a DSN whose path names the database."""
    base, _, name = dsn.rpartition("/")
    name = name.split("?", 1)[0]
    if not name or not name.replace("_", "").isalnum():
        raise ValueError(f"database name in {dsn!r} must be letters, digits and underscores")
    return f"{base}/postgres", name


async def ensure_database(dsn: str) -> bool:
    """Create the database the DSN names if it does not exist; True if it was created."""
    admin_dsn, name = _split(dsn)
    conn = await asyncpg.connect(admin_dsn)
    try:
        if await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            return False
        await conn.execute(f'CREATE DATABASE "{name}"')
        return True
    finally:
        await conn.close()


async def drop_database(dsn: str) -> None:
    admin_dsn, name = _split(dsn)
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()
