"""The ARP watcher for real: a private two-namespace lab, a raw capture socket, arping, RabbitMQ.

Lab (prefix "aw" + 5 hex digits, torn down even when a test fails)::

    netns <prefix>-w: eth0 192.0.2.1/24   ── veth ──   netns <prefix>-p: eth0 192.0.2.2/24
      (the capture socket is opened here          (the "server": arping and raw frames
       via setns, as HAVIP_NETNS does)              are sent from here)

No routes out, IPv6 off, addresses only from the documentation ranges; nothing is sent outside these two
namespaces. Needs root (network namespaces, raw sockets) and arping; the last tests need RabbitMQ.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aio_pika
import pytest

from services.arp_watcher.capture_thread import CaptureThread
from services.arp_watcher.claims import Claim
from services.arp_watcher.encoding import encode_claims
from services.arp_watcher.frames import ARP_REQUEST
from services.arp_watcher.packet_socket import network_namespace
from services.arp_watcher.socket_reader import open_socket_reader
from shared.events import (
    CLAIMS_EVENT,
    WATCHER_HEARTBEAT_EVENT,
    ClaimsObserved,
    ObservedClaim,
    WatcherHeartbeat,
    decode,
)
from shared.partitions import ALL_CLAIMS, DEFAULT_PARTITIONS, claims_routing_key, partition_of
from tests import service_logs
from tests.collected_claims import CollectedClaims
from tests.lab.arp_frames import build_arp_frame
from tests.metrics_text import value
from tests.ports import free_port
from tests.tcp_proxy import CuttableProxy
from tests.unprivileged import assert_nobody_with_net_raw_only, python_as_nobody_with_net_raw
from tests.waiting import eventually

ROOT = Path(__file__).resolve().parents[2]
LAB_NETWORKS = [ipaddress.IPv4Network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")]


def sh(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def ip4(address: str) -> int:
    addr = ipaddress.IPv4Address(address)
    assert any(addr in net for net in LAB_NETWORKS), f"{addr} is outside the lab's documentation ranges"
    return int(addr)


@dataclass
class Lab:
    prefix: str
    watch_ns: str
    peer_ns: str
    peer_mac: str

    def in_peer(self, *args: str, timeout: float = 10, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh(
            "ip", "netns", "exec", self.peer_ns, "timeout", str(timeout), *args, check=check, timeout=timeout + 5
        )

    def arping(
        self, address: str, *, count: int = 1, reply: bool = False, vlan: int | None = None, iface: str = "eth0"
    ) -> None:
        """Gratuitous ARP from the peer, as keepalived sends it (request; with `reply`, an ARP reply)."""
        ip4(address)
        args = ["arping", "-q", "-U", "-c", str(count), "-W", "0.02", "-i", iface, "-S", address]
        if reply:
            args.append("-P")
        if vlan is not None:
            args += ["-V", str(vlan)]
        result = self.in_peer(*args, address, check=False)
        # arping exits 1 when nobody answered, which is what unsolicited ARP expects.
        assert result.returncode in (0, 1), result.stderr

    def send_frames(self, frames: list[bytes]) -> None:
        """Send raw Ethernet frames out of the peer's eth0."""
        with network_namespace(self.peer_ns):
            sender = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        with sender:
            sender.bind(("eth0", 0))
            for frame in frames:
                sender.send(frame)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    prefix = "aw" + secrets.token_hex(3)[:5]
    watch_ns, peer_ns = f"{prefix}-w", f"{prefix}-p"
    try:
        sh("ip", "netns", "add", watch_ns)
        sh("ip", "netns", "add", peer_ns)
        sh("ip", "link", "add", f"{prefix}w", "type", "veth", "peer", "name", f"{prefix}p")
        sh("ip", "link", "set", f"{prefix}w", "netns", watch_ns)
        sh("ip", "link", "set", f"{prefix}p", "netns", peer_ns)
        sh("ip", "-n", watch_ns, "link", "set", f"{prefix}w", "name", "eth0")
        sh("ip", "-n", peer_ns, "link", "set", f"{prefix}p", "name", "eth0")
        for ns, address in ((watch_ns, "192.0.2.1/24"), (peer_ns, "192.0.2.2/24")):
            sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
            sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1")
            sh("ip", "-n", ns, "addr", "add", address, "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
        links = json.loads(sh("ip", "-j", "-n", peer_ns, "link", "show", "eth0").stdout)
        yield Lab(prefix, watch_ns, peer_ns, links[0]["address"])
    finally:
        sh("ip", "netns", "del", watch_ns, check=False)
        sh("ip", "netns", "del", peer_ns, check=False)
        sh("ip", "link", "del", f"{prefix}w", check=False)  # only left if set-up failed half-way
    assert prefix not in sh("ip", "netns", "list").stdout
    assert prefix not in sh("ip", "link").stdout


@contextlib.contextmanager
def capturing(lab: Lab) -> Iterator[tuple[CaptureThread, CollectedClaims]]:
    collected = CollectedClaims()
    capture = CaptureThread(open_socket_reader("eth0", netns=lab.watch_ns), collected.sink)
    capture.start()
    try:
        yield capture, collected
    finally:
        capture.stop()
    assert capture.error is None


def marker_frame(mac: bytes = bytes.fromhex("02aaaaaaaaaa"), address: str = "203.0.113.254") -> bytes:
    return build_arp_frame(oper=ARP_REQUEST, sender_mac=mac, sender_ip=ip4(address), target_ip=ip4(address))


def event(claim: Claim) -> ObservedClaim:
    """The claim as the binding service reads it (fast encoder, pydantic contract)."""
    _env, data = decode(encode_claims([claim], watcher_id="test", interface="eth0", source="test").body)
    assert isinstance(data, ClaimsObserved)
    return data.claims[0]


# ---- capture --------------------------------------------------------------------------------------------------


def test_keepalived_style_garp_requests_are_claims(lab: Lab) -> None:
    with capturing(lab) as (_capture, collected):
        before = time.time_ns()
        lab.arping("192.0.2.10", count=3)
        after = time.time_ns()
        claims = collected.take(3)
    for claim in claims:
        ev = event(claim)
        assert ev.kind == "garp_request"
        assert ev.sender_mac == ev.eth_src == lab.peer_mac
        assert ev.sender_ip == ev.target_ip == ipaddress.IPv4Address("192.0.2.10")
        assert ev.vlan is None
        assert before <= ev.captured_at <= after  # kernel receive time, same clock as time.time_ns()
    assert claims[0].captured_at < claims[1].captured_at < claims[2].captured_at


def test_gratuitous_arp_reply_is_a_claim(lab: Lab) -> None:
    with capturing(lab) as (_capture, collected):
        lab.arping("192.0.2.11", reply=True)
        (claim,) = collected.take(1)
    ev = event(claim)
    assert (ev.kind, ev.sender_ip, ev.sender_mac) == (
        "arp_reply",
        ipaddress.IPv4Address("192.0.2.11"),
        lab.peer_mac,
    )
    assert abs(time.time_ns() - ev.captured_at) < 5_000_000_000


def test_probes_requests_mismatches_and_malformed_frames(lab: Lab) -> None:
    peer = bytes.fromhex(lab.peer_mac.replace(":", ""))
    spoofed_src = bytes.fromhex("02000000beef")
    vip = ip4("192.0.2.12")
    good = build_arp_frame(oper=ARP_REQUEST, sender_mac=peer, sender_ip=vip, target_ip=vip)
    frames = [
        build_arp_frame(oper=ARP_REQUEST, sender_mac=peer, sender_ip=0, target_ip=vip),  # RFC 5227 probe
        build_arp_frame(
            oper=ARP_REQUEST, sender_mac=peer, sender_ip=ip4("192.0.2.2"), target_ip=ip4("192.0.2.99")
        ),
        build_arp_frame(oper=ARP_REQUEST, sender_mac=peer, sender_ip=vip, target_ip=vip, eth_src=spoofed_src),
        good[:18] + b"\x07" + good[19:],  # hlen 7
        good[:30],  # truncated ARP
        b"\xff" * 6 + peer + b"\x08\x00" + b"\x45" + b"\x00" * 45,  # IPv4: never leaves the kernel filter
        marker_frame(),
    ]
    with capturing(lab) as (capture, collected):
        lab.send_frames(frames)
        mismatch, marker = collected.take(2)
        capture.poll_kernel_stats()
        stats = capture.stats
        assert collected.queue.empty()
        assert (stats.claims, stats.not_claims, stats.not_arp) == (2, 2, 0)
        assert stats.malformed["bad_hlen"] == 1
        assert stats.malformed["truncated_arp"] == 1
        assert stats.kernel_packets == 6  # the IPv4 frame was filtered out in the kernel
        assert stats.kernel_drops == 0
    ev = event(mismatch)
    assert (ev.sender_mac, ev.eth_src) == (lab.peer_mac, "02:00:00:00:be:ef")
    assert event(marker).sender_ip == ipaddress.IPv4Address("203.0.113.254")


def test_vlan_tag_is_reported(lab: Lab) -> None:
    """A tagged GARP (the tag is put in the frame by the sender; the kernel strips it on receipt and hands it
    over in PACKET_AUXDATA)."""
    with capturing(lab) as (_capture, collected):
        lab.arping("198.51.100.10", vlan=100)
        (claim,) = collected.take(1)
    ev = event(claim)
    assert (ev.vlan, ev.kind, ev.sender_ip) == (100, "garp_request", ipaddress.IPv4Address("198.51.100.10"))


def lab_addresses() -> list[int]:
    return [int(a) for net in LAB_NETWORKS for a in net.hosts()]


def test_burst_is_captured_without_kernel_drops(lab: Lab) -> None:
    addresses = lab_addresses()
    count = 20_000
    frames = [
        build_arp_frame(
            oper=ARP_REQUEST,
            sender_mac=bytes([2, 0, 0, 1, i >> 8 & 0xFF, i & 0xFF]),
            sender_ip=addresses[i % len(addresses)],
            target_ip=addresses[i % len(addresses)],
        )
        for i in range(count)
    ]
    with capturing(lab) as (capture, collected):
        started = time.perf_counter()
        lab.send_frames(frames)
        claims = collected.take(count, timeout_s=30)
        elapsed = time.perf_counter() - started
        capture.poll_kernel_stats()
        assert (capture.stats.kernel_packets, capture.stats.kernel_drops) == (count, 0)
    assert [c.sender_mac for c in claims] == [f[6:12] for f in frames]  # all of them, in order
    print(f"{count} GARPs captured in {elapsed:.3f} s ({count / elapsed:,.0f}/s)")


def test_fuzzed_frames_on_the_wire_never_stop_the_capture(lab: Lab) -> None:
    rng = random.Random(5227)
    base = bytearray(marker_frame(bytes.fromhex("020000000001"), "192.0.2.50"))
    frames = []
    for i in range(30_000):
        frame = bytearray(base) if i % 2 else bytearray(rng.randbytes(rng.randrange(14, 80)))
        for _ in range(rng.randrange(1, 6)):
            frame[rng.randrange(len(frame))] = rng.randrange(256)
        frame[12:14] = b"\x08\x06"  # keep them ARP so the kernel filter lets them through
        frames.append(bytes(frame[: rng.randrange(14, len(frame) + 1)]))
    marker_mac = bytes.fromhex("02aaaaaaaa01")
    frames.append(marker_frame(marker_mac))
    with capturing(lab) as (capture, collected):
        lab.send_frames(frames)
        collected.take_until(lambda c: c.sender_mac == marker_mac)
        capture.poll_kernel_stats()
        assert capture.running
        stats = capture.stats
        assert stats.frames == stats.kernel_packets == len(frames)
        assert stats.kernel_drops == 0
        assert sum(stats.malformed.values()) > 10_000


# ---- the whole watcher: capture + RabbitMQ -------------------------------------------------------------------


def scrape(port: int) -> str:
    """The watcher's metrics, as its /metrics serves them."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        exposition: str = response.read().decode()
    return exposition


async def scrape_until(port: int, holds: Callable[[str], bool], what: str) -> str:
    """The first scrape of the watcher's metrics for which `holds` is true."""
    exposition = ""

    async def scraped() -> bool:
        nonlocal exposition
        exposition = await asyncio.to_thread(scrape, port)
        return holds(exposition)

    try:
        await eventually(scraped, timeout=30, interval=0.05, what=what)
    except TimeoutError as late:
        late.add_note(f"the last scrape:\n{exposition}")
        raise
    return exposition


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def watcher_env(**settings: str) -> dict[str, str]:
    """A watcher process's environment: this one's without any HAVIP_ setting of its own, and `settings`."""
    return {k: v for k, v in os.environ.items() if not k.startswith("HAVIP_")} | settings


class WatcherProcess:
    """`python -m services.arp_watcher` as a child process, its JSON log lines collected as they come."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.entries: list[dict[str, object]] = []
        self.text: list[str] = []
        self._reader = asyncio.create_task(self._read())
        service_logs.follow("arp_watcher", lambda: "".join(self.text), per_test=True)

    @classmethod
    async def start(cls, env: dict[str, str]) -> WatcherProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services.arp_watcher",
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(proc)

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line = raw.decode(errors="replace")
            self.text.append(line)
            with contextlib.suppress(ValueError):
                self.entries.append(json.loads(line))

    async def wait_for_log(self, message: str, timeout_s: float = 30) -> dict[str, object]:
        """The first log entry whose message starts with `message`."""
        found: list[dict[str, object]] = []

        def logged() -> bool:
            found.extend(entry for entry in self.entries if str(entry.get("msg", "")).startswith(message))
            if not found and self._reader.done():
                raise AssertionError(f"watcher ended without logging {message!r}: {''.join(self.text)}")
            return bool(found)

        try:
            await eventually(logged, timeout=timeout_s, what=f"the watcher logging {message!r}")
        except TimeoutError as late:
            late.add_note(f"the watcher's log:\n{''.join(self.text)}")
            raise
        return found[0]

    async def stop(self, timeout_s: float = 15) -> int:
        self.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(timeout_s):
            code = await self.proc.wait()
            await self._reader
        return code

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


@pytest.mark.parametrize("capture", ["ring", "socket"])
async def test_watcher_publishes_claims_to_rabbitmq(lab: Lab, amqp_url: str, capture: str) -> None:
    # The module's own vhost (gone after the module); the prefix also exercises HAVIP_AMQP_PREFIX.
    prefix = f"t{uuid.uuid4().hex[:8]}."
    exchange_name = f"{prefix}havip.events"
    metrics_port = free_port()
    connection = await aio_pika.connect(amqp_url)
    channel = await connection.channel()
    queue_name = f"{prefix}test.arp_watcher"
    watcher: WatcherProcess | None = None
    try:
        exchange = await channel.declare_exchange(exchange_name, aio_pika.ExchangeType.TOPIC, durable=True)
        amqp_queue = await channel.declare_queue(queue_name, durable=False, auto_delete=False)
        await amqp_queue.bind(exchange, routing_key=ALL_CLAIMS)

        env = watcher_env(
            HAVIP_INTERFACE="eth0",
            HAVIP_NETNS=lab.watch_ns,
            HAVIP_AMQP_URL=amqp_url,
            HAVIP_AMQP_PREFIX=prefix,
            HAVIP_WATCHER_ID=f"test/{lab.prefix}",
            HAVIP_METRICS_PORT=str(metrics_port),
            HAVIP_METRICS_HOST="127.0.0.1",
            HAVIP_CAPTURE=capture,
        )
        watcher = await WatcherProcess.start(env)
        started = await watcher.wait_for_log("capture started")
        assert started["capture"] == capture

        before = time.time_ns()
        await asyncio.to_thread(lab.arping, "192.0.2.20", count=3)
        await asyncio.to_thread(lab.arping, "192.0.2.21", reply=True)
        peer = bytes.fromhex(lab.peer_mac.replace(":", ""))
        vip = ip4("192.0.2.22")
        spoofed = build_arp_frame(
            oper=ARP_REQUEST, sender_mac=peer, sender_ip=vip, target_ip=vip, eth_src=bytes.fromhex("02000000beef")
        )
        await asyncio.to_thread(lab.send_frames, [spoofed])
        after = time.time_ns()

        received: list[ObservedClaim] = []
        async with asyncio.timeout(20), amqp_queue.iterator() as messages:
            async for message in messages:
                async with message.process():
                    envelope, data = decode(message.body)
                    assert envelope.type == CLAIMS_EVENT
                    assert envelope.source == "arp_watcher"
                    assert isinstance(data, ClaimsObserved)
                    # each event is its partition's, and routed to it
                    assert {
                        claims_routing_key(partition_of(c.sender_ip, DEFAULT_PARTITIONS)) for c in data.claims
                    } == {message.routing_key}
                    assert data.watcher_id == f"test/{lab.prefix}"
                    assert data.interface == "eth0"
                    received.extend(data.claims)
                if len(received) >= 3:
                    break

        for claim in received:
            assert claim.vlan is None
            assert claim.sender_mac == lab.peer_mac
            assert before <= claim.captured_at <= after
        seen = [(c.kind, str(c.sender_ip), str(c.target_ip), c.eth_src, c.repeats) for c in received]
        assert seen == [
            ("garp_request", "192.0.2.20", "192.0.2.20", lab.peer_mac, 1),  # its two repeats are coalesced
            ("arp_reply", "192.0.2.21", "192.0.2.21", lab.peer_mac, 1),
            ("garp_request", "192.0.2.22", "192.0.2.22", "02:00:00:00:be:ef", 1),  # refused later: eth_mismatch
        ]

        metrics = await scrape_until(
            metrics_port,
            lambda exposition: value(exposition, "havip_watcher_claims_published_total") == 3,
            what="three claims counted as published",
        )
        assert value(metrics, "havip_watcher_frames_total", {"result": "claim"}) == 5
        assert value(metrics, "havip_watcher_claims_coalesced_total") == 2
        assert value(metrics, "havip_watcher_kernel_drops_total") == 0
        assert value(metrics, "havip_watcher_publish_latency_seconds_count") == 3
        assert value(metrics, "havip_watcher_publish_failures_total") == 0

        rss = await asyncio.to_thread(rss_kb, watcher.proc.pid)
        assert rss < 80 * 1024, f"watcher RSS {rss} kB (docs/contract.md#figures, P5: ≤ 80 MB)"

        assert await watcher.stop() == 0
        stopped = await watcher.wait_for_log("stopped")
        assert (
            stopped["published"],
            stopped["coalesced"],
            stopped["kernel_drops"],
            stopped["claims_dropped"],
        ) == (
            3,
            2,
            0,
            0,
        )
        assert "Traceback" not in "".join(watcher.text)
    finally:
        if watcher is not None:
            await watcher.kill()
        await connection.close()


async def test_watcher_keeps_claims_through_a_broker_outage(lab: Lab, amqp_url: str) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}."
    exchange_name = f"{prefix}havip.events"
    queue_name = f"{prefix}test.arp_watcher_outage"
    metrics_port = free_port()
    proxy = CuttableProxy()
    proxy.start()
    connection = await aio_pika.connect(amqp_url)
    channel = await connection.channel()
    watcher: WatcherProcess | None = None
    try:
        exchange = await channel.declare_exchange(exchange_name, aio_pika.ExchangeType.TOPIC, durable=True)
        amqp_queue = await channel.declare_queue(queue_name, durable=False, auto_delete=False)
        await amqp_queue.bind(exchange, routing_key=ALL_CLAIMS)
        env = watcher_env(
            HAVIP_INTERFACE="eth0",
            HAVIP_NETNS=lab.watch_ns,
            HAVIP_AMQP_URL=proxy.url(amqp_url),
            HAVIP_AMQP_PREFIX=prefix,
            HAVIP_PUBLISH_TIMEOUT_S="1",
            HAVIP_COALESCE_WINDOW_S="0",  # every frame reaches the buffer: its merging is what is tested here
            HAVIP_METRICS_PORT=str(metrics_port),
            HAVIP_METRICS_HOST="127.0.0.1",
        )
        watcher = await WatcherProcess.start(env)
        await watcher.wait_for_log("publishing claims")

        async def next_claims(count: int, timeout_s: float) -> list[ObservedClaim]:
            got: list[ObservedClaim] = []

            async def arrived() -> bool:
                while len(got) < count:
                    message = await amqp_queue.get(fail=False)
                    if message is None:
                        return False
                    await message.ack()
                    _env, data = decode(message.body)
                    assert isinstance(data, ClaimsObserved)
                    got.extend(data.claims)
                return True

            await eventually(arrived, timeout=timeout_s, interval=0.05, what=f"{count} claims from the broker")
            return got

        await asyncio.to_thread(lab.arping, "192.0.2.30")
        (first,) = await next_claims(1, 30)
        assert str(first.sender_ip) == "192.0.2.30"

        proxy.cut()
        await asyncio.to_thread(lab.arping, "192.0.2.31")
        await watcher.wait_for_log("publishing 1 claims failed", timeout_s=20)  # in flight, retried
        # While the broker is away the buffer keeps the newest claim of every claimant: a new claimant of .31
        # (twice: kept once), and a burst of three GARPs for .32 (kept once).
        other = "02:aa:aa:aa:aa:aa"
        await asyncio.to_thread(lab.send_frames, [marker_frame(address="192.0.2.31")] * 2)
        await asyncio.to_thread(lab.arping, "192.0.2.32", count=3)
        proxy.start()  # the broker is back: the robust connection reconnects by itself

        during = await next_claims(3, 30)
        assert [(str(c.sender_ip), c.sender_mac, c.repeats) for c in during] == [
            ("192.0.2.31", lab.peer_mac, 1),
            ("192.0.2.31", other, 2),
            ("192.0.2.32", lab.peer_mac, 3),
        ]
        metrics = await asyncio.to_thread(scrape, metrics_port)
        assert (value(metrics, "havip_watcher_publish_failures_total") or 0) >= 1
        assert value(metrics, "havip_watcher_claims_dropped_total") == 0
        assert await watcher.stop() == 0
    finally:
        if watcher is not None:
            await watcher.kill()
        proxy.cut()
        await connection.close()


async def test_watcher_sends_heartbeats_and_skips_those_it_cannot_publish(lab: Lab, amqp_url: str) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}."
    proxy = CuttableProxy()
    proxy.start()
    connection = await aio_pika.connect(amqp_url)
    channel = await connection.channel()
    watcher: WatcherProcess | None = None
    try:
        exchange = await channel.declare_exchange(
            f"{prefix}havip.events", aio_pika.ExchangeType.TOPIC, durable=True
        )
        amqp_queue = await channel.declare_queue(f"{prefix}test.heartbeats", durable=False, auto_delete=False)
        await amqp_queue.bind(exchange, routing_key=WATCHER_HEARTBEAT_EVENT)
        env = watcher_env(
            HAVIP_INTERFACE="eth0",
            HAVIP_NETNS=lab.watch_ns,
            HAVIP_AMQP_URL=proxy.url(amqp_url),
            HAVIP_AMQP_PREFIX=prefix,
            HAVIP_PUBLISH_TIMEOUT_S="1",
            HAVIP_WATCHER_ID=f"test/{lab.prefix}/hb",
            HAVIP_SEGMENT="rack-7",
            HAVIP_HEARTBEAT_INTERVAL_S="0.2",
            HAVIP_METRICS_PORT="0",
        )
        before = datetime.now(UTC)
        watcher = await WatcherProcess.start(env)
        received: list[WatcherHeartbeat] = []

        async def heard(holds: Callable[[WatcherHeartbeat], bool], what: str) -> WatcherHeartbeat:
            """The first heartbeat from now on for which `holds` is true (the ones before it kept too)."""
            found: list[WatcherHeartbeat] = []

            async def arrived() -> bool:
                while not found:
                    message = await amqp_queue.get(fail=False)
                    if message is None:
                        return False
                    await message.ack()
                    head, data = decode(message.body)
                    assert head.source == "arp_watcher"
                    assert isinstance(data, WatcherHeartbeat)
                    received.append(data)
                    if holds(data):
                        found.append(data)
                return True

            await eventually(arrived, timeout=30, interval=0.05, what=what)
            return found[0]

        await heard(lambda beat: len(received) >= 3, "three heartbeats")
        first = received[0]
        assert (first.watcher_id, first.interface, first.segment, first.interval_s) == (
            f"test/{lab.prefix}/hb",
            "eth0",
            "rack-7",
            0.2,
        )
        assert before - timedelta(seconds=1) <= first.started_at <= datetime.now(UTC)
        assert [beat.sequence for beat in received[:3]] == [1, 2, 3]
        assert {beat.started_at for beat in received} == {first.started_at}
        assert first.kernel_drops == 0

        await asyncio.to_thread(lab.arping, "192.0.2.40")
        await heard(lambda beat: beat.claims_published == 1, "a heartbeat counting the claim published")

        proxy.cut()
        await watcher.wait_for_log("heartbeat failed", timeout_s=20)
        proxy.start()
        # Back: the heartbeats go on at their pace; those that failed are not sent late — their numbers are gone.

        def after_a_gap(beat: WatcherHeartbeat) -> bool:
            return beat.sequence > received[-2].sequence + 1

        await heard(after_a_gap, "a heartbeat after the ones skipped during the outage")
        sequences = [beat.sequence for beat in received]
        assert sequences == sorted(set(sequences))
        assert await watcher.stop() == 0
    finally:
        if watcher is not None:
            await watcher.kill()
        proxy.cut()
        await connection.close()


async def test_watcher_needs_only_cap_net_raw(lab: Lab) -> None:
    """R6 (docs/contract.md#reliability): an unprivileged user with CAP_NET_RAW alone captures on a
    root-namespace port of the lab (a veth end with no address, ARP off and IPv6 off, so the host answers
    nothing). Entering a network namespace (HAVIP_NETNS) would need CAP_SYS_ADMIN as well: deployments with only
    NET_RAW use the host network."""
    port_name, peer_name = f"{lab.prefix}r", f"{lab.prefix}q"
    metrics_port = free_port()
    watcher: WatcherProcess | None = None
    with python_as_nobody_with_net_raw("-m", "services.arp_watcher") as command:
        try:
            sh("ip", "link", "add", port_name, "type", "veth", "peer", "name", peer_name)
            sh("ip", "link", "set", peer_name, "netns", lab.peer_ns)
            sh("sysctl", "-qw", f"net.ipv6.conf.{port_name}.disable_ipv6=1")
            sh("ip", "link", "set", port_name, "arp", "off")
            sh("ip", "link", "set", port_name, "up")
            sh("ip", "-n", lab.peer_ns, "addr", "add", "198.51.100.2/24", "dev", peer_name)
            sh("ip", "-n", lab.peer_ns, "link", "set", peer_name, "up")

            env = watcher_env(
                HAVIP_INTERFACE=port_name,
                # nobody listens there: the claims stay buffered
                HAVIP_AMQP_URL=f"amqp://guest:guest@127.0.0.1:{free_port()}/",
                HAVIP_METRICS_PORT=str(metrics_port),
                HAVIP_METRICS_HOST="127.0.0.1",
                HAVIP_DRAIN_TIMEOUT_S="0",
                PYTHONDONTWRITEBYTECODE="1",
            )
            proc = await asyncio.create_subprocess_exec(
                *command, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
            )
            watcher = WatcherProcess(proc)
            await watcher.wait_for_log("capture started")
            await asyncio.to_thread(assert_nobody_with_net_raw_only, proc.pid)

            await asyncio.to_thread(lab.arping, "198.51.100.20", count=2, iface=peer_name)
            metrics = await scrape_until(
                metrics_port,
                lambda exposition: value(exposition, "havip_watcher_frames_total", {"result": "claim"}) == 2,
                what="two frames counted as claims",
            )
            # the second GARP is coalesced into the first
            assert value(metrics, "havip_watcher_claims_buffered") == 1
            assert value(metrics, "havip_watcher_claims_coalesced_total") == 1
            assert value(metrics, "havip_watcher_kernel_drops_total") == 0
            assert await watcher.stop() == 0
        finally:
            if watcher is not None:
                await watcher.kill()
            sh("ip", "link", "del", port_name, check=False)


def test_unknown_interface_exits_2(lab: Lab) -> None:
    env = watcher_env(HAVIP_INTERFACE="nosuch0", HAVIP_NETNS=lab.watch_ns, HAVIP_METRICS_PORT="0")
    result = subprocess.run(
        [sys.executable, "-m", "services.arp_watcher"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "no interface 'nosuch0'" in result.stderr
    assert "Traceback" not in result.stderr
