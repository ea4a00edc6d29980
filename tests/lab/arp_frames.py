"""Ethernet/IPv4 ARP frames built byte by byte, for tests, benchmarks and the lab's raw sender (the watcher only
parses frames: services/arp_watcher/frames.py)."""

from __future__ import annotations

import struct

from services.arp_watcher.frames import ARP_HTYPE_ETHERNET, ETH_P_ARP, ETH_P_IP

# htype, ptype, hlen, plen, oper, sha, spa, tha, tpa — the 28 bytes of ARP for Ethernet/IPv4.
_ARP = struct.Struct("!HHBBH6sI6sI")


def build_arp_frame(
    *,
    oper: int,
    sender_mac: bytes,
    sender_ip: int,
    target_ip: int,
    target_mac: bytes = b"\x00" * 6,
    eth_src: bytes | None = None,
    eth_dst: bytes = b"\xff" * 6,
    vlan_tags: tuple[tuple[int, int], ...] = (),
    pad_to: int = 60,
) -> bytes:
    """An Ethernet/IPv4 ARP frame.

    `vlan_tags` are (tpid, vlan id) pairs, outermost first. The frame is padded to `pad_to` bytes (60 = the
    Ethernet minimum without FCS).
    """
    header = eth_dst + (sender_mac if eth_src is None else eth_src)
    for tpid, vid in vlan_tags:
        header += struct.pack("!HH", tpid, vid & 0x0FFF)
    header += struct.pack("!H", ETH_P_ARP)
    arp = _ARP.pack(ARP_HTYPE_ETHERNET, ETH_P_IP, 6, 4, oper, sender_mac, sender_ip, target_mac, target_ip)
    frame = header + arp
    return frame + b"\x00" * max(0, pad_to - len(frame))
