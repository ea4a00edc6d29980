"""Seeing ARP on the lab wire with tcpdump (a reference capture, independent of the project's watcher).

``ArpCapture`` runs ``tcpdump -c COUNT -xx`` on a capture port (or inside a namespace), waits until tcpdump has
its socket and filter in place, and parses the hex dump into :class:`ArpFrame` objects.
"""

from __future__ import annotations

import ipaddress
import struct
import subprocess
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import IO, Self

from tests.lab.proc import ProcessRegistry, terminate_group
from tests.waiting import eventually_sync

ETH_P_ARP = 0x0806
ETH_P_8021Q = 0x8100
ARP_REQUEST = 1
ARP_REPLY = 2


@dataclass(frozen=True)
class ArpFrame:
    """One captured ARP frame (Ethernet/ARP for IPv4), as tcpdump saw it."""

    timestamp: float  # capture time, seconds since the epoch (tcpdump -tt)
    eth_src: str
    eth_dst: str
    vlan: int | None
    op: int
    sender_mac: str
    sender_ip: str
    target_mac: str
    target_ip: str

    @property
    def is_garp(self) -> bool:
        """Gratuitous ARP as keepalived sends it: a request with sender IP == target IP."""
        return self.op == ARP_REQUEST and self.sender_ip == self.target_ip


def _mac(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def parse_frame(timestamp: float, frame: bytes) -> ArpFrame | None:
    """Parse an Ethernet frame (optionally 802.1Q-tagged) carrying IPv4-over-Ethernet ARP; None otherwise."""
    if len(frame) < 14:
        return None
    dst, src = frame[0:6], frame[6:12]
    (ethertype,) = struct.unpack("!H", frame[12:14])
    offset, vlan = 14, None
    if ethertype == ETH_P_8021Q and len(frame) >= 18:
        (tci,) = struct.unpack("!H", frame[14:16])
        vlan = tci & 0x0FFF
        (ethertype,) = struct.unpack("!H", frame[16:18])
        offset = 18
    if ethertype != ETH_P_ARP or len(frame) < offset + 28:
        return None
    htype, ptype, hlen, plen, op = struct.unpack("!HHBBH", frame[offset : offset + 8])
    if (htype, ptype, hlen, plen) != (1, 0x0800, 6, 4):
        return None
    body = frame[offset + 8 : offset + 28]
    return ArpFrame(
        timestamp=timestamp,
        eth_src=_mac(src),
        eth_dst=_mac(dst),
        vlan=vlan,
        op=op,
        sender_mac=_mac(body[0:6]),
        sender_ip=str(ipaddress.IPv4Address(body[6:10])),
        target_mac=_mac(body[10:16]),
        target_ip=str(ipaddress.IPv4Address(body[16:20])),
    )


def parse_tcpdump_hex(text: str) -> list[ArpFrame]:
    """Parse ``tcpdump -tt -n -xx`` output: a header line per packet, then ``\\t0xOFFS:  hhhh hhhh ...`` lines."""
    frames: list[ArpFrame] = []
    timestamp: float | None = None
    data = bytearray()

    def flush() -> None:
        if timestamp is not None:
            frame = parse_frame(timestamp, bytes(data))
            if frame is not None:
                frames.append(frame)

    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("0x") and ":" in stripped:
            hexpart = stripped.split(":", 1)[1]
            # tcpdump puts two spaces before the (optional) ASCII column; -xx prints none, but be safe.
            hexpart = hexpart.strip().split("  ")[0]
            data.extend(bytes.fromhex(hexpart.replace(" ", "")))
        elif stripped and not line[0].isspace():
            flush()
            try:
                timestamp = float(stripped.split()[0])
            except ValueError:
                timestamp = None
            data = bytearray()
    flush()
    return frames


def garp_filter(ip: str, eth_src: str | None = None) -> str:
    """A BPF expression matching gratuitous ARP requests for ``ip`` (sender IP == target IP == ``ip``)."""
    value = int(ipaddress.IPv4Address(ip))
    expr = f"arp and arp[6:2] = 1 and arp[14:4] = {value:#x} and arp[24:4] = {value:#x}"
    if eth_src is not None:
        expr += f" and ether src {eth_src}"
    return expr


class ArpCapture:
    """tcpdump on ``iface`` (in ``netns``, or the root namespace) until ``count`` frames matched ``bpf``.

    Use as a context manager: entering returns once tcpdump is listening (its filter is attached), so frames sent
    after that are seen; :meth:`wait` returns the parsed frames. Exiting ends tcpdump's process group.
    """

    def __init__(
        self,
        iface: str,
        *,
        bpf: str = "arp",
        count: int = 1,
        netns: str | None = None,
        registry: ProcessRegistry | None = None,
    ) -> None:
        self.iface = iface
        self.bpf = bpf
        self.count = count
        self.netns = netns
        self._registry = registry
        self.proc: subprocess.Popen[bytes] | None = None
        self._stdout = bytearray()
        self._stderr = bytearray()
        self._listening = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self, timeout: float = 20.0) -> None:
        argv = ["tcpdump", "-i", self.iface, "-tt", "-n", "-l", "-xx", "-c", str(self.count), self.bpf]
        if self.netns is not None:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        if self._registry is not None:
            self._registry.add(self.proc)
        assert self.proc.stdout is not None
        assert self.proc.stderr is not None
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self._stdout, False), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self._stderr, True), daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        proc = self.proc

        def listening() -> bool:
            if self._listening.is_set():
                return True
            if proc.poll() is not None:
                raise RuntimeError(f"tcpdump exited with {proc.returncode}: {self.stderr_text}")
            return False

        try:
            eventually_sync(listening, timeout=timeout, what=f"tcpdump listening on {self.iface}")
        except BaseException:
            self.close()
            raise

    def _pump(self, stream: IO[bytes], sink: bytearray, watch_listening: bool) -> None:
        for line in iter(stream.readline, b""):
            sink.extend(line)
            if watch_listening and b"listening on" in line:
                self._listening.set()

    @property
    def stderr_text(self) -> str:
        return self._stderr.decode(errors="replace")

    @property
    def frames(self) -> list[ArpFrame]:
        """Frames parsed so far."""
        return parse_tcpdump_hex(self._stdout.decode(errors="replace"))

    def wait(self, timeout: float) -> list[ArpFrame]:
        """Wait until tcpdump has captured ``count`` frames and exited; raise TimeoutError after ``timeout`` s."""
        if self.proc is None:
            raise RuntimeError("capture not started")
        proc = self.proc
        start = time.monotonic()
        eventually_sync(
            lambda: proc.poll() is not None,
            timeout=timeout,
            what=f"{self.count} frame(s) matching {self.bpf!r} on {self.iface}",
        )
        for thread in self._threads:
            thread.join(max(0.1, timeout - (time.monotonic() - start)))
        if proc.returncode != 0:
            raise RuntimeError(f"tcpdump exited with {proc.returncode}: {self.stderr_text}")
        return self.frames

    def close(self) -> None:
        if self.proc is not None:
            terminate_group(self.proc, timeout=2.0)
            for thread in self._threads:
                thread.join(1.0)
