"""P7 — allocation as a subnet fills (docs/contract.md#figures): the latency of one allocation with 0, 10,000 and
50,000 HAVIPs already in one /16, against an empty /16 and a bare INSERT measured in the same moments.

    python -m bench.allocations --fill-curve [--levels 0,10000,50000] [--samples 200] [--prefill sql|api] [--json]

On a database and a RabbitMQ virtual host of its own:

1. starts `python -m services.allocator` as a separate process (own process group, random token, free port,
   log level WARNING), with HAVIP_QUOTA_PER_VPC raised to hold the largest level and every sample, and creates
   through the API two VPCs, each with one /16 subnet: the one that fills (10.0.0.0/16, 65,533 usable
   addresses) and the empty reference (10.1.0.0/16), where 20 warm-up allocations (connections, prepared
   statements) are made and released;
2. for each level, in increasing order, fills the first subnet up to that many HAVIPs:
   * `--prefill sql` (default): one INSERT … SELECT into allocator.havips of the lowest free addresses — the
     same table, constraints, indexes and triggers (free ranges, per-subnet count) as the API's INSERT, so the
     tables an allocation reads end up as 50,000 API calls would leave them, minus the `havip.allocated`
     events (which the relay would have published and deleted from the outbox: nothing of them stays);
   * `--prefill api`: POST /v1/havips, 10 in flight, then waits for the outbox to be empty (the check that
     the bulk INSERT is faithful: compare the two curves);
   then `VACUUM (ANALYZE)` of the allocator's tables (so that the autovacuum the prefill triggers does not
   land in the measurement — in service it would have run long before), and waits for the machine to be quiet;
3. measures `--samples` rounds, one request at a time, nothing else in flight: a bare one-row INSERT commit
   on the same Postgres (asyncpg, autocommit), one POST /v1/havips in the empty /16 and one in the filled
   /16 (these two in alternating order; no address: the lowest free one), each timed with perf_counter
   around the call, so that all three see the same moments of a noisy machine; each answer must be the
   next lowest address; the empty subnet's HAVIPs are released again (through the API) after the level;
4. replays, at the same level, what allocation read before migration 0005 — every address taken in the
   subnet, scanned for the lowest free one, and a count of the VPC's HAVIPs for the quota — and what it
   reads now (one probe of the free ranges, the sum of the per-subnet counts), database round trips only;
5. tears everything down (allocator by process group, database and vhost dropped), also on failure.

Goal (P7, docs/contract.md#figures): the median allocation with the largest level in the subnet within 1.5× of the
median in the empty /16, measured in the same rounds. The ratio to the median at the first level is reported beside
the bare INSERT's own ratio between the same moments: on a shared machine the load changes between levels (minutes
apart), and that ratio moves with it, the paired one does not.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from bench.common import (
    AllocatorProcess,
    client_fleet,
    latency_summary_ms,
    machine,
    sandbox,
    say,
    wait_for_quiet,
)
from tests.waiting import eventually

GOAL_RATIO = 1.5
DEFAULT_LEVELS = (0, 10_000, 50_000)
BLOCK = IPv4Network("10.0.0.0/16")
EMPTY_BLOCK = IPv4Network("10.1.0.0/16")  # the reference: allocations in an empty /16 of another VPC
WARMUP = 20
REPLAYS = 21  # repetitions of the before/after database probes (median reported)
API_PREFILL_IN_FLIGHT = 10
READY_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 60.0
DRAIN_TIMEOUT_S = 300.0

# What allocation read before migration 0005 (services/allocator/subnets/service.py `taken_addresses`, and the
# quota count of services/allocator/havips/service.py), replayed here to show its cost at each level.
FORMER_TAKEN = """SELECT address AS a FROM allocator.havips WHERE subnet_id = $1
                  UNION ALL
                  SELECT private_ip FROM allocator.instances WHERE subnet_id = $1"""
FORMER_QUOTA_COUNT = "SELECT count(*) FROM allocator.havips WHERE vpc_id = $1"
# What it reads now (services/allocator/subnets/service.py `_LOWEST_FREE`, the quota sum of havips/service.py).
LOWEST_FREE = "SELECT lo FROM allocator.free_ranges WHERE subnet_id = $1 ORDER BY hi LIMIT 1"
QUOTA_ROW = "SELECT sum(havips) FROM allocator.subnet_havip_counts WHERE vpc_id = $1"


def former_lowest_free(net: IPv4Network, taken: Sequence[IPv4Address]) -> IPv4Address | None:
    """The lowest usable address not taken, as services/allocator/domain/addressing.py computed it before."""
    candidate = int(net.network_address) + 2
    last = int(net.broadcast_address) - 1
    for used in sorted({n for n in map(int, taken) if candidate <= n <= last}):
        if used > candidate:
            break
        if used == candidate:
            candidate += 1
    return IPv4Address(candidate) if candidate <= last else None


def parse_levels(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"levels are comma-separated integers, got {text!r}") from None
    if not levels or list(levels) != sorted(set(levels)) or levels[0] < 0:
        raise argparse.ArgumentTypeError("levels must be distinct, increasing and not negative")
    return levels


def check_plan(levels: Sequence[int], samples: int) -> None:
    """Each level must leave room for the samples measured at the one before, and the last must fit the /16."""
    for below, level in itertools.pairwise(levels):
        if level < below + samples:
            raise ValueError(f"level {level} is below {below} + {samples} samples measured at {below}")
    usable = BLOCK.num_addresses - 3
    if levels[-1] + samples > usable:
        raise ValueError(f"{levels[-1]} + {samples} samples do not fit the {usable} usable addresses of {BLOCK}")


def ok_json(response: httpx.Response) -> Any:
    if response.status_code not in (200, 201):
        raise RuntimeError(
            f"{response.request.method} {response.request.url}: {response.status_code} {response.text}"
        )
    return response.json()


def ok_json_or_empty(response: httpx.Response) -> None:
    if response.status_code != 204:
        raise RuntimeError(
            f"{response.request.method} {response.request.url}: {response.status_code} {response.text}"
        )


async def create(client: httpx.AsyncClient, block: IPv4Network, name: str) -> tuple[str, str]:
    vpc = ok_json(await client.post("/v1/vpcs", json={"name": name, "cidr": str(block)}))
    subnet = ok_json(
        await client.post("/v1/subnets", json={"vpc_id": vpc["id"], "name": name, "cidr": str(block)})
    )
    return vpc["id"], subnet["id"]


async def held(conn: asyncpg.Connection, subnet_id: str) -> int:
    return int(
        await conn.fetchval("SELECT count(*) FROM allocator.havips WHERE subnet_id = $1", uuid.UUID(subnet_id))
    )


async def prefill_sql(conn: asyncpg.Connection, vpc_id: str, subnet_id: str, count: int) -> None:
    """`count` HAVIPs at the lowest free addresses, in one INSERT through the allocator's own table."""
    await conn.execute(
        """INSERT INTO allocator.havips (id, vpc_id, subnet_id, address)
           SELECT gen_random_uuid(), $1, $2, '0.0.0.0'::inet + a
           FROM (SELECT a FROM allocator.free_ranges f, generate_series(f.lo, f.hi) AS a
                 WHERE f.subnet_id = $2 ORDER BY a LIMIT $3) AS lowest""",
        uuid.UUID(vpc_id),
        uuid.UUID(subnet_id),
        count,
    )


async def prefill_api(
    clients: Sequence[httpx.AsyncClient], conn: asyncpg.Connection, subnet_id: str, count: int
) -> None:
    """`count` POST /v1/havips, API_PREFILL_IN_FLIGHT at a time; then the outbox drained."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(i)

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            queue.get_nowait()
            ok_json(await client.post("/v1/havips", json={"subnet_id": subnet_id}))

    await asyncio.gather(*(worker(c) for c in clients))

    async def drained() -> bool:
        return bool(await conn.fetchval("SELECT count(*) FROM allocator.outbox") == 0)

    await eventually(
        drained, timeout=DRAIN_TIMEOUT_S, interval=0.05, what="the outbox drained after the API prefill"
    )


async def timed_median_ms(call: Callable[[], Awaitable[Any]], repeat: int = REPLAYS) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        await call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


async def replay_reads(conn: asyncpg.Connection, vpc_id: str, subnet_id: str) -> dict[str, float]:
    """Median ms of what allocation reads, before migration 0005 and now (database round trips only)."""
    vpc, subnet = uuid.UUID(vpc_id), uuid.UUID(subnet_id)

    async def former() -> None:
        taken = [row["a"] for row in await conn.fetch(FORMER_TAKEN, subnet)]
        former_lowest_free(BLOCK, taken)
        await conn.fetchval(FORMER_QUOTA_COUNT, vpc)

    async def now() -> None:
        await conn.fetchval(LOWEST_FREE, subnet)
        await conn.fetchval(QUOTA_ROW, vpc)

    return {"former_reads_ms": await timed_median_ms(former), "current_reads_ms": await timed_median_ms(now)}


async def measure_level(
    client: httpx.AsyncClient, conn: asyncpg.Connection, filled: str, empty: str, level: int, samples: int
) -> dict[str, Any]:
    """`samples` rounds, one request at a time: a bare INSERT commit, an allocation in the empty subnet and one
    in the filled subnet (these two in alternating order), so that all three see the same moments of a noisy
    machine. Each answer must be the next lowest address; the empty subnet's allocations are released after."""
    first_filled = int(BLOCK.network_address) + 2
    first_empty = int(EMPTY_BLOCK.network_address) + 2
    insert = "INSERT INTO bench.ref_insert (id, address) VALUES ($1, $2)"
    times: dict[str, list[float]] = {"filled": [], "empty": [], "insert": []}
    wrong: list[str] = []
    made_empty: list[str] = []

    async def allocate(which: str, expected: int) -> None:
        t0 = time.perf_counter()
        response = await client.post("/v1/havips", json={"subnet_id": filled if which == "filled" else empty})
        times[which].append(time.perf_counter() - t0)
        body = ok_json(response)
        if which == "empty":
            made_empty.append(body["id"])
        if body["address"] != str(IPv4Address(expected)):
            wrong.append(f"{which}: {body['address']} instead of {IPv4Address(expected)}")

    for i in range(samples):
        t0 = time.perf_counter()
        await conn.execute(insert, uuid.uuid4(), IPv4Address(first_filled + level + i))
        times["insert"].append(time.perf_counter() - t0)
        pair = [("empty", first_empty + i), ("filled", first_filled + level + i)]
        for which, expected in pair if i % 2 == 0 else reversed(pair):
            await allocate(which, expected)
    for havip_id in made_empty:  # through the API: the empty subnet is empty again for the next level
        if (await client.delete(f"/v1/havips/{havip_id}")).status_code != 204:
            raise RuntimeError(f"could not release {havip_id} of the empty subnet")
    return {
        "allocation_ms": latency_summary_ms(times["filled"]),
        "empty_subnet_allocation_ms": latency_summary_ms(times["empty"]),
        "bare_insert_ms": latency_summary_ms(times["insert"]),
        "not_the_lowest": wrong[:5],
        "all_lowest": not wrong,
    }


async def run_curve(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    levels: tuple[int, ...] = args.levels
    samples: int = args.samples
    quota = levels[-1] + samples * len(levels)
    async with sandbox("fill") as box:
        allocator = AllocatorProcess(box.database_url, box.amqp_url, quota + WARMUP, workdir)
        try:
            allocator.spawn()
            await allocator.wait_ready(READY_TIMEOUT_S)
            say(
                f"[fill] allocator pid {allocator.pid} ready on {allocator.url}; "
                f"HAVIP_QUOTA_PER_VPC={quota + WARMUP}"
            )
            async with client_fleet(
                allocator.url,
                allocator.token,
                clients=API_PREFILL_IN_FLIGHT,
                concurrency=API_PREFILL_IN_FLIGHT,
                timeout_s=REQUEST_TIMEOUT_S,
            ) as clients:
                client = clients[0]
                vpc_id, subnet_id = await create(client, BLOCK, "fill")
                _, empty_subnet = await create(client, EMPTY_BLOCK, "empty")
                warm = [
                    ok_json(await client.post("/v1/havips", json={"subnet_id": empty_subnet}))
                    for _ in range(WARMUP)
                ]
                for havip in warm:
                    ok_json_or_empty(await client.delete(f"/v1/havips/{havip['id']}"))
                conn = await asyncpg.connect(box.database_url)
                try:
                    await conn.execute(
                        """CREATE SCHEMA bench;
                           CREATE TABLE bench.ref_insert (
                               id uuid PRIMARY KEY, address inet NOT NULL,
                               created_at timestamptz NOT NULL DEFAULT now())"""
                    )
                    results = []
                    for level in levels:
                        need = level - await held(conn, subnet_id)
                        started = time.perf_counter()
                        if need > 0 and args.prefill == "sql":
                            await prefill_sql(conn, vpc_id, subnet_id, need)
                        elif need > 0:
                            await prefill_api(clients, conn, subnet_id, need)
                        prefill_s = time.perf_counter() - started
                        await conn.execute(
                            "VACUUM (ANALYZE) allocator.havips, allocator.free_ranges, "
                            "allocator.subnet_havip_counts, allocator.outbox, bench.ref_insert"
                        )
                        holding = await held(conn, subnet_id)
                        ranges = await conn.fetchval(
                            "SELECT count(*) FROM allocator.free_ranges WHERE subnet_id = $1", uuid.UUID(subnet_id)
                        )
                        busy = await wait_for_quiet(below=args.quiet_below / 100, timeout_s=args.quiet_wait)
                        say(
                            f"[fill] {holding:,} HAVIPs in {BLOCK} (prefill {need:,} by {args.prefill} in "
                            f"{prefill_s:.1f} s), machine {busy:.0%} busy; measuring {samples} allocations…"
                        )
                        measured = await measure_level(client, conn, subnet_id, empty_subnet, holding, samples)
                        replays = await replay_reads(conn, vpc_id, subnet_id)
                        results.append(
                            {
                                "havips": holding,
                                "free_ranges": ranges,
                                "prefill": {"by": args.prefill, "count": max(need, 0), "seconds": prefill_s},
                                "busy_before": busy,
                                **measured,
                                **replays,
                            }
                        )
                    duplicates = await conn.fetchval(
                        "SELECT count(*) - count(DISTINCT address) FROM allocator.havips WHERE vpc_id = $1",
                        uuid.UUID(vpc_id),
                    )
                finally:
                    await conn.close()
        finally:
            await allocator.stop()
    say("[fill] torn down: allocator stopped, database and vhost dropped")
    base = results[0]["allocation_ms"]["p50"]
    base_insert = results[0]["bare_insert_ms"]["p50"]
    for r in results:
        r["p50_ratio_to_empty_subnet"] = r["allocation_ms"]["p50"] / r["empty_subnet_allocation_ms"]["p50"]
        r["p99_ratio_to_empty_subnet"] = r["allocation_ms"]["p99"] / r["empty_subnet_allocation_ms"]["p99"]
        r["p50_ratio_to_first"] = r["allocation_ms"]["p50"] / base
        r["p99_ratio_to_first"] = r["allocation_ms"]["p99"] / results[0]["allocation_ms"]["p99"]
        r["bare_insert_p50_ratio_to_first"] = r["bare_insert_ms"]["p50"] / base_insert
    last = results[-1]
    goals = {
        "p50_within_1_5x_of_empty_subnet": last["p50_ratio_to_empty_subnet"] <= GOAL_RATIO,
        "every_answer_the_lowest": all(r["all_lowest"] for r in results),
        "zero_duplicates": duplicates == 0,
    }
    return {
        "benchmark": "P7",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "block": str(BLOCK),
        "levels": list(levels),
        "samples": samples,
        "prefill": args.prefill,
        "quota_per_vpc": quota + WARMUP,
        "results": results,
        "duplicates": duplicates,
        "goals": goals,
        "pass": all(goals.values()),
    }


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"{report['date']}  {m['host']}: {m['cores']} cores ({m['cpu']}), Python {m['python']}",
        f"{report['command']}\n",
        f"P7 fill curve: at each level, {report['samples']} rounds one request at a time: a bare INSERT commit, "
        f"an allocation in an empty /16 ({EMPTY_BLOCK}) and one in the filled /16 ({report['block']}); "
        f"prefill by {report['prefill']}; quota {report['quota_per_vpc']:,}/VPC",
        "  HAVIPs   filled /16: allocation ms p50 / p99   empty /16: p50 / p99   filled÷empty p50 / p99"
        "   ÷p50 at first level   bare INSERT p50 / p99   reads before 0005 / now, ms",
    ]
    for r in report["results"]:
        a, e, b = r["allocation_ms"], r["empty_subnet_allocation_ms"], r["bare_insert_ms"]
        lines.append(
            f"  {r['havips']:>7,}   {a['p50']:24.2f} / {a['p99']:6.2f}   {e['p50']:13.2f} / {e['p99']:6.2f}"
            f"   {r['p50_ratio_to_empty_subnet']:12.2f} / {r['p99_ratio_to_empty_subnet']:4.2f}"
            f"   {r['p50_ratio_to_first']:19.2f}   {b['p50']:13.2f} / {b['p99']:5.2f}"
            f"   {r['former_reads_ms']:17.2f} / {r['current_reads_ms']:.2f}"
        )
    g = report["goals"]
    last = report["results"][-1]
    lines.append(
        f"  goals    p50 with {last['havips']:,} HAVIPs ≤ {GOAL_RATIO}× p50 in the empty /16: "
        f"{'PASS' if g['p50_within_1_5x_of_empty_subnet'] else 'FAIL'} "
        f"({last['p50_ratio_to_empty_subnet']:.2f}×); "
        f"(against the p50 at {report['results'][0]['havips']:,}: {last['p50_ratio_to_first']:.2f}×, the bare "
        f"INSERT's {last['bare_insert_p50_ratio_to_first']:.2f}×); "
        f"every answer the lowest {'ok' if g['every_answer_the_lowest'] else 'FAILED'}; "
        f"duplicates {report['duplicates']}  → {'PASS' if report['pass'] else 'FAIL'}"
    )
    if any(r["busy_before"] > 0.10 for r in report["results"]):
        lines.append(
            "  NOISY    the machine was more than 10 % busy before a level: the ratios to the empty /16 (measured "
            "in the same moments) hold better than those to the first level"
        )
    return "\n".join(lines)
