"""The TPACKET_V3 ring capture for real, in a closed lab (tests/lab: namespaces `hv<hex>-*` on a bridge of their
own, no route out, torn down also on failure)::

    netns <prefix>-peer (192.0.2.2)  ──┐
                                       ├── bridge ── netns <prefix>-cap: eth0, no address, ARP off
    netns <prefix>-replay (192.0.2.3) ─┘      (the ring is opened here through HAVIP_NETNS's setns)
                                       └── capture port <prefix>c<n> in the root namespace (no address,
                                           ARP off; for the CAP_NET_RAW-only test)

Frames come from arping, from a raw socket in the peer's namespace, and from tcpreplay; addresses only from the
documentation ranges. Needs root, arping and tcpreplay.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.arp_watcher.capture_thread import CaptureThread
from services.arp_watcher.frames import ARP_REQUEST
from services.arp_watcher.packet_socket import CaptureOpenError, network_namespace
from services.arp_watcher.ring import open_ring_reader
from tests.collected_claims import CollectedClaims
from tests.lab import CaptureNamespace, Lab, LabHost
from tests.lab.arp_frames import build_arp_frame
from tests.unprivileged import assert_nobody_with_net_raw_only, python_as_nobody_with_net_raw
from tests.waiting import eventually_sync


def ip4(address: str) -> int:
    return int(ipaddress.IPv4Address(address))


class World:
    def __init__(self, lab: Lab, peer: LabHost, replay: LabHost, cap: CaptureNamespace, port: str) -> None:
        self.lab = lab
        self.peer = peer
        self.replay = replay
        self.cap = cap
        self.port = port  # root-namespace capture port

    @property
    def peer_mac(self) -> bytes:
        return bytes.fromhex(self.peer.mac.replace(":", ""))

    def send_frames(self, frames: list[bytes]) -> None:
        """Raw Ethernet frames out of the peer's eth0 (onto the bridge)."""
        with network_namespace(self.peer.netns):
            sender = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        with sender:
            sender.bind(("eth0", 0))
            for frame in frames:
                sender.send(frame)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with Lab("192.0.2.0/24") as lab:
        peer = lab.add_host("peer", "192.0.2.2")
        replay = lab.add_host("replay", "192.0.2.3")
        cap = lab.add_capture_namespace("cap")
        port = lab.add_capture_port("root")
        yield World(lab, peer, replay, cap, port)


@contextlib.contextmanager
def ring_capture(world: World) -> Iterator[tuple[CaptureThread, CollectedClaims]]:
    collected = CollectedClaims()
    capture = CaptureThread(open_ring_reader("eth0", netns=world.cap.netns), collected.sink)
    capture.start()
    try:
        yield capture, collected
    finally:
        capture.stop()
    assert capture.error is None


def wait_kernel_packets(capture: CaptureThread, count: int, timeout_s: float = 30.0) -> None:
    def counted() -> bool:
        capture.poll_kernel_stats()
        return capture.stats.kernel_packets >= count

    eventually_sync(counted, timeout=timeout_s, interval=0.05, what=f"the kernel's count of {count} packet(s)")


def marker(mac: bytes = bytes.fromhex("02aaaaaaaaaa"), address: str = "203.0.113.254") -> bytes:
    return build_arp_frame(oper=ARP_REQUEST, sender_mac=mac, sender_ip=ip4(address), target_ip=ip4(address))


# ---- claims -------------------------------------------------------------------------------------------------


def test_garp_requests_arrive_as_claims_with_kernel_timestamps(world: World) -> None:
    with ring_capture(world) as (_capture, collected):
        before = time.time_ns()
        world.peer.arping("192.0.2.10", count=3)
        after = time.time_ns()
        claims = collected.take(3)
    for claim in claims:
        assert claim.kind == "garp_request"
        assert claim.sender_mac == claim.eth_src == world.peer_mac
        assert claim.sender_ip == claim.target_ip == ip4("192.0.2.10")
        assert claim.vlan is None
        assert before <= claim.captured_at <= after  # the kernel's receive time, on time.time_ns()'s clock
    assert claims[0].captured_at < claims[1].captured_at < claims[2].captured_at


def test_gratuitous_reply_is_a_claim(world: World) -> None:
    with ring_capture(world) as (_capture, collected):
        before = time.time_ns()
        world.peer.arping("192.0.2.11", reply=True)
        (claim,) = collected.take(1)
    assert (claim.kind, claim.sender_ip, claim.sender_mac) == ("arp_reply", ip4("192.0.2.11"), world.peer_mac)
    assert before <= claim.captured_at <= time.time_ns()


def test_vlan_id_comes_from_the_ring_metadata(world: World) -> None:
    """arping -V puts the tag in the frame; veth and the bridge strip it (VLAN offload), so the VLAN id reaches
    user space only in tpacket3_hdr.hv1.tp_vlan_tci."""
    with ring_capture(world) as (_capture, collected):
        world.peer.arping("198.51.100.10", vlan=100)
        (claim,) = collected.take(1)
    assert (claim.vlan, claim.kind, claim.sender_ip) == (100, "garp_request", ip4("198.51.100.10"))


def test_non_arp_traffic_never_reaches_user_space(world: World) -> None:
    ipv4 = b"\xff" * 6 + world.peer_mac + b"\x08\x00" + b"\x45" + b"\x00" * 45
    ipv6 = b"\xff" * 6 + world.peer_mac + b"\x86\xdd" + b"\x60" + b"\x00" * 45
    tagged_ipv4 = b"\xff" * 6 + world.peer_mac + struct.pack("!HH", 0x8100, 7) + b"\x08\x00" + b"\x45" * 42
    with ring_capture(world) as (capture, collected):
        world.send_frames([ipv4, ipv6, tagged_ipv4] * 7_000 + [marker()])
        (claim,) = collected.take(1)
        wait_kernel_packets(capture, 1)
        assert claim.sender_ip == ip4("203.0.113.254")
        assert collected.queue.empty()
        stats = capture.stats
        assert stats.frames == 1  # the marker, and nothing of the 21,000 others
        assert (stats.not_arp, sum(stats.malformed.values())) == (0, 0)
        assert stats.kernel_packets == 1  # refused by the BPF filter in the kernel, never put in the ring
        assert stats.kernel_drops == 0


def test_malformed_frames_are_counted_by_reason_and_do_not_stop_the_capture(world: World) -> None:
    good = marker(world.peer_mac, "192.0.2.12")
    frames = [
        good[:18] + b"\x07" + good[19:],  # hlen 7
        good[:30],  # truncated ARP
        good[:16] + b"\x86\xdd" + good[18:],  # ptype IPv6
        good[:14] + b"\x00\x06" + good[16:],  # htype 6
        build_arp_frame(oper=ARP_REQUEST, sender_mac=world.peer_mac, sender_ip=0, target_ip=ip4("192.0.2.12")),
        marker(),
    ]
    with ring_capture(world) as (capture, collected):
        world.send_frames(frames)
        (claim,) = collected.take(1)
        wait_kernel_packets(capture, len(frames))
        assert capture.running
        stats = capture.stats
        assert claim.sender_ip == ip4("203.0.113.254")
        assert stats.malformed["bad_hlen"] == 1
        assert stats.malformed["truncated_arp"] == 1
        assert stats.malformed["bad_ptype"] == 1
        assert stats.malformed["bad_htype"] == 1
        assert stats.not_claims == 1  # the probe
        assert (stats.kernel_packets, stats.kernel_drops) == (len(frames), 0)
        # and it goes on capturing
        world.peer.arping("192.0.2.13")
        (after,) = collected.take(1)
        assert after.sender_ip == ip4("192.0.2.13")


# ---- a burst ------------------------------------------------------------------------------------------------


def write_pcap(path: Path, frames: list[bytes]) -> None:
    with path.open("wb") as out:
        out.write(struct.pack("=IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for frame in frames:
            out.write(struct.pack("=IIII", 0, 0, len(frame), len(frame)) + frame)


def test_a_burst_replayed_with_tcpreplay_is_seen_whole_without_kernel_drops(world: World) -> None:
    count = 50_000
    scale = ip4("198.18.0.1")
    garps = [
        build_arp_frame(
            oper=ARP_REQUEST,
            sender_mac=b"\x02\xc6" + (scale + i).to_bytes(4, "big"),
            sender_ip=scale + i,
            target_ip=scale + i,
        )
        for i in range(count)
    ]
    pcap = world.lab.workdir / "burst.pcap"
    write_pcap(pcap, garps)
    with ring_capture(world) as (capture, collected):
        result = world.replay.run(
            "tcpreplay", "-i", "eth0", "--topspeed", "--preload-pcap", str(pcap), timeout=120
        )
        assert f"Actual: {count} packets" in result.stdout
        claims = collected.take(count, timeout_s=60)
        wait_kernel_packets(capture, count)
        stats = capture.stats
        assert (stats.kernel_packets, stats.kernel_drops) == (count, 0)
        assert (stats.frames, stats.claims) == (count, count)
        assert collected.calls < count / 10  # handed over per block or burst, not per frame
    assert [c.sender_ip for c in claims] == [scale + i for i in range(count)]  # all, in order
    assert all(claims[i].captured_at <= claims[i + 1].captured_at for i in range(count - 1))


# ---- opening and stopping -----------------------------------------------------------------------------------


def test_stop_returns_while_nothing_arrives(world: World) -> None:
    """Woken through its eventfd: with a 120 s poll interval a missed wake-up would outlast stop()'s join."""
    ring = open_ring_reader("eth0", netns=world.cap.netns, poll_interval_s=120.0)
    capture = CaptureThread(ring, CollectedClaims().sink, stats_interval_s=120.0)
    capture.start()
    capture.stop(timeout_s=30)
    assert not capture.running
    assert ring.closed
    assert capture.error is None


def test_opening_errors_name_the_cause(world: World) -> None:
    with pytest.raises(CaptureOpenError, match="no interface 'nosuch0'") as no_interface:
        open_ring_reader("nosuch0", netns=world.cap.netns)
    assert no_interface.value.config_error
    with pytest.raises(CaptureOpenError, match="network namespace") as no_namespace:
        open_ring_reader("eth0", netns=f"{world.lab.prefix}-nosuch")
    assert no_namespace.value.config_error
    with pytest.raises(ValueError, match="power of two"):
        open_ring_reader("eth0", netns=world.cap.netns, block_size=3 * 4096)


CAPTURE_SCRIPT = """
import sys
from services.arp_watcher.capture_thread import CaptureThread
from services.arp_watcher.ring import open_ring_reader
from tests.waiting import eventually_sync
got = []
capture = CaptureThread(open_ring_reader(sys.argv[1]), got.extend)
capture.start()
print("ready", flush=True)
eventually_sync(lambda: len(got) >= 2, timeout=30, what="two claims")
capture.stop()
print(len(got), capture.stats.kernel_drops, capture.error)
"""


def test_cap_net_raw_alone_sets_up_the_ring(world: World) -> None:
    """R6 (docs/contract.md#reliability): an unprivileged user with CAP_NET_RAW and nothing else opens and maps
    the ring (on the root-namespace capture port: entering a namespace would need CAP_SYS_ADMIN)."""
    with python_as_nobody_with_net_raw("-c", CAPTURE_SCRIPT, world.port) as command:
        proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"},
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read() if proc.stderr else ""
            assert_nobody_with_net_raw_only(proc.pid)
            world.peer.arping("192.0.2.20", count=2)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, err
    assert out.split() == ["2", "0", "None"]
