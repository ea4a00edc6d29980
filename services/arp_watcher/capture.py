"""Raw ARP capture (adapter): an AF_PACKET socket with a classic BPF filter, read by a dedicated thread.

Design (SPEC P3, FIELD-NOTES "Raw capture in Python"):

* the socket is opened with protocol 0 — it receives nothing until bound — the BPF filter is attached, and only
  then is it bound to the interface with ETH_P_ALL: binding to ETH_P_ARP would miss ARP frames whose VLAN tag
  the driver left in the frame (ethertype 0x8100 at offset 12); the filter keeps everything that is not ARP in
  the kernel;
* the kernel receive time comes from SO_TIMESTAMPNS, the VLAN id the kernel stripped from PACKET_AUXDATA;
* a blocking `recvmsg` loop in its own thread (SO_RCVTIMEO lets it notice a stop request) parses and classifies
  every frame, then drains what else is queued without blocking, and hands the claims of that burst to a sink
  in one call — one hand-off per burst, not per frame, and no waiting when traffic is light;
* PACKET_STATISTICS (reset by every read) is polled about once a second into cumulative counters.

Only CAP_NET_RAW is needed (SO_RCVBUFFORCE is tried and silently falls back to SO_RCVBUF without
CAP_NET_ADMIN; raise net.core.rmem_max then). The socket may be opened inside a named network namespace: the
opening thread enters it with setns(2), creates and binds the socket, and returns; the socket stays there.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Final

from .claims import Claim, ClaimMemo
from .frames import MALFORMED_REASONS, MalformedFrame, MalformedReason, NotArp

log = logging.getLogger(__name__)

# Constants Python 3.11's socket module lacks (linux/if_packet.h, asm-generic/socket.h, linux/sched.h).
SOL_PACKET: Final = 263
PACKET_ADD_MEMBERSHIP: Final = 1
PACKET_MR_PROMISC: Final = 1
PACKET_STATISTICS: Final = 6
PACKET_AUXDATA: Final = 8
PACKET_IGNORE_OUTGOING: Final = 23
SO_ATTACH_FILTER: Final = 26
SO_TIMESTAMPNS: Final = 35  # == SCM_TIMESTAMPNS, the ancillary message type
SO_RCVBUFFORCE: Final = 33
ETH_P_ALL: Final = 0x0003
TP_STATUS_VLAN_VALID: Final = 0x10
CLONE_NEWNET: Final = 0x40000000

# Classic BPF: accept ARP, untagged or under one or two VLAN tags kept in the frame (when the kernel strips the
# tag, the frame it filters is untagged and the first test matches). It starts from what
# `tcpdump -dd 'arp or (vlan and arp)'` prints (tcpdump 4.99, no interface given, hence no VLAN-offload
# ancillary loads):
#   { 0x28, 0, 0, 0x0000000c }, { 0x15, 5, 0, 0x00000806 }, { 0x15, 2, 0, 0x00008100 },
#   { 0x15, 1, 0, 0x000088a8 }, { 0x15, 0, 3, 0x00009100 }, { 0x28, 0, 0, 0x00000010 },
#   { 0x15, 0, 1, 0x00000806 }, { 0x6, 0, 0, 0x00040000 }, { 0x6, 0, 0, 0x00000000 },
# extended by hand (instructions 7-11) for a second tag: tcpdump's own `vlan and vlan and arp` shifts offsets
# across `or` branches and cannot be used. Jump offsets are relative (jt/jf skip that many instructions).
#   (000) ldh [12]                                   ; ethertype / outer TPID
#   (001) jeq #0x806   jt 12 (accept)  jf 2
#   (002) jeq #0x8100  jt 5            jf 3
#   (003) jeq #0x88a8  jt 5            jf 4
#   (004) jeq #0x9100  jt 5            jf 13 (drop)
#   (005) ldh [16]                                   ; ethertype after one tag / inner TPID
#   (006) jeq #0x806   jt 12 (accept)  jf 7
#   (007) jeq #0x8100  jt 10           jf 8
#   (008) jeq #0x88a8  jt 10           jf 9
#   (009) jeq #0x9100  jt 10           jf 13 (drop)
#   (010) ldh [20]                                   ; ethertype after two tags
#   (011) jeq #0x806   jt 12 (accept)  jf 13 (drop)
#   (012) ret #262144                                ; accept, snap length 256 KiB
#   (013) ret #0                                     ; drop
ARP_BPF_FILTER: Final[tuple[tuple[int, int, int, int], ...]] = (
    (0x28, 0, 0, 0x0000000C),
    (0x15, 10, 0, 0x00000806),
    (0x15, 2, 0, 0x00008100),
    (0x15, 1, 0, 0x000088A8),
    (0x15, 0, 8, 0x00009100),
    (0x28, 0, 0, 0x00000010),
    (0x15, 5, 0, 0x00000806),
    (0x15, 2, 0, 0x00008100),
    (0x15, 1, 0, 0x000088A8),
    (0x15, 0, 3, 0x00009100),
    (0x28, 0, 0, 0x00000014),
    (0x15, 0, 1, 0x00000806),
    (0x06, 0, 0, 0x00040000),
    (0x06, 0, 0, 0x00000000),
)

_SOCK_FILTER = struct.Struct("HBBI")  # struct sock_filter {u16 code; u8 jt; u8 jf; u32 k}
_SOCK_FPROG = struct.Struct("HP")  # struct sock_fprog {unsigned short len; struct sock_filter *filter}
_TIMESPEC = struct.Struct("qq")
# struct tpacket_auxdata {u32 tp_status, tp_len, tp_snaplen; u16 tp_mac, tp_net, tp_vlan_tci, tp_vlan_tpid}
_AUXDATA = struct.Struct("IIIHHHH")
_TPACKET_STATS = struct.Struct("II")  # struct tpacket_stats {unsigned tp_packets, tp_drops}
_PACKET_MREQ = struct.Struct("iHH8s")  # struct packet_mreq {int ifindex; u16 type, alen; u8 address[8]}

# Big enough for any ARP frame (with room for tags and padding); a longer frame arrives truncated (MSG_TRUNC),
# which does not matter: the ARP header is within its first 64 bytes.
RECV_BUFSIZE: Final = 2048
ANC_BUFSIZE: Final = socket.CMSG_SPACE(_TIMESPEC.size) + socket.CMSG_SPACE(_AUXDATA.size)


class CaptureOpenError(Exception):
    """The capture socket could not be opened; `config_error` when the cause is the configuration (no such
    interface or network namespace) rather than the environment (permissions, resources)."""

    def __init__(self, message: str, *, config_error: bool) -> None:
        super().__init__(message)
        self.config_error = config_error


# ---- network namespaces --------------------------------------------------------------------------------------

_libc: ctypes.CDLL | None = None


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if _libc.setns(ctypes.c_int(fd), ctypes.c_int(CLONE_NEWNET)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def netns_path(name: str) -> str:
    """A name as created by `ip netns add`, or an explicit path such as /proc/PID/ns/net."""
    return name if name.startswith("/") else f"/var/run/netns/{name}"


@contextlib.contextmanager
def network_namespace(name: str | None) -> Iterator[None]:
    """Run the body with the calling thread inside network namespace `name` (None: stay where it is).

    setns(2) moves only the calling thread; sockets created inside stay in that namespace after the thread
    returns to its own.
    """
    if name is None:
        yield
        return
    try:
        target = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise CaptureOpenError(
            f"network namespace {name!r} not found ({netns_path(name)}: {exc.strerror})", config_error=True
        ) from exc
    try:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            try:
                _setns(target)
            except OSError as exc:
                raise CaptureOpenError(
                    f"cannot enter network namespace {name!r}: {exc.strerror}", config_error=False
                ) from exc
            try:
                yield
            finally:
                _setns(own)  # failing here would leave the thread in the wrong namespace: let it raise
        finally:
            os.close(own)
    finally:
        os.close(target)


# ---- the socket ----------------------------------------------------------------------------------------------


def bpf_program(instructions: tuple[tuple[int, int, int, int], ...]) -> tuple[bytes, ctypes.Array[ctypes.c_char]]:
    """The `struct sock_fprog` for SO_ATTACH_FILTER, and the buffer it points to (keep it alive until the
    setsockopt call has returned; the kernel copies the program)."""
    code = ctypes.create_string_buffer(b"".join(_SOCK_FILTER.pack(*insn) for insn in instructions))
    return _SOCK_FPROG.pack(len(instructions), ctypes.addressof(code)), code


def open_capture_socket(
    interface: str,
    *,
    netns: str | None = None,
    rcvbuf_bytes: int = 32 * 1024 * 1024,
    promiscuous: bool = True,
    ignore_outgoing: bool = False,
    poll_interval_s: float = 0.2,
) -> socket.socket:
    """Open, configure and bind the ARP capture socket (see the module docstring)."""
    return open_packet_socket(
        interface,
        lambda sock: _configure(sock, rcvbuf_bytes, ignore_outgoing, poll_interval_s),
        netns=netns,
        promiscuous=promiscuous,
    )


def open_packet_socket(
    interface: str,
    configure: Callable[[socket.socket], object],
    *,
    netns: str | None = None,
    promiscuous: bool = True,
) -> socket.socket:
    """An AF_PACKET socket opened with protocol 0 (it receives nothing yet), set up by `configure` — which
    must attach the BPF filter — and only then bound to `interface` with ETH_P_ALL (inside `netns`), and
    joined to the interface's promiscuous membership. Errors become CaptureOpenError."""
    with network_namespace(netns):
        try:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        except PermissionError as exc:
            raise CaptureOpenError(
                "cannot open an AF_PACKET socket: CAP_NET_RAW is required", config_error=False
            ) from exc
        try:
            configure(sock)
            try:
                sock.bind((interface, ETH_P_ALL))
            except OSError as exc:
                if exc.errno in (errno.ENODEV, errno.ENXIO):
                    where = f" in network namespace {netns!r}" if netns else ""
                    raise CaptureOpenError(f"no interface {interface!r}{where}", config_error=True) from exc
                raise
            if promiscuous:
                mreq = _PACKET_MREQ.pack(socket.if_nametoindex(interface), PACKET_MR_PROMISC, 0, b"")
                sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, mreq)  # dropped when the socket closes
        except CaptureOpenError:
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            raise CaptureOpenError(f"cannot set up capture on {interface!r}: {exc}", config_error=False) from exc
    return sock


def _configure(sock: socket.socket, rcvbuf_bytes: int, ignore_outgoing: bool, poll_interval_s: float) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf_bytes)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf_bytes)
    effective = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    if effective < rcvbuf_bytes:  # the kernel reports twice the requested size when it granted it
        log.warning(
            "receive buffer limited to %d bytes (asked %d); raise net.core.rmem_max",
            effective,
            rcvbuf_bytes,
            extra={"rcvbuf_bytes": effective},
        )
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
    seconds = int(poll_interval_s)
    sock.setsockopt(
        socket.SOL_SOCKET,
        socket.SO_RCVTIMEO,
        struct.pack("ll", seconds, int((poll_interval_s - seconds) * 1_000_000)),
    )
    if ignore_outgoing:
        sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
    attach_arp_filter(sock)


def attach_arp_filter(sock: socket.socket) -> None:
    """Attach ARP_BPF_FILTER in the kernel (before the socket is bound: no other frame is ever queued)."""
    fprog, code = bpf_program(ARP_BPF_FILTER)
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    del code


def read_kernel_stats(sock: socket.socket) -> tuple[int, int]:
    """(packets, drops) since the previous read — the kernel resets them on every read. `packets` counts
    every frame that passed the filter, dropped ones included."""
    packets, drops = _TPACKET_STATS.unpack(sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, _TPACKET_STATS.size))
    return packets, drops


# ---- the capture thread --------------------------------------------------------------------------------------


class CaptureStats:
    """Cumulative counters, written by the capture thread only and read by anyone (ints: no torn reads)."""

    __slots__ = (
        "claims",
        "kernel_drops",
        "kernel_packets",
        "malformed",
        "not_arp",
        "not_claims",
        "receive_errors",
    )

    def __init__(self) -> None:
        self.claims = 0
        self.not_claims = 0
        self.not_arp = 0
        self.malformed: dict[MalformedReason, int] = dict.fromkeys(MALFORMED_REASONS, 0)
        self.kernel_packets = 0
        self.kernel_drops = 0
        self.receive_errors = 0

    @property
    def frames(self) -> int:
        return self.claims + self.not_claims + self.not_arp + sum(self.malformed.values())


ClaimSink = Callable[[list[Claim]], None]


class ArpCapture:
    """Reads the capture socket in a dedicated thread and hands claims to `sink` in batches.

    `sink` is called from the capture thread and must not block (e.g. a bounded buffer that wakes the event
    loop). `on_error` is called from the capture thread if it stops on an unexpected error.
    """

    def __init__(
        self,
        sock: socket.socket,
        sink: ClaimSink,
        *,
        max_batch: int = 1024,
        stats_interval_s: float = 1.0,
        on_error: Callable[[BaseException], object] | None = None,
        name: str = "arp-capture",
    ) -> None:
        self._sock = sock
        self._sink = sink
        self._max_batch = max_batch
        self._stats_interval_s = stats_interval_s
        self._on_error = on_error
        self._stop = threading.Event()
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
        """Stop the thread (within about one socket poll interval), take the last kernel counters, close."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        if self._sock.fileno() != -1:
            with contextlib.suppress(OSError):
                self.poll_kernel_stats()
            self._sock.close()

    def poll_kernel_stats(self) -> None:
        with self._stats_lock:
            packets, drops = read_kernel_stats(self._sock)
            self.stats.kernel_packets += packets
            self.stats.kernel_drops += drops
        if drops:
            log.warning("kernel dropped %d ARP frames", drops, extra={"kernel_drops": drops})

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:
            self.error = exc
            log.exception("capture thread stopped")
            if self._on_error is not None:
                self._on_error(exc)

    def _loop(self) -> None:
        recvmsg = self._sock.recvmsg
        claim_of = ClaimMemo().claim  # identical frames (a flood, a burst) are parsed once
        time_ns = time.time_ns
        monotonic = time.monotonic
        unpack_ts = _TIMESPEC.unpack_from
        unpack_aux = _AUXDATA.unpack_from
        dontwait = socket.MSG_DONTWAIT
        sol_socket = socket.SOL_SOCKET
        stats = self.stats
        malformed = stats.malformed
        sink = self._sink
        max_batch = self._max_batch
        stop = self._stop
        next_stats = monotonic() + self._stats_interval_s

        while not stop.is_set():
            try:
                data, ancdata, _flags, _addr = recvmsg(RECV_BUFSIZE, ANC_BUFSIZE)
            except (BlockingIOError, TimeoutError):  # SO_RCVTIMEO expired: look at the stop flag
                if monotonic() >= next_stats:
                    self.poll_kernel_stats()
                    next_stats = monotonic() + self._stats_interval_s
                continue
            except OSError as exc:
                if exc.errno in (errno.ENETDOWN, errno.ENXIO, errno.ENOBUFS):
                    stats.receive_errors += 1
                    log.warning("capture socket: %s", exc.strerror, extra={"errno": exc.errno})
                    stop.wait(0.1)
                    continue
                raise

            batch: list[Claim] = []
            claims = not_claims = not_arp = 0
            n = 0
            while True:
                captured_at = 0
                vlan: int | None = None
                for level, kind, cdata in ancdata:
                    if level == sol_socket:
                        if kind == SO_TIMESTAMPNS:
                            sec, nsec = unpack_ts(cdata)
                            captured_at = sec * 1_000_000_000 + nsec
                    elif level == SOL_PACKET and kind == PACKET_AUXDATA:
                        status, _len, _snap, _mac, _net, tci, _tpid = unpack_aux(cdata)
                        if status & TP_STATUS_VLAN_VALID or tci:
                            vlan = tci & 0x0FFF
                if not captured_at:
                    captured_at = time_ns()
                try:
                    claim = claim_of(data, vlan, captured_at)
                except MalformedFrame as exc:
                    malformed[exc.reason] += 1
                except NotArp:
                    not_arp += 1
                else:
                    if claim is None:
                        not_claims += 1
                    else:
                        batch.append(claim)
                        claims += 1
                n += 1
                if n >= max_batch:
                    break
                try:
                    data, ancdata, _flags, _addr = recvmsg(RECV_BUFSIZE, ANC_BUFSIZE, dontwait)
                except BlockingIOError:
                    break
                except OSError:
                    break  # handled by the blocking receive at the top of the loop
            stats.claims += claims
            stats.not_claims += not_claims
            stats.not_arp += not_arp
            if batch:
                sink(batch)
            if monotonic() >= next_stats:
                self.poll_kernel_stats()
                next_stats = monotonic() + self._stats_interval_s
