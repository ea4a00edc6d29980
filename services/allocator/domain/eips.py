"""The public pool that EIPs are taken from. Pure: no I/O, no framework.

The pool is configured as comma-separated IPv4 addresses and CIDR blocks (`HAVIP_EIP_POOL`), e.g.
`203.0.113.0/28, 198.51.100.7`. A single address is in the pool as written; a block contributes its host
addresses as `ipaddress.hosts()` counts them (without the network and broadcast addresses from /30 up, all of
a /31, the one address of a /32). Overlapping entries are merged. Addresses that cannot carry unicast traffic
(0/8, 127/8, 169.254/16, 224/4, 240/4) are refused. An empty pool is valid: no EIPs can be associated.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from services.allocator.domain.addressing import UNUSABLE_RANGES

MAX_ENTRIES = 1024


def _entry(text: str) -> tuple[int, int]:
    """(first, last) address of one pool entry, as integers."""
    try:
        net = IPv4Network(text, strict=True)
    except ValueError as exc:
        raise ValueError(f"EIP pool entry {text!r} is not an IPv4 address or CIDR block: {exc}") from None
    for bad in UNUSABLE_RANGES:
        if net.overlaps(bad):
            raise ValueError(f"EIP pool entry {text!r} overlaps {bad}, which cannot carry unicast addresses")
    if "/" not in text or net.prefixlen >= 31:
        return int(net.network_address), int(net.broadcast_address)
    return int(net.network_address) + 1, int(net.broadcast_address) - 1


@dataclass(frozen=True, slots=True)
class EipPool:
    """Disjoint, sorted, non-adjacent ranges of addresses (first, last), inclusive."""

    ranges: tuple[tuple[int, int], ...] = ()

    @classmethod
    def parse(cls, spec: str) -> EipPool:
        entries = [part.strip() for part in spec.split(",") if part.strip()]
        if len(entries) > MAX_ENTRIES:
            raise ValueError(f"the EIP pool has {len(entries)} entries; at most {MAX_ENTRIES}")
        return cls.of(_entry(e) for e in entries)

    @classmethod
    def of(cls, ranges: Iterable[tuple[int, int]]) -> EipPool:
        merged: list[tuple[int, int]] = []
        for first, last in sorted(ranges):
            if merged and first <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], last))
            else:
                merged.append((first, last))
        return cls(tuple(merged))

    @property
    def size(self) -> int:
        return sum(last - first + 1 for first, last in self.ranges)

    def __contains__(self, address: object) -> bool:
        if not isinstance(address, IPv4Address):
            return False
        value = int(address)
        i = bisect.bisect_right(self.ranges, (value, 2**32)) - 1
        return i >= 0 and self.ranges[i][0] <= value <= self.ranges[i][1]

    def lowest_free(self, taken: Iterable[IPv4Address]) -> IPv4Address | None:
        """The lowest address of the pool not in `taken`, or None when every one is taken.

        O(t log t + r) in the taken addresses and the ranges, whatever the size of the pool.
        """
        used = sorted({int(a) for a in taken if a in self})
        j = 0
        for first, last in self.ranges:
            candidate = first
            while j < len(used) and used[j] < candidate:
                j += 1
            while j < len(used) and used[j] == candidate:
                candidate += 1
                j += 1
            if candidate <= last:
                return IPv4Address(candidate)
        return None

    def describe(self) -> str:
        return ", ".join(
            str(IPv4Address(first)) if first == last else f"{IPv4Address(first)}-{IPv4Address(last)}"
            for first, last in self.ranges
        )
