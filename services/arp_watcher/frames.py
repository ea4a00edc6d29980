"""Parse Ethernet frames carrying ARP for Ethernet/IPv4 (RFC 826), with optional VLAN tags. Pure: no I/O.

A frame reaches us in one of two shapes:

* tags still in the frame (802.1Q 0x8100, 802.1ad 0x88a8, the old QinQ 0x9100) — some drivers keep them;
* tag already stripped by the kernel (VLAN offload on veth, bridges and most NICs) — the VLAN id then only
  exists in the PACKET_AUXDATA ancillary data, which the capture adapter passes in as `aux_vlan`.

`parse_frame` either returns an `ArpFrame` or raises a `FrameError`: `NotArp` for a well-formed frame of another
protocol, `MalformedFrame` (with a reason from a small fixed set) for anything else. It raises nothing else, for
any input.
"""

from __future__ import annotations

import struct
from typing import Final, Literal, NamedTuple, get_args

ETH_P_ARP: Final = 0x0806
ETH_P_IP: Final = 0x0800
# Tag protocol identifiers: 802.1Q C-tag, 802.1ad S-tag, and the pre-standard QinQ value some switches use.
VLAN_TPIDS: Final = frozenset({0x8100, 0x88A8, 0x9100})
MAX_VLAN_TAGS: Final = 4

ARP_REQUEST: Final = 1
ARP_REPLY: Final = 2
ARP_HTYPE_ETHERNET: Final = 1

ETH_HEADER_LEN: Final = 14
VLAN_TAG_LEN: Final = 4
ARP_ETH_IPV4_LEN: Final = 28

MalformedReason = Literal[
    "truncated_ethernet",
    "truncated_vlan_tag",
    "too_many_vlan_tags",
    "truncated_arp",
    "bad_htype",
    "bad_ptype",
    "bad_hlen",
    "bad_plen",
    "not_bytes",
]
MALFORMED_REASONS: Final[tuple[MalformedReason, ...]] = get_args(MalformedReason)

# htype, ptype, hlen, plen, oper, sha, spa, tha, tpa — the 28 bytes of ARP for Ethernet/IPv4.
_ARP = struct.Struct("!HHBBH6sI6sI")


class FrameError(Exception):
    """Base of the only exceptions `parse_frame` raises."""


class MalformedFrame(FrameError):
    """The bytes are not a well-formed Ethernet/IPv4 ARP frame; `reason` is one of MALFORMED_REASONS."""

    def __init__(self, reason: MalformedReason) -> None:
        super().__init__(reason)
        self.reason: MalformedReason = reason


class NotArp(FrameError):
    """A well-formed Ethernet frame of another protocol (or an 802.3 length field)."""

    def __init__(self, ethertype: int) -> None:
        super().__init__(f"ethertype 0x{ethertype:04x} is not ARP")
        self.ethertype = ethertype


class ArpFrame(NamedTuple):
    """An ARP packet for Ethernet/IPv4 and the Ethernet header it came in. Addresses are raw: MACs as 6 bytes,
    IPv4 addresses as integers (host order), so that parsing stays cheap; `claims` formats them."""

    eth_dst: bytes
    eth_src: bytes
    # VLAN ids, outermost first: the one the kernel stripped (auxdata), then the tags found in the frame.
    vlans: tuple[int, ...]
    oper: int
    sender_mac: bytes
    sender_ip: int
    target_mac: bytes
    target_ip: int

    @property
    def vlan(self) -> int | None:
        """The VLAN of the segment the ARP packet belongs to: the innermost tag, or None when untagged."""
        return self.vlans[-1] if self.vlans else None


def parse_frame(data: bytes, aux_vlan: int | None = None) -> ArpFrame:
    """Parse one Ethernet frame (starting at the destination MAC; trailing padding is ignored).

    `aux_vlan` is the VLAN id the kernel stripped from the frame (PACKET_AUXDATA), if any.
    """
    if not isinstance(data, bytes):
        raise MalformedFrame("not_bytes")
    size = len(data)
    if size < ETH_HEADER_LEN:
        raise MalformedFrame("truncated_ethernet")
    ethertype = (data[12] << 8) | data[13]
    offset = ETH_HEADER_LEN
    vlans: tuple[int, ...] = () if aux_vlan is None else (aux_vlan & 0x0FFF,)
    if ethertype in VLAN_TPIDS:
        tags: list[int] = list(vlans)
        in_frame = 0
        while ethertype in VLAN_TPIDS:
            if in_frame == MAX_VLAN_TAGS:
                raise MalformedFrame("too_many_vlan_tags")
            if size < offset + VLAN_TAG_LEN:
                raise MalformedFrame("truncated_vlan_tag")
            tags.append(((data[offset] << 8) | data[offset + 1]) & 0x0FFF)
            ethertype = (data[offset + 2] << 8) | data[offset + 3]
            offset += VLAN_TAG_LEN
            in_frame += 1
        vlans = tuple(tags)
    if ethertype != ETH_P_ARP:
        raise NotArp(ethertype)
    if size < offset + ARP_ETH_IPV4_LEN:
        raise MalformedFrame("truncated_arp")
    htype, ptype, hlen, plen, oper, sha, spa, tha, tpa = _ARP.unpack_from(data, offset)
    if htype != ARP_HTYPE_ETHERNET:
        raise MalformedFrame("bad_htype")
    if ptype != ETH_P_IP:
        raise MalformedFrame("bad_ptype")
    if hlen != 6:
        raise MalformedFrame("bad_hlen")
    if plen != 4:
        raise MalformedFrame("bad_plen")
    return ArpFrame(data[0:6], data[6:12], vlans, oper, sha, spa, tha, tpa)
