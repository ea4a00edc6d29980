"""The refusal audit, pure: which audit rows to write for the claims the book refuses. No I/O, no clock of its
own — every time is passed in.

Repeats of one refusal (address, MAC, reason) within a window of capture time share one audit row and one event,
counting the frames. The window is a second and doubles, up to a minute, each time the same refusal comes back
right after its window: a spoofer flooding without pause costs a row and an event a minute per address, not one a
second; a pause as long as the window resets it.

New rows are paced (AuditPacer): a spoofer claiming a thousand addresses at once would otherwise land a thousand
rows and events in front of whatever takeover comes then. A row over the budget waits in memory, every later
frame of its key folding into it, first refusals of a key before repeats, until `take_write(release=True)` lets
it go.

The audit follows its writes as transactions. `refuse` adds to the open draft; `take_write` closes it into an
`AuditWrite` (rows to insert, frames to add to stored rows); the caller reports `committed` or `failed`. A
draft's frames count once its write commits (a failed batch is decided again when it is retried); a row whose
write failed waits again with the frames it had gathered, so that every frame is counted exactly once.
"""

from __future__ import annotations

import enum
import itertools
import uuid
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from ipaddress import IPv4Address
from typing import Final

from services.binding.audit_pacing import AuditPacer
from services.binding.domain import RejectReason, ns_to_datetime

# One refusal's row gathers the repeats within this span of capture time; the span doubles while the refusal
# keeps coming back, up to the maximum.
REFUSAL_FOLD_NS: Final = 1_000_000_000
MAX_REFUSAL_FOLD_NS: Final = 64_000_000_000
# Audit rows that may wait for the pacer's budget (about 30 MB); past it a refusal is only counted.
MAX_WAITING_REFUSALS: Final = 100_000
# (address, MAC) pairs counted per refusal summary at most (a flood of random MACs must not grow memory).
MAX_SUMMARISED_CLAIMANTS: Final = 10_000

RefusalKey = tuple[IPv4Address, str, RejectReason]


@dataclass(frozen=True, slots=True)
class Refusal:
    """A claim the book refused, as the audit needs it."""

    claim_id: uuid.UUID
    havip_id: uuid.UUID | None
    address: IPv4Address
    mac: str
    reason: RejectReason
    captured_ns: int
    watcher_id: str
    frames: int = 1  # the watcher's repeats folded into the claim

    @property
    def key(self) -> RefusalKey:
        return (self.address, self.mac, self.reason)


@dataclass(slots=True)
class RejectedClaim:
    """An audit row as the repository writes it (unique on `claim_id`)."""

    claim_id: uuid.UUID
    havip_id: uuid.UUID | None
    address: IPv4Address
    mac: str
    reason: RejectReason
    captured_at: datetime
    watcher_id: str
    count: int = 1  # frames folded into this audit row


@dataclass(frozen=True, slots=True)
class RefusalSummary:
    frames_by_reason: dict[str, int]
    claimants: int  # distinct (address, MAC), at most MAX_SUMMARISED_CLAIMANTS


class _State(enum.Enum):
    NEW_WAITING = enum.auto()  # opened by a draft not yet committed, over the budget: waits once committed
    WAITING = enum.auto()  # in a queue for the pacer; not in any write
    INSERTING = enum.auto()  # its INSERT is in a write under way
    STORED = enum.auto()  # committed: later frames are added by UPDATE
    DROPPED = enum.auto()  # its opening write failed and no other write carries a frame of it


@dataclass(eq=False, slots=True)
class _Fold:
    """One audit row and the refusals folding into it. Compared by identity: the audit's queues and ledgers
    hold folds that are no longer the current one of their key."""

    first: Refusal  # the refusal that opened the row: its claim id, HAVIP, capture time and watcher
    window_ns: int
    repeat: bool  # its key had a row before (whose window ended): waits behind first refusals
    state: _State
    # The key's row before this one, until this one's opening write commits: the key's row again if it fails.
    previous: _Fold | None
    unwritten: int = 0  # frames of committed drafts that are in no write yet
    held_by: int = 0  # writes under way that carry frames for it, to be counted when they commit

    @property
    def waits(self) -> bool:
        return self.state in (_State.NEW_WAITING, _State.WAITING)

    def row(self, count: int) -> RejectedClaim:
        r = self.first
        return RejectedClaim(
            r.claim_id, r.havip_id, r.address, r.mac, r.reason, ns_to_datetime(r.captured_ns), r.watcher_id, count
        )


@dataclass(slots=True)
class _Draft:
    opened: list[_Fold] = field(default_factory=list)
    frames: dict[_Fold, int] = field(default_factory=dict)
    unaudited_frames: int = 0


@dataclass(frozen=True, slots=True)
class _Insert:
    fold: _Fold
    count: int
    committed_frames: bool  # the frames were counted before (a released row), not the draft's own


@dataclass(frozen=True, slots=True)
class _Update:
    fold: _Fold
    committed_frames: int  # from the ledger: given back if the write fails
    draft_frames: int


class AuditWrite:
    """What one write carries: `rows` to insert and `folded` frames to add to stored rows, by claim id."""

    __slots__ = ("_held", "_inserts", "_opened_waiting", "_updates", "folded", "rows", "unaudited_frames")

    def __init__(
        self,
        inserts: list[_Insert],
        updates: list[_Update],
        held: list[tuple[_Fold, int]],
        opened_waiting: list[_Fold],
        unaudited_frames: int,
    ) -> None:
        self._inserts = inserts
        self._opened_waiting = opened_waiting  # rows the draft opened over the budget: they wait once committed
        self._updates = updates
        self._held = held  # draft frames of rows this write does not carry: counted when it commits
        self.rows = [i.fold.row(i.count) for i in inserts]
        self.folded = {u.fold.first.claim_id: u.committed_frames + u.draft_frames for u in updates}
        self.unaudited_frames = unaudited_frames  # refused past MAX_WAITING_REFUSALS: counted, not audited

    def __bool__(self) -> bool:
        return bool(self.rows or self.folded)

    @staticmethod
    def combined(writes: Sequence[AuditWrite]) -> tuple[list[RejectedClaim], dict[uuid.UUID, int]]:
        """The rows and folded frames of several writes made one."""
        folded: Counter[uuid.UUID] = Counter()
        for write in writes:
            folded.update(write.folded)
        return [row for write in writes for row in write.rows], dict(folded)


class RefusalAudit:
    def __init__(self, pacer: AuditPacer) -> None:
        self._pacer = pacer
        self._folds: dict[RefusalKey, _Fold] = {}  # the current row of each key
        # Rows not yet stored, by the claim id that opened them: a claim decided again (its batch retried after a
        # failed write) folds into the row it opened if that row lives on — one claim id, one row.
        self._unstored: dict[uuid.UUID, _Fold] = {}
        self._draft = _Draft()
        self._waiting_first: OrderedDict[_Fold, None] = OrderedDict()
        self._waiting_repeat: OrderedDict[_Fold, None] = OrderedDict()
        self._new_waiting_first = 0  # NEW_WAITING folds, by queue: they count as ahead of later refusals
        self._new_waiting_repeat = 0
        self._ledger: dict[_Fold, None] = {}  # stored rows with frames to add: carried by the next write
        self._refused_frames: Counter[str] = Counter()
        self._refused_claimants: set[tuple[IPv4Address, str]] = set()

    @property
    def refusals_waiting(self) -> int:
        """Rows waiting for the pacer (those of drafts not yet committed included)."""
        return (
            len(self._waiting_first)
            + len(self._waiting_repeat)
            + self._new_waiting_first
            + self._new_waiting_repeat
        )

    def refuse(self, refusal: Refusal, now_s: float) -> None:
        """A refused claim, into the open draft; `now_s` is the pacer's (monotonic) time."""
        self._refused_frames[refusal.reason] += refusal.frames
        if len(self._refused_claimants) < MAX_SUMMARISED_CLAIMANTS:
            self._refused_claimants.add((refusal.address, refusal.mac))
        draft = self._draft
        opened_before = self._unstored.get(refusal.claim_id)
        if opened_before is not None:
            draft.frames[opened_before] = draft.frames.get(opened_before, 0) + refusal.frames
            return
        key = refusal.key
        fold = self._folds.get(key)
        since = refusal.captured_ns - fold.first.captured_ns if fold is not None else -1
        # A refusal stamped a little before the row's first is of the same burst too: the same frame seen by a
        # second watcher on the segment whose clock is behind, or a frame that came late.
        if fold is not None and (fold.waits or -fold.window_ns < since < fold.window_ns):
            draft.frames[fold] = draft.frames.get(fold, 0) + refusal.frames
            return
        window = REFUSAL_FOLD_NS
        if fold is not None and 0 <= since < 2 * fold.window_ns:  # back right after its window: a flood
            window = min(2 * fold.window_ns, MAX_REFUSAL_FOLD_NS)
        repeat = fold is not None
        ahead = len(self._waiting_first) + self._new_waiting_first
        if repeat:
            ahead += len(self._waiting_repeat) + self._new_waiting_repeat
        if ahead == 0 and self._pacer.take(1, now_s):
            state = _State.INSERTING
        elif self.refusals_waiting < MAX_WAITING_REFUSALS:
            state = _State.NEW_WAITING
            if repeat:
                self._new_waiting_repeat += 1
            else:
                self._new_waiting_first += 1
        else:  # bounded memory: counted, not audited
            self._folds.pop(key, None)
            draft.unaudited_frames += refusal.frames
            return
        new = _Fold(refusal, window, repeat, state, previous=fold)
        self._folds[key] = new
        self._unstored[refusal.claim_id] = new
        draft.opened.append(new)
        draft.frames[new] = refusal.frames

    def abandon_draft(self) -> None:
        """The decisions of the open draft failed before their write: none of it happened."""
        draft, self._draft = self._draft, _Draft()
        for fold in draft.opened:
            self._leave_new_waiting(fold)
            self._drop(fold)

    def take_write(self, now_s: float, *, release: bool = False) -> AuditWrite:
        """Close the open draft into a write: its new rows the pacer let through, its frames of stored rows, and
        the frames the ledger holds for stored rows. With `release`, also the waiting rows the pacer lets go
        now: first refusals, then repeats, oldest first."""
        draft, self._draft = self._draft, _Draft()
        inserts: list[_Insert] = []
        held: list[tuple[_Fold, int]] = []
        opened = set(draft.opened)
        draft_updates: dict[_Fold, int] = {}
        for fold, frames in draft.frames.items():
            if fold in opened and fold.state is _State.INSERTING:
                inserts.append(_Insert(fold, frames, committed_frames=False))
            elif fold.state is _State.STORED:
                draft_updates[fold] = frames
            else:
                fold.held_by += 1
                held.append((fold, frames))
        updates = [_Update(fold, fold.unwritten, draft_updates.pop(fold, 0)) for fold in self._ledger]
        updates += [_Update(fold, 0, frames) for fold, frames in draft_updates.items()]
        for fold in self._ledger:
            fold.unwritten = 0
        self._ledger.clear()
        if release:
            inserts += self._release(now_s)
        opened_waiting = [fold for fold in draft.opened if fold.state is _State.NEW_WAITING]
        return AuditWrite(inserts, updates, held, opened_waiting, draft.unaudited_frames)

    def committed(self, write: AuditWrite) -> None:
        for insert in write._inserts:
            insert.fold.state = _State.STORED
            insert.fold.previous = None
            self._unstored.pop(insert.fold.first.claim_id, None)
        for fold in write._opened_waiting:
            self._leave_new_waiting(fold)
            self._wait(fold, front=False)
            fold.previous = None
        for fold, frames in write._held:
            fold.held_by -= 1
            fold.unwritten += frames
        for fold in (*(i.fold for i in write._inserts), *(f for f, _ in write._held)):
            if fold.state is _State.STORED and fold.unwritten:
                self._ledger[fold] = None

    def failed(self, write: AuditWrite) -> None:
        """The write was rolled back: its draft's frames are forgotten (the batch is decided again when
        retried); rows it carried wait again, at the front, with what other writes folded into them."""
        for update in write._updates:
            if update.committed_frames:
                update.fold.unwritten += update.committed_frames
                self._ledger[update.fold] = None
        for fold, _frames in write._held:
            fold.held_by -= 1
        for fold in write._opened_waiting:
            self._leave_new_waiting(fold)
            self._settle(fold, front=False)
        for insert in reversed(write._inserts):
            if insert.committed_frames:
                insert.fold.unwritten += insert.count
            self._settle(insert.fold, front=True)
        for fold, _frames in write._held:
            if fold.state is _State.WAITING:
                self._settle(fold, front=False)

    def forget_windows(self, now_ns: int) -> None:
        """Keys quiet for twice their window start again at a second (their rows are not forgotten)."""
        self._folds = {
            k: f for k, f in self._folds.items() if f.waits or now_ns - f.first.captured_ns < 2 * f.window_ns
        }

    def take_summary(self) -> RefusalSummary | None:
        """The refusals since the last call (None if there were none), for one log line."""
        if not self._refused_frames:
            return None
        summary = RefusalSummary(dict(self._refused_frames), len(self._refused_claimants))
        self._refused_frames = Counter()
        self._refused_claimants = set()
        return summary

    def _release(self, now_s: float) -> list[_Insert]:
        queued = len(self._waiting_first) + len(self._waiting_repeat)
        granted = self._pacer.take(queued, now_s) if queued else 0
        released: list[_Fold] = []
        for fold in itertools.chain(self._waiting_first, self._waiting_repeat):
            if len(released) == granted:
                break
            if fold.unwritten:  # none yet: it waits for a write under way to count its frames
                released.append(fold)
        inserts = [_Insert(fold, fold.unwritten, committed_frames=True) for fold in released]
        for fold in released:
            self._queue_of(fold).pop(fold)
            fold.state = _State.INSERTING
            fold.unwritten = 0
        return inserts

    def _queue_of(self, fold: _Fold) -> OrderedDict[_Fold, None]:
        return self._waiting_repeat if fold.repeat else self._waiting_first

    def _wait(self, fold: _Fold, *, front: bool) -> None:
        fold.state = _State.WAITING
        queue = self._queue_of(fold)
        queue[fold] = None
        if front:
            queue.move_to_end(fold, last=False)

    def _leave_new_waiting(self, fold: _Fold) -> None:
        if fold.state is not _State.NEW_WAITING:
            return
        if fold.repeat:
            self._new_waiting_repeat -= 1
        else:
            self._new_waiting_first -= 1

    def _settle(self, fold: _Fold, *, front: bool) -> None:
        """A row out of a failed write: it waits while it has frames (or a write under way may add some)."""
        queue = self._queue_of(fold)
        if fold.unwritten or fold.held_by:
            if fold not in queue:
                self._wait(fold, front=front)
        else:
            queue.pop(fold, None)
            self._drop(fold)

    def _drop(self, fold: _Fold) -> None:
        fold.state = _State.DROPPED
        self._unstored.pop(fold.first.claim_id, None)
        key = fold.first.key
        if self._folds.get(key) is fold:
            previous = fold.previous
            while previous is not None and previous.state is _State.DROPPED:
                previous = previous.previous
            if previous is not None:
                self._folds[key] = previous
            else:
                del self._folds[key]
