"""The cyclic garbage collector kept off the latency path.

A full (generation 2) collection walks every container object alive; in a service that holds pydantic models,
aio-pika, asyncpg and its own state that is a pause of 25–110 ms, and under a spoofing flood (objects made at
tens of thousands a second) it came every few seconds in each service — a takeover that arrived meanwhile
waited for it (docs/benchmarks.md, the flood). What is alive once a service has started lives as long as the
process; `gc.freeze` moves it out of the collector's reach, so a full collection walks only what was made
since. Reference counting still frees everything; only a reference cycle among frozen objects would
outlive its use, and start-up makes none that matter.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Collect once, then freeze what is left; returns the number of objects frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
