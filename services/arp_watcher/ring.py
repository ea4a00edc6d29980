"""ARP capture from a memory-mapped PACKET_RX_RING with TPACKET_V3 blocks (adapter; SPEC P3).

Same socket as `capture.open_capture_socket` — protocol 0, the classic BPF filter attached in the kernel, only
then bound with ETH_P_ALL inside the optional network namespace — but the kernel writes accepted frames
straight into a ring of blocks shared with this process instead of queueing one skb per frame for a
`recvmsg` each (linux/if_packet.h, Documentation/networking/packet_mmap.rst):

* the kernel fills one block at a time and hands it over (block_status TP_STATUS_USER) when the block is full
  or when `retire_timeout_ms` has passed since it was opened — which bounds the latency a lone GARP sees;
* the capture thread waits with poll(2) (on the socket and an eventfd that stop() writes to, so idle costs
  one wake-up per stats interval), walks every frame of a ready block — tpacket3_hdr gives the kernel receive
  time (tp_sec/tp_nsec) and the VLAN tag the kernel stripped (hv1.tp_vlan_tci, TP_STATUS_VLAN_VALID) —
  returns the block to the kernel (TP_STATUS_KERNEL) and hands the block's claims to the sink in one call;
* when every block is still held by user space the kernel drops frames and counts them: PACKET_STATISTICS
  (struct tpacket_stats_v3 with TPACKET_V3, reset by every read) goes into the same `CaptureStats`.

Only CAP_NET_RAW is needed: the ring is the socket's own memory (no CAP_IPC_LOCK, no rlimit involved).
Memory ordering: user space must read a block's frames only after it saw TP_STATUS_USER; x86-64 keeps loads
in order, and CPython cannot issue a fence, so on weakly ordered CPUs this relies on the interpreter's own
work between the two reads.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from .capture import (
    PACKET_IGNORE_OUTGOING,
    PACKET_STATISTICS,
    SOL_PACKET,
    TP_STATUS_VLAN_VALID,
    CaptureOpenError,
    CaptureStats,
    ClaimSink,
    attach_arp_filter,
    open_packet_socket,
)
from .claims import Claim, ClaimMemo
from .frames import MalformedFrame, NotArp

log = logging.getLogger(__name__)

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
# the block size (P3 measured 1 MiB × 32 dropping frames at 48k ARP/s on a busy machine, where 32 KiB × 512 did
# not). 16 MiB in all: ≈ 110,000 ARP frames of ≈ 144 bytes, or ≈ 1 s of a stalled reader under light traffic.
DEFAULT_BLOCK_SIZE: Final = 16 * 1024
DEFAULT_BLOCK_COUNT: Final = 1024
DEFAULT_FRAME_SIZE: Final = 2048
# A block is handed over when full or this many ms after it was opened: what a lone GARP waits (measured
# p50 1.2 ms at 2 ms; SPEC P1 allows 3 ms from the wire to the commit).
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


class CaptureRing:
    """A bound AF_PACKET socket with its TPACKET_V3 receive ring mapped into this process."""

    def __init__(
        self, sock: socket.socket, buffer: mmap.mmap, geometry: RingGeometry, poll_interval_s: float
    ) -> None:
        self.sock = sock
        self.buffer = buffer
        self.geometry = geometry
        self.poll_interval_s = poll_interval_s

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

    def close(self) -> None:
        """Unmap the ring and close the socket (the kernel frees the ring when both are gone)."""
        with contextlib.suppress(BufferError):
            self.buffer.close()
        self.sock.close()


def open_capture_ring(
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
) -> CaptureRing:
    """Open the ARP capture socket with a TPACKET_V3 ring (see the module docstring).

    The kernel memory taken is block_size × block_count (default 16 MiB), unswappable, per open ring.
    `poll_interval_s` bounds how long the capture thread sleeps without traffic (it also wakes on stop()).
    """
    geometry = RingGeometry(block_size, block_count, frame_size, retire_timeout_ms)

    def configure(sock: socket.socket) -> None:
        attach_arp_filter(sock)  # first: nothing else may ever be queued
        if ignore_outgoing:
            sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
        try:
            sock.setsockopt(SOL_PACKET, PACKET_RX_RING, geometry.request())
        except OSError as exc:
            if exc.errno == errno.ENOMEM:
                raise CaptureOpenError(
                    f"cannot allocate a {geometry.size >> 20} MiB capture ring: {exc.strerror}", config_error=True
                ) from exc
            raise

    sock = open_packet_socket(interface, configure, netns=netns, promiscuous=promiscuous)
    try:
        buffer = mmap.mmap(sock.fileno(), geometry.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as exc:
        sock.close()
        raise CaptureOpenError(f"cannot map the capture ring of {interface!r}: {exc}", config_error=False) from exc
    return CaptureRing(sock, buffer, geometry, poll_interval_s)


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


# ---- the capture thread --------------------------------------------------------------------------------------


class RingCapture:
    """Reads a `CaptureRing` in a dedicated thread and hands claims to `sink` once per block (the kernel retires
    a block when it is full or after its timeout), in lists of at most `max_batch`. The same interface as
    `capture.ArpCapture`.

    `sink` is called from the capture thread and must not block. `on_error` is called from the capture thread
    if it stops on an unexpected error.
    """

    def __init__(
        self,
        ring: CaptureRing,
        sink: ClaimSink,
        *,
        max_batch: int = 1024,
        stats_interval_s: float = 1.0,
        on_error: Callable[[BaseException], object] | None = None,
        name: str = "arp-ring-capture",
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._ring = ring
        self._sink = sink
        self._max_batch = max_batch
        self._stats_interval_s = stats_interval_s
        self._on_error = on_error
        self._stop = threading.Event()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._stats_lock = threading.Lock()
        self.stats = CaptureStats()
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the thread (woken at once), take the last kernel counters, unmap and close the ring."""
        self._stop.set()
        with contextlib.suppress(OSError):
            os.eventfd_write(self._wake, 1)
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("capture thread still running %.1f s after stop; leaving the ring mapped", timeout_s)
            return
        if not self._ring.closed:
            with contextlib.suppress(OSError):
                self.poll_kernel_stats()
            self._ring.close()
        with contextlib.suppress(OSError):
            os.close(self._wake)
        self._wake = -1

    def poll_kernel_stats(self) -> None:
        with self._stats_lock:
            packets, drops = self._ring.read_kernel_stats()
            self.stats.kernel_packets += packets
            self.stats.kernel_drops += drops
        if drops:
            log.warning("kernel dropped %d ARP frames", drops, extra={"kernel_drops": drops})

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:
            if self._stop.is_set() and isinstance(exc, ValueError | OSError):
                return  # the ring was closed under a thread that outlived stop()'s timeout
            self.error = exc
            log.exception("capture thread stopped")
            if self._on_error is not None:
                self._on_error(exc)

    def _wait(self, poller: select.poll, timeout_s: float) -> None:
        for fd, events in poller.poll(max(0, int(timeout_s * 1000)) + 1):
            if fd == self._wake:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self._wake)
            elif events & select.POLLERR:
                code = self._ring.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                self.stats.receive_errors += 1
                log.warning("capture socket: %s", os.strerror(code) if code else "error", extra={"errno": code})
                self._stop.wait(0.1)

    def _loop(self) -> None:
        ring = self._ring
        buffer = ring.buffer
        block_size = ring.geometry.block_size
        block_count = ring.geometry.block_count
        stats = self.stats
        sink = self._sink
        max_batch = self._max_batch
        stop = self._stop
        monotonic = time.monotonic
        poller = select.poll()
        poller.register(ring.fileno(), select.POLLIN | select.POLLERR)
        poller.register(self._wake, select.POLLIN)
        wait_s = min(ring.poll_interval_s, self._stats_interval_s)
        next_stats = monotonic() + self._stats_interval_s
        memo = ClaimMemo()
        block = 0

        while not stop.is_set():
            offset = block * block_size
            if not block_ready(buffer, offset):
                self._wait(poller, wait_s)
            else:
                # Each block's claims are handed over as soon as it is parsed: when the thread is behind (a
                # flood), a takeover waits for the blocks before it, never for those after it.
                claims = drain_block(buffer, offset, stats, memo)
                release_block(buffer, offset)
                block = (block + 1) % block_count
                for start in range(0, len(claims), max_batch):
                    sink(claims[start : start + max_batch])
            if monotonic() >= next_stats:
                self.poll_kernel_stats()
                next_stats = monotonic() + self._stats_interval_s


def open_ring_capture(
    interface: str,
    sink: ClaimSink,
    *,
    netns: str | None = None,
    promiscuous: bool = True,
    ignore_outgoing: bool = False,
    block_size: int = DEFAULT_BLOCK_SIZE,
    block_count: int = DEFAULT_BLOCK_COUNT,
    retire_timeout_ms: int = DEFAULT_RETIRE_TIMEOUT_MS,
    on_error: Callable[[BaseException], object] | None = None,
) -> RingCapture:
    """Open the ring and wrap it in an unstarted RingCapture (the watcher's one call); CaptureOpenError as
    `capture.open_capture_socket` raises it. `stop()` releases everything."""
    ring = open_capture_ring(
        interface,
        netns=netns,
        promiscuous=promiscuous,
        ignore_outgoing=ignore_outgoing,
        block_size=block_size,
        block_count=block_count,
        retire_timeout_ms=retire_timeout_ms,
    )
    return RingCapture(ring, sink, on_error=on_error)
