"""The allocator's pure address arithmetic: examples for the rules, hypothesis for the invariants."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.allocator.domain import addressing
from services.allocator.errors import AddressNotInSubnet, AddressReserved, SubnetNotInVpc, SubnetOverlap

A = IPv4Address
N = IPv4Network


# ---- examples ----------------------------------------------------------------------------------------------


def test_reserved_are_network_gateway_broadcast() -> None:
    net = N("10.0.1.0/24")
    assert addressing.reserved_addresses(net) == {A("10.0.1.0"), A("10.0.1.1"), A("10.0.1.255")}
    assert addressing.gateway(net) == A("10.0.1.1")
    assert addressing.usable_count(net) == 253


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


def test_check_requested_address() -> None:
    net = N("10.0.0.0/24")
    addressing.check_requested_address(net, A("10.0.0.2"))
    addressing.check_requested_address(net, A("10.0.0.254"))
    with pytest.raises(AddressNotInSubnet):
        addressing.check_requested_address(net, A("10.0.1.2"))
    for reserved in ("10.0.0.0", "10.0.0.1", "10.0.0.255"):
        with pytest.raises(AddressReserved):
            addressing.check_requested_address(net, A(reserved))


# ---- properties --------------------------------------------------------------------------------------------


@st.composite
def subnets(draw: st.DrawFn, max_size: int = 1024) -> IPv4Network:
    """Blocks from /29 up to /22 (so that filling one up stays fast), anywhere in 10.0.0.0/8."""
    prefix = draw(st.integers(min_value=max(32 - max_size.bit_length() + 1, 8), max_value=29))
    base = draw(st.integers(min_value=0, max_value=2**24 - 1)) + (10 << 24)
    return N((base, prefix), strict=False)


@given(subnets(), st.integers(min_value=0, max_value=2**32 - 1))
def test_a_requested_address_is_accepted_exactly_when_usable(net: IPv4Network, raw: int) -> None:
    address = A(raw)
    if addressing.is_usable(net, address):
        addressing.check_requested_address(net, address)
        assert addressing.first_usable(net) <= address <= addressing.last_usable(net)
    else:
        with pytest.raises((AddressNotInSubnet, AddressReserved)):
            addressing.check_requested_address(net, address)


@given(subnets(), subnets())
def test_overlap_is_symmetric_and_agrees_with_containment(a: IPv4Network, b: IPv4Network) -> None:
    ab = addressing.find_overlap(a, [("b", b)]) is not None
    ba = addressing.find_overlap(b, [("a", a)]) is not None
    assert ab == ba
    # two CIDR blocks overlap exactly when one contains the other
    assert ab == (a.subnet_of(b) or b.subnet_of(a))
