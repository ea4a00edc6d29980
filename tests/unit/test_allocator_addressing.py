"""The allocator's pure address arithmetic: examples for the rules, hypothesis for the invariants."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.allocator.domain import addressing
from services.allocator.errors import (
    AddressInUse,
    AddressNotInSubnet,
    AddressReserved,
    SubnetFull,
    SubnetNotInVpc,
    SubnetOverlap,
)

A = IPv4Address
N = IPv4Network


# ---- examples ----------------------------------------------------------------------------------------------


def test_reserved_are_network_gateway_broadcast() -> None:
    net = N("10.0.1.0/24")
    assert addressing.reserved_addresses(net) == {A("10.0.1.0"), A("10.0.1.1"), A("10.0.1.255")}
    assert addressing.gateway(net) == A("10.0.1.1")
    assert addressing.usable_count(net) == 253


def test_lowest_free_skips_reserved_and_taken() -> None:
    net = N("192.0.2.0/29")
    assert addressing.lowest_free(net, []) == A("192.0.2.2")
    assert addressing.lowest_free(net, [A("192.0.2.2"), A("192.0.2.4")]) == A("192.0.2.3")
    assert addressing.lowest_free(net, [A("192.0.2.2"), A("192.0.2.3")]) == A("192.0.2.4")
    # taken addresses outside the usable range change nothing
    assert addressing.lowest_free(net, [A("192.0.2.0"), A("192.0.2.1"), A("10.0.0.2")]) == A("192.0.2.2")


def test_smallest_subnet_fills_up() -> None:
    net = N("192.0.2.8/29")
    taken = [A(f"192.0.2.{i}") for i in range(10, 15)]
    assert addressing.free_count(net, taken) == 0
    assert addressing.lowest_free(net, taken) is None
    with pytest.raises(SubnetFull):
        addressing.choose_address(net, taken)


def test_check_block_bounds() -> None:
    assert addressing.check_block(N("10.0.0.0/8")) == N("10.0.0.0/8")
    assert addressing.check_block(N("192.0.2.0/29")) == N("192.0.2.0/29")
    for bad in ("10.0.0.0/30", "10.0.0.0/31", "10.0.0.1/32", "0.0.0.0/0", "8.0.0.0/7"):
        with pytest.raises(ValueError, match="prefix length"):
            addressing.check_block(N(bad))
    for bad in ("127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/8", "240.0.0.0/8", "0.0.0.0/8"):
        with pytest.raises(ValueError, match="unicast"):
            addressing.check_block(N(bad))


def test_subnet_inside_vpc() -> None:
    addressing.check_subnet_in_vpc(N("10.0.0.0/16"), N("10.0.0.0/16"))
    addressing.check_subnet_in_vpc(N("10.0.0.0/16"), N("10.0.255.0/24"))
    with pytest.raises(SubnetNotInVpc):
        addressing.check_subnet_in_vpc(N("10.0.0.0/16"), N("10.1.0.0/24"))
    with pytest.raises(SubnetNotInVpc):
        addressing.check_subnet_in_vpc(N("10.0.0.0/16"), N("10.0.0.0/15"))


def test_overlap_names_the_other_subnet() -> None:
    others = [("a", N("10.0.0.0/24")), ("b", N("10.0.2.0/23"))]
    assert addressing.find_overlap(N("10.0.1.0/24"), others) is None
    assert addressing.find_overlap(N("10.0.3.128/25"), others) == ("b", N("10.0.2.0/23"))
    with pytest.raises(SubnetOverlap, match="b"):
        addressing.check_no_overlap(N("10.0.0.0/22"), others[1:])


def test_check_address() -> None:
    net = N("10.0.0.0/24")
    addressing.check_address(net, A("10.0.0.2"), [])
    with pytest.raises(AddressNotInSubnet):
        addressing.check_address(net, A("10.0.1.2"), [])
    for reserved in ("10.0.0.0", "10.0.0.1", "10.0.0.255"):
        with pytest.raises(AddressReserved):
            addressing.check_address(net, A(reserved), [])
    with pytest.raises(AddressInUse):
        addressing.check_address(net, A("10.0.0.7"), [A("10.0.0.7")])
    assert addressing.choose_address(net, [A("10.0.0.2")], A("10.0.0.9")) == A("10.0.0.9")


def test_lowest_free_in_a_huge_block_is_cheap() -> None:
    net = N("10.0.0.0/8")
    taken = [A(int(net.network_address) + 2 + i) for i in range(5000)]
    assert addressing.lowest_free(net, taken) == A(int(net.network_address) + 5002)
    assert addressing.free_count(net, taken) == 2**24 - 3 - 5000


# ---- properties --------------------------------------------------------------------------------------------


@st.composite
def subnets(draw: st.DrawFn, max_size: int = 1024) -> IPv4Network:
    """Blocks from /29 up to /22 (so that filling one up stays fast), anywhere in 10.0.0.0/8."""
    prefix = draw(st.integers(min_value=max(32 - max_size.bit_length() + 1, 8), max_value=29))
    base = draw(st.integers(min_value=0, max_value=2**24 - 1)) + (10 << 24)
    return N((base, prefix), strict=False)


@st.composite
def subnet_and_taken(draw: st.DrawFn) -> tuple[IPv4Network, set[IPv4Address]]:
    net = draw(subnets())
    first, last = int(net.network_address), int(net.broadcast_address)
    # any addresses of the block (reserved ones included) and a few outside it
    inside = draw(st.sets(st.integers(min_value=first, max_value=last), max_size=64))
    outside = draw(st.sets(st.integers(min_value=0, max_value=2**32 - 1), max_size=4))
    return net, {A(i) for i in inside | outside}


@given(subnet_and_taken())
def test_lowest_free_is_usable_free_and_lowest(case: tuple[IPv4Network, set[IPv4Address]]) -> None:
    net, taken = case
    found = addressing.lowest_free(net, taken)
    usable_free = [a for a in net if addressing.is_usable(net, a) and a not in taken]
    if found is None:
        assert usable_free == []
    else:
        assert found == min(usable_free)
        assert found not in addressing.reserved_addresses(net)


@given(subnet_and_taken())
def test_free_count_matches_enumeration(case: tuple[IPv4Network, set[IPv4Address]]) -> None:
    net, taken = case
    expected = sum(1 for a in net if addressing.is_usable(net, a) and a not in taken)
    assert addressing.free_count(net, taken) == expected


@given(subnets(max_size=64))
def test_allocating_until_full_hands_out_every_usable_address_once(net: IPv4Network) -> None:
    taken: set[IPv4Address] = set()
    while True:
        try:
            address = addressing.choose_address(net, taken)
        except SubnetFull:
            break
        assert address not in taken
        assert addressing.is_usable(net, address)
        taken.add(address)
    assert len(taken) == addressing.usable_count(net)
    assert taken.isdisjoint(addressing.reserved_addresses(net))


@given(subnets(), st.integers(min_value=0, max_value=2**32 - 1))
def test_choose_given_address_accepts_exactly_the_usable_free_ones(net: IPv4Network, raw: int) -> None:
    address = A(raw)
    if addressing.is_usable(net, address):
        assert addressing.choose_address(net, set(), address) == address
        with pytest.raises(AddressInUse):
            addressing.choose_address(net, {address}, address)
    else:
        with pytest.raises((AddressNotInSubnet, AddressReserved)):
            addressing.choose_address(net, set(), address)


@given(subnets(), subnets())
def test_overlap_is_symmetric_and_agrees_with_containment(a: IPv4Network, b: IPv4Network) -> None:
    ab = addressing.find_overlap(a, [("b", b)]) is not None
    ba = addressing.find_overlap(b, [("a", a)]) is not None
    assert ab == ba
    # two CIDR blocks overlap exactly when one contains the other
    assert ab == (a.subnet_of(b) or b.subnet_of(a))
