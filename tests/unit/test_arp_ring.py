"""The TPACKET_V3 ring reader without a network: the kernel structures' layout (linux/if_packet.h), the ring
geometry, reading a block the way the kernel lays it out, and the capture thread over a hand-made ring."""

from __future__ import annotations

import mmap
import socket
import threading
from collections.abc import Iterator, Sequence
from ipaddress import IPv4Address

import pytest

from services.arp_watcher.capture import CaptureStats
from services.arp_watcher.capture_thread import CaptureThread
from services.arp_watcher.claims import Claim
from services.arp_watcher.frames import ARP_REPLY, ARP_REQUEST
from services.arp_watcher.packet_socket import TP_STATUS_VLAN_VALID
from services.arp_watcher.ring import (
    BLOCK_DESC,
    TP_STATUS_KERNEL,
    TP_STATUS_USER,
    TPACKET3_HDR,
    TPACKET_REQ3,
    TPACKET_STATS_V3,
    RingGeometry,
    RingReader,
    block_ready,
    drain_block,
    release_block,
)
from tests.lab.arp_frames import build_arp_frame
from tests.waiting import eventually_sync

MAC = bytes.fromhex("02000000000a")
VIP = int(IPv4Address("192.0.2.10"))
BLOCK = 4096
FIRST_PACKET = 48  # the kernel puts the first frame after the 48-byte block descriptor
MAC_OFFSET = 82  # TPACKET_ALIGN(sizeof tpacket3_hdr) + sizeof(sockaddr_ll) + alignment for the IP header


def garp(address: int = VIP, vlan_tags: tuple[tuple[int, int], ...] = ()) -> bytes:
    return build_arp_frame(
        oper=ARP_REQUEST, sender_mac=MAC, sender_ip=address, target_ip=address, vlan_tags=vlan_tags
    )


Packet = tuple[bytes, int, int | None]  # frame, captured_at (ns), vlan tci from the ring metadata


def write_block(buffer: mmap.mmap, block_offset: int, packets: Sequence[Packet], *, ready: bool = True) -> None:
    """Lay `packets` out as the kernel does in a TPACKET_V3 block and hand the block to user space."""
    offset = FIRST_PACKET
    for i, (frame, captured_at, tci) in enumerate(packets):
        length = (MAC_OFFSET + len(frame) + 15) & ~15
        next_offset = 0 if i == len(packets) - 1 else length
        sec, nsec = divmod(captured_at, 1_000_000_000)
        status = TP_STATUS_USER | (TP_STATUS_VLAN_VALID if tci is not None else 0)
        header = TPACKET3_HDR.pack(
            next_offset, sec, nsec, len(frame), len(frame), status, MAC_OFFSET, MAC_OFFSET + 14, 0, tci or 0,
            0x8100 if tci is not None else 0, 0,
        )  # fmt: skip
        buffer[block_offset + offset : block_offset + offset + len(header)] = header
        start = block_offset + offset + MAC_OFFSET
        buffer[start : start + len(frame)] = frame
        offset += length
    assert offset <= BLOCK
    status = TP_STATUS_USER if ready else TP_STATUS_KERNEL
    buffer[block_offset : block_offset + BLOCK_DESC.size] = BLOCK_DESC.pack(
        3, 0, status, len(packets), FIRST_PACKET, offset, 1
    )


@pytest.fixture
def ring_memory() -> Iterator[mmap.mmap]:
    buffer = mmap.mmap(-1, BLOCK * 4)
    yield buffer
    buffer.close()


# ---- layout -------------------------------------------------------------------------------------------------


def test_structures_match_linux_if_packet_h() -> None:
    assert TPACKET3_HDR.size == 40  # 6 × u32, 2 × u16, hv1 {u32 rxhash, u32 vlan_tci, u16 tpid, u16 pad}
    assert BLOCK_DESC.size == 32  # version, offset_to_priv, block_status … blk_len, then the u64 seq_num
    assert TPACKET_REQ3.size == 28
    assert TPACKET_STATS_V3.size == 12


def test_geometry_request_and_limits() -> None:
    geometry = RingGeometry(block_size=32768, block_count=512, frame_size=2048, retire_timeout_ms=2)
    assert geometry.size == 16 * 1024 * 1024
    assert TPACKET_REQ3.unpack(geometry.request()) == (32768, 512, 2048, 16 * 512, 2, 0, 0)
    for bad in (
        {"block_size": 3 * 4096},  # not a power of two
        {"block_size": 1024},  # less than a page
        {"block_count": 1},
        {"frame_size": 1000},  # not 16-aligned
        {"retire_timeout_ms": 0},
    ):
        with pytest.raises(ValueError):  # noqa: PT011 - the message is for operators
            RingGeometry(**bad)


# ---- one block ----------------------------------------------------------------------------------------------


def test_drain_block_reads_time_vlan_and_classifies(ring_memory: mmap.mmap) -> None:
    t0 = 1_790_000_000_123_456_789
    reply = build_arp_frame(oper=ARP_REPLY, sender_mac=MAC, sender_ip=VIP + 1, target_ip=VIP + 9)
    request = build_arp_frame(oper=ARP_REQUEST, sender_mac=MAC, sender_ip=VIP + 2, target_ip=VIP + 3)
    packets: list[Packet] = [
        (garp(), t0, None),
        (garp(VIP + 5), t0 + 1, 100),  # tag stripped by the kernel: only in the ring's metadata
        (garp(VIP + 6, ((0x8100, 200),)), t0 + 2, None),  # tag left in the frame
        (reply, t0 + 3, None),
        (request, t0 + 4, None),  # an ordinary request: not a claim
        (garp()[:30], t0 + 5, None),  # truncated ARP
        (garp()[:18] + b"\x07" + garp()[19:], t0 + 6, None),  # hlen 7
        (b"\xff" * 12 + b"\x08\x00" + b"\x45" * 46, t0 + 7, None),  # IPv4 (the kernel filter would refuse it)
    ]
    write_block(ring_memory, BLOCK, packets)
    stats = CaptureStats()
    assert block_ready(ring_memory, BLOCK)
    claims = drain_block(ring_memory, BLOCK, stats)
    assert [(c.sender_ip - VIP, c.vlan, c.kind, c.captured_at - t0) for c in claims] == [
        (0, None, "garp_request", 0),
        (5, 100, "garp_request", 1),
        (6, 200, "garp_request", 2),
        (1, None, "arp_reply", 3),
    ]
    assert claims[0].sender_mac == claims[0].eth_src == MAC
    assert (stats.claims, stats.not_claims, stats.not_arp) == (4, 1, 1)
    assert stats.malformed["truncated_arp"] == 1
    assert stats.malformed["bad_hlen"] == 1
    assert stats.frames == len(packets)
    release_block(ring_memory, BLOCK)
    assert not block_ready(ring_memory, BLOCK)


def test_an_empty_block_gives_nothing(ring_memory: mmap.mmap) -> None:
    write_block(ring_memory, 0, [])
    stats = CaptureStats()
    assert drain_block(ring_memory, 0, stats) == []
    assert stats.frames == 0


# ---- the capture thread over a hand-made ring ---------------------------------------------------------------


class FakeRing(RingReader):
    """A ring in anonymous memory; the socket is one end of a socketpair (poll sees nothing on it)."""

    def __init__(self, block_count: int = 4) -> None:
        self.peer, sock = socket.socketpair()
        geometry = RingGeometry(block_size=BLOCK, block_count=block_count, frame_size=2048)
        super().__init__(sock, mmap.mmap(-1, BLOCK * block_count), geometry, poll_interval_s=0.02)
        self.kernel = (0, 0)

    def read_kernel_stats(self) -> tuple[int, int]:
        counters, self.kernel = self.kernel, (0, 0)
        return counters

    def close(self) -> None:
        super().close()
        self.peer.close()


class Sink:
    def __init__(self) -> None:
        self.batches: list[list[Claim]] = []
        self.changed = threading.Condition()

    def __call__(self, batch: list[Claim]) -> None:
        with self.changed:
            self.batches.append(batch)
            self.changed.notify_all()

    def wait_claims(self, count: int, timeout_s: float = 20.0) -> list[Claim]:
        with self.changed:
            assert self.changed.wait_for(lambda: sum(map(len, self.batches)) >= count, timeout_s)
            return [claim for batch in self.batches for claim in batch]


def test_capture_thread_reads_blocks_in_order_and_returns_them() -> None:
    ring = FakeRing(block_count=4)
    sink = Sink()
    capture = CaptureThread(ring, sink, max_batch=1000, stats_interval_s=0.05)
    capture.start()
    try:
        for block in range(4):
            write_block(ring.buffer, block * BLOCK, [(garp(VIP + block), block, None)])
        sink.wait_claims(4)
        for block in range(4):
            assert not block_ready(ring.buffer, block * BLOCK)  # every block given back to the kernel
        for block in range(4):  # the second time round the ring
            write_block(ring.buffer, block * BLOCK, [(garp(VIP + 10 + block), 10 + block, None)])
        claims = sink.wait_claims(8)
        ring.kernel = (9, 1)
        eventually_sync(lambda: capture.stats.kernel_packets >= 9, what="the kernel's counters read")
    finally:
        capture.stop()
    assert [c.captured_at for c in claims] == [0, 1, 2, 3, 10, 11, 12, 13]
    assert (capture.stats.kernel_packets, capture.stats.kernel_drops) == (9, 1)
    assert capture.stats.claims == 8
    assert capture.error is None
    assert not capture.running
    assert ring.closed


def test_each_ready_block_is_handed_over_on_its_own_split_at_max_batch() -> None:
    ring = FakeRing(block_count=4)
    for block in range(4):  # all four ready before the thread starts: one burst
        write_block(ring.buffer, block * BLOCK, [(garp(VIP + block * 10 + i), i, None) for i in range(5)])
    sink = Sink()
    capture = CaptureThread(ring, sink, max_batch=3)
    capture.start()
    try:
        claims = sink.wait_claims(20)
    finally:
        capture.stop()
    # a block's claims never wait for the blocks after it (a takeover behind a flood); 5 → 3 + 2
    assert [len(batch) for batch in sink.batches] == [3, 2] * 4
    assert [c.sender_ip - VIP for c in claims] == [b * 10 + i for b in range(4) for i in range(5)]


def test_stop_wakes_the_thread_without_waiting_for_the_poll_interval() -> None:
    ring = FakeRing()
    ring.poll_interval_s = 120.0  # a missed wake-up would leave the thread asleep past stop()'s join
    capture = CaptureThread(ring, Sink(), stats_interval_s=120.0)
    capture.start()
    eventually_sync(lambda: capture.running, what="the capture thread running")
    capture.stop(timeout_s=30)
    assert not capture.running
    assert ring.closed


def test_a_sink_error_stops_the_thread_and_is_reported() -> None:
    ring = FakeRing()
    reported: list[BaseException] = []
    done = threading.Event()

    def failing_sink(batch: list[Claim]) -> None:
        raise RuntimeError("sink broke")

    def on_error(exc: BaseException) -> None:
        reported.append(exc)
        done.set()

    capture = CaptureThread(ring, failing_sink, on_error=on_error)
    capture.start()
    write_block(ring.buffer, 0, [(garp(), 1, None)])
    assert done.wait(20)
    capture.stop()
    assert isinstance(capture.error, RuntimeError)
    assert reported == [capture.error]
