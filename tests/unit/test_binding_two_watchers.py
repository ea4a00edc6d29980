"""Two watchers on one segment (docs/contract.md#order), on the pure BindingBook.

The same frames are on the wire; each watcher stamps them with its own clock (the true time plus its offset,
the two offsets at most DELTA apart); their claims reach the book in any interleaving that keeps each watcher's
own order (a watcher publishes in capture order). A watcher may stop for good at any point of its stream.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.binding.domain import (
    EPOCH_NS,
    BindingBook,
    Claim,
    ClaimOutcome,
    Havip,
    Holder,
    Instance,
    Refreshed,
    Stale,
    Transition,
)

VPC, SUBNET = uuid.uuid4(), uuid.uuid4()
VIP = IPv4Address("192.0.2.100")
CVM1 = Instance(uuid.uuid4(), VPC, SUBNET, "02:00:00:00:00:01", IPv4Address("192.0.2.11"))
CVM2 = Instance(uuid.uuid4(), VPC, SUBNET, "02:00:00:00:00:02", IPv4Address("192.0.2.12"))
HAVIP = Havip(uuid.uuid4(), VPC, SUBNET, VIP)
MACS = (CVM1.mac, CVM2.mac)
HOLDERS = {CVM1.mac: Holder(CVM1.id, CVM1.mac), CVM2.mac: Holder(CVM2.id, CVM2.mac)}

T0 = EPOCH_NS + 10**18  # true time of the lab's wire; frames count from it
US = 1_000
DELTA = 10_000 * US  # the bound on the difference between the two watchers' clocks: 10 ms


def book() -> BindingBook:
    b = BindingBook()
    for instance in (CVM1, CVM2):
        b.put_instance(instance)
    b.put_havip(HAVIP)
    return b


@dataclass(frozen=True, slots=True)
class Frame:
    mac: str  # the claimant
    wire_ns: int  # when it was on the wire (the true time)


Captured = tuple[Frame, Claim]  # a frame and a watcher's claim of it


@dataclass(frozen=True, slots=True)
class Watcher:
    id: str
    offset_ns: int  # its clock minus the true time

    def capture(self, frames: Sequence[Frame]) -> list[Captured]:
        return [(f, Claim(VIP, f.mac, f.mac, f.wire_ns + self.offset_ns, self.id)) for f in frames]


def wire(steps: Sequence[tuple[int, int]], *, apart_ns: int) -> list[Frame]:
    """Frames from (claimant, gap) steps, each `gap` ns after the one before; a frame of another claimant than the
    one before comes `apart_ns` later still."""
    frames: list[Frame] = []
    t = T0
    for who, gap in steps:
        mac = MACS[who]
        t += gap + (apart_ns if frames and frames[-1].mac != mac else 0)
        frames.append(Frame(mac, t))
    return frames


def changes(frames: Sequence[Frame]) -> list[Frame]:
    """The frames that change the claimant on the wire (the first one binds): one per failover."""
    return [f for i, f in enumerate(frames) if i == 0 or frames[i - 1].mac != f.mac]


def interleave(streams: Sequence[Sequence[Captured]], picks: Sequence[int]) -> list[Captured]:
    """The claims of every stream, each stream in its own order; `picks` say which stream goes next (then the
    first one left)."""
    queues = [list(reversed(s)) for s in streams]
    arrivals: list[Captured] = []
    pick = iter(picks)
    while live := [q for q in queues if q]:
        arrivals.append(live[next(pick, 0) % len(live)].pop())
    return arrivals


def decide(b: BindingBook, arrivals: Sequence[Captured]) -> list[tuple[Frame, ClaimOutcome]]:
    """Each claim decided as it arrives; the binding service's clock keeps the true time and has passed every
    frame delivered."""
    now = T0
    decided: list[tuple[Frame, ClaimOutcome]] = []
    for frame, c in arrivals:
        now = max(now, frame.wire_ns)
        decided.append((frame, b.apply_claim(c, now_ns=now)))
    return decided


def transitions_of(decided: Sequence[tuple[Frame, ClaimOutcome]]) -> list[tuple[Frame, Transition]]:
    return [(f, o) for f, o in decided if isinstance(o, Transition)]


def assert_one_history(transitions: Sequence[Transition]) -> None:
    """Sequences 1, 2, 3 … with no gap nor repeat, each transition from the one before's holder to another, in
    the order of their capture times."""
    assert [t.sequence for t in transitions] == list(range(1, len(transitions) + 1))
    previous: Holder | None = None
    for t in transitions:
        assert t.previous == previous
        assert t.current != previous
        previous = t.current
    captured = [t.captured_ns or 0 for t in transitions]
    assert captured == sorted(set(captured))


two_claimants = st.tuples(st.integers(0, 1), st.integers(1, 3 * DELTA))
offsets = st.integers(-DELTA, DELTA)
interleavings = st.lists(st.integers(0, 1), max_size=100)
deaths = st.none() | st.tuples(st.integers(0, 1), st.integers(0, 40))  # (which watcher, after how many claims)


@given(st.lists(two_claimants, min_size=1, max_size=40), offsets, interleavings, deaths)
def test_failovers_further_apart_than_the_clocks_bound_are_decided_once_each_in_wire_order(
    steps: list[tuple[int, int]], offset: int, picks: list[int], death: tuple[int, int] | None
) -> None:
    frames = wire(steps, apart_ns=DELTA + 1)
    streams = [Watcher("w1", 0).capture(frames), Watcher("w2", offset).capture(frames)]
    if death is not None:
        which, after = death
        streams[which] = streams[which][:after]
    b = book()
    decided = decide(b, interleave(streams, picks))

    # Nothing refused: every claim is a transition, a refresh or stale.
    assert all(isinstance(o, Transition | Refreshed | Stale) for _, o in decided)
    # One transition per failover, in wire order, each made by a claim of the frame that was the failover.
    transitions = transitions_of(decided)
    assert [f for f, _ in transitions] == changes(frames)
    assert_one_history([t for _, t in transitions])
    assert b.bindings[HAVIP.id].mac == frames[-1].mac
    # Exactly as one watcher alone would have decided: the same history, the same flags and edges.
    alone = book()
    alone_decided = decide(alone, Watcher("w1", 0).capture(frames))
    assert [(t.sequence, t.previous, t.current) for _, t in transitions] == [
        (t.sequence, t.previous, t.current) for _, t in transitions_of(alone_decided)
    ]
    assert [(e.condition, e.started) for e in b.take_edges()] == [
        (e.condition, e.started) for e in alone.take_edges()
    ]


@given(
    st.lists(st.tuples(st.integers(0, 1), st.integers(1, 2 * DELTA)), min_size=1, max_size=40),
    offsets,
    interleavings,
    deaths,
)
def test_failovers_closer_than_the_clocks_bound_are_never_refused_and_settle_on_the_last_claimant(
    steps: list[tuple[int, int]], offset: int, picks: list[int], death: tuple[int, int] | None
) -> None:
    frames = wire(steps, apart_ns=0)
    watchers = [Watcher("w1", 0), Watcher("w2", offset)]
    streams = [w.capture(frames) for w in watchers]
    if death is not None:
        which, after = death
        streams[which] = streams[which][:after]
    b = book()
    decided = decide(b, interleave(streams, picks))

    assert all(isinstance(o, Transition | Refreshed | Stale) for _, o in decided)
    transitions = [t for _, t in transitions_of(decided)]
    assert_one_history(transitions)
    # The first claim to arrive binds the first claimant on the wire.
    assert transitions[0].current == HOLDERS[frames[0].mac]
    if death is None:
        # Every watcher's claims in: the last claimant on the wire holds (its claim by the watcher whose clock
        # runs furthest ahead is the newest of all). The history between may miss a failover or show a
        # back-and-forth the wire did not: that is the price of failovers closer than the clocks' bound.
        assert b.bindings[HAVIP.id].mac == frames[-1].mac

    # The holder's next claim more than DELTA later, from the watchers still running, settles it.
    survivors = [w for i, w in enumerate(watchers) if death is None or i != death[0]]
    renewal = Frame(frames[-1].mac, frames[-1].wire_ns + DELTA + 1)
    settled = decide(b, interleave([w.capture([renewal]) for w in survivors], picks))
    assert all(isinstance(o, Transition | Refreshed | Stale) for _, o in settled)
    assert b.bindings[HAVIP.id].mac == frames[-1].mac
    assert len(transitions_of(settled)) <= 1
    assert_one_history(transitions + [t for _, t in transitions_of(settled)])


@pytest.mark.parametrize("second_offset_ns", [-3 * US, 0, 3 * US, -DELTA, DELTA])
@pytest.mark.parametrize("second_first", [False, True])
@pytest.mark.parametrize("holder", [None, CVM1])
def test_one_gratuitous_arp_seen_by_both_watchers_is_one_transition(
    second_offset_ns: int, second_first: bool, holder: Instance | None
) -> None:
    """keepalived's GARP, captured by both (a few µs apart, or a whole DELTA): whichever claim arrives first moves
    the holder; the other is a refresh (stamped later) or stale (earlier) — never a second transition nor a
    refusal."""
    b = book()
    if holder is not None:
        b.apply_claim(Claim(VIP, holder.mac, holder.mac, T0 - 5_000_000_000, "w1"))
    sequence_before = b.bindings[HAVIP.id].sequence
    garp = Frame(CVM2.mac, T0)
    [(_, by_first)] = Watcher("w1", 0).capture([garp])
    [(_, by_second)] = Watcher("w2", second_offset_ns).capture([garp])
    arrivals = [by_second, by_first] if second_first else [by_first, by_second]

    moved = b.apply_claim(arrivals[0], now_ns=T0)
    again = b.apply_claim(arrivals[1], now_ns=T0)

    assert isinstance(moved, Transition)
    assert moved.current == HOLDERS[CVM2.mac]
    assert moved.sequence == sequence_before + 1
    later = arrivals[1].captured_ns > arrivals[0].captured_ns
    assert again == (Refreshed(HAVIP.id, write=False) if later else Stale(HAVIP.id))
    assert b.bindings[HAVIP.id].sequence == sequence_before + 1


def test_two_failovers_closer_than_the_bound_may_show_a_back_and_forth_that_the_next_claim_settles() -> None:
    """cvm2 takes over at T and cvm1 takes back at T + DELTA/2 (a preemption within DELTA); w2's clock runs DELTA
    ahead. Both watchers' claims in: the binding ends right, with a back-and-forth in its history. w2 stopping
    after its first claim: cvm2 looks newest until cvm1's next claim more than DELTA after."""
    w1, w2 = Watcher("w1", 0), Watcher("w2", DELTA)
    frames = [Frame(CVM1.mac, T0), Frame(CVM2.mac, T0 + DELTA), Frame(CVM1.mac, T0 + DELTA + DELTA // 2)]
    by_w1, by_w2 = w1.capture(frames), w2.capture(frames)

    b = book()
    decided = decide(b, [by_w1[0], by_w1[1], by_w1[2], by_w2[0], by_w2[1], by_w2[2]])
    assert [o.current for _, o in transitions_of(decided)] == [
        HOLDERS[CVM1.mac],
        HOLDERS[CVM2.mac],
        HOLDERS[CVM1.mac],
        HOLDERS[CVM2.mac],
        HOLDERS[CVM1.mac],
    ]
    assert b.bindings[HAVIP.id].mac == CVM1.mac

    b = book()
    decided = decide(b, [by_w1[0], by_w2[0], by_w2[1], by_w1[1], by_w1[2]])  # w2 stops after cvm2's claim
    assert [o.current for _, o in transitions_of(decided)] == [HOLDERS[CVM1.mac], HOLDERS[CVM2.mac]]
    assert isinstance(decided[-1][1], Stale)  # cvm1's claim at T + 1.5 DELTA, behind w2's stamp of cvm2's
    assert b.bindings[HAVIP.id].mac == CVM2.mac
    [(_, settled)] = decide(b, w1.capture([Frame(CVM1.mac, frames[2].wire_ns + DELTA + 1)]))
    assert isinstance(settled, Transition)
    assert settled.current == HOLDERS[CVM1.mac]
    assert b.bindings[HAVIP.id].mac == CVM1.mac
