"""The allocator's Prometheus metrics and the ASGI middleware that records every request.

Labels stay bounded: `route` is the matched path template (or "unmatched"), `method` one of the standard
verbs (or "OTHER"), `status` the numeric status, `subnet_id` one of the subnets (created by operators, few).

The subnet gauges are read from the database at scrape time (`/metrics` runs one grouped query before the
exposition), so they are exact whichever replica served the change, and a deleted subnet's series goes away.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

ALLOCATIONS = Counter("havip_allocations_total", "HAVIPs allocated")
API_REQUESTS = Counter(
    "havip_api_requests_total", "HTTP requests answered by the allocator API", ["route", "method", "status"]
)
API_DURATION = Histogram(
    "havip_api_request_duration_seconds",
    "Time to answer an allocator API request",
    ["route", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)

SUBNET_FREE = Gauge(
    "havip_subnet_free_addresses",
    "Usable addresses of the subnet not taken by an instance or a HAVIP (read at scrape time)",
    ["subnet_id"],
)
SUBNET_USABLE = Gauge(
    "havip_subnet_usable_addresses",
    "Addresses of the subnet that can be handed out at all: block size minus 3 reserved",
    ["subnet_id"],
)


def record_subnet_usage(usage: Iterable[tuple[uuid.UUID, int, int]]) -> None:
    """Replace the subnet gauges with (subnet_id, usable, free) of every subnet; no await in between, so a
    concurrent scrape never sees half of it."""
    SUBNET_FREE.clear()
    SUBNET_USABLE.clear()
    for subnet_id, usable, free in usage:
        SUBNET_USABLE.labels(str(subnet_id)).set(usable)
        SUBNET_FREE.labels(str(subnet_id)).set(free)


def forget_subnet_usage() -> None:
    """The database could not be read: better no series than stale ones."""
    SUBNET_FREE.clear()
    SUBNET_USABLE.clear()


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class MetricsMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_record_status)
        finally:
            # The router stores the matched route in the scope; its path is the template.
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope.get("method", "")
            method = method if method in _METHODS else "OTHER"
            API_REQUESTS.labels(route, method, str(status)).inc()
            API_DURATION.labels(route, method).observe(time.perf_counter() - started)


# ---- the read model of the binding service's state (binding_view/) ------------------------------------------

VIEW_DELAY = Histogram(
    "havip_view_delay_seconds",
    "Freshness of the allocator's view of bindings: time from the binding service's commit of a change (the "
    "time it stamps on the event) to the allocator's commit of it, from when on the API shows it",
    ["event"],  # transition, refusal, condition
    buckets=(
        0.001,
        0.002,
        0.003,
        0.005,
        0.0075,
        0.01,
        0.015,
        0.02,
        0.03,
        0.05,
        0.1,
        0.25,
        0.5,
        1.0,
        2.5,
        5.0,
        10.0,
    ),
)
VIEW_EVENTS = Counter(
    "havip_view_events_total",
    "Binding events taken into the allocator's view, by outcome: applied; gap (applied, with transitions "
    "found missing before it); filled (a missing transition arrived); duplicate; stale (an older condition edge)",
    ["event", "outcome"],
)
VIEW_GAPS = Counter(
    "havip_view_sequence_gaps_total", "Sequence gaps found in a HAVIP's transitions (each repaired by a replay)"
)
VIEW_OPEN_GAPS = Gauge(
    "havip_view_open_gaps",
    "HAVIPs whose history in the allocator's view has a gap now (updated every few seconds)",
)
VIEW_REPLAYS_REQUESTED = Counter(
    "havip_view_replays_requested_total", "Ranges of missing transitions the allocator asked to be published again"
)
