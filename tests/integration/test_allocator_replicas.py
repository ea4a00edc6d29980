"""Two allocators on one database and one broker, as replicas behind a load balancer run: two real processes
(`python -m services.allocator`) on two ports, requests split between them at once.

* One Idempotency-Key sent to both at once allocates one HAVIP, and every answer is that HAVIP; the same key
  with another body is refused (409 IDEMPOTENCY_KEY_REUSED) whichever replica sees it.
* Allocations racing for a VPC's last quota, a subnet's last free addresses or one requested address never
  allocate more than allowed, nor one address twice.
* The view of bindings, fed by both replicas from their one queue (RabbitMQ hands each message to one of them),
  ends equal to the binding's history whatever the order and the redeliveries, each transition taken once.
* Two replicas asking at once for the repair of the same gaps ask once for each; the periodic passes run in one
  replica at a time (the others skip).
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from services.allocator.app import PURGE_LOCK, VIEW_MAINTENANCE_LOCK, maintain_view, purge_idempotency_keys
from services.allocator.binding_view.service import BindingView
from services.allocator.database import Database
from services.allocator.settings import AllocatorSettings
from shared.advisory_lock import advisory_lock_key, one_at_a_time
from shared.db import create_pool
from tests import service_logs
from tests.integration.allocator_support import AUTH, TOKEN, BindingStandIn, Json, error, ok, random_mac
from tests.lab.proc import terminate_group
from tests.metrics_text import samples
from tests.ports import free_port
from tests.waiting import eventually, eventually_sync

ROOT = Path(__file__).resolve().parents[2]
QUOTA = 5
START_DEADLINE_S = 60.0
VIEW_DEADLINE_S = 60.0
SAME_KEY_REQUESTS = 6


@dataclass(frozen=True)
class Replica:
    name: str
    url: str

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, headers=AUTH, timeout=30.0)


@pytest.fixture(scope="module")
def replicas(
    database_url: str, amqp_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Replica, Replica]]:
    """Two allocator processes on the module's database and vhost. Their own gap repairs and key purges wait
    an hour: the tests below run those passes themselves."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("HAVIP_")},
        "HAVIP_DATABASE_URL": database_url,
        "HAVIP_AMQP_URL": amqp_url,
        "HAVIP_API_TOKEN": TOKEN,
        "HAVIP_HOST": "127.0.0.1",
        "HAVIP_QUOTA_PER_VPC": str(QUOTA),
        "HAVIP_VIEW_GAP_GRACE_S": "3600",
        "HAVIP_IDEMPOTENCY_PURGE_INTERVAL_S": "86400",
        "HAVIP_LOG_LEVEL": "WARNING",
    }
    logs = tmp_path_factory.mktemp("replicas")
    procs: list[subprocess.Popen[bytes]] = []
    started: list[Replica] = []
    try:
        for name in ("replica-a", "replica-b"):
            port = free_port()
            log_path = logs / f"{name}.log"
            service_logs.follow(name, log_path)
            with log_path.open("wb") as log:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "services.allocator"],
                        cwd=ROOT,
                        env={**env, "HAVIP_PORT": str(port)},
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
            started.append(Replica(name, f"http://127.0.0.1:{port}"))
        for proc, replica in zip(procs, started, strict=True):

            def ready(proc: subprocess.Popen[bytes] = proc, replica: Replica = replica) -> bool:
                if proc.poll() is not None:
                    raise RuntimeError(f"{replica.name} exited with {proc.returncode}")
                try:
                    return httpx.get(f"{replica.url}/readyz", timeout=2.0).status_code == 200
                except httpx.TransportError:
                    return False

            eventually_sync(ready, timeout=START_DEADLINE_S, what=f"{replica.name} ready")
        yield started[0], started[1]
    finally:
        for proc in procs:
            terminate_group(proc, timeout=15)
        for log_path in logs.iterdir():
            service_logs.forget(log_path)


@pytest.fixture(scope="module")
async def clients(replicas: tuple[Replica, Replica]) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    a, b = replicas
    async with a.client() as client_a, b.client() as client_b:
        yield client_a, client_b


@pytest.fixture(scope="module")
async def db(database_url: str) -> AsyncIterator[Database]:
    pool = await create_pool(database_url, min_size=1, max_size=6)
    try:
        yield Database(pool)
    finally:
        await pool.close()


def alternating(clients: tuple[httpx.AsyncClient, httpx.AsyncClient], n: int) -> list[httpx.AsyncClient]:
    """`n` clients, every other one the second replica's: requests split between the replicas."""
    return [clients[i % 2] for i in range(n)]


async def vpc_and_subnet(client: httpx.AsyncClient, vpc_cidr: str, subnet_cidr: str) -> tuple[Json, Json]:
    vpc = ok(await client.post("/v1/vpcs", json={"name": "replicas", "cidr": vpc_cidr}), 201)
    subnet = ok(
        await client.post("/v1/subnets", json={"vpc_id": vpc["id"], "name": "sn", "cidr": subnet_cidr}), 201
    )
    return vpc, subnet


# ---- idempotency keys ----------------------------------------------------------------------------------------


async def test_one_idempotency_key_sent_to_both_replicas_at_once_allocates_one_havip(
    clients: tuple[httpx.AsyncClient, httpx.AsyncClient], db: Database
) -> None:
    _, subnet = await vpc_and_subnet(clients[0], "10.10.0.0/16", "10.10.1.0/24")
    for attempt in range(QUOTA):
        key = f"replicas-{attempt}-{uuid.uuid4().hex}"
        body = {"subnet_id": subnet["id"], "name": f"vip-{attempt}"}
        # Every request in Postgres at once: the test holds the subnet's lock (the allocator's name for it), so
        # the request that claims the key waits there, and the five others wait on the key it claimed; then
        # the lock goes, and the first commits.
        async with db.connection() as holder:
            subnet_lock = f"allocator.subnet.{subnet['id']}"
            await holder.execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", subnet_lock)
            racing = [
                asyncio.ensure_future(c.post("/v1/havips", json=body, headers={"Idempotency-Key": key}))
                for c in alternating(clients, SAME_KEY_REQUESTS)
            ]

            async def all_waiting() -> bool:
                waiting = await holder.fetchval(
                    """SELECT count(*) FROM pg_stat_activity
                       WHERE datname = current_database() AND wait_event_type = 'Lock'"""
                )
                return bool(waiting == SAME_KEY_REQUESTS)

            try:
                await eventually(all_waiting, timeout=30, interval=0.05, what="every request waiting on a lock")
            finally:
                await holder.execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))", subnet_lock)
        answers = await asyncio.gather(*racing)
        havips = [ok(answer, 201) for answer in answers]
        assert {h["id"] for h in havips} == {havips[0]["id"]}, havips
        assert all(h == havips[0] for h in havips)  # the same answer, whichever replica gave it
        replayed = [answer.headers.get("Idempotent-Replayed") for answer in answers]
        assert Counter(replayed) == {None: 1, "true": SAME_KEY_REQUESTS - 1}, replayed
    async with db.connection() as conn:
        in_subnet = await conn.fetchval("SELECT count(*) FROM allocator.havips WHERE subnet_id = $1", subnet["id"])
    assert in_subnet == QUOTA


async def test_one_key_with_two_bodies_at_once_allocates_for_one_and_refuses_the_other(
    clients: tuple[httpx.AsyncClient, httpx.AsyncClient], db: Database
) -> None:
    _, subnet = await vpc_and_subnet(clients[0], "10.11.0.0/16", "10.11.1.0/24")
    key = f"replicas-two-bodies-{uuid.uuid4().hex}"
    # Each body goes to both replicas: body-0 four times, body-1 twice.
    names = [f"body-{i // 2 % 2}" for i in range(6)]
    answers = await asyncio.gather(
        *(
            c.post("/v1/havips", json={"subnet_id": subnet["id"], "name": name}, headers={"Idempotency-Key": key})
            for name, c in zip(names, alternating(clients, 6), strict=True)
        )
    )
    created = [a.json() for a in answers if a.status_code == 201]
    assert created, [a.text for a in answers]
    winner = created[0]["name"]
    assert all(h == created[0] for h in created)  # every 201 is the one HAVIP of the body that won
    for name, answer in zip(names, answers, strict=True):
        if name != winner:
            error(answer, 409, "IDEMPOTENCY_KEY_REUSED")
    assert len(created) == names.count(winner)
    async with db.connection() as conn:
        assert await conn.fetchval("SELECT count(*) FROM allocator.havips WHERE subnet_id = $1", subnet["id"]) == 1


# ---- quotas and addresses ------------------------------------------------------------------------------------


async def test_allocations_racing_for_the_last_quota_never_exceed_it(
    clients: tuple[httpx.AsyncClient, httpx.AsyncClient], db: Database
) -> None:
    # A VPC whose subnets all allocate at once, from both replicas: the subnets' locks do not serialise them,
    # only the quota's. So that they meet at the quota together rather than one after the other, the test
    # holds the subnets' free ranges locked until every request waits on a lock in Postgres (the first of each
    # subnet on the ranges, inside its INSERT; the others on their subnet's lock), then lets them all go.
    vpc, first = await vpc_and_subnet(clients[0], "10.20.0.0/16", "10.20.1.0/24")
    subnets = [first["id"]]
    for n in range(2, 8):
        subnet = ok(
            await clients[n % 2].post(
                "/v1/subnets", json={"vpc_id": vpc["id"], "name": f"sn{n}", "cidr": f"10.20.{n}.0/24"}
            ),
            201,
        )
        subnets.append(subnet["id"])
    ok(await clients[0].post("/v1/havips", json={"subnet_id": first["id"]}), 201)  # one of the quota taken
    requests = 2 * len(subnets)  # within each replica's pool, beside its relay's and consumer's connections
    async with db.connection() as holder, holder.transaction():
        await holder.execute(
            "SELECT 1 FROM allocator.free_ranges WHERE subnet_id = ANY($1::uuid[]) FOR UPDATE",
            [uuid.UUID(s) for s in subnets],
        )
        racing = [
            asyncio.ensure_future(c.post("/v1/havips", json={"subnet_id": subnets[i % len(subnets)]}))
            for i, c in enumerate(alternating(clients, requests))
        ]

        async def all_waiting() -> bool:
            # The subnets' lock waits are in this database; the waits on the ranges, on this transaction.
            waiting = await holder.fetchval(
                """SELECT count(*) FROM pg_locks l
                   WHERE NOT l.granted
                     AND (l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                          OR pg_backend_pid() = ANY(pg_blocking_pids(l.pid)))"""
            )
            return bool(waiting == requests)

        await eventually(all_waiting, timeout=30, interval=0.05, what="every allocation waiting on a lock")
    answers = await asyncio.gather(*racing)
    statuses = Counter(a.status_code for a in answers)
    assert statuses == {201: QUOTA - 1, 403: requests - (QUOTA - 1)}, [a.text for a in answers]
    for answer in answers:
        if answer.status_code == 403:
            error(answer, 403, "QUOTA_EXCEEDED")
    async with db.connection() as conn:
        rows = await conn.fetch("SELECT subnet_id, address FROM allocator.havips WHERE vpc_id = $1", vpc["id"])
        counted = await conn.fetchval(
            "SELECT sum(havips) FROM allocator.subnet_havip_counts WHERE vpc_id = $1", vpc["id"]
        )
    assert len(rows) == QUOTA == counted
    assert len({(r["subnet_id"], r["address"]) for r in rows}) == QUOTA


async def test_allocations_racing_for_the_last_free_addresses_take_each_once(
    clients: tuple[httpx.AsyncClient, httpx.AsyncClient], db: Database
) -> None:
    # A /29 has 5 usable addresses (.2 to .6); two instances hold two of them, so 3 are left for 12 requests.
    block = IPv4Network("10.13.1.0/29")
    _, subnet = await vpc_and_subnet(clients[0], "10.13.0.0/16", str(block))
    for ip in ("10.13.1.3", "10.13.1.5"):
        payload = {"subnet_id": subnet["id"], "name": f"cvm-{ip}", "private_ip": ip, "mac": random_mac()}
        ok(await clients[1].post("/v1/instances", json=payload), 201)
    answers = await asyncio.gather(
        *(c.post("/v1/havips", json={"subnet_id": subnet["id"]}) for c in alternating(clients, 12))
    )
    created = [a.json() for a in answers if a.status_code == 201]
    assert sorted(IPv4Address(h["address"]) for h in created) == [
        IPv4Address(a) for a in ("10.13.1.2", "10.13.1.4", "10.13.1.6")
    ], [a.text for a in answers]
    for answer in answers:
        if answer.status_code != 201:
            error(answer, 409, "SUBNET_FULL")


async def test_one_requested_address_sent_to_both_replicas_at_once_is_allocated_once(
    clients: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    _, subnet = await vpc_and_subnet(clients[0], "10.14.0.0/16", "10.14.1.0/24")
    answers = await asyncio.gather(
        *(
            c.post("/v1/havips", json={"subnet_id": subnet["id"], "address": "10.14.1.77"})
            for c in alternating(clients, 8)
        )
    )
    assert Counter(a.status_code for a in answers) == {201: 1, 409: 7}, [a.text for a in answers]
    for answer in answers:
        if answer.status_code == 409:
            error(answer, 409, "ADDRESS_IN_USE")


# ---- the view of bindings ------------------------------------------------------------------------------------


def view_outcomes(exposition: str) -> Counter[str]:
    return Counter(
        {
            s.labels["outcome"]: int(s.value)
            for s in samples(exposition, "havip_view_events_total", {"event": "transition"})
        }
    )


async def outcomes_of(replicas: tuple[Replica, Replica]) -> list[Counter[str]]:
    async with httpx.AsyncClient(timeout=10.0) as client:
        return [view_outcomes((await client.get(f"{r.url}/metrics")).text) for r in replicas]


async def test_the_view_kept_by_both_replicas_ends_equal_to_the_history_each_transition_taken_once(
    replicas: tuple[Replica, Replica], binding_events: BindingStandIn, db: Database
) -> None:
    rng = random.Random(17)
    instances = [{"id": str(uuid.uuid4()), "mac": random_mac()} for _ in range(3)]
    havips = [{"id": str(uuid.uuid4()), "address": f"10.15.1.{i + 2}"} for i in range(20)]
    transitions = 12
    history: dict[str, list[Any]] = {}
    for havip in havips:
        holders: list[Json | None] = [rng.choice(instances) for _ in range(transitions - 1)] + [None]
        previous: Json | None = None
        changes = []
        for sequence, holder in enumerate(holders, start=1):
            changes.append(binding_events.change(havip, holder, sequence=sequence, previous=previous))
            previous = holder
        history[havip["id"]] = changes
    # Every transition once, in an order that mixes each HAVIP's sequences; a quarter of them again (a
    # redelivery, a replay), at random places.
    stream = [change for changes in history.values() for change in changes]
    rng.shuffle(stream)
    again = rng.sample(stream, len(stream) // 4)
    for change in again:
        stream.insert(rng.randrange(len(stream) + 1), change)
    before = await outcomes_of(replicas)
    for change in stream:
        await binding_events.publish("havip.binding.changed", change)

    async def complete() -> bool:
        async with db.connection() as conn:
            done = await conn.fetchval(
                """SELECT count(*) FROM allocator.view_bindings
                   WHERE havip_id = ANY($1::uuid[]) AND sequence = $2 AND isempty(missing)""",
                [uuid.UUID(h["id"]) for h in havips],
                transitions,
            )
        return bool(done == len(havips))

    await eventually(complete, timeout=VIEW_DEADLINE_S, interval=0.1, what="every history complete")

    async def counted() -> bool:
        after = await outcomes_of(replicas)
        taken = sum((a - b).total() for a, b in zip(after, before, strict=True))
        return taken == len(stream)

    await eventually(counted, timeout=VIEW_DEADLINE_S, interval=0.1, what="every delivery counted")
    after = await outcomes_of(replicas)
    per_replica = [a - b for a, b in zip(after, before, strict=True)]
    assert all(delta.total() > 0 for delta in per_replica), per_replica  # both consumed: the queue was split
    total = sum(per_replica, Counter[str]())
    assert total["applied"] + total["gap"] + total["filled"] == len(havips) * transitions, total
    assert total["duplicate"] == len(again), total

    async with db.connection() as conn:
        for havip in havips:
            changes = history[havip["id"]]
            record = await conn.fetchrow(
                "SELECT sequence, instance_id, mac, gap_since FROM allocator.view_bindings WHERE havip_id = $1",
                uuid.UUID(havip["id"]),
            )
            assert record is not None
            assert (record["sequence"], record["instance_id"], record["mac"], record["gap_since"]) == (
                transitions,
                None,
                None,
                None,
            )
            rows = await conn.fetch(
                """SELECT sequence, from_instance_id, to_instance_id, reason FROM allocator.view_transitions
                   WHERE havip_id = $1 ORDER BY sequence""",
                uuid.UUID(havip["id"]),
            )
            expected = [
                (
                    c.sequence,
                    c.previous.instance_id if c.previous else None,
                    c.current.instance_id if c.current else None,
                    c.reason,
                )
                for c in changes
            ]
            assert [
                (r["sequence"], r["from_instance_id"], r["to_instance_id"], r["reason"]) for r in rows
            ] == expected


async def make_gaps(db: Database, count: int) -> list[uuid.UUID]:
    """`count` view records with transitions 2 to 4 missing, found just now."""
    ids = [uuid.uuid4() for _ in range(count)]
    async with db.connection() as conn:
        await conn.execute(
            """INSERT INTO allocator.view_bindings (havip_id, sequence, missing, gap_since)
               SELECT id, 5, '{[2,5)}', now() FROM unnest($1::uuid[]) AS u(id)""",
            ids,
        )
    return ids


async def test_two_replicas_asking_at_once_for_the_same_repairs_ask_once_for_each(
    database_url: str, replicas: tuple[Replica, Replica]
) -> None:
    pools = [await create_pool(database_url, min_size=1, max_size=3) for _ in range(2)]
    try:
        views = [BindingView(Database(pool)) for pool in pools]
        gapped = await make_gaps(Database(pools[0]), 300)

        async def ask(view: BindingView) -> int:
            return await view.request_repairs(grace_s=0, retry_s=3600, max_attempts=10)

        asked = await asyncio.gather(*(ask(view) for view in views), *(ask(view) for view in views))
        async with pools[0].acquire() as conn:
            attempts = await conn.fetch(
                "SELECT repair_attempts FROM allocator.view_bindings WHERE havip_id = ANY($1::uuid[])", gapped
            )
        assert sum(asked) == len(gapped), asked  # one range a record, asked for by one of the four calls
        assert Counter(r["repair_attempts"] for r in attempts) == {1: len(gapped)}
    finally:
        for pool in pools:
            await pool.close()


# ---- periodic passes -----------------------------------------------------------------------------------------


async def test_two_replicas_passes_at_once_one_does_the_work_the_other_skips(database_url: str) -> None:
    pools = [await create_pool(database_url, min_size=1, max_size=2) for _ in range(2)]
    try:
        entered, release = asyncio.Event(), asyncio.Event()
        runs: list[str] = []

        def work_of(replica: str) -> Any:
            async def work() -> None:
                runs.append(replica)
                entered.set()
                await release.wait()

            return work

        async def replica_a_pass() -> bool:
            return await one_at_a_time(pools[0], "havip test pass", work_of("a"))()

        first = asyncio.create_task(replica_a_pass())
        await asyncio.wait_for(entered.wait(), 10)
        assert await one_at_a_time(pools[1], "havip test pass", work_of("b"))() is False  # skipped, no wait
        release.set()
        assert await asyncio.wait_for(first, 10) is True
        assert runs == ["a"]
        # Once the first pass is over, the lock is free again for either.
        assert await one_at_a_time(pools[1], "havip test pass", work_of("b"))() is True
        assert runs == ["a", "b"]
    finally:
        for pool in pools:
            await pool.close()


async def test_the_key_purge_skips_a_pass_while_another_replica_runs_one(db: Database, database_url: str) -> None:
    keys = [f"old-{uuid.uuid4().hex}" for _ in range(3)]
    async with db.connection() as conn:
        await conn.execute(
            """INSERT INTO allocator.idempotency_keys (key, request_hash, havip_id, created_at)
               SELECT k, 'hash', gen_random_uuid(), now() - interval '3 days' FROM unnest($1::text[]) AS u(k)""",
            keys,
        )

    async def left() -> int:
        async with db.connection() as conn:
            count: int = await conn.fetchval(
                "SELECT count(*) FROM allocator.idempotency_keys WHERE key = ANY($1::text[])", keys
            )
        return count

    purge = purge_idempotency_keys(db, ttl_hours=24)
    other = await lock_held_by_another_replica(database_url, PURGE_LOCK)  # another replica's pass under way
    try:
        assert await purge() is False
        assert await left() == len(keys)
    finally:
        await other.close()
    # Once the closed session's backend has let the lock go (and the module's own allocator is not in a pass).
    await eventually(purge, what="a purge once the lock is free")
    assert await left() == 0


async def test_the_view_maintenance_skips_the_repairs_while_another_replica_runs_them(
    db: Database, database_url: str
) -> None:
    settings = AllocatorSettings(
        database_url=database_url, api_token=TOKEN, view_gap_grace_s=0, view_repair_retry_s=3600
    )
    view = BindingView(db)
    maintain = maintain_view(view, db, settings)
    gapped = await make_gaps(db, 2)

    async def attempts() -> list[int]:
        async with db.connection() as conn:
            rows = await conn.fetch(
                "SELECT repair_attempts FROM allocator.view_bindings WHERE havip_id = ANY($1::uuid[])", gapped
            )
        return [r["repair_attempts"] for r in rows]

    other = await lock_held_by_another_replica(database_url, VIEW_MAINTENANCE_LOCK)
    try:
        assert await maintain() is False
        assert await attempts() == [0, 0]
    finally:
        await other.close()
    # The closed session's lock goes as its backend ends, and the module's own allocator may be in a pass of its
    # own meanwhile: a pass of this one's runs once the lock is free. A repair asked is not asked again for an
    # hour (view_repair_retry_s), whichever replica asked.
    await eventually(maintain, what="a maintenance pass once the lock is free")
    assert await attempts() == [1, 1]


async def lock_held_by_another_replica(database_url: str, name: str) -> asyncpg.Connection:
    """A session holding the advisory lock `name`, as another replica's pass would; the module's own allocator may
    hold it for a pass of its own at that moment: taken as soon as it is free. Closing the session frees it."""
    other = await asyncpg.connect(database_url)
    key = advisory_lock_key(name)
    try:
        await eventually(lambda: other.fetchval("SELECT pg_try_advisory_lock($1)", key), what=f"{name} taken")
    except BaseException:
        await other.close()
        raise
    return other
