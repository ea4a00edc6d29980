"""The transactional outbox on the real Postgres and RabbitMQ: what was committed is published, in commit
order, even when the process that committed it died before publishing; what was rolled back never is."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from ipaddress import IPv4Address
from typing import Any

import asyncpg
import pytest
from prometheus_client import REGISTRY

from shared import events
from shared.db import create_pool
from shared.messaging import Broker
from shared.outbox import OutboxRelay, add_to_outbox
from shared.settings import CommonSettings
from tests.listener import listening
from tests.waiting import eventually


@pytest.fixture(scope="module")
async def pool(database_url: str) -> AsyncIterator[Any]:
    pool = await create_pool(database_url, min_size=1, max_size=4)
    yield pool
    await pool.close()


def vpc_event(name: str) -> events.Envelope:
    return events.envelope("vpc.created", events.VpcData(id=uuid.uuid4(), name=name, cidr="192.0.2.0/24"), "test")


async def test_events_committed_before_a_crash_are_published_in_commit_order_by_the_next_relay(
    pool: Any, amqp_url: str
) -> None:
    settings = CommonSettings(amqp_url=amqp_url)
    committed = [vpc_event(f"committed-{i}") for i in range(5)]
    rolled_back = vpc_event("rolled-back")
    async with pool.acquire() as conn:
        for env in committed:  # one transaction each, as the service writes them; no relay runs: a "crash"
            async with conn.transaction():
                await add_to_outbox(conn, "allocator", [env])
        transaction = conn.transaction()  # the change fails after writing its event: the event goes with it
        await transaction.start()
        await add_to_outbox(conn, "allocator", [rolled_back])
        await transaction.rollback()
        assert await conn.fetchval("SELECT count(*) FROM allocator.outbox") == len(committed)

    async with listening(settings, ["vpc.created"]) as log:
        broker = Broker(settings, "test-relay")
        await broker.connect()
        relay = OutboxRelay(pool, broker, "allocator", poll_s=0.1)
        relay.start()  # the restarted service: it publishes what is left without being woken
        try:
            await eventually(lambda: len(log.received) >= len(committed), what="the committed events")
        finally:
            await relay.stop()
            await broker.close()
    assert [e["event_id"] for e in log.received] == [str(env.event_id) for env in committed]
    assert str(rolled_back.event_id) not in {e["event_id"] for e in log.received}
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM allocator.outbox") == 0


async def test_an_event_stays_in_the_outbox_until_the_broker_confirms_it(pool: Any, database_url: str) -> None:
    # A broker that refuses the connection: nothing can be confirmed, so nothing may be deleted.
    unreachable = CommonSettings(amqp_url="amqp://guest:guest@127.0.0.1:1/", publish_timeout_s=0.5)
    broker = Broker(unreachable, "test-relay")
    env = events.envelope(
        "havip.eip.associated", events.EipData(havip_id=uuid.uuid4(), eip=IPv4Address("203.0.113.9")), "test"
    )
    async with pool.acquire() as conn, conn.transaction():
        await add_to_outbox(conn, "allocator", [env])
    relay = OutboxRelay(pool, broker, "allocator")
    with pytest.raises(RuntimeError):
        await relay.relay_once()  # never connected: publishing fails
    conn = await asyncpg.connect(database_url)
    try:
        bodies = await conn.fetch("SELECT body FROM allocator.outbox")
        assert [events.Envelope.model_validate_json(r["body"]).event_id for r in bodies] == [env.event_id]
        await conn.execute("DELETE FROM allocator.outbox")
    finally:
        await conn.close()


async def test_the_backlog_gauge_counts_what_is_left_after_a_pass(pool: Any, amqp_url: str) -> None:
    settings = CommonSettings(amqp_url=amqp_url)
    async with pool.acquire() as conn, conn.transaction():
        await add_to_outbox(conn, "allocator", [vpc_event(f"backlog-{i}") for i in range(3)])
    broker = Broker(settings, "test-relay")
    await broker.connect()
    relay = OutboxRelay(pool, broker, "allocator", batch=2)
    try:
        assert await relay.relay_once() == 2
        assert REGISTRY.get_sample_value("havip_outbox_pending_events", {"service": "allocator"}) == 1
        assert await relay.relay_once() == 1
        assert REGISTRY.get_sample_value("havip_outbox_pending_events", {"service": "allocator"}) == 0
    finally:
        await broker.close()


class SlowBroker(Broker):
    """The real broker, with a pause inside every publish: a stop request lands in the middle of a pass."""

    def __init__(self, settings: CommonSettings) -> None:
        super().__init__(settings, "test-relay")
        self.publishing = asyncio.Event()

    async def publish_encoded(
        self,
        event_type: str,
        body: bytes,
        event_id: uuid.UUID,
        occurred_at: datetime | None = None,
        *,
        routine: bool = False,
    ) -> None:
        self.publishing.set()
        await asyncio.sleep(0.3)
        await super().publish_encoded(event_type, body, event_id, occurred_at)


async def test_stopping_lets_the_pass_under_way_finish(pool: Any, amqp_url: str) -> None:
    """A relay stopped between publishing and deleting would publish the same events again at the next start."""
    settings = CommonSettings(amqp_url=amqp_url)
    batch = [vpc_event(f"stop-{i}") for i in range(3)]
    async with pool.acquire() as conn, conn.transaction():
        await add_to_outbox(conn, "allocator", batch)
    async with listening(settings, ["vpc.created"]) as log:
        broker = SlowBroker(settings)
        await broker.connect()
        relay = OutboxRelay(pool, broker, "allocator")
        relay.start()
        try:
            await asyncio.wait_for(broker.publishing.wait(), 10)
            await relay.stop()  # while the pass is publishing
            async with pool.acquire() as conn:
                assert await conn.fetchval("SELECT count(*) FROM allocator.outbox") == 0
            await eventually(lambda: len(log.received) >= len(batch), what="the batch")
        finally:
            await broker.close()
    assert [e["event_id"] for e in log.received] == [str(env.event_id) for env in batch]
