"""The allocator's own view of bindings (services/allocator/binding_view), fed with the binding service's events
on the real RabbitMQ of the module's vhost and kept in the real Postgres: idempotent on redelivery, gaps shown at
once and repaired by a replay, stale condition edges ignored, poison dead-lettered, the release guard decided
under the view's own lock, and the freshness exported."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import asyncpg
import httpx
import pytest

from shared.events import envelope
from tests.integration.allocator_support import (
    BindingStandIn,
    Json,
    error,
    http_client,
    make_havip,
    make_instance,
    make_subnet,
    make_vpc,
    ok,
    running_app,
    wait_history,
    wait_shown,
)
from tests.listener import EventLog
from tests.metrics_text import value
from tests.waiting import eventually


@pytest.fixture(scope="module")
async def view_client(database_url: str, amqp_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """The allocator, repairing gaps quickly: a gap older than 0.2 s is asked for, again after 1 s."""
    options: dict[str, Any] = {
        "view_gap_grace_s": 0.2,
        "view_repair_retry_s": 1.0,
        "view_maintenance_interval_s": 0.1,
    }
    async with running_app(database_url, amqp_url, quota=100, **options) as app, http_client(app) as client:
        yield client


async def metric(client: httpx.AsyncClient, name: str, **labels: str) -> float:
    return value((await client.get("/metrics")).text, name, labels) or 0.0


async def world(client: httpx.AsyncClient, cidr16: str) -> tuple[Json, Json, Json]:
    """A HAVIP and two instances of its subnet (`cidr16` is the VPC's /16; the subnet its first /24)."""
    vpc = await make_vpc(client, cidr16)
    prefix = cidr16.rsplit(".", 2)[0]
    subnet = await make_subnet(client, vpc["id"], f"{prefix}.1.0/24")
    a = await make_instance(client, subnet["id"], f"{prefix}.1.10")
    b = await make_instance(client, subnet["id"], f"{prefix}.1.11")
    return await make_havip(client, subnet["id"]), a, b


async def test_a_redelivered_transition_is_taken_once(
    view_client: httpx.AsyncClient, binding_events: BindingStandIn
) -> None:
    havip, a, b = await world(view_client, "10.81.0.0/16")
    duplicates = await metric(view_client, "havip_view_events_total", event="transition", outcome="duplicate")
    first = await binding_events.move(havip, a)
    same = envelope("havip.binding.changed", first, "binding")
    await binding_events.broker.publish(same)  # the same transition under another event id (a republish)
    await binding_events.broker.publish(same)  # and that message once more (a redelivery)
    await binding_events.move(havip, b)
    history = await wait_history(view_client, havip["id"], 2)
    shown = await wait_shown(view_client, havip, "on b", bound_instance_id=b["id"])
    assert [(t["sequence"], t["to_instance_id"]) for t in history] == [(2, b["id"]), (1, a["id"])]
    assert shown["state"] == "BOUND"
    assert await metric(view_client, "havip_view_events_total", event="transition", outcome="duplicate") >= (
        duplicates + 2
    )


async def test_a_gap_shows_the_newest_state_at_once_and_is_repaired_by_a_replay(
    view_client: httpx.AsyncClient, binding_events: BindingStandIn, events: EventLog
) -> None:
    havip, a, b = await world(view_client, "10.82.0.0/16")
    gaps = await metric(view_client, "havip_view_sequence_gaps_total")
    await binding_events.move(havip, a)
    lost = binding_events.change(havip, b, sequence=2)  # published by the binding service, lost on the way
    await binding_events.move(havip, a, sequence=3, previous=b)

    # The newest state is shown at once; the history shows what arrived.
    await wait_history(view_client, havip["id"], 2)
    shown = await wait_shown(view_client, havip, "on a after the gap", state="BOUND")
    assert shown["bound_instance_id"] == a["id"]
    # Counted after the commit that the API already shows: wait for it rather than race it.
    await eventually(lambda: _equals(metric(view_client, "havip_view_sequence_gaps_total"), gaps + 1), what="gap")

    # The allocator asks the binding service for the missing transition…
    request = await events.wait_for_type("havip.binding.replay_requested")
    ranges = [(r["havip_id"], r["first_sequence"], r["last_sequence"]) for r in request.data["ranges"]]
    assert (havip["id"], 2, 2) in ranges
    assert await metric(view_client, "havip_view_open_gaps") >= 1

    # …which publishes it again: the history is whole, the state unchanged.
    await binding_events.publish("havip.binding.replayed", lost)
    history = await wait_history(view_client, havip["id"], 3)
    assert [(t["sequence"], t["to_instance_id"]) for t in history] == [(3, a["id"]), (2, b["id"]), (1, a["id"])]
    assert (await wait_shown(view_client, havip, "still on a"))["bound_instance_id"] == a["id"]

    async def no_open_gap() -> bool:
        return await metric(view_client, "havip_view_open_gaps") == 0

    await eventually(no_open_gap, what="the gap closed")


async def test_an_older_condition_edge_does_not_undo_a_newer_one(
    view_client: httpx.AsyncClient, binding_events: BindingStandIn
) -> None:
    havip, a, _ = await world(view_client, "10.83.0.0/16")
    await binding_events.move(havip, a)
    t = datetime.now(UTC)
    await binding_events.condition(havip, "flapping", True, at=t + timedelta(seconds=2))
    await binding_events.condition(havip, "flapping", False, at=t + timedelta(seconds=1))  # late, older
    await binding_events.condition(havip, "split_brain", True, at=t)
    await binding_events.condition(havip, "split_brain", False, at=t + timedelta(seconds=3))
    # flapping=True, split_brain=False holds already after the first event: wait for the late, older one to be
    # taken (and dropped as stale) before looking again.
    await wait_shown(view_client, havip, "edges applied", flapping=True, split_brain=False)

    async def stale_dropped() -> bool:
        return await metric(view_client, "havip_view_events_total", event="condition", outcome="stale") >= 1

    await eventually(stale_dropped, what="the older edge dropped as stale")
    shown = await wait_shown(view_client, havip, "edges applied", flapping=True, split_brain=False)
    assert shown["state"] == "BOUND"


async def test_a_message_that_can_never_be_taken_is_dead_lettered_and_the_view_goes_on(
    view_client: httpx.AsyncClient, binding_events: BindingStandIn, amqp_url: str
) -> None:
    havip, a, _ = await world(view_client, "10.84.0.0/16")
    poison = uuid.uuid4()
    await binding_events.broker.publish_encoded("havip.binding.changed", b'{"not": "an event"}', poison)
    await binding_events.move(havip, a)
    await wait_shown(view_client, havip, "bound after the poison", state="BOUND")
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        dead = await channel.declare_queue("havip.dead", durable=True)
        found: list[str | None] = []

        async def dead_lettered() -> bool:
            message = await dead.get(no_ack=True, fail=False)
            if message is not None:
                found.append(message.message_id)
            return str(poison) in found

        await eventually(dead_lettered, what="the poison message in havip.dead")
    finally:
        await connection.close()


async def waiting_for_a_lock(database_url: str) -> bool:
    """Whether a session of the database waits for a lock (asked on a connection of its own: a transaction sees
    the activity of the others as it was at its first look)."""
    conn = await asyncpg.connect(database_url)
    try:
        waiting: int = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
    finally:
        await conn.close()
    return waiting > 0


async def test_release_decides_bound_on_the_view_under_its_lock(
    view_client: httpx.AsyncClient, database_url: str
) -> None:
    """A batch of binding events in flight (its transaction holds the HAVIP's record) makes a release wait; the
    release then decides on what the batch committed."""
    havip, a, _ = await world(view_client, "10.85.0.0/16")
    conn = await asyncpg.connect(database_url)
    try:
        release: asyncio.Task[httpx.Response] | None = None
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO allocator.view_bindings (havip_id) VALUES ($1) ON CONFLICT DO NOTHING",
                uuid.UUID(havip["id"]),
            )
            await conn.execute(
                "SELECT 1 FROM allocator.view_bindings WHERE havip_id = $1 FOR UPDATE", uuid.UUID(havip["id"])
            )
            release = asyncio.create_task(view_client.delete(f"/v1/havips/{havip['id']}"))
            await eventually(lambda: waiting_for_a_lock(database_url), what="the release waiting for the record")
            assert not release.done()
            await conn.execute(
                """UPDATE allocator.view_bindings SET sequence = 1, instance_id = $2, mac = $3::macaddr
                   WHERE havip_id = $1""",
                uuid.UUID(havip["id"]),
                uuid.UUID(a["id"]),
                a["mac"],
            )
        error(await release, 409, "HAVIP_BOUND")
    finally:
        await conn.close()
    assert ok(await view_client.get(f"/v1/havips/{havip['id']}"))["state"] == "BOUND"


async def test_the_freshness_of_the_view_is_exported(
    view_client: httpx.AsyncClient, binding_events: BindingStandIn
) -> None:
    havip, a, _ = await world(view_client, "10.86.0.0/16")
    before = await metric(view_client, "havip_view_delay_seconds_count", event="transition")
    await binding_events.move(havip, a)
    await wait_shown(view_client, havip, "bound", state="BOUND")
    await eventually(
        lambda: _equals(metric(view_client, "havip_view_delay_seconds_count", event="transition"), before + 1),
        what="the delay observed",
    )
    text = (await view_client.get("/metrics")).text
    assert 'havip_view_delay_seconds_bucket{event="transition",le="0.01"}' in text
    spec = ok(await view_client.get("/openapi.json"))
    assert "eventually consistent" in spec["info"]["description"]
    assert "havip_view_delay_seconds" in spec["info"]["description"]


async def _equals(value: Any, expected: float) -> bool:
    return bool(await value == expected)
