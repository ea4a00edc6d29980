"""The refusal audit's pace (AuditPacer) in the binding service wired to the real Postgres and RabbitMQ, with
its default HAVIP_REFUSAL_AUDIT_RATE."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import AsyncIterator
from ipaddress import IPv4Address
from typing import Any

import asyncpg
import pytest

from services.binding.audit_pacing import AuditPacer
from services.binding.settings import BindingSettings
from shared.messaging import Broker
from tests.integration.binding_support import World, claims_event
from tests.listener import EventLog, listening
from tests.waiting import eventually

# One partition: the flood comes as one event carrying the claims of many addresses.
BINDING_SETTINGS = {"partitions": 1}


@pytest.fixture
async def listener(binding: BindingSettings) -> AsyncIterator[EventLog]:
    async with listening(binding, ["havip.claim.rejected"]) as log:
        yield log


async def test_a_spoofer_claiming_many_addresses_at_once_is_audited_in_paced_bites_every_frame_counted(
    binding: BindingSettings, publisher: Broker, listener: EventLog
) -> None:
    """A flood over many addresses starts a refusal on each at the same moment: the audit pacer writes them a
    bite at a time (at most a tenth of HAVIP_REFUSAL_AUDIT_RATE per write), frames folding into the rows that
    wait, so that a thousand rows and events never land in front of a takeover at once (AuditPacer)."""
    worlds = [World() for _ in range(30)]
    for w in worlds:
        await publisher.publish_many(w.inventory())
    spoofer = "02:ee:ee:ee:ee:7a"
    t = time.time_ns()
    first = [w.observed(spoofer, t=t + i).model_copy(update={"repeats": i + 1}) for i, w in enumerate(worlds)]
    again = [w.observed(spoofer, t=t + 1_000 + i) for i, w in enumerate(worlds)]  # within the window: folded
    await publisher.publish(claims_event(*first))
    await publisher.publish(claims_event(*again))
    expected = {w.vip: i + 2 for i, w in enumerate(worlds)}

    async def audit() -> list[Any]:
        conn = await asyncpg.connect(binding.database_url)
        try:
            return list(
                await conn.fetch(
                    "SELECT xmin::text AS tx, host(address) AS address, count FROM binding.rejected_claims "
                    "WHERE mac = $1",
                    spoofer,
                )
            )
        finally:
            await conn.close()

    async def all_counted() -> bool:
        return {IPv4Address(r["address"]): r["count"] for r in await audit()} == expected

    await eventually(all_counted, what="one row per address, every frame counted")
    rows = await audit()
    assert len(rows) == len(worlds)
    bites = Counter(r["tx"] for r in rows)
    burst = AuditPacer(binding.refusal_audit_rate).burst
    assert max(bites.values()) <= burst < len(worlds)
    assert len(bites) >= len(worlds) // burst

    def published() -> int:
        return sum(len(listener.of("havip.claim.rejected", w.havip.id)) for w in worlds)

    await eventually(lambda: published() == len(worlds), what="one event per row")
