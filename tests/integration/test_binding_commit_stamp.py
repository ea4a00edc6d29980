"""`committed_at` is taken as late as the transaction allows: the database's clock in the batch's last statement,
after every other statement of the batch — one value in the history row, the binding row, the event's bytes and
the service's book."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime, timedelta, timezone
from ipaddress import IPv4Address

import asyncpg
import pytest
from asyncpg.pool import PoolConnectionProxy

from services.binding.clock import SystemClock
from services.binding.repository import rfc3339_sql
from services.binding.service import BindingService
from shared import events
from shared.db import fetch_one
from tests.integration.binding_support import InterceptingPool, delivery


class ClockedPool(InterceptingPool):
    """The real pool; the database's clock read after each of the service's statements."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        super().__init__(pool)
        self.after_each: list[tuple[str, datetime]] = []  # (statement, the database's clock once it returned)

    async def after(self, conn: PoolConnectionProxy, sql: str) -> None:
        self.after_each.append((sql, await conn.fetchval("SELECT clock_timestamp()")))


def claim(address: IPv4Address, mac: str) -> events.Envelope:
    observed = events.ObservedClaim(
        claim_id=uuid.uuid4(), kind="garp_request", sender_mac=mac, eth_src=mac, sender_ip=address,
        target_ip=address, captured_at=time.time_ns(),
    )  # fmt: skip
    return events.envelope(
        events.CLAIMS_EVENT, events.ClaimsObserved(watcher_id="w", interface="eth0", claims=[observed]), "w"
    )


async def test_committed_at_is_the_databases_clock_in_the_batchs_last_statement_and_one_value_everywhere(
    pool: asyncpg.Pool,
) -> None:
    vpc, subnet = uuid.uuid4(), uuid.uuid4()
    address = IPv4Address("198.51.100.40")
    cvm1, cvm2 = (
        events.InstanceData(
            id=uuid.uuid4(), vpc_id=vpc, subnet_id=subnet, name=f"cvm{i}",
            private_ip=IPv4Address("198.51.100.10") + i, mac=f"02:00:00:00:5a:{i:02x}",
        )
        for i in (1, 2)
    )  # fmt: skip
    havip = events.HavipData(
        id=uuid.uuid4(), vpc_id=vpc, subnet_id=subnet, name=None, address=address, candidates=[]
    )
    clocked = ClockedPool(pool)
    service = BindingService(clocked, clock=SystemClock(), refusal_audit_rate=1_000)
    await service.load()
    await service.handle(
        [
            delivery(events.envelope("instance.registered", cvm1, "allocator")),
            delivery(events.envelope("instance.registered", cvm2, "allocator")),
            delivery(events.envelope("havip.allocated", havip, "allocator")),
            delivery(claim(address, cvm1.mac)),
        ]
    )
    # One batch with a little of everything: a refusal (its audit row and event), a replay request (read from
    # the history, its events written), and a takeover.
    replay = events.ReplayRequested(
        ranges=[events.ReplayRange(havip_id=havip.id, first_sequence=1, last_sequence=1)]
    )
    clocked.after_each.clear()
    await service.handle(
        [
            delivery(claim(address, "02:00:00:00:5a:99")),  # an unknown MAC: refused
            delivery(events.envelope("havip.binding.replay_requested", replay, "allocator")),
            delivery(claim(address, cvm2.mac)),
        ]
    )

    async with pool.acquire() as conn:
        history = await fetch_one(
            conn, "SELECT committed_at FROM binding.transitions WHERE havip_id = $1 AND sequence = 2", havip.id
        )
        bound = await fetch_one(
            conn, "SELECT last_transition_at FROM binding.bindings WHERE havip_id = $1", havip.id
        )
        outbox = await conn.fetch("SELECT id, routing_key, body, created_at FROM binding.outbox ORDER BY id")
    committed_at: datetime = history["committed_at"]
    [changed] = [
        row
        for row in outbox
        if row["routing_key"] == "havip.binding.changed" and json.loads(row["body"])["data"]["sequence"] == 2
    ]
    text = json.loads(changed["body"])["data"]["committed_at"]
    _, data = events.decode(changed["body"].encode())
    assert isinstance(data, events.BindingChanged)
    # One value: the history row, the binding row, the event, the book.
    assert data.committed_at == committed_at == bound["last_transition_at"]
    assert text == events.rfc3339(committed_at)  # printed by the statement as every event time is
    assert service.book.bindings[havip.id].last_transition_at == committed_at
    # Later than the transaction's start (now(), the outbox rows' created_at) and than every other statement of
    # the batch; only the statement that stamps it returns after it.
    assert committed_at > changed["created_at"]
    statements_after_the_stamp = [sql for sql, at in clocked.after_each if at >= committed_at]
    assert len(statements_after_the_stamp) == 1, statements_after_the_stamp
    assert statements_after_the_stamp[0] == clocked.after_each[-1][0]
    # The decisions' events are the batch's last outbox rows: the refusal's and the replay's went first.
    batch_rows = [row for row in outbox if row["created_at"] == changed["created_at"]]
    assert [row["routing_key"] for row in batch_rows] == [
        "havip.claim.rejected",
        "havip.binding.replayed",
        "havip.binding.changed",
    ]


@pytest.mark.parametrize(
    "moment",
    [
        datetime(
            2026, 12, 3, 10, 0, 0, tzinfo=UTC
        ),  # no microseconds: printed without a fraction, as pydantic does
        datetime(2026, 12, 3, 10, 0, 0, 1230, tzinfo=UTC),
        datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=timezone(timedelta(hours=-5))),
    ],
)
async def test_the_statement_prints_committed_at_as_every_event_time_is_printed(
    pool: asyncpg.Pool, moment: datetime
) -> None:
    async with pool.acquire() as conn:
        printed = await conn.fetchval(f"SELECT {rfc3339_sql('$1::timestamptz')}", moment)
    assert printed == events.rfc3339(moment)
