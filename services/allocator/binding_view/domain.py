"""The allocator's view of each HAVIP's binding, kept from the binding service's events: pure rules, no I/O.

A record holds what the newest transition applied says (its `sequence`, the holder, when), the two condition
flags, and the sequences known to be missing from the history. The events carry the whole state after each
transition (`current` holder, times), so the newest one alone tells who holds the HAVIP; the older ones are the
history. For each transition, by its per-HAVIP `sequence`:

* not above the record's — already seen (a redelivery, a replay): dropped; or one that was missing (a late
  arrival, a replay): it fills its place in the history and changes nothing else;
* the record's + 1 — applied;
* further ahead — applied all the same (it is the newest state: the operator sees the real holder at once),
  and the sequences in between are recorded as missing: a gap, to be repaired by asking the binding service to
  publish them again (services/allocator/binding_view/service.py).

Flapping and split brain carry no sequence: an edge older (by the time the binding service stamped on it) than
the last one applied to the same flag is stale.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from shared.events import ReleaseCause

# Closed ranges of sequences: (first, last), both included.
SequenceRange = tuple[int, int]

ChangeOutcome = Literal["applied", "gap", "filled", "duplicate"]
Condition = Literal["flapping", "split_brain"]


@dataclass(frozen=True, slots=True)
class Change:
    """A transition as `havip.binding.changed` (or `.replayed`) carries it."""

    havip_id: uuid.UUID
    sequence: int
    previous_instance_id: uuid.UUID | None
    instance_id: uuid.UUID | None  # the holder after the transition; None: released
    mac: str | None
    captured_at: datetime | None
    committed_at: datetime
    watcher_id: str | None
    reason: Literal["claim", "release"]
    cause: ReleaseCause | None = None  # a release's cause (None for claims, and older events)


@dataclass(slots=True)
class ViewRecord:
    havip_id: uuid.UUID
    sequence: int = 0  # of the newest transition applied; 0: none yet
    instance_id: uuid.UUID | None = None
    mac: str | None = None
    last_transition_at: datetime | None = None
    last_seen_at: datetime | None = None
    flapping: bool = False
    flapping_changed_at: datetime | None = None
    split_brain: bool = False
    split_brain_changed_at: datetime | None = None
    missing: list[SequenceRange] = field(default_factory=list)  # sorted, disjoint, all below `sequence`
    gap_since: datetime | None = None  # when the history last went from complete to gapped

    @property
    def bound(self) -> bool:
        return self.instance_id is not None


@dataclass(frozen=True, slots=True)
class Applied:
    outcome: ChangeOutcome
    gap: SequenceRange | None = None  # the sequences found missing ("gap" only)

    @property
    def recorded(self) -> bool:
        """Whether the transition belongs in the history now (it was not there)."""
        return self.outcome != "duplicate"


def apply_change(record: ViewRecord, change: Change, now: datetime) -> Applied:
    if change.havip_id != record.havip_id:
        raise ValueError(f"a change of {change.havip_id} applied to the record of {record.havip_id}")
    if change.sequence < 1:
        raise ValueError(f"sequence {change.sequence} is not a transition's (they start at 1)")
    if change.sequence <= record.sequence:
        if _remove(record.missing, change.sequence):
            if not record.missing:
                record.gap_since = None
            return Applied("filled")
        return Applied("duplicate")
    gap: SequenceRange | None = None
    if change.sequence > record.sequence + 1:
        gap = (record.sequence + 1, change.sequence - 1)
        if not record.missing:
            record.gap_since = now
        record.missing.append(gap)  # above everything missing so far: the list stays sorted
    record.sequence = change.sequence
    record.instance_id = change.instance_id
    record.mac = change.mac if change.instance_id is not None else None
    record.last_transition_at = change.committed_at
    if change.reason == "claim" and change.captured_at is not None:
        record.last_seen_at = change.captured_at  # the claim that made the holder: the newest the events tell
    return Applied("gap", gap) if gap is not None else Applied("applied")


def apply_condition(record: ViewRecord, condition: Condition, started: bool, at: datetime) -> bool:
    """Apply an edge of flapping or split brain stamped `at`; False (and nothing changes) if it is stale."""
    if condition == "flapping":
        if record.flapping_changed_at is not None and at < record.flapping_changed_at:
            return False
        record.flapping, record.flapping_changed_at = started, at
    else:
        if record.split_brain_changed_at is not None and at < record.split_brain_changed_at:
            return False
        record.split_brain, record.split_brain_changed_at = started, at
    return True


def _remove(missing: list[SequenceRange], sequence: int) -> bool:
    """Take `sequence` out of the missing ranges; False if it was not missing."""
    for i, (first, last) in enumerate(missing):
        if first <= sequence <= last:
            pieces = [(a, b) for a, b in ((first, sequence - 1), (sequence + 1, last)) if a <= b]
            missing[i : i + 1] = pieces
            return True
        if sequence < first:
            return False
    return False


def missing_count(missing: list[SequenceRange]) -> int:
    return sum(last - first + 1 for first, last in missing)


def replay_ranges(
    havip_id: uuid.UUID, missing: list[SequenceRange], max_span: int
) -> list[tuple[uuid.UUID, int, int]]:
    """The missing ranges of one HAVIP cut into pieces of at most `max_span` sequences (what one replay range
    may ask for)."""
    pieces = []
    for first, last in missing:
        start = first
        while start <= last:
            end = min(last, start + max_span - 1)
            pieces.append((havip_id, start, end))
            start = end + 1
    return pieces
