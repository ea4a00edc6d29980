"""The default capture reader: a memory-mapped PACKET_RX_RING of TPACKET_V3 blocks on the watcher's packet socket
(packet_socket.py), which the kernel fills with accepted frames instead of queueing one skb per frame for a
`recvmsg` each (linux/if_packet.h, Documentation/networking/packet_mmap.rst):

* the kernel fills one block at a time and hands it over (block_status TP_STATUS_USER) when the block is full
  or when `retire_timeout_ms` has passed since it was opened — which bounds the latency a lone GARP sees;
* the reading loop waits with poll(2) (on the socket and an eventfd that `wake` writes to, so idle costs one
  wake-up per stats interval), walks every frame of a ready block — tpacket3_hdr gives the kernel receive time
  (tp_sec/tp_nsec) and the VLAN tag the kernel stripped (hv1.tp_vlan_tci, TP_STATUS_VLAN_VALID) — returns the
  block to the kernel (TP_STATUS_KERNEL) and hands the block's claims over in one call;
* when every block is still held by user space the kernel drops frames and counts them: PACKET_STATISTICS
  (struct tpacket_stats_v3 with TPACKET_V3, reset by every read).

Only CAP_NET_RAW is needed: the ring is the socket's own memory (no CAP_IPC_LOCK, no rlimit involved).
Memory ordering: user space must read a block's frames only after it saw TP_STATUS_USER; x86-64 keeps loads
in order, and CPython cannot issue a fence, so on weakly ordered CPUs this relies on the interpreter's own
work between the two reads.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import select
import socket
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from .capture import CaptureStats
from .claims import Claim, ClaimMemo
from .frames import MalformedFrame, NotArp
from .packet_socket import (
    PACKET_STATISTICS,
    SOL_PACKET,
    TP_STATUS_VLAN_VALID,
    CaptureOpenError,
    open_packet_socket,
)

if TYPE_CHECKING:
    from .capture_thread import CaptureThread

# linux/if_packet.h
PACKET_RX_RING: Final = 5
PACKET_VERSION: Final = 10
TPACKET_V3: Final = 2
TP_STATUS_KERNEL: Final = 0
TP_STATUS_USER: Final = 1
TPACKET_ALIGNMENT: Final = 16

# struct tpacket_req3 {block_size, block_nr, frame_size, frame_nr, retire_blk_tov, sizeof_priv, feature_req_word}
TPACKET_REQ3: Final = struct.Struct("=7I")
# struct tpacket_block_desc {u32 version, offset_to_priv; struct tpacket_hdr_v1 {u32 block_status, num_pkts,
# offset_to_first_pkt, blk_len; u64 seq_num; struct tpacket_bd_ts ts_first_pkt, ts_last_pkt}} — the first 32 bytes
BLOCK_DESC: Final = struct.Struct("=6IQ")
BLOCK_STATUS_OFFSET: Final = 8
# struct tpacket3_hdr {u32 tp_next_offset, tp_sec, tp_nsec, tp_snaplen, tp_len, tp_status; u16 tp_mac, tp_net;
# struct tpacket_hdr_variant1 {u32 tp_rxhash, tp_vlan_tci; u16 tp_vlan_tpid, tp_padding}}
TPACKET3_HDR: Final = struct.Struct("=6I2H2I2H")
TPACKET_STATS_V3: Final = struct.Struct("=3I")  # struct tpacket_stats_v3 {tp_packets, tp_drops, tp_freeze_q_cnt}
_BLOCK_STATUS: Final = struct.Struct("=I")

# Many small blocks rather than a few large ones: below a block's capacity per retire timeout every block is
# handed over part-filled, so the ring absorbs a stall of the reader of block_count × retire timeout, whatever
# the block size (1 MiB × 32 dropped frames at 48k ARP/s on a busy machine, where 32 KiB × 512 did not:
# docs/benchmarks.md, P3). 16 MiB in all: ≈ 110,000 ARP frames of ≈ 144 bytes, or ≈ 1 s of a stalled reader
# under light traffic.
DEFAULT_BLOCK_SIZE: Final = 16 * 1024
DEFAULT_BLOCK_COUNT: Final = 1024
DEFAULT_FRAME_SIZE: Final = 2048
# A block is handed over when full or this many ms after it was opened: what a lone GARP waits (measured
# p50 1.2 ms at 2 ms, docs/benchmarks.md P3, against a p50 of 3 ms from the wire to the commit).
DEFAULT_RETIRE_TIMEOUT_MS: Final = 1


@dataclass(frozen=True)
class RingGeometry:
    """The ring as asked of the kernel (struct tpacket_req3)."""

    block_size: int = DEFAULT_BLOCK_SIZE
    block_count: int = DEFAULT_BLOCK_COUNT
    frame_size: int = DEFAULT_FRAME_SIZE
    retire_timeout_ms: int = DEFAULT_RETIRE_TIMEOUT_MS

    def __post_init__(self) -> None:
        page = mmap.PAGESIZE
        if self.block_size < page or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size {self.block_size} must be a power of two of at least {page} bytes")
        if self.block_count < 2:
            raise ValueError("block_count must be at least 2")
        if self.frame_size < 256 or self.frame_size % TPACKET_ALIGNMENT or self.block_size % self.frame_size:
            raise ValueError(
                f"frame_size {self.frame_size} must be a multiple of {TPACKET_ALIGNMENT}, at least 256, "
                "dividing block_size"
            )
        if not 1 <= self.retire_timeout_ms <= 60_000:
            raise ValueError("retire_timeout_ms must be 1-60000")

    @property
    def size(self) -> int:
        return self.block_size * self.block_count

    def request(self) -> bytes:
        frames = self.block_size // self.frame_size * self.block_count
        return TPACKET_REQ3.pack(
            self.block_size, self.block_count, self.frame_size, frames, self.retire_timeout_ms, 0, 0
        )


class RingReader:
    """A bound AF_PACKET socket with its TPACKET_V3 receive ring mapped into this process, and the loop that
    reads it (a capture_thread.FrameReader)."""

    def __init__(
        self, sock: socket.socket, buffer: mmap.mmap, geometry: RingGeometry, poll_interval_s: float
    ) -> None:
        self.sock = sock
        self.buffer = buffer
        self.geometry = geometry
        self.poll_interval_s = poll_interval_s
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    @property
    def closed(self) -> bool:
        return self.sock.fileno() == -1

    def fileno(self) -> int:
        return self.sock.fileno()

    def read_kernel_stats(self) -> tuple[int, int]:
        """(packets, drops) since the previous read (the kernel resets them); packets include the drops."""
        packets, drops, _freezes = TPACKET_STATS_V3.unpack(
            self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, TPACKET_STATS_V3.size)
        )
        return packets, drops

    def wake(self) -> None:
        if self._wake != -1:
            os.eventfd_write(self._wake, 1)

    def close(self) -> None:
        """Unmap the ring and close the socket (the kernel frees the ring when both are gone)."""
        with contextlib.suppress(BufferError):
            self.buffer.close()
        self.sock.close()
        if self._wake != -1:
            os.close(self._wake)
            self._wake = -1

    def read_until_stopped(self, thread: CaptureThread) -> None:
        buffer = self.buffer
        block_size = self.geometry.block_size
        block_count = self.geometry.block_count
        stats = thread.stats
        hand_over = thread.hand_over
        poll_kernel_stats_when_due = thread.poll_kernel_stats_when_due
        stop = thread.stopping
        poller = select.poll()
        poller.register(self.fileno(), select.POLLIN | select.POLLERR)
        poller.register(self._wake, select.POLLIN)
        wait_ms = max(0, int(min(self.poll_interval_s, thread.stats_interval_s) * 1000)) + 1
        memo = ClaimMemo()
        block = 0

        while not stop.is_set():
            offset = block * block_size
            if not block_ready(buffer, offset):
                self._wait(poller, wait_ms, thread)
            else:
                # Each block's claims are handed over as soon as it is parsed: when the thread is behind (a
                # flood), a takeover waits for the blocks before it, never for those after it.
                claims = drain_block(buffer, offset, stats, memo)
                release_block(buffer, offset)
                block = (block + 1) % block_count
                hand_over(claims)
            poll_kernel_stats_when_due()

    def _wait(self, poller: select.poll, timeout_ms: int, thread: CaptureThread) -> None:
        for fd, events in poller.poll(timeout_ms):
            if fd == self._wake:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self._wake)
            elif events & select.POLLERR:
                thread.receive_error(self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))


def open_ring_reader(
    interface: str,
    *,
    netns: str | None = None,
    promiscuous: bool = True,
    ignore_outgoing: bool = False,
    block_size: int = DEFAULT_BLOCK_SIZE,
    block_count: int = DEFAULT_BLOCK_COUNT,
    frame_size: int = DEFAULT_FRAME_SIZE,
    retire_timeout_ms: int = DEFAULT_RETIRE_TIMEOUT_MS,
    poll_interval_s: float = 1.0,
) -> RingReader:
    """Open the ARP capture socket with a TPACKET_V3 ring mapped (see the module docstring); CaptureOpenError
    when it cannot be.

    The kernel memory taken is block_size × block_count (default 16 MiB), unswappable, per open ring.
    `poll_interval_s` bounds how long the reading loop sleeps without traffic (it also wakes on `wake`).
    """
    geometry = RingGeometry(block_size, block_count, frame_size, retire_timeout_ms)

    def configure(sock: socket.socket) -> None:
        sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
        try:
            sock.setsockopt(SOL_PACKET, PACKET_RX_RING, geometry.request())
        except OSError as exc:
            if exc.errno == errno.ENOMEM:
                raise CaptureOpenError(
                    f"cannot allocate a {geometry.size >> 20} MiB capture ring: {exc.strerror}", config_error=True
                ) from exc
            raise

    sock = open_packet_socket(
        interface, configure, netns=netns, promiscuous=promiscuous, ignore_outgoing=ignore_outgoing
    )
    try:
        buffer = mmap.mmap(sock.fileno(), geometry.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as exc:
        sock.close()
        raise CaptureOpenError(f"cannot map the capture ring of {interface!r}: {exc}", config_error=False) from exc
    return RingReader(sock, buffer, geometry, poll_interval_s)


# ---- reading one block ---------------------------------------------------------------------------------------


def block_ready(buffer: mmap.mmap, block_offset: int) -> bool:
    status: int = _BLOCK_STATUS.unpack_from(buffer, block_offset + BLOCK_STATUS_OFFSET)[0]
    return bool(status & TP_STATUS_USER)


def release_block(buffer: mmap.mmap, block_offset: int) -> None:
    """Give the block back to the kernel (after every frame in it has been copied out)."""
    _BLOCK_STATUS.pack_into(buffer, block_offset + BLOCK_STATUS_OFFSET, TP_STATUS_KERNEL)


def drain_block(
    buffer: mmap.mmap, block_offset: int, stats: CaptureStats, memo: ClaimMemo | None = None
) -> list[Claim]:
    """Parse and classify every frame of the ready block at `block_offset` (through `memo`: identical frames are
    parsed once), count them into `stats` and return the claims in capture order. Frames are copied out: the
    block can be released right after."""
    _version, _priv, _status, packets, first, _length, _seq = BLOCK_DESC.unpack_from(buffer, block_offset)
    unpack_header = TPACKET3_HDR.unpack_from
    claim_of = (memo if memo is not None else ClaimMemo()).claim
    malformed = stats.malformed
    claims: list[Claim] = []
    not_claims = not_arp = 0
    offset = block_offset + first
    for _ in range(packets):
        next_offset, sec, nsec, snaplen, _len, status, mac, _net, _hash, tci, _tpid, _pad = unpack_header(
            buffer, offset
        )
        start = offset + mac
        vlan = tci & 0x0FFF if status & TP_STATUS_VLAN_VALID or tci else None
        try:
            claim = claim_of(buffer[start : start + snaplen], vlan, sec * 1_000_000_000 + nsec)
        except MalformedFrame as exc:
            malformed[exc.reason] += 1
        except NotArp:
            not_arp += 1
        else:
            if claim is None:
                not_claims += 1
            else:
                claims.append(claim)
        if not next_offset:
            break
        offset += next_offset
    stats.claims += len(claims)
    stats.not_claims += not_claims
    stats.not_arp += not_arp
    return claims
