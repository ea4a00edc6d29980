"""bench/chaos_soak's check: each committed transition attributed to the round whose burst its claim was captured
in, and from that the rounds lost or duplicated and the wrong final holders (no I/O)."""

from __future__ import annotations

from bench.chaos_soak import Committed, attribute

A, B = "instance-a", "instance-b"
STARTS = [1_000, 2_000, 3_000, 4_000]  # round 0 (the first claims, by A), then B, A, B
CLAIMANTS = [A, B, A, B]


def moved(*rounds: tuple[int, str]) -> list[Committed]:
    """Transitions captured just after the start of the given rounds, to the given holders."""
    return [Committed(STARTS[r] + 10, to, STARTS[r] + 100) for r, to in rounds]


def test_every_round_moving_its_havip_once_is_clean() -> None:
    found = attribute(STARTS, CLAIMANTS, {"h": moved((0, A), (1, B), (2, A), (3, B))})
    assert (found.lost, found.duplicated, found.foreign, found.wrong_holder) == ([], [], [], [])
    assert found.caused == 3  # the first claims are no failover
    assert found.commits == {0: [1_100], 1: [2_100], 2: [3_100], 3: [4_100]}


def test_a_round_that_moved_nothing_is_lost_and_the_next_one_then_owes_nothing() -> None:
    # Round 1 (to B) never committed: the HAVIP stays with A, so round 2 (A) has nothing to move, round 3 has.
    found = attribute(STARTS, CLAIMANTS, {"h": moved((0, A), (3, B))})
    assert found.lost == [("h", 1)]
    assert found.caused == 2
    assert found.wrong_holder == []


def test_a_late_commit_counts_for_the_round_its_claim_was_captured_in() -> None:
    late = [*moved((0, A), (2, A), (3, B)), Committed(STARTS[1] + 10, B, STARTS[2] + 5_000)]
    found = attribute(STARTS, CLAIMANTS, {"h": late})
    assert (found.lost, found.duplicated) == ([], [])


def test_two_transitions_in_one_round_are_duplicated_and_a_wrong_last_holder_is_wrong() -> None:
    found = attribute(STARTS, CLAIMANTS, {"h": moved((0, A), (1, B), (1, B), (2, A), (3, A))})
    assert found.duplicated == [("h", 1)]
    assert found.foreign == [("h", 3)]
    assert found.wrong_holder == ["h"]


def test_a_transition_captured_before_the_first_round_is_stray() -> None:
    found = attribute(STARTS, CLAIMANTS, {"h": [Committed(500, A, 600), *moved((0, A), (1, B), (2, A), (3, B))]})
    assert found.stray == 1
