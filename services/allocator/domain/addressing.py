"""IPv4 address arithmetic of VPCs and subnets. Pure: no I/O, no framework.

Rules (decided here, documented in the API):

* A VPC block is an IPv4 CIDR from /8 to /29 (it must hold at least one subnet), not in a range that cannot
  carry unicast host traffic (0.0.0.0/8, loopback, link-local, multicast, 240.0.0.0/4).
* A subnet block is an IPv4 CIDR from /8 to /29, inside its VPC's block and overlapping none of its VPC's
  other subnets. /29 is the smallest: 8 addresses, 3 reserved, 5 usable — a HAVIP and its two servers, with
  room to spare. /30 would leave one usable address, /31 and /32 none.
* Reserved in every subnet and never handed out: the network address, the first host (the gateway) and the
  broadcast address.

Which addresses are free is kept by the database (allocator.free_ranges, migration 0005): the lowest free one
is an index probe there, whatever the subnet's fill.
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network
from typing import TypeVar

from services.allocator.errors import AddressNotInSubnet, AddressReserved, SubnetNotInVpc, SubnetOverlap

MIN_PREFIX = 8
MAX_PREFIX = 29  # smallest block: 8 addresses, 5 usable
RESERVED_PER_SUBNET = 3

UNUSABLE_RANGES: tuple[IPv4Network, ...] = (
    IPv4Network("0.0.0.0/8"),
    IPv4Network("127.0.0.0/8"),
    IPv4Network("169.254.0.0/16"),
    IPv4Network("224.0.0.0/4"),
    IPv4Network("240.0.0.0/4"),
)

K = TypeVar("K")


# ---- block validation (input checks: raise ValueError, turned into 422 by the request models) -------------


def check_block(net: IPv4Network) -> IPv4Network:
    """Refuse blocks that are too large or too small, or that lie in a non-unicast range."""
    if not MIN_PREFIX <= net.prefixlen <= MAX_PREFIX:
        raise ValueError(
            f"prefix length must be between /{MIN_PREFIX} and /{MAX_PREFIX} "
            f"(a /{MAX_PREFIX} holds {usable_count_for_prefix(MAX_PREFIX)} usable addresses), got /{net.prefixlen}"
        )
    for bad in UNUSABLE_RANGES:
        if net.overlaps(bad):
            raise ValueError(f"{net} overlaps {bad}, which cannot carry unicast host addresses")
    return net


def usable_count_for_prefix(prefixlen: int) -> int:
    return max((1 << (32 - prefixlen)) - RESERVED_PER_SUBNET, 0)


# ---- reserved and usable addresses -------------------------------------------------------------------------


def gateway(net: IPv4Network) -> IPv4Address:
    return net.network_address + 1


def reserved_addresses(net: IPv4Network) -> frozenset[IPv4Address]:
    """Network address, gateway (first host) and broadcast address."""
    return frozenset({net.network_address, gateway(net), net.broadcast_address})


def is_reserved(net: IPv4Network, address: IPv4Address) -> bool:
    return address in reserved_addresses(net)


def first_usable(net: IPv4Network) -> IPv4Address:
    return net.network_address + 2


def last_usable(net: IPv4Network) -> IPv4Address:
    return net.broadcast_address - 1


def usable_count(net: IPv4Network) -> int:
    """How many addresses of the block may be handed out at all."""
    return max(net.num_addresses - RESERVED_PER_SUBNET, 0)


def is_usable(net: IPv4Network, address: IPv4Address) -> bool:
    return address in net and not is_reserved(net, address)


# ---- rules that relate a request to existing resources (raise domain errors) -------------------------------


def check_subnet_in_vpc(vpc: IPv4Network, subnet: IPv4Network) -> None:
    if not subnet.subnet_of(vpc):
        raise SubnetNotInVpc(f"subnet {subnet} is not inside the VPC's block {vpc}")


def find_overlap(net: IPv4Network, others: Iterable[tuple[K, IPv4Network]]) -> tuple[K, IPv4Network] | None:
    """The first (key, block) of `others` that overlaps `net`, if any."""
    for key, other in others:
        if net.overlaps(other):
            return key, other
    return None


def check_no_overlap(net: IPv4Network, others: Iterable[tuple[K, IPv4Network]]) -> None:
    clash = find_overlap(net, others)
    if clash is not None:
        key, other = clash
        raise SubnetOverlap(f"{net} overlaps subnet {key} ({other}) of the same VPC")


def check_requested_address(net: IPv4Network, address: IPv4Address) -> None:
    """A requested host address must be inside the subnet and not reserved (whether it is free is the
    database's to say: services/allocator/subnets/service.py)."""
    if address not in net:
        raise AddressNotInSubnet(f"{address} is not inside the subnet {net}")
    if is_reserved(net, address):
        raise AddressReserved(
            f"{address} is reserved in {net} (network {net.network_address}, gateway {gateway(net)}, "
            f"broadcast {net.broadcast_address})"
        )
