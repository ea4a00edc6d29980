"""The demo: a real keepalived pair fails over on a closed lab wire, the HAVIP control plane follows, and so
does a client's traffic.

Builds a lab (network namespaces behind a private bridge, where — as in a cloud VPC — the CVMs' ARP
announcements of the HAVIP never reach the client), starts the three services as processes on a database and a
RabbitMQ virtual host of their own, and the example event consumer, which points the client's neighbour entry
for the HAVIP at its holder on every `havip.binding.changed`. Allocates a HAVIP through the API, has the client
send a datagram to it every 10 ms, starts keepalived on two CVMs, fails the master, and shows the interruption
split into keepalived's detection, our capture -> commit, the event's delivery and the consumer's programming,
where the datagrams landed, the new holder and the history. Everything it made is torn down at the end, also on
Ctrl-C or failure.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.e2e.system import System, register_inventory  # noqa: E402
from tests.e2e.traffic_failover import FAILURES, SUBNET, FailoverOutcome, TrafficLab, run_failover  # noqa: E402
from tests.lab import Lab  # noqa: E402
from tests.sandbox import temporary_database, temporary_vhost  # noqa: E402

PG_BASE = "postgresql://postgres@127.0.0.1:5432"
AMQP_BASE = "amqp://guest:guest@127.0.0.1:5672"
T0 = time.monotonic()


def say(text: str) -> None:
    print(f"[{time.monotonic() - T0:6.2f} s] {text}", flush=True)


def run_demo(database_url: str, amqp_url: str, failure: str) -> None:
    with tempfile.TemporaryDirectory(prefix="havip-demo-") as tmp, Lab(SUBNET) as lab:
        tlab = TrafficLab.build(lab)
        for host in (tlab.cvm1, tlab.cvm2, tlab.client):
            say(f"lab {lab.prefix}: {host.name} {host.ip} ({host.mac}) in netns {host.netns}")
        say(
            "the network, not ARP, decides who gets an address: on the lab's bridge only an instance's ARP "
            "about its own address reaches the client (nftables, bridge family); the watcher still sees every "
            f"GARP on {tlab.capture}"
        )

        with System(database_url, amqp_url, tlab.capture, Path(tmp)) as system:
            say(f"services up: API {system.api_url}/v1 (OpenAPI at {system.api_url}/openapi.json)")
            say(
                f"metrics: allocator {system.api_url}/metrics, "
                f"binding http://127.0.0.1:{system.binding_metrics_port}/metrics, "
                f"watcher http://127.0.0.1:{system.watcher_metrics_port}/metrics"
            )
            inventory = register_inventory(system, "demo", SUBNET, tlab.hosts())
            say(f"VPC and subnet {SUBNET} created; cvm1, cvm2 and the client registered as instances")
            with tlab.neighbour_programmer(system.amqp_url, "demo.neighbours") as consumer:
                say(
                    "example consumer (docs/events/example_consumer.py --program-neighbour "
                    f"{tlab.client.netns} {tlab.client.iface}) ready: each havip.binding.changed sets the "
                    "client's neighbour entry for the HAVIP"
                )
                outcome = run_failover(system, tlab, consumer, inventory, how=failure, vrid=51, say=say)
            print_outcome(outcome, tlab, inventory)
            print_metrics(system)
        say("services stopped; tearing the lab down")
    say("done: lab, database and virtual host removed")


def print_outcome(outcome: FailoverOutcome, tlab: TrafficLab, inventory: dict[str, Any]) -> None:
    names = {inventory["instances"][n]["id"]: n for n in ("cvm1", "cvm2")}
    takeover = outcome.takeover
    holder = names[takeover["to_instance_id"]]
    print(f"\n  HAVIP {outcome.havip['address']} is now held by {holder} (MAC {takeover['mac']})")
    print("\n  history (oldest first), and when the consumer pointed the client there:")
    for transition, record in zip(outcome.history, outcome.programmed, strict=False):
        frm = names.get(transition["from_instance_id"] or "", "-")
        print(
            f"    #{transition['sequence']}  {frm:>5} -> {names.get(transition['to_instance_id'] or '', '-'):<5}"
            f"  captured {transition['captured_at']}  committed {transition['committed_at']}"
            f"  client programmed {record['neighbour']['programmed_at']}"
        )

    print(f"\n  from the failure ({outcome.how}) to the traffic at the new holder, measured:")
    segments = outcome.segments_ms()
    for what, ms in segments:
        print(f"    {what:<72} {ms:9.2f} ms")
    print(f"    {'= failure -> first datagram at cvm2':<72} {sum(ms for _, ms in segments):9.2f} ms")

    traffic = outcome.traffic
    gap = outcome.silence()
    if gap is not None:
        last_sent_ms = (traffic.sent[gap.last_old.seq].before - outcome.failed_at) / 1e6
        print(
            f"\n  as the client saw it: the last answer from cvm1 was to datagram #{gap.last_old.seq} "
            f"(sent {last_sent_ms:+.1f} ms from the failure), the first from cvm2 to #{gap.first_new.seq}: "
            f"{gap.unanswered} datagrams unanswered, {gap.duration_ns / 1e6:.1f} ms without answers"
        )
        if gap.unanswered == 0:
            print(
                "  (cvm1 answered until the client was pointed at cvm2: the failure took its keepalived, not the "
                "address — the network kept sending to cvm1 while the binding named it)"
            )
    for cvm in ("cvm1", "cvm2"):
        arrivals = traffic.arrivals_at(cvm)
        span = "none"
        if arrivals:
            first_ms, last_ms = ((a.at - outcome.failed_at) / 1e6 for a in (arrivals[0], arrivals[-1]))
            span = f"{first_ms:+.1f} ms .. {last_ms:+.1f} ms from the failure"
        print(
            f"  datagrams that reached {cvm}: {len(arrivals):4d} ({span}); answered by {cvm}: "
            f"{len(traffic.answers_from(cvm))}"
        )
        queued = [a for a in outcome.queued_before_programmed() if a.server == cvm]
        if queued:
            print(
                f"    {len(queued)} of them sent before the consumer first pointed the client at {cvm}: ARP gave "
                "the client no answer it could use, its kernel held them until the entry was set"
            )
    wrong = outcome.misdirected()
    print(
        f"  datagrams that reached a CVM the client was not pointed at: {len(wrong)}"
        f" (of {len(traffic.arrivals)} arrived; {len(traffic.sent)} sent)"
    )
    print(f"  ARP frames the network kept from the client during the run: {outcome.arp_dropped}")
    print(f"  the client's neighbour entry: {outcome.client_neighbour}\n")


def print_metrics(system: System) -> None:
    for line in httpx.get(f"http://127.0.0.1:{system.binding_metrics_port}/metrics").text.splitlines():
        if line.startswith(
            (
                "havip_transitions_total",
                "havip_binding_latency_seconds_count",
                "havip_binding_latency_seconds_sum",
                "havip_owner_info",
            )
        ):
            print(f"  {line}")
    print()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--failure",
        choices=FAILURES,
        default="stop",
        help="how the master fails: keepalived stopped, SIGKILLed, or its interface taken down",
    )
    args = parser.parse_args()
    run_id = uuid.uuid4().hex[:8]

    async def with_database() -> None:
        async with temporary_database(PG_BASE, f"havip_demo_{run_id}") as dsn:
            with temporary_vhost(AMQP_BASE, f"havip-demo-{run_id}") as amqp_url:
                await asyncio.to_thread(run_demo, dsn, amqp_url, args.failure)

    asyncio.run(with_database())
    return 0


if __name__ == "__main__":
    sys.exit(main())
