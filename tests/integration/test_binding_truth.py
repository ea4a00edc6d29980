"""One truth: whatever step of a batch fails — deciding it, or any statement of its transaction — the
binding service's in-memory book ends up equal to what Postgres holds, and a retry of the batch (as the
consumer retries it) commits exactly what a run without the failure would have committed.

A property test on the real Postgres: hypothesis draws a story (inventory and claims from three instances
over two HAVIPs, releases, deregistrations, narrowed candidate lists) cut into batches, and a failure injected
at one database call; after every batch the book is compared with the database."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from ipaddress import IPv4Address
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from services.binding.clock import SystemClock
from services.binding.domain import BindingBook, Claim
from services.binding.repository import load_book
from services.binding.service import BindingService
from shared import events
from shared.messaging import Delivery
from tests.integration.binding_support import FakeClock, InterceptingPool, delivery


class InjectedFailure(ConnectionError):
    """What the database does to a call at the chosen step (a connection lost)."""


class FaultyPool(InterceptingPool):
    """The real pool; the `fail_at`-th step (database call or decision, counted from `arm`) raises."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        super().__init__(pool)
        self.calls = 0
        self.fail_at = 0

    def arm(self, fail_at: int) -> None:
        self.calls, self.fail_at = 0, fail_at

    def step(self) -> None:
        """One step of a batch (a database call, or a decision): the armed one fails."""
        self.calls += 1
        if self.calls == self.fail_at:
            raise InjectedFailure(f"injected at step {self.calls}")

    def before(self) -> None:
        self.step()


# A step of the story: (what, who, havip) — who is an instance index 0..2, havip 0..1.
steps = st.lists(
    st.tuples(
        st.sampled_from(["claim", "claim", "claim", "claim", "narrow", "deregister", "release"]),
        st.integers(0, 2),
        st.integers(0, 1),
    ),
    min_size=1,
    max_size=24,
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(story=steps, cuts=st.lists(st.integers(1, 8), min_size=1, max_size=6), fail_at=st.integers(1, 12))
# The inventory and two claims in one batch; the second decision fails after the first moved the binding.
@example(story=[("claim", 0, 0), ("claim", 1, 0)], cuts=[7], fail_at=2)
async def test_the_book_always_equals_the_database(
    pool: asyncpg.Pool, story: list[tuple[str, int, int]], cuts: list[int], fail_at: int
) -> None:
    vpc, subnet = uuid.uuid4(), uuid.uuid4()
    instances = [
        events.InstanceData(
            id=uuid.uuid4(), vpc_id=vpc, subnet_id=subnet, name=f"cvm{i}",
            private_ip=IPv4Address("192.0.2.10") + i, mac="02:" + uuid.uuid4().bytes[:5].hex(":"),
        )
        for i in range(3)
    ]  # fmt: skip
    havips = [
        events.HavipData(
            id=uuid.uuid4(), vpc_id=vpc, subnet_id=subnet, name=None,
            address=IPv4Address("198.18.0.0") + (uuid.uuid4().int % 60_000), candidates=[],
        )
        for _ in range(2)
    ]  # fmt: skip
    envs: list[events.Envelope] = [events.envelope("instance.registered", i, "allocator") for i in instances]
    envs += [events.envelope("havip.allocated", h, "allocator") for h in havips]
    t = time.time_ns() - 60_000_000_000
    for what, who, which in story:
        t += 700_000_000
        if what == "claim":
            claim = events.ObservedClaim(
                claim_id=uuid.uuid4(), kind="garp_request", sender_mac=instances[who].mac,
                eth_src=instances[who].mac, sender_ip=havips[which].address, target_ip=havips[which].address,
                captured_at=t,
            )  # fmt: skip
            envs.append(
                events.envelope(
                    events.CLAIMS_EVENT,
                    events.ClaimsObserved(watcher_id="w", interface="eth0", claims=[claim]),
                    "w",
                )
            )
        elif what == "narrow":
            havips[which] = havips[which].model_copy(update={"candidates": [instances[who].id]})
            envs.append(events.envelope("havip.updated", havips[which], "allocator"))
        elif what == "deregister":
            envs.append(events.envelope("instance.deregistered", instances[who], "allocator"))
        else:
            envs.append(events.envelope("havip.released", havips[which], "allocator"))

    faulty = FaultyPool(pool)
    service = BindingService(faulty, clock=SystemClock())
    await service.load()
    decide = BindingBook.apply_claim

    def deciding(book: BindingBook, claim: Claim, **kwargs: Any) -> Any:  # a step that can fail too
        faulty.step()
        return decide(book, claim, **kwargs)

    batches: list[Sequence[events.Envelope]] = []
    i = 0
    for size in cuts * 50:
        if i >= len(envs):
            break
        batches.append(envs[i : i + size])
        i += size
    setattr(BindingBook, "apply_claim", deciding)  # noqa: B010 - the decision is a step that can fail too
    try:
        await run_batches(service, faulty, batches, havips, pool, fail_at)
    finally:
        setattr(BindingBook, "apply_claim", decide)  # noqa: B010


async def run_batches(
    service: BindingService,
    faulty: FaultyPool,
    batches: list[Sequence[events.Envelope]],
    havips: list[events.HavipData],
    pool: asyncpg.Pool,
    fail_at: int,
) -> None:
    failed_once = False
    for batch in batches:
        deliveries = [delivery(e) for e in batch]
        if not failed_once:
            faulty.arm(fail_at)
        try:
            await service.handle(deliveries)
        except InjectedFailure:
            failed_once = True
            event("a step failed mid-batch")
            faulty.arm(0)
            await assert_book_equals_database(service, pool, havips)  # after the failure, before the retry
            await service.handle(deliveries)  # the consumer retries the batch
        faulty.arm(0)
        await assert_book_equals_database(service, pool, havips)


async def assert_book_equals_database(
    service: BindingService, pool: asyncpg.Pool, havips: list[events.HavipData]
) -> None:
    await service.ensure_current()  # what the service decides its next batch with
    async with pool.acquire() as conn:
        stored = await load_book(conn)
        sequences = {
            r["havip_id"]: r["n"]
            for r in await conn.fetch(
                "SELECT havip_id, max(sequence) AS n FROM binding.transitions WHERE havip_id = ANY($1) "
                "GROUP BY havip_id",
                [h.id for h in havips],
            )
        }
    for havip in havips:
        in_memory = service.book.bindings.get(havip.id)
        committed = stored.bindings.get(havip.id)
        assert (in_memory is None) == (committed is None), f"{havip.id}: present in one only"
        assert (havip.id in service.book.havips_by_id) == (havip.id in stored.havips_by_id)
        if in_memory is not None and committed is not None:
            assert (in_memory.instance_id, in_memory.mac, in_memory.sequence) == (
                committed.instance_id,
                committed.mac,
                committed.sequence,
            )
            assert (in_memory.flapping, in_memory.split_brain) == (committed.flapping, committed.split_brain)
            assert in_memory.last_transition_at == committed.last_transition_at  # the commit's stamp, both
            assert sequences.get(havip.id, 0) == in_memory.sequence  # the history has every transition


@pytest.mark.parametrize("fail_at", [1, 2])  # the audit rows' INSERT, their events' INSERT
async def test_a_paced_refusal_whose_write_fails_waits_again_and_is_written_once_with_every_frame(
    pool: asyncpg.Pool, fail_at: int
) -> None:
    """Refusals over the audit pace wait in memory; released into a write that fails (at any of its
    statements), they wait again and are written once the database answers: no frame lost, none counted twice
    (after a failure the folds start again, so a refusal's frames may be split over two rows)."""
    vpc, subnet = uuid.uuid4(), uuid.uuid4()
    base = IPv4Address("203.0.113.0") + 3 * fail_at  # the cases share the module's database
    havips = [
        events.HavipData(
            id=uuid.uuid4(), vpc_id=vpc, subnet_id=subnet, name=None,
            address=base + i, candidates=[],
        )
        for i in range(3)
    ]  # fmt: skip
    spoofer = "02:" + uuid.uuid4().bytes[:5].hex(":")
    faulty = FaultyPool(pool)
    clock = FakeClock()
    service = BindingService(faulty, clock=clock, refusal_audit_rate=1)  # a burst of one, one more a second
    await service.load()
    await service.handle([delivery(events.envelope("havip.allocated", h, "allocator")) for h in havips])
    t = clock.wall_ns()

    def spoofed(at: int, repeats: int) -> Delivery:
        claims = [
            events.ObservedClaim(
                claim_id=uuid.uuid4(), kind="garp_request", sender_mac=spoofer, eth_src=spoofer,
                sender_ip=h.address, target_ip=h.address, captured_at=at, repeats=repeats,
            )
            for h in havips
        ]  # fmt: skip
        env = events.envelope(
            events.CLAIMS_EVENT, events.ClaimsObserved(watcher_id="w", interface="eth0", claims=claims), "w"
        )
        return delivery(env)

    await service.handle([spoofed(t, 1)])  # one row written now, two wait
    assert service.refusals_waiting == 2
    clock.advance(1.0)  # one token is back after a second
    faulty.arm(fail_at)
    with pytest.raises(InjectedFailure):
        await service.release_refusals()
    assert service.refusals_waiting == 2  # the released row waits again
    await service.handle([spoofed(t + 1_000, 2)])  # more frames of the same three refusals, within the window

    async def audited() -> list[tuple[str, int]]:
        async with pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT host(address) AS address, count FROM binding.rejected_claims WHERE mac = $1", spoofer
            )
        return [(r["address"], r["count"]) for r in rows]

    for _ in range(3):  # a second's budget each: one row
        clock.advance(1.0)
        await service.release_refusals()
    assert service.refusals_waiting == 0
    rows = await audited()
    assert sum(count for _, count in rows) == 3 * (1 + 2)  # every frame once
    assert {address for address, _ in rows} == {str(h.address) for h in havips}
