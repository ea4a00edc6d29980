"""IPv4 addresses and CIDR blocks as the API spells them: read exactly, or refused saying what is wrong. Pure.

The API takes dotted-quad text only, `10.0.0.5` and `10.0.0.0/16`: four decimal octets 0–255 without leading
zeros (some tools read `010` as octal), a decimal prefix length 0–32, no spaces, no netmask spelling, no
integers. A refusal names the first thing wrong: a missing or extra octet, an octet out of range, IPv6, a
netmask, host bits set. The input is repeated in a message only when it is short and made of the characters
of an address, so no arbitrary text is echoed back to a client or into a log.

Whether a block is acceptable as a VPC or subnet (its size, its range) is addressing.check_block's to say.
"""

from __future__ import annotations

import re
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

BLOCK_EXAMPLE = "10.0.0.0/16"
ADDRESS_EXAMPLE = "10.0.0.5"

_ECHOABLE = re.compile(r"[0-9A-Fa-f.:/]{1,43}")  # the longest IPv6 block is 43 characters
_DIGITS = re.compile(r"[0-9]+")
_SHOWN_DIGITS = 5  # a longer run of digits is cut short in a message


def _shown(text: str) -> str:
    """The text itself when it is safe and short enough to repeat, else `the value`."""
    return text if _ECHOABLE.fullmatch(text) else "the value"


def _number(digits: str) -> tuple[str, int]:
    """(as shown, value) of a run of ASCII digits; a value too long for any field is counted as 10**6."""
    shown = digits if len(digits) <= _SHOWN_DIGITS else f"{digits[:_SHOWN_DIGITS]}…"
    significant = digits.lstrip("0") or "0"
    return shown, int(significant) if len(significant) <= 6 else 10**6


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _text(value: object, noun: str, example: str) -> str:
    """The value as a non-empty string without spaces, or a ValueError saying why it is not one."""
    if not isinstance(value, str):
        raise ValueError(f"an IPv4 {noun} must be a string like {example}, not {_json_kind(value)}")
    if not value:
        raise ValueError(f"an IPv4 {noun} is required, e.g. {example}; got an empty string")
    if any(ch.isspace() for ch in value):
        raise ValueError(f"an IPv4 {noun} must not contain spaces or line breaks (e.g. {example})")
    return value


def _ipv6(text: str) -> IPv6Address | IPv6Network | None:
    if ":" not in text:
        return None
    try:
        return IPv6Address(text)
    except ValueError:
        pass
    try:
        return IPv6Network(text, strict=False)
    except ValueError:
        return None


def _dotted_quad(text: str, whole: str, noun: str, example: str) -> IPv4Address:
    """`text` (part of `whole`, as shown) as four decimal octets 0–255 without leading zeros, or ValueError."""
    octets = text.split(".")
    if not all(_DIGITS.fullmatch(octet) for octet in octets):
        if all(_DIGITS.fullmatch(octet) or not octet for octet in octets):
            raise ValueError(f"{whole} has an empty octet (an IPv4 {noun} is written like {example})")
        raise ValueError(
            f"{whole} is not an IPv4 {noun}: expected four decimal octets 0–255 separated by dots, like {example}"
        )
    if len(octets) != 4:
        raise ValueError(f"{whole} has {len(octets)} octets; an IPv4 address has 4 (like {example})")
    values = []
    for octet in octets:
        shown, value = _number(octet)
        if value > 255:
            raise ValueError(f"octet {shown} of {whole} is out of range 0–255")
        if len(octet) > 1 and octet.startswith("0"):
            raise ValueError(
                f"octet {shown} of {whole} has a leading zero (some tools read it as octal): write {value}"
            )
        values.append(value)
    return IPv4Address(bytes(values))


def read_address(value: object) -> IPv4Address:
    """An IPv4 host address written as `a.b.c.d` (or one already parsed, from Python callers); ValueError saying
    what is wrong otherwise."""
    if isinstance(value, IPv4Address):
        return value
    text = _text(value, "address", ADDRESS_EXAMPLE)
    whole = _shown(text)
    v6 = _ipv6(text)
    if isinstance(v6, IPv6Address):
        raise ValueError(f"{_shown(str(v6))} is an IPv6 address: IPv6 is not supported yet (IPv4 only)")
    if v6 is not None:
        raise ValueError(f"{_shown(str(v6))} is an IPv6 block: IPv6 is not supported yet (IPv4 only)")
    if "/" in text:
        raise ValueError(f"{whole} is a CIDR block: give the address alone, without its /prefix length")
    return _dotted_quad(text, whole, "address", ADDRESS_EXAMPLE)


def _prefix_length(prefix: str, whole: str) -> int:
    if not prefix:
        raise ValueError(f"{whole} has no prefix length after the '/' (a block is written like {BLOCK_EXAMPLE})")
    if not _DIGITS.fullmatch(prefix):
        try:
            bits = IPv4Network(f"0.0.0.0/{prefix}").prefixlen if "." in prefix else None
        except ValueError:
            bits = None
        if bits is not None:
            raise ValueError(f"{whole} has a netmask where the prefix length goes: write /{bits}")
        raise ValueError(
            f"{whole} has a prefix length that is not a number of bits from 0 to 32 (a block is written like "
            f"{BLOCK_EXAMPLE})"
        )
    shown, value = _number(prefix)
    if value > 32:
        raise ValueError(f"prefix length /{shown} of {whole} is out of range: IPv4 has /0 to /32")
    if len(prefix) > 1 and prefix.startswith("0"):
        raise ValueError(f"prefix length /{shown} of {whole} has a leading zero: write /{value}")
    return value


def read_block(value: object) -> IPv4Network:
    """An IPv4 CIDR block written as `a.b.c.d/len` with its host bits zero (or one already parsed, from Python
    callers); ValueError saying what is wrong otherwise."""
    if isinstance(value, IPv4Network):
        return value
    text = _text(value, "CIDR block", BLOCK_EXAMPLE)
    whole = _shown(text)
    v6 = _ipv6(text)
    if v6 is not None:
        kind = "address" if isinstance(v6, IPv6Address) else "block"
        raise ValueError(f"{_shown(str(v6))} is an IPv6 {kind}: IPv6 is not supported yet (IPv4 only)")
    address_text, slash, prefix = text.partition("/")
    if not slash:
        address = _dotted_quad(text, whole, "CIDR block", BLOCK_EXAMPLE)
        raise ValueError(f"{address} is an address, not a block: add its prefix length, e.g. {address}/24")
    if "/" in prefix:
        raise ValueError(f"{whole} has more than one '/' (a block is written like {BLOCK_EXAMPLE})")
    address = _dotted_quad(address_text, whole, "CIDR block", BLOCK_EXAMPLE)
    prefixlen = _prefix_length(prefix, whole)
    block = IPv4Network((address, prefixlen), strict=False)
    if block.network_address != address:
        raise ValueError(f"{address}/{prefixlen} has host bits set: the block is {block}")
    return block
