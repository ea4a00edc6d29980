"""Traffic to a HAVIP and where it lands: a client sending UDP datagrams at a fixed interval, servers answering.

Run as a script inside a lab namespace (``ip netns exec NS python udp_probe.py …``); it imports only the standard
library, so it needs no package path. Every line it prints is one JSON object (times in ns since the epoch,
CLOCK_REALTIME, comparable with the kernel capture times of the watcher):

* ``send --address A --port P --interval S`` (the client): datagram ``n`` goes to A:P every S seconds, logged
  as ``{"event": "sent", "seq": n, "before": ns, "after": ns}`` (around ``sendto``: the kernel picked the
  destination MAC in between); every answer as ``{"event": "answer", "seq": n, "server": NAME, "at": ns}``.
* ``serve --name NAME --address A --port P --iface IF`` (a CVM): answers each datagram that reaches A:P with its
  own name (from A, whether or not A is on the host yet: ``IP_FREEBIND``); and logs every frame addressed to this
  host's MAC carrying a datagram for A:P as ``{"event": "arrival", "seq": n, "at": ns}`` with the kernel's
  receive time — seen on a packet socket, so a datagram that reaches the host while A is not configured (and
  the kernel drops it) is still counted as having reached it.

UDP rather than ping or HTTP: one datagram each way, no connection state that breaks on failover, and the
fixed interval is never stretched by retransmission back-off. Ends on SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import select
import signal
import socket
import struct
import sys
import time
from typing import Any

IP_FREEBIND = 15  # Linux <linux/in.h>; not in Python 3.11's socket module
SO_TIMESTAMPNS = 35
ETH_P_IP = 0x0800
PACKET_HOST = 0
MAGIC = b"havip-probe"


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def request(seq: int) -> bytes:
    return MAGIC + b" " + str(seq).encode()


def parse_request(payload: bytes) -> int | None:
    magic, _, seq = payload.partition(b" ")
    if magic != MAGIC or not seq.isdigit():
        return None
    return int(seq)


def stop_on_sigterm() -> None:
    def stop(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)


def send(address: str, port: int, interval: float) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    emit({"event": "ready"})
    seq = 0
    next_send = time.monotonic()
    while True:
        now = time.monotonic()
        if now >= next_send:
            before = time.time_ns()
            try:
                sock.sendto(request(seq), (address, port))
            except OSError as exc:  # e.g. the neighbour entry failed: the datagram is lost, the rhythm goes on
                emit({"event": "send_error", "seq": seq, "error": exc.strerror})
            emit({"event": "sent", "seq": seq, "before": before, "after": time.time_ns()})
            seq += 1
            next_send = max(next_send + interval, now)  # a stalled process skips slots rather than bursting
            continue
        ready, _, _ = select.select([sock], [], [], next_send - now)
        while ready:
            try:
                payload, source = sock.recvfrom(2048)
            except BlockingIOError:
                break
            server, _, number = payload.decode(errors="replace").partition(" ")
            if source == (address, port) and number.isdigit():
                emit({"event": "answer", "seq": int(number), "server": server, "at": time.time_ns()})


def serve(name: str, address: str, port: int, iface: str) -> None:
    answering = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    answering.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)  # bind to the HAVIP before this host holds it
    answering.bind((address, port))
    watching = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP))
    watching.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    watching.bind((iface, ETH_P_IP))
    wanted = socket.inet_aton(address)
    emit({"event": "ready"})
    while True:
        ready, _, _ = select.select([answering, watching], [], [])
        if answering in ready:
            payload, source = answering.recvfrom(2048)
            seq = parse_request(payload)
            if seq is not None:
                try:
                    answering.sendto(f"{name} {seq}".encode(), source)
                    emit({"event": "answered", "seq": seq})
                except OSError as exc:  # the address left this host between the datagram and the answer
                    emit({"event": "answer_error", "seq": seq, "error": exc.strerror})
        if watching in ready:
            packet, ancillary, _, where = watching.recvmsg(2048, socket.CMSG_SPACE(16))
            if where[2] != PACKET_HOST:  # flooded to this port for another MAC, or our own outgoing frame
                continue
            if len(packet) < 28 or packet[9] != socket.IPPROTO_UDP or packet[16:20] != wanted:
                continue
            ihl = (packet[0] & 0x0F) * 4
            (dport,) = struct.unpack("!H", packet[ihl + 2 : ihl + 4])
            seq = parse_request(packet[ihl + 8 :])
            if dport != port or seq is None:
                continue
            at = time.time_ns()
            for level, kind, data in ancillary:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    seconds, nanoseconds = struct.unpack("qq", data[:16])
                    at = seconds * 1_000_000_000 + nanoseconds
            emit({"event": "arrival", "seq": seq, "at": at})


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    sender = commands.add_parser("send")
    sender.add_argument("--address", required=True)
    sender.add_argument("--port", type=int, required=True)
    sender.add_argument("--interval", type=float, required=True)
    server = commands.add_parser("serve")
    server.add_argument("--name", required=True)
    server.add_argument("--address", required=True)
    server.add_argument("--port", type=int, required=True)
    server.add_argument("--iface", required=True)
    args = parser.parse_args(argv)
    stop_on_sigterm()
    if args.command == "send":
        if args.interval <= 0:
            parser.error("--interval must be positive")
        send(args.address, args.port, args.interval)
    else:
        serve(args.name, args.address, args.port, args.iface)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
