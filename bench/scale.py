"""P2 — mass failover — with 1 and with K binding replicas in one run: the delay, CPU and memory per replica.

    .venv/bin/python -m bench.scale [--n 10000] [--replicas 1 3] [--refresh 0] [--refresh-s 10] [--commits 50]
                                    [--quiet-wait 30] [--ring-blocks B] [--json]

What one run does, on a database and RabbitMQ virtual host of its own (bench/common.py `sandbox`), with the pieces
of bench/failover.py (the lab, the inventory as the allocator announces it, tcpdump as the reference, the mass
failover itself):

1. a lab on the benchmarking range 198.18.0.0/15: one server more than there are phases (`cvma`, `cvmb`, …) on one
   bridge, a capture port in the root namespace; the three services start as processes (tests/e2e/system.py),
   the watcher capturing the port, the binding service as its first replica;
2. N HAVIPs (198.18.16.0 onwards) reach the binding as the allocator announces them; `cvma` claims them all
   (5 GARPs each);
3. one phase per `--replicas` count, in order, each moving the N HAVIPs to the next server:
   a. the binding service is scaled to that many replicas (`python -m services.binding`, each its own
      `HAVIP_REPLICA_ID`, SIGTERM to scale down) and the run waits until every partition is owned and each replica
      owns ⌊P/K⌋ or ⌈P/K⌉ of them (`havip_binding_partitions_owned`);
   b. the references of the phase: the machine's busy share (the run waits, at most `--quiet-wait` s, for < 20 %)
      and `--commits` bare Postgres commits (a one-row upsert transaction, bench/failover.py `bare_commit_s`);
   c. **P2**: the next server sends 5 GARPs for every HAVIP (keepalived's burst) while tcpdump captures the port;
      the figure is the last GARP on the wire → the N-th committed transition seen (bench/failover.py
      `mass_failover`);
   d. the CPU time of every process over the phase, from /proc/<pid>/stat (utime + stime), from just before the
      burst to the N-th commit seen, and to the binding's outbox drained (every `havip.binding.changed` of the
      storm published): each replica, the watcher, the allocator, this database's Postgres backends, the rest of
      Postgres, RabbitMQ (`beam.smp`, shared by every virtual host on the machine), the benchmark itself and the
      rest of the machine; and each replica's resident memory (VmRSS) at the end of the phase;
   e. with `--refresh R`: the new holder refreshes its N HAVIPs at R GARPs/s (bench/failover.py `PacedSender`)
      and, after 2 s to settle, the CPU of every process over `--refresh-s` seconds is taken beside the claims
      the watcher published and the refreshes the replicas decided in that window (their counters): the
      steady-state cost of a claim in each tier.

Everything it started is stopped and removed at the end, also on failure or Ctrl-C: processes by their process
group, the lab's namespaces, the database and the virtual host.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from bench.common import (
    all_processes_cpu_s,
    latency_summary_ms,
    machine,
    machine_cpu_s,
    own_cpu_s,
    sandbox,
    say,
    wait_for_quiet,
)
from bench.failover import (
    BURST,
    HAVIP_BASE,
    SUBNET,
    PacedSender,
    announce_inventory,
    bare_commit_s,
    claim_every_havip,
    mass_failover,
    rss_mb,
    wait_until,
)
from bench.standby import Replica as BindingProcess
from bench.standby import replica_env
from tests.e2e.system import System
from tests.lab import Lab
from tests.lab.raw import RawSender
from tests.metrics_text import value
from tests.waiting import eventually

PARTITIONS = 8  # HAVIP_PARTITIONS' default: every process of the run uses it
MAX_N = 120_000  # 198.18.16.0 onwards, inside 198.18.0.0/15


# ---- the replicas -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Replica:
    name: str
    pid: int
    metrics_port: int


@contextlib.asynccontextmanager
async def stopped_at_the_end() -> AsyncIterator[list[BindingProcess]]:
    """The extra replicas started by a run, each stopped (SIGTERM, then by its process group) at its end."""
    started: list[BindingProcess] = []
    try:
        yield started
    finally:
        for process in started:
            await process.stop()


def replicas_of(system: System, extra: list[BindingProcess]) -> list[Replica]:
    """The binding's replicas alive: the system's own first, then those the run added."""
    first = system.services["binding"].process
    found = [Replica("binding-1", first.pid, system.binding_metrics_port)]
    found += [Replica(p.name, p.pid, p.metrics_port) for p in extra if p.alive()]
    return found


async def owned(client: httpx.AsyncClient, replica: Replica) -> int:
    try:
        page = await client.get(f"http://127.0.0.1:{replica.metrics_port}/metrics")
    except httpx.TransportError:
        return -1
    return int(value(page.text, "havip_binding_partitions_owned") or 0)


async def scale_to(
    count: int, system: System, extra: list[BindingProcess], box_urls: tuple[str, str], workdir: Path
) -> dict[str, int]:
    """`count` replicas alive, the partitions shared out evenly among them; returns name → partitions owned."""
    while len(replicas_of(system, extra)) < count:
        name = f"binding-{len(extra) + 2}"
        extra.append(BindingProcess(name, replica_env(*box_urls), workdir))
        extra[-1].spawn()
        await extra[-1].running()
    while len(replicas_of(system, extra)) > count:
        await [p for p in extra if p.alive()][-1].stop()  # SIGTERM: it hands its partitions over
    alive = replicas_of(system, extra)
    shares: dict[str, int] = {}
    async with httpx.AsyncClient(timeout=5.0) as client:

        async def even() -> bool:
            shares.clear()
            for replica in alive:
                shares[replica.name] = await owned(client, replica)
            low, high = PARTITIONS // count, -(-PARTITIONS // count)
            return sum(shares.values()) == PARTITIONS and all(low <= s <= high for s in shares.values())

        await eventually(even, timeout=120, interval=0.2, what=f"{PARTITIONS} partitions shared by {count}")
    return dict(shares)


async def counter_sum(client: httpx.AsyncClient, ports: Sequence[int], name: str, labels: dict[str, str]) -> float:
    """A counter summed over several processes' /metrics."""
    total = 0.0
    for port in ports:
        try:
            page = await client.get(f"http://127.0.0.1:{port}/metrics")
        except httpx.TransportError:  # a process saturated by the load may not answer in time: no figure
            return math.nan
        total += value(page.text, name, labels) or 0.0
    return total


# ---- CPU by tier --------------------------------------------------------------------------------------------


async def database_counts(conn: asyncpg.Connection) -> dict[str, int]:
    """This database's commits and rows written so far (pg_stat_database; backends report at most ~1 s late), and
    the WAL written by the whole cluster (every database on it: an upper bound for this one)."""
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    row = await conn.fetchrow(
        "SELECT xact_commit, tup_inserted, tup_updated, tup_deleted,"
        " pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint AS cluster_wal_bytes"
        " FROM pg_stat_database WHERE datname = current_database()"
    )
    return {key: int(count) for key, count in dict(row).items()} if row else {}


def counts_since(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {key: after[key] - before.get(key, 0) for key in after}


async def backend_pids(conn: asyncpg.Connection) -> set[int]:
    rows = await conn.fetch("SELECT pid FROM pg_stat_activity WHERE datname = current_database()")
    return {int(row["pid"]) for row in rows}


@dataclass(frozen=True)
class Snapshot:
    processes: dict[int, tuple[str, float]]
    own_s: float
    machine_busy_s: float
    machine_total_s: float
    at: float

    @classmethod
    def take(cls) -> Snapshot:
        busy, total = machine_cpu_s()
        return cls(all_processes_cpu_s(), own_cpu_s(), busy, total, time.monotonic())


def cpu_by_tier(
    before: Snapshot, after: Snapshot, replicas: Sequence[Replica], services: dict[str, int], backends: set[int]
) -> dict[str, Any]:
    """CPU seconds between two snapshots: each replica, each other service, Postgres, RabbitMQ, the rest."""

    def spent(pid: int) -> float:
        if pid not in after.processes:
            return 0.0
        return after.processes[pid][1] - before.processes.get(pid, ("", 0.0))[1]

    replica_s = {r.name: round(spent(r.pid), 3) for r in replicas}
    service_s = {name: round(spent(pid), 3) for name, pid in services.items()}
    known = {r.pid for r in replicas} | set(services.values()) | backends | {os.getpid()}
    postgres_other = rabbitmq = 0.0
    rest: dict[str, float] = {}
    for pid, (comm, _) in after.processes.items():
        if pid in known:
            continue
        cpu = spent(pid)
        if comm.startswith("postgres"):
            postgres_other += cpu
        elif comm in ("beam.smp", "erl_child_setup", "epmd"):
            rabbitmq += cpu
        elif cpu > 0:
            rest[comm] = rest.get(comm, 0.0) + cpu
    busy = after.machine_busy_s - before.machine_busy_s
    total = after.machine_total_s - before.machine_total_s
    return {
        "wall_s": round(after.at - before.at, 3),
        "replicas_s": replica_s,
        "services_s": service_s,
        "postgres_backends_s": round(sum(spent(pid) for pid in backends), 3),
        "postgres_other_s": round(postgres_other, 3),
        "rabbitmq_s": round(rabbitmq, 3),
        "benchmark_s": round(after.own_s - before.own_s, 3),
        "rest_top": {comm: round(cpu, 2) for comm, cpu in sorted(rest.items(), key=lambda kv: -kv[1])[:5]},
        "rest_s": round(sum(rest.values()), 3),
        "machine_busy_s": round(busy, 3),
        "machine_busy_share": round(busy / total, 2) if total else None,
    }


# ---- the run ------------------------------------------------------------------------------------------------


def server_names(count: int) -> tuple[str, ...]:
    return tuple(f"cvm{chr(ord('a') + i)}" for i in range(count))


@dataclass(frozen=True)
class Options:
    commits: int  # bare Postgres commits before each phase
    quiet_wait_s: float
    refresh: int  # refreshes/s after each phase's failover (0: none)
    refresh_s: float
    ring_blocks: int | None  # the watcher's HAVIP_RING_BLOCKS (None: its default)


async def run(n: int, counts: list[int], workdir: Path, options: Options) -> dict[str, Any]:
    addresses = [HAVIP_BASE + i for i in range(n)]
    servers = server_names(len(counts) + 1)
    result: dict[str, Any] = {
        "n": n,
        "partitions": PARTITIONS,
        "ring_blocks": options.ring_blocks,
        "machine": machine(),
        "phases": [],
    }
    async with sandbox("scale") as box:
        with Lab(SUBNET, workdir=workdir / "lab") as lab:
            hosts = [lab.add_host(name, str(IPv4Address("198.18.0.11") + i)) for i, name in enumerate(servers)]
            cap = lab.add_capture_port("cap")
            ring = {"HAVIP_RING_BLOCKS": str(options.ring_blocks)} if options.ring_blocks else {}
            with System(box.database_url, box.amqp_url, cap, workdir / "services", watcher_env=ring) as system:
                instances, _ = await announce_inventory(box, lab, addresses, servers)
                conn = await asyncpg.connect(box.database_url)
                await conn.execute("CREATE TABLE IF NOT EXISTS bench_commit (id int PRIMARY KEY, at timestamptz)")
                senders = [RawSender(h.netns, h.mac) for h in hosts]
                try:
                    async with stopped_at_the_end() as extra:
                        holder = instances[servers[0]]
                        wait = 120 + n / 500
                        await claim_every_havip(conn, senders[0], addresses, holder, rounds=BURST, timeout_s=wait)
                        for phase, count in enumerate(counts, start=1):
                            target = servers[phase]
                            say(f"phase {phase}: {count} replica(s); the HAVIPs move to {target}")
                            shares = await scale_to(
                                count, system, extra, (box.database_url, box.amqp_url), workdir / "services"
                            )
                            phase_dir = workdir / f"phase{phase}"
                            phase_dir.mkdir(parents=True)
                            figures = await one_phase(
                                conn, system, extra, shares, cap, phase_dir,
                                senders[phase], addresses, instances[target], options,
                            )  # fmt: skip
                            result["phases"].append(figures)
                            say(json.dumps(result["phases"][-1]))
                finally:
                    for sender in senders:
                        sender.close()
                    await conn.close()
    return result


async def one_phase(
    conn: asyncpg.Connection,
    system: System,
    extra: list[BindingProcess],
    shares: dict[str, int],
    cap: str,
    workdir: Path,
    sender: RawSender,
    addresses: list[IPv4Address],
    to: Any,
    options: Options,
) -> dict[str, Any]:
    replicas = replicas_of(system, extra)
    services = {
        "arp_watcher": system.services["arp_watcher"].process.pid,
        "allocator": system.services["allocator"].process.pid,
    }
    busy_before = await wait_for_quiet(below=0.2, timeout_s=options.quiet_wait_s)
    bare = [await bare_commit_s(conn) for _ in range(options.commits)]
    backends = await backend_pids(conn)
    written = await database_counts(conn)
    start = Snapshot.take()
    p2 = await mass_failover(conn, cap, workdir, sender, addresses, to)
    at_last_commit = Snapshot.take()
    say(f"P2, {len(replicas)} replica(s): {json.dumps(p2)}")
    backends |= await backend_pids(conn)
    await wait_until(
        conn, "SELECT (count(*) = 0)::int FROM binding.outbox", (), 1, timeout_s=300, what="outbox drained"
    )
    drained = Snapshot.take()
    await asyncio.sleep(1.2)  # the backends' statistics of the storm reported
    written = counts_since(written, await database_counts(conn))
    refreshing = None
    if options.refresh:
        refreshing = await steady_refreshes(conn, system, sender, addresses, replicas, services, backends, options)
    return {
        "replicas": len(replicas),
        "partitions_owned": shares,
        "busy_before": round(busy_before, 2),
        "bare_postgres_commit_ms": {k: round(v, 2) for k, v in latency_summary_ms(bare).items()},
        "p2": p2,
        "cpu_to_last_commit": cpu_by_tier(start, at_last_commit, replicas, services, backends),
        "cpu_to_outbox_drained": cpu_by_tier(start, drained, replicas, services, backends),
        "postgres_to_outbox_drained": written,
        "rss_mb": {r.name: round(rss_mb(r.pid), 1) for r in replicas}
        | {name: round(rss_mb(pid), 1) for name, pid in services.items()},
        "refreshing": refreshing,
    }


async def steady_refreshes(
    conn: asyncpg.Connection,
    system: System,
    sender: RawSender,
    addresses: list[IPv4Address],
    replicas: list[Replica],
    services: dict[str, int],
    backends: set[int],
    options: Options,
) -> dict[str, Any]:
    """The holder refreshes its HAVIPs at `options.refresh` GARPs/s: CPU by tier per claim over a window."""
    loader = PacedSender(sender, [sender.garp(a) for a in addresses], options.refresh, options.refresh_s + 10)
    ports = [r.metrics_port for r in replicas]
    watcher = [system.watcher_metrics_port]
    async with httpx.AsyncClient(timeout=30.0) as client:

        async def counters() -> tuple[float, float]:
            published = await counter_sum(client, watcher, "havip_watcher_claims_published_total", {})
            decided = await counter_sum(client, ports, "havip_claims_total", {"outcome": "refresh"})
            return published, decided

        loader.start()
        try:
            await asyncio.sleep(2)  # the load in its stride
            published0, decided0 = await counters()
            written = await database_counts(conn)
            sent0, before = loader.sent, Snapshot.take()
            await asyncio.sleep(options.refresh_s)
            after, sent1 = Snapshot.take(), loader.sent
            written = counts_since(written, await database_counts(conn))
            published1, decided1 = await counters()
        finally:
            loader.stopping.set()
            await asyncio.to_thread(loader.join, 10)
    return {
        "rate": options.refresh,
        "garps_sent": sent1 - sent0,
        "claims_published": None if math.isnan(published1 - published0) else int(published1 - published0),
        "refreshes_decided": None if math.isnan(decided1 - decided0) else int(decided1 - decided0),
        "postgres": written,
        "cpu": cpu_by_tier(before, after, replicas, services, backends),
    }


def verdict(result: dict[str, Any]) -> list[str]:
    """The goal: with more replicas, the busiest one's CPU ≤ half the single one's, the last commit no later."""
    phases = result["phases"]
    singles = [p for p in phases if p["replicas"] == 1]
    if not singles:
        return []
    single = singles[0]
    one_cpu = single["cpu_to_last_commit"]["replicas_s"]["binding-1"]
    one_delay = single["p2"]["last_garp_to_last_commit_seen_s"]
    lines = []
    for phase in phases:
        if phase["replicas"] == 1:
            continue
        busiest = max(phase["cpu_to_last_commit"]["replicas_s"].values())
        delay = phase["p2"]["last_garp_to_last_commit_seen_s"]
        ratio = busiest / one_cpu if one_cpu else float("nan")
        later = delay is None or one_delay is None or delay > one_delay
        lines.append(
            f"goal, {phase['replicas']} replicas against 1: busiest replica's CPU {busiest:.2f} s = {ratio:.2f} × "
            f"the single's {one_cpu:.2f} s ({'met' if ratio <= 0.5 else 'NOT met'}: ≤ 0.5); last commit "
            f"{delay} s against {one_delay} s ({'NOT met: later' if later else 'met: no later'})"
        )
    return lines


def report(result: dict[str, Any]) -> None:
    m = result["machine"]
    print(f"machine: {m['host']}, {m['cores']} cores ({m['cpu']}), kernel {m['kernel']}; N = {result['n']}")
    for phase in result["phases"]:
        p2, cpu, full = phase["p2"], phase["cpu_to_last_commit"], phase["cpu_to_outbox_drained"]
        print(
            f"P2  N={result['n']}, {phase['replicas']} replica(s), partitions owned {phase['partitions_owned']}: "
            f"last GARP (tcpdump) → last commit seen {p2['last_garp_to_last_commit_seen_s']} s "
            f"(binding's committed_at {p2['last_garp_to_last_committed_at_s']} s; first GARP → last commit "
            f"{p2['first_garp_to_last_commit_seen_s']} s; {p2['transitions_per_s']} transitions/s; "
            f"{p2['garps_on_wire_tcpdump']} of {p2['garps_sent']} GARPs on the wire, sent in {p2['send_s']} s)"
        )
        print(
            f"    reference: bare Postgres commit {phase['bare_postgres_commit_ms']} ms; machine "
            f"{phase['busy_before']:.0%} busy before, {cpu['machine_busy_share']:.0%} during"
        )
        for label, part in (("to the last commit", cpu), ("to the outbox drained", full)):
            print(
                f"    CPU s {label} ({part['wall_s']} s wall): replicas {part['replicas_s']}; "
                f"{part['services_s']}; postgres backends {part['postgres_backends_s']}, postgres other "
                f"{part['postgres_other_s']}; rabbitmq {part['rabbitmq_s']}; benchmark {part['benchmark_s']}; "
                f"rest {part['rest_s']} {part['rest_top']}; machine busy {part['machine_busy_s']}"
            )
        print(f"    Postgres, this database, to the outbox drained: {phase['postgres_to_outbox_drained']}")
        print(f"    RSS MB: {phase['rss_mb']}")
        refreshing = phase["refreshing"]
        if refreshing:
            part = refreshing["cpu"]
            print(
                f"    refreshes at {refreshing['rate']}/s: {refreshing['garps_sent']} GARPs sent, "
                f"{refreshing['claims_published']} claims published by the watcher, "
                f"{refreshing['refreshes_decided']} refreshes decided in {part['wall_s']} s; CPU s: replicas "
                f"{part['replicas_s']}; {part['services_s']}; postgres backends {part['postgres_backends_s']}, "
                f"postgres other {part['postgres_other_s']}; rabbitmq {part['rabbitmq_s']}; benchmark "
                f"{part['benchmark_s']}; rest {part['rest_s']} {part['rest_top']}; machine busy "
                f"{part['machine_busy_s']} ({part['machine_busy_share']:.0%}); Postgres {refreshing['postgres']}"
            )
    for line in verdict(result):
        print(line)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="HAVIPs that move at once in each phase")
    parser.add_argument(
        "--replicas", type=int, nargs="+", default=[1, 3], help="binding replicas of each phase, in order"
    )
    parser.add_argument("--refresh", type=int, default=0, help="refreshes/s of the N HAVIPs after each failover")
    parser.add_argument("--refresh-s", type=float, default=10, help="seconds of refreshes measured")
    parser.add_argument("--commits", type=int, default=50, help="bare Postgres commits before each phase")
    parser.add_argument("--quiet-wait", type=float, default=30, help="seconds to wait for a machine < 20%% busy")
    parser.add_argument(
        "--ring-blocks", type=int, help="the watcher's ring blocks (HAVIP_RING_BLOCKS; a burst of 5 × N GARPs)"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    if not 1 <= args.n <= MAX_N:
        parser.error(f"--n must be between 1 and {MAX_N}")
    if not all(1 <= k <= PARTITIONS for k in args.replicas) or len(args.replicas) > 8:
        parser.error(f"--replicas: at most 8 phases of 1 to {PARTITIONS} replicas")
    with tempfile.TemporaryDirectory(prefix="havip-bench-scale-") as tmp:
        options = Options(args.commits, args.quiet_wait, args.refresh, args.refresh_s, args.ring_blocks)
        result = asyncio.run(run(args.n, args.replicas, Path(tmp), options))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
