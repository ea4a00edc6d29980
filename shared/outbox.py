"""Transactional outbox: events are written in the same transaction as the change they describe, then a
relay publishes them with confirms and deletes them, with no transaction open while it waits for the broker.
A crash between commit and publish loses nothing; a crash between publish and delete repeats an event
(consumers are idempotent).

Each service's schema has a table created by its migrations:

    CREATE TABLE outbox (
        id bigserial PRIMARY KEY,
        routing_key text NOT NULL,
        body text NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now());
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime

import asyncpg
import msgspec
from prometheus_client import Counter, Gauge
from tenacity import RetryCallState, RetryError

from shared.advisory_lock import advisory_lock_key
from shared.backoff import failure_of, retrying_with_backoff
from shared.db import ConnectionPool, Queries
from shared.events import Envelope, encode
from shared.messaging import Broker, BrokerAccessRefused
from shared.tasks import cancel

log = logging.getLogger(__name__)

OUTBOX_PENDING = Gauge("havip_outbox_pending_events", "Events committed but not yet published", ["service"])
OUTBOX_PUBLISHED = Counter("havip_outbox_published_total", "Events published from the outbox", ["service"])
OUTBOX_FAILURES = Counter("havip_outbox_publish_failures_total", "Failed outbox publish attempts", ["service"])


def outbox_rows(envs: Sequence[Envelope]) -> tuple[list[str], list[str]]:
    """The outbox columns (routing keys, bodies) of `envs`, for a set-based INSERT that keeps their order."""
    return [env.type for env in envs], [encode(env).decode() for env in envs]


async def add_to_outbox(conn: Queries, schema: str, envs: Sequence[Envelope]) -> None:
    """Write events inside the caller's transaction."""
    if envs:
        # One set-based statement for the batch, ids in the order of `envs` (the order they are published in).
        await conn.execute(
            f"""INSERT INTO {schema}.outbox (routing_key, body)
                SELECT routing_key, body
                FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS e(routing_key, body, n) ORDER BY n""",
            *outbox_rows(envs),
        )


class _Head(msgspec.Struct):
    event_id: uuid.UUID
    occurred_at: datetime


_HEAD = msgspec.json.Decoder(_Head)


def _with_head(body: str) -> tuple[bytes, _Head]:
    raw = body.encode()
    return raw, _HEAD.decode(raw)


def relay_lock_key(schema: str) -> int:
    """The key of the advisory lock that lets one relay at a time publish `schema`'s outbox: the same in every
    process (unlike Python's hash), signed 64-bit as pg_try_advisory_lock(bigint) takes it."""
    return advisory_lock_key(f"havip outbox relay {schema}")


# How soon a relay that found another one publishing looks again: that pass may have read the outbox before
# this process's commit, and the next poll may be a second away.
LOCK_BUSY_RETRY_S = 0.1


class OutboxRelay:
    """Publishes a schema's outbox in id order, one relay per schema at a time however many replicas run.

    A pass takes a pool connection and, on it, the schema's session-level advisory lock (pg_try_advisory_lock),
    then reads a batch in id order, publishes the stored bytes with confirms and deletes the confirmed rows —
    each statement in a transaction of its own, so no transaction, row lock or snapshot is held while the
    broker is waited for. A relay that finds the lock taken publishes nothing and looks again shortly.

    The lock lasts one pass, not the relay's life on a dedicated connection: the pool already replaces
    connections lost when Postgres restarts, so the next pass simply takes the lock again; a pool slot is out
    only while a pass runs (as the transaction of a pass was before); and a replica whose broker is away holds
    the lock only during its attempts, not for the whole outage. The lock goes with the connection: the pool's
    reset on release runs pg_advisory_unlock_all(), and a session that dies takes its locks with it.
    """

    def __init__(
        self,
        pool: ConnectionPool,
        broker: Broker,
        schema: str,
        *,
        batch: int = 1000,
        poll_s: float = 1.0,
        on_published: Callable[[int, int, int], None] | None = None,
    ) -> None:
        """`on_published(last_id, sent_ns, confirmed_ns)` is called after each pass's events are confirmed: the
        highest outbox id published, when the pass handed them to the broker and when the last confirm came
        (wall clock, ns since the epoch)."""
        self._pool = pool
        self._on_published = on_published
        self._broker = broker
        self._schema = schema
        self._lock_key = relay_lock_key(schema)
        self._batch = batch
        self._poll_s = poll_s
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._stop_requested = asyncio.Event()

    def wake(self) -> None:
        """Called after a commit that wrote events, so they leave at once rather than at the next poll."""
        self._wakeup.set()

    def start(self) -> None:
        self._stopping = False
        self._stop_requested.clear()
        self._task = asyncio.create_task(self._run(), name=f"outbox relay {self._schema}")

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Publish what is committed, then end: the pass under way finishes (a pass cut between publishing and
        deleting would publish its events again at the next start) and the outbox is drained — events committed
        just before the stop leave with this process, not with whichever starts next. Bounded: after
        `timeout_s` (a broker that is away) the relay is cancelled and what is left waits in the outbox."""
        if self._task is None:
            return
        self._stopping = True
        self._stop_requested.set()
        self._wakeup.set()
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(self._task)
        except TimeoutError:
            log.warning("outbox relay did not finish its pass within %.1f s; cancelling it", timeout_s)
            await cancel(self._task)

    async def _run(self) -> None:
        await self._relay_until_stopped()
        await self._drain()

    async def _drain(self) -> None:
        """On stop: every batch left, until the outbox is empty, another relay holds it, or a publish fails."""
        try:
            while (published := await self._pass()) == self._batch:
                pass
        except Exception as exc:
            OUTBOX_FAILURES.labels(self._schema).inc()
            log.warning("outbox not drained on stop (%s): what is left is published at the next start", exc)
            return
        if published is None:
            log.info("another relay is publishing this outbox: it publishes what this process committed")

    async def _relay_until_stopped(self) -> None:
        def tell(state: RetryCallState) -> None:
            delay = state.next_action.sleep if state.next_action is not None else 0.0
            exc = failure_of(state)
            if isinstance(exc, BrokerAccessRefused):  # a right its broker user lacks: in words, no trace
                log.error("outbox relay failed: %s; retrying in %.1f s", exc, delay)
                return
            log.error("outbox relay failed; retrying in %.1f s", delay, exc_info=exc)

        # A stop ends the back-off at once.
        retrying = retrying_with_backoff(
            retry=lambda _exc: True, initial_s=0.1, max_s=5.0, before_sleep=tell, stop=self._stop_requested
        )
        while not self._stopping:
            try:
                published: int | None = await retrying(self._publish_backlog)
            except RetryError:
                return
            idle_s = self._poll_s if published is not None else min(self._poll_s, LOCK_BUSY_RETRY_S)
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation (CPython gh-86296).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(idle_s):
                    await self._wakeup.wait()
            self._wakeup.clear()

    async def _publish_backlog(self) -> int | None:
        """Passes until one is short (the backlog published) or another relay holds the lock (None)."""
        try:
            published = await self._pass()
            while published == self._batch and not self._stopping:
                published = await self._pass()
        except Exception:
            OUTBOX_FAILURES.labels(self._schema).inc()
            raise
        return published

    async def relay_once(self) -> int:
        """Publish one batch in commit order; returns how many events were published (0 also when another
        relay is publishing this schema's outbox)."""
        return await self._pass() or 0

    async def _pass(self) -> int | None:
        """One batch; None if another relay holds the schema's lock."""
        outbox = f"{self._schema}.outbox"
        async with self._pool.acquire() as conn:  # no transaction: every statement commits on its own
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", self._lock_key):
                return None
            rows = await conn.fetch(
                f"SELECT id, routing_key, body FROM {outbox} ORDER BY id LIMIT $1", self._batch
            )
            if rows:
                sent_ns = time.time_ns()
                try:
                    await self._publish(rows)
                except Exception:
                    await self._show_backlog(conn)  # the broker may be away for long: the gauge keeps up
                    raise
                if self._on_published is not None:
                    self._on_published(rows[-1]["id"], sent_ns, time.time_ns())
                async with conn.transaction():
                    # No need to wait for the disk: a DELETE lost in a crash only publishes its events again,
                    # which consumers recognise — and a takeover's commit does not queue behind this flush.
                    await conn.execute("SET LOCAL synchronous_commit = off")
                    await conn.execute(
                        f"DELETE FROM {outbox} WHERE id = ANY($1::bigint[])", [r["id"] for r in rows]
                    )
            # Counting costs a query on every commit's path; a short batch means the backlog is (about) gone.
            pending = await conn.fetchval(f"SELECT count(*) FROM {outbox}") if len(rows) == self._batch else 0
        OUTBOX_PENDING.labels(self._schema).set(pending)
        OUTBOX_PUBLISHED.labels(self._schema).inc(len(rows))
        return len(rows)

    async def _publish(self, rows: Sequence[asyncpg.Record]) -> None:
        """All confirms in flight at once, in id order on the broker's one publishing channel. Every publish
        settles before this returns or raises, so a failed pass leaves none in flight when it is retried."""
        # The stored bytes go out as they are: they were encoded (and validated) when committed.
        heads = [(r["routing_key"], *_with_head(r["body"])) for r in rows]
        results = await asyncio.gather(
            *(
                self._broker.publish_encoded(routing_key, body, head.event_id, head.occurred_at)
                for routing_key, body, head in heads
            ),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _show_backlog(self, conn: Queries) -> None:
        """After a failed publish: the gauge shows every row still waiting, if Postgres answers."""
        try:
            pending = await conn.fetchval(f"SELECT count(*) FROM {self._schema}.outbox", timeout=5.0)
        except Exception as exc:  # the original failure is what the caller raises; this one is only logged
            log.warning("outbox backlog not counted: %s", exc)
            return
        OUTBOX_PENDING.labels(self._schema).set(pending)
