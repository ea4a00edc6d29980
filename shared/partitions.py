"""Claims are decided in P partitions, each by one binding replica at a time (docs/ARCHITECTURE.md#partitions).

A claim's partition is a function of its address alone, so that the watcher (which sees only the wire), the
binding (which also knows the HAVIP) and Postgres (`partition_sql`, over a binding row that may outlive its HAVIP)
all compute the same one. The address is mixed by Fibonacci hashing before the modulo: HAVIPs that sit at the
same offset of many subnets (every subnet's .10) spread over the partitions instead of all landing in one.
"""

from __future__ import annotations

from ipaddress import IPv4Address
from typing import Final

from shared.events import CLAIMS_EVENT

# 2^32 / φ², below 2^31 so that the product with a 32-bit address fits Postgres's signed bigint.
_GOLDEN: Final = 0x61C88647
_MASK32: Final = 0xFFFFFFFF
DEFAULT_PARTITIONS: Final = 8
MAX_PARTITIONS: Final = 1024


def partition_of(address: IPv4Address | int, partitions: int) -> int:
    """The partition of a claim for `address` (or of the HAVIP at it), among `partitions`."""
    mixed = (int(address) * _GOLDEN) & _MASK32
    return (mixed >> 16) % partitions


def partition_sql(column: str, partitions_param: str) -> str:
    """partition_of in SQL, over an inet `column`; `partitions_param` is the placeholder of P (e.g. "$2")."""
    return f"(((({column} - '0.0.0.0'::inet) * {_GOLDEN}) % 4294967296) >> 16) % {partitions_param}"


def claims_routing_key(partition: int) -> str:
    """The routing key of a partition's claims; `arp.claims.observed.#` binds to all of them."""
    return f"{CLAIMS_EVENT}.{partition}"


ALL_CLAIMS: Final = f"{CLAIMS_EVENT}.#"
