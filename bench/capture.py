"""P3 — capture: ARP at rising rates over a background of non-ARP traffic, seen by the watcher's TPACKET_V3 ring
reader, by a libpcap binding (pcapy-ng, whose libpcap also reads a TPACKET_V3 ring) and by tcpdump, on the same
port and the same replay.

    python -m bench.capture [--rates 20000,50000,100000,200000,400000] [--seconds 1.5] [--max-arp 400000]
        [--readers ring,pcapy,tcpdump] [--block-size 16384] [--block-count 1024] [--retire-ms 1] [--json]

One run, in a closed lab (tests/lab: namespaces `hv<hex>-*` on a bridge of their own, no route out):

* a pcap is generated once: repeating units of four 60-byte frames — a gratuitous ARP request for address k
  of 10,000 (198.18.0.1 …, sender MAC 02:c6:<address>), a UDP broadcast, an ordinary ARP request (who-has,
  198.19.0.0/16 asking for 198.18.x.y: not a claim), another UDP broadcast (198.19.128.0/17 → 198.19.255.255,
  broadcast MAC so the bridge floods it to the capture port as it floods ARP): half the frames are ARP;
* for each rate R (ARP frames/s) and each reader **one after another** (never concurrently: on two cores
  three readers would take CPU from each other and from the sender), the reader is started on `eth0` of a
  capture namespace (a bridge port), then `tcpreplay --pps 2R --limit N` replays the first N frames of the
  pcap from a host namespace through the bridge, N = 2 × clamp(R × seconds, 20,000, max-arp) ARP frames
  (so every step carries every one of the 10,000 claims at least once, and lasts a bounded time);
* each reader is given the same filter: the watcher's `ARP_BPF_FILTER` (ring), `arp or (vlan and arp)` (pcapy,
  compiled by libpcap), `arp` (tcpdump `-w /dev/null -B <ring size in KiB>`: the same kernel buffer as the
  ring). The two Python readers parse and classify every frame (frames.parse_frame, claims.claim_from_frame)
  and collect the distinct claims (sender IP, sender MAC); tcpdump only writes to /dev/null — the C floor;
* reported per step: frames sent (tcpreplay), ARP frames the reader saw, the kernel's packet and drop
  counters for its socket, distinct claims seen against those in the replayed frames, and the CPU the
  reader used. A step passes with zero kernel drops, every ARP frame seen and every claim seen.

The lab (namespaces, bridge, tcpreplay and tcpdump process groups) and the pcap are removed at the end, also
on failure, Ctrl-C or SIGTERM. Each step is bounded (tcpreplay by its frame count and a timeout, the readers'
drain by a deadline); the default run takes about a minute and a half.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from bench.common import machine, machine_cpu_s, own_cpu_s, process_cpu_s, say
from services.arp_watcher.capture import CaptureStats
from services.arp_watcher.capture_thread import CaptureThread
from services.arp_watcher.claims import Claim, claim_from_frame
from services.arp_watcher.frames import ARP_REQUEST, MalformedFrame, NotArp, parse_frame
from services.arp_watcher.packet_socket import network_namespace
from services.arp_watcher.ring import (
    DEFAULT_BLOCK_COUNT,
    DEFAULT_BLOCK_SIZE,
    DEFAULT_RETIRE_TIMEOUT_MS,
    open_ring_reader,
)
from tests.lab import CaptureNamespace, Lab, LabHost
from tests.lab.arp_frames import build_arp_frame
from tests.lab.proc import terminate_group
from tests.waiting import eventually_sync

HAVIPS = 10_000
FIRST_HAVIP = int(ipaddress.IPv4Address("198.18.0.1"))
ASKERS = int(ipaddress.IPv4Address("198.19.0.0"))
UDP_SOURCES = int(ipaddress.IPv4Address("198.19.128.0"))
UDP_BROADCAST = int(ipaddress.IPv4Address("198.19.255.255"))
SCALE_NETWORK = ipaddress.IPv4Network("198.18.0.0/15")
FRAMES_PER_UNIT = 3  # GARP, UDP, ARP request
ARP_PER_UNIT = 2
MIN_ARP_PER_STEP = HAVIPS * ARP_PER_UNIT  # one full round of the 10,000 claims
BROADCAST = b"\xff" * 6
READERS = ("ring", "pcapy", "tcpdump")


# ---- the traffic ---------------------------------------------------------------------------------------------


def havip_address(k: int) -> int:
    return FIRST_HAVIP + k


def havip_mac(address: int) -> bytes:
    return b"\x02\xc6" + address.to_bytes(4, "big")


def ipv4_checksum(header: bytes) -> int:
    total: int = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_broadcast_frame(source: int) -> bytes:
    """A 60-byte Ethernet/IPv4/UDP broadcast (discard port) from `source` to 198.19.255.255."""
    payload = b"\x00" * 18
    udp = struct.pack("!HHHH", 9, 9, 8 + len(payload), 0) + payload
    header = struct.pack("!BBHHHBBHII", 0x45, 0, 20 + len(udp), 0, 0, 1, 17, 0, source, UDP_BROADCAST)
    header = header[:10] + struct.pack("!H", ipv4_checksum(header)) + header[12:]
    return BROADCAST + havip_mac(source) + b"\x08\x00" + header + udp


def traffic_unit(k: int) -> list[bytes]:
    """Unit k of the replay: a GARP for HAVIP k % 10,000, a UDP broadcast, an ordinary ARP request."""
    havip = havip_address(k % HAVIPS)
    asker = ASKERS + (k % 65_000) + 1
    return [
        build_arp_frame(oper=ARP_REQUEST, sender_mac=havip_mac(havip), sender_ip=havip, target_ip=havip),
        udp_broadcast_frame(UDP_SOURCES + (k % 30_000) + 1),
        build_arp_frame(oper=ARP_REQUEST, sender_mac=havip_mac(asker), sender_ip=asker, target_ip=havip),
    ]


def expected_claims(units: int) -> set[tuple[int, bytes]]:
    """The distinct claims (sender IP, sender MAC) in the first `units` units of the replay."""
    return {(havip_address(k), havip_mac(havip_address(k))) for k in range(min(units, HAVIPS))}


def write_pcap(path: Path, units: int) -> None:
    """`units` units (the frames repeat every 10,000 units) as a classic pcap file, Ethernet link type."""
    base = []
    for k in range(min(units, HAVIPS)):
        for frame in traffic_unit(k):
            base.append(struct.pack("=IIII", 0, 0, len(frame), len(frame)) + frame)
    round_bytes = b"".join(base)
    with path.open("wb") as out:
        out.write(struct.pack("=IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        full, rest = divmod(units, HAVIPS)
        for _ in range(full):
            out.write(round_bytes)
        out.write(b"".join(base[: rest * FRAMES_PER_UNIT]))


# ---- the readers ---------------------------------------------------------------------------------------------


@dataclass
class ReaderResult:
    reader: str
    arp_seen: int
    kernel_packets: int
    kernel_drops: int
    claims_seen: int
    claims_expected: int
    cpu_s: float
    note: str = ""


class Reader(Protocol):
    name: str

    def start(self) -> None: ...

    def seen(self) -> int | None: ...

    def stop(self) -> tuple[int, int, int, set[tuple[int, bytes]], float]:
        """(ARP frames seen, kernel packets, kernel drops, distinct claims, CPU s)."""
        ...


class ClaimSet:
    """The sink both Python readers feed: distinct (sender IP, sender MAC)."""

    def __init__(self) -> None:
        self.distinct: set[tuple[int, bytes]] = set()

    def sink(self, batch: list[Claim]) -> None:
        self.distinct.update([(claim.sender_ip, claim.sender_mac) for claim in batch])


class RingReader:
    name = "ring"

    def __init__(self, netns: str, block_size: int, block_count: int, retire_ms: int) -> None:
        self.claims = ClaimSet()
        ring = open_ring_reader(
            "eth0", netns=netns, block_size=block_size, block_count=block_count, retire_timeout_ms=retire_ms
        )
        self.capture = CaptureThread(ring, self.claims.sink)
        self.cpu_at_start = 0.0

    def start(self) -> None:
        self.cpu_at_start = own_cpu_s()
        self.capture.start()

    def seen(self) -> int | None:
        return self.capture.stats.frames

    def stop(self) -> tuple[int, int, int, set[tuple[int, bytes]], float]:
        self.capture.stop()
        if self.capture.error is not None:
            raise RuntimeError(f"ring capture failed: {self.capture.error!r}")
        stats = self.capture.stats
        cpu = own_cpu_s() - self.cpu_at_start
        return stats.frames, stats.kernel_packets, stats.kernel_drops, self.claims.distinct, cpu


class PcapyReader:
    """pcapy-ng (libpcap, TPACKET_V3 ring of the same size) in a thread, parsing and classifying as the watcher
    does. Non-blocking handle and our own poll(2) on its descriptor: in blocking mode libpcap's TPACKET_V3
    reader waits without a timeout while no packet comes, so a stop would never be noticed."""

    name = "pcapy"
    META = struct.Struct("=IIII")  # next_batch: sec, usec, offset, caplen

    def __init__(self, netns: str, buffer_bytes: int, timeout_ms: int) -> None:
        import pcapy  # type: ignore[import-not-found]  # a benchmark-only dependency, untyped

        self.claims = ClaimSet()
        self.stats = CaptureStats()
        with network_namespace(netns):  # the socket is created (and stays) in the capture namespace
            handle = pcapy.create("eth0")
            handle.set_snaplen(256)
            handle.set_promisc(True)
            handle.set_timeout(timeout_ms)
            handle.set_buffer_size(buffer_bytes)
            handle.activate()
        handle.setfilter("arp or (vlan and arp)")
        handle.setnonblock(True)
        self.handle = handle
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pcapy-reader", daemon=True)
        self.error: BaseException | None = None
        self.cpu_at_start = 0.0

    def start(self) -> None:
        self.cpu_at_start = own_cpu_s()
        self._thread.start()

    def seen(self) -> int | None:
        return self.stats.frames

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:
            self.error = exc

    def _loop(self) -> None:
        poller = select.poll()
        poller.register(self.handle.getfd(), select.POLLIN)
        unpack = self.META.unpack_from
        stats = self.stats
        malformed = stats.malformed
        while not self._stop.is_set():
            packets, meta = self.handle.next_batch(4096)
            if not meta:
                poller.poll(100)
                continue
            claims: list[Claim] = []
            for i in range(0, len(meta), 16):
                sec, usec, offset, caplen = unpack(meta, i)
                try:
                    frame = parse_frame(bytes(packets[offset : offset + caplen]))
                except MalformedFrame as exc:
                    malformed[exc.reason] += 1
                    continue
                except NotArp:
                    stats.not_arp += 1
                    continue
                claim = claim_from_frame(frame, sec * 1_000_000_000 + usec * 1000)
                if claim is None:
                    stats.not_claims += 1
                else:
                    claims.append(claim)
            stats.claims += len(claims)
            if claims:
                self.claims.sink(claims)

    def stop(self) -> tuple[int, int, int, set[tuple[int, bytes]], float]:
        self._stop.set()
        self._thread.join(10)
        if self.error is not None:
            raise RuntimeError(f"pcapy reader failed: {self.error!r}")
        received, dropped, _ifdropped = self.handle.stats()
        cpu = own_cpu_s() - self.cpu_at_start
        self.handle.close()
        # libpcap's ps_recv already excludes nothing: TPACKET_V3 tp_packets counts the dropped frames too.
        return self.stats.frames, received, dropped, self.claims.distinct, cpu


class TcpdumpReader:
    """`tcpdump -w /dev/null -B KiB arp` in the capture namespace; SIGUSR1 makes it print its counters."""

    name = "tcpdump"
    CAPTURED = re.compile(rb"(\d+) packets? captured")
    RECEIVED = re.compile(rb"(\d+) packets? received by filter")
    DROPPED = re.compile(rb"(\d+) packets? dropped by kernel")

    def __init__(self, namespace: CaptureNamespace, workdir: Path, buffer_kib: int) -> None:
        self.namespace = namespace
        self.log_path = workdir / "tcpdump.err"
        self.buffer_kib = buffer_kib
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("wb") as err:
            self.proc = self.namespace.popen(
                "tcpdump", "-i", "eth0", "-n", "-w", "/dev/null", "-B", str(self.buffer_kib), "arp", stderr=err
            )
        proc = self.proc

        def listening() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"tcpdump exited: {self.log_path.read_text(errors='replace')}")
            return b"listening on" in self.log_path.read_bytes()

        try:
            eventually_sync(listening, timeout=15, what="tcpdump listening")
        except TimeoutError as exc:
            raise RuntimeError(f"tcpdump did not start: {self.log_path.read_text(errors='replace')}") from exc

    def _last(self, pattern: re.Pattern[bytes]) -> int:
        found = pattern.findall(self.log_path.read_bytes())
        return int(found[-1]) if found else 0

    def seen(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None
        before = self.log_path.stat().st_size
        os.kill(self.proc.pid, signal.SIGUSR1)  # tcpdump prints "N packets captured" and carries on
        with contextlib.suppress(TimeoutError):  # no new line: the last counters printed are still the latest
            eventually_sync(
                lambda: self.log_path.stat().st_size != before, timeout=2, interval=0.01, what="tcpdump's counters"
            )
        return self._last(self.CAPTURED)

    def stop(self) -> tuple[int, int, int, set[tuple[int, bytes]], float]:
        assert self.proc is not None
        cpu = process_cpu_s(self.proc.pid)
        os.kill(self.proc.pid, signal.SIGINT)  # prints the final counters and exits
        try:
            self.proc.wait(10)
        finally:
            terminate_group(self.proc, timeout=2)
        text = self.log_path.read_bytes()
        if b"dropped by kernel" not in text:
            raise RuntimeError(f"tcpdump printed no counters: {text.decode(errors='replace')}")
        return self._last(self.CAPTURED), self._last(self.RECEIVED), self._last(self.DROPPED), set(), cpu


# ---- one step ------------------------------------------------------------------------------------------------


@dataclass
class Replay:
    frames_sent: int
    frames_failed: int
    seconds: float
    pps: float


def replay(sender: LabHost, pcap: Path, pps: int, frames: int) -> Replay:
    """Replay the first `frames` frames at `pps` frames/s (0: as fast as tcpreplay can)."""
    speed = ["--topspeed"] if pps == 0 else [f"--pps={pps}"]
    if pps >= 100_000:
        speed.append(f"--pps-multi={pps // 20_000}")  # fewer, larger timed bursts: less timer slop
    argv = ["tcpreplay", "-i", "eth0", *speed, f"--limit={frames}", "--preload-pcap", str(pcap)]
    proc = sender.run(*argv, timeout=frames / 20_000 + 60)
    out = proc.stdout + proc.stderr
    sent = re.search(r"Actual: (\d+) packets .* sent in ([\d.]+) seconds", out)
    failed = re.search(r"Failed packets:\s+(\d+)", out)
    rated = re.search(r"Rated: .*?([\d.]+) pps", out)
    if sent is None:
        raise RuntimeError(f"cannot read tcpreplay's summary: {out}")
    return Replay(
        frames_sent=int(sent.group(1)),
        frames_failed=int(failed.group(1)) if failed else 0,
        seconds=float(sent.group(2)),
        pps=float(rated.group(1)) if rated else int(sent.group(1)) / max(float(sent.group(2)), 1e-9),
    )


def wait_drained(reader: Reader, expected: int, timeout_s: float = 15.0, quiet_s: float = 1.5) -> None:
    """Until the reader has seen `expected` ARP frames, or saw nothing new for `quiet_s` (it will not catch up:
    the rest was dropped), within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last, last_change = -1, time.monotonic()
    while time.monotonic() < deadline:
        seen = reader.seen()
        if seen is None or seen >= expected:
            return
        if seen != last:
            last, last_change = seen, time.monotonic()
        elif time.monotonic() - last_change > quiet_s:
            return
        time.sleep(0.05)


@dataclass
class Step:
    arp_rate: int
    arp_frames: int
    frames: int
    claims_expected: int
    results: list[dict[str, Any]] = field(default_factory=list)


def run_step(
    rate: int,
    args: argparse.Namespace,
    lab: Lab,
    sender: LabHost,
    capture_ns: CaptureNamespace,
    pcap: Path,
) -> Step:
    arp = step_arp_frames(rate, args)
    units = arp // ARP_PER_UNIT
    frames = units * FRAMES_PER_UNIT
    expected = expected_claims(units)
    step = Step(arp_rate=rate, arp_frames=arp, frames=frames, claims_expected=len(expected))
    ring_bytes = args.block_size * args.block_count
    makers: dict[str, Callable[[], Reader]] = {
        "ring": lambda: RingReader(capture_ns.netns, args.block_size, args.block_count, args.retire_ms),
        "pcapy": lambda: PcapyReader(capture_ns.netns, ring_bytes, args.retire_ms),
        "tcpdump": lambda: TcpdumpReader(capture_ns, lab.workdir, ring_bytes // 1024),
    }
    for name in args.readers:
        reader = makers[name]()
        try:
            reader.start()
            busy0, total0 = machine_cpu_s()
            sent = replay(sender, pcap, rate * FRAMES_PER_UNIT // ARP_PER_UNIT, frames)
            busy1, total1 = machine_cpu_s()
            wait_drained(reader, arp)
        finally:
            seen, packets, drops, claims, cpu = reader.stop()
        achieved = sent.pps * ARP_PER_UNIT / FRAMES_PER_UNIT
        result = {
            "reader": name,
            "frames_sent": sent.frames_sent,
            "frames_failed": sent.frames_failed,
            "arp_rate_achieved": round(achieved),
            "arp_seen": seen,
            "kernel_packets": packets,
            "kernel_drops": drops,
            "claims_seen": len(claims & expected) if name != "tcpdump" else None,
            "claims_unexpected": len(claims - expected) if name != "tcpdump" else None,
            "cpu_s": round(cpu, 3),
            "machine_busy": round((busy1 - busy0) / max(total1 - total0, 1e-9), 2),
        }
        result["pass"] = (
            drops == 0
            and sent.frames_failed == 0
            and seen == arp
            and (result["claims_seen"] in (None, len(expected)))
            and not result["claims_unexpected"]
        )
        asked = f"{rate:>7,}" if rate else "    max"
        say(
            f"  {asked} ARP/s {name:<8} sent {sent.frames_sent:,} ({achieved:,.0f} ARP/s) seen {seen:,}/{arp:,}"
            f" kernel {packets:,} drops {drops:,}"
            + (f" claims {result['claims_seen']:,}/{len(expected):,}" if name != "tcpdump" else "")
            + f" cpu {cpu:.2f} s machine {result['machine_busy']:.0%} busy {'ok' if result['pass'] else 'FAIL'}"
        )
        step.results.append(result)
    return step


# ---- main ----------------------------------------------------------------------------------------------------


def step_arp_frames(rate: int, args: argparse.Namespace) -> int:
    seconds: float = args.seconds
    most: int = args.max_arp
    arp = min(max(int((rate or 1_000_000) * seconds), MIN_ARP_PER_STEP), most)
    return arp - arp % ARP_PER_UNIT


def best_rates(steps: Sequence[Step], readers: Sequence[str]) -> dict[str, int | None]:
    """Per reader: the highest ARP rate *achieved by the sender* in a passing step, over the run of passing
    steps from the lowest asked rate up (the first failing step ends it)."""
    best: dict[str, int | None] = {}
    for name in readers:
        best[name] = None
        for step in steps:
            result = next(r for r in step.results if r["reader"] == name)
            if not result["pass"]:
                break
            best[name] = max(best[name] or 0, result["arp_rate_achieved"])
    return best


def render(report: dict[str, Any]) -> str:
    lines = [
        "| ARP/s asked | achieved | ARP frames (of frames) | reader | ARP seen | kernel packets | kernel drops "
        "| claims seen | reader CPU s (µs/frame) | machine busy | pass |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for step in report["steps"]:
        for r in step["results"]:
            claims = "—" if r["claims_seen"] is None else f"{r['claims_seen']:,} / {step['claims_expected']:,}"
            per_frame = r["cpu_s"] / max(r["arp_seen"], 1) * 1e6
            asked = f"{step['arp_rate']:,}" if step["arp_rate"] else "max"
            lines.append(
                f"| {asked} | {r['arp_rate_achieved']:,} | {step['arp_frames']:,} "
                f"({step['frames']:,}) | {r['reader']} | {r['arp_seen']:,} | {r['kernel_packets']:,} "
                f"| {r['kernel_drops']:,} | {claims} | {r['cpu_s']:.2f} ({per_frame:.1f}) "
                f"| {r['machine_busy']:.0%} | {'yes' if r['pass'] else '**no**'} |"
            )
    lines.append("")
    for name, rate in report["best"].items():
        shown = "none" if rate is None else f"{rate:,} ARP frames/s (achieved by the sender)"
        lines.append(f"highest rate with zero kernel drops and every frame and claim seen — {name}: {shown}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.capture", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rates", default="20000,50000,100000,200000,max", help="ARP frames/s, comma-separated; max: topspeed"
    )
    parser.add_argument("--seconds", type=float, default=1.5, help="length of a step at its rate (default 1.5)")
    parser.add_argument("--max-arp", type=int, default=300_000, help="most ARP frames in a step (default 300000)")
    parser.add_argument("--readers", default=",".join(READERS), help="comma-separated, from ring,pcapy,tcpdump")
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE, help="ring block size, bytes")
    parser.add_argument("--block-count", type=int, default=DEFAULT_BLOCK_COUNT, help="ring blocks")
    parser.add_argument(
        "--retire-ms", type=int, default=DEFAULT_RETIRE_TIMEOUT_MS, help="block retire timeout, ms"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    args = parser.parse_args(argv)
    try:
        args.rates = [0 if r == "max" else int(r) for r in args.rates.split(",")]
    except ValueError:
        parser.error("--rates must be integers")
    args.readers = [r for r in args.readers.split(",") if r]
    if not args.readers or any(r not in READERS for r in args.readers):
        parser.error(f"--readers must be taken from {','.join(READERS)}")
    if any(r and not 1_000 <= r <= 1_000_000 for r in args.rates):
        parser.error("--rates must be 1000..1000000 ARP frames/s")
    if not 0.1 <= args.seconds <= 5 or not MIN_ARP_PER_STEP <= args.max_arp <= 1_000_000:
        parser.error(f"--seconds must be 0.1..5 and --max-arp {MIN_ARP_PER_STEP}..1000000")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    steps: list[Step] = []
    with Lab("192.0.2.0/24") as lab:
        sender = lab.add_host("replay", "192.0.2.10")
        capture_ns = lab.add_capture_namespace("cap")
        pcap = lab.workdir / "p3.pcap"
        most_units = max(step_arp_frames(rate, args) for rate in args.rates) // ARP_PER_UNIT
        write_pcap(pcap, most_units)
        say(f"lab {lab.prefix}: pcap of {most_units * FRAMES_PER_UNIT:,} frames ({pcap})")
        for rate in args.rates:
            steps.append(run_step(rate, args, lab, sender, capture_ns, pcap))
    assert all(ipaddress.IPv4Address(havip_address(k)) in SCALE_NETWORK for k in (0, HAVIPS - 1))
    report: dict[str, Any] = {
        "benchmark": "P3",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench.capture", *sys.argv[1:]]),
        "machine": machine(),
        "parameters": {k: v for k, v in vars(args).items() if k != "json"},
        "steps": [asdict(s) for s in steps],
        "best": best_rates(steps, args.readers),
    }
    best = report["best"]
    report["pass"] = (best.get("ring") or 0) >= 100_000
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        say("the lab needs root (network namespaces, raw sockets)")
        return 2

    def interrupted(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # unwinds through every `with` and `finally`: the lab is torn down

    signal.signal(signal.SIGTERM, interrupted)
    started = time.monotonic()
    try:
        report = run(args)
    except KeyboardInterrupt:
        say("interrupted; the lab was torn down")
        return 130
    except Exception as exc:
        say("".join(traceback.format_exception(exc)).rstrip())
        say(f"benchmark failed: {exc!r}; the lab was torn down")
        return 2
    report["wall_s"] = round(time.monotonic() - started, 1)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        m = report["machine"]
        print(f"{report['date']}  {m['host']}: {m['cores']} cores ({m['cpu']}), kernel {m['kernel']}")
        print(f"{report['command']}  ({report['wall_s']} s)\n")
        print(render(report))
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
