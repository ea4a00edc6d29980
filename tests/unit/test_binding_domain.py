"""The binding decision (docs/contract.md#binding-rules), on the pure BindingBook."""

from __future__ import annotations

import itertools
import uuid
from ipaddress import IPv4Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.binding.domain import (
    EPOCH_NS,
    Attachment,
    BindingBook,
    Claim,
    ConditionEdge,
    Havip,
    Holder,
    Instance,
    NotAHavip,
    Refreshed,
    Rejected,
    Stale,
    Transition,
)

VPC, OTHER_VPC = uuid.uuid4(), uuid.uuid4()
SUBNET, OTHER_SUBNET = uuid.uuid4(), uuid.uuid4()
VIP = IPv4Address("192.0.2.100")
CVM1 = Instance(uuid.uuid4(), VPC, SUBNET, "02:00:00:00:00:01", IPv4Address("192.0.2.11"))
CVM2 = Instance(uuid.uuid4(), VPC, SUBNET, "02:00:00:00:00:02", IPv4Address("192.0.2.12"))
ELSEWHERE = Instance(uuid.uuid4(), VPC, OTHER_SUBNET, "02:00:00:00:00:03", IPv4Address("198.51.100.5"))
HAVIP = Havip(uuid.uuid4(), VPC, SUBNET, VIP)


def book(*, candidates: frozenset[uuid.UUID] = frozenset()) -> BindingBook:
    b = BindingBook()
    for instance in (CVM1, CVM2, ELSEWHERE):
        b.put_instance(instance)
    assert b.put_havip(Havip(HAVIP.id, VPC, SUBNET, VIP, candidates)) == "new"
    return b


T0 = EPOCH_NS + 10**18  # a capture time well inside the system's life; tests count from it


def claim(mac: str, t: int, *, address: IPv4Address = VIP, eth_src: str | None = None) -> Claim:
    return Claim(address, mac, eth_src or mac, T0 + t, "w1")


def test_first_authorised_claim_binds() -> None:
    b = book()
    outcome = b.apply_claim(claim(CVM1.mac, 10))
    assert outcome == Transition(HAVIP.id, VIP, None, Holder(CVM1.id, CVM1.mac), 1, "claim", T0 + 10, "w1")
    assert b.bindings[HAVIP.id].instance_id == CVM1.id


def test_claim_by_another_instance_moves_the_binding_with_next_sequence() -> None:
    b = book()
    b.apply_claim(claim(CVM1.mac, 10))
    outcome = b.apply_claim(claim(CVM2.mac, 20))
    assert isinstance(outcome, Transition)
    assert outcome.previous == Holder(CVM1.id, CVM1.mac)
    assert outcome.current == Holder(CVM2.id, CVM2.mac)
    assert outcome.sequence == 2


def test_claim_by_holder_is_a_refresh_written_at_most_once_a_second() -> None:
    b = book()
    b.apply_claim(claim(CVM1.mac, 1_000_000_000))
    assert b.apply_claim(claim(CVM1.mac, 1_500_000_000)) == Refreshed(HAVIP.id, write=False)
    assert b.apply_claim(claim(CVM1.mac, 2_000_000_000)) == Refreshed(HAVIP.id, write=True)
    assert b.bindings[HAVIP.id].sequence == 1


def test_older_or_equal_claim_is_stale_and_changes_nothing() -> None:
    b = book()
    b.apply_claim(claim(CVM1.mac, 20))
    assert b.apply_claim(claim(CVM2.mac, 19)) == Stale(HAVIP.id)
    assert b.apply_claim(claim(CVM2.mac, 20)) == Stale(HAVIP.id)
    assert b.bindings[HAVIP.id].instance_id == CVM1.id


def test_address_that_is_no_havip_is_not_a_claim_on_anything() -> None:
    assert book().apply_claim(claim(CVM1.mac, 1, address=IPv4Address("192.0.2.200"))) == NotAHavip()


def test_refusals_name_their_reason_and_move_nothing() -> None:
    b = book(candidates=frozenset({CVM1.id}))
    cases = [
        (claim("02:aa:aa:aa:aa:aa", 1), "unknown_mac"),
        (claim(ELSEWHERE.mac, 2), "other_subnet"),
        (claim(CVM2.mac, 3), "not_candidate"),
        (claim(CVM1.mac, 4, eth_src="02:bb:bb:bb:bb:bb"), "eth_mismatch"),
    ]
    for c, reason in cases:
        assert b.apply_claim(c) == Rejected(HAVIP.id, reason)  # type: ignore[arg-type]
    assert b.bindings[HAVIP.id].instance_id is None
    assert b.bindings[HAVIP.id].sequence == 0
    # A refused claim does not advance the order either: the candidate's older claim still applies.
    assert isinstance(b.apply_claim(claim(CVM1.mac, 1)), Transition)


def test_overlapping_vpcs_resolve_the_havip_of_the_claimants_vpc() -> None:
    b = book()
    other_subnet = uuid.uuid4()
    twin = Havip(uuid.uuid4(), OTHER_VPC, other_subnet, VIP)
    stranger = Instance(uuid.uuid4(), OTHER_VPC, other_subnet, "02:00:00:00:00:09", IPv4Address("192.0.2.9"))
    b.put_havip(twin)
    b.put_instance(stranger)
    outcome = b.apply_claim(claim(stranger.mac, 5))
    assert isinstance(outcome, Transition)
    assert outcome.havip_id == twin.id
    assert b.bindings[HAVIP.id].instance_id is None
    # An unknown MAC cannot tell which of the two is meant.
    assert b.apply_claim(claim("02:aa:aa:aa:aa:aa", 6)) == Rejected(None, "unknown_mac")


def seen(c: Claim, segment: str, vlan: int | None = None) -> Claim:
    return Claim(c.address, c.sender_mac, c.eth_src, c.captured_ns, c.watcher_id, segment, vlan)


def test_a_claim_is_decided_only_against_the_havips_of_its_segment() -> None:
    """Segments (docs/contract.md#segments): two tenants use the same address on two segments; each claim concerns
    its own segment's HAVIP, and is neither decided nor audited against the other's."""
    b = book()
    other_subnet = uuid.uuid4()
    twin = Havip(uuid.uuid4(), OTHER_VPC, other_subnet, VIP)
    tenant = Instance(uuid.uuid4(), OTHER_VPC, other_subnet, "02:00:00:00:00:09", IPv4Address("192.0.2.9"))
    b.put_havip(twin)
    b.put_instance(tenant)
    b.attach_subnet(SUBNET, Attachment("blue"))
    b.attach_subnet(other_subnet, Attachment("red"))
    assert isinstance(b.apply_claim(seen(claim(CVM1.mac, 1), "blue")), Transition)
    # The other tenant's instance claiming on blue: refused against blue's HAVIP only — never its own twin.
    assert b.apply_claim(seen(claim(tenant.mac, 2), "blue")) == Rejected(HAVIP.id, "other_subnet")
    # An unknown MAC on red names red's HAVIP, not "one of two" as without segments.
    assert b.apply_claim(seen(claim("02:aa:aa:aa:aa:aa", 3), "red")) == Rejected(twin.id, "unknown_mac")
    # blue's instance claiming on red: refused against red's HAVIP; blue's binding is not touched.
    assert b.apply_claim(seen(claim(CVM2.mac, 4), "red")) == Rejected(twin.id, "other_subnet")
    assert b.bindings[HAVIP.id].instance_id == CVM1.id
    moved = b.apply_claim(seen(claim(tenant.mac, 5), "red"))
    assert isinstance(moved, Transition)
    assert moved.havip_id == twin.id
    # A segment no subnet is attached to: the address is nobody's there (counted, not stored).
    assert isinstance(b.apply_claim(seen(claim(CVM1.mac, 6), "green")), NotAHavip)
    assert isinstance(
        b.apply_claim(claim(CVM1.mac, 7)), NotAHavip
    )  # the default segment too: both subnets left it


def test_vlans_of_one_segment_separate_subnets_and_no_vlan_means_the_whole_segment() -> None:
    b = book()
    b.attach_subnet(SUBNET, Attachment("trunk", 10))
    assert isinstance(b.apply_claim(seen(claim(CVM1.mac, 1), "trunk", 20)), NotAHavip)
    assert isinstance(b.apply_claim(seen(claim(CVM1.mac, 2), "trunk", None)), NotAHavip)  # untagged
    assert isinstance(b.apply_claim(seen(claim(CVM1.mac, 3), "trunk", 10)), Transition)
    b.attach_subnet(SUBNET, Attachment("trunk"))
    assert isinstance(b.apply_claim(seen(claim(CVM2.mac, 4), "trunk", 20)), Transition)
    b.detach_subnet(SUBNET)  # back to the default: the default segment, any VLAN
    assert isinstance(b.apply_claim(seen(claim(CVM1.mac, 5), "default", 30)), Transition)


def test_deregistering_the_holder_unbinds_with_a_release_transition() -> None:
    b = book()
    b.apply_claim(claim(CVM1.mac, 10))
    [release] = b.remove_instance(CVM1.id)
    assert (release.reason, release.cause) == ("release", "instance_deregistered")
    assert release.previous == Holder(CVM1.id, CVM1.mac)
    assert release.current is None
    assert release.sequence == 2
    assert b.bindings[HAVIP.id].instance_id is None
    assert b.apply_claim(claim(CVM1.mac, 20)) == Rejected(HAVIP.id, "unknown_mac")
    assert isinstance(b.apply_claim(claim(CVM2.mac, 30)), Transition)


def test_releasing_a_havip_ends_its_history_and_forgets_it() -> None:
    b = book()
    b.apply_claim(claim(CVM1.mac, 10))
    final = b.remove_havip(HAVIP.id)
    assert final is not None
    assert (final.reason, final.cause, final.current, final.sequence) == ("release", "released", None, 2)
    assert b.apply_claim(claim(CVM1.mac, 20)) == NotAHavip()
    assert b.remove_havip(HAVIP.id) is None


@given(
    st.lists(st.tuples(st.sampled_from([CVM1.mac, CVM2.mac, ELSEWHERE.mac]), st.integers(1, 10**12)), max_size=60)
)
def test_binding_follows_the_newest_authorised_claim_whatever_the_arrival_order(
    claims: list[tuple[str, int]],
) -> None:
    b = book()
    sequences: list[int] = []
    for mac, t in claims:
        outcome = b.apply_claim(claim(mac, t))
        if isinstance(outcome, Transition):
            sequences.append(outcome.sequence)
    # Sequences are 1, 2, 3, … with no gap and no repeat.
    assert sequences == list(range(1, len(sequences) + 1))
    # The holder is whoever made the newest claim seen so far, unless it was refused or stale.
    authorised = [(t, mac) for mac, t in claims if mac != ELSEWHERE.mac]
    holder = b.bindings[HAVIP.id].mac
    if not authorised:
        assert holder is None
    else:
        applied: list[tuple[int, str]] = []
        newest = 0
        for mac, t in claims:
            if mac != ELSEWHERE.mac and t > newest:
                newest = t
                applied.append((t, mac))
        assert holder == applied[-1][1]


def test_a_claim_from_too_far_ahead_of_the_clock_is_refused_and_moves_nothing() -> None:
    b = book()
    now = 10 * 1_000_000_000
    b.apply_claim(claim(CVM1.mac, now), now_ns=T0 + now)
    ahead = claim(CVM2.mac, now + 2_000_000_001)
    assert b.apply_claim(ahead, now_ns=T0 + now, max_skew_ns=2_000_000_000) == Rejected(HAVIP.id, "clock_skew")
    assert b.bindings[HAVIP.id].instance_id == CVM1.id
    # Its time was not taken: the next real claim is not stale.
    moved = b.apply_claim(claim(CVM2.mac, now + 1), now_ns=T0 + now)
    assert isinstance(moved, Transition)
    # A clock far behind — before the system existed — is refused the same way.
    assert b.apply_claim(Claim(VIP, CVM1.mac, CVM1.mac, EPOCH_NS - 1, "w1")) == Rejected(HAVIP.id, "clock_skew")
    # Within the skew it counts.
    assert isinstance(b.apply_claim(claim(CVM1.mac, now + 1_999_000_000), now_ns=T0 + now), Transition)


def test_removing_the_holder_from_the_candidates_releases_the_binding() -> None:
    b = book()
    b.apply_claim(claim(CVM1.mac, 10))
    b.put_havip(Havip(HAVIP.id, VPC, SUBNET, VIP, frozenset({CVM1.id, CVM2.id})))
    assert b.release_unless_candidate(HAVIP.id) is None  # still a candidate
    b.put_havip(Havip(HAVIP.id, VPC, SUBNET, VIP, frozenset({CVM2.id})))
    released = b.release_unless_candidate(HAVIP.id)
    assert released is not None
    assert (released.reason, released.previous, released.current, released.sequence) == (
        "release",
        Holder(CVM1.id, CVM1.mac),
        None,
        2,
    )
    assert b.bindings[HAVIP.id].instance_id is None
    assert b.release_unless_candidate(HAVIP.id) is None  # nothing left to release
    assert isinstance(b.apply_claim(claim(CVM2.mac, 20)), Transition)
    assert b.apply_claim(claim(CVM1.mac, 30)) == Rejected(HAVIP.id, "not_candidate")


S = 1_000_000_000


def test_more_than_five_transitions_in_a_minute_is_flapping_until_a_quiet_minute() -> None:
    b = book()
    for i in range(6):  # cvm1, cvm2, cvm1 … : six transitions, one every 5 s
        b.apply_claim(claim((CVM1 if i % 2 == 0 else CVM2).mac, (i + 1) * 5 * S))
        edges = b.take_edges()
        if i < 5:
            assert not b.bindings[HAVIP.id].flapping
            assert [e.condition for e in edges if e.condition == "flapping"] == []
    assert b.bindings[HAVIP.id].flapping
    [started] = [e for e in edges if e.condition == "flapping"]
    assert (started.started, started.transitions_in_window) == (True, 6)
    b.tick(T0 + 60 * S)  # the first transitions leave the window: still flapping while any is in it
    assert b.take_edges() == []
    b.apply_claim(claim(CVM2.mac, 61 * S))  # the holder refreshing is no transition
    b.tick(T0 + 30 * S + 60 * S + 1)  # a full minute after the last transition (at 30 s)
    [stopped] = b.take_edges()
    assert (stopped.condition, stopped.started, stopped.transitions_in_window) == ("flapping", False, 0)
    assert not b.bindings[HAVIP.id].flapping


def test_two_masters_claiming_in_turn_is_split_brain_and_the_binding_follows_the_newest() -> None:
    b = book()
    t = 100 * S
    for i, mac in enumerate([CVM1.mac, CVM2.mac, CVM1.mac]):
        b.apply_claim(claim(mac, t + i * S))
    assert not b.bindings[HAVIP.id].split_brain  # a failover and a preemption: not yet
    b.apply_claim(claim(CVM2.mac, t + 3 * S))
    assert b.bindings[HAVIP.id].split_brain
    assert b.bindings[HAVIP.id].instance_id == CVM2.id  # the newest claim, as the network does
    [edge] = [e for e in b.take_edges() if e.condition == "split_brain"]
    assert (edge.started, edge.claimants_in_window) == (True, 2)
    b.apply_claim(claim(CVM2.mac, t + 5 * S))  # only cvm2 from now on
    b.tick(T0 + t + 3 * S + 10 * S + 1)
    assert [(e.condition, e.started) for e in b.take_edges()] == [("split_brain", False)]


def test_an_ordinary_failover_with_refreshes_is_neither_flapping_nor_split_brain() -> None:
    b = book()
    for i in range(5):  # cvm1 refreshes every second
        b.apply_claim(claim(CVM1.mac, (i + 1) * S))
    for i in range(5):  # cvm1 dies; cvm2 takes over and refreshes
        b.apply_claim(claim(CVM2.mac, (10 + i) * S))
    b.tick(T0 + 100 * S)
    assert b.take_edges() == []
    assert not b.bindings[HAVIP.id].flapping
    assert not b.bindings[HAVIP.id].split_brain


def test_a_flag_stored_before_a_restart_holds_for_a_window_from_the_restart() -> None:
    b = book()
    b.bindings[HAVIP.id].split_brain = True
    b.hold_conditions(T0 + 1_000 * S)
    b.tick(T0 + 1_005 * S)
    assert b.take_edges() == []
    b.tick(T0 + 1_010 * S + 1)
    assert [(e.condition, e.started) for e in b.take_edges()] == [("split_brain", False)]


def replayed(steps: list[tuple[str, int]]) -> tuple[BindingBook, int, list[ConditionEdge]]:
    """A book after claims by the instances named, each `gap` tenths of a second after the one before: the book,
    the last claim's time and the edges published."""
    macs = {"cvm1": CVM1.mac, "cvm2": CVM2.mac, "elsewhere": ELSEWHERE.mac}
    b = book()
    t = 0
    edges: list[ConditionEdge] = []
    for who, gap in steps:
        t += gap * S // 10
        b.apply_claim(claim(macs[who], t))
        edges += b.take_edges()
    return b, t, edges


@given(
    st.lists(st.tuples(st.sampled_from(["cvm1", "cvm2", "elsewhere"]), st.integers(1, 200)), max_size=80),
    st.integers(0, 300),
)
def test_flags_always_agree_with_the_edges_published(steps: list[tuple[str, int]], end: int) -> None:
    """Property: replaying the edges gives the flags, starts and stops alternate, and every flag ends after a
    long enough quiet."""
    b, t, edges = replayed(steps)
    b.tick(T0 + t + end * S)
    edges += b.take_edges()
    for condition in ("flapping", "split_brain"):
        states = [e.started for e in edges if e.condition == condition]
        assert all(a != b_ for a, b_ in itertools.pairwise(states))
        assert (states[-1] if states else False) == getattr(b.bindings[HAVIP.id], condition)
    b.tick(T0 + t + end * S + 61 * S)
    b.take_edges()
    assert not b.bindings[HAVIP.id].flapping
    assert not b.bindings[HAVIP.id].split_brain


def end_binding(b: BindingBook, cause: str) -> Transition | None:
    """End the binding of HAVIP (held by cvm2 in these tests) the way `cause` names."""
    if cause == "released":
        return b.remove_havip(HAVIP.id)
    if cause == "instance_deregistered":
        [release] = b.remove_instance(CVM2.id)
        return release
    b.put_havip(Havip(HAVIP.id, VPC, SUBNET, VIP, frozenset({CVM1.id})))
    return b.release_unless_candidate(HAVIP.id)


@pytest.mark.parametrize("cause", ["released", "instance_deregistered", "candidates_changed"])
def test_a_binding_ended_while_flapping_and_in_split_brain_ends_both_flags_and_says_so(cause: str) -> None:
    b = book()
    for i in range(6):  # two masters claiming in turn, a second apart: flapping and split brain
        b.apply_claim(claim((CVM1 if i % 2 else CVM2).mac, (i + 1) * S))
    assert b.bindings[HAVIP.id].instance_id == CVM1.id
    b.apply_claim(claim(CVM2.mac, 7 * S))
    assert {(e.condition, e.started) for e in b.take_edges()} == {("flapping", True), ("split_brain", True)}

    release = end_binding(b, cause)
    assert release is not None
    assert (release.reason, release.cause, release.current) == ("release", cause, None)
    stopped = b.take_edges()
    assert {(e.condition, e.started) for e in stopped} == {("flapping", False), ("split_brain", False)}
    assert {e.havip_id for e in stopped} == {HAVIP.id}
    if cause != "released":  # the HAVIP stays, unbound and unflagged
        binding = b.bindings[HAVIP.id]
        assert (binding.flapping, binding.split_brain, binding.instance_id) == (False, False, None)
    b.tick(T0 + 1_000 * S)  # and nothing ends twice
    assert b.take_edges() == []


def test_a_claim_after_a_release_starts_the_count_afresh() -> None:
    b = book()
    for i in range(7):
        b.apply_claim(claim((CVM1 if i % 2 else CVM2).mac, (i + 1) * S))
    end_binding(b, "instance_deregistered")
    b.take_edges()
    assert isinstance(b.apply_claim(claim(CVM1.mac, 8 * S)), Transition)
    assert b.take_edges() == []  # the claims before the release no longer count
    assert not b.bindings[HAVIP.id].flapping


@given(
    st.lists(st.tuples(st.sampled_from(["cvm1", "cvm2", "elsewhere"]), st.integers(1, 200)), max_size=80),
    st.sampled_from(["released", "instance_deregistered", "candidates_changed", None]),
)
def test_every_flag_started_is_ended_once_whatever_ends_it(
    steps: list[tuple[str, int]], ending: str | None
) -> None:
    """Property: however the claims went and whatever ends the binding (a release of either kind, or quiet),
    each flag's edges alternate and the last one published is a stop."""
    b, t, edges = replayed(steps)
    if ending is not None and b.bindings[HAVIP.id].instance_id == CVM2.id:
        end_binding(b, ending)
    b.tick(T0 + t + 61 * S)
    edges += b.take_edges()
    for condition in ("flapping", "split_brain"):
        states = [e.started for e in edges if e.condition == condition]
        assert all(a != b_ for a, b_ in itertools.pairwise(states))
        assert states == [] or states[-1] is False


def test_creations_redelivered_after_a_removal_do_not_bring_anything_back() -> None:
    b = book()
    b.apply_claim(claim(CVM1.mac, 10))
    assert b.remove_havip(HAVIP.id) is not None
    assert b.put_havip(HAVIP) == "released"  # havip.allocated again, after a lost acknowledgement
    assert HAVIP.id not in b.bindings
    assert b.apply_claim(claim(CVM1.mac, 20)) == NotAHavip()
    b.remove_instance(CVM2.id)
    assert b.put_instance(CVM2) is False
    assert CVM2.mac not in b.instances_by_mac
