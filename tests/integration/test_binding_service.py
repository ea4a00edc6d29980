"""The binding service wired to the real Postgres and RabbitMQ of the test run."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import asyncpg
import pytest
from prometheus_client import REGISTRY

from services.binding.domain import ns_to_datetime
from services.binding.main import run
from services.binding.repository import Renewal, WriteConflict, delete_old_refusals, write_renewals
from services.binding.settings import BindingSettings
from shared import events
from shared.db import fetch_one
from shared.hops import BINDING_HOPS
from shared.messaging import Broker, declare_topology
from shared.partitions import claims_routing_key
from tests.conftest import PG_BASE
from tests.integration.binding_support import World, binding_row, binding_row_if_any, claims_event, transitions
from tests.listener import EventLog, listening
from tests.sandbox import temporary_database
from tests.waiting import eventually


@pytest.fixture
async def listener(binding: BindingSettings) -> AsyncIterator[EventLog]:
    async with listening(binding, ["havip.binding.changed", "havip.claim.rejected"]) as log:
        yield log


# The refusal audit's pace out of the way: these tests decide many refusals in one instant (capture times
# compressed into one message); pacing has its module, test_binding_audit_pacing.py. One partition: these tests
# are of the decisions, some with one event carrying claims of many addresses (test_binding_replicas.py has P > 1).
BINDING_SETTINGS = {"refusal_audit_rate": 100_000, "partitions": 1}


async def test_failover_moves_the_binding_persists_history_and_publishes(
    binding: BindingSettings, publisher: Broker, listener: EventLog
) -> None:
    w = World()
    await publisher.publish_many(w.inventory())
    await publisher.publish(w.claim(w.cvm1.mac))

    async def bound_to(instance: events.InstanceData) -> bool:
        row = await binding_row_if_any(binding.database_url, w.havip.id)
        return row is not None and row["instance_id"] == instance.id

    await eventually(lambda: bound_to(w.cvm1), what="HAVIP bound to cvm1")
    await publisher.publish(w.claim(w.cvm2.mac))
    await eventually(lambda: bound_to(w.cvm2), what="HAVIP bound to cvm2")

    history = await transitions(binding.database_url, w.havip.id)
    assert [(r["sequence"], r["from_instance_id"], r["to_instance_id"]) for r in history] == [
        (1, None, w.cvm1.id),
        (2, w.cvm1.id, w.cvm2.id),
    ]
    assert all(r["committed_at"] >= r["captured_at"] for r in history)
    await eventually(lambda: len(listener.of("havip.binding.changed", w.havip.id)) == 2, what="two events")
    changed = listener.of("havip.binding.changed", w.havip.id)
    assert [e["sequence"] for e in changed] == [1, 2]
    assert changed[1]["previous"] == {"instance_id": str(w.cvm1.id), "mac": w.cvm1.mac}
    assert changed[1]["current"] == {"instance_id": str(w.cvm2.id), "mac": w.cvm2.mac}
    assert changed[1]["watcher_id"] == "test-watcher"


async def test_the_routine_lane_renews_the_holder_and_still_decides_whatever_else_it_carries(
    binding: BindingSettings, publisher: Broker, listener: EventLog
) -> None:
    """Messages a watcher marks routine (its view: a holder's refresh) are decided like any other — the mark
    only schedules them — and their renewals reach the database."""
    w = World()
    await publisher.publish_many(w.inventory())
    t = time.time_ns() - 5_000_000_000
    await publisher.publish(w.claim(w.cvm1.mac, t=t))
    await eventually(lambda: len(listener.of("havip.binding.changed", w.havip.id)) == 1, what="bound")

    async def routine(env: events.Envelope) -> None:
        await publisher.publish(env, routine=True)

    await routine(w.claim(w.cvm1.mac, t=t + 2_000_000_000))  # a refresh, two seconds on

    async def last_seen() -> datetime:
        row = await binding_row(binding.database_url, w.havip.id)
        seen: datetime = row["last_seen_at"]
        return seen

    # As the service converts it (a float round trip through timestamp() * 1e9 can land a microsecond off).
    await eventually(lambda: _equals(last_seen(), ns_to_datetime(t + 2_000_000_000)), what="renewed")
    await routine(w.claim(w.cvm2.mac, t=t + 3_000_000_000))  # the watcher's view was wrong: a takeover
    await eventually(lambda: len(listener.of("havip.binding.changed", w.havip.id)) == 2, what="moved")
    row = await binding_row(binding.database_url, w.havip.id)
    assert (row["instance_id"], row["sequence"]) == (w.cvm2.id, 2)


async def _equals(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


async def test_refused_claims_are_audited_published_and_move_nothing(
    binding: BindingSettings, publisher: Broker, listener: EventLog
) -> None:
    w = World()
    w.havip = w.havip.model_copy(update={"candidates": [w.cvm1.id]})
    await publisher.publish_many(w.inventory())
    await publisher.publish(w.claim(w.cvm1.mac))
    await eventually(lambda: len(listener.of("havip.binding.changed", w.havip.id)) == 1, what="bound")
    spoofers = {
        "unknown_mac": w.claim("02:ee:ee:ee:ee:ee"),
        "other_subnet": w.claim(w.outsider.mac),
        "not_candidate": w.claim(w.cvm2.mac),
        "eth_mismatch": w.claim(w.cvm2.mac, eth_src=w.cvm1.mac),
    }
    await publisher.publish_many(list(spoofers.values()))
    await eventually(
        lambda: len(listener.of("havip.claim.rejected", w.havip.id)) == len(spoofers), what="four refusals"
    )
    assert sorted(e["reason"] for e in listener.of("havip.claim.rejected", w.havip.id)) == sorted(spoofers)
    row = await binding_row(binding.database_url, w.havip.id)
    assert row["instance_id"] == w.cvm1.id
    assert row["sequence"] == 1
    conn = await asyncpg.connect(binding.database_url)
    try:
        audited = await conn.fetch("SELECT reason FROM binding.rejected_claims WHERE havip_id = $1", w.havip.id)
    finally:
        await conn.close()
    assert sorted(r["reason"] for r in audited) == sorted(spoofers)


async def test_stale_and_redelivered_claims_change_nothing(
    binding: BindingSettings, publisher: Broker, listener: EventLog
) -> None:
    w = World()
    await publisher.publish_many(w.inventory())
    t = time.time_ns()
    first = w.claim(w.cvm1.mac, t=t)
    await publisher.publish(first)
    await publisher.publish(w.claim(w.cvm2.mac, t=t - 1_000_000))  # captured earlier, arrived later
    await publisher.publish(first)  # the same message again, as after a redelivery
    marker = w.claim(w.cvm1.mac, eth_src="02:ee:ee:ee:ee:ee", t=t + 1)
    await publisher.publish(marker)
    await eventually(lambda: len(listener.of("havip.claim.rejected", w.havip.id)) == 1, what="marker processed")
    history = await transitions(binding.database_url, w.havip.id)
    assert [(r["sequence"], r["to_instance_id"]) for r in history] == [(1, w.cvm1.id)]


async def test_deregistered_holder_and_released_havip_end_with_release_rows(
    binding: BindingSettings, publisher: Broker, listener: EventLog
) -> None:
    w = World()
    await publisher.publish_many(w.inventory())
    await publisher.publish(w.claim(w.cvm1.mac))
    await eventually(lambda: len(listener.of("havip.binding.changed", w.havip.id)) == 1, what="bound")
    await publisher.publish(events.envelope("instance.deregistered", w.cvm1, "allocator"))
    await eventually(lambda: len(listener.of("havip.binding.changed", w.havip.id)) == 2, what="release event")
    row = await binding_row(binding.database_url, w.havip.id)
    assert row["instance_id"] is None
    await publisher.publish(events.envelope("havip.released", w.havip, "allocator"))
    await eventually(lambda: len(listener.of("havip.binding.changed", w.havip.id)) == 3, what="final row")
    history = await transitions(binding.database_url, w.havip.id)
    assert [(r["sequence"], r["reason"], r["to_instance_id"]) for r in history] == [
        (1, "claim", w.cvm1.id),
        (2, "release", None),
        (3, "release", None),
    ]
    assert await binding_row_if_any(binding.database_url, w.havip.id) is None


async def test_unprocessable_messages_are_dead_lettered_and_consuming_goes_on(
    binding: BindingSettings, publisher: Broker, listener: EventLog
) -> None:
    connection = await aio_pika.connect(binding.amqp_url)
    try:
        channel = await connection.channel()
        exchange = await declare_topology(channel, binding)
        dead = await channel.declare_queue(binding.dead_letter_queue, durable=True)
        for body in (b"not json", b'{"type": "arp.claims.observed"}', json.dumps({"x": 1}).encode()):
            await exchange.publish(aio_pika.Message(body), routing_key=claims_routing_key(0))
        bad_type = events.envelope("havip.allocated", World().havip, "allocator").model_copy(
            update={"type": "havip.unheard_of"}
        )
        await exchange.publish(aio_pika.Message(events.encode(bad_type)), routing_key="havip.allocated")
        got: list[bytes] = []

        async def four_dead_letters() -> bool:
            with contextlib.suppress(aio_pika.exceptions.QueueEmpty):
                message = await dead.get()
                got.append(message.body)
                await message.ack()
            return len(got) >= 4

        await eventually(four_dead_letters, what="four messages in the dead-letter queue")
        assert b"not json" in got
    finally:
        await connection.close()
    # The consumer is still alive and working.
    w = World()
    await publisher.publish_many(w.inventory())
    await publisher.publish(w.claim(w.cvm1.mac))
    await eventually(lambda: len(listener.of("havip.binding.changed", w.havip.id)) == 1, what="still consuming")


async def test_a_message_conflicting_with_stored_state_is_dead_lettered_not_blocking(
    binding: BindingSettings, publisher: Broker, listener: EventLog
) -> None:
    w = World()
    await publisher.publish_many(w.inventory())
    await publisher.publish(w.claim(w.cvm1.mac, eth_src="02:ee:ee:ee:ee:ee"))  # a refusal: proves it is loaded
    await eventually(lambda: len(listener.of("havip.claim.rejected", w.havip.id)) == 1, what="HAVIP known")
    conn = await asyncpg.connect(binding.database_url)
    try:  # history written behind the service's back, as a broken restore would leave it
        await conn.execute(
            """INSERT INTO binding.transitions (havip_id, sequence, committed_at, reason)
               VALUES ($1, 1, now(), 'claim')""",
            w.havip.id,
        )
    finally:
        await conn.close()
    await publisher.publish(w.claim(w.cvm1.mac))  # would write sequence 1 again: cannot ever commit

    other = World()
    await publisher.publish_many(other.inventory())
    await publisher.publish(other.claim(other.cvm1.mac))
    await eventually(lambda: len(listener.of("havip.binding.changed", other.havip.id)) == 1, what="not blocked")
    assert listener.of("havip.binding.changed", w.havip.id) == []


async def test_a_redelivered_refusal_is_audited_and_published_once(
    binding: BindingSettings, publisher: Broker, listener: EventLog
) -> None:
    w = World()
    await publisher.publish_many(w.inventory())
    spoof = w.claim("02:ee:ee:ee:ee:01")
    await publisher.publish(spoof)
    await publisher.publish(spoof)  # the same message again, as after a lost acknowledgement
    marker = w.claim("02:ee:ee:ee:ee:02")
    await publisher.publish(marker)
    await eventually(
        lambda: any(e["mac"] == "02:ee:ee:ee:ee:02" for e in listener.of("havip.claim.rejected", w.havip.id)),
        what="the marker's refusal",
    )
    assert [e["mac"] for e in listener.of("havip.claim.rejected", w.havip.id)] == [
        "02:ee:ee:ee:ee:01",
        "02:ee:ee:ee:ee:02",
    ]
    conn = await asyncpg.connect(binding.database_url)
    try:
        audited = await conn.fetch(
            "SELECT mac::text FROM binding.rejected_claims WHERE havip_id = $1 ORDER BY id", w.havip.id
        )
    finally:
        await conn.close()
    assert [r["mac"] for r in audited] == ["02:ee:ee:ee:ee:01", "02:ee:ee:ee:ee:02"]


async def test_one_event_carries_the_claims_of_many_havips_in_capture_order(
    binding: BindingSettings, publisher: Broker, listener: EventLog
) -> None:
    worlds = [World() for _ in range(5)]
    for w in worlds:
        await publisher.publish_many(w.inventory())
    t = time.time_ns()
    # cvm1 takes every HAVIP, then cvm2 takes them; an older claim of cvm1 at the end is stale.
    batch = [w.observed(w.cvm1.mac, t=t) for w in worlds] + [w.observed(w.cvm2.mac, t=t + 10) for w in worlds]
    batch.append(worlds[0].observed(worlds[0].cvm1.mac, t=t + 5))
    await publisher.publish(claims_event(*batch))
    for w in worlds:
        havip_id = w.havip.id
        await eventually(lambda: len(listener.of("havip.binding.changed", havip_id)) == 2, what="two moves")  # noqa: B023
        history = await transitions(binding.database_url, w.havip.id)
        assert [(r["sequence"], r["to_instance_id"]) for r in history] == [(1, w.cvm1.id), (2, w.cvm2.id)]


async def test_a_claim_from_a_clock_far_ahead_is_refused_as_clock_skew(
    binding: BindingSettings, publisher: Broker, listener: EventLog
) -> None:
    w = World()
    await publisher.publish_many(w.inventory())
    await publisher.publish(w.claim(w.cvm1.mac, t=time.time_ns() + 3_600 * 10**9))  # a watcher an hour ahead
    await eventually(lambda: len(listener.of("havip.claim.rejected", w.havip.id)) == 1, what="the refusal")
    [refusal] = listener.of("havip.claim.rejected", w.havip.id)
    assert (refusal["reason"], refusal["mac"]) == ("clock_skew", w.cvm1.mac)
    await publisher.publish(w.claim(w.cvm2.mac))  # the others' claims are not made stale by it
    await eventually(lambda: len(listener.of("havip.binding.changed", w.havip.id)) == 1, what="bound to cvm2")
    row = await binding_row(binding.database_url, w.havip.id)
    assert row["instance_id"] == w.cvm2.id


async def test_a_candidate_list_without_the_holder_releases_the_binding(
    binding: BindingSettings, publisher: Broker, listener: EventLog
) -> None:
    w = World()
    await publisher.publish_many(w.inventory())
    await publisher.publish(w.claim(w.cvm1.mac))
    await eventually(lambda: len(listener.of("havip.binding.changed", w.havip.id)) == 1, what="bound to cvm1")
    narrowed = w.havip.model_copy(update={"candidates": [w.cvm2.id]})
    await publisher.publish(events.envelope("havip.updated", narrowed, "allocator"))
    await eventually(lambda: len(listener.of("havip.binding.changed", w.havip.id)) == 2, what="the release")
    released = listener.of("havip.binding.changed", w.havip.id)[1]
    assert (released["reason"], released["current"], released["sequence"]) == ("release", None, 2)
    row = await binding_row(binding.database_url, w.havip.id)
    assert row["instance_id"] is None
    await publisher.publish(w.claim(w.cvm2.mac))
    await eventually(lambda: len(listener.of("havip.binding.changed", w.havip.id)) == 3, what="cvm2 takes it")
    assert [r["to_instance_id"] for r in await transitions(binding.database_url, w.havip.id)] == [
        w.cvm1.id,
        None,
        w.cvm2.id,
    ]


async def test_two_masters_raise_split_brain_and_flapping_and_both_end_when_quiet(amqp_url: str) -> None:
    """Flapping and split brain (docs/contract.md#flapping) with short windows: a deployment of its own (its own
    database, exchange and queue names)."""
    async with temporary_database(PG_BASE, f"havip_test_flags_{uuid.uuid4().hex[:8]}") as database_url:
        await _two_masters(database_url, amqp_url)


async def _two_masters(database_url: str, amqp_url: str) -> None:
    settings = BindingSettings(
        database_url=database_url,
        amqp_url=amqp_url,
        amqp_prefix=f"t{uuid.uuid4().hex[:8]}.",
        metrics_port=0,
        flap_window_s=4,
        split_brain_window_s=2,
    )
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run(settings, stop, ready))
    conditions = [f"havip.{c}.{e}" for c in ("flapping", "split_brain") for e in ("started", "stopped")]
    try:
        await asyncio.wait_for(ready.wait(), 30)
        async with listening(settings, ["havip.binding.changed", *conditions]) as log:
            broker = Broker(settings, "test")
            await broker.connect()
            try:
                w = World()
                await broker.publish_many(w.inventory())
                t = time.time_ns()
                for i in range(6):  # both masters announce, in turn
                    await broker.publish(w.claim((w.cvm1 if i % 2 == 0 else w.cvm2).mac, t=t + i * 1_000_000))

                def seen(event_type: str) -> bool:
                    return len(log.of(event_type, w.havip.id)) == 1

                await eventually(lambda: seen("havip.split_brain.started"), what="split brain started")
                await eventually(lambda: seen("havip.flapping.started"), what="flapping started")
                assert len(log.of("havip.binding.changed", w.havip.id)) == 6  # the binding follows the newest
                started = log.of("havip.split_brain.started", w.havip.id)[0]
                assert started["claimants_in_window"] == 2
                row = await binding_row(settings.database_url, w.havip.id)
                assert (row["flapping"], row["split_brain"], row["instance_id"]) == (True, True, w.cvm2.id)

                await eventually(lambda: seen("havip.split_brain.stopped"), what="split brain ended")
                await eventually(lambda: seen("havip.flapping.stopped"), what="flapping ended")
                row = await binding_row(settings.database_url, w.havip.id)
                assert (row["flapping"], row["split_brain"]) == (False, False)
            finally:
                await broker.close()
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_an_allocation_redelivered_after_the_release_changes_nothing(
    binding: BindingSettings, publisher: Broker, listener: EventLog
) -> None:
    w = World()
    allocated = events.envelope("havip.allocated", w.havip, "allocator")
    registered = events.envelope("instance.registered", w.cvm2, "allocator")
    await publisher.publish_many(w.inventory())
    await publisher.publish(w.claim(w.cvm1.mac))
    await eventually(lambda: len(listener.of("havip.binding.changed", w.havip.id)) == 1, what="bound")
    await publisher.publish(events.envelope("havip.released", w.havip, "allocator"))
    await publisher.publish(events.envelope("instance.deregistered", w.cvm2, "allocator"))
    await eventually(lambda: len(listener.of("havip.binding.changed", w.havip.id)) == 2, what="bound, released")
    await publisher.publish_many([allocated, registered])  # the same messages again, as after lost acks
    await publisher.publish(w.claim(w.cvm1.mac))
    marker = World()
    await publisher.publish_many(marker.inventory())
    await publisher.publish(marker.claim(marker.cvm1.mac))
    await eventually(lambda: len(listener.of("havip.binding.changed", marker.havip.id)) == 1, what="marker")
    assert len(listener.of("havip.binding.changed", w.havip.id)) == 2
    assert await binding_row_if_any(binding.database_url, w.havip.id) is None
    conn = await asyncpg.connect(binding.database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM binding.havips WHERE id = $1", w.havip.id) == 0
        assert await conn.fetchval("SELECT count(*) FROM binding.instances WHERE id = $1", w.cvm2.id) == 0
    finally:
        await conn.close()


async def test_every_message_delivered_twice_changes_nothing_twice(
    binding: BindingSettings, publisher: Broker, listener: EventLog
) -> None:
    """Redelivery is idempotent: each message of a whole story — every inventory event type, a takeover, a refusal,
    a narrowed candidate list, a deregistration, the release — arrives twice in a row (a redelivery after a lost
    acknowledgement); the history, the audit and the events are those of one delivery."""
    w = World()
    spoofer = "02:ee:ee:ee:ee:7b"
    t = time.time_ns()
    subnet = events.SubnetData(id=w.subnet, vpc_id=w.vpc, name="s", cidr="192.0.2.0/24")
    conn = await asyncpg.connect(binding.database_url)

    async def stored(sql: str, *args: object) -> bool:
        return bool(await conn.fetchval(sql, *args))

    def changes(n: int) -> Callable[[], bool]:
        return lambda: len(listener.of("havip.binding.changed", w.havip.id)) == n

    def refused() -> bool:
        return bool(listener.of("havip.claim.rejected", w.havip.id))

    narrowed = w.havip.model_copy(update={"candidates": [w.cvm1.id]})

    # Inventory and claims come by different queues: each step is published (twice) once the last has been
    # decided, as a watcher's claims follow the inventory they rely on.
    story: list[tuple[list[events.Envelope], Callable[[], Awaitable[bool] | bool]]] = [
        (
            [events.envelope("subnet.created", subnet, "allocator")],
            lambda: stored("SELECT count(*) FROM binding.subnets WHERE id = $1", w.subnet),
        ),
        (w.inventory(), lambda: stored("SELECT count(*) FROM binding.bindings WHERE havip_id = $1", w.havip.id)),
        ([w.claim(w.cvm1.mac, t=t)], changes(1)),
        ([claims_event(w.observed(spoofer, t=t + 1))], refused),
        ([w.claim(w.cvm2.mac, t=t + 2)], changes(2)),
        ([events.envelope("havip.updated", narrowed, "allocator")], changes(3)),
        ([w.claim(w.cvm1.mac, t=t + 3)], changes(4)),
        ([events.envelope("instance.deregistered", w.cvm1, "allocator")], changes(5)),
        ([events.envelope("havip.released", w.havip, "allocator")], changes(6)),
    ]
    try:
        for step, (messages, done) in enumerate(story):
            for message in messages:
                await publisher.publish_many([message, message])
            await eventually(done, what=f"step {step} decided")
    finally:
        await conn.close()
    marker = World()
    await publisher.publish_many(marker.inventory())
    await publisher.publish(marker.claim(marker.cvm1.mac))
    await eventually(lambda: len(listener.of("havip.binding.changed", marker.havip.id)) == 1, what="marker")
    history = await transitions(binding.database_url, w.havip.id)
    assert [(r["sequence"], r["reason"], r["to_instance_id"]) for r in history] == [
        (1, "claim", w.cvm1.id),
        (2, "claim", w.cvm2.id),
        (3, "release", None),  # the candidate list no longer holds cvm2
        (4, "claim", w.cvm1.id),
        (5, "release", None),  # cvm1 deregistered
        (6, "release", None),  # the HAVIP released
    ]
    published = listener.of("havip.binding.changed", w.havip.id)
    assert [e["sequence"] for e in published] == [1, 2, 3, 4, 5, 6]
    assert len(listener.of("havip.claim.rejected", w.havip.id)) == 1
    conn = await asyncpg.connect(binding.database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM binding.rejected_claims WHERE mac = $1", spoofer) == 1
        assert await conn.fetchval("SELECT count(*) FROM binding.havips WHERE id = $1", w.havip.id) == 0
    finally:
        await conn.close()


async def test_a_flood_of_one_refusal_becomes_one_audit_row_per_second_with_a_count(
    binding: BindingSettings, publisher: Broker, listener: EventLog
) -> None:
    w = World()
    await publisher.publish_many(w.inventory())
    spoofer = "02:ee:ee:ee:ee:77"
    t = time.time_ns()

    def frames(at: int, repeats: int) -> events.ObservedClaim:
        return w.observed(spoofer, t=at).model_copy(update={"repeats": repeats})

    await publisher.publish(claims_event(frames(t, 1), frames(t + 1_000, 2), frames(t + 2_000, 3)))
    await eventually(lambda: len(listener.of("havip.claim.rejected", w.havip.id)) == 1, what="one refusal")
    assert listener.of("havip.claim.rejected", w.havip.id)[0]["count"] == 6
    await publisher.publish(claims_event(frames(t + 500_000_000, 4)))  # within the second: folded
    await publisher.publish(claims_event(frames(t + 1_500_000_000, 1)))  # a second later: a new row
    await eventually(lambda: len(listener.of("havip.claim.rejected", w.havip.id)) == 2, what="the next second")
    conn = await asyncpg.connect(binding.database_url)
    try:
        rows = await conn.fetch(
            "SELECT count FROM binding.rejected_claims WHERE havip_id = $1 ORDER BY id", w.havip.id
        )
        assert [r["count"] for r in rows] == [10, 1]
        # Retention: a refusal recorded long ago goes.
        await conn.execute(
            "UPDATE binding.rejected_claims SET recorded_at = now() - interval '40 days' WHERE havip_id = $1 "
            "AND count = 10",
            w.havip.id,
        )
        assert await delete_old_refusals(conn, 30) == 1
        rows = await conn.fetch("SELECT count FROM binding.rejected_claims WHERE havip_id = $1", w.havip.id)
        assert [r["count"] for r in rows] == [1]
    finally:
        await conn.close()


async def test_a_refusal_that_keeps_coming_back_is_audited_ever_more_rarely_and_a_pause_resets_it(
    binding: BindingSettings, publisher: Broker, listener: EventLog
) -> None:
    """The fold window doubles while one refusal (address, MAC, reason) comes back right after it — 1 s, 2 s,
    4 s … — so a spoofer flooding without pause costs ever fewer rows and events; every frame is still counted;
    after a pause as long as the window, a refusal starts again at one second."""
    w = World()
    await publisher.publish_many(w.inventory())
    spoofer = "02:ee:ee:ee:ee:79"
    s = 1_000_000_000
    t = time.time_ns() - 200 * s
    # capture times in seconds from t: windows [0, 1) [1.1, 3.1) [3.2, 7.2) [7.3, 15.3) — then a pause of 40 s
    at = [0, 0.5, 1.1, 2.2, 3.0, 3.2, 5.0, 7.1, 7.3, 12.0, 55.3, 55.9, 56.4]
    # One message, decided in one batch: capture times this far in the past would otherwise let the service's
    # once-a-second pruning of old folds (by its own clock) reset the windows between messages.
    await publisher.publish(claims_event(*(w.observed(spoofer, t=t + int(k * s)) for k in at)))

    async def rows() -> list[tuple[float, int]]:
        conn = await asyncpg.connect(binding.database_url)
        try:
            found = await conn.fetch(
                "SELECT captured_at, count FROM binding.rejected_claims WHERE mac = $1 ORDER BY captured_at",
                spoofer,
            )
        finally:
            await conn.close()
        start = ns_to_datetime(t)
        return [(round((r["captured_at"] - start).total_seconds(), 1), r["count"]) for r in found]

    async def all_counted() -> bool:
        return sum(n for _, n in await rows()) == len(at)

    await eventually(all_counted, what="every frame counted")
    # 1 s, 2 s, 4 s, 8 s windows; after the pause, 1 s again (55.3 and 55.9), then 2 s (56.4).
    assert await rows() == [(0.0, 2), (1.1, 3), (3.2, 3), (7.3, 2), (55.3, 2), (56.4, 1)]
    await eventually(lambda: len(listener.of("havip.claim.rejected", w.havip.id)) == 6, what="one event per row")


async def test_a_flood_through_both_lanes_counts_every_frame_once_while_takeovers_go_on(
    binding: BindingSettings, publisher: Broker, listener: EventLog
) -> None:
    """Refusals are written after the decision lock (they commute with every other write); frames folded into an
    audit row while its INSERT is on its way are added once it is committed. Whatever the interleaving of the
    two lanes, every frame is counted exactly once, one row per second, and the failovers in between commit."""
    w = World()
    await publisher.publish_many(w.inventory())
    t = time.time_ns()
    # The lanes keep no order between them: the inventory is decided before the flood starts.
    await publisher.publish(w.claim(w.cvm2.mac, t=t - 1_000_000))
    await eventually(lambda: len(listener.of("havip.binding.changed", w.havip.id)) == 1, what="bound")
    spoofer = "02:ee:ee:ee:ee:78"
    sent = 0

    async def flood(i: int) -> None:
        nonlocal sent
        claims = [
            w.observed(spoofer, t=t + i * 1_000_000 + k).model_copy(update={"repeats": k + 1}) for k in range(5)
        ]
        sent += sum(c.repeats for c in claims)
        env = claims_event(*claims)
        await publisher.publish(env, routine=i % 2 == 0)

    for i in range(60):  # 60 ms of capture time: all within one second
        await flood(i)
        if i % 15 == 0:  # a takeover between the spoofer's frames
            holder = w.cvm1 if i % 30 == 0 else w.cvm2
            await publisher.publish(w.claim(holder.mac, t=t + i * 1_000_000 + 10))
    await eventually(lambda: len(listener.of("havip.binding.changed", w.havip.id)) == 5, what="the takeovers")

    async def audited() -> tuple[int, int]:
        conn = await asyncpg.connect(binding.database_url)
        try:
            row = await fetch_one(
                conn,
                "SELECT count(*), coalesce(sum(count), 0) FROM binding.rejected_claims WHERE mac = $1",
                spoofer,
            )
            return int(row[0]), int(row[1])
        finally:
            await conn.close()

    async def all_counted() -> bool:
        return (await audited())[1] >= sent

    await eventually(all_counted, what="every frame counted")  # late folds go out with the next write
    rows, frames = await audited()
    assert frames == sent
    # One row per second of capture time; two only where the lanes crossed at the start (a frame captured
    # before the row's first one starts a row of its own: docs/contract.md#refusals-are-folded).
    assert rows in (1, 2)
    assert len(listener.of("havip.claim.rejected", w.havip.id)) == rows
    assert len(listener.of("havip.claim.rejected", w.havip.id)) == 1


async def test_the_holders_refresh_updates_last_seen_at_most_once_a_second(
    binding: BindingSettings, publisher: Broker, listener: EventLog
) -> None:
    w = World()
    await publisher.publish_many(w.inventory())
    t = time.time_ns() - 3_000_000_000
    await publisher.publish(claims_event(w.observed(w.cvm1.mac, t=t)))
    await publisher.publish(claims_event(w.observed(w.cvm1.mac, t=t + 400_000_000)))  # too soon: not written
    await publisher.publish(claims_event(w.observed(w.cvm1.mac, t=t + 1_500_000_000)))
    marker = World()
    await publisher.publish_many(marker.inventory())
    await publisher.publish(marker.claim(marker.cvm1.mac))
    await eventually(lambda: len(listener.of("havip.binding.changed", marker.havip.id)) == 1, what="marker")
    row = await binding_row(binding.database_url, w.havip.id)
    assert row["last_claim_ns"] == t + 1_500_000_000
    assert row["last_seen_at"] == datetime.fromtimestamp((t + 1_500_000_000) / 1e9, UTC)
    assert row["sequence"] == 1


async def test_a_renewal_write_never_waits_never_goes_back_and_never_touches_a_new_holder(
    binding: BindingSettings,
) -> None:
    """Holders' refreshes are written outside the decision lock (the routine lane): their UPDATE must commute
    with any other write — skip a row another transaction holds, keep times monotonic, and leave alone a HAVIP
    whose holder changed meanwhile."""
    havip, holder, newcomer = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    seen = datetime(2026, 1, 1, tzinfo=UTC)
    conn = await asyncpg.connect(binding.database_url)
    other = await asyncpg.connect(binding.database_url)
    try:
        await conn.execute(
            """INSERT INTO binding.bindings (havip_id, address, instance_id, mac, last_claim_ns, last_seen_at)
               VALUES ($1, '198.51.100.200', $2, '02:00:00:00:c8:01', 100, $3)""",
            havip,
            holder,
            seen,
        )

        async def renew(instance: uuid.UUID, claim_ns: int, at: datetime) -> asyncpg.Record:
            await write_renewals(conn, [Renewal(havip, instance, claim_ns, at)])
            return await fetch_one(
                conn,
                "SELECT instance_id, last_claim_ns, last_seen_at FROM binding.bindings WHERE havip_id = $1",
                havip,
            )

        later = seen.replace(hour=1)
        assert tuple(await renew(holder, 50, seen.replace(year=2025))) == (holder, 100, seen)  # never back
        assert tuple(await renew(holder, 200, later)) == (holder, 200, later)
        # A transaction (a change of holder decided later) holds the row: the renewal skips it, at once.
        async with other.transaction():
            await other.execute("SELECT 1 FROM binding.bindings WHERE havip_id = $1 FOR UPDATE", havip)
            row = await asyncio.wait_for(renew(holder, 300, later.replace(hour=2)), 5)
            assert tuple(row) == (holder, 200, later)
            await other.execute(
                "UPDATE binding.bindings SET instance_id = $2, last_claim_ns = 400 WHERE havip_id = $1",
                havip,
                newcomer,
            )
        # The old holder's late refresh does not touch the new holder's row: one older than the new holder's claim
        # passes unnoticed; one newer was decided from a book that missed the change, and says so (its claim is
        # to be decided again: it may move the binding back).
        assert tuple(await renew(holder, 350, later.replace(hour=3))) == (newcomer, 400, later)
        with pytest.raises(WriteConflict):
            await renew(holder, 500, later.replace(hour=3))
        row = await fetch_one(
            conn,
            "SELECT instance_id, last_claim_ns, last_seen_at FROM binding.bindings WHERE havip_id = $1",
            havip,
        )
        assert tuple(row) == (newcomer, 400, later)
    finally:
        await other.close()
        await conn.close()


async def test_transitions_asked_for_again_are_replayed_as_first_published(
    binding: BindingSettings, publisher: Broker
) -> None:
    """havip.binding.replay_requested: the binding service publishes the transitions asked for again, as
    havip.binding.replayed, with the data each was first published with; and the newest of every HAVIP when
    asked (a reader's starting point)."""
    w = World()
    async with listening(binding, ["havip.binding.changed", "havip.binding.replayed"]) as log:
        await publisher.publish_many(w.inventory())
        for mac in (w.cvm1.mac, w.cvm2.mac, w.cvm1.mac):
            await publisher.publish(w.claim(mac))
            await asyncio.sleep(0.01)  # each claim newer than the last
        # the release comes by another queue than the claims: once they are decided
        await eventually(lambda: len(log.of("havip.binding.changed", w.havip.id)) == 3, what="three moves")
        await publisher.publish(events.envelope("havip.released", w.havip, "allocator"))
        await eventually(
            lambda: len(log.of("havip.binding.changed", w.havip.id)) == 4, what="three moves, a release"
        )
        request = events.ReplayRequested(
            ranges=[
                events.ReplayRange(havip_id=w.havip.id, first_sequence=2, last_sequence=3),
                events.ReplayRange(havip_id=w.havip.id, first_sequence=9, last_sequence=12),  # none such
                events.ReplayRange(havip_id=uuid.uuid4(), first_sequence=1, last_sequence=1),  # no such HAVIP
            ]
        )
        await publisher.publish(events.envelope("havip.binding.replay_requested", request, "allocator"))
        await eventually(lambda: len(log.of("havip.binding.replayed", w.havip.id)) == 2, what="two replayed")
        first = log.of("havip.binding.changed", w.havip.id)
        assert log.of("havip.binding.replayed", w.havip.id) == first[1:3]  # the same data, in order
        for data in log.of("havip.binding.replayed"):
            events.BindingChanged.model_validate(data)  # what is built without validation validates

        newest = events.ReplayRequested(newest_of_every_havip=True)
        await publisher.publish(events.envelope("havip.binding.replay_requested", newest, "allocator"))
        await eventually(lambda: len(log.of("havip.binding.replayed", w.havip.id)) == 3, what="the newest")
        assert log.of("havip.binding.replayed", w.havip.id)[2] == first[3]  # the release, though it is gone
        assert first[3]["reason"] == "release"


def hop_totals() -> dict[str, tuple[float, float]]:
    """The binding's havip_claim_hop_seconds: hop → (count, sum), from this process's registry."""
    value = REGISTRY.get_sample_value
    return {
        hop: (
            value("havip_claim_hop_seconds_count", {"hop": hop}) or 0,
            value("havip_claim_hop_seconds_sum", {"hop": hop}) or 0,
        )
        for hop in BINDING_HOPS
    }


async def test_a_takeover_is_timed_at_each_of_the_bindings_hops_and_a_refresh_is_not(
    binding: BindingSettings, publisher: Broker, listener: EventLog
) -> None:
    w = World()
    await publisher.publish_many(w.inventory())
    await publisher.publish(w.claim(w.cvm1.mac))
    await eventually(lambda: len(listener.of("havip.binding.changed", w.havip.id)) == 1, what="cvm1 holds it")
    await eventually(lambda: hop_totals()["relay_confirmed"][0] > 0, what="the first takeover timed to its end")
    before = hop_totals()
    # Sent 50 ms ago by the watcher's clock (the envelope's occurred_at): the hop `received` starts there.
    sent = datetime.now(UTC) - timedelta(milliseconds=50)
    await publisher.publish(w.claim(w.cvm2.mac).model_copy(update={"occurred_at": sent}))
    await eventually(lambda: len(listener.of("havip.binding.changed", w.havip.id)) == 2, what="cvm2 holds it")
    await eventually(lambda: hop_totals()["relay_confirmed"][0] > before["relay_confirmed"][0], what="relay timed")
    await publisher.publish(w.claim(w.cvm2.mac, t=time.time_ns()))  # the holder's refresh: moves nothing
    await publisher.publish(w.claim("02:00:00:00:00:99"))  # refused: moves nothing
    await eventually(lambda: len(listener.of("havip.claim.rejected", w.havip.id)) == 1, what="the refusal")
    after = hop_totals()
    hop = {name: after[name][1] - before[name][1] for name in BINDING_HOPS}
    assert {name: after[name][0] - before[name][0] for name in BINDING_HOPS} == dict.fromkeys(BINDING_HOPS, 1)
    assert hop["received"] >= 0.05
    # The hops up to `stamped` end exactly at the transition's committed_at (the database's clock).
    [_, moved] = await transitions(binding.database_url, w.havip.id)
    stamped = sent.timestamp() + hop["received"] + hop["decided"] + hop["stamped"]
    assert abs(stamped - moved["committed_at"].timestamp()) < 5e-6
    assert all(value >= 0 for value in hop.values())
