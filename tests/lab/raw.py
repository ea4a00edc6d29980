"""Frames put on a lab wire as they are, from a lab server's namespace: gratuitous ARPs for any lab address at
any rate, without a process per frame (benchmarks and fault tests)."""

from __future__ import annotations

import socket
from ipaddress import IPv4Address

from services.arp_watcher.frames import ARP_REQUEST
from services.arp_watcher.packet_socket import network_namespace
from tests.lab.arp_frames import build_arp_frame
from tests.lab.names import check_lab_address


class RawSender:
    """An AF_PACKET socket opened inside a lab server's namespace: frames go out of its eth0 as they are."""

    def __init__(self, netns: str, mac: str) -> None:
        self.mac = bytes.fromhex(mac.replace(":", ""))
        with network_namespace(netns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            self.sock.bind(("eth0", 0))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 * 1024 * 1024)

    def garp(self, address: IPv4Address | str) -> bytes:
        """keepalived's gratuitous ARP for a lab address: a broadcast request, sender IP == target IP."""
        ip = int(check_lab_address(address))
        return build_arp_frame(oper=ARP_REQUEST, sender_mac=self.mac, sender_ip=ip, target_ip=ip)

    def send(self, frames: list[bytes]) -> None:
        send = self.sock.send
        for frame in frames:
            send(frame)

    def close(self) -> None:
        self.sock.close()
