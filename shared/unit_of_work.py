"""One unit of work: a service's rows and the events describing them written in one transaction (the
transactional outbox, shared/outbox.py), and the outbox relay woken once that transaction has committed — so
the events leave at once rather than at the relay's next poll."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Generic, TypeVar

from shared.db import Queries
from shared.events import Envelope
from shared.outbox import add_to_outbox

# The caller's own connection type, kept: an asyncpg connection stays one for the caller's queries.
ConnectionT = TypeVar("ConnectionT", bound=Queries)


class UnitOfWork(Generic[ConnectionT]):
    """The caller's writes on `conn`, inside the transaction; events queued with `publish` are written to the
    outbox by `flush`, at the latest just before the commit."""

    def __init__(self, conn: ConnectionT, schema: str) -> None:
        self.conn = conn
        self._schema = schema
        self._queued: list[Envelope] = []
        self.events_written = 0

    def publish(self, envs: Sequence[Envelope]) -> None:
        self._queued.extend(envs)

    async def flush(self) -> None:
        """The queued events into the outbox now, in order (still inside the transaction)."""
        queued, self._queued = self._queued, []
        await add_to_outbox(self.conn, self._schema, queued)
        self.events_written += len(queued)

    def wrote_events(self, count: int) -> None:
        """A statement of the caller's wrote `count` outbox rows itself (one that stamps them as it writes)."""
        self.events_written += count


@asynccontextmanager
async def unit_of_work(
    conn: ConnectionT, schema: str, wake: Callable[[], None] | None = None
) -> AsyncIterator[UnitOfWork[ConnectionT]]:
    """A transaction on `conn`; `wake` (the relay's) is called after it committed, if it wrote any event."""
    async with conn.transaction():
        work = UnitOfWork(conn, schema)
        yield work
        await work.flush()
    if work.events_written and wake is not None:
        wake()
