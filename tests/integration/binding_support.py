"""The binding service's integration tests' kit: a small world announced as the allocator would, claims as a
watcher publishes them, and the binding's rows read back from Postgres."""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from ipaddress import IPv4Address
from typing import Any, TypeVar

import asyncpg
from asyncpg.pool import PoolConnectionProxy
from asyncpg.transaction import Transaction

from shared import events
from shared.messaging import Delivery
from shared.partitions import partition_of

_VIP_HOSTS = itertools.count()

T = TypeVar("T")


class World:
    """A VPC with one subnet, two instances and one HAVIP, announced as the allocator would."""

    def __init__(self, vip: IPv4Address | None = None) -> None:
        self.vpc, self.subnet, self.other_subnet = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        # Each world's HAVIP address is its own: a random pick could repeat one of an earlier world (other
        # VPC, same module), and an unknown MAC's claim for an address two VPCs use names no HAVIP.
        self.vip = vip or IPv4Address("192.0.2.20") + next(_VIP_HOSTS)
        suffix = uuid.uuid4().hex[:8]

        def mac(i: int) -> str:
            return f"02:{i:02x}:{suffix[0:2]}:{suffix[2:4]}:{suffix[4:6]}:{suffix[6:8]}"

        self.cvm1 = events.InstanceData(
            id=uuid.uuid4(), vpc_id=self.vpc, subnet_id=self.subnet, name="cvm1",
            private_ip=IPv4Address("192.0.2.11"), mac=mac(1),
        )  # fmt: skip
        self.cvm2 = events.InstanceData(
            id=uuid.uuid4(), vpc_id=self.vpc, subnet_id=self.subnet, name="cvm2",
            private_ip=IPv4Address("192.0.2.12"), mac=mac(2),
        )  # fmt: skip
        self.outsider = events.InstanceData(
            id=uuid.uuid4(), vpc_id=self.vpc, subnet_id=self.other_subnet, name="other",
            private_ip=IPv4Address("198.51.100.7"), mac=mac(3),
        )  # fmt: skip
        self.havip = events.HavipData(
            id=uuid.uuid4(), vpc_id=self.vpc, subnet_id=self.subnet, name="vip", address=self.vip, candidates=[]
        )

    def inventory(self) -> list[events.Envelope]:
        return [
            events.envelope("instance.registered", self.cvm1, "allocator"),
            events.envelope("instance.registered", self.cvm2, "allocator"),
            events.envelope("instance.registered", self.outsider, "allocator"),
            events.envelope("havip.allocated", self.havip, "allocator"),
        ]

    def claim(self, mac: str, *, eth_src: str | None = None, t: int | None = None) -> events.Envelope:
        return claims_event(self.observed(mac, eth_src=eth_src, t=t))

    def observed(self, mac: str, *, eth_src: str | None = None, t: int | None = None) -> events.ObservedClaim:
        return events.ObservedClaim(
            claim_id=uuid.uuid4(), kind="garp_request", sender_mac=mac, eth_src=eth_src or mac,
            sender_ip=self.vip, target_ip=self.vip, captured_at=t or time.time_ns(),
        )  # fmt: skip


def worlds_in_partitions(partitions: int) -> dict[int, World]:
    """A world whose HAVIP is in each partition (addresses of 203.0.113.0/24, never on a wire here)."""
    found: dict[int, World] = {}
    for host in range(1, 255):
        vip = IPv4Address("203.0.113.0") + host
        found.setdefault(partition_of(vip, partitions), World(vip))
        if len(found) == partitions:
            return found
    raise AssertionError(f"203.0.113.0/24 does not reach all {partitions} partitions")


def claims_event(*claims: events.ObservedClaim) -> events.Envelope:
    return events.envelope(
        events.CLAIMS_EVENT,
        events.ClaimsObserved(watcher_id="test-watcher", interface="lab0", claims=list(claims)),
        "arp_watcher",
    )


async def binding_row_if_any(dsn: str, havip_id: uuid.UUID) -> asyncpg.Record | None:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchrow("SELECT * FROM binding.bindings WHERE havip_id = $1", havip_id)
    finally:
        await conn.close()


async def binding_row(dsn: str, havip_id: uuid.UUID) -> asyncpg.Record:
    """The HAVIP's binding row, which the test expects to exist."""
    row = await binding_row_if_any(dsn, havip_id)
    if row is None:
        raise AssertionError(f"HAVIP {havip_id} has no row in binding.bindings")
    return row


async def transitions(dsn: str, havip_id: uuid.UUID) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(
            await conn.fetch("SELECT * FROM binding.transitions WHERE havip_id = $1 ORDER BY sequence", havip_id)
        )
    finally:
        await conn.close()


def delivery(env: events.Envelope, user_id: str | None = None) -> Delivery:
    """An event as the binding's consumer hands it to the service: encoded, decoded, validated, and stamped with
    the time it arrived (the service times its hops from it; 0 would add decades to the process's histograms)
    and with the broker user that published it."""
    head, data = events.decode(events.encode(env))
    return Delivery(head, data, False, time.time_ns(), user_id)


class FakeClock:
    """The binding service's clock, moved by the test: it starts at the real time (claims are compared with it)
    and stands still until `advance`."""

    def __init__(self) -> None:
        self._wall_ns = time.time_ns()
        self._monotonic_s = 0.0

    def wall_ns(self) -> int:
        return self._wall_ns

    def monotonic_s(self) -> float:
        return self._monotonic_s

    def advance(self, seconds: float) -> None:
        self._wall_ns += int(seconds * 1e9)
        self._monotonic_s += seconds


class InterceptingPool:
    """The real pool, every statement the service runs on its connections seen by `before` and `after` (which a
    test overrides: to break a call at a chosen step, to read the database's clock after each)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    def before(self) -> None:
        """Called before each statement; raising fails it."""

    async def after(self, conn: PoolConnectionProxy, sql: str) -> None:
        """Called after each statement, with the real connection."""

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[InterceptedConnection]:
        async with self._pool.acquire() as conn:
            yield InterceptedConnection(conn, self)


class InterceptedConnection:
    """A pool connection whose statements `pool` sees: the ones the binding service runs (shared.db.Queries)."""

    def __init__(self, conn: PoolConnectionProxy, pool: InterceptingPool) -> None:
        self._conn = conn
        self._pool = pool

    async def _seen(self, sql: str, statement: Callable[[], Awaitable[T]]) -> T:
        self._pool.before()
        result = await statement()
        await self._pool.after(self._conn, sql)
        return result

    async def execute(self, query: str, *args: object) -> str:
        return await self._seen(query, lambda: self._conn.execute(query, *args))

    async def executemany(self, command: str, args: Iterable[Sequence[object]]) -> None:
        await self._seen(command, lambda: self._conn.executemany(command, args))

    async def fetch(self, query: str, *args: object) -> list[asyncpg.Record]:
        return await self._seen(query, lambda: self._conn.fetch(query, *args))

    async def fetchrow(self, query: str, *args: object) -> asyncpg.Record | None:
        return await self._seen(query, lambda: self._conn.fetchrow(query, *args))

    async def fetchval(
        self,
        query: str,
        *args: object,
        column: int = 0,
        timeout: float | None = None,  # noqa: ASYNC109 - asyncpg's own argument, passed on
    ) -> Any:
        return await self._seen(query, lambda: self._conn.fetchval(query, *args, column=column, timeout=timeout))

    def transaction(self) -> Transaction:
        return self._conn.transaction()
