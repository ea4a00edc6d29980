"""The AF_PACKET socket both capture readers start from: opened in the watcher's network namespace, filtered to
ARP in the kernel before it is bound, joined to the interface's promiscuous membership.

The socket is opened with protocol 0 — it receives nothing until bound — the BPF filter is attached, and only
then is it bound to the interface with ETH_P_ALL: binding to ETH_P_ARP would miss ARP frames whose VLAN tag the
driver left in the frame (ethertype 0x8100 at offset 12); the filter keeps everything that is not ARP in the
kernel. Only CAP_NET_RAW is needed. The socket may be opened inside a named network namespace: the opening
thread enters it with setns(2), creates and binds the socket, and returns; the socket stays there.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import socket
import struct
from collections.abc import Callable, Iterator
from typing import Final

# Constants Python 3.11's socket module lacks (linux/if_packet.h, asm-generic/socket.h, linux/sched.h).
SOL_PACKET: Final = 263
PACKET_ADD_MEMBERSHIP: Final = 1
PACKET_MR_PROMISC: Final = 1
PACKET_STATISTICS: Final = 6
PACKET_IGNORE_OUTGOING: Final = 23
SO_ATTACH_FILTER: Final = 26
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
_PACKET_MREQ = struct.Struct("iHH8s")  # struct packet_mreq {int ifindex; u16 type, alen; u8 address[8]}


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


def attach_arp_filter(sock: socket.socket) -> None:
    """Attach ARP_BPF_FILTER in the kernel (before the socket is bound: no other frame is ever queued)."""
    fprog, code = bpf_program(ARP_BPF_FILTER)
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    del code


def open_packet_socket(
    interface: str,
    configure: Callable[[socket.socket], object],
    *,
    netns: str | None = None,
    promiscuous: bool = True,
    ignore_outgoing: bool = False,
) -> socket.socket:
    """An AF_PACKET socket opened with protocol 0 (it receives nothing yet) inside `netns`, with the ARP filter
    attached, set up further by the reader's `configure`, and only then bound to `interface` with ETH_P_ALL
    and joined to the interface's promiscuous membership. Errors become CaptureOpenError."""
    with network_namespace(netns):
        try:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        except PermissionError as exc:
            raise CaptureOpenError(
                "cannot open an AF_PACKET socket: CAP_NET_RAW is required", config_error=False
            ) from exc
        try:
            attach_arp_filter(sock)
            if ignore_outgoing:
                sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
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
