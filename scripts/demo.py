"""The demo: a real keepalived pair fails over on a closed lab wire, and the HAVIP control plane follows.

Builds a lab (network namespaces behind a private bridge), starts the three services as processes on a
database and a RabbitMQ virtual host of their own, allocates a HAVIP through the API, starts keepalived on two
CVMs, fails the master, and shows who holds the address, the history and the measured capture → commit
latency. Everything it made is torn down at the end, also on Ctrl-C or failure.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.e2e.system import System  # noqa: E402
from tests.lab import Keepalived, Lab, wait_for  # noqa: E402
from tests.sandbox import temporary_database, temporary_vhost  # noqa: E402

PG_BASE = "postgresql://postgres@127.0.0.1:5432"
AMQP_BASE = "amqp://guest:guest@127.0.0.1:5672"
T0 = time.monotonic()


def say(text: str) -> None:
    print(f"[{time.monotonic() - T0:6.2f} s] {text}", flush=True)


def ok(response: httpx.Response) -> Any:
    if response.status_code not in (200, 201):
        raise RuntimeError(
            f"{response.request.method} {response.request.url}: {response.status_code} {response.text}"
        )
    return response.json()


def holder(api: httpx.Client, havip_id: str, names: dict[str, str]) -> str:
    havip = ok(api.get(f"/havips/{havip_id}"))
    if havip["state"] != "BOUND":
        return "nobody (UNBOUND)"
    return f"{names[havip['bound_instance_id']]} (instance {havip['bound_instance_id']}, MAC {havip['bound_mac']})"


def run_demo(database_url: str, amqp_url: str, failure: str) -> None:
    with tempfile.TemporaryDirectory(prefix="havip-demo-") as tmp, Lab("192.0.2.0/24") as lab:
        cvm1 = lab.add_host("cvm1", "192.0.2.11")
        cvm2 = lab.add_host("cvm2", "192.0.2.12")
        capture = lab.add_capture_port("cap")
        say(f"lab {lab.prefix}: cvm1 {cvm1.ip} ({cvm1.mac}), cvm2 {cvm2.ip} ({cvm2.mac}), watcher on {capture}")

        with System(database_url, amqp_url, capture, Path(tmp)) as system:
            say(f"services up: API {system.api_url}/v1 (OpenAPI at {system.api_url}/openapi.json)")
            say(
                f"metrics: allocator {system.api_url}/metrics, "
                f"binding http://127.0.0.1:{system.binding_metrics_port}/metrics, "
                f"watcher http://127.0.0.1:{system.watcher_metrics_port}/metrics"
            )
            with system.api() as api:
                vpc = ok(api.post("/vpcs", json={"name": "demo", "cidr": "192.0.2.0/24"}))
                subnet = ok(
                    api.post("/subnets", json={"vpc_id": vpc["id"], "name": "web", "cidr": "192.0.2.0/24"})
                )
                names: dict[str, str] = {}
                for host in (cvm1, cvm2):
                    body = {"subnet_id": subnet["id"], "name": host.name, "private_ip": host.ip, "mac": host.mac}
                    names[ok(api.post("/instances", json=body))["id"]] = host.name
                havip = ok(api.post("/havips", json={"subnet_id": subnet["id"], "name": "web-vip"}))
                vip = havip["address"]
                say(f"HAVIP {havip['id']} allocated: {vip} in subnet {subnet['cidr']}; state {havip['state']}")

                common: dict[str, Any] = {"vip": vip, "vrid": 51, "garp_master_delay": 1, "garp_master_refresh": 5}
                ka1 = Keepalived(
                    cvm1, peers=[cvm2.ip], priority=100, state="MASTER", workdir=lab.workdir, **common
                )
                ka2 = Keepalived(cvm2, peers=[cvm1.ip], priority=80, state="BACKUP", workdir=lab.workdir, **common)
                ka1.start()
                ka2.start()
                say("keepalived started on cvm1 (priority 100) and cvm2 (priority 80); waiting for a master")
                wait_for(lambda: ok(api.get(f"/havips/{havip['id']}"))["state"] == "BOUND", 30, what="binding")
                say(f"HAVIP {vip} is held by {holder(api, havip['id'], names)}")

                failed_at = time.time()
                if failure == "stop":
                    ka1.stop()
                elif failure == "kill":
                    ka1.kill()
                else:
                    cvm1.link_down()
                say(f"master failed ({failure}); keepalived on cvm2 must notice, then we must follow")
                cvm2_id = next(i for i, name in names.items() if name == "cvm2")
                wait_for(
                    lambda: ok(api.get(f"/havips/{havip['id']}"))["bound_instance_id"] == cvm2_id,
                    30,
                    what="failover",
                )
                say(f"HAVIP {vip} is now held by {holder(api, havip['id'], names)}")
                history = ok(api.get(f"/havips/{havip['id']}/transitions"))["items"]
                print("\n  history (newest first):")
                for t in history:
                    frm = names.get(t["from_instance_id"] or "", "-")
                    print(
                        f"    #{t['sequence']}  {frm:>5} -> {names.get(t['to_instance_id'] or '', '-'):<5}"
                        f"  captured {t['captured_at']}  committed {t['committed_at']}  by {t['watcher_id']}"
                    )
                last = history[0]
                captured = datetime.fromisoformat(last["captured_at"])
                committed = datetime.fromisoformat(last["committed_at"])
                print(
                    f"\n  keepalived's share (failure -> new master's GARP): "
                    f"{(captured.timestamp() - failed_at) * 1000:8.1f} ms"
                )
                print(
                    f"  our share (GARP captured -> transition committed): "
                    f"{(committed - captured).total_seconds() * 1000:8.2f} ms\n"
                )
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
                ka1.stop()
                ka2.stop()
        say("services stopped; tearing the lab down")
    say("done: lab, database and virtual host removed")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--failure",
        choices=("stop", "kill", "link_down"),
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
