"""The fallback capture reader (HAVIP_CAPTURE=socket): one `recvmsg` per frame on the watcher's packet socket
(packet_socket.py).

* the kernel receive time comes from SO_TIMESTAMPNS, the VLAN id the kernel stripped from PACKET_AUXDATA;
* a blocking `recvmsg` loop (SO_RCVTIMEO lets it notice a stop request) parses and classifies every frame, then
  drains what else is queued without blocking, and hands the claims of that burst over in one call — one
  hand-off per burst, not per frame, and no waiting when traffic is light;
* PACKET_STATISTICS (struct tpacket_stats, reset by every read) gives the kernel's packet and drop counts.

SO_RCVBUFFORCE is tried and silently falls back to SO_RCVBUF without CAP_NET_ADMIN (raise net.core.rmem_max
then).
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
import time
from typing import TYPE_CHECKING, Final

from .claims import Claim, ClaimMemo
from .frames import MalformedFrame, NotArp
from .packet_socket import PACKET_STATISTICS, SOL_PACKET, TP_STATUS_VLAN_VALID, open_packet_socket

if TYPE_CHECKING:
    from .capture_thread import CaptureThread

log = logging.getLogger(__name__)

# linux/if_packet.h, asm-generic/socket.h
PACKET_AUXDATA: Final = 8
SO_TIMESTAMPNS: Final = 35  # == SCM_TIMESTAMPNS, the ancillary message type
SO_RCVBUFFORCE: Final = 33

TIMESPEC: Final = struct.Struct("qq")
# struct tpacket_auxdata {u32 tp_status, tp_len, tp_snaplen; u16 tp_mac, tp_net, tp_vlan_tci, tp_vlan_tpid}
AUXDATA: Final = struct.Struct("IIIHHHH")
TPACKET_STATS: Final = struct.Struct("II")  # struct tpacket_stats {unsigned tp_packets, tp_drops}

# Big enough for any ARP frame (with room for tags and padding); a longer frame arrives truncated (MSG_TRUNC),
# which does not matter: the ARP header is within its first 64 bytes.
RECV_BUFSIZE: Final = 2048
ANC_BUFSIZE: Final = socket.CMSG_SPACE(TIMESPEC.size) + socket.CMSG_SPACE(AUXDATA.size)

# Errors of a socket whose interface went away or is short of memory for a moment: counted, and reading goes on.
TRANSIENT_RECEIVE_ERRORS: Final = frozenset({errno.ENETDOWN, errno.ENXIO, errno.ENOBUFS})


class SocketReader:
    """The capture socket read with `recvmsg`, frame by frame (a capture_thread.FrameReader)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @property
    def closed(self) -> bool:
        return self.sock.fileno() == -1

    def read_kernel_stats(self) -> tuple[int, int]:
        """(packets, drops) since the previous read — the kernel resets them on every read. `packets` counts
        every frame that passed the filter, dropped ones included."""
        packets, drops = TPACKET_STATS.unpack(
            self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, TPACKET_STATS.size)
        )
        return packets, drops

    def wake(self) -> None:
        """Nothing to do: a waiting `recvmsg` returns within SO_RCVTIMEO (the socket's poll interval)."""

    def close(self) -> None:
        self.sock.close()

    def read_until_stopped(self, thread: CaptureThread) -> None:
        recvmsg = self.sock.recvmsg
        claim_of = ClaimMemo().claim  # identical frames (a flood, a burst) are parsed once
        time_ns = time.time_ns
        unpack_ts = TIMESPEC.unpack_from
        unpack_aux = AUXDATA.unpack_from
        dontwait = socket.MSG_DONTWAIT
        sol_socket = socket.SOL_SOCKET
        stats = thread.stats
        malformed = stats.malformed
        hand_over = thread.hand_over
        poll_kernel_stats_when_due = thread.poll_kernel_stats_when_due
        max_batch = thread.max_batch
        stop = thread.stopping

        while not stop.is_set():
            try:
                data, ancdata, _flags, _addr = recvmsg(RECV_BUFSIZE, ANC_BUFSIZE)
            except (BlockingIOError, TimeoutError):  # SO_RCVTIMEO expired: look at the stop flag
                poll_kernel_stats_when_due()
                continue
            except OSError as exc:
                if exc.errno in TRANSIENT_RECEIVE_ERRORS:
                    thread.receive_error(exc.errno)
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
            hand_over(batch)
            poll_kernel_stats_when_due()


def open_socket_reader(
    interface: str,
    *,
    netns: str | None = None,
    rcvbuf_bytes: int = 32 * 1024 * 1024,
    promiscuous: bool = True,
    ignore_outgoing: bool = False,
    poll_interval_s: float = 0.2,
) -> SocketReader:
    """Open the ARP capture socket for `recvmsg` (see the module docstring); CaptureOpenError when it cannot be.
    `poll_interval_s` bounds how long a stop waits for a `recvmsg` without traffic."""
    return SocketReader(
        open_packet_socket(
            interface,
            lambda sock: _configure(sock, rcvbuf_bytes, poll_interval_s),
            netns=netns,
            promiscuous=promiscuous,
            ignore_outgoing=ignore_outgoing,
        )
    )


def _configure(sock: socket.socket, rcvbuf_bytes: int, poll_interval_s: float) -> None:
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
