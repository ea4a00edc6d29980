"""The claims a capture thread hands over, kept in arrival order for a test to take as they come."""

from __future__ import annotations

import queue
from collections.abc import Callable

from services.arp_watcher.claims import Claim
from tests.waiting import eventually_sync


class CollectedClaims:
    """`sink` is the capture thread's hand-over; `take` and `take_until` wait, with a deadline, for what follows
    the claims taken before."""

    def __init__(self) -> None:
        self.queue: queue.Queue[Claim] = queue.Queue()
        self.calls = 0

    def sink(self, batch: list[Claim]) -> None:
        self.calls += 1
        for claim in batch:
            self.queue.put(claim)

    def take(self, count: int, timeout_s: float = 30.0) -> list[Claim]:
        """The next `count` claims."""
        return self._take(lambda claims: len(claims) >= count, timeout_s, what=f"{count} claims")

    def take_until(self, done: Callable[[Claim], bool], timeout_s: float = 30.0) -> list[Claim]:
        """The next claims up to and including the first for which `done` is true."""
        return self._take(lambda claims: bool(claims) and done(claims[-1]), timeout_s, what="the marker claim")

    def _take(self, enough: Callable[[list[Claim]], bool], timeout_s: float, what: str) -> list[Claim]:
        claims: list[Claim] = []

        def arrived() -> bool:
            while not enough(claims):
                try:
                    claims.append(self.queue.get_nowait())
                except queue.Empty:
                    return False
            return True

        try:
            eventually_sync(arrived, timeout=timeout_s, what=what)
        except TimeoutError as late:
            late.add_note(f"{len(claims)} claim(s) arrived: {claims[-3:]}")
            raise
        return claims
