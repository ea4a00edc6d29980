"""The real Prometheus server with deploy/prometheus's configuration, pointed at the three services: it scrapes
every one of them, and every alert and recording rule evaluates without error against what they export."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml

from tests import service_logs
from tests.e2e.system import System
from tests.lab import Lab
from tests.ports import free_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
DEADLINE_S = 60.0  # generous: CI shares two cores with other test runs
# Always exported, whatever happened (no labels, or collected from the capture's counters), and read by rules.
ALWAYS_EXPORTED = [
    "havip_flapping",
    "havip_split_brain",
    "havip_binding_latency_seconds_bucket",
    "havip_watcher_kernel_drops_total",
    "havip_watcher_claims_dropped_total",
]

T = TypeVar("T")


def wait_for(probe: Callable[[], T | None], what: str, timeout: float = DEADLINE_S) -> T:
    """Poll until `probe` returns something (not None); the last observation goes into the timeout message."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout} s: {what}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def system(database_url: str, amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    with Lab("192.0.2.0/24") as lab:
        lab.add_capture_port("cap")
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
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
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

    assert wait_for(all_up, "every target up") == {"allocator": "up", "binding": "up", "arp_watcher": "up"}


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
