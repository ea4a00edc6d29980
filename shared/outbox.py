"""Transactional outbox: events are written in the same transaction as the change they describe, then a
relay publishes them with confirms and deletes them. A crash between commit and publish loses nothing; a
crash between publish and delete repeats an event (consumers are idempotent).

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
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import msgspec
from prometheus_client import Counter, Gauge

from shared.events import Envelope, encode
from shared.messaging import Broker

log = logging.getLogger(__name__)

OUTBOX_PENDING = Gauge("havip_outbox_pending_events", "Events committed but not yet published", ["service"])
OUTBOX_PUBLISHED = Counter("havip_outbox_published_total", "Events published from the outbox", ["service"])
OUTBOX_FAILURES = Counter("havip_outbox_publish_failures_total", "Failed outbox publish attempts", ["service"])


async def add_to_outbox(conn: Any, schema: str, envs: Sequence[Envelope]) -> None:
    """Write events inside the caller's transaction."""
    if envs:
        # One set-based statement for the batch, ids in the order of `envs` (the order they are published in).
        await conn.execute(
            f"""INSERT INTO {schema}.outbox (routing_key, body)
                SELECT routing_key, body
                FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS e(routing_key, body, n) ORDER BY n""",
            [env.type for env in envs],
            [encode(env).decode() for env in envs],
        )


class _Head(msgspec.Struct):
    event_id: uuid.UUID
    occurred_at: datetime


_HEAD = msgspec.json.Decoder(_Head)


def _with_head(body: str) -> tuple[bytes, _Head]:
    raw = body.encode()
    return raw, _HEAD.decode(raw)


class OutboxRelay:
    def __init__(self, pool: Any, broker: Broker, schema: str, *, batch: int = 1000, poll_s: float = 1.0) -> None:
        self._pool = pool
        self._broker = broker
        self._schema = schema
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
        """Let the pass under way finish — a pass cut between publishing and deleting would publish its events
        again at the next start — then end; cancel only if it takes longer than `timeout_s`."""
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
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        delay = 0.1
        while not self._stopping:
            try:
                while await self.relay_once() == self._batch and not self._stopping:
                    pass
                delay = 0.1
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation (CPython gh-86296).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._poll_s):
                        await self._wakeup.wait()
                self._wakeup.clear()
            except asyncio.CancelledError:
                raise
            except Exception:
                OUTBOX_FAILURES.labels(self._schema).inc()
                if self._stopping:
                    return
                log.exception("outbox relay failed; retrying in %.1f s", delay)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._stop_requested.wait()  # a stop ends the back-off at once
                delay = min(delay * 2, 5.0)

    async def relay_once(self) -> int:
        """Publish one batch in commit order; returns how many events were published."""
        async with self._pool.acquire() as conn, conn.transaction():
            # SKIP LOCKED: a second replica's relay takes other rows instead of waiting.
            rows = await conn.fetch(
                f"""SELECT id, routing_key, body FROM {self._schema}.outbox ORDER BY id
                    LIMIT $1 FOR UPDATE SKIP LOCKED""",
                self._batch,
            )
            if rows:
                # The stored bytes go out as they are: they were encoded (and validated) when committed.
                await asyncio.gather(
                    *(
                        self._broker.publish_encoded(r["routing_key"], body, head.event_id, head.occurred_at)
                        for r in rows
                        for body, head in [_with_head(r["body"])]
                    )
                )
                await conn.execute(
                    f"DELETE FROM {self._schema}.outbox WHERE id = ANY($1::bigint[])", [r["id"] for r in rows]
                )
            # Counting costs a query on every commit's path; a short batch means the backlog is (about) gone.
            pending = 0
            if len(rows) == self._batch:
                # After our DELETE, in the same transaction: what is left for the next pass.
                pending = await conn.fetchval(f"SELECT count(*) FROM {self._schema}.outbox")
        OUTBOX_PENDING.labels(self._schema).set(pending)
        OUTBOX_PUBLISHED.labels(self._schema).inc(len(rows))
        return len(rows)
