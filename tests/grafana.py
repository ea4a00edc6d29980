"""The checked-in Grafana dashboard as the tests see it: its queries, and those queries with Grafana's template
variables and macros replaced the way Grafana would before sending them to Prometheus or PostgreSQL."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
GRAFANA_DIR = ROOT / "deploy" / "grafana"
DASHBOARD_FILE = GRAFANA_DIR / "dashboards" / "havip.json"
DATASOURCES_FILE = GRAFANA_DIR / "provisioning" / "datasources" / "havip.yml"
PROVIDERS_FILE = GRAFANA_DIR / "provisioning" / "dashboards" / "havip.yml"

_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
# Characters Grafana escapes in a variable's value inside a Prometheus regex (prometheusSpecialRegexEscape):
# each gets two backslashes, one for the PromQL string literal and one for the regular expression.
_REGEX_SPECIALS = re.compile(r"[$^*{}\[\]'+?.()|\\]")
_TIME_FILTER = re.compile(r"\$__timeFilter\(([^()]+)\)")


@dataclass(frozen=True)
class PanelQuery:
    panel: str
    ref_id: str
    datasource_type: str
    datasource_uid: str
    text: str  # PromQL expression or raw SQL
    instant: bool

    @property
    def name(self) -> str:
        return f"{self.panel} [{self.ref_id}]"


def dashboard() -> dict[str, Any]:
    board: dict[str, Any] = json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))
    return board


def panels(board: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows included; rows themselves are not panels with queries."""
    for panel in board.get("panels", []):
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def queries(board: Mapping[str, Any]) -> list[PanelQuery]:
    found = []
    for panel in panels(board):
        for target in panel.get("targets", []):
            source = target.get("datasource") or panel["datasource"]
            text = target["expr"] if source["type"] == "prometheus" else target["rawSql"]
            found.append(
                PanelQuery(
                    panel=panel["title"],
                    ref_id=target["refId"],
                    datasource_type=source["type"],
                    datasource_uid=source["uid"],
                    text=text,
                    instant=bool(target.get("instant")) and not target.get("range"),
                )
            )
    return found


def prometheus_queries(board: Mapping[str, Any]) -> list[PanelQuery]:
    return [q for q in queries(board) if q.datasource_type == "prometheus"]


def sql_queries(board: Mapping[str, Any]) -> list[PanelQuery]:
    return [q for q in queries(board) if q.datasource_type != "prometheus"]


def rate_interval_s(scrape_interval_s: float, step_s: float) -> float:
    """Grafana's $__rate_interval: max($__interval + scrape interval, 4 × scrape interval)."""
    return max(step_s + scrape_interval_s, 4 * scrape_interval_s)


def regex_value(values: Sequence[str]) -> str:
    """A variable's selected values as Grafana writes them into a Prometheus regex matcher."""
    escaped = [_REGEX_SPECIALS.sub(lambda m: "\\\\" + m.group(0), value) for value in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def promql(expr: str, variables: Mapping[str, Sequence[str]], *, scrape_interval_s: float, step_s: float) -> str:
    """The expression Grafana sends to Prometheus for a range query with step `step_s`; `variables` are the
    dashboard variables' selected values. Any variable left unknown is an error, not a silent `$name`."""
    builtin = {
        "__interval": f"{step_s:g}s",
        "__rate_interval": f"{rate_interval_s(scrape_interval_s, step_s):g}s",
    }

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name in builtin:
            return builtin[name]
        if name in variables:
            return regex_value(variables[name])
        raise KeyError(f"no value for the template variable ${name} in {expr!r}")

    return _VARIABLE.sub(replace, expr)


def sql(raw_sql: str, start: datetime, end: datetime) -> str:
    """The SQL Grafana's PostgreSQL data source runs for the time range [start, end] (its macros expanded)."""

    def rfc3339(moment: datetime) -> str:  # as Grafana writes it: UTC, whole seconds
        return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    expanded = _TIME_FILTER.sub(lambda m: f"{m.group(1)} BETWEEN '{rfc3339(start)}' AND '{rfc3339(end)}'", raw_sql)
    expanded = expanded.replace("$__timeFrom()", f"'{rfc3339(start)}'").replace("$__timeTo()", f"'{rfc3339(end)}'")
    if "$" in expanded:
        raise KeyError(f"a macro or variable this test does not expand: {expanded!r}")
    return expanded


def label_values_query(query: str) -> tuple[str, str]:
    """(metric, label) of a Prometheus variable query `label_values(metric, label)`."""
    match = re.fullmatch(r"label_values\(\s*([a-zA-Z_:][\w:]*)\s*,\s*(\w+)\s*\)", query)
    if match is None:
        raise ValueError(f"not a label_values(metric, label) query: {query!r}")
    return match.group(1), match.group(2)
