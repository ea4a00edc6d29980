"""Access to Postgres for the allocator: a pool, transactions that carry their events, advisory locks.

A `Transaction` is a unit of work (shared/unit_of_work.py): the events of a change are written to the outbox
inside the same transaction, at the latest just before it commits, and the relay is woken once it has committed.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Literal

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from shared.events import EventData, envelope
from shared.outbox import OutboxRelay
from shared.unit_of_work import UnitOfWork, unit_of_work

SCHEMA = "allocator"
SOURCE = "allocator"

LockScope = Literal["vpc", "subnet", "eip_pool"]
EIP_POOL = "pool"  # the key of the one EIP pool lock


class Transaction:
    def __init__(self, work: UnitOfWork[PoolConnectionProxy]) -> None:
        self._work = work
        self.conn = work.conn

    def publish(self, event_type: str, data: EventData) -> None:
        """Queue an event; it is written to the outbox when the transaction commits."""
        self._work.publish([envelope(event_type, data, SOURCE)])

    async def flush_events(self) -> None:
        """Write the queued events to the outbox now (still inside the transaction), e.g. before a lock."""
        await self._work.flush()

    async def lock(self, scope: LockScope, key: uuid.UUID | str) -> None:
        """Serialise with every other transaction that locks the same VPC, subnet or the EIP pool, until commit.

        Lock order, to rule out deadlocks: a subnet, then the EIP pool or the subnet's VPC. A VPC lock is always
        the last lock a transaction takes, and only one subnet is locked at a time.
        """
        await self.conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"{SCHEMA}.{scope}.{key}")


class Database:
    def __init__(self, pool: asyncpg.Pool, relay: OutboxRelay | None = None) -> None:
        self.pool = pool
        self.relay = relay

    def connection(self) -> AbstractAsyncContextManager[PoolConnectionProxy]:
        """A connection for reads (each statement its own snapshot)."""
        return self.pool.acquire()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        wake = self.relay.wake if self.relay is not None else None
        async with self.pool.acquire() as conn, unit_of_work(conn, SCHEMA, wake) as work:
            yield Transaction(work)
