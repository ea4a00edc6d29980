"""A minimal ICMP echo ("ping") — the machine has no ping binary.

Run as a script inside a namespace (``ip netns exec NS python icmp.py ADDRESS COUNT TIMEOUT``); it only imports the
standard library so it needs no package path. Exit status 0 when every echo got its reply; prints one round-trip
time in milliseconds per reply.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import sys
import time

ICMP_ECHO_REQUEST = 8
ICMP_ECHO_REPLY = 0


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def echo_request(ident: int, seq: int, payload: bytes) -> bytes:
    header = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, 0, ident, seq)
    csum = checksum(header + payload)
    return struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, csum, ident, seq) + payload


def ping(address: str, count: int, timeout: float) -> list[float]:
    """Send ``count`` echo requests to ``address``; return the round-trip times (s) of the answered ones."""
    ident = os.getpid() & 0xFFFF
    rtts: list[float] = []
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as sock:
        for seq in range(count):
            payload = struct.pack("!d", time.monotonic()) + b"havip-lab"
            start = time.monotonic()
            sock.sendto(echo_request(ident, seq, payload), (address, 0))
            deadline = start + timeout
            while (left := deadline - time.monotonic()) > 0:
                ready, _, _ = select.select([sock], [], [], left)
                if not ready:
                    break
                packet, (source, _) = sock.recvfrom(2048)
                ihl = (packet[0] & 0x0F) * 4
                kind, _, _, rid, rseq = struct.unpack("!BBHHH", packet[ihl : ihl + 8])
                if kind == ICMP_ECHO_REPLY and rid == ident and rseq == seq and source == address:
                    rtts.append(time.monotonic() - start)
                    break
    return rtts


def main(argv: list[str]) -> int:
    address, count, timeout = argv[0], int(argv[1]), float(argv[2])
    rtts = ping(address, count, timeout)
    for rtt in rtts:
        print(f"{rtt * 1000:.3f}")
    return 0 if len(rtts) == count else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
