"""The hops of one claim's path, as histograms each service exports for its own share.

One histogram family, `havip_claim_hop_seconds{hop}`, in the watcher and in the binding service (Prometheus tells
them apart by their job). The label names the point where the hop ends; each hop starts where the one before it
ended, except the two confirms, which run beside the path (docs/ARCHITECTURE.md section 5):

    hop              from                                  to
    read             kernel receive (the claim's captured_at)  the capture thread hands the claim over
    sent             read                                  the watcher hands the event to its broker client
    confirmed        sent                                  RabbitMQ's confirm reaches the watcher (beside)
    received         sent                                  the binding's consumer has the message
    decided          received                              the message's claims are decided
    stamped          decided                               committed_at (the transaction's last statement)
    committed        stamped                               COMMIT returned
    relayed          committed                             the outbox relay hands the event to its client
    relay_confirmed  relayed                               RabbitMQ's confirm reaches the relay (beside)

A hop that starts in one process and ends in another (`received`: the watcher's send → the binding's consumer;
`stamped`, `committed`: the binding's clock and the database's) compares two machines' clocks in a deployment:
it is as exact as their synchronisation, and a negative difference counts as 0.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Final

from prometheus_client import REGISTRY, CollectorRegistry, Histogram

WATCHER_HOPS: Final = ("read", "sent", "confirmed")
BINDING_HOPS: Final = ("received", "decided", "stamped", "committed", "relayed", "relay_confirmed")
# Beside the path, not on it: RabbitMQ confirms a persistent message once it is on disk (or consumed), which may
# come after the consumer already has it.
SIDE_HOPS: Final = ("confirmed", "relay_confirmed")

# Fine below a millisecond (the hops of an idle path are 20 µs – 2 ms), coarse up to the seconds of an outage.
HOP_BUCKETS: Final = (
    0.00005,
    0.0001,
    0.0002,
    0.0003,
    0.0005,
    0.00075,
    0.001,
    0.0015,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    10.0,
)

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND: Final = timedelta(microseconds=1)


def claim_hops(hops: tuple[str, ...], registry: CollectorRegistry = REGISTRY) -> Histogram:
    """The process's `havip_claim_hop_seconds`, every hop it measures exported from the start (at zero)."""
    histogram = Histogram(
        "havip_claim_hop_seconds",
        "One hop of a claim's path from the wire to the published transition, by the point where it ends "
        "(docs/ARCHITECTURE.md section 5)",
        ["hop"],
        buckets=HOP_BUCKETS,
        registry=registry,
    )
    for hop in hops:
        histogram.labels(hop)
    return histogram


def seconds_between(start_ns: int, end_ns: int) -> float:
    """A hop's length from two wall-clock times (ns since the epoch); a clock behind another counts as 0."""
    return max(0, end_ns - start_ns) / 1e9


def datetime_ns(at: datetime) -> int:
    """A timezone-aware datetime as ns since the epoch, exactly (its microseconds, no float rounding)."""
    return (at - _EPOCH) // _MICROSECOND * 1000
