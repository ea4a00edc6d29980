"""Names and addresses the lab hands out: per-instance prefixes, interface names, MACs, allowed ranges."""

from __future__ import annotations

import ipaddress
import re
import secrets

#: The only ranges lab traffic may use: the RFC 5737 documentation ranges, and the RFC 2544 benchmarking range
#: for the scale benchmarks that need more addresses.
ALLOWED_NETWORKS: tuple[ipaddress.IPv4Network, ...] = (
    ipaddress.IPv4Network("192.0.2.0/24"),
    ipaddress.IPv4Network("198.51.100.0/24"),
    ipaddress.IPv4Network("203.0.113.0/24"),
    ipaddress.IPv4Network("198.18.0.0/15"),
)

IFNAMSIZ = 15  # usable characters of a Linux interface name
PREFIX_MAX = 10  # leaves room for a one-letter role and a three-digit index
_PREFIX_RE = re.compile(rf"^[a-z][a-z0-9]{{1,{PREFIX_MAX - 1}}}$")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,30}$")
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def new_prefix() -> str:
    """A fresh lab prefix: ``hv`` and five random hex digits (e.g. ``hv3fa9c``)."""
    return "hv" + secrets.token_hex(3)[:5]


def check_prefix(prefix: str) -> str:
    if not _PREFIX_RE.fullmatch(prefix):
        raise ValueError(f"lab prefix {prefix!r} must be 2-{PREFIX_MAX} chars of [a-z0-9], starting with a letter")
    return prefix


def check_name(name: str) -> str:
    """A host or namespace label: lowercase letters, digits, '-' and '_'."""
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"lab name {name!r} must match {_NAME_RE.pattern}")
    return name


def ifname(prefix: str, role: str, index: int) -> str:
    """An interface name ``<prefix><role><index>`` that fits Linux's 15-character limit."""
    name = f"{prefix}{role}{index}"
    if len(name) > IFNAMSIZ:
        raise ValueError(f"interface name {name!r} is longer than {IFNAMSIZ} characters")
    return name


def check_lab_address(address: str | ipaddress.IPv4Address) -> ipaddress.IPv4Address:
    """Parse an IPv4 address and refuse anything outside the documentation ranges."""
    ip = ipaddress.IPv4Address(address)
    if not any(ip in net for net in ALLOWED_NETWORKS):
        raise ValueError(f"{ip} is outside the lab's documentation ranges {[str(n) for n in ALLOWED_NETWORKS]}")
    return ip


def check_lab_subnet(subnet: str) -> ipaddress.IPv4Network:
    net = ipaddress.IPv4Network(subnet)
    if not any(net.subnet_of(allowed) for allowed in ALLOWED_NETWORKS):
        raise ValueError(f"subnet {net} is outside the lab's documentation ranges")
    return net


def default_mac(ip: ipaddress.IPv4Address) -> str:
    """The deterministic, locally administered unicast MAC for ``ip``: ``02:00:`` and the four address octets."""
    return "02:00:" + ":".join(f"{octet:02x}" for octet in ip.packed)


def check_mac(mac: str) -> str:
    """Normalise to lowercase ``aa:bb:cc:dd:ee:ff``; refuse multicast (I/G bit) addresses."""
    norm = mac.strip().lower().replace("-", ":")
    if not _MAC_RE.fullmatch(norm):
        raise ValueError(f"{mac!r} is not a MAC address")
    if int(norm[:2], 16) & 1:
        raise ValueError(f"{mac!r} is a multicast MAC; a host needs a unicast one")
    return norm
