"""Pacing of the refusal audit (pure: time is passed in).

The refusal audit folds the repeats of one refusal (address, MAC, reason) into one audit row and one event per
window, so that a flood cannot grow the database or delay failovers (docs/contract.md#refusals-are-folded). Folding
per key is not enough when a spoofer claims many addresses at once: every key's window ends at the same moment, and
a thousand audit rows, outbox rows, events and the allocator's copies of them land together, in front of whatever
takeover arrives then (docs/benchmarks.md, the flood). The pacer spreads new audit rows over time: at most `rate` a
second, in bites of at most `burst`. A refusal over budget waits, its frames still folded into its row, and is
written later — the first refusal of a key before any repeat.
"""

from __future__ import annotations

from typing import Final

DEFAULT_REFUSAL_AUDIT_RATE: Final = 20.0  # new audit rows a second (HAVIP_REFUSAL_AUDIT_RATE)


class AuditPacer:
    """A token bucket: `rate` tokens a second, holding at most `burst`."""

    __slots__ = ("_at", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: int | None = None, *, now_s: float = 0.0) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = burst if burst is not None else max(1, int(rate // 10))
        if self.burst < 1:
            raise ValueError("burst must be at least 1")
        self._tokens = float(self.burst)
        self._at = now_s

    def take(self, wanted: int, now_s: float) -> int:
        """How many of `wanted` rows may be written now (0 … wanted); those are spent."""
        if now_s > self._at:
            self._tokens = min(float(self.burst), self._tokens + (now_s - self._at) * self.rate)
            self._at = now_s
        granted = min(wanted, int(self._tokens))
        self._tokens -= granted
        return max(0, granted)
