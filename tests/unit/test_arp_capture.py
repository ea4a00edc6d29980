"""The capture without a network: the BPF program (run by a small classic-BPF interpreter), the socket option
structures, the recvmsg reader's loop driven by a fake socket, and the capture thread's life cycle."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Sequence
from ipaddress import IPv4Address
from typing import Any, cast

import pytest

from services.arp_watcher.capture import CaptureStats
from services.arp_watcher.capture_thread import CaptureThread
from services.arp_watcher.claims import Claim
from services.arp_watcher.frames import ARP_REQUEST
from services.arp_watcher.packet_socket import (
    ARP_BPF_FILTER,
    PACKET_STATISTICS,
    SOL_PACKET,
    TP_STATUS_VLAN_VALID,
    bpf_program,
    netns_path,
)
from services.arp_watcher.socket_reader import AUXDATA, PACKET_AUXDATA, SO_TIMESTAMPNS, TIMESPEC, SocketReader
from tests.lab.arp_frames import build_arp_frame
from tests.waiting import eventually_sync

MAC = bytes.fromhex("02000000000a")
VIP = int(IPv4Address("192.0.2.10"))
ACCEPT = 0x40000


def run_bpf(program: Sequence[tuple[int, int, int, int]], packet: bytes) -> int:
    """Enough of classic BPF for this program: ldh [k], jeq #k, ret #k (loads past the end drop the packet,
    as in the kernel)."""
    pc = 0
    acc = 0
    while True:
        code, jt, jf, k = program[pc]
        if code == 0x28:  # BPF_LD | BPF_H | BPF_ABS
            if k + 2 > len(packet):
                return 0
            acc = struct.unpack_from("!H", packet, k)[0]
            pc += 1
        elif code == 0x15:  # BPF_JMP | BPF_JEQ | BPF_K
            pc += 1 + (jt if acc == k else jf)
        elif code == 0x06:  # BPF_RET | BPF_K
            return k
        else:
            raise AssertionError(f"unexpected BPF opcode 0x{code:x}")


def garp(vlan_tags: tuple[tuple[int, int], ...] = ()) -> bytes:
    return build_arp_frame(oper=ARP_REQUEST, sender_mac=MAC, sender_ip=VIP, target_ip=VIP, vlan_tags=vlan_tags)


def ethernet(ethertype: int, tags: tuple[int, ...] = ()) -> bytes:
    header = b"\xff" * 6 + MAC + b"".join(struct.pack("!HH", tpid, 7) for tpid in tags)
    return header + struct.pack("!H", ethertype) + b"\x00" * 46


@pytest.mark.parametrize(
    "packet",
    [
        garp(),
        garp(((0x8100, 100),)),
        garp(((0x88A8, 100),)),
        garp(((0x9100, 100),)),
        garp(((0x88A8, 10), (0x8100, 20))),
        garp(((0x8100, 10), (0x8100, 20))),
    ],
)
def test_bpf_accepts_arp_untagged_and_under_one_or_two_tags(packet: bytes) -> None:
    assert run_bpf(ARP_BPF_FILTER, packet) == ACCEPT


@pytest.mark.parametrize(
    "packet",
    [
        ethernet(0x0800),
        ethernet(0x86DD),
        ethernet(0x8035),  # RARP
        ethernet(0x0800, (0x8100,)),
        ethernet(0x0800, (0x88A8, 0x8100)),
        ethernet(0x0806, (0x88A8, 0x8100, 0x8100)),  # three tags: not worth the instructions
        ethernet(0x0026)[:60],  # 802.3 length field
        b"\xff" * 13,  # shorter than an Ethernet header
    ],
)
def test_bpf_drops_everything_else(packet: bytes) -> None:
    assert run_bpf(ARP_BPF_FILTER, packet) == 0


def test_bpf_jumps_stay_inside_the_program() -> None:
    for pc, (code, jt, jf, _k) in enumerate(ARP_BPF_FILTER):
        if code == 0x15:
            assert pc + 1 + jt < len(ARP_BPF_FILTER)
            assert pc + 1 + jf < len(ARP_BPF_FILTER)
    assert ARP_BPF_FILTER[-1] == (0x06, 0, 0, 0)


def test_sock_fprog_layout() -> None:
    fprog, code = bpf_program(ARP_BPF_FILTER)
    assert len(fprog) == 16  # unsigned short, padding, pointer (x86-64 / arm64)
    assert struct.unpack_from("H", fprog)[0] == len(ARP_BPF_FILTER)
    assert len(code.raw) == 8 * len(ARP_BPF_FILTER) + 1  # create_string_buffer adds a NUL


def test_netns_path() -> None:
    assert netns_path("lab-a") == "/var/run/netns/lab-a"
    assert netns_path("/proc/1/ns/net") == "/proc/1/ns/net"


# ---- the recvmsg reader with a fake socket ---------------------------------------------------------------------

Message = tuple[bytes, list[tuple[int, int, bytes]], int, Any]


def ancillary(captured_at: int | None, vlan_tci: int | None = None) -> list[tuple[int, int, bytes]]:
    anc: list[tuple[int, int, bytes]] = []
    if captured_at is not None:
        anc.append((socket.SOL_SOCKET, SO_TIMESTAMPNS, TIMESPEC.pack(*divmod(captured_at, 1_000_000_000))))
    status = TP_STATUS_VLAN_VALID if vlan_tci is not None else 0
    anc.append((SOL_PACKET, PACKET_AUXDATA, AUXDATA.pack(status, 60, 60, 0, 14, vlan_tci or 0, 0x8100)))
    return anc


class FakeSocket:
    """Serves queued messages; an empty queue looks like an expired SO_RCVTIMEO (blocking) or EAGAIN."""

    def __init__(self) -> None:
        self.queue: list[Message] = []
        self.lock = threading.Lock()
        self.kernel = (0, 0)
        self.closed = False

    def feed(self, data: bytes, anc: list[tuple[int, int, bytes]]) -> None:
        with self.lock:
            self.queue.append((data, anc, 0, ("eth0", 3, 1, 1, MAC)))

    def recvmsg(self, bufsize: int, ancbufsize: int, flags: int = 0) -> Message:
        with self.lock:
            if self.queue:
                return self.queue.pop(0)
        if flags & socket.MSG_DONTWAIT:
            raise BlockingIOError(11, "EAGAIN")
        time.sleep(0.005)  # the receive timeout a blocking socket spends before it expires
        raise BlockingIOError(11, "EAGAIN")  # what SO_RCVTIMEO expiry looks like

    def getsockopt(self, level: int, option: int, size: int) -> bytes:
        assert (level, option, size) == (SOL_PACKET, PACKET_STATISTICS, 8)
        packets, drops = self.kernel
        self.kernel = (0, 0)  # reset on read, as the kernel does
        return struct.pack("II", packets, drops)

    def fileno(self) -> int:
        return -1 if self.closed else 99

    def close(self) -> None:
        self.closed = True


def test_capture_loop_classifies_counts_and_hands_off_batches() -> None:
    fake = FakeSocket()
    batches: list[list[Claim]] = []
    capture = CaptureThread(
        SocketReader(cast(socket.socket, fake)), batches.append, max_batch=3, stats_interval_s=0.01
    )
    t0 = 1_700_000_000_000_000_001
    fake.feed(garp(), ancillary(t0))
    fake.feed(garp(), ancillary(t0 + 1, vlan_tci=0x2064))  # PCP 1, VID 100
    fake.feed(build_arp_frame(oper=ARP_REQUEST, sender_mac=MAC, sender_ip=0, target_ip=VIP), ancillary(t0 + 2))
    fake.feed(garp()[:30], ancillary(t0 + 3))  # truncated ARP
    fake.feed(ethernet(0x0800), ancillary(t0 + 4))
    fake.feed(garp(((0x8100, 7),)), ancillary(None))  # no timestamp: falls back to the clock
    fake.kernel = (6, 0)
    capture.start()
    try:
        eventually_sync(
            lambda: capture.stats.frames == 6 and capture.stats.kernel_packets == 6,
            what="six frames read and six kernel packets counted",
        )
    finally:
        capture.stop()
    assert fake.closed
    assert not capture.running
    assert capture.error is None
    claims = [c for batch in batches for c in batch]
    assert [len(b) for b in batches] == [2, 1]  # at most max_batch frames per hand-off
    assert [(c.kind, c.vlan, c.captured_at) for c in claims[:2]] == [
        ("garp_request", None, t0),
        ("garp_request", 100, t0 + 1),
    ]
    assert claims[2].vlan == 7
    assert abs(claims[2].captured_at - time.time_ns()) < 10 * 1_000_000_000
    stats = capture.stats
    assert (stats.claims, stats.not_claims, stats.not_arp) == (3, 1, 1)
    assert stats.malformed["truncated_arp"] == 1
    assert (stats.kernel_packets, stats.kernel_drops) == (6, 0)


def test_capture_thread_error_is_reported() -> None:
    class Broken(FakeSocket):
        def recvmsg(self, bufsize: int, ancbufsize: int, flags: int = 0) -> Message:
            raise OSError(9, "EBADF")

    errors: list[BaseException] = []
    capture = CaptureThread(
        SocketReader(cast(socket.socket, Broken())), lambda batch: None, on_error=errors.append
    )
    capture.start()
    eventually_sync(lambda: not capture.running, what="the capture thread ended by its error")
    capture.stop()
    assert isinstance(capture.error, OSError)
    assert errors == [capture.error]


def test_stats_frames_sums_every_result() -> None:
    stats = CaptureStats()
    stats.claims, stats.not_claims, stats.not_arp = 1, 2, 3
    stats.malformed["bad_hlen"] = 4
    assert stats.frames == 10
