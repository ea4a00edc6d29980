"""The claim ids committed lately, pure: a message redelivered without a restart is recognised even where
nothing stored would tell (a refusal folded into an earlier audit row). After a restart, the audit's unique
claim_id and the capture-time order do it."""

from __future__ import annotations

import uuid
from collections import OrderedDict
from collections.abc import Iterable
from typing import Final

RECENT_CLAIMS: Final = 100_000  # claim ids remembered (~15 MB at most)


class RecentClaims:
    """A bounded memory of claim ids, oldest forgotten first."""

    def __init__(self, capacity: int = RECENT_CLAIMS) -> None:
        self._capacity = capacity
        # Integers, not UUID objects: 100,000 of those would each be walked by every full garbage collection.
        self._ids: OrderedDict[int, None] = OrderedDict()

    def __contains__(self, claim_id: uuid.UUID) -> bool:
        return claim_id.int in self._ids

    def remember(self, claim_ids: Iterable[uuid.UUID]) -> None:
        self._ids.update(dict.fromkeys(claim_id.int for claim_id in claim_ids))
        while len(self._ids) > self._capacity:
            self._ids.popitem(last=False)
