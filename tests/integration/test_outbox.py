"""The transactional outbox on the real Postgres and RabbitMQ: what was committed is published, in commit
order, even when the process that committed it died before publishing; what was rolled back never is. No
transaction is open while the broker is waited for; one relay per schema publishes at a time; the backlog
gauge follows the outbox while the broker is away."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import datetime
from ipaddress import IPv4Address

import asyncpg
import pytest
from prometheus_client import REGISTRY

from shared import events
from shared.db import create_pool
from shared.messaging import Broker
from shared.outbox import OutboxRelay, add_to_outbox, relay_lock_key
from shared.settings import CommonSettings
from shared.unit_of_work import unit_of_work
from tests.listener import EventLog, listening
from tests.tcp_proxy import CuttableProxy
from tests.waiting import eventually


def vpc_event(name: str) -> events.Envelope:
    return events.envelope("vpc.created", events.VpcData(id=uuid.uuid4(), name=name, cidr="192.0.2.0/24"), "test")


async def test_events_committed_before_a_crash_are_published_in_commit_order_by_the_next_relay(
    pool: asyncpg.Pool, amqp_url: str
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
    assert [e.event_id for e in log.received] == [env.event_id for env in committed]
    assert rolled_back.event_id not in {e.event_id for e in log.received}
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM allocator.outbox") == 0


class Boom(Exception):
    pass


async def test_a_unit_of_work_commits_its_events_in_order_and_wakes_the_relay_only_after_the_commit(
    pool: asyncpg.Pool, database_url: str
) -> None:
    observer = await asyncpg.connect(database_url)
    wakes: list[None] = []

    async def outbox_bodies() -> list[str]:
        return [r["body"] for r in await observer.fetch("SELECT body FROM allocator.outbox ORDER BY id")]

    def wake() -> None:
        wakes.append(None)

    async def failing_unit() -> None:
        async with pool.acquire() as conn, unit_of_work(conn, "allocator", wake) as work:
            work.publish([vpc_event("rolled-back")])
            await work.flush()
            raise Boom

    try:
        await observer.execute("DELETE FROM allocator.outbox")
        first, second, third = (vpc_event(f"unit-{i}") for i in range(3))
        async with pool.acquire() as conn, unit_of_work(conn, "allocator", wake) as work:
            work.publish([first])
            await work.flush()  # written now, inside the transaction: not visible outside it yet
            assert await outbox_bodies() == []
            work.publish([second, third])  # written at the commit at the latest
            assert wakes == []
        assert len(wakes) == 1  # once, after the commit
        stored = [events.Envelope.model_validate_json(b).event_id for b in await outbox_bodies()]
        assert stored == [first.event_id, second.event_id, third.event_id]

        with pytest.raises(Boom):
            await failing_unit()
        assert len(wakes) == 1  # a rolled-back unit wakes nothing …
        assert len(await outbox_bodies()) == 3  # … and leaves no event

        async with pool.acquire() as conn, unit_of_work(conn, "allocator", wake):
            pass
        assert len(wakes) == 1  # no event written: no wake
    finally:
        await observer.execute("DELETE FROM allocator.outbox")
        await observer.close()


async def test_an_event_stays_in_the_outbox_until_the_broker_confirms_it(
    pool: asyncpg.Pool, database_url: str
) -> None:
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
    reader = await asyncpg.connect(database_url)
    try:
        bodies = await reader.fetch("SELECT body FROM allocator.outbox")
        assert [events.Envelope.model_validate_json(r["body"]).event_id for r in bodies] == [env.event_id]
        await reader.execute("DELETE FROM allocator.outbox")
    finally:
        await reader.close()


async def test_the_backlog_gauge_counts_what_is_left_after_a_pass(pool: asyncpg.Pool, amqp_url: str) -> None:
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


class PausingBroker(Broker):
    """The real broker, every publish of which pauses first: for `pause_s`, or — without it — until the test
    sets `release` (a pass stands still mid-publish)."""

    def __init__(self, settings: CommonSettings, pause_s: float | None = None) -> None:
        super().__init__(settings, "test-relay-paused")
        self.pause_s = pause_s
        self.publishing = asyncio.Event()
        self.release = asyncio.Event()

    async def publish_encoded(
        self,
        event_type: str,
        body: bytes,
        event_id: uuid.UUID,
        occurred_at: datetime | None = None,
        *,
        routine: bool = False,
        routing_key: str | None = None,
    ) -> None:
        self.publishing.set()
        if self.pause_s is None:
            await self.release.wait()
        else:  # a slow broker, not a synchronisation: the pass stays under way while the test acts
            await asyncio.sleep(self.pause_s)
        await super().publish_encoded(event_type, body, event_id, occurred_at, routing_key=routing_key)


async def test_stopping_lets_the_pass_under_way_finish(pool: asyncpg.Pool, amqp_url: str) -> None:
    """A relay stopped between publishing and deleting would publish the same events again at the next start."""
    settings = CommonSettings(amqp_url=amqp_url)
    batch = [vpc_event(f"stop-{i}") for i in range(3)]
    async with pool.acquire() as conn, conn.transaction():
        await add_to_outbox(conn, "allocator", batch)
    async with listening(settings, ["vpc.created"]) as log:
        broker = PausingBroker(settings, pause_s=0.3)
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
    assert [e.event_id for e in log.received] == [env.event_id for env in batch]


async def test_a_stopped_relay_publishes_what_was_committed_before_the_stop(
    pool: asyncpg.Pool, amqp_url: str
) -> None:
    """A service stopped right after its last commits publishes them before it exits, not whichever process
    starts next: here the relay is never woken for them and would not poll for a minute."""
    settings = CommonSettings(amqp_url=amqp_url)
    late = [vpc_event(f"late-{i}") for i in range(4)]
    async with listening(settings, ["vpc.created"]) as log:
        broker = Broker(settings, "test-relay")
        await broker.connect()
        relay = OutboxRelay(pool, broker, "allocator", poll_s=60.0)
        relay.start()
        try:
            await eventually(lambda: pending_gauge() == 0, what="the first pass over the empty outbox")
            await commit_each(pool, late)
            await relay.stop()
            async with pool.acquire() as conn:
                assert await conn.fetchval("SELECT count(*) FROM allocator.outbox") == 0
            received = await all_arrived(broker, log)
        finally:
            await broker.close()
    assert received == [str(env.event_id) for env in late]


async def test_stopping_while_the_broker_is_away_is_bounded_and_keeps_the_events(
    pool: asyncpg.Pool, amqp_url: str, db: asyncpg.Connection
) -> None:
    with CuttableProxy() as proxy:
        broker = Broker(CommonSettings(amqp_url=proxy.url(amqp_url), publish_timeout_s=1.0), "test-relay")
        await broker.connect()
        relay = OutboxRelay(pool, broker, "allocator", poll_s=60.0)
        relay.start()
        try:
            await eventually(lambda: pending_gauge() == 0, what="the first pass over the empty outbox")
            proxy.cut()
            stranded = [vpc_event(f"stranded-{i}") for i in range(2)]
            await commit_each(pool, stranded)
            started = time.monotonic()
            await relay.stop(timeout_s=3.0)
            assert time.monotonic() - started < 10  # the stop's own bound, with room for a busy machine
            assert await outbox_rows(db) == len(stranded)  # left for the next start, not lost
            await db.execute("DELETE FROM allocator.outbox")
        finally:
            proxy.start()
            await broker.close()


async def commit_each(pool: asyncpg.Pool, envs: list[events.Envelope]) -> None:
    """One transaction per event, as the services commit their changes."""
    async with pool.acquire() as conn:
        for env in envs:
            async with conn.transaction():
                await add_to_outbox(conn, "allocator", [env])


def pending_gauge() -> float | None:
    return REGISTRY.get_sample_value("havip_outbox_pending_events", {"service": "allocator"})


def failures() -> float:
    return REGISTRY.get_sample_value("havip_outbox_publish_failures_total", {"service": "allocator"}) or 0.0


async def outbox_rows(db: asyncpg.Connection) -> int:
    count: int = await db.fetchval("SELECT count(*) FROM allocator.outbox")
    return count


async def outbox_empty(db: asyncpg.Connection) -> bool:
    return await outbox_rows(db) == 0


async def lock_holders(db: asyncpg.Connection) -> list[asyncpg.Record]:
    """The sessions holding the allocator outbox's relay lock, with their transaction state. A bigint advisory
    key shows in pg_locks as classid (high 32 bits) and objid (low 32 bits), objsubid 1."""
    key = relay_lock_key("allocator")
    rows: list[asyncpg.Record] = await db.fetch(
        """SELECT a.pid, a.state, a.backend_xid, a.backend_xmin
           FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
           WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
             AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
             AND l.classid::bigint = $1 AND l.objid::bigint = $2""",
        (key >> 32) & 0xFFFFFFFF,
        key & 0xFFFFFFFF,
    )
    return rows


async def lock_holders_gone(db: asyncpg.Connection) -> bool:
    return await lock_holders(db) == []


async def all_arrived(broker: Broker, log: EventLog) -> list[str]:
    """The event ids the listener received, once everything confirmed before now has arrived: a marker published
    after them arrives after them (one queue), so duplicates published earlier cannot still be on the way."""
    marker = vpc_event("marker")
    await broker.publish(marker)
    await eventually(lambda: marker.event_id in {e.event_id for e in log.received}, what="the marker")
    ids = [str(e.event_id) for e in log.received]
    return ids[: ids.index(str(marker.event_id))]


async def test_no_transaction_is_open_while_the_broker_is_waited_for(
    pool: asyncpg.Pool, amqp_url: str, db: asyncpg.Connection
) -> None:
    settings = CommonSettings(amqp_url=amqp_url)
    env = vpc_event("held")
    await commit_each(pool, [env])
    async with listening(settings, ["vpc.created"]) as log:
        broker = PausingBroker(settings)
        await broker.connect()
        try:
            relay = OutboxRelay(pool, broker, "allocator")
            relay_pass = asyncio.create_task(relay.relay_once())
            try:
                await asyncio.wait_for(broker.publishing.wait(), 10)
                # The relay's session holds the schema's lock, and nothing else: no transaction, no snapshot.
                holders = [(r["state"], r["backend_xid"], r["backend_xmin"]) for r in await lock_holders(db)]
                assert holders == [("idle", None, None)]
                assert await outbox_rows(db) == 1  # deleted only once confirmed
            finally:
                broker.release.set()
            assert await relay_pass == 1
            assert await lock_holders(db) == []  # the lock went back with the connection
            assert await all_arrived(broker, log) == [str(env.event_id)]
        finally:
            await broker.close()
    assert await outbox_rows(db) == 0


async def test_a_second_relay_publishes_nothing_while_the_first_holds_the_schema(
    pool: asyncpg.Pool, amqp_url: str, db: asyncpg.Connection
) -> None:
    settings = CommonSettings(amqp_url=amqp_url)
    first_batch = [vpc_event(f"first-{i}") for i in range(3)]
    await commit_each(pool, first_batch)
    async with listening(settings, ["vpc.created"]) as log:
        held, other = PausingBroker(settings), Broker(settings, "test-relay-other")
        await held.connect()
        await other.connect()
        try:
            first, second = OutboxRelay(pool, held, "allocator"), OutboxRelay(pool, other, "allocator")
            first_pass = asyncio.create_task(first.relay_once())
            try:
                await asyncio.wait_for(held.publishing.wait(), 10)
                assert await second.relay_once() == 0  # the rows are there, but the first relay is on them
            finally:
                held.release.set()
            assert await first_pass == len(first_batch)
            later = [vpc_event(f"later-{i}") for i in range(2)]
            await commit_each(pool, later)
            assert await second.relay_once() == len(later)
            received = await all_arrived(other, log)
        finally:
            await held.close()
            await other.close()
    assert received == [str(env.event_id) for env in first_batch + later]
    assert await outbox_rows(db) == 0


async def test_two_relays_on_one_schema_publish_every_event_once_in_commit_order(
    pool: asyncpg.Pool, amqp_url: str, db: asyncpg.Connection
) -> None:
    """Two replicas, each waking its own relay after its own commits, small batches: many passes race for the
    schema's lock."""
    settings = CommonSettings(amqp_url=amqp_url)
    committed = [vpc_event(f"replicas-{i}") for i in range(120)]
    async with listening(settings, ["vpc.created"]) as log:
        brokers = [Broker(settings, f"test-relay-{n}") for n in range(2)]
        for broker in brokers:
            await broker.connect()
        relays = [OutboxRelay(pool, broker, "allocator", batch=4, poll_s=0.05) for broker in brokers]
        try:
            for relay in relays:
                relay.start()
            for i, env in enumerate(committed):
                await commit_each(pool, [env])
                relays[i % 2].wake()
            await eventually(lambda: outbox_empty(db), timeout=60, what="the outbox emptied")
        finally:
            for relay in relays:
                await relay.stop()
        try:
            received = await all_arrived(brokers[0], log)
        finally:
            for broker in brokers:
                await broker.close()
    assert received == [str(env.event_id) for env in committed]


async def test_the_backlog_gauge_follows_the_outbox_while_the_broker_is_away(
    pool: asyncpg.Pool, amqp_url: str, db: asyncpg.Connection
) -> None:
    listener_settings = CommonSettings(amqp_url=amqp_url)
    first, second = [vpc_event(f"outage-{i}") for i in range(3)], [vpc_event(f"outage-{i}") for i in range(3, 7)]
    with CuttableProxy() as proxy:
        # A short publish timeout: an attempt against the absent broker fails soon, and refreshes the gauge.
        broker = Broker(CommonSettings(amqp_url=proxy.url(amqp_url), publish_timeout_s=1.0), "test-relay")
        await broker.connect()
        relay = OutboxRelay(pool, broker, "allocator", poll_s=0.1)
        async with listening(listener_settings, ["vpc.created"]) as log:
            relay.start()
            try:
                await eventually(lambda: pending_gauge() == 0, what="a first pass over the empty outbox")
                proxy.cut()
                await commit_each(pool, first)
                relay.wake()
                await eventually(lambda: pending_gauge() == len(first), timeout=30, what="the first backlog")
                await commit_each(pool, second)
                relay.wake()
                await eventually(lambda: pending_gauge() == len(first + second), timeout=30, what="the backlog")
                assert log.received == []
                proxy.start()
                await eventually(lambda: pending_gauge() == 0, timeout=60, what="the backlog published")
                assert await outbox_rows(db) == 0
                received = await all_arrived(broker, log)
            finally:
                await relay.stop()
                await broker.close()
    assert received == [str(env.event_id) for env in first + second]


async def test_a_relay_whose_session_ended_mid_pass_takes_the_lock_again_and_carries_on(
    pool: asyncpg.Pool, database_url: str, amqp_url: str, db: asyncpg.Connection
) -> None:
    """Postgres goes away (for the relay's pool only) while a pass publishes: the session's lock goes with it,
    the confirmed rows cannot be deleted and are published again (at least once), and once Postgres is back the
    relay takes the lock again and publishes the rest, in commit order."""
    settings = CommonSettings(amqp_url=amqp_url)
    during_pass, during_outage = [vpc_event(f"pass-{i}") for i in range(2)], [vpc_event("outage")]
    await commit_each(pool, during_pass)
    with CuttableProxy(upstream_port=5432) as proxy:
        relay_pool = await create_pool(database_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}", 1))
        broker = PausingBroker(settings)
        await broker.connect()
        relay = OutboxRelay(relay_pool, broker, "allocator", poll_s=0.1)
        async with listening(settings, ["vpc.created"]) as log:
            relay.start()
            try:
                await asyncio.wait_for(broker.publishing.wait(), 10)
                assert len(await lock_holders(db)) == 1
                proxy.cut()
                await eventually(lambda: lock_holders_gone(db), what="the lock gone with the relay's session")
                failed_before = failures()
                broker.release.set()  # confirmed by the broker; the DELETE finds no session
                await eventually(lambda: failures() > failed_before, what="the relay's failed pass")
                await commit_each(pool, during_outage)
                relay.wake()
                proxy.start()
                await eventually(lambda: outbox_empty(db), timeout=60, what="the outbox emptied")
                received = await all_arrived(broker, log)
            finally:
                await relay.stop()
                await broker.close()
                await relay_pool.close()
    ids = [str(env.event_id) for env in during_pass + during_outage]
    assert received == ids[: len(during_pass)] + ids  # the pass cut before its DELETE, then everything
