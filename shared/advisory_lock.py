"""Work that one process at a time does however many replicas run: a Postgres session-level advisory lock taken
with pg_try_advisory_lock on a pool connection for the length of one pass. A replica that finds the lock taken
skips the pass rather than waiting for it: the holder is doing the same work.

The lock goes with the connection: it is released at the end of the pass, the pool's reset on release runs
pg_advisory_unlock_all() should that release not happen, and a session that dies takes its locks with it — so a
replica frozen or cut off in the middle of a pass keeps the others out only until Postgres sees its session end.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg

from shared.db import ConnectionPool, Queries


def advisory_lock_key(name: str) -> int:
    """The key of the advisory lock called `name`: the same in every process (unlike Python's hash), signed
    64-bit as pg_try_advisory_lock(bigint) takes it."""
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


@contextlib.asynccontextmanager
async def holding_advisory_lock(pool: ConnectionPool, name: str) -> AsyncIterator[Queries | None]:
    """A pool connection that holds the advisory lock `name` until the block ends; None (and no wait) when
    another session holds it."""
    key = advisory_lock_key(name)
    async with pool.acquire() as conn:
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", key):
            yield None
            return
        try:
            yield conn
        finally:
            # A connection that broke meanwhile has lost the lock with its session.
            with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                await conn.execute("SELECT pg_advisory_unlock($1)", key)


def one_at_a_time(
    pool: ConnectionPool, name: str, work: Callable[[], Awaitable[object]]
) -> Callable[[], Awaitable[bool]]:
    """`work` as a pass that runs only while this process holds the advisory lock `name`: the pass returns
    True if it ran, False if another process was running it."""

    async def run_pass() -> bool:
        async with holding_advisory_lock(pool, name) as held:
            if held is None:
                return False
            await work()
            return True

    return run_pass
