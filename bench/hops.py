"""Where the time of one takeover goes: every hop of a claim from the wire to an event consumer, with references.

    .venv/bin/python -m bench.hops [--probes 200] [--n 0] [--background 0] [--quiet-wait 30] [--json]

What one run does, on a database and RabbitMQ virtual host of its own, in a closed lab on the benchmarking range
(the set-up of bench/failover.py: two servers `cvma` and `cvmb` on a bridge, a capture port, the three services
as processes, the inventory announced as the allocator would, and `--n` background HAVIPs besides the probe
HAVIP, refreshed by their holder at `--background` frames/s):

1. the probe HAVIP is moved between the two servers `--probes` times, one GARP each, about 4 per second;
2. each probe is timed at every hop of its path by the services themselves — `havip_claim_hop_seconds{hop}`
   (shared/hops.py), scraped from the watcher's and the binding's /metrics before and after the probe and parsed
   with prometheus_client's parser: a hop's `_count` grows by one and its `_sum` by exactly that probe's hop —
   and at both ends by the benchmark: the kernel receive time (`captured_at` of its history row) and the moment a
   consumer of `havip.binding.changed` of the benchmark's own receives its event (the last hop, `consumed`);
3. beside each probe, in the same run, the two references: a one-row autocommit INSERT through asyncpg on the
   same database (P1's reference, docs/contract.md#figures), and a bare publish → consume round trip through the
   same RabbitMQ (a persistent message on a durable classic queue, with a publisher confirm — what a claim's event
   is);
4. prints p50 / p99 of every hop, of the two ends-to-ends (GARP → `committed_at`, P1; GARP → consumer, P8), of
   the references, and the quantiles Prometheus would estimate from the histograms' buckets over the run.

Everything it started is stopped and removed at the end, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import ssl
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.common import (
    add_engine_arguments,
    check_engine_arguments,
    clustered_sandbox,
    engines,
    first_node,
    machine,
    percentile,
    sandbox,
    say,
    wait_for_quiet,
)
from bench.failover import (
    HAVIP_BASE,
    PROBE,
    SUBNET,
    PacedSender,
    announce_inventory,
    claim_every_havip,
    histogram_quantile,
    probe_events,
    wait_until,
)
from shared.hops import BINDING_HOPS, SIDE_HOPS, WATCHER_HOPS, datetime_ns
from tests.e2e.system import System
from tests.lab import Lab
from tests.lab.raw import RawSender
from tests.waiting import eventually

# Every hop in path order: (label, where it starts, what ends it). `consumed` is the benchmark's own.
HOPS: tuple[tuple[str, str, str], ...] = (
    ("read", "kernel receive", "the watcher's capture thread hands the claim over"),
    ("sent", "read", "the watcher sends the event (its occurred_at)"),
    ("confirmed", "sent", "RabbitMQ's confirm reaches the watcher (beside the path)"),
    ("received", "sent", "the binding's consumer has the message"),
    ("decided", "received", "its claims are decided"),
    ("stamped", "decided", "committed_at: the transaction's last statement begins"),
    ("committed", "stamped", "COMMIT returned"),
    ("relayed", "committed", "the outbox relay sends the event"),
    ("relay_confirmed", "relayed", "RabbitMQ's confirm reaches the relay (beside the path)"),
    ("consumed", "relayed", "a consumer of havip.binding.changed has the event"),
)
PATH = tuple(hop for hop, _, _ in HOPS if hop not in SIDE_HOPS)  # each starts where the one before ended
SERVICE_HOPS = {"watcher": WATCHER_HOPS, "binding": BINDING_HOPS}
HISTOGRAM = "havip_claim_hop_seconds"
PROBE_INTERVAL_S = 0.25


# ---- the services' histograms ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Histogram:
    count: float
    sum: float
    buckets: tuple[tuple[float, float], ...]  # (upper bound, cumulative count), ascending


def hop_histograms(exposition: str) -> dict[str, Histogram]:
    """`havip_claim_hop_seconds` of one /metrics page, by hop."""
    counts: dict[str, float] = {}
    sums: dict[str, float] = {}
    buckets: dict[str, list[tuple[float, float]]] = {}
    for family in text_string_to_metric_families(exposition):
        if family.name != HISTOGRAM:
            continue
        for sample in family.samples:
            hop = sample.labels["hop"]
            if sample.name.endswith("_count"):
                counts[hop] = sample.value
            elif sample.name.endswith("_sum"):
                sums[hop] = sample.value
            elif sample.name.endswith("_bucket"):
                buckets.setdefault(hop, []).append((float(sample.labels["le"]), sample.value))
    return {hop: Histogram(counts[hop], sums[hop], tuple(sorted(buckets.get(hop, [])))) for hop in counts}


class Scraper:
    """Reads both services' hop histograms."""

    def __init__(self, client: httpx.AsyncClient, system: System) -> None:
        self._client = client
        self._urls = {
            "watcher": f"http://127.0.0.1:{system.watcher_metrics_port}/metrics",
            "binding": f"http://127.0.0.1:{system.binding_metrics_port}/metrics",
        }

    async def scrape(self) -> dict[str, Histogram]:
        pages = await asyncio.gather(*(self._client.get(url) for url in self._urls.values()))
        found: dict[str, Histogram] = {}
        for service, page in zip(self._urls, pages, strict=True):
            page.raise_for_status()
            histograms = hop_histograms(page.text)
            missing = set(SERVICE_HOPS[service]) - histograms.keys()
            if missing:
                raise RuntimeError(f"{service} does not export {HISTOGRAM} for {sorted(missing)}")
            found.update(histograms)
        return found


def one_observation(before: dict[str, Histogram], after: dict[str, Histogram]) -> dict[str, float | None]:
    """Each hop's value between two scrapes if exactly one observation was added (else None)."""
    return {
        hop: after[hop].sum - before[hop].sum if after[hop].count - before[hop].count == 1 else None
        for hop in before
    }


def bucket_delta(before: dict[str, Histogram], after: dict[str, Histogram], hop: str) -> list[tuple[float, float]]:
    earlier = dict(before[hop].buckets)
    return [(le, count - earlier.get(le, 0.0)) for le, count in after[hop].buckets]


# ---- the references ------------------------------------------------------------------------------------


async def insert_s(conn: asyncpg.Connection) -> float:
    """One one-row INSERT, autocommit, through asyncpg: P1's reference (docs/contract.md#figures)."""
    start = time.perf_counter()
    await conn.execute("INSERT INTO bench_insert (at) VALUES (now())")
    return time.perf_counter() - start


@asynccontextmanager
async def round_trip(
    amqp_url: str, context: ssl.SSLContext | None = None
) -> AsyncIterator[Callable[[], Awaitable[tuple[float, float]]]]:
    """A bare publish → consume round trip: a persistent message with a confirm on a durable classic queue of the
    benchmark's own, from one connection to another. Yields a function timing one: (to the consumer, to the
    confirm) in seconds."""
    publishing = await aio_pika.connect(first_node(amqp_url), ssl_context=context)
    consuming = await aio_pika.connect(first_node(amqp_url), ssl_context=context)
    try:
        channel = await publishing.channel(publisher_confirms=True)
        queue = await (await consuming.channel()).declare_queue("bench.round_trip", durable=True)
        arrived: asyncio.Queue[int] = asyncio.Queue()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            arrived.put_nowait(time.perf_counter_ns())
            await message.ack()

        await queue.consume(on_message)
        body = b"x" * 400  # about what one claim's event weighs

        async def once() -> tuple[float, float]:
            start = time.perf_counter_ns()
            message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            await channel.default_exchange.publish(message, routing_key=queue.name, timeout=10)
            confirmed = time.perf_counter_ns()
            async with asyncio.timeout(10):
                received = await arrived.get()
            return (received - start) / 1e9, (confirmed - start) / 1e9

        yield once  # the queue goes with the benchmark's virtual host
    finally:
        await publishing.close()
        await consuming.close()


# ---- the run ------------------------------------------------------------------------------------------------


@dataclass
class Probe:
    captured_ns: int
    committed_at_ns: int  # the history row's committed_at
    consumed_ns: int
    hops: dict[str, float | None]  # seconds; None where the scrapes saw more than this probe

    def chain_to_stamp_error_s(self) -> float | None:
        """|captured + read + sent + received + decided + stamped − committed_at|: the services' hops and the
        database's row agree when this is below a microsecond or two (rounding of the envelope's time)."""
        parts = [self.hops[h] for h in ("read", "sent", "received", "decided", "stamped")]
        if any(p is None for p in parts):
            return None
        return abs(self.captured_ns / 1e9 + sum(p for p in parts if p is not None) - self.committed_at_ns / 1e9)


async def probe_once(
    i: int,
    conn: asyncpg.Connection,
    senders: tuple[RawSender, RawSender],
    probe_id: Any,
    sequence: int,
    scraper: Scraper,
    consumed: dict[int, int],
) -> Probe:
    before = await scraper.scrape()
    sender = senders[i % 2]
    sender.send([sender.garp(PROBE)])
    _, row = await wait_until(
        conn,
        "SELECT count(*), max(committed_at), max(captured_ns) FROM binding.transitions "
        "WHERE havip_id = $1 AND sequence = $2",
        (probe_id, sequence),
        1,
        timeout_s=30,
        what=f"probe {i} committed",
    )
    scraped = [before]

    async def every_hop_observed() -> bool:  # and the event at the consumer (the relay's confirm is the last hop)
        if sequence not in consumed:
            return False
        scraped.append(await scraper.scrape())
        return all(scraped[-1][h].count > before[h].count for h in before)

    await eventually(every_hop_observed, timeout=30, interval=0.005, what=f"probe {i}: every hop observed")
    hops = one_observation(before, scraped[-1])
    committed_at_ns = datetime_ns(row[1])
    relayed_end = hops_end(row[2], hops, "relayed")
    hops["consumed"] = None if relayed_end is None else (consumed[sequence] - relayed_end) / 1e9
    return Probe(row[2], committed_at_ns, consumed[sequence], hops)


def hops_end(captured_ns: int, hops: dict[str, float | None], last: str) -> float | None:
    """The wall-clock time (ns) at which the path hop `last` ended, from the kernel receive time."""
    total = 0.0
    for hop in PATH:
        value = hops.get(hop)
        if value is None:
            return None
        total += value
        if hop == last:
            return captured_ns + total * 1e9
    raise ValueError(last)


async def run(
    probes: int,
    n: int,
    background: int,
    workdir: Path,
    quiet_wait_s: float,
    *,
    clustered: bool = False,
    tls: bool = False,
) -> dict[str, Any]:
    addresses = [HAVIP_BASE + i for i in range(n)]
    result: dict[str, Any] = {
        "probes": probes,
        "n": n,
        "background": background,
        "machine": machine(),
        "engines": engines(clustered, tls),
    }
    async with clustered_sandbox("hops", tls=tls) if clustered else sandbox("hops") as box:
        with Lab(SUBNET, workdir=workdir / "lab") as lab:
            a = lab.add_host("cvma", "198.18.0.11")
            b = lab.add_host("cvmb", "198.18.0.12")
            cap = lab.add_capture_port("cap")
            with System(
                box.database_url, box.amqp_url, cap, workdir / "services", settings=box.settings
            ) as system:
                instances, havips = await announce_inventory(box, lab, [*addresses, PROBE])
                conn = await asyncpg.connect(box.database_url)
                send_a, send_b = RawSender(a.netns, a.mac), RawSender(b.netns, b.mac)
                loader: PacedSender | None = None
                try:
                    await claim_every_havip(conn, send_a, [*addresses, PROBE], instances["cvma"])
                    await conn.execute("CREATE TABLE bench_insert (id bigserial PRIMARY KEY, at timestamptz)")
                    if background:
                        frames = [send_a.garp(address) for address in addresses]
                        loader = PacedSender(send_a, frames, background, max_s=probes * 0.5 + 60)
                        loader.start()
                    result["busy_before"] = round(await wait_for_quiet(below=0.2, timeout_s=quiet_wait_s), 2)
                    async with (
                        probe_events(box, havips[PROBE]) as consumed,
                        round_trip(box.amqp_url, box.tls_context()) as amqp_round_trip,
                        httpx.AsyncClient(timeout=10) as client,
                    ):
                        result.update(
                            await probe_all(
                                probes,
                                conn,
                                (send_b, send_a),
                                havips[PROBE],
                                Scraper(client, system),
                                consumed,
                                amqp_round_trip,
                            )
                        )
                finally:
                    if loader is not None:
                        loader.stopping.set()
                        loader.join(10)
                        result["background_sent"] = loader.sent
                    send_a.close()
                    send_b.close()
                    await conn.close()
    return result


async def probe_all(
    probes: int,
    conn: asyncpg.Connection,
    senders: tuple[RawSender, RawSender],
    probe_id: Any,
    scraper: Scraper,
    consumed: dict[int, int],
    amqp_round_trip: Callable[[], Awaitable[tuple[float, float]]],
) -> dict[str, Any]:
    sequence = await conn.fetchval("SELECT sequence FROM binding.bindings WHERE havip_id = $1", probe_id)
    inserts: list[float] = []
    round_trips: list[float] = []
    confirms: list[float] = []
    taken: list[Probe] = []
    first = await scraper.scrape()
    for i in range(probes):
        inserts.append(await insert_s(conn))
        to_consumer, to_confirm = await amqp_round_trip()
        round_trips.append(to_consumer)
        confirms.append(to_confirm)
        sequence += 1
        taken.append(await probe_once(i, conn, senders, probe_id, sequence, scraper, consumed))
        await asyncio.sleep(PROBE_INTERVAL_S)
    last = await scraper.scrape()
    return summarise(taken, inserts, round_trips, confirms, first, last)


def ms(values: Sequence[float]) -> dict[str, float]:
    return {
        "p50": round(percentile(values, 50) * 1000, 3),
        "p99": round(percentile(values, 99) * 1000, 3),
        "max": round(max(values, default=math.nan) * 1000, 3),
        "n": len(values),
    }


def summarise(
    taken: list[Probe],
    inserts: list[float],
    round_trips: list[float],
    confirms: list[float],
    first: dict[str, Histogram],
    last: dict[str, Histogram],
) -> dict[str, Any]:
    hops: dict[str, Any] = {}
    for hop, start, end in HOPS:
        values = [v for p in taken if (v := p.hops.get(hop)) is not None]
        hops[hop] = {"from": start, "to": end, **ms(values)}
        if hop in last:  # what Prometheus would estimate from the buckets over the run
            delta = bucket_delta(first, last, hop)
            hops[hop]["histogram_p50"] = round(histogram_quantile(0.5, delta) * 1000, 3)
            hops[hop]["histogram_p99"] = round(histogram_quantile(0.99, delta) * 1000, 3)
    errors = [e for p in taken if (e := p.chain_to_stamp_error_s()) is not None]
    return {
        "hops": hops,
        "garp_to_committed_at_ms": ms([(p.committed_at_ns - p.captured_ns) / 1e9 for p in taken]),
        "garp_to_consumer_ms": ms([(p.consumed_ns - p.captured_ns) / 1e9 for p in taken]),
        "reference_insert_ms": ms(inserts),
        "reference_round_trip_ms": ms(round_trips),
        "reference_round_trip_confirm_ms": ms(confirms),
        "probes_timed_at_every_hop": sum(all(v is not None for v in p.hops.values()) for p in taken),
        "chain_vs_committed_at_max_us": round(max(errors, default=math.nan) * 1e6, 1),
        "per_probe": [{"captured_ns": p.captured_ns, "hops_ms": hops_ms(p)} for p in taken],
    }


def hops_ms(probe: Probe) -> dict[str, float | None]:
    return {hop: None if v is None else round(v * 1000, 4) for hop, v in probe.hops.items()}


def quantiles(figures: dict[str, float]) -> str:
    return f"{figures['p50']:>8.3f} {figures['p99']:>8.3f} {figures['max']:>8.3f}"


def report(result: dict[str, Any]) -> str:
    lines = [
        f"hops of one claim: {result['probes']} probes, {result['n']} other HAVIPs, "
        f"{result['background']} refreshes/s; machine {result['busy_before']:.0%} busy before",
        f"  {'hop':<16} {'from → to':<74} {'p50 ms':>8} {'p99 ms':>8} {'max':>8}   histogram p50 / p99",
    ]
    for hop, figures in result["hops"].items():
        span = f"{figures['from']} → {figures['to']}"
        estimate = "—"
        if "histogram_p50" in figures:
            estimate = f"{figures['histogram_p50']:.3f} / {figures['histogram_p99']:.3f}"
        lines.append(f"  {hop:<16} {span:<74} {quantiles(figures)}   {estimate}")
    for name, key in (
        ("GARP → committed_at (P1)", "garp_to_committed_at_ms"),
        ("GARP → consumer (P8)", "garp_to_consumer_ms"),
        ("reference: one-row autocommit INSERT (asyncpg)", "reference_insert_ms"),
        ("reference: bare publish → consume round trip", "reference_round_trip_ms"),
        ("           its publish → confirm", "reference_round_trip_confirm_ms"),
    ):
        lines.append(f"  {name:<91} {quantiles(result[key])}")
    lines.append(
        f"  probes timed at every hop: {result['probes_timed_at_every_hop']} of {result['probes']}; "
        f"kernel receive + hops to `stamped` vs the history's committed_at: at most "
        f"{result['chain_vs_committed_at_max_us']} µs apart"
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hops", description=__doc__.split("\n\n")[0])
    parser.add_argument("--probes", type=int, default=200, help="single-GARP takeovers timed")
    parser.add_argument("--n", type=int, default=0, help="other HAVIPs (held by cvma)")
    parser.add_argument("--background", type=int, default=0, help="refreshes/s of the --n HAVIPs by their holder")
    parser.add_argument("--quiet-wait", type=float, default=30, help="seconds to wait for a machine < 20%% busy")
    add_engine_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    check_engine_arguments(parser, args)
    if args.background and not args.n:
        parser.error("--background needs --n HAVIPs to refresh")
    with tempfile.TemporaryDirectory(prefix="havip-bench-hops-") as tmp:
        say("setting up the lab and the services")
        result = asyncio.run(
            run(
                args.probes,
                args.n,
                args.background,
                Path(tmp),
                args.quiet_wait,
                clustered=args.clustered,
                tls=args.tls,
            )
        )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
