"""deploy/grafana: the checked-in dashboard is what the code generates, every query names a provisioned data
source, the provisioning files are valid, every PromQL expression parses and reads a metric the services export,
and the panels docs/contract.md#deployment-and-observability lists are there. (Live queries:
tests/e2e/test_prometheus.py and tests/integration/test_grafana_sql.py.)"""

from __future__ import annotations

import re
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy.grafana import dashboard as generator
from deploy.grafana.__main__ import main
from tests import grafana

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [ROOT / "services", ROOT / "shared"]
EXPOSITION_SUFFIXES = ("_bucket", "_count", "_sum", "_total")
# Grafana 11's plugin ids of the two data sources, and what each needs to connect.
REQUIRED_SETTINGS = {
    "prometheus": {"url"},
    "grafana-postgresql-datasource": {"url", "user"},
}
ENV_REFERENCE = re.compile(r"^\$(\w+|\{\w+\})$")


def datasources() -> list[dict[str, Any]]:
    document = yaml.safe_load(grafana.DATASOURCES_FILE.read_text(encoding="utf-8"))
    assert document["apiVersion"] == 1
    sources: list[dict[str, Any]] = document["datasources"]
    return sources


def test_the_checked_in_dashboard_is_what_the_code_generates() -> None:
    assert grafana.DASHBOARD_FILE.read_text(encoding="utf-8") == generator.render(), (
        "regenerate with: python -m deploy.grafana"
    )
    assert main(["--check"]) == 0


def test_check_mode_fails_on_a_stale_file_and_writing_repairs_it(tmp_path: Path) -> None:
    stale = tmp_path / "havip.json"
    stale.write_text(generator.render().replace("HAVIP control plane", "edited by hand"), encoding="utf-8")
    assert main(["--check", "--output", str(stale)]) == 1
    assert main(["--output", str(stale)]) == 0
    assert main(["--check", "--output", str(stale)]) == 0


def test_generation_is_deterministic() -> None:
    assert generator.render() == generator.render()


def test_every_panel_and_variable_uses_a_provisioned_data_source() -> None:
    provisioned = {source["uid"]: source["type"] for source in datasources()}
    board = grafana.dashboard()
    used = [panel["datasource"] for panel in grafana.panels(board)]
    used += [target["datasource"] for panel in grafana.panels(board) for target in panel["targets"]]
    used += [variable["datasource"] for variable in board["templating"]["list"]]
    assert used, "no data source referenced"
    assert {(ref["uid"], ref["type"]) for ref in used} <= set(provisioned.items())
    # Both provisioned sources are used, under the uids the compose deployment relies on.
    assert {ref["uid"] for ref in used} == {generator.PROMETHEUS_UID, generator.POSTGRES_UID}


def test_the_data_source_provisioning_is_valid() -> None:
    sources = datasources()
    assert len({s["uid"] for s in sources}) == len({s["name"] for s in sources}) == len(sources)
    assert [s["name"] for s in sources if s.get("isDefault")] == ["Prometheus"]
    for source in sources:
        assert source["type"] in REQUIRED_SETTINGS, source["type"]
        assert REQUIRED_SETTINGS[source["type"]] <= source.keys(), source["name"]
        assert source["access"] == "proxy", source["name"]
        assert source["editable"] is False, source["name"]
        assert re.fullmatch(r"[a-zA-Z0-9_-]{1,40}", source["uid"]), source["uid"]
        assert "password" not in source, source["name"]
        assert "password" not in source.get("jsonData", {}), source["name"]
        for key, value in source.get("secureJsonData", {}).items():
            assert ENV_REFERENCE.match(value), f"{source['name']}: {key} must come from the environment"
    postgres = next(s for s in sources if s["type"] == "grafana-postgresql-datasource")
    assert ENV_REFERENCE.match(postgres["user"])
    assert set(postgres["secureJsonData"]) == {"password"}
    assert postgres["jsonData"]["database"]


def test_prometheus_data_source_knows_the_scrape_interval() -> None:
    """Grafana derives $__rate_interval from it: it must be Prometheus's own scrape interval."""
    prometheus_config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    [prometheus] = [s for s in datasources() if s["type"] == "prometheus"]
    assert prometheus["jsonData"]["timeInterval"] == prometheus_config["global"]["scrape_interval"]


def test_the_dashboard_provider_loads_the_dashboards_directory() -> None:
    document = yaml.safe_load(grafana.PROVIDERS_FILE.read_text(encoding="utf-8"))
    assert document["apiVersion"] == 1
    [provider] = document["providers"]
    assert provider["type"] == "file"
    assert provider["allowUiUpdates"] is False  # generated files: a change in the UI would be lost
    assert Path(provider["options"]["path"]).is_absolute()
    assert provider["folder"]
    board = grafana.dashboard()
    assert board["uid"] == generator.DASHBOARD_UID
    assert sorted(p.name for p in grafana.DASHBOARD_FILE.parent.iterdir()) == ["havip.json"]


def test_panel_ids_are_unique_and_every_query_has_its_own_ref_id() -> None:
    board = grafana.dashboard()
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in grafana.panels(board):
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert ref_ids, panel["title"]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]


def test_every_metric_the_dashboard_reads_is_declared_by_a_service() -> None:
    source = "\n".join(path.read_text(encoding="utf-8") for d in SOURCES for path in d.rglob("*.py"))
    board = grafana.dashboard()
    expressions = [q.text for q in grafana.prometheus_queries(board)]
    expressions += [v["query"] for v in board["templating"]["list"]]
    read = {name for expr in expressions for name in re.findall(r"\bhavip_[a-z0-9_]+", expr)}
    assert read, "no metric found in the dashboard"
    undeclared = set()
    for name in read:
        declared = {name} | {name.removesuffix(suffix) for suffix in EXPOSITION_SUFFIXES if name.endswith(suffix)}
        if not any(f'"{candidate}"' in source for candidate in declared):
            undeclared.add(name)
    assert undeclared == set()


def test_every_promql_expression_parses(tmp_path: Path) -> None:
    """promtool parses rule expressions offline: each panel's expression, variables substituted, as a rule."""
    executable = shutil.which("promtool")
    assert executable is not None, "promtool not found: install the Debian package prometheus (scripts/setup.sh)"
    variables = {"havip": ["192.0.2.10"], "subnet": ["0b8f6a38-44a3-4b8f-9a43-5d1c3c0a0d4e"]}
    queries = grafana.prometheus_queries(grafana.dashboard())
    expressions = [grafana.promql(q.text, variables, scrape_interval_s=5, step_s=15) for q in queries]
    rules = [{"record": f"dashboard:query_{i}", "expr": expr} for i, expr in enumerate(expressions)]
    rules_file = tmp_path / "dashboard.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8")
    result = subprocess.run(
        [executable, "check", "rules", str(rules_file)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(rules)} rules found" in result.stdout


@pytest.mark.parametrize(
    ("topic", "pattern"),
    [
        ("current holder of every HAVIP", r"havip_owner_info\b"),
        ("transitions over time", r"rate\(havip_transitions_total"),
        ("wire → commit latency percentiles", r"quantile\(0\.99, .*havip_binding_latency_seconds_bucket"),
        ("the claim path hop by hop", r"quantile\(0\.99, sum by \(hop, le\) .*havip_claim_hop_seconds_bucket"),
        ("refused claims by reason", r"by \(reason\) \(rate\(havip_claims_rejected_total"),
        ("flapping", r"havip_flapping\b"),
        ("split brain", r"havip_split_brain\b"),
        ("partitions per binding replica", r"by \(instance\) \(havip_binding_partitions_owned\b"),
        ("binding replicas alive", r"havip_binding_replicas\b"),
        ("watcher packet rate", r"rate\(havip_watcher_kernel_packets_total"),
        ("watcher drop rate", r"rate\(havip_watcher_kernel_drops_total"),
        ("outbox backlog", r"havip_outbox_pending_events\b"),
        ("API rate", r"rate\(havip_api_requests_total"),
        ("API latency", r"histogram_quantile\(.*havip_api_request_duration_seconds_bucket"),
        ("subnet utilisation", r"havip_subnet_free_addresses\b.*havip_subnet_usable_addresses\b"),
        ("recent transitions from Postgres", r"FROM binding\.transitions\b"),
    ],
)
def test_the_dashboard_has_the_panels_spec_9_lists(topic: str, pattern: str) -> None:
    assert any(re.search(pattern, q.text) for q in grafana.queries(grafana.dashboard())), topic


def test_substitution_fills_every_variable_as_grafana_would() -> None:
    expr = 'sum(rate(x{address=~"$havip"}[$__rate_interval])) by (le) / $__interval'
    assert (
        grafana.promql(expr, {"havip": ["192.0.2.10", "192.0.2.11"]}, scrape_interval_s=5, step_s=15)
        == 'sum(rate(x{address=~"(192\\\\.0\\\\.2\\\\.10|192\\\\.0\\\\.2\\\\.11)"}[20s])) by (le) / 15s'
    )
    assert grafana.rate_interval_s(scrape_interval_s=1, step_s=1) == 4
    with pytest.raises(KeyError, match=r"\$subnet"):
        grafana.promql('x{subnet_id=~"$subnet"}', {}, scrape_interval_s=5, step_s=15)


def test_sql_macros_expand_to_the_time_range() -> None:
    start, end = datetime(2026, 11, 30, 8, 0, 0, 500, tzinfo=UTC), datetime(2026, 11, 30, 9, 0, tzinfo=UTC)
    assert (
        grafana.sql("SELECT 1 FROM t WHERE $__timeFilter(t.at)", start, end)
        == "SELECT 1 FROM t WHERE t.at BETWEEN '2026-11-30T08:00:00Z' AND '2026-11-30T09:00:00Z'"
    )
    with pytest.raises(KeyError):
        grafana.sql("SELECT $__timeGroup(at, '1m')", start, end)
