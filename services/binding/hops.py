"""The binding service's hops of a claim's path (shared/hops.py): observed once per claims message that moved a
holder — when its batch has committed, and `relayed` / `relay_confirmed` when the outbox relay of this process
has published the batch's events. Per message, not per claim: a mass failover of 10,000 claims costs a few dozen
observations, and a lone takeover (one claim, one message) is timed exactly."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from datetime import datetime

from services.binding import metrics
from shared.hops import datetime_ns, seconds_between
from shared.messaging import Delivery

# Batches committed and not yet seen published; bounded: another replica's relay may publish them instead.
MAX_UNPUBLISHED = 10_000


class ClaimHops:
    def __init__(self) -> None:
        hops = metrics.CLAIM_HOPS
        self._received = hops.labels("received")
        self._decided = hops.labels("decided")
        self._stamped = hops.labels("stamped")
        self._committed = hops.labels("committed")
        self._relayed = hops.labels("relayed")
        self._relay_confirmed = hops.labels("relay_confirmed")
        # (a batch's last outbox id, when its COMMIT returned, its messages that moved a holder), oldest first
        self._unpublished: deque[tuple[int, int, int]] = deque(maxlen=MAX_UNPUBLISHED)

    def committed(
        self,
        decided: Sequence[tuple[Delivery, int]],
        committed_at: datetime,
        committed_ns: int,
        last_event_id: int | None,
    ) -> None:
        """A batch committed: `decided` holds each claims message that moved a holder, with the time its claims
        were decided; `committed_at` is the batch's stamp (the database's clock), `committed_ns` when COMMIT
        returned."""
        stamped_ns = datetime_ns(committed_at)
        for delivery, decided_ns in decided:
            sent_ns = datetime_ns(delivery.envelope.occurred_at)  # the watcher's send (its envelope)
            self._received.observe(seconds_between(sent_ns, delivery.received_ns))
            self._decided.observe(seconds_between(delivery.received_ns, decided_ns))
            self._stamped.observe(seconds_between(decided_ns, stamped_ns))
            self._committed.observe(seconds_between(stamped_ns, committed_ns))
        if decided and last_event_id is not None:
            self._unpublished.append((last_event_id, committed_ns, len(decided)))

    def published(self, last_id: int, sent_ns: int, confirmed_ns: int) -> None:
        """The outbox relay published every event up to `last_id` (OutboxRelay's `on_published`)."""
        while self._unpublished and self._unpublished[0][0] <= last_id:
            _, committed_ns, messages = self._unpublished.popleft()
            for _ in range(messages):
                self._relayed.observe(seconds_between(committed_ns, sent_ns))
                self._relay_confirmed.observe(seconds_between(sent_ns, confirmed_ns))
