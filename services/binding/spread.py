"""How many partitions a binding replica should hold, and which to try or give up (pure; docs/ARCHITECTURE.md
#partitions). Postgres decides who holds what — a partition is held by the session holding its advisory lock —
and counts the replicas (the sessions holding the shared membership lock); this only turns those facts into a
replica's next step, so that after N replicas have started each holds ⌈P/N⌉ or ⌊P/N⌋ partitions."""

from __future__ import annotations

import math
from collections.abc import Set
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Step:
    release: tuple[int, ...]  # held beyond the share: handed over (consumer stopped first, then the lock)
    try_lock: tuple[int, ...]  # not held by this replica, in the order to try; stop after `wanted` succeeded
    wanted: int


def share(partitions: int, replicas: int) -> int:
    """The most partitions one replica holds while `replicas` are up."""
    return math.ceil(partitions / max(1, replicas))


def next_step(held: Set[int], partitions: int, replicas: int, start: int) -> Step:
    """What a replica holding `held` does next. `start` spreads replicas' first tries over the partitions (each
    replica its own), so that replicas starting together do not all race for partition 0."""
    target = share(partitions, replicas)
    if len(held) > target:
        # The highest first: a returning replica finds them free, and what is kept stays put.
        return Step(tuple(sorted(held, reverse=True)[: len(held) - target]), (), 0)
    order = [(start + i) % partitions for i in range(partitions)]
    return Step((), tuple(p for p in order if p not in held), target - len(held))
