"""deploy/prometheus: promtool accepts the configuration and the rules, the rule unit tests pass and cover
every alert both firing and silent, and every metric the rules read is one the services export."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS_DIR / "rules" / "havip.yml"
RULE_TESTS = PROMETHEUS_DIR / "tests" / "havip_test.yml"
SOURCES = [ROOT / "services", ROOT / "shared"]
# Suffixes the client library or the exposition format adds to a declared name.
EXPOSITION_SUFFIXES = ("_bucket", "_count", "_sum", "_total")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    executable = shutil.which("promtool")
    assert executable is not None, "promtool not found: install the Debian package prometheus (scripts/setup.sh)"
    return subprocess.run(
        [executable, *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=120, check=False
    )


def rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"]]


@pytest.mark.parametrize(
    "args",
    [
        ("check", "config", "prometheus.yml"),
        ("check", "config", "prometheus-ha.yml"),
        ("check", "rules", "rules/havip.yml"),
        ("test", "rules", "tests/havip_test.yml"),
    ],
    ids=["check config", "check config (ha)", "check rules", "test rules"],
)
def test_promtool_accepts(args: tuple[str, ...]) -> None:
    result = promtool(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_config_loads_the_rules_and_scrapes_the_three_services() -> None:
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text(encoding="utf-8"))
    assert sorted(job["job_name"] for job in config["scrape_configs"]) == ["allocator", "arp_watcher", "binding"]
    ports = {
        job["job_name"]: {target.rsplit(":", 1)[1] for c in job["static_configs"] for target in c["targets"]}
        for job in config["scrape_configs"]
    }
    assert ports == {"allocator": {"8080"}, "binding": {"9103"}, "arp_watcher": {"9102"}}
    assert "rules/*.yml" in config["rule_files"]
    # promtool check config reports how many rule files it found; the test file must not be loaded as rules.
    assert "1 rule files found" in promtool("check", "config", "prometheus.yml").stdout


def test_every_alert_is_tested_firing_and_silent() -> None:
    alerts = {rule["alert"] for rule in rules() if "alert" in rule}
    tests = yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))["tests"]
    cases = [case for test in tests for case in test.get("alert_rule_test", [])]
    fired = {case["alertname"] for case in cases if case["exp_alerts"]}
    silent = {case["alertname"] for case in cases if not case["exp_alerts"]}
    assert alerts - fired == set(), "alerts never tested firing"
    assert alerts - silent == set(), "alerts never tested staying silent"


def test_every_alert_has_a_hold_time_a_severity_and_a_description() -> None:
    for rule in rules():
        if "alert" in rule:
            assert "for" in rule, rule["alert"]
            assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
            assert rule["annotations"]["summary"], rule["alert"]
            assert rule["annotations"]["description"], rule["alert"]


def test_every_metric_the_rules_read_is_declared_by_a_service() -> None:
    source = "\n".join(path.read_text(encoding="utf-8") for d in SOURCES for path in d.rglob("*.py"))
    read = {name for rule in rules() for name in re.findall(r"\bhavip_[a-z0-9_]+", rule["expr"])}
    assert read, "no metric found in the rules"
    undeclared = set()
    for name in read:
        declared = {name} | {name.removesuffix(suffix) for suffix in EXPOSITION_SUFFIXES if name.endswith(suffix)}
        if not any(f'"{candidate}"' in source for candidate in declared):
            undeclared.add(name)
    assert undeclared == set()
