"""Two binding processes briefly deciding for the same HAVIPs (one frozen and thawed, a replica whose queue moved
on while its batch was under way): each `BindingService` here has its own book, as two replicas do, on one
database. A write decided from a stale book does not apply; the batch is decided again from what is committed —
no claim dead-lettered, no transition lost or written twice, one `havip.binding.changed` per sequence."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Sequence
from ipaddress import IPv4Address

import asyncpg
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from services.binding.service import BindingService
from shared import events
from tests.integration.binding_support import (
    FakeClock,
    World,
    binding_row,
    binding_row_if_any,
    claims_event,
    delivery,
    transitions,
)


def conflicts_counted() -> float:
    return REGISTRY.get_sample_value("havip_binding_write_conflicts_total") or 0.0


async def changed_events(pool: asyncpg.Pool, havip_id: uuid.UUID) -> list[int]:
    """The sequences of the HAVIP's `havip.binding.changed` events in the outbox (no relay runs here)."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT body FROM binding.outbox WHERE routing_key = 'havip.binding.changed' ORDER BY id"
        )
    data = [json.loads(row["body"])["data"] for row in rows]
    return [d["sequence"] for d in data if d["havip_id"] == str(havip_id)]


async def replica(pool: asyncpg.Pool, clock: FakeClock) -> BindingService:
    service = BindingService(pool, clock=clock)
    await service.load()
    return service


async def claim(service: BindingService, w: World, mac: str, at_ns: int) -> None:
    await service.handle([delivery(w.claim(mac, t=at_ns))])


async def assert_history_is_whole(pool: asyncpg.Pool, dsn: str, havip_id: uuid.UUID) -> list[asyncpg.Record]:
    """History 1..n without a gap or a repeat, one event per sequence, and the binding row at n."""
    history = await transitions(dsn, havip_id)
    sequences = [t["sequence"] for t in history]
    assert sequences == list(range(1, len(history) + 1))
    assert await changed_events(pool, havip_id) == sequences
    row = await binding_row_if_any(dsn, havip_id)
    if row is not None:
        assert row["sequence"] == len(history)
    return history


async def test_a_claim_decided_from_a_stale_book_is_decided_again_against_what_is_committed(
    pool: asyncpg.Pool, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    w = World()
    clock = FakeClock()
    a = await replica(pool, clock)
    await a.handle([delivery(e) for e in w.inventory()])
    b = await replica(pool, clock)  # B's book: the HAVIP unbound, at sequence 0
    t = clock.wall_ns() - 30_000_000_000
    await claim(a, w, w.cvm1.mac, t)  # A: cvm1 takes it (1)
    await claim(a, w, w.cvm2.mac, t + 2_000_000_000)  # A: cvm2 takes over (2)
    before = conflicts_counted()

    with caplog.at_level(logging.WARNING, logger="services.binding.service"):
        await claim(b, w, w.cvm1.mac, t + 4_000_000_000)  # B, from sequence 0: a write that cannot apply
    assert conflicts_counted() == before + 1
    assert len([r for r in caplog.records if "another process" in r.getMessage()]) == 1

    history = await assert_history_is_whole(pool, database_url, w.havip.id)
    assert [h["to_instance_id"] for h in history] == [w.cvm1.id, w.cvm2.id, w.cvm1.id]
    row = await binding_row(database_url, w.havip.id)
    assert row["instance_id"] == w.cvm1.id  # the last authorised claimant by capture time
    assert (b.book.bindings[w.havip.id].instance_id, b.book.bindings[w.havip.id].sequence) == (w.cvm1.id, 3)


async def test_an_older_claim_decided_from_a_stale_book_changes_nothing(
    pool: asyncpg.Pool, database_url: str
) -> None:
    """B's book knows neither A's takeover nor its newer claim: B's takeover from an older claim is stale
    against what is committed."""
    w = World()
    clock = FakeClock()
    a = await replica(pool, clock)
    await a.handle([delivery(e) for e in w.inventory()])
    t = clock.wall_ns() - 30_000_000_000
    await claim(a, w, w.cvm1.mac, t)
    b = await replica(pool, clock)  # B: cvm1 holds (1)
    await claim(a, w, w.cvm2.mac, t + 5_000_000_000)  # A: cvm2 (2), captured after …
    await claim(b, w, w.cvm2.mac, t + 3_000_000_000)  # … this claim B sees: cvm2 again, but older
    await claim(b, w, w.cvm1.mac, t + 4_000_000_000)  # and cvm1's, older than A's too: changes nothing

    history = await assert_history_is_whole(pool, database_url, w.havip.id)
    assert [h["to_instance_id"] for h in history] == [w.cvm1.id, w.cvm2.id]
    row = await binding_row(database_url, w.havip.id)
    assert (row["instance_id"], row["last_claim_ns"]) == (w.cvm2.id, t + 5_000_000_000)


async def test_a_refresh_from_a_stale_book_that_finds_another_holder_is_decided_again(
    pool: asyncpg.Pool, database_url: str
) -> None:
    """B still sees cvm1 holding and takes its claim for a refresh; A had moved the HAVIP to cvm2 with an older
    claim: the refresh does not apply, and cvm1's newer claim takes the HAVIP back."""
    w = World()
    clock = FakeClock()
    a = await replica(pool, clock)
    await a.handle([delivery(e) for e in w.inventory()])
    t = clock.wall_ns() - 30_000_000_000
    await claim(a, w, w.cvm1.mac, t)
    b = await replica(pool, clock)
    await claim(a, w, w.cvm2.mac, t + 2_000_000_000)
    before = conflicts_counted()
    await claim(b, w, w.cvm1.mac, t + 4_000_000_000)  # for B's book a refresh, written after the lock
    assert conflicts_counted() == before + 1

    history = await assert_history_is_whole(pool, database_url, w.havip.id)
    assert [h["to_instance_id"] for h in history] == [w.cvm1.id, w.cvm2.id, w.cvm1.id]
    assert (await binding_row(database_url, w.havip.id))["instance_id"] == w.cvm1.id


async def test_a_release_committed_by_another_process_is_neither_undone_nor_followed(
    pool: asyncpg.Pool, database_url: str
) -> None:
    """A releases the HAVIP. B — one book that holds it, one that never knew it — then handles a claim for it and
    the allocation again (a redelivery): nothing comes back, no history row follows the release."""
    w = World()
    clock = FakeClock()
    a = await replica(pool, clock)
    await a.handle([delivery(e) for e in w.inventory()[:3]])  # the instances
    b_unaware = await replica(pool, clock)
    await a.handle([delivery(w.inventory()[3])])  # the HAVIP
    b = await replica(pool, clock)
    t = clock.wall_ns() - 30_000_000_000
    await claim(a, w, w.cvm1.mac, t)
    await a.handle([delivery(events.envelope("havip.released", w.havip, "allocator"))])

    await claim(b, w, w.cvm2.mac, t + 2_000_000_000)
    await b_unaware.handle([delivery(events.envelope("havip.allocated", w.havip, "allocator"))])
    await claim(b_unaware, w, w.cvm2.mac, t + 3_000_000_000)

    history = await assert_history_is_whole(pool, database_url, w.havip.id)
    assert [h["reason"] for h in history] == ["claim", "release"]
    assert await binding_row_if_any(database_url, w.havip.id) is None
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM binding.havips WHERE id = $1", w.havip.id) == 0
    assert w.havip.id not in b.book.bindings
    assert w.havip.id not in b_unaware.book.bindings


async def test_a_holder_unknown_to_a_stale_book_is_still_released_by_its_deregistration(
    pool: asyncpg.Pool, database_url: str
) -> None:
    """B's book has the HAVIP unbound; A bound it to cvm1. B then handles cvm1's deregistration, and the narrowing
    of the candidates to cvm1 after A moved the HAVIP to cvm2: each ends the binding A committed."""
    w1, w2 = World(), World()
    clock = FakeClock()
    a = await replica(pool, clock)
    await a.handle([delivery(e) for e in w1.inventory() + w2.inventory()])
    b = await replica(pool, clock)
    t = clock.wall_ns() - 30_000_000_000
    await claim(a, w1, w1.cvm1.mac, t)
    await claim(a, w2, w2.cvm2.mac, t)

    await b.handle([delivery(events.envelope("instance.deregistered", w1.cvm1, "allocator"))])
    narrowed = w2.havip.model_copy(update={"candidates": [w2.cvm1.id]})
    await b.handle([delivery(events.envelope("havip.updated", narrowed, "allocator"))])

    for w, cause in ((w1, "instance_deregistered"), (w2, "candidates_changed")):
        history = await assert_history_is_whole(pool, database_url, w.havip.id)
        assert [(h["reason"], h["cause"]) for h in history] == [("claim", None), ("release", cause)]
        assert (await binding_row(database_url, w.havip.id))["instance_id"] is None


async def test_a_batch_with_one_conflicting_havip_is_decided_again_whole(
    pool: asyncpg.Pool, database_url: str
) -> None:
    """B's batch carries claims for two HAVIPs; only one of them was changed by A. Nothing of the first attempt
    is written; the second writes both, each once."""
    w1, w2 = World(), World()
    clock = FakeClock()
    a = await replica(pool, clock)
    await a.handle([delivery(e) for e in w1.inventory() + w2.inventory()])
    b = await replica(pool, clock)
    t = clock.wall_ns() - 30_000_000_000
    await claim(a, w1, w1.cvm1.mac, t)
    await b.handle(
        [delivery(claims_event(w1.observed(w1.cvm2.mac, t=t + 1_000), w2.observed(w2.cvm1.mac, t=t + 2_000)))]
    )
    for w, holders in ((w1, [w1.cvm1.id, w1.cvm2.id]), (w2, [w2.cvm1.id])):
        history = await assert_history_is_whole(pool, database_url, w.havip.id)
        assert [h["to_instance_id"] for h in history] == holders


async def test_two_services_writing_the_same_havips_at_the_same_time_commit_each_transition_once(
    pool: asyncpg.Pool, database_url: str
) -> None:
    """Both services decide at once, each a batch of claims for two HAVIPs (in opposite orders: their row locks
    cross). Every claim is a change of holder from either book's view (four instances in turn); the later claim of
    each round is B's. Whatever order the transactions commit in, each HAVIP ends with B's last claimant, and its
    history and events are whole."""
    world = _Small(instances=4)
    clock = FakeClock()
    a = await replica(pool, clock)
    await a.handle([delivery(e) for e in world.inventory()])
    b = await replica(pool, clock)
    x, y = 0, 1
    t = clock.wall_ns() - 60_000_000_000
    rounds = 12
    before = conflicts_counted()
    for r in range(rounds):
        at = t + r * 2_000_000_000
        first, second = 2 * r % 4, (2 * r + 1) % 4
        await asyncio.gather(
            a.handle([delivery(claims_event(world.observed(first, x, at), world.observed(first, y, at + 1)))]),
            b.handle(
                [delivery(claims_event(world.observed(second, y, at + 10), world.observed(second, x, at + 11)))]
            ),
        )
    assert conflicts_counted() >= before + rounds  # each round, the second write was decided from a stale book
    last = (2 * (rounds - 1) + 1) % 4
    for havip in world.havips:
        await assert_history_is_whole(pool, database_url, havip.id)
        assert (await binding_row(database_url, havip.id))["instance_id"] == world.instances[last].id


# A story: (which service, which instance claims, which HAVIP), claims captured 0.7 s apart in this order.
stories = st.lists(st.tuples(st.integers(0, 1), st.integers(0, 2), st.integers(0, 1)), min_size=1, max_size=16)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(story=stories)
async def test_two_services_taking_claims_in_turn_commit_what_one_service_would(
    pool: asyncpg.Pool, database_url: str, story: list[tuple[int, int, int]]
) -> None:
    """Whichever of two services (each with its own book, loaded once at the start) handles each claim, the
    database ends as if one service had handled them all."""
    clock = FakeClock()

    async def run(services: Sequence[BindingService], world: _Small) -> list[list[tuple[int, int]]]:
        t = clock.wall_ns() - 60_000_000_000
        for step, (which, who, havip) in enumerate(story):
            observed = world.observed(who, havip, t + step * 700_000_000)
            await services[which % len(services)].handle([delivery(claims_event(observed))])
        histories = []
        for allocated in world.havips:
            history = await assert_history_is_whole(pool, database_url, allocated.id)
            histories.append([(h["sequence"], world.index_of(h["to_instance_id"])) for h in history])
        return histories

    alone = _Small()
    one = await replica(pool, clock)
    await one.handle([delivery(e) for e in alone.inventory()])
    expected = await run([one], alone)

    shared = _Small()
    a = await replica(pool, clock)
    await a.handle([delivery(e) for e in shared.inventory()])
    b = await replica(pool, clock)
    before = conflicts_counted()
    assert await run([a, b], shared) == expected
    event("a write conflicted" if conflicts_counted() > before else "no write conflicted")


class _Small:
    """Three instances (or as many as asked for) and two HAVIPs in one subnet."""

    def __init__(self, instances: int = 3) -> None:
        vpc, subnet = uuid.uuid4(), uuid.uuid4()
        self.instances = [
            events.InstanceData(
                id=uuid.uuid4(), vpc_id=vpc, subnet_id=subnet, name=f"cvm{i}",
                private_ip=IPv4Address("192.0.2.10") + i, mac="02:" + uuid.uuid4().bytes[:5].hex(":"),
            )
            for i in range(instances)
        ]  # fmt: skip
        self.havips = [
            events.HavipData(
                id=uuid.uuid4(), vpc_id=vpc, subnet_id=subnet, name=None,
                address=IPv4Address("198.18.0.0") + (uuid.uuid4().int % 60_000), candidates=[],
            )
            for _ in range(2)
        ]  # fmt: skip

    def inventory(self) -> list[events.Envelope]:
        envs = [events.envelope("instance.registered", i, "allocator") for i in self.instances]
        return envs + [events.envelope("havip.allocated", h, "allocator") for h in self.havips]

    def observed(self, who: int, havip: int, at_ns: int) -> events.ObservedClaim:
        mac, address = self.instances[who].mac, self.havips[havip].address
        return events.ObservedClaim(
            claim_id=uuid.uuid4(), kind="garp_request", sender_mac=mac, eth_src=mac, sender_ip=address,
            target_ip=address, captured_at=at_ns,
        )  # fmt: skip

    def index_of(self, instance_id: uuid.UUID | None) -> int:
        return next((i for i, x in enumerate(self.instances) if x.id == instance_id), -1)
