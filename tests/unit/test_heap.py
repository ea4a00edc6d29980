"""shared.heap: what is alive at start-up leaves the cyclic collector's reach; garbage made later still goes."""

from __future__ import annotations

import gc
import weakref

from shared.heap import freeze_startup_heap


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def test_startup_objects_are_frozen_and_later_cycles_are_still_collected() -> None:
    try:
        alive_at_start = [_Node() for _ in range(100)]
        frozen = freeze_startup_heap()
        assert frozen == gc.get_freeze_count() >= len(alive_at_start)
        tracked = {id(o) for o in gc.get_objects()}
        assert not any(id(node) in tracked for node in alive_at_start)  # a full collection no longer walks them

        a, b = _Node(), _Node()
        a.other, b.other = b, a  # a cycle made after start-up: only the collector can free it
        gone = weakref.ref(a)
        del a, b
        gc.collect()
        assert gone() is None
    finally:
        gc.unfreeze()
