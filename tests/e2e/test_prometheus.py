"""The real Prometheus server with deploy/prometheus's configuration, pointed at the three services: it scrapes
every one of them, and every alert and recording rule evaluates without error against what they export. Then a
keepalived pair fails over, an intruder is refused and the pair flaps, and every query of the Grafana dashboard
(deploy/grafana) returns data from this Prometheus, and its history tables from the services' database."""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx
import pytest
import yaml

from tests import grafana, service_logs
from tests.e2e.system import System, ok, register_inventory
from tests.lab import Keepalived, Lab
from tests.ports import free_port
from tests.waiting import eventually_sync

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
DEADLINE_S = 60.0  # generous: CI shares two cores with other test runs
POLL_S = 0.2
SCRAPE_INTERVAL_S = 1.0  # config_for() below
JOBS = ("allocator", "binding", "arp_watcher")  # deploy/prometheus/prometheus.yml's scrape jobs
# Always exported, whatever happened (no labels, or collected from the capture's counters), and read by rules.
ALWAYS_EXPORTED = [
    "havip_flapping",
    "havip_split_brain",
    "havip_binding_latency_seconds_bucket",
    "havip_watcher_kernel_drops_total",
    "havip_watcher_claims_dropped_total",
]

T = TypeVar("T")


def wait_for(probe: Callable[[], T | None], what: str) -> T:
    """What `probe` returns once it returns something, polled as often as Prometheus's answers may change."""
    return eventually_sync(probe, timeout=DEADLINE_S, interval=POLL_S, what=what)


@pytest.fixture(scope="module")
def system(
    lab: Lab, database_url: str, amqp_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[System]:
    workdir = tmp_path_factory.mktemp("services")
    with System(database_url, amqp_url, lab.capture_ports["cap"].iface, workdir) as running:
        yield running


def config_for(system: System) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with the targets moved to the ports the test's services listen on."""
    config: dict[str, Any] = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text(encoding="utf-8"))
    ports = {
        "allocator": system.api_port,
        "binding": system.binding_metrics_port,
        "arp_watcher": system.watcher_metrics_port,
    }
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [f"127.0.0.1:{ports[job['job_name']]}"]}]
    config["global"] = {"scrape_interval": f"{SCRAPE_INTERVAL_S:g}s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(PROMETHEUS_DIR / rule_files) for rule_files in config["rule_files"]]
    return config


@pytest.fixture(scope="module")
def prometheus(system: System, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    executable = shutil.which("prometheus")
    assert executable is not None, "prometheus not found: install the Debian package prometheus (scripts/setup.sh)"
    workdir = tmp_path_factory.mktemp("prometheus")
    config_file = workdir / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config_for(system), sort_keys=False), encoding="utf-8")
    port = free_port()
    log_path = workdir / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                executable,
                f"--config.file={config_file}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped as a whole, nothing else touched
        )
    service_logs.follow("prometheus", log_path)
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool | None:
            if process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {process.returncode}:\n{log_path.read_text()}")
            try:
                return True if httpx.get(f"{url}/-/ready", timeout=2.0).status_code == 200 else None
            except httpx.HTTPError:
                return None

        wait_for(ready, "prometheus ready")
        yield url
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        service_logs.forget(log_path)


def api(prometheus: str, path: str, **params: str) -> Any:
    response = httpx.get(f"{prometheus}/api/v1/{path}", params=params, timeout=10.0)
    body = response.json()
    assert response.status_code == 200, body
    assert body["status"] == "success", body
    return body["data"]


def test_every_service_is_scraped(prometheus: str) -> None:
    def all_up() -> dict[str, str] | None:
        targets = api(prometheus, "targets")["activeTargets"]
        health = {t["labels"]["job"]: t["health"] for t in targets}
        return health if set(health.values()) == {"up"} else None

    assert wait_for(all_up, "every target up") == dict.fromkeys(JOBS, "up")


def test_the_metrics_the_rules_read_arrive(prometheus: str) -> None:
    def present() -> list[str] | None:
        found = [name for name in ALWAYS_EXPORTED if api(prometheus, "query", query=f"count({name})")["result"]]
        return found if len(found) == len(ALWAYS_EXPORTED) else None

    assert wait_for(present, f"series of {ALWAYS_EXPORTED}") == ALWAYS_EXPORTED


def test_every_rule_evaluates_without_error(prometheus: str) -> None:
    def evaluated() -> list[dict[str, Any]] | None:
        rules = [rule for group in api(prometheus, "rules")["groups"] for rule in group["rules"]]
        done = rules and all(rule["lastEvaluation"] > "0001-01-01T00:00:00Z" for rule in rules)
        return rules if done else None

    rules = wait_for(evaluated, "every rule evaluated once")
    assert {(rule["name"], rule["health"], rule.get("lastError", "")) for rule in rules} == {
        (rule["name"], "ok", "") for rule in rules
    }
    for rule in rules:
        api(prometheus, "query", query=rule["query"])  # fails on an error status
    # The services are up and quiet: no alert fires (a firing one would be a false alarm or a broken rule).
    firing = [alert for alert in api(prometheus, "alerts")["alerts"] if alert["state"] == "firing"]
    assert firing == []


# ---- the Grafana dashboard against this Prometheus, after a failover ----------------------------------------

# Panels that stay at zero while the system is healthy (nothing dropped, nothing retried): their series must
# be there, with values, and those values zero.
ZERO_WHEN_HEALTHY = {"Watcher drops and errors"}


@dataclass(frozen=True)
class Failover:
    started: datetime
    havip: dict[str, Any]
    subnet_id: str
    holder_id: str  # the instance holding the HAVIP at the end
    instance_ids: dict[str, str]


def holder(system: System, havip_id: str) -> str | None:
    with system.api() as api:
        bound: str | None = ok(api.get(f"/havips/{havip_id}"))["bound_instance_id"]
    return bound


def wait_holder(system: System, havip_id: str, instance_id: str) -> None:
    wait_for(
        lambda: True if holder(system, havip_id) == instance_id else None, f"{havip_id} held by {instance_id}"
    )


@pytest.fixture(scope="module")
def failover(system: System, lab: Lab, prometheus: str) -> Failover:
    """What the dashboard is for: a keepalived pair fails over, an intruder's claim is refused, then the pair
    flaps (both claim the address in turn: flapping and split brain) and cvm2 ends up holding it."""
    wait_for(lambda: True if len(api(prometheus, "query", query="up == 1")["result"]) == 3 else None, "scraped")
    started = datetime.now(UTC)
    cvm1, cvm2 = lab.hosts["cvm1"], lab.hosts["cvm2"]
    pair = {name: (lab.hosts[name].ip, lab.hosts[name].mac) for name in ("cvm1", "cvm2")}
    inventory = register_inventory(system, "grafana", str(lab.network), pair)
    ids = {name: instance["id"] for name, instance in inventory["instances"].items()}
    with system.api() as client:
        havip = ok(client.post("/havips", json={"subnet_id": inventory["subnet"]["id"], "name": "dashboard"}))
    vip = havip["address"]
    ka1 = Keepalived(cvm1, vip=vip, peers=[cvm2.ip], priority=100, state="MASTER", vrid=71, workdir=lab.workdir)
    ka2 = Keepalived(cvm2, vip=vip, peers=[cvm1.ip], priority=80, state="BACKUP", vrid=71, workdir=lab.workdir)
    try:
        ka1.start()  # the intended master first (see tests/e2e/test_failover.py)
        wait_holder(system, havip["id"], ids["cvm1"])
        ka2.start()
        ka1.stop()
        wait_holder(system, havip["id"], ids["cvm2"])
    finally:
        ka1.stop()
        ka2.stop()
        for host in (cvm1, cvm2):
            if host.has_address(vip):
                host.del_address(vip)

    lab.hosts["intruder"].arping(vip, count=3)
    wait_for(lambda: system.metric("havip_claims_rejected_total", {"reason": "unknown_mac"}) or None, "refused")

    for name in ("cvm1", "cvm2") * 3:
        lab.hosts[name].arping(vip)
        wait_holder(system, havip["id"], ids[name])
    final_owner = {"havip_id": havip["id"], "instance_id": ids["cvm2"]}

    def final_state_exported() -> bool | None:
        exported = [
            system.metric("havip_flapping"),
            system.metric("havip_split_brain"),
            system.metric("havip_owner_info", final_owner),
        ]
        return True if all(exported) else None

    wait_for(final_state_exported, "flapping, split brain and the final holder exported")
    # Prometheus's answers are those of its last scrape: flapping began two transitions before the end, so a
    # scrape between them shows flapping with the previous holder. The tests compare the final state.
    wait_scraped_after(prometheus, time.time())
    return Failover(started, havip, inventory["subnet"]["id"], ids["cvm2"], ids)


def wait_scraped_after(prometheus: str, moment: float) -> None:
    """Until Prometheus has stored a scrape of every target begun after `moment` (a time.time()). `up` is
    stored with the samples of its scrape, so its timestamp is that of the target's newest stored scrape."""

    def scraped() -> list[str] | None:
        series = api(prometheus, "query", query="timestamp(up)")["result"]
        jobs = sorted(s["metric"]["job"] for s in series if float(s["value"][1]) > moment)
        return jobs if jobs == sorted(JOBS) else None

    wait_for(scraped, f"a scrape of every target after {moment:.3f}")


def values_of(prometheus: str, query: grafana.PanelQuery, variables: dict[str, list[str]], since: datetime) -> Any:
    """(series, every value of every series) of one panel query, run as Grafana runs it: a range query from
    `since` until now with a 1 s step, or an instant query."""
    step_s = 1.0
    expr = grafana.promql(query.text, variables, scrape_interval_s=SCRAPE_INTERVAL_S, step_s=step_s)
    if query.instant:
        series = api(prometheus, "query", query=expr)["result"]
        return series, [float(s["value"][1]) for s in series]
    end = time.time()
    series = api(
        prometheus,
        "query_range",
        query=expr,
        start=f"{since.timestamp():.3f}",
        end=f"{end:.3f}",
        step=f"{step_s:g}",
    )["result"]
    return series, [float(value) for s in series for _, value in s["values"]]


def test_every_dashboard_variable_offers_the_failed_over_havip(prometheus: str, failover: Failover) -> None:
    wanted = {"havip": failover.havip["address"], "subnet": failover.subnet_id}
    variables = grafana.dashboard()["templating"]["list"]
    assert sorted(v["name"] for v in variables) == sorted(wanted)
    for variable in variables:
        metric, label = grafana.label_values_query(variable["query"])

        def offered(
            metric: str = metric, label: str = label, value: str = wanted[variable["name"]]
        ) -> list[str] | None:
            values: list[str] = api(prometheus, f"label/{label}/values", **{"match[]": metric})
            return values if value in values else None

        wait_for(offered, f"{variable['name']} offers {wanted[variable['name']]}")


def test_every_dashboard_query_returns_series_after_the_failover(prometheus: str, failover: Failover) -> None:
    queries = grafana.prometheus_queries(grafana.dashboard())
    variables = {"havip": [failover.havip["address"]], "subnet": [failover.subnet_id]}
    panels = {q.panel for q in queries}
    polled: list[tuple[dict[grafana.PanelQuery, Any], list[str], list[str]]] = []

    def every_panel_has_data() -> bool:
        answers = {q: values_of(prometheus, q, variables, failover.started) for q in queries}
        without_data = sorted(q.name for q, (_, values) in answers.items() if not any(map(math.isfinite, values)))
        flat = sorted(
            panel
            for panel in panels - ZERO_WHEN_HEALTHY
            if not any(v > 0 for q, (_, values) in answers.items() if q.panel == panel for v in values)
        )
        polled.append((answers, without_data, flat))
        return not without_data and not flat

    with suppress(TimeoutError):  # the assertions below, on the last answers, say what is missing
        eventually_sync(every_panel_has_data, timeout=DEADLINE_S, interval=0.5, what="every panel's data")
    answers, without_data, flat = polled[-1]
    assert without_data == [], "queries without a series or a value"
    assert flat == [], "panels that never rose above zero through a failover, a refusal and flapping"
    assert panels >= ZERO_WHEN_HEALTHY
    for q, (_, values) in answers.items():
        if q.panel in ZERO_WHEN_HEALTHY:
            assert set(values) == {0.0}, q.name

    [owner_query] = [q for q in queries if q.panel == "Current holder of every HAVIP"]
    owners, _ = answers[owner_query]
    assert [s["metric"] for s in owners] == [
        {"address": failover.havip["address"], "havip_id": failover.havip["id"], "instance_id": failover.holder_id}
    ]
    refused = [q for q in queries if q.panel == "Refused claims by reason"]
    assert any(
        s["metric"] == {"reason": "unknown_mac"} and any(float(v) > 0 for _, v in s["values"])
        for q in refused
        for s in answers[q][0]
    )


async def test_the_dashboard_history_tables_show_the_failover(system: System, failover: Failover) -> None:
    end = datetime.now(UTC) + timedelta(seconds=1)  # Grafana's macros keep whole seconds
    sql = {
        q.panel: grafana.sql(q.text, failover.started - timedelta(seconds=1), end)
        for q in grafana.sql_queries(grafana.dashboard())
    }
    conn = await asyncpg.connect(system.database_url)
    try:
        transitions = await conn.fetch(sql["Recent transitions"])
        refusals = await conn.fetch(sql["Recent refused claims"])
    finally:
        await conn.close()
    cvm1, cvm2 = (uuid.UUID(failover.instance_ids[name]) for name in ("cvm1", "cvm2"))
    mine = [r for r in transitions if r["havip_id"] == uuid.UUID(failover.havip["id"])]
    # Newest first: six claims in turn, the keepalived failover, the first master.
    assert [(r["sequence"], r["from_instance_id"], r["to_instance_id"]) for r in mine[-2:]] == [
        (2, cvm1, cvm2),
        (1, None, cvm1),
    ]
    assert [r["sequence"] for r in mine] == list(range(len(mine), 0, -1))
    assert len(mine) >= 8
    assert {r["address"] for r in mine} == {failover.havip["address"]}
    assert any(r["reason"] == "unknown_mac" and r["address"] == failover.havip["address"] for r in refusals)
