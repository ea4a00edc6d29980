"""Prometheus metrics of the binding service."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.binding.domain import Binding
from services.binding.watchers import HeardWatcher
from shared.hops import BINDING_HOPS, claim_hops

TRANSITIONS = Counter("havip_transitions_total", "Ownership transitions committed", ["reason"])
BINDING_LATENCY = Histogram(
    "havip_binding_latency_seconds",
    "Kernel capture of the claim to the committed transition",
    buckets=(0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
CLAIMS = Counter(
    "havip_claims_total",
    "Claims consumed, by outcome",
    ["outcome"],  # transition, refresh, stale, rejected, not_havip, duplicate
)
CLAIMS_REJECTED = Counter("havip_claims_rejected_total", "Refused claims", ["reason"])
WATCHER_MESSAGES_REFUSED = Counter(
    "havip_watcher_messages_refused_total",
    "Claims and heartbeat events of a segment published by a broker user not entitled to it "
    "(HAVIP_WATCHER_USER_TEMPLATE), dropped",
    ["segment"],
)
REFUSALS_WAITING = Gauge(
    "havip_refusals_waiting", "Refusal audit rows waiting for the audit pacer's budget (a flood is being paced)"
)
REFUSALS_UNAUDITED = Counter(
    "havip_refused_frames_unaudited_total",
    "Refused frames neither audited nor published because too many refusals were waiting (still in claims_total)",
)
CONSUMING = Gauge(
    "havip_binding_consuming",
    "1 while this replica decides at least one partition; 0 while it holds none",
)
PARTITIONS_OWNED = Gauge(
    "havip_binding_partitions_owned", "Partitions this replica decides (holds the advisory lock of)"
)
PARTITIONS = Gauge(
    "havip_binding_partitions", "P, the partition count this replica is configured with (HAVIP_PARTITIONS)"
)
REPLICAS = Gauge(
    "havip_binding_replicas", "Binding replicas Postgres counts alive (sessions holding the membership lock)"
)
PARTITION_COUNTS = Gauge(
    "havip_binding_partition_counts",
    "Distinct partition counts (P) among the binding replicas alive: more than 1 is a misconfiguration",
)
CONDITION_EDGES = Counter(
    "havip_condition_edges_total",
    "Flapping and split-brain conditions started and stopped",
    ["condition", "edge"],  # flapping | split_brain, started | stopped
)
WRITE_CONFLICTS = Counter(
    "havip_binding_write_conflicts",
    "HAVIPs whose decided write did not apply because another process had committed for them meanwhile "
    "(the batch was decided again from the committed state)",
)
CLAIM_HOPS = claim_hops(BINDING_HOPS)  # services/binding/hops.py
BATCH_SIZE = Histogram(
    "havip_binding_batch_messages",
    "Messages handled per transaction",
    buckets=(1, 2, 5, 10, 50, 100, 250, 500, 1000, 2000),
)

for _reason in ("unknown_mac", "other_subnet", "not_candidate", "eth_mismatch", "clock_skew"):
    CLAIMS_REJECTED.labels(_reason)
for _outcome in ("transition", "refresh", "stale", "rejected", "not_havip", "duplicate"):
    CLAIMS.labels(_outcome)
for _reason in ("claim", "release"):
    TRANSITIONS.labels(_reason)
for _condition in ("flapping", "split_brain"):
    for _edge in ("started", "stopped"):
        CONDITION_EDGES.labels(_condition, _edge)


class BookCollector(Collector):
    """What the binding book holds, read at scrape time — nothing to update per transition (a labelled gauge
    cost ~0.1 ms per transition at 10,000 HAVIPs moving at once):

    * `havip_owner_info{havip_id, address, instance_id} 1` for every bound HAVIP;
    * `havip_flapping` and `havip_split_brain`: how many HAVIPs are in that condition now.
    """

    def __init__(self, bindings: Callable[[], Iterable[Binding]]) -> None:
        self._bindings = bindings

    def collect(self) -> Iterable[Metric]:
        owner = GaugeMetricFamily(
            "havip_owner_info",
            "Current holder of each HAVIP (value 1)",
            labels=["havip_id", "address", "instance_id"],
        )
        flapping = split_brain = 0
        for b in list(self._bindings()):
            if b.instance_id is not None:
                owner.add_metric([str(b.havip_id), str(b.address), str(b.instance_id)], 1)
            flapping += b.flapping
            split_brain += b.split_brain
        yield owner
        yield GaugeMetricFamily("havip_flapping", "HAVIPs flapping now", value=flapping)
        yield GaugeMetricFamily("havip_split_brain", "HAVIPs in split brain now", value=split_brain)


_book_collector: BookCollector | None = None


def export_book(bindings: Callable[[], Iterable[Binding]]) -> None:
    """Serve the book's gauges from `bindings` (replacing an earlier source: one per process)."""
    global _book_collector
    if _book_collector is not None:
        REGISTRY.unregister(_book_collector)
    _book_collector = BookCollector(bindings)
    REGISTRY.register(_book_collector)


# What the book of watchers (services/binding/watchers.py) says now: alive per segment, and every watcher heard.
WatchersNow = tuple[Mapping[str, int], Iterable[HeardWatcher]]


class WatchersCollector(Collector):
    """The watchers' heartbeats, read at scrape time:

    * `havip_watchers_alive{segment}`: watchers of the segment heard within 3 of their intervals (every segment
      a watcher ever spoke for since this process started deciding; 0 when all went silent);
    * `havip_watcher_last_heartbeat_timestamp_seconds{segment, watcher}`: when each was heard last.
    """

    def __init__(self, now: Callable[[], WatchersNow]) -> None:
        self._now = now

    def collect(self) -> Iterable[Metric]:
        alive_by_segment, watchers = self._now()
        alive = GaugeMetricFamily(
            "havip_watchers_alive",
            "ARP watchers of the segment heard within 3 heartbeat intervals",
            labels=["segment"],
        )
        for segment, count in sorted(alive_by_segment.items()):
            alive.add_metric([segment], count)
        yield alive
        last = GaugeMetricFamily(
            "havip_watcher_last_heartbeat_timestamp_seconds",
            "When the binding service last heard the watcher's heartbeat (Unix time)",
            labels=["segment", "watcher"],
        )
        for watcher in watchers:
            last.add_metric([watcher.segment, watcher.watcher_id], watcher.heard_at_wall_s)
        yield last


_watchers_collector: WatchersCollector | None = None


def export_watchers(now: Callable[[], WatchersNow]) -> None:
    """Serve the watchers' gauges from `now` (replacing an earlier source: one per process)."""
    global _watchers_collector
    if _watchers_collector is not None:
        REGISTRY.unregister(_watchers_collector)
    _watchers_collector = WatchersCollector(now)
    REGISTRY.register(_watchers_collector)
