"""The allocator's view fed by the real binding service (both in-process, real Postgres and RabbitMQ): what the
binding commits, the allocator's API shows; and when the allocator lost events (its queue purged while it was
down), the gap is found at the next transition and repaired by the binding's replay, so that the history the
API shows equals the binding's own."""

from __future__ import annotations

import uuid
from typing import Any

import aio_pika
import asyncpg
import httpx

from services.binding.settings import BindingSettings
from shared.messaging import Broker
from tests.integration.allocator_support import (
    Json,
    all_pages,
    http_client,
    make_havip,
    make_instance,
    make_subnet,
    make_vpc,
    publish_claim,
    running_app,
    wait_shown,
)
from tests.waiting import eventually

FAST_REPAIR: dict[str, Any] = {
    "view_gap_grace_s": 0.2,
    "view_repair_retry_s": 1.0,
    "view_maintenance_interval_s": 0.1,
}


async def binding_history(database_url: str, havip_id: str) -> list[tuple[int, str | None, str | None]]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            """SELECT sequence, from_instance_id::text, to_instance_id::text FROM binding.transitions
               WHERE havip_id = $1 ORDER BY sequence DESC""",
            uuid.UUID(havip_id),
        )
    finally:
        await conn.close()
    return [(r[0], r[1], r[2]) for r in rows]


async def claim_until_bound(watcher: Broker, database_url: str, havip: Json, instance: Json) -> None:
    """The instance claims the HAVIP until the binding has bound it: the binding learns the HAVIP from the
    allocator's events, and claims before that name no HAVIP."""

    async def bound() -> bool:
        if await binding_history(database_url, havip["id"]):
            return True
        await publish_claim(watcher, havip, instance)
        return False

    await eventually(bound, interval=0.2, what=f"{instance['id']}'s claim bound once the binding knows the HAVIP")


async def api_history(client: httpx.AsyncClient, havip_id: str) -> list[tuple[int, str | None, str | None]]:
    items = await all_pages(client, f"/v1/havips/{havip_id}/transitions")
    return [(t["sequence"], t["from_instance_id"], t["to_instance_id"]) for t in items]


async def test_what_the_binding_commits_the_api_shows_and_lost_events_are_replayed(
    binding: BindingSettings, watcher: Broker, database_url: str, amqp_url: str
) -> None:
    async with running_app(database_url, amqp_url, quota=10, **FAST_REPAIR) as app, http_client(app) as client:
        vpc = await make_vpc(client, "10.90.0.0/16")
        subnet = await make_subnet(client, vpc["id"], "10.90.1.0/24")
        cvm1 = await make_instance(client, subnet["id"], "10.90.1.11")
        cvm2 = await make_instance(client, subnet["id"], "10.90.1.12")
        havip = await make_havip(client, subnet["id"])

        await claim_until_bound(watcher, database_url, havip, cvm1)
        shown = await wait_shown(client, havip, "bound to cvm1", state="BOUND")
        assert shown["bound_instance_id"] == cvm1["id"]

    # The allocator is down; two failovers happen; an operator purges its queue: those events are lost to it.
    # Each claim is taken once the one before has moved the HAVIP: claims decided together would be one move.
    async def transitions(count: int) -> bool:
        return len(await binding_history(database_url, havip["id"])) == count

    await publish_claim(watcher, havip, cvm2)
    await eventually(lambda: transitions(2), what="the binding's move to cvm2")
    await publish_claim(watcher, havip, cvm1)
    await eventually(lambda: transitions(3), what="the binding's move back to cvm1")
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue("allocator.events", passive=True)

        async def published_to_the_allocator() -> bool:
            declared = await channel.declare_queue("allocator.events", passive=True)
            return (declared.declaration_result.message_count or 0) >= 2

        await eventually(published_to_the_allocator, what="the two events waiting for the allocator")
        await queue.purge()
    finally:
        await connection.close()

    async with running_app(database_url, amqp_url, quota=10, **FAST_REPAIR) as app, http_client(app) as client:
        await publish_claim(watcher, havip, cvm2)  # sequence 4: the allocator sees 2 and 3 are missing
        shown = await wait_shown(client, havip, "bound to cvm2", bound_instance_id=cvm2["id"])
        assert shown["state"] == "BOUND"

        expected = await binding_history(database_url, havip["id"])
        assert [s for s, _, _ in expected] == [4, 3, 2, 1]

        async def same_history() -> bool:
            return await api_history(client, havip["id"]) == expected

        await eventually(same_history, what="the history repaired by the binding's replay")


async def test_a_view_that_starts_after_the_binding_starts_from_its_state(
    binding: BindingSettings, watcher: Broker, database_url: str, amqp_url: str
) -> None:
    """An existing deployment getting the view: bindings the view never saw. At its first start the view asks for
    the newest transition of every HAVIP, shows the holder, and fills the history before it as a gap."""
    async with running_app(database_url, amqp_url, quota=10, **FAST_REPAIR) as app, http_client(app) as client:
        vpc = await make_vpc(client, "10.91.0.0/16")
        subnet = await make_subnet(client, vpc["id"], "10.91.1.0/24")
        cvm1 = await make_instance(client, subnet["id"], "10.91.1.11")
        cvm2 = await make_instance(client, subnet["id"], "10.91.1.12")
        havip = await make_havip(client, subnet["id"])

    async def bound_by_the_binding(count: int) -> bool:
        return len(await binding_history(database_url, havip["id"])) >= count

    await claim_until_bound(watcher, database_url, havip, cvm1)
    await publish_claim(watcher, havip, cvm2)
    await eventually(lambda: bound_by_the_binding(2), what="the binding's second transition")
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        await (await channel.declare_queue("allocator.events", passive=True)).purge()
    finally:
        await connection.close()
    conn = await asyncpg.connect(database_url)
    try:  # as if the view had never existed on this database
        await conn.execute("DELETE FROM allocator.view_seed")
        await conn.execute("DELETE FROM allocator.view_transitions WHERE havip_id = $1", uuid.UUID(havip["id"]))
        await conn.execute("DELETE FROM allocator.view_bindings WHERE havip_id = $1", uuid.UUID(havip["id"]))
    finally:
        await conn.close()

    async with running_app(database_url, amqp_url, quota=10, **FAST_REPAIR) as app, http_client(app) as client:
        shown = await wait_shown(client, havip, "the binding's holder", bound_instance_id=cvm2["id"])
        assert shown["state"] == "BOUND"
        expected = await binding_history(database_url, havip["id"])

        async def same_history() -> bool:
            return await api_history(client, havip["id"]) == expected

        await eventually(same_history, what="the history before the view's start, asked for as a gap")
