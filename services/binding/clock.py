"""The binding service's one clock, injected by the composition root (tests pass a fake one)."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def wall_ns(self) -> int:
        """Now on the wall clock, ns since the epoch: what claims' capture times are compared with."""

    def monotonic_s(self) -> float:
        """Now on a clock that never steps back, in seconds: what the audit's pace is measured with."""


class SystemClock:
    def wall_ns(self) -> int:
        return time.time_ns()

    def monotonic_s(self) -> float:
        return time.monotonic()
