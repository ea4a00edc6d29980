"""P2 — mass failover — and P1 under load, on the real watcher and binding service in a closed lab.

    .venv/bin/python -m bench.failover [--n 1000] [--probes 100] [--background 0] [--json]

What one run does, on a database and RabbitMQ virtual host of its own (bench/common.py `sandbox`):

1. a lab on the benchmarking range 198.18.0.0/15: two servers `cvma` and `cvmb` on one bridge, and a capture port
   in the root namespace; the three services start as processes (tests/e2e/system.py), the watcher capturing
   the port;
2. the inventory reaches the binding service as the allocator would send it (events on its exchange): one VPC,
   one subnet, the two servers, and N HAVIPs (198.18.16.0 onwards) plus one probe HAVIP;
3. cvma announces every HAVIP (one GARP each) and the run waits until the binding holds them all for cvma;
4. **P2**: cvmb announces every HAVIP at once, 5 GARPs each (keepalived's burst: the 5 repeats of every address,
   one round after another), through a raw socket in its namespace. tcpdump on the capture port, in the same
   run, gives the kernel time of the last GARP on the wire (the reference); the figure is the time from it to
   the moment the benchmark's poll of the database (every 10 ms) sees the N-th committed transition, and the
   binding's own `committed_at` stamps beside it;
5. **P1 under load**: cvmb (now the holder) keeps refreshing the N HAVIPs at `--background` frames/s (0 = no load),
   and/or an unregistered `spoofer` floods gratuitous ARPs for all N + 1 addresses at `--flood` frames/s —
   replayed by tcpreplay from a pcap: a C peer, so that, like a spoofer on another machine, the flood's
   generator costs the services little CPU (a spoofing flood must not delay a failover by more than 10 ms at
   p99, docs/contract.md#figures), while a probe
   HAVIP is moved between the two servers `--probes` times, one GARP each, ~5 per second; each probe's
   latency is its transition's `committed_at − captured_at` (kernel receive time → the binding's commit),
   beside a bare Postgres commit (one-row upsert transaction) measured between the probes in the same run;
   and the **freshness of the allocator's view** of each probe: its transition's `committed_at` (the binding's
   commit) → `recorded_at` in `allocator.view_transitions` (the allocator's transaction taking it in, then
   committing; from then on its API shows it), beside what the allocator's own histogram
   `havip_view_delay_seconds{event="transition"}` recorded over the probes (difference of two scrapes; it
   includes the allocator's commit, coarse by its buckets), and when a consumer of `havip.binding.changed` of
   the benchmark's own receives each probe's event (the binding service's share of that delay);
6. **P5**: the watcher's and the binding's resident memory (VmRSS) after all that.

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
import re
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import httpx

from bench.common import (
    Sandbox,
    add_engine_arguments,
    check_engine_arguments,
    clustered_sandbox,
    engines,
    first_node,
    latency_summary_ms,
    machine,
    percentile,
    sandbox,
    say,
    wait_for_quiet,
)
from shared import events
from shared.db import fetch_one
from shared.messaging import Broker, declare_topology
from tests.e2e.system import System
from tests.lab import Lab
from tests.lab.proc import LabCommandError
from tests.lab.raw import RawSender
from tests.metrics_text import samples
from tests.waiting import eventually, eventually_sync

SUBNET = "198.18.0.0/15"
HAVIP_BASE = IPv4Address("198.18.16.0")
PROBE = IPv4Address("198.18.15.250")
BURST = 5  # keepalived's garp_master_repeat
P2_FIGURES = (
    "last_garp_to_last_commit_seen_s",
    "last_garp_to_last_committed_at_s",
    "first_garp_to_last_commit_seen_s",
    "transitions_per_s",
)


# ---- the wire ---------------------------------------------------------------------------------------------


class PacedSender(threading.Thread):
    """Sends `frames` round after round at `rate` frames/s until stopped (bounded by `max_s`)."""

    def __init__(self, sender: RawSender, frames: list[bytes], rate: int, max_s: float) -> None:
        super().__init__(name="background refreshes", daemon=True)
        self.sender, self.frames, self.rate, self.max_s = sender, frames, rate, max_s
        self.stopping = threading.Event()
        self.sent = 0

    def run(self) -> None:
        tick = 0.005
        per_tick = max(1, round(self.rate * tick))
        start = time.monotonic()
        i = 0
        while not self.stopping.is_set() and time.monotonic() - start < self.max_s:
            chunk = [self.frames[(i + k) % len(self.frames)] for k in range(per_tick)]
            self.sender.send(chunk)
            i += per_tick
            self.sent += per_tick
            ahead = start + self.sent / self.rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)


@dataclass(frozen=True)
class WireCapture:
    """tcpdump on the capture port, writing `count` ARP frames of one sender MAC to `path` and then exiting."""

    path: Path
    count: int
    process: subprocess.Popen[bytes]
    log: Path  # tcpdump's stderr: its counters once it has ended

    async def frames(self, timeout_s: float) -> list[tuple[int, bytes]]:
        """(kernel time in ns, sender MAC) of the frames captured: all `count` of them, or, when tcpdump has not
        seen them all within `timeout_s`, what it wrote until then."""
        with contextlib.suppress(TimeoutError):
            await eventually(
                lambda: self.process.poll() is not None, timeout=timeout_s, what=f"tcpdump's {self.count} frames"
            )
        if self.process.poll() is None:
            self.process.terminate()  # tcpdump writes every frame as it comes (-U): the file is complete
            await asyncio.to_thread(self.process.wait, 10)
        frames = read_pcap(self.path)
        if len(frames) < self.count:
            counters = " ".join(self.log.read_text(errors="replace").splitlines()[1:])
            say(f"tcpdump captured {len(frames)} of {self.count} frames within {timeout_s} s ({counters})")
        return frames


@contextmanager
def tcpdump(interface: str, workdir: Path, sender_mac: bytes, count: int) -> Iterator[WireCapture]:
    """tcpdump writing the port's ARP frames from `sender_mac` with nanosecond kernel timestamps: the reference of
    the run. Immediate mode hands each frame to tcpdump as it arrives, instead of in blocks that the kernel
    passes on only once full or a second old — a few frames, ended within that second, would never be read. The
    short snapshot (an ARP frame is 60 bytes at most) sizes the ring's slots to it: with the interface's offloads
    on, libpcap's slots hold 256 KiB each, and a burst of thousands, while the services take the CPU, overflows
    them."""
    path = workdir / "wire.pcap"
    err = (workdir / "tcpdump.err").open("wb")
    mac = ":".join(f"{byte:02x}" for byte in sender_mac)
    argv = [
        "tcpdump", "-i", interface, "-n", "-B", "65536", "-s", "96", "--immediate-mode", "-U", "-c", str(count),
        "--time-stamp-precision=nano", "-w", str(path), f"arp and ether src {mac}",
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:

        def listening() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"tcpdump exited: {(workdir / 'tcpdump.err').read_text()}")
            return b"listening on" in (workdir / "tcpdump.err").read_bytes()

        try:
            eventually_sync(listening, timeout=15, what="tcpdump listening")
        except TimeoutError as exc:
            raise RuntimeError(f"tcpdump did not start: {(workdir / 'tcpdump.err').read_text()}") from exc
        yield WireCapture(path, count, proc, workdir / "tcpdump.err")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        err.close()


def read_pcap(path: Path) -> list[tuple[int, bytes]]:
    """(kernel time in ns, sender MAC) of each ARP frame of a nanosecond pcap file."""
    data = path.read_bytes()
    magic = struct.unpack_from("<I", data)[0]
    if magic != 0xA1B23C4D:
        raise ValueError(f"{path}: not a little-endian nanosecond pcap (magic {magic:#x})")
    frames = []
    offset = 24
    while offset + 16 <= len(data):
        sec, nsec, incl, _orig = struct.unpack_from("<IIII", data, offset)
        frame = data[offset + 16 : offset + 16 + incl]
        frames.append((sec * 1_000_000_000 + nsec, frame[22:28]))
        offset += 16 + incl
    return frames


@contextmanager
def flood_only_to(lab: Lab, spoofer_mac: str, capture_port: str) -> Iterator[None]:
    """The spoofer's frames leave the lab's bridge only toward the watcher's capture port: on this one machine
    the other servers' kernels would otherwise process every spoofed ARP on the cores the services need — work
    that real servers do on their own CPUs. An nftables bridge table in the lab's switch namespace (the host's
    firewall is not touched), deleted at the end and gone with the namespace anyway."""
    table = "havip_bench_flood"
    script = "\n".join(
        [
            f"table bridge {table} {{",
            "    chain forward {",
            "        type filter hook forward priority 0; policy accept;",
            f'        ether saddr {spoofer_mac} oifname != "{capture_port}" drop',
            "    }",
            "}",
            "",
        ]
    )
    lab.load_switch_ruleset(script, "the flood's confinement")
    try:
        yield
    finally:
        with contextlib.suppress(LabCommandError):  # an error of the run is the one worth seeing
            lab.load_switch_ruleset(f"delete table bridge {table}\n", "the flood's confinement")


@contextmanager
def replayed_flood(
    host: Any, frames: list[bytes], rate: int, max_s: float, workdir: Path
) -> Iterator[dict[str, int]]:
    """tcpreplay looping `frames` at `rate` frames/s out of `host`'s eth0, at most `max_s` seconds' worth; yields
    a dict that holds the number of frames sent once it stopped."""
    pcap = workdir / "flood.pcap"
    with pcap.open("wb") as out:
        out.write(struct.pack("=IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for frame in frames:
            out.write(struct.pack("=IIII", 0, 0, len(frame), len(frame)) + frame)
    summary = workdir / "tcpreplay.out"
    with summary.open("wb") as log:
        proc = host.popen(
            # nanosleep between bursts of a millisecond's frames, not a busy wait: the generator leaves the cores
            # to what is measured, as a spoofer on another machine would
            "tcpreplay", "-i", "eth0", "--timer=nano", f"--pps={rate}", f"--pps-multi={max(1, rate // 1_000)}",
            "--loop=0", f"--limit={int(rate * max_s)}", "--preload-pcap", str(pcap),
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    result = {"sent": 0}
    try:
        yield result
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)  # tcpreplay stops and prints its summary
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        sent = re.search(r"Actual: (\d+) packets", summary.read_text(errors="replace"))
        result["sent"] = int(sent.group(1)) if sent else 0


# ---- the inventory, as the allocator would announce it ---------------------------------------------------


async def announce_inventory(
    box: Sandbox, lab: Lab, addresses: list[IPv4Address], servers: tuple[str, ...] = ("cvma", "cvmb")
) -> tuple[dict[str, uuid.UUID], dict[IPv4Address, uuid.UUID]]:
    """One VPC and subnet, the lab servers `servers` as its instances and `addresses` as its HAVIPs."""
    vpc, subnet = uuid.uuid4(), uuid.uuid4()
    instances = {name: uuid.uuid4() for name in servers}
    envs = [
        events.envelope(
            "instance.registered",
            events.InstanceData(
                id=instances[name], vpc_id=vpc, subnet_id=subnet, name=name,
                private_ip=IPv4Address(lab.hosts[name].ip), mac=lab.hosts[name].mac,
            ),
            "allocator",
        )
        for name in instances
    ]  # fmt: skip
    havips = {address: uuid.uuid4() for address in addresses}
    envs += [
        events.envelope(
            "havip.allocated",
            events.HavipData(id=havip_id, vpc_id=vpc, subnet_id=subnet, name=None, address=address, candidates=[]),
            "allocator",
        )
        for address, havip_id in havips.items()
    ]
    broker = Broker(box.common_settings(publish_timeout_s=60), "bench")
    await broker.connect()
    try:
        for start in range(0, len(envs), 1000):
            await broker.publish_many(envs[start : start + 1000])
    finally:
        await broker.close()
    return instances, havips


async def wait_until(
    conn: asyncpg.Connection, sql: str, args: tuple[object, ...], want: int, *, timeout_s: float, what: str
) -> tuple[int, asyncpg.Record]:
    """Poll `sql` (first column: a count) every 10 ms until it reaches `want`; returns (ns when seen, row)."""
    seen: list[tuple[int, asyncpg.Record]] = []

    async def reached() -> bool:
        row = await fetch_one(conn, sql, *args)
        seen.append((time.time_ns(), row))
        return bool(row[0] >= want)

    try:
        await eventually(reached, timeout=timeout_s, interval=0.01, what=what)
    except TimeoutError as exc:
        raise TimeoutError(f"{what}: {seen[-1][1][0]} of {want} within {timeout_s} s") from exc
    return seen[-1]


async def claim_every_havip(
    conn: asyncpg.Connection,
    sender: RawSender,
    addresses: list[IPv4Address],
    holder: uuid.UUID,
    *,
    rounds: int = 1,
    timeout_s: float = 120,
) -> None:
    """Once the binding knows every HAVIP, `rounds` GARPs each from `sender` (one round of all addresses after
    another: a burst of 100,000 single GARPs may lose a few frames on the lab's wire, as on any); back when
    `holder` holds them all."""
    count = len(addresses)
    await wait_until(conn, "SELECT count(*) FROM binding.havips", (), count, timeout_s=timeout_s, what="inventory")
    say(f"inventory of {count} HAVIPs loaded; the first server claims them")
    frames = [sender.garp(address) for address in addresses]
    for _ in range(rounds):
        sender.send(frames)
    await wait_until(
        conn,
        "SELECT count(*) FROM binding.bindings WHERE instance_id = $1",
        (holder,),
        count,
        timeout_s=timeout_s,
        what="the first server holds every HAVIP",
    )


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def bare_commit_s(conn: asyncpg.Connection) -> float:
    start = time.perf_counter()
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO bench_commit (id, at) VALUES (1, now()) ON CONFLICT (id) DO UPDATE SET at = now()"
        )
    return time.perf_counter() - start


# ---- the run ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Flood:
    """P1's spoofer: an unregistered server replaying gratuitous ARPs for every address."""

    lab: Lab
    host: Any
    sender: RawSender
    rate: int  # frames/s; 0: no flood
    workdir: Path
    confined: bool  # delivered only to the capture port (flood_only_to)


async def run(
    n: int,
    probes: int,
    background: int,
    workdir: Path,
    quiet_wait_s: float,
    flood: int = 0,
    *,
    confine_flood: bool = True,
    clustered: bool = False,
    tls: bool = False,
) -> dict[str, Any]:
    addresses = [HAVIP_BASE + i for i in range(n)]
    result: dict[str, Any] = {"n": n, "burst": BURST, "machine": machine(), "engines": engines(clustered, tls)}
    async with clustered_sandbox("failover", tls=tls) if clustered else sandbox("failover") as box:
        with Lab(SUBNET, workdir=workdir / "lab") as lab:
            a = lab.add_host("cvma", "198.18.0.11")
            b = lab.add_host("cvmb", "198.18.0.12")
            spoofer = lab.add_host("spoofer", "198.18.0.66")  # never registered: every claim of it is refused
            cap = lab.add_capture_port("cap")
            with System(
                box.database_url, box.amqp_url, cap, workdir / "services", settings=box.settings
            ) as system:
                instances, havips = await announce_inventory(box, lab, [*addresses, PROBE])
                conn = await asyncpg.connect(box.database_url)
                send_a, send_b = RawSender(a.netns, a.mac), RawSender(b.netns, b.mac)
                send_spoof = RawSender(spoofer.netns, spoofer.mac)
                try:
                    await claim_every_havip(conn, send_a, [*addresses, PROBE], instances["cvma"])
                    result["busy_before_p2"] = round(await wait_for_quiet(below=0.2, timeout_s=quiet_wait_s), 2)
                    result["p2"] = await mass_failover(conn, cap, workdir, send_b, addresses, instances["cvmb"])
                    say(f"P2: {json.dumps(result['p2'])}")
                    # The binding's events of the mass failover leave before the probes start.
                    await wait_until(
                        conn,
                        "SELECT (count(*) = 0)::int FROM binding.outbox",
                        (),
                        1,
                        timeout_s=120,
                        what="outbox drained",
                    )
                    result["busy_before_p1"] = round(await wait_for_quiet(below=0.2, timeout_s=quiet_wait_s), 2)
                    async with probe_events(box, havips[PROBE]) as published:
                        result["p1"] = await probes_under_load(
                            conn,
                            send_a,
                            send_b,
                            addresses,
                            havips[PROBE],
                            probes,
                            background,
                            Flood(lab, spoofer, send_spoof, flood, workdir, confine_flood),
                            system.api_url,
                            published,
                        )
                    say(f"P1: {json.dumps(result['p1'])}")
                    result["p5"] = {
                        "watcher_rss_mb": round(rss_mb(system.services["arp_watcher"].process.pid), 1),
                        "binding_rss_mb": round(rss_mb(system.services["binding"].process.pid), 1),
                    }
                    result["watcher"] = {
                        name: system.metric(name, service="watcher")
                        for name in (
                            "havip_watcher_kernel_drops_total",
                            "havip_watcher_claims_published_total",
                            "havip_watcher_claims_coalesced_total",
                            "havip_watcher_events_published_total",
                        )
                    }
                finally:
                    send_a.close()
                    send_b.close()
                    send_spoof.close()
                    await conn.close()
    return result


async def mass_failover(
    conn: asyncpg.Connection,
    cap: str,
    workdir: Path,
    sender: RawSender,
    addresses: list[IPv4Address],
    to: uuid.UUID,
) -> dict[str, Any]:
    frames = [sender.garp(address) for address in addresses]
    with tcpdump(cap, workdir, sender.mac, len(frames) * BURST) as capture:
        sent_at = time.time_ns()
        for _ in range(BURST):
            sender.send(frames)
        sent_s = (time.time_ns() - sent_at) / 1e9
        seen_ns, row = await wait_until(
            conn,
            "SELECT count(*), max(committed_at), max(captured_ns) FROM binding.transitions "
            "WHERE to_instance_id = $1",
            (to,),
            len(addresses),
            timeout_s=120 + len(addresses) / 500,
            what="every HAVIP moved",
        )
        wire = [t for t, mac in await capture.frames(timeout_s=30) if mac == sender.mac]
    result: dict[str, Any] = {
        "garps_sent": len(frames) * BURST,
        "send_s": round(sent_s, 3),
        "garps_on_wire_tcpdump": len(wire),
    }
    if not wire:  # no reference on the wire: no figure rather than a made-up one
        say(f"P2: tcpdump captured none of the {len(frames) * BURST} GARPs; see {workdir / 'tcpdump.err'}")
        return result | dict.fromkeys(P2_FIGURES)
    first_garp, last_garp = min(wire), max(wire)
    return result | {
        "last_garp_to_last_commit_seen_s": round((seen_ns - last_garp) / 1e9, 3),
        "last_garp_to_last_committed_at_s": round((row[1].timestamp() * 1e9 - last_garp) / 1e9, 3),
        "first_garp_to_last_commit_seen_s": round((seen_ns - first_garp) / 1e9, 3),
        "transitions_per_s": round(len(addresses) / ((seen_ns - first_garp) / 1e9)),
    }


async def probes_under_load(
    conn: asyncpg.Connection,
    send_a: RawSender,
    send_b: RawSender,
    addresses: list[IPv4Address],
    probe_id: uuid.UUID,
    probes: int,
    background: int,
    spoofing: Flood,
    allocator_url: str,
    published: dict[int, int],
) -> dict[str, Any]:
    await conn.execute("CREATE TABLE IF NOT EXISTS bench_commit (id int PRIMARY KEY, at timestamptz)")
    loaders: list[PacedSender] = []
    if background:
        # cvmb holds the N HAVIPs now: it refreshes them.
        loaders.append(
            PacedSender(send_b, [send_b.garp(a) for a in addresses], background, max_s=probes * 0.4 + 30)
        )
    flood = spoofing.rate
    refused_before = await conn.fetchval("SELECT coalesce(sum(count), 0) FROM binding.rejected_claims")
    stack = contextlib.ExitStack()
    flooded = {"sent": 0}
    if flood:
        spoofed = [spoofing.sender.garp(a) for a in [PROBE, *addresses]]
        if spoofing.confined:
            lab = spoofing.lab
            stack.enter_context(flood_only_to(lab, spoofing.host.mac, lab.capture_ports["cap"].port))
        flooded = stack.enter_context(
            replayed_flood(spoofing.host, spoofed, flood, probes * 0.4 + 30, spoofing.workdir)
        )
    for loader in loaders:
        loader.start()
    if loaders or flood:
        await asyncio.sleep(2)  # the load in its stride before the first probe
    latencies: list[float] = []
    captured: list[int] = []
    commits: list[float] = []
    view_delays: list[float] = []
    publish_delays: list[float] = []
    histogram_before = view_delay_buckets(allocator_url)
    sequence = await conn.fetchval("SELECT sequence FROM binding.bindings WHERE havip_id = $1", probe_id)
    try:
        for i in range(probes):
            commits.append(await bare_commit_s(conn))
            sender = send_b if i % 2 == 0 else send_a
            sender.send([sender.garp(PROBE)])
            sequence += 1
            _, row = await wait_until(
                conn,
                "SELECT count(*), max(committed_at), max(captured_ns) FROM binding.transitions "
                "WHERE havip_id = $1 AND sequence = $2",
                (probe_id, sequence),
                1,
                timeout_s=30,
                what=f"probe {i}",
            )
            latencies.append((row[1].timestamp() * 1e9 - row[2]) / 1e9)
            captured.append(row[2])
            _, viewed = await wait_until(
                conn,
                "SELECT count(*), max(recorded_at) FROM allocator.view_transitions "
                "WHERE havip_id = $1 AND sequence = $2",
                (probe_id, sequence),
                1,
                timeout_s=30,
                what=f"probe {i} in the allocator's view",
            )
            view_delays.append((viewed[1] - row[1]).total_seconds())
            if sequence in published:
                publish_delays.append(published[sequence] / 1e9 - row[1].timestamp())
            await asyncio.sleep(0.2)
    finally:
        for loader in loaders:
            loader.stopping.set()
            loader.join(10)
        stack.close()
    summary = {k: round(v, 2) for k, v in latency_summary_ms(latencies).items()}
    bare = {k: round(v, 2) for k, v in latency_summary_ms(commits).items()}
    histogram = [
        (le, count - dict(histogram_before).get(le, 0)) for le, count in view_delay_buckets(allocator_url)
    ]
    audit = await fetch_one(
        conn, "SELECT count(*) AS rows, coalesce(sum(count), 0) AS frames FROM binding.rejected_claims"
    )
    return {
        "view_delay_ms": {k: round(v, 2) for k, v in latency_summary_ms(view_delays).items()},
        "binding_commit_to_event_received_ms": {
            k: round(v, 2) for k, v in latency_summary_ms(publish_delays).items()
        },
        "view_delay_histogram_ms": {
            "count": histogram[-1][1] if histogram else 0,
            "p50": round(histogram_quantile(0.5, histogram) * 1000, 2),
            "p99": round(histogram_quantile(0.99, histogram) * 1000, 2),
        },
        "probes": probes,
        "probe_captured_ns": captured,
        "probe_latencies_ms": [round(x * 1000, 1) for x in latencies],
        "bare_commits_ms": [round(x * 1000, 1) for x in commits],
        "background_claims_per_s": background,
        "background_sent": loaders[0].sent if background else 0,
        "flood_frames_per_s": flood,
        "flood_sent": flooded["sent"],
        "flood_only_to_capture_port": spoofing.confined,
        "refused_frames_audited": int(audit["frames"]) - int(refused_before),
        "refusal_audit_rows": int(audit["rows"]),
        "garp_to_commit_ms": summary,
        "bare_postgres_commit_ms": bare,
        "p50_over_bare_commit": round(percentile(latencies, 50) / percentile(commits, 50), 1),
    }


@asynccontextmanager
async def probe_events(box: Sandbox, probe_id: uuid.UUID) -> AsyncIterator[dict[int, int]]:
    """When a consumer of havip.binding.changed (a queue of the benchmark's own) receives each transition of the
    probe: sequence → wall-clock time in ns. Beside the view's figure it shows the binding service's own share."""
    received: dict[int, int] = {}
    connection = await aio_pika.connect(first_node(box.amqp_url), ssl_context=box.tls_context())
    try:
        channel = await connection.channel()
        exchange = await declare_topology(channel, box.common_settings())
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(exchange, "havip.binding.changed")

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            at = time.time_ns()
            data = json.loads(message.body)["data"]
            if data["havip_id"] == str(probe_id):
                received[data["sequence"]] = at
            await message.ack()

        await queue.consume(on_message)
        yield received
    finally:
        await connection.close()


def view_delay_buckets(allocator_url: str) -> list[tuple[float, float]]:
    """The allocator's havip_view_delay_seconds{event="transition"} buckets: (upper bound, cumulative count)."""
    text = httpx.get(f"{allocator_url}/metrics", timeout=10).text
    found = samples(text, "havip_view_delay_seconds_bucket", {"event": "transition"})
    return sorted((float(sample.labels["le"]), sample.value) for sample in found)


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus' histogram_quantile over cumulative buckets: linear within the bucket the rank falls in."""
    if not buckets or buckets[-1][1] == 0:
        return math.nan
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / max(count - lower_count, 1e-12)
        lower_bound, lower_count = bound, count
    return math.nan


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.failover", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="HAVIPs that move at once (P2)")
    parser.add_argument("--probes", type=int, default=100, help="single-GARP probes for P1")
    parser.add_argument("--background", type=int, default=0, help="refreshes/s of the N HAVIPs during P1")
    parser.add_argument("--flood", type=int, default=0, help="spoofed GARPs/s (N + 1 addresses) during P1")
    parser.add_argument(
        "--flood-everywhere",
        action="store_true",
        help="let the flood reach every server's namespace too, not only the capture port (costs this machine "
        "the other servers' ARP processing)",
    )
    parser.add_argument("--quiet-wait", type=float, default=30, help="seconds to wait for a machine < 20%% busy")
    add_engine_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    if not 1 <= args.n <= 60_000:
        parser.error("--n must be between 1 and 60000")
    check_engine_arguments(parser, args)
    with tempfile.TemporaryDirectory(prefix="havip-bench-failover-") as tmp:
        result = asyncio.run(
            run(
                args.n,
                args.probes,
                args.background,
                Path(tmp),
                args.quiet_wait,
                args.flood,
                confine_flood=not args.flood_everywhere,
                clustered=args.clustered,
                tls=args.tls,
            )
        )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        p2, p1 = result["p2"], result["p1"]
        if p2["garps_on_wire_tcpdump"]:
            print(
                f"P2  N={args.n}: last GARP on the wire (tcpdump) → last commit seen: "
                f"{p2['last_garp_to_last_commit_seen_s']} s  (binding's committed_at: "
                f"{p2['last_garp_to_last_committed_at_s']} s; {p2['transitions_per_s']} transitions/s; "
                f"{p2['garps_on_wire_tcpdump']} of {p2['garps_sent']} GARPs on the wire)"
            )
        else:
            print(f"P2  N={args.n}: no figure — tcpdump captured none of the {p2['garps_sent']} GARPs sent")
        print(
            f"P1  {p1['probes']} probes, {p1['background_claims_per_s']} refreshes/s in the background, "
            f"{p1['flood_frames_per_s']} spoofed GARPs/s: "
            f"GARP → commit {p1['garp_to_commit_ms']} ms; bare Postgres commit {p1['bare_postgres_commit_ms']} ms"
        )
        print(
            f"    allocator's view: binding's commit → in the view {p1['view_delay_ms']} ms; → its event received "
            f"by a consumer {p1['binding_commit_to_event_received_ms']} ms "
            f"(its histogram over the probes: {p1['view_delay_histogram_ms']})"
        )
        if p1["flood_frames_per_s"]:
            print(
                f"    flood: {p1['flood_sent']} spoofed frames sent "
                f"({'to the capture port only' if p1['flood_only_to_capture_port'] else 'to every port'}); "
                f"{p1['refused_frames_audited']} refused frames audited in {p1['refusal_audit_rows']} rows "
                "(folded per address, MAC, reason and window, paced)"
            )
        print(f"    busy before P2: {result['busy_before_p2']:.0%}, before P1: {result['busy_before_p1']:.0%}")
        print(
            f"P5  watcher RSS {result['p5']['watcher_rss_mb']} MB, binding RSS {result['p5']['binding_rss_mb']} MB"
        )
        print(f"    watcher: {result['watcher']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
