"""Reading IPv4 addresses and CIDR blocks as the API spells them: each refusal says what is wrong."""

from __future__ import annotations

import re
from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.allocator.domain.notation import read_address, read_block
from services.allocator.schemas import CIDR_PATTERN


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10.0.300.0/24", "octet 300 of 10.0.300.0/24 is out of range 0–255"),
        ("2001:db8::/32", "2001:db8::/32 is an IPv6 block: IPv6 is not supported yet (IPv4 only)"),
        ("fe80::1", "fe80::1 is an IPv6 address: IPv6 is not supported yet (IPv4 only)"),
        ("10.0.0.1/16", "10.0.0.1/16 has host bits set: the block is 10.0.0.0/16"),
        ("10.0.0.0/33", "prefix length /33 of 10.0.0.0/33 is out of range: IPv4 has /0 to /32"),
        ("10.0.0.0/016", "prefix length /016 of 10.0.0.0/016 has a leading zero: write /16"),
        ("10.0.0.0/255.255.0.0", "10.0.0.0/255.255.0.0 has a netmask where the prefix length goes: write /16"),
        (
            "10.0.0.0/255.0.255.0",
            "10.0.0.0/255.0.255.0 has a prefix length that is not a number of bits from 0 to",
        ),
        ("10.0.0.0/x", "the value has a prefix length that is not a number of bits from 0 to 32"),
        ("10.0.0.0/", "10.0.0.0/ has no prefix length after the '/'"),
        ("10.0.0.0/16/8", "10.0.0.0/16/8 has more than one '/'"),
        ("10.0.0.0", "10.0.0.0 is an address, not a block: add its prefix length, e.g. 10.0.0.0/24"),
        ("10.0.0/16", "10.0.0/16 has 3 octets; an IPv4 address has 4"),
        ("1.2.3.4.5/8", "1.2.3.4.5/8 has 5 octets; an IPv4 address has 4"),
        ("10..0.0/16", "10..0.0/16 has an empty octet"),
        ("010.0.0.0/16", "octet 010 of 010.0.0.0/16 has a leading zero (some tools read it as octal): write 10"),
        ("banana", "the value is not an IPv4 CIDR block: expected four decimal octets 0–255"),
        ("", "an IPv4 CIDR block is required, e.g. 10.0.0.0/16; got an empty string"),
        (" 10.0.0.0/16", "an IPv4 CIDR block must not contain spaces or line breaks"),
        ("10.0.0.0/16\n", "an IPv4 CIDR block must not contain spaces or line breaks"),
        ("10.0.0.99999999999/16", "octet 99999… of 10.0.0.99999999999/16 is out of range 0–255"),
        ("10.0.0." + "9" * 5000 + "/16", "octet 99999… of the value is out of range 0–255"),  # no int() limit hit
    ],
)
def test_a_refused_block_says_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        read_block(text)


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        (167772160, "a number"),
        (None, "null"),
        (True, "a boolean"),
        (["10.0.0.0/16"], "an array"),
        ({}, "an object"),
    ],
)
def test_only_text_is_a_block_or_an_address(value: object, kind: str) -> None:
    with pytest.raises(ValueError, match=f"^an IPv4 CIDR block must be a string like 10.0.0.0/16, not {kind}$"):
        read_block(value)
    with pytest.raises(ValueError, match=f"^an IPv4 address must be a string like 10.0.0.5, not {kind}$"):
        read_address(value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10.0.0.300", "octet 300 of 10.0.0.300 is out of range 0–255"),
        ("2001:db8::1", "2001:db8::1 is an IPv6 address: IPv6 is not supported yet (IPv4 only)"),
        ("2001:db8::/64", "2001:db8::/64 is an IPv6 block: IPv6 is not supported yet (IPv4 only)"),
        ("10.0.0.5/24", "10.0.0.5/24 is a CIDR block: give the address alone, without its /prefix length"),
        ("10.0.0", "10.0.0 has 3 octets; an IPv4 address has 4"),
        ("10.0.0.05", "octet 05 of 10.0.0.05 has a leading zero (some tools read it as octal): write 5"),
        ("not-an-ip", "the value is not an IPv4 address: expected four decimal octets 0–255 separated by dots"),
        ("fe80::1%\x1b[31meth0", "the value is an IPv6 address"),  # a scope id is not echoed back
        ("10.0.0.5 ", "an IPv4 address must not contain spaces or line breaks"),
    ],
)
def test_a_refused_address_says_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        read_address(text)


def test_nothing_but_address_characters_is_echoed() -> None:
    for text in ("<script>/24", "10.0.0.0/16;DROP", "x" * 100):
        with pytest.raises(ValueError, match=r"^the value ") as refused:
            read_block(text)
        assert text not in str(refused.value)


def test_parsed_values_pass_through() -> None:
    assert read_block(IPv4Network("10.0.0.0/16")) == IPv4Network("10.0.0.0/16")
    assert read_address(IPv4Address("10.0.0.5")) == IPv4Address("10.0.0.5")


octet = st.integers(0, 255).map(str) | st.sampled_from(["00", "010", "256", "300", "1000", ""])
prefix = st.integers(0, 40).map(str) | st.sampled_from(["", "08", "255.255.0.0", "x"])
dotted = st.lists(octet, min_size=3, max_size=5).map(".".join)
blocks = st.tuples(dotted, prefix).map("/".join) | dotted | st.text(max_size=20)


@given(blocks)
def test_read_block_accepts_exactly_the_documented_shape(text: str) -> None:
    """The OpenAPI pattern with host bits zero is the rule: read_block accepts all of it and nothing else."""
    shaped = re.fullmatch(CIDR_PATTERN, text) is not None
    if shaped and IPv4Network(text, strict=False).with_prefixlen == text:
        assert read_block(text) == IPv4Network(text)
    elif shaped:
        with pytest.raises(ValueError, match="has host bits set"):
            read_block(text)
    else:
        with pytest.raises(ValueError, match=r"\S"):
            read_block(text)


@given(st.lists(octet, min_size=3, max_size=5).map(".".join) | st.text(max_size=20))
def test_read_address_agrees_with_ipaddress(text: str) -> None:
    try:
        expected: IPv4Address | None = IPv4Address(text)
    except ValueError:
        expected = None
    if expected is not None and text.isascii() and text.strip() == text:
        assert read_address(text) == expected
    else:
        with pytest.raises(ValueError, match=r"\S"):
            read_address(text)
