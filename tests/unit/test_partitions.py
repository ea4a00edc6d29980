"""Partitions: how a claim's address picks its partition (shared.partitions) and how replicas share them
(services/binding/spread.py)."""

from __future__ import annotations

from collections import Counter
from ipaddress import IPv4Address

from hypothesis import given
from hypothesis import strategies as st

from services.binding.spread import next_step, share
from shared.partitions import claims_routing_key, partition_of


@given(st.integers(0, 2**32 - 1), st.integers(1, 1024))
def test_every_address_has_one_partition_among_p(address: int, partitions: int) -> None:
    assert 0 <= partition_of(IPv4Address(address), partitions) < partitions
    assert partition_of(IPv4Address(address), partitions) == partition_of(address, partitions)


def test_the_same_offset_in_many_subnets_spreads_over_the_partitions() -> None:
    """HAVIPs at .10 of a thousand /24s (a common layout) do not all land in one partition."""
    counts = Counter(partition_of(IPv4Address("198.18.0.10") + 256 * n, 8) for n in range(1000))
    assert len(counts) == 8
    assert max(counts.values()) < 2 * 1000 / 8


def test_consecutive_addresses_spread_evenly() -> None:
    counts = Counter(partition_of(IPv4Address("198.18.0.0") + n, 16) for n in range(16_000))
    assert max(counts.values()) - min(counts.values()) < 0.1 * 1000


def test_a_partitions_claims_have_a_routing_key_of_their_own() -> None:
    assert claims_routing_key(3) == "arp.claims.observed.3"


@given(st.integers(1, 64), st.integers(1, 16), st.data())
def test_replicas_taking_their_share_in_turn_hold_every_partition_at_most_share_each(
    partitions: int, replicas: int, data: st.DataObject
) -> None:
    """Replicas that each take what they may of the partitions free, in any order and from any start, end with
    every partition held (while there are replicas) and none holding more than its share."""
    held: list[set[int]] = [set() for _ in range(replicas)]
    starts = [data.draw(st.integers(0, partitions - 1)) for _ in range(replicas)]
    for _round in range(3):
        for r in data.draw(st.permutations(range(replicas))):
            step = next_step(held[r], partitions, replicas, starts[r])
            held[r] -= set(step.release)
            taken = set().union(*held)
            wanted = step.wanted
            for p in step.try_lock:
                if wanted <= 0:
                    break
                if p not in taken:  # pg_try_advisory_lock succeeds
                    held[r].add(p)
                    wanted -= 1
    assert set().union(*held) == set(range(partitions))
    assert all(len(h) <= share(partitions, replicas) for h in held)


def test_a_replica_beyond_its_share_gives_up_its_highest_partitions() -> None:
    step = next_step({0, 1, 2, 3, 4, 5}, 6, 2, start=0)
    assert step.release == (5, 4, 3)
    assert step.wanted == 0
