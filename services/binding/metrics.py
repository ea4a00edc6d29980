"""Prometheus metrics of the binding service."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

TRANSITIONS = Counter("havip_transitions_total", "Ownership transitions committed", ["reason"])
BINDING_LATENCY = Histogram(
    "havip_binding_latency_seconds",
    "Kernel capture of the claim to the committed transition",
    buckets=(0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
CLAIMS = Counter(
    "havip_claims_total",
    "Claims consumed, by outcome",
    ["outcome"],  # transition, refresh, stale, rejected, not_havip
)
CLAIMS_REJECTED = Counter("havip_claims_rejected_total", "Refused claims", ["reason"])
OWNER = Gauge(
    "havip_owner_info",
    "Current holder of each HAVIP (value 1)",
    ["havip_id", "address", "instance_id"],
)
BATCH_SIZE = Histogram(
    "havip_binding_batch_messages",
    "Messages handled per transaction",
    buckets=(1, 2, 5, 10, 50, 100, 250, 500, 1000, 2000),
)

for _reason in ("unknown_mac", "other_subnet", "not_candidate", "eth_mismatch"):
    CLAIMS_REJECTED.labels(_reason)
for _outcome in ("transition", "refresh", "stale", "rejected", "not_havip"):
    CLAIMS.labels(_outcome)
for _reason in ("claim", "release"):
    TRANSITIONS.labels(_reason)
