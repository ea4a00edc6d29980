"""The HAVIP dashboard (docs/contract.md#deployment-and-observability), built with grafana-foundation-sdk. Every
panel reads a metric the services export (services/*/metrics.py, shared/outbox.py) or the binding service's tables;
the data source uids are those of provisioning/datasources/havip.yml.

    python -m deploy.grafana            # (re)write dashboards/havip.json
    python -m deploy.grafana --check    # exit 1 when dashboards/havip.json differs from this code
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from grafana_foundation_sdk.builders.bargauge import Panel as BarGauge
from grafana_foundation_sdk.builders.common import (
    GraphThresholdsStyleConfig,
    ReduceDataOptions,
    StackingConfig,
    VizLegendOptions,
)
from grafana_foundation_sdk.builders.dashboard import Dashboard, QueryVariable, Row, ThresholdsConfig
from grafana_foundation_sdk.builders.prometheus import Dataquery as PrometheusQuery
from grafana_foundation_sdk.builders.stat import Panel as Stat
from grafana_foundation_sdk.builders.table import Panel as Table
from grafana_foundation_sdk.builders.timeseries import Panel as TimeSeries
from grafana_foundation_sdk.cog.builder import Builder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.cog.variants import Dataquery
from grafana_foundation_sdk.models.common import (
    BarGaugeDisplayMode,
    BigValueColorMode,
    BigValueGraphMode,
    GraphDrawStyle,
    GraphThresholdsStyleMode,
    LegendDisplayMode,
    LegendPlacement,
    StackingMode,
    VizOrientation,
)
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    DataTransformerConfig,
    Threshold,
    ThresholdsMode,
    VariableOption,
    VariableRefresh,
    VariableSort,
)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat, QueryEditorMode

from deploy.grafana.sql import POSTGRES_TYPE, SqlQuery

HERE = Path(__file__).resolve().parent
DASHBOARD_FILE = HERE / "dashboards" / "havip.json"
DASHBOARD_UID = "havip-overview"
PROMETHEUS_UID = "havip-prometheus"
POSTGRES_UID = "havip-postgres"
PROMETHEUS = DataSourceRef(type_val="prometheus", uid=PROMETHEUS_UID)
POSTGRES = DataSourceRef(type_val=POSTGRES_TYPE, uid=POSTGRES_UID)

RATE = "$__rate_interval"  # Grafana's window for rate(): at least four scrape intervals
HAVIP_FILTER = 'address=~"$havip"'
SUBNET_FILTER = 'subnet_id=~"$subnet"'
LATENCY_GOAL_S = 0.01  # goal P1 (docs/contract.md#figures): capture → commit p99 ≤ 10 ms

RECENT_TRANSITIONS_SQL = """\
SELECT
  t.committed_at AS "time",
  host(h.address) AS address,
  t.havip_id,
  t.sequence,
  t.reason,
  t.from_instance_id,
  t.to_instance_id,
  t.mac::text AS mac,
  round((extract(epoch FROM t.committed_at - t.captured_at) * 1000)::numeric, 3) AS capture_to_commit_ms,
  t.watcher_id
FROM binding.transitions AS t
LEFT JOIN binding.havips AS h ON h.id = t.havip_id  -- released HAVIPs keep their history, not their row
WHERE $__timeFilter(t.committed_at)
ORDER BY t.committed_at DESC
LIMIT 200"""

RECENT_REFUSALS_SQL = """\
SELECT
  r.recorded_at AS "time",
  host(r.address) AS address,
  r.mac::text AS mac,
  r.reason,
  r.count AS frames,
  r.havip_id,
  r.watcher_id
FROM binding.rejected_claims AS r
WHERE $__timeFilter(r.recorded_at)
ORDER BY r.recorded_at DESC
LIMIT 200"""


def promql(expr: str, legend: str = "__auto") -> PrometheusQuery:
    return (
        PrometheusQuery()
        .expr(expr)
        .legend_format(legend)
        .editor_mode(QueryEditorMode.CODE)
        .range()
        .datasource(PROMETHEUS)
    )


def sql(raw_sql: str) -> SqlQuery:
    return SqlQuery(raw_sql).format("table").datasource(POSTGRES)


def rate_by(labels: str, counter: str) -> str:
    """Per-second rate of a counter summed by `labels` ("" = one series)."""
    rate = f"rate({counter}[{RATE}])"
    return f"sum by ({labels}) ({rate})" if labels else f"sum({rate})"


def quantile(q: float, histogram: str, by: str = "") -> str:
    labels = f"{by}, le" if by else "le"
    return f"histogram_quantile({q}, sum by ({labels}) (rate({histogram}_bucket[{RATE}])))"


def targets(*queries: PrometheusQuery | SqlQuery) -> list[Builder[Dataquery]]:
    """The queries with the reference ids Grafana would give them (A, B, C…)."""
    return [query.ref_id(chr(ord("A") + i)) for i, query in enumerate(queries)]


def thresholds(*steps: tuple[float | None, str]) -> ThresholdsConfig:
    steps_list = [Threshold(value, color) for value, color in steps]
    return ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps(steps_list)


def legend_table(*calcs: str) -> VizLegendOptions:
    return (
        VizLegendOptions()
        .display_mode(LegendDisplayMode.TABLE)
        .placement(LegendPlacement.BOTTOM)
        .show_legend(True)
        .calcs(list(calcs))
    )


def organize(exclude: Sequence[str], order: Sequence[str], rename: dict[str, str]) -> DataTransformerConfig:
    """Grafana's "organize fields" transformation: hide, order and rename a table's columns."""
    return DataTransformerConfig(
        id_val="organize",
        options={
            "excludeByName": dict.fromkeys(exclude, True),
            "indexByName": {name: i for i, name in enumerate(order)},
            "renameByName": rename,
        },
    )


def time_series(title: str, description: str, unit: str, *queries: PrometheusQuery) -> TimeSeries:
    return (
        TimeSeries()
        .title(title)
        .description(description)
        .datasource(PROMETHEUS)
        .targets(targets(*queries))
        .unit(unit)
        .min(0)
        .fill_opacity(10)
        .height(8)
        .span(12)
    )


def stat(title: str, description: str, expr: str, *steps: tuple[float | None, str]) -> Stat:
    return (
        Stat()
        .title(title)
        .description(description)
        .datasource(PROMETHEUS)
        .targets(targets(promql(expr)))
        .graph_mode(BigValueGraphMode.AREA)
        .color_mode(BigValueColorMode.BACKGROUND)
        .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]))
        .thresholds(thresholds(*steps))
        .height(4)
        .span(8)
    )


# ---- rows -------------------------------------------------------------------------------------------------


def ownership(board: Dashboard) -> None:
    board.with_row(Row("Ownership"))
    for title, description, expr, steps in (
        (
            "HAVIPs bound",
            "HAVIPs that have a holder now.",
            "count(havip_owner_info) or vector(0)",
            ((None, "blue"),),
        ),
        (
            "Flapping now",
            "HAVIPs changing holder more often than allowed (alert HavipFlapping).",
            "max(havip_flapping)",
            ((None, "green"), (1, "orange")),
        ),
        (
            "Split brain now",
            "HAVIPs claimed by two instances at once (alert HavipSplitBrain).",
            "max(havip_split_brain)",
            ((None, "green"), (1, "red")),
        ),
    ):
        board.with_panel(stat(title, description, expr, *steps))
    board.with_panel(
        Table()
        .title("Current holder of every HAVIP")
        .description("havip_owner_info of the binding service: one row per bound HAVIP (filter: HAVIP variable).")
        .datasource(PROMETHEUS)
        .targets(
            targets(
                promql(f"max by (address, havip_id, instance_id) (havip_owner_info{{{HAVIP_FILTER}}})")
                .instant()
                .format(PromQueryFormat.TABLE)
            )
        )
        .with_transformation(
            organize(
                exclude=["Time", "Value"],
                order=["address", "instance_id", "havip_id"],
                rename={"address": "HAVIP address", "instance_id": "holder (instance)", "havip_id": "HAVIP id"},
            )
        )
        .filterable(True)
        .height(10)
        .span(12)
    )
    board.with_panel(
        time_series(
            "Flapping and split brain",
            "How many HAVIPs are in each condition over time.",
            "short",
            promql("max(havip_flapping)", "flapping"),
            promql("max(havip_split_brain)", "split brain"),
        ).height(10)
    )


def failovers(board: Dashboard) -> None:
    board.with_row(Row("Failovers"))
    board.with_panel(
        time_series(
            "Transitions",
            "Ownership transitions committed per second, by reason (claim: a new holder; release).",
            "ops",
            promql(rate_by("reason", "havip_transitions_total"), "{{reason}}"),
        ).draw_style(GraphDrawStyle.BARS)
    )
    board.with_panel(
        time_series(
            "Wire → commit latency",
            "Kernel capture time of the GARP to the transition committed in Postgres (goal: p99 ≤ 10 ms, the "
            "red line), and the watcher's share: capture to publish confirmed by RabbitMQ.",
            "s",
            promql(quantile(0.5, "havip_binding_latency_seconds"), "p50 capture → commit"),
            promql(quantile(0.9, "havip_binding_latency_seconds"), "p90 capture → commit"),
            promql(quantile(0.99, "havip_binding_latency_seconds"), "p99 capture → commit"),
            promql(quantile(0.99, "havip_watcher_publish_latency_seconds"), "p99 capture → published"),
        )
        .thresholds(thresholds((None, "green"), (LATENCY_GOAL_S, "red")))
        .thresholds_style(GraphThresholdsStyleConfig().mode(GraphThresholdsStyleMode.LINE))
        .legend(legend_table("mean", "max", "lastNotNull"))
    )
    board.with_panel(
        time_series(
            "Claim path, hop by hop",
            "Where a takeover's time goes (docs/ARCHITECTURE.md section 5), p50 and p99 of each hop, by the point "
            "where it ends: read (kernel → the watcher's capture thread), sent (→ the watcher's event sent), "
            "confirmed (→ RabbitMQ's confirm to the watcher, beside the path), received (→ the binding's "
            "consumer), decided, stamped (→ committed_at, the transaction's last statement), committed (→ COMMIT "
            "returned), relayed (→ the outbox relay sent the event), relay_confirmed (→ its confirm, beside). "
            "Timed per takeover message; renewals are not on this path.",
            "s",
            promql(quantile(0.5, "havip_claim_hop_seconds", by="hop"), "p50 {{hop}}"),
            promql(quantile(0.99, "havip_claim_hop_seconds", by="hop"), "p99 {{hop}}"),
        )
        .span(24)
        .legend(legend_table("mean", "max", "lastNotNull"))
    )
    board.with_panel(
        time_series(
            "Refused claims by reason",
            "Claims the binding service refused: spoofing, unregistered instances, candidate lists "
            "out of date, clock skew. The history table below names address and MAC.",
            "ops",
            promql(rate_by("reason", "havip_claims_rejected_total"), "{{reason}}"),
        )
    )
    board.with_panel(
        time_series(
            "Claims by outcome",
            "Every claim the binding service consumed: transition, refresh by the holder, stale, refused, "
            "address not a HAVIP, duplicate.",
            "ops",
            promql(rate_by("outcome", "havip_claims_total"), "{{outcome}}"),
        )
    )


def binding_replicas(board: Dashboard) -> None:
    board.with_row(Row("Binding replicas"))
    board.with_panel(
        stat(
            "Binding replicas alive",
            "Binding replicas alive as Postgres counts them (sessions holding the replicas' membership lock). "
            "With one left, nothing takes its partitions over should it fail.",
            "max(havip_binding_replicas)",
            (None, "red"),
            (1, "orange"),
            (2, "green"),
        )
        .decimals(0)
        .height(8)
        .span(6)
    )
    board.with_panel(
        time_series(
            "Partitions per binding replica",
            "Partitions each binding replica decides (holds the advisory lock of), stacked: the top is "
            "HAVIP_PARTITIONS while every partition has a replica (alert HavipPartitionUndecided below it). A "
            "replica that stops hands its partitions to the others.",
            "short",
            promql("sum by (instance) (havip_binding_partitions_owned)", "{{instance}}"),
        )
        .stacking(StackingConfig().mode(StackingMode.NORMAL))
        .decimals(0)
        .span(18)
    )


def watcher(board: Dashboard) -> None:
    board.with_row(Row("ARP watcher"))
    board.with_panel(
        time_series(
            "Watcher packet rate",
            "Frames the kernel handed to the capture socket, and what the watcher made of them.",
            "pps",
            promql(rate_by("instance", "havip_watcher_kernel_packets_total"), "kernel {{instance}}"),
            promql(rate_by("result", "havip_watcher_frames_total"), "{{result}}"),
            promql(rate_by("", "havip_watcher_claims_published_total"), "claims published"),
        )
    )
    board.with_panel(
        time_series(
            "Watcher drops and errors",
            "Anything above zero may be a failover missed: kernel drops (receive buffer full), claims dropped in "
            "user space (RabbitMQ away), socket receive errors, publish attempts retried.",
            "pps",
            promql(rate_by("instance", "havip_watcher_kernel_drops_total"), "kernel drops {{instance}}"),
            promql(rate_by("instance", "havip_watcher_claims_dropped_total"), "claims dropped {{instance}}"),
            promql(rate_by("instance", "havip_watcher_receive_errors_total"), "receive errors {{instance}}"),
            promql(rate_by("instance", "havip_watcher_publish_failures_total"), "publish retries {{instance}}"),
        ).thresholds(thresholds((None, "green"), (0.001, "red")))
    )
    board.with_panel(
        time_series(
            "Watchers alive per segment",
            "ARP watchers of each segment whose heartbeat the binding service heard within 3 of their intervals. "
            "One left warns (HavipSegmentOneWatcher), none is critical (HavipSegmentNoWatcher).",
            "short",
            promql("max by (segment) (havip_watchers_alive)", "{{segment}}"),
        )
        .thresholds(thresholds((None, "red"), (1, "orange"), (2, "green")))
        .decimals(0)
        .span(24)
    )


def outbox_and_api(board: Dashboard) -> None:
    board.with_row(Row("Outbox and API"))
    board.with_panel(
        time_series(
            "Outbox backlog",
            "Events committed and not yet published to RabbitMQ, per service (alert HavipOutboxBacklog above "
            "1,000 for 5 minutes), and the rate they leave at.",
            "short",
            promql("max by (service) (havip_outbox_pending_events)", "pending {{service}}"),
            promql(rate_by("service", "havip_outbox_published_total"), "published/s {{service}}"),
        ).span(8)
    )
    board.with_panel(
        time_series(
            "API requests",
            "Requests answered by the allocator API per second, by status.",
            "reqps",
            promql(rate_by("status", "havip_api_requests_total"), "{{status}}"),
        ).span(8)
    )
    board.with_panel(
        time_series(
            "API latency",
            "Time to answer an allocator API request: p50 and p99 of all routes, p99 of the slowest routes.",
            "s",
            promql(quantile(0.5, "havip_api_request_duration_seconds"), "p50"),
            promql(quantile(0.99, "havip_api_request_duration_seconds"), "p99"),
            promql(
                f"topk(5, {quantile(0.99, 'havip_api_request_duration_seconds', by='method, route')})",
                "p99 {{method}} {{route}}",
            ),
        ).span(8)
    )


def subnets(board: Dashboard) -> None:
    board.with_row(Row("Subnets"))
    usable = f"max by (subnet_id) (havip_subnet_usable_addresses{{{SUBNET_FILTER}}})"
    free = f"max by (subnet_id) (havip_subnet_free_addresses{{{SUBNET_FILTER}}})"
    board.with_panel(
        BarGauge()
        .title("Subnet utilisation")
        .description("Share of each subnet's usable addresses taken by instances and HAVIPs (subnet variable).")
        .datasource(PROMETHEUS)
        .targets(targets(promql(f"1 - {free} / ({usable} > 0)", "{{subnet_id}}")))
        .unit("percentunit")
        .min(0)
        .max(1)
        .thresholds(thresholds((None, "green"), (0.8, "orange"), (0.95, "red")))
        .display_mode(BarGaugeDisplayMode.GRADIENT)
        .orientation(VizOrientation.HORIZONTAL)
        .height(8)
        .span(12)
    )
    board.with_panel(
        time_series(
            "Free addresses per subnet",
            "Usable addresses not taken by an instance or a HAVIP.",
            "short",
            promql(free, "{{subnet_id}}"),
        )
    )


def history(board: Dashboard) -> None:
    board.with_row(Row("History (PostgreSQL)"))
    board.with_panel(
        Table()
        .title("Recent transitions")
        .description("binding.transitions in the time range, newest first (at most 200).")
        .datasource(POSTGRES)
        .targets(targets(sql(RECENT_TRANSITIONS_SQL)))
        .filterable(True)
        .height(10)
        .span(24)
    )
    board.with_panel(
        Table()
        .title("Recent refused claims")
        .description("binding.rejected_claims in the time range, newest first (at most 200); repeats folded.")
        .datasource(POSTGRES)
        .targets(targets(sql(RECENT_REFUSALS_SQL)))
        .filterable(True)
        .height(8)
        .span(24)
    )


def variable(name: str, label: str, metric: str, label_name: str) -> QueryVariable:
    return (
        QueryVariable(name)
        .label(label)
        .datasource(PROMETHEUS)
        .query(f"label_values({metric}, {label_name})")
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
        .current(VariableOption(selected=True, text=["All"], value=["$__all"]))
    )


def build() -> Dashboard:
    board = (
        Dashboard("HAVIP control plane")
        .uid(DASHBOARD_UID)
        .description("Who holds each HAVIP, how fast failovers are recorded, what was refused.")
        .tags(["havip"])
        .refresh("10s")
        .time("now-1h", "now")
        .timezone("browser")
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .readonly()
        .with_variable(variable("havip", "HAVIP", "havip_owner_info", "address"))
        .with_variable(variable("subnet", "subnet", "havip_subnet_usable_addresses", "subnet_id"))
    )
    for row in (ownership, failovers, binding_replicas, watcher, outbox_and_api, subnets, history):
        row(board)
    return board


def render() -> str:
    """The dashboard JSON exactly as checked in: panels numbered in order, keys sorted, final newline."""
    model = build().build()
    for number, panel in enumerate(model.panels or [], start=1):
        panel.id_val = number
    return json.dumps(model, cls=JSONEncoder, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
