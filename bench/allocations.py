"""P4 — concurrent HAVIP allocations through the real allocator (docs/contract.md#figures).

    python -m bench.allocations [--n 1000] [--subnets 10] [--concurrency N] [--layout both] [--json]
    python -m bench.allocations --fill-curve [--levels 0,10000,50000] [--samples 200] [--prefill sql|api]

The second form is P7, allocation as one subnet fills: bench/fill_curve.py.

For each VPC layout (`one-vpc`: every subnet in one VPC, so the VPC's quota lock serialises all allocations;
`vpc-per-subnet`: one VPC per subnet, so only the subnet lock and the pool are shared), on a database and a
RabbitMQ virtual host of its own:

1. starts `python -m services.allocator` as a separate process (own process group, random token, free port,
   HAVIP_QUOTA_PER_VPC raised to exactly the number of HAVIPs the layout puts in one VPC, log level WARNING)
   and waits for /readyz;
2. creates the VPC(s) and subnets through the API, and a queue of its own bound to `havip.allocated`;
3. waits (bounded) for the machine to be quiet, opens the client's connections (one GET /healthz each) and
   the allocator's database pool (GET /readyz, as many at once as the pool holds), then fires N
   `POST /v1/havips` (no address: the lowest free one), request i to subnet i mod S, at most `--concurrency`
   in flight (default N: all at once), from httpx.AsyncClients whose pools together hold `--concurrency`
   connections (default: one client per connection, see bench/common.py `client_fleet` for why); records
   each request's latency (perf_counter, from the moment it may go) and status; meanwhile samples what the
   allocator's Postgres backends do (pg_stat_activity) and splits the CPU time between the processes;
4. measures how long after the last response the outbox is empty and the last event has arrived;
5. verifies from the database: every response 201, N rows, the same (id, address) as answered, no duplicate
   address in a VPC, no reserved address, each subnet holding exactly its lowest addresses (contiguous from
   the first usable), one `havip.allocated` event per HAVIP, the outbox empty;
6. measures references in the same run on the same Postgres and the same client: bare one-row INSERT
   transactions (autocommit) from one asyncpg connection, and from a pool as large as the allocator's with
   the same number in flight; and the HTTP floor (GET /healthz, same client, same concurrency);
7. tears everything down (allocator by process group, database and vhost dropped), also on failure, Ctrl-C
   or SIGTERM.

Goals (P4, docs/contract.md#figures): zero duplicates; ≥ 300 allocations/s; p99 ≤ 100 ms. Exit status 0 when every
layout meets them and every check holds, 1 when one does not, 2 on an error, 130 when interrupted. Results and
their reading: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import pstats
import signal
import sys
import tempfile
import time
import traceback
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import httpx

from bench import fill_curve
from bench.common import (
    AllocatorProcess,
    CpuSnapshot,
    client_fleet,
    latency_summary_ms,
    machine,
    raise_open_files_limit,
    sandbox,
    say,
    skip_sniffio_probe,
    wait_for_quiet,
)
from shared.messaging import declare_topology
from shared.settings import CommonSettings
from tests.metrics_text import value
from tests.waiting import eventually

GOAL_RATE = 300.0  # allocations/s
GOAL_P99_MS = 100.0
LAYOUTS = ("one-vpc", "vpc-per-subnet")
BASE = IPv4Address("10.0.0.0")
ALLOCATOR_POOL_SIZE = 10  # shared/db.py create_pool(max_size=10), what the allocator runs with
MAX_N = 100_000
MAX_SUBNETS = 1024
MAX_CONCURRENCY = 5000
REQUEST_TIMEOUT_S = 60.0
READY_TIMEOUT_S = 60.0
DRAIN_TIMEOUT_S = 60.0
NOISY_SHARE = 0.10  # other processes' share of the machine during the burst above which a run is flagged


# ---- the layout -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    kind: str
    vpcs: list[IPv4Network]
    subnets: list[tuple[int, IPv4Network]]  # (index of its VPC, block)


def subnet_prefix(per_subnet: int) -> int:
    """A /24 when it holds `per_subnet` usable addresses (3 are reserved), else the smallest block that does."""
    bits = max(3, math.ceil(math.log2(per_subnet + 3)))
    return min(24, 32 - bits)


def plan(kind: str, n: int, subnets: int) -> tuple[Layout, int]:
    """The blocks of the layout, carved from 10.0.0.0/8, and the quota per VPC it needs (exactly)."""
    per_subnet = math.ceil(n / subnets)
    prefix = subnet_prefix(per_subnet)
    size = 1 << (32 - prefix)
    if subnets * size > 1 << 24:
        raise ValueError(f"{subnets} subnets of /{prefix} do not fit in 10.0.0.0/8")
    blocks = [IPv4Network((int(BASE) + i * size, prefix)) for i in range(subnets)]
    if kind == "one-vpc":
        vpc_prefix = max(8, prefix - math.ceil(math.log2(subnets)))
        return Layout(kind, [IPv4Network((int(BASE), vpc_prefix))], [(0, b) for b in blocks]), n
    # One VPC per subnet, with the subnet's block: nothing is shared between allocations but the process,
    # the pool and Postgres.
    return Layout(kind, list(blocks), [(i, b) for i, b in enumerate(blocks)]), per_subnet


def describe_layout(layout: Layout) -> str:
    prefix = layout.subnets[0][1].prefixlen
    if layout.kind == "one-vpc":
        return f"{len(layout.subnets)} subnets /{prefix} in one VPC {layout.vpcs[0]}"
    return f"{len(layout.subnets)} VPCs, one subnet /{prefix} each"


# ---- what the client saw ------------------------------------------------------------------------------------


@dataclass
class Outcome:
    index: int
    status: int  # 0: no answer (transport error)
    started: float
    finished: float
    subnet_id: str = ""
    havip_id: str | None = None
    address: str | None = None
    error: str | None = None

    @property
    def latency(self) -> float:
        return self.finished - self.started


Request = Callable[[httpx.AsyncClient, int], Awaitable[httpx.Response]]


async def burst(clients: Sequence[httpx.AsyncClient], n: int, concurrency: int, request: Request) -> list[Outcome]:
    """n requests (request i on client i mod len(clients)), at most `concurrency` in flight, all released
    together; latency from the moment each may go (so waiting for a slot of the cap is not counted; waiting
    inside the client or the server is)."""
    gate = asyncio.Event()
    slots = asyncio.Semaphore(concurrency)

    async def one(i: int) -> Outcome:
        await gate.wait()
        async with slots:
            started = time.perf_counter()
            try:
                response = await request(clients[i % len(clients)], i)
            except httpx.HTTPError as exc:
                return Outcome(i, 0, started, time.perf_counter(), error=repr(exc))
            finished = time.perf_counter()
            outcome = Outcome(i, response.status_code, started, finished)
            if response.status_code == 201:
                body = response.json()
                outcome.havip_id, outcome.address = body["id"], body["address"]
            elif response.status_code >= 300:
                outcome.error = response.text[:200]
            return outcome

    tasks = [asyncio.create_task(one(i)) for i in range(n)]
    try:
        await asyncio.sleep(0)  # every task is now waiting at the gate
        gate.set()
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


def rate_and_latency(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    ok = [o for o in outcomes if 200 <= o.status < 300]
    start = min(o.started for o in outcomes)
    end = max(o.finished for o in outcomes)
    wall = end - start
    return {
        "requests": len(outcomes),
        "ok": len(ok),
        "statuses": dict(Counter(str(o.status) for o in outcomes)),
        "wall_s": wall,
        "rate_per_s": len(ok) / wall if wall > 0 else math.nan,
        "latency_ms": latency_summary_ms([o.latency for o in outcomes]),
    }


# ---- events -------------------------------------------------------------------------------------------------


@dataclass
class EventTap:
    """A queue of the benchmark's own, bound to `havip.allocated`: what the outbox relay published."""

    received: list[tuple[float, str, str]] = field(default_factory=list)  # (perf_counter, id, address)


@asynccontextmanager
async def tap_events(amqp_url: str) -> AsyncIterator[EventTap]:
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        exchange = await declare_topology(channel, CommonSettings(amqp_url=amqp_url, amqp_prefix=""))
        queue = await channel.declare_queue(exclusive=True)  # gone with the connection (and the vhost)
        await queue.bind(exchange, "havip.allocated")
        tap = EventTap()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            data = json.loads(message.body)["data"]
            tap.received.append((time.perf_counter(), data["id"], data["address"]))

        await queue.consume(on_message, no_ack=True)
        yield tap
    finally:
        await connection.close()


async def wait_drained(conn: asyncpg.Connection, tap: EventTap, n: int, since: float) -> dict[str, Any]:
    """How long after `since` (the last response) the outbox was empty and the n-th event had arrived."""
    outbox_empty_at: float | None = None

    async def drained() -> bool:
        nonlocal outbox_empty_at
        now = time.perf_counter()
        if outbox_empty_at is None and await conn.fetchval("SELECT count(*) FROM allocator.outbox") == 0:
            outbox_empty_at = now
        return outbox_empty_at is not None and len(tap.received) >= n

    with contextlib.suppress(TimeoutError):  # what did not drain in time is reported as NaN below
        await eventually(drained, timeout=DRAIN_TIMEOUT_S, interval=0.002, what="the outbox drained")
    last_event = max((t for t, _, _ in tap.received), default=math.nan)
    return {
        "outbox_empty_after_ms": math.nan if outbox_empty_at is None else (outbox_empty_at - since) * 1000,
        "last_event_after_ms": (last_event - since) * 1000,
        "events_received": len(tap.received),
        "outbox_left": await conn.fetchval("SELECT count(*) FROM allocator.outbox"),
    }


# ---- what the allocator's Postgres backends are doing ---------------------------------------------------------

BACKEND_STATES = """
    SELECT CASE
               WHEN state = 'active' AND wait_event_type = 'Lock' AND wait_event = 'advisory'
                   THEN 'waiting_for_advisory_lock'
               WHEN state = 'active' AND wait_event_type = 'Lock' THEN 'waiting_for_other_lock'
               WHEN state = 'active' THEN 'executing'
               WHEN state = 'idle in transaction' THEN 'in_transaction_waiting_for_allocator'
               ELSE 'idle'
           END AS what,
           count(*) AS backends
    FROM pg_stat_activity
    WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'
    GROUP BY 1"""


async def sample_backends(
    conn: asyncpg.Connection, until: asyncio.Event, interval_s: float = 0.02
) -> dict[str, float]:
    """Mean number of the allocator's backends in each state while `until` is not set (pg_stat_activity).

    `in_transaction_waiting_for_allocator` is a transaction waiting for its next statement: time spent in
    the allocator's event loop (or on the wire) while the transaction, and its locks, stay open."""
    totals: Counter[str] = Counter()
    samples = 0
    while not until.is_set():
        for row in await conn.fetch(BACKEND_STATES):
            totals[row["what"]] += row["backends"]
        samples += 1
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval_s):
                await until.wait()
    return {what: round(count / samples, 2) for what, count in sorted(totals.items())} if samples else {}


# ---- verification from the database -------------------------------------------------------------------------


def reserved(block: IPv4Network) -> set[IPv4Address]:
    return {block.network_address, block.network_address + 1, block.broadcast_address}


async def verify(
    conn: asyncpg.Connection,
    layout: Layout,
    subnet_ids: list[str],
    outcomes: Sequence[Outcome],
    tap: EventTap,
    n: int,
) -> dict[str, Any]:
    rows = await conn.fetch("SELECT id, vpc_id, subnet_id, address FROM allocator.havips")
    blocks = {sid: block for sid, (_, block) in zip(subnet_ids, layout.subnets, strict=True)}
    stored = {str(r["id"]): (str(r["vpc_id"]), str(r["subnet_id"]), IPv4Address(r["address"])) for r in rows}

    per_vpc = Counter((vpc, address) for vpc, _, address in stored.values())
    duplicates = sum(c - 1 for c in per_vpc.values() if c > 1)
    reserved_hits = sum(1 for _, sid, address in stored.values() if address in reserved(blocks[sid]))

    answered = {o.havip_id: (o.subnet_id, IPv4Address(o.address)) for o in outcomes if o.havip_id and o.address}
    answers_match = answered == {hid: (sid, address) for hid, (_, sid, address) in stored.items()}

    expected_per_subnet = Counter(subnet_ids[i % len(subnet_ids)] for i in range(n))
    lowest_ok = True
    for sid, block in blocks.items():
        got = sorted(address for _, s, address in stored.values() if s == sid)
        first = block.network_address + 2
        want = [first + k for k in range(expected_per_subnet[sid])]
        lowest_ok = lowest_ok and got == want

    event_counts = Counter(hid for _, hid, _ in tap.received)
    events = {hid: IPv4Address(address) for _, hid, address in tap.received}
    events_ok = (
        set(event_counts) == set(stored)
        and all(c == 1 for c in event_counts.values())
        and all(events[hid] == address for hid, (_, _, address) in stored.items())
    )
    checks = {
        "all_201": all(o.status == 201 for o in outcomes),
        "count_equals_n": len(stored) == n and len(answered) == n,
        "zero_duplicates": duplicates == 0,
        "no_reserved_address": reserved_hits == 0,
        "answers_match_database": answers_match,
        "lowest_contiguous_per_subnet": lowest_ok,
        "one_event_per_havip": events_ok,
    }
    return {"rows": len(stored), "duplicates": duplicates, "reserved_hits": reserved_hits, "checks": checks}


# ---- references ---------------------------------------------------------------------------------------------


async def insert_reference(database_url: str, n: int, concurrency: int) -> dict[str, Any]:
    """Bare one-row INSERT transactions (autocommit) on the same Postgres, in the sandbox database."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            """CREATE SCHEMA bench;
               CREATE TABLE bench.ref_insert (
                   id uuid PRIMARY KEY, vpc_id uuid NOT NULL, address inet NOT NULL,
                   created_at timestamptz NOT NULL DEFAULT now())"""
        )
        sql = "INSERT INTO bench.ref_insert (id, vpc_id, address) VALUES ($1, $2, $3)"
        vpc = uuid.uuid4()
        for i in range(20):  # warm: prepared statement, caches
            await conn.execute(sql, uuid.uuid4(), vpc, IPv4Address(int(BASE) + i))
        latencies = []
        started = time.perf_counter()
        for i in range(n):
            t0 = time.perf_counter()
            await conn.execute(sql, uuid.uuid4(), vpc, IPv4Address(int(BASE) + 1000 + i))
            latencies.append(time.perf_counter() - t0)
        single_wall = time.perf_counter() - started
    finally:
        await conn.close()

    pool_size = min(concurrency, ALLOCATOR_POOL_SIZE)
    pool = await asyncpg.create_pool(database_url, min_size=pool_size, max_size=pool_size)
    try:
        await asyncio.gather(*(pool.execute("SELECT 1") for _ in range(pool_size)))
        gate = asyncio.Event()
        slots = asyncio.Semaphore(concurrency)
        pool_latencies: list[float] = []
        base = int(BASE) + 1000 + n

        async def one(i: int) -> None:
            await gate.wait()
            async with slots:
                t0 = time.perf_counter()
                await pool.execute(sql, uuid.uuid4(), vpc, IPv4Address(base + i))
                pool_latencies.append(time.perf_counter() - t0)

        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        await asyncio.sleep(0)
        started = time.perf_counter()
        gate.set()
        await asyncio.gather(*tasks)
        pool_wall = time.perf_counter() - started
    finally:
        await pool.close()
    return {
        "single_connection": {
            "rate_per_s": n / single_wall,
            "latency_ms": latency_summary_ms(latencies),
        },
        "pool": {
            "connections": pool_size,
            "in_flight": min(concurrency, n),
            "rate_per_s": n / pool_wall,
            "latency_ms": latency_summary_ms(pool_latencies),
        },
    }


async def server_time(client: httpx.AsyncClient) -> dict[str, float]:
    """The allocator's own histogram of POST /v1/havips (time inside the ASGI app, not in the accept queue)."""
    text = (await client.get("/metrics")).text
    post = {"method": "POST", "route": "/v1/havips"}
    total_s = value(text, "havip_api_request_duration_seconds_sum", post)
    count = value(text, "havip_api_request_duration_seconds_count", post) or 0.0
    within_100ms = value(text, "havip_api_request_duration_seconds_bucket", {**post, "le": "0.1"})
    return {
        "mean_ms": (math.nan if total_s is None else total_s) / count * 1000 if count else math.nan,
        "share_within_100ms": (math.nan if within_100ms is None else within_100ms) / count if count else math.nan,
    }


# ---- one layout ---------------------------------------------------------------------------------------------


def ok_json(response: httpx.Response) -> Any:
    if response.status_code not in (200, 201):
        raise RuntimeError(
            f"{response.request.method} {response.request.url}: {response.status_code} {response.text}"
        )
    return response.json()


async def create_inventory(client: httpx.AsyncClient, layout: Layout) -> list[str]:
    vpc_ids = [
        ok_json(await client.post("/v1/vpcs", json={"name": f"bench-{i}", "cidr": str(cidr)}))["id"]
        for i, cidr in enumerate(layout.vpcs)
    ]
    return [
        ok_json(
            await client.post("/v1/subnets", json={"vpc_id": vpc_ids[v], "name": f"bench-{i}", "cidr": str(block)})
        )["id"]
        for i, (v, block) in enumerate(layout.subnets)
    ]


async def run_layout(kind: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    layout, quota = plan(kind, args.n, args.subnets)
    say(f"[{kind}] {describe_layout(layout)}; HAVIP_QUOTA_PER_VPC={quota}")
    async with sandbox(kind) as box:
        profile = args.profile / f"allocator-{kind}.prof" if args.profile else None
        allocator = AllocatorProcess(box.database_url, box.amqp_url, quota, workdir, profile_to=profile)
        try:
            allocator.spawn()
            await allocator.wait_ready(READY_TIMEOUT_S)
            say(f"[{kind}] allocator pid {allocator.pid} ready on {allocator.url}")
            result = await measure(layout, quota, allocator, box.database_url, box.amqp_url, args)
        finally:
            await allocator.stop()
        if profile is not None and profile.exists():
            result["profile"] = str(profile)
            show_profile(profile, kind)
    say(f"[{kind}] torn down: allocator stopped, database and vhost dropped")
    return result


async def measure(
    layout: Layout,
    quota: int,
    allocator: AllocatorProcess,
    database_url: str,
    amqp_url: str,
    args: argparse.Namespace,
) -> dict[str, Any]:
    n, concurrency = args.n, args.concurrency
    async with client_fleet(
        allocator.url,
        allocator.token,
        clients=min(args.clients or concurrency, concurrency),
        concurrency=concurrency,
        timeout_s=REQUEST_TIMEOUT_S,
    ) as clients:
        client = clients[0]
        subnet_ids = await create_inventory(client, layout)
        conn = await asyncpg.connect(database_url)
        try:
            async with tap_events(amqp_url) as tap:
                # Quiet first: the server closes connections idle for 5 s (uvicorn's keep-alive timeout).
                background = await wait_for_quiet(below=args.quiet_below / 100, timeout_s=args.quiet_wait)
                # Open the client's connections and the allocator's pool before the clock starts.
                # One GET /healthz per connection opens them all; GET /readyz, as many at once as the
                # allocator's pool holds, opens its database connections.
                warm = await burst(clients, concurrency, concurrency, lambda c, _: c.get("/healthz"))
                warm += await burst(
                    clients, 2 * ALLOCATOR_POOL_SIZE, ALLOCATOR_POOL_SIZE, lambda c, _: c.get("/readyz")
                )
                if any(o.status != 200 for o in warm):
                    raise RuntimeError(f"warm-up failed: {rate_and_latency(warm)['statuses']}")
                backends = [
                    r["pid"]
                    for r in await conn.fetch(
                        """SELECT pid FROM pg_stat_activity
                           WHERE datname = current_database() AND pid <> pg_backend_pid()"""
                    )
                ]
                say(
                    f"[{layout.kind}] firing {n} allocations, {min(concurrency, n)} in flight "
                    f"(machine {background:.0%} busy before the warm-up)"
                )

                async def allocate(c: httpx.AsyncClient, i: int) -> httpx.Response:
                    return await c.post("/v1/havips", json={"subnet_id": subnet_ids[i % len(subnet_ids)]})

                before = CpuSnapshot.take(allocator.pid, backends)
                done = asyncio.Event()
                sampler = asyncio.create_task(sample_backends(conn, done))
                try:
                    outcomes = await burst(clients, n, concurrency, allocate)
                finally:
                    done.set()
                    backend_states = await sampler
                after = CpuSnapshot.take(allocator.pid, backends)
                for o in outcomes:
                    o.subnet_id = subnet_ids[o.index % len(subnet_ids)]
                last_response = max(o.finished for o in outcomes)
                drain = await wait_drained(conn, tap, n, last_response)
            allocations = rate_and_latency(outcomes)
            inside = await server_time(client)
            verification = await verify(conn, layout, subnet_ids, outcomes, tap, n)
            verification["checks"]["outbox_drained"] = drain["outbox_left"] == 0
        finally:
            await conn.close()
        say(f"[{layout.kind}] {allocations['ok']}/{n} allocated at {allocations['rate_per_s']:.0f}/s; references…")
        floor = rate_and_latency(await burst(clients, n, concurrency, lambda c, _: c.get("/healthz")))
    reference = await insert_reference(database_url, n, concurrency)

    cpu = before.until(after)
    p99 = allocations["latency_ms"]["p99"]
    rate = allocations["rate_per_s"]
    goals = {
        "zero_duplicates": verification["checks"]["zero_duplicates"],
        "rate_at_least_300_per_s": rate >= GOAL_RATE,
        "p99_at_most_100_ms": p99 <= GOAL_P99_MS,
    }
    errors = [o.error for o in outcomes if o.error][:5]
    return {
        "layout": layout.kind,
        "description": describe_layout(layout),
        "n": n,
        "subnets": len(layout.subnets),
        "vpcs": len(layout.vpcs),
        "concurrency": min(concurrency, n),
        "quota_per_vpc": quota,
        "allocations": allocations,
        "server_time": inside,
        "errors_sample": errors,
        "drain": drain,
        "cpu": cpu,
        "postgres_backends_mean": backend_states,
        "background_busy_before": background,
        "noisy": bool(cpu["machine_total_s"]) and cpu["other_s"] / cpu["machine_total_s"] > NOISY_SHARE,
        "verification": verification,
        "reference": {
            "bare_insert": reference,
            "http_floor_healthz": floor,
            "ratio_to_single_connection_insert": rate / reference["single_connection"]["rate_per_s"],
            "ratio_to_pool_insert": rate / reference["pool"]["rate_per_s"],
            "ratio_to_http_floor": rate / floor["rate_per_s"],
        },
        "littles_law_rate_for_p99_goal": min(concurrency, n) / (GOAL_P99_MS / 1000),
        "goals": goals,
        "pass": all(goals.values()) and all(verification["checks"].values()),
    }


def show_profile(path: Path, kind: str, top: int = 30) -> None:
    say(f"[{kind}] allocator profile (cProfile, {path}), top {top} by own time:")
    stats = pstats.Stats(str(path), stream=sys.stderr)
    stats.sort_stats("tottime").print_stats(top)


# ---- report -------------------------------------------------------------------------------------------------


def mark(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def render(result: dict[str, Any]) -> str:
    a, r, d, c, v = (
        result["allocations"],
        result["reference"],
        result["drain"],
        result["cpu"],
        result["verification"],
    )
    lat = a["latency_ms"]
    single, pool = r["bare_insert"]["single_connection"], r["bare_insert"]["pool"]
    floor = r["http_floor_healthz"]
    g = result["goals"]
    checks = ", ".join(f"{name} {'ok' if passed else 'FAILED'}" for name, passed in v["checks"].items())
    share = c["machine_busy_s"] / c["machine_total_s"] * 100 if c["machine_total_s"] else math.nan
    lines = [
        f"P4 [{result['layout']}] {result['n']} allocations over {result['description']}, "
        f"{result['concurrency']} in flight, quota {result['quota_per_vpc']}/VPC",
        f"  allocations   {a['ok']}/{a['requests']} × 201 in {a['wall_s']:.3f} s = {a['rate_per_s']:,.0f}/s"
        f"   statuses {a['statuses']}",
        f"  latency ms    p50 {lat['p50']:.1f}  p95 {lat['p95']:.1f}  p99 {lat['p99']:.1f}  max {lat['max']:.1f}"
        f"   (inside the app: mean {result['server_time']['mean_ms']:.1f} ms)",
        f"  reference     bare INSERT commit: 1 connection {single['rate_per_s']:,.0f}/s "
        f"(p50 {single['latency_ms']['p50']:.2f} ms); pool of {pool['connections']} with {pool['in_flight']} "
        f"in flight {pool['rate_per_s']:,.0f}/s",
        f"                HTTP floor GET /healthz, same client: {floor['rate_per_s']:,.0f}/s "
        f"(p99 {floor['latency_ms']['p99']:.1f} ms)",
        f"  ratios        allocations / bare insert: {r['ratio_to_single_connection_insert']:.3f} (1 conn), "
        f"{r['ratio_to_pool_insert']:.3f} (pool); / HTTP floor: {r['ratio_to_http_floor']:.2f}",
        f"  outbox        empty {d['outbox_empty_after_ms']:.0f} ms after the last response; "
        f"{d['events_received']} havip.allocated events, last {d['last_event_after_ms']:.0f} ms after it",
        f"  CPU (burst)   allocator {c['allocator_s']:.2f} s, "
        f"its Postgres backends {c['postgres_backends_s']:.2f} s, "
        f"benchmark client {c['benchmark_client_s']:.2f} s, other {c['other_s']:.2f} s "
        f"in {c['wall_s']:.2f} s wall; machine {share:.0f} % busy (other: {c['other_top']}); "
        f"{result['background_busy_before']:.0%} busy before the warm-up",
        f"  Postgres      the allocator's backends during the burst, mean: {result['postgres_backends_mean']}",
        f"  checks        {checks}",
        f"  goals         zero duplicates {mark(g['zero_duplicates'])}; "
        f"≥ {GOAL_RATE:.0f}/s {mark(g['rate_at_least_300_per_s'])} ({a['rate_per_s']:,.0f}/s); "
        f"p99 ≤ {GOAL_P99_MS:.0f} ms {mark(g['p99_at_most_100_ms'])} ({lat['p99']:.1f} ms)"
        f"  → {mark(result['pass'])}",
    ]
    if not g["p99_at_most_100_ms"]:
        lines.append(
            f"  note          {result['concurrency']} in flight with p99 ≤ {GOAL_P99_MS:.0f} ms needs "
            f"≈ {result['littles_law_rate_for_p99_goal']:,.0f} allocations/s (Little's law)"
        )
    if c["machine_total_s"] and c["other_s"] / c["machine_total_s"] > NOISY_SHARE:
        lines.append(
            f"  NOISY         other processes took {c['other_s'] / c['machine_total_s']:.0%} of the machine "
            "during the burst: this run's figures are pessimistic"
        )
    if result["errors_sample"]:
        lines.append(f"  errors        {result['errors_sample']}")
    return "\n".join(lines)


# ---- main ---------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.allocations",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--n", type=int, default=1000, help="allocations (default 1000)")
    parser.add_argument("--subnets", type=int, default=10, help="subnets (default 10)")
    parser.add_argument("--concurrency", type=int, default=None, help="most requests in flight (default: n)")
    parser.add_argument(
        "--clients",
        type=int,
        default=None,
        help="httpx.AsyncClients sharing the connections (default: one per connection; 1 = one big pool)",
    )
    parser.add_argument("--layout", choices=(*LAYOUTS, "both"), default="both", help="VPC layout (default both)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        default=None,
        help="run the allocator under cProfile (slower!), keep DIR/allocator-<layout>.prof, print its top",
    )
    parser.add_argument(
        "--quiet-below",
        type=float,
        default=10.0,
        help="before each burst, wait for the machine to be less than this %% busy (default 10)",
    )
    parser.add_argument(
        "--quiet-wait", type=float, default=60.0, help="…but at most this long, s (default 60; 0: do not wait)"
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="deadline for the whole run, s (default 600)")
    fill = parser.add_argument_group("fill curve (P7, bench/fill_curve.py): instead of the concurrent burst")
    fill.add_argument(
        "--fill-curve",
        action="store_true",
        help="measure one allocation at a time as one /16 subnet fills, at each of --levels HAVIPs",
    )
    fill.add_argument(
        "--levels",
        type=fill_curve.parse_levels,
        default=fill_curve.DEFAULT_LEVELS,
        help="HAVIPs in the subnet at each step, increasing (default 0,10000,50000)",
    )
    fill.add_argument("--samples", type=int, default=200, help="allocations measured at each level (default 200)")
    fill.add_argument(
        "--prefill",
        choices=("sql", "api"),
        default="sql",
        help="fill by one INSERT into the allocator's table (default) or by POST /v1/havips, 10 in flight",
    )
    args = parser.parse_args(argv)
    if args.fill_curve:
        if not 1 <= args.samples <= 10_000:
            parser.error("--samples must be 1..10000")
        try:
            fill_curve.check_plan(args.levels, args.samples)
        except ValueError as exc:
            parser.error(str(exc))
    if args.concurrency is None:
        args.concurrency = args.n
    if not 1 <= args.n <= MAX_N:
        parser.error(f"--n must be 1..{MAX_N}")
    if not 1 <= args.subnets <= MAX_SUBNETS:
        parser.error(f"--subnets must be 1..{MAX_SUBNETS}")
    if not 1 <= args.concurrency <= MAX_CONCURRENCY:
        parser.error(f"--concurrency must be 1..{MAX_CONCURRENCY}")
    args.concurrency = min(args.concurrency, args.n)
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    if args.clients is not None and not 1 <= args.clients <= MAX_CONCURRENCY:
        parser.error(f"--clients must be 1..{MAX_CONCURRENCY}")
    if not 0 <= args.quiet_wait <= 600 or not 0 < args.quiet_below <= 100:
        parser.error("--quiet-wait must be 0..600 s and --quiet-below 0..100 %")
    if not 1 <= args.timeout <= 3600:
        parser.error("--timeout must be 1..3600 s")
    try:
        plan("one-vpc", args.n, args.subnets)
    except ValueError as exc:
        parser.error(str(exc))
    return args


async def run(args: argparse.Namespace) -> dict[str, Any]:
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if task is not None:  # SIGTERM like Ctrl-C: cancel, so every teardown runs
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    command = " ".join(["python -m bench.allocations", *sys.argv[1:]])
    if args.fill_curve:
        with tempfile.TemporaryDirectory(prefix="havip-bench-") as tmp:
            async with asyncio.timeout(args.timeout):
                return {**await fill_curve.run_curve(args, Path(tmp)), "command": command}
    kinds = LAYOUTS if args.layout == "both" else (args.layout,)
    results = []
    with tempfile.TemporaryDirectory(prefix="havip-bench-") as tmp:
        async with asyncio.timeout(args.timeout):
            for kind in kinds:
                results.append(await run_layout(kind, args, Path(tmp)))
    return {
        "benchmark": "P4",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
        "machine": machine(),
        "parameters": {k: v for k, v in vars(args).items() if k != "json"},
        "layouts": results,
        "pass": all(r["pass"] for r in results),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    skip_sniffio_probe()
    raise_open_files_limit(2 * args.concurrency + 1024)
    try:
        report = asyncio.run(run(args))
    except (KeyboardInterrupt, asyncio.CancelledError):  # Ctrl-C, or SIGTERM (which cancels the run)
        say("interrupted; everything the benchmark made was torn down")
        return 130
    except Exception as exc:
        say("".join(traceback.format_exception(exc)).rstrip())
        say(f"benchmark failed: {exc!r}; everything it made was torn down")
        return 2
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    elif args.fill_curve:
        print(fill_curve.render(report))
    else:
        m = report["machine"]
        print(f"{report['date']}  {m['host']}: {m['cores']} cores ({m['cpu']}), Python {m['python']}")
        print(f"{report['command']}\n")
        print("\n\n".join(render(r) for r in report["layouts"]))
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
