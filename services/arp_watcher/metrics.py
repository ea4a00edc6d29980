"""Prometheus metrics of the watcher.

The per-frame counters are plain integers kept by the capture thread (a prometheus-client `inc()` per frame
would cost more than parsing the frame); a collector reads them at scrape time. Publishing-side metrics are
ordinary prometheus-client objects. Every label takes a small fixed set of values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Final

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shared.hops import WATCHER_HOPS, claim_hops, seconds_between

if TYPE_CHECKING:
    from .capture import CaptureStats
    from .claims import Claim

FRAME_RESULTS: Final = ("claim", "not_claim", "not_arp", "malformed")

# Capture → confirmed by RabbitMQ: sub-millisecond when idle; seconds only while the broker is unreachable.
LATENCY_BUCKETS: Final = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


class _CaptureCollector(Collector):
    def __init__(
        self,
        stats: CaptureStats,
        buffered: Callable[[], int],
        dropped: Callable[[], int],
        coalesced: Callable[[], int],
    ) -> None:
        self._stats = stats
        self._buffered = buffered
        self._dropped = dropped
        self._coalesced = coalesced

    def collect(self) -> Iterable[Metric]:
        s = self._stats
        frames = CounterMetricFamily(
            "havip_watcher_frames",
            "Frames that passed the kernel ARP filter, by result of parsing and the claim rule",
            labels=["result"],
        )
        frames.add_metric(["claim"], s.claims)
        frames.add_metric(["not_claim"], s.not_claims)
        frames.add_metric(["not_arp"], s.not_arp)
        frames.add_metric(["malformed"], sum(s.malformed.values()))
        yield frames
        malformed = CounterMetricFamily(
            "havip_watcher_malformed_frames", "Malformed frames by reason", labels=["reason"]
        )
        for reason, count in s.malformed.items():
            malformed.add_metric([reason], count)
        yield malformed
        yield CounterMetricFamily(
            "havip_watcher_kernel_packets",
            "Frames the kernel accepted for the capture socket (PACKET_STATISTICS tp_packets, drops included)",
            value=s.kernel_packets,
        )
        yield CounterMetricFamily(
            "havip_watcher_kernel_drops",
            "Frames the kernel dropped because the capture socket's receive buffer was full",
            value=s.kernel_drops,
        )
        yield CounterMetricFamily(
            "havip_watcher_receive_errors",
            "Errors reported by the capture socket (e.g. link down)",
            value=s.receive_errors,
        )
        yield CounterMetricFamily(
            "havip_watcher_claims_coalesced",
            "Claims identical to the last published one of their address within the window: counted, not sent",
            value=self._coalesced(),
        )
        yield CounterMetricFamily(
            "havip_watcher_claims_dropped",
            "Claims dropped in user space: more distinct claimants buffered than the buffer holds (oldest first)",
            value=self._dropped(),
        )
        yield GaugeMetricFamily(
            "havip_watcher_claims_buffered",
            "Claims captured and not yet handed to RabbitMQ",
            value=self._buffered(),
        )


class WatcherMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        self.claims_published = Counter(
            "havip_watcher_claims_published",
            "Claims published in arp.claims.observed events confirmed by RabbitMQ",
            registry=registry,
        )
        self.events_published = Counter(
            "havip_watcher_events_published",
            "arp.claims.observed events (batches of claims) confirmed by RabbitMQ",
            registry=registry,
        )
        self.publish_failures = Counter(
            "havip_watcher_publish_failures",
            "Publish attempts (one batch of claims each) that failed and were retried",
            registry=registry,
        )
        self.publish_latency = Histogram(
            "havip_watcher_publish_latency_seconds",
            "Kernel receive time of a claim to its publish confirmed by RabbitMQ",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.partitions = Gauge(
            "havip_watcher_partitions",
            "P, the partition count claims are routed by (HAVIP_PARTITIONS): the binding replicas' must be equal",
            registry=registry,
        )
        hops = claim_hops(WATCHER_HOPS, registry)
        self._read, self._sent, self._confirmed = (hops.labels(hop) for hop in WATCHER_HOPS)
        self._collector: _CaptureCollector | None = None

    def observe_hops(self, claim: Claim, sent_ns: int, confirmed_ns: int) -> None:
        """The watcher's hops of one published claim (shared/hops.py): kernel receive → handed over by the capture
        thread → its event handed to the broker client (`sent`, the envelope's occurred_at) → confirmed."""
        self._read.observe(seconds_between(claim.captured_at, claim.read_at))
        self._sent.observe(seconds_between(claim.read_at, sent_ns))
        self._confirmed.observe(seconds_between(sent_ns, confirmed_ns))

    def watch_capture(
        self,
        stats: CaptureStats,
        buffered: Callable[[], int],
        dropped: Callable[[], int],
        coalesced: Callable[[], int] = lambda: 0,
    ) -> None:
        """Export the capture thread's counters, the coalescer's and the buffer's state."""
        if self._collector is not None:
            self.registry.unregister(self._collector)
        self._collector = _CaptureCollector(stats, buffered, dropped, coalesced)
        self.registry.register(self._collector)
