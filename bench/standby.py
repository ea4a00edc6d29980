"""The binding's standby taking over: two binding processes, the deciding one killed, the next claim committed.

    .venv/bin/python -m bench.standby [--n 1000] [--rounds 5] [--json]

What one run does, on a database and RabbitMQ virtual host of its own (bench/common.py `sandbox`):

1. two binding processes (`python -m services.binding`) start, one after the other: both register on
   `binding.events`, RabbitMQ delivers to the first;
2. the inventory reaches them as the allocator would send it (events on its exchange): two servers `cvm1` and
   `cvm2` in one subnet and N HAVIPs; claims of cvm1 for all N HAVIPs follow, and the run waits until all N are
   committed (the deciding process is then the one whose `havip_binding_consuming` is 1);
3. each round: SIGKILL of the deciding process, at once a claim of the other server for one HAVIP (published as
   a watcher does), and the figure is the time from the kill to that claim's transition in Postgres (its
   `committed_at`, the binding's own stamp; the benchmark's poll every 2 ms sees it too). RabbitMQ hands the
   queue to the waiting process when the killed one's connection closes; that process reloads its book (N
   HAVIPs) before deciding. A new process replaces the killed one (waiting) before the next round;
4. the reference: a bare publish → consume round trip through the same RabbitMQ (bench/hops.py `round_trip`).

Everything it started is stopped at the end, also on failure or Ctrl-C: processes by their process group, the
database and the virtual host.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from ipaddress import IPv4Address
from pathlib import Path

import asyncpg
import httpx

from bench.common import die_with_parent, machine, sandbox, say
from bench.hops import round_trip
from shared import events
from shared.messaging import Broker
from shared.settings import CommonSettings
from tests.metrics_text import value
from tests.ports import free_port
from tests.waiting import eventually

ROOT = Path(__file__).resolve().parents[1]
HAVIP_BASE = IPv4Address("198.18.16.0")
CLAIMS_PER_EVENT = 100
DEADLINE_S = 120.0


@dataclass
class BindingProcess:
    """`python -m services.binding` with its metrics on a port of its own, in its own process group."""

    name: str
    process: subprocess.Popen[bytes]
    metrics_port: int
    log_path: Path

    @classmethod
    def spawn(cls, name: str, database_url: str, amqp_url: str, workdir: Path) -> BindingProcess:
        port = free_port()
        log_path = workdir / f"{name}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("HAVIP_")}
        env.update(
            HAVIP_DATABASE_URL=database_url,
            HAVIP_AMQP_URL=amqp_url,
            HAVIP_METRICS_PORT=str(port),
            HAVIP_METRICS_HOST="127.0.0.1",
            HAVIP_REPLICA_ID=name,  # unique among the replicas (logs, connection names)
            PYTHONPATH=str(ROOT),
        )
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "services.binding"],
                cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopped by group, never by name
                preexec_fn=die_with_parent,
            )  # fmt: skip
        return cls(name, process, port, log_path)

    async def running(self) -> None:
        def said() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}: {self.log_path}")
            return "binding service running" in self.log_path.read_text(errors="replace")

        await eventually(said, timeout=DEADLINE_S, interval=0.05, what=f"{self.name} running")

    async def consuming(self, client: httpx.AsyncClient) -> float | None:
        page = await client.get(f"http://127.0.0.1:{self.metrics_port}/metrics")
        return value(page.text, "havip_binding_consuming")

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)

    async def stop(self) -> None:
        if self.process.poll() is None:
            self.kill(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.process.wait, 15)
            except subprocess.TimeoutExpired:
                self.kill()
                await asyncio.to_thread(self.process.wait, 15)


@asynccontextmanager
async def bindings() -> AsyncIterator[list[BindingProcess]]:
    started: list[BindingProcess] = []
    try:
        yield started
    finally:
        for process in started:
            await process.stop()


def inventory(n: int) -> tuple[list[events.Envelope], list[events.InstanceData], list[events.HavipData]]:
    vpc, subnet = uuid.uuid4(), uuid.uuid4()
    servers = [
        events.InstanceData(
            id=uuid.uuid4(), vpc_id=vpc, subnet_id=subnet, name=f"cvm{i}",
            private_ip=IPv4Address("198.18.0.10") + i, mac=f"02:00:00:00:00:{i:02x}",
        )
        for i in (1, 2)
    ]  # fmt: skip
    havips = [
        events.HavipData(
            id=uuid.uuid4(), vpc_id=vpc, subnet_id=subnet, name=None, address=HAVIP_BASE + i, candidates=[]
        )
        for i in range(n)
    ]
    envs = [events.envelope("instance.registered", s, "allocator") for s in servers]
    envs += [events.envelope("havip.allocated", h, "allocator") for h in havips]
    return envs, servers, havips


def claims(server: events.InstanceData, havips: list[events.HavipData]) -> list[events.Envelope]:
    observed = [
        events.ObservedClaim(
            claim_id=uuid.uuid4(), kind="garp_request", sender_mac=server.mac, eth_src=server.mac,
            sender_ip=h.address, target_ip=h.address, captured_at=time.time_ns(),
        )
        for h in havips
    ]  # fmt: skip
    return [
        events.envelope(
            events.CLAIMS_EVENT,
            events.ClaimsObserved(
                watcher_id="bench", interface="bench0", claims=observed[i : i + CLAIMS_PER_EVENT]
            ),
            "arp_watcher",
        )
        for i in range(0, len(observed), CLAIMS_PER_EVENT)
    ]


async def committed_to(conn: asyncpg.Connection, havip: events.HavipData, server: events.InstanceData) -> int:
    found = await conn.fetchval(
        "SELECT count(*) FROM binding.transitions WHERE havip_id = $1 AND to_instance_id = $2", havip.id, server.id
    )
    return int(found)


async def run(n: int, rounds: int) -> dict[str, object]:
    envs, (cvm1, cvm2), havips = inventory(n)
    workdir = Path(tempfile.mkdtemp(prefix="bench-standby-"))  # the processes' logs: kept if the run fails
    async with sandbox("standby") as box, bindings() as started:
        publisher = Broker(CommonSettings(amqp_url=box.amqp_url), "bench")
        await publisher.connect()
        conn = await asyncpg.connect(box.database_url)
        try:
            async with httpx.AsyncClient(timeout=5.0) as client:
                for name in ("binding-1", "binding-2"):
                    started.append(BindingProcess.spawn(name, box.database_url, box.amqp_url, workdir))
                    await started[-1].running()
                say(f"inventory: 2 servers, {n} HAVIPs; cvm1 claims them all")
                await publisher.publish_many(envs)
                await publisher.publish_many(claims(cvm1, havips))

                async def all_held() -> bool:
                    held = await conn.fetchval("SELECT count(*) FROM binding.transitions")
                    return int(held) >= n

                await eventually(all_held, timeout=DEADLINE_S, what=f"{n} HAVIPs held by cvm1")
                takeovers_s: list[float] = []
                holder = cvm1
                for round_ in range(rounds):
                    alive = [p for p in started if p.process.poll() is None]
                    gauges = [await p.consuming(client) for p in alive]
                    if sorted(g or 0 for g in gauges) != [0, 1]:
                        raise RuntimeError(f"expected one deciding process and one waiting: {gauges}")
                    active = alive[gauges.index(1)]
                    havip = havips[round_ % n]
                    mover = cvm2 if holder is cvm1 else cvm1
                    before = await committed_to(conn, havip, mover)
                    killed_at = time.time_ns()
                    active.kill()
                    await publisher.publish_many(claims(mover, [havip]))

                    async def moved(
                        havip: events.HavipData = havip, mover: events.InstanceData = mover, before: int = before
                    ) -> bool:
                        return await committed_to(conn, havip, mover) > before

                    await eventually(moved, timeout=DEADLINE_S, interval=0.002, what="the claim after the kill")
                    committed_at: datetime = await conn.fetchval(
                        "SELECT max(committed_at) FROM binding.transitions"
                        " WHERE havip_id = $1 AND to_instance_id = $2",
                        havip.id,
                        mover.id,
                    )
                    took_s = (committed_at.timestamp() * 1e9 - killed_at) / 1e9
                    takeovers_s.append(took_s)
                    say(f"round {round_ + 1}: SIGKILL of {active.name} -> next commit {took_s * 1000:.0f} ms")
                    # Move every HAVIP to the mover, so that the next round's claim is a change of holder too.
                    holder = mover
                    await publisher.publish_many(claims(mover, [h for h in havips if h is not havip]))

                    async def all_moved(mover: events.InstanceData = mover) -> bool:
                        held = await conn.fetchval(
                            "SELECT count(*) FROM binding.bindings WHERE instance_id = $1", mover.id
                        )
                        return int(held) >= n

                    await eventually(all_moved, timeout=DEADLINE_S, what="every HAVIP moved")
                    await active.stop()
                    started.append(
                        BindingProcess.spawn(
                            f"binding-{len(started) + 1}", box.database_url, box.amqp_url, workdir
                        )
                    )
                    await started[-1].running()
            async with round_trip(box.amqp_url) as once:
                for _ in range(20):  # warm-up
                    await once()
                trips = [(await once())[0] for _ in range(200)]
        finally:
            await conn.close()
            await publisher.close()
    shutil.rmtree(workdir)
    return {
        "n": n,
        "rounds": rounds,
        "kill_to_next_commit_ms": [round(t * 1000, 1) for t in takeovers_s],
        "kill_to_next_commit_median_ms": round(statistics.median(takeovers_s) * 1000, 1),
        "round_trip_median_ms": round(statistics.median(trips) * 1000, 2),
        "machine": machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="HAVIPs (default 1000)")
    parser.add_argument("--rounds", type=int, default=5, help="kills of the deciding process (default 5)")
    parser.add_argument("--json", action="store_true", help="the result as JSON")
    args = parser.parse_args()
    result = asyncio.run(run(args.n, args.rounds))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"binding standby, {args.n} HAVIPs, {args.rounds} SIGKILLs of the deciding process")
    print(
        f"  kill -> next claim committed by the other: {result['kill_to_next_commit_ms']} ms "
        f"(median {result['kill_to_next_commit_median_ms']} ms)"
    )
    print(f"  reference: bare publish -> consume round trip, median {result['round_trip_median_ms']} ms")


if __name__ == "__main__":
    main()
