"""The lab itself, for real: closed namespaces on a bridge, keepalived failover on the wire, clean teardown."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import pytest

from tests.lab import (
    ArpCapture,
    ArpGuard,
    Keepalived,
    Lab,
    LabCommandError,
    LabUnsupported,
    garp_filter,
    leftovers,
    parse_tcpdump_hex,
    pid_alive,
    render_config,
)
from tests.waiting import eventually_sync

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the network lab needs root")

VIP = "192.0.2.100"
H1_IP = "192.0.2.11"
H2_IP = "192.0.2.12"


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    the_lab = Lab(workdir=tmp_path)
    try:
        the_lab.open()
        yield the_lab
    finally:
        the_lab.close()
    assert leftovers(the_lab.prefix) == []


def _ip_json(*args: str) -> list[dict[str, object]]:
    out = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=True, timeout=10).stdout
    result: list[dict[str, object]] = json.loads(out or "[]")
    return result


def _keepalived_pair(lab: Lab) -> tuple[Keepalived, Keepalived]:
    h1 = lab.add_host("host1", H1_IP)
    h2 = lab.add_host("host2", H2_IP)
    ka1 = Keepalived(h1, vip=VIP, peers=[h2.ip], priority=100, state="MASTER", workdir=lab.workdir)
    ka2 = Keepalived(h2, vip=VIP, peers=[h1.ip], priority=80, workdir=lab.workdir)
    ka1.start()
    ka2.start()
    return ka1, ka2


# -- the wire --------------------------------------------------------------------------------------------------


@needs_root
def test_hosts_reach_each_other_and_nothing_else(lab: Lab) -> None:
    h1 = lab.add_host("host1", H1_IP)
    h2 = lab.add_host("host2", H2_IP)
    cap = lab.add_capture_port()

    assert h1.ping(h2.ip, count=2)
    assert h2.ping(h1.ip, count=2)
    assert h1.mac == "02:00:c0:00:02:0b"
    assert h1.has_address(H1_IP)

    # Closed: no default route anywhere, only the connected lab subnet; nothing is forwarded.
    for host in (h1, h2):
        assert host.default_routes() == []
        routes = host.iproute("-4", "route", "show").stdout.split("\n")
        assert [r.split()[0] for r in routes if r.strip()] == ["192.0.2.0/24"]
        assert host.run("sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "0"
        assert host.run("sysctl", "-n", "net.ipv6.conf.all.disable_ipv6").stdout.strip() == "1"
    assert _ip_json("-n", lab.switch_netns, "route", "show", "table", "all", "type", "unicast") == []
    with pytest.raises(LabCommandError, match="Network is unreachable"):
        h1.ping("198.51.100.1")  # refused locally: no route, nothing is sent

    # The bridge and the root-side capture port carry no address and answer no ARP.
    for args in (["-n", lab.switch_netns, "addr", "show", "dev", lab.bridge], ["addr", "show", "dev", cap]):
        [link] = _ip_json(*args)
        assert link["addr_info"] == []
        assert "NOARP" in str(link["flags"])

    # Every name carries the lab's prefix.
    assert all(ns.startswith(f"{lab.prefix}-") for ns in lab.namespaces)
    assert cap.startswith(lab.prefix)
    assert lab.bridge.startswith(lab.prefix)
    assert all(len(name) <= 15 for name in [cap, lab.bridge, h1.port, h2.port])


@needs_root
def test_two_labs_do_not_collide(lab: Lab, tmp_path: Path) -> None:
    with Lab(workdir=tmp_path / "other") as other:
        assert other.prefix != lab.prefix
        pairs = [(lab.add_host("a", H1_IP), lab.add_host("b", H2_IP))]
        pairs.append((other.add_host("a", H1_IP), other.add_host("b", H2_IP)))
        for a, b in pairs:
            assert a.ping(b.ip)
        # The same address on the other lab's wire is not reachable from this one.
        lab_c = lab.add_host("c", "192.0.2.13")
        other.add_host("d", "192.0.2.14")
        with pytest.raises(LabCommandError):
            lab_c.ping("192.0.2.14", timeout=0.3)
    assert leftovers(other.prefix) == []


@needs_root
def test_gratuitous_arp_is_seen_on_capture_port_and_capture_namespace(lab: Lab) -> None:
    h1 = lab.add_host("host1", H1_IP)
    cap = lab.add_capture_port()
    capns = lab.add_capture_namespace()

    with (
        ArpCapture(cap, count=3, registry=lab.processes) as root_cap,
        ArpCapture(capns.iface, netns=capns.netns, count=3, registry=lab.processes) as ns_cap,
    ):
        h1.arping(VIP)
        h1.arping(VIP, reply=True)
        h1.arping(VIP, vlan=100)
        root_frames = root_cap.wait(5)
        ns_frames = ns_cap.wait(5)

    for frames in (root_frames, ns_frames):
        request, reply, tagged = frames
        assert request.is_garp
        assert (request.sender_ip, request.target_ip, request.sender_mac) == (VIP, VIP, h1.mac)
        assert request.eth_src == h1.mac
        assert request.eth_dst == "ff:ff:ff:ff:ff:ff"
        assert request.vlan is None
        assert (reply.op, reply.sender_ip, reply.target_ip) == (2, VIP, VIP)
        assert (tagged.vlan, tagged.op, tagged.sender_ip) == (100, 1, VIP)


@needs_root
def test_arp_guard_keeps_announcements_from_the_client_but_not_from_the_watcher(lab: Lab) -> None:
    """As in a cloud VPC: the client cannot learn who has an address from ARP; the watcher still sees the GARP;
    a programmed (permanent) neighbour entry is what makes the client reach the holder."""
    h1 = lab.add_host("host1", H1_IP)
    h2 = lab.add_host("host2", H2_IP)
    client = lab.add_host("client", "192.0.2.21")
    cap = lab.add_capture_port()
    guard = ArpGuard(lab, client, [h1, h2])
    guard.install()
    h1.add_address(VIP)

    from_host1 = f"arp and ether src {h1.mac}"
    with (
        ArpCapture(cap, count=1, registry=lab.processes) as watcher_side,
        ArpCapture(client.iface, bpf=from_host1, netns=client.netns, registry=lab.processes) as client_side,
    ):
        h1.arping(VIP, count=2)
        h1.arping(VIP, reply=True)
        with pytest.raises(LabCommandError):
            client.ping(VIP, timeout=0.5)  # it asks who has VIP; host1's answer (sender VIP) is dropped too
        [garp] = watcher_side.wait(5)
        assert (garp.sender_ip, garp.sender_mac) == (VIP, h1.mac)
        assert "lladdr" not in client.iproute("neigh", "show", VIP).stdout

        # Programmed, the client reaches host1; host1 (its cache flushed) resolves the client to answer, asking
        # with its own address (arp_announce=2), which is the first ARP from host1 that reaches the client.
        h1.iproute("neigh", "flush", "dev", h1.iface)
        client.iproute("neigh", "replace", VIP, "lladdr", h1.mac, "dev", client.iface, "nud", "permanent")
        assert client.ping(VIP)
        [first_from_host1] = client_side.wait(5)
    assert (first_from_host1.sender_ip, first_from_host1.sender_mac) == (H1_IP, h1.mac)
    assert guard.dropped() >= 4  # two GARPs, the gratuitous reply, host1's answer to the client's question

    h2.arping(VIP, count=2)  # a competing announcement changes nothing for the client
    assert h1.mac in client.iproute("neigh", "show", VIP).stdout
    assert client.ping(VIP)


@needs_root
@pytest.mark.parametrize("hub", [False, True])
def test_capture_port_sees_unicast_arp_replies_only_in_hub_mode(tmp_path: Path, hub: bool) -> None:
    with Lab(workdir=tmp_path, hub=hub) as lab:
        h1 = lab.add_host("host1", H1_IP)
        h2 = lab.add_host("host2", H2_IP)
        cap = lab.add_capture_port()
        # Both hosts know each other first, so the bridge has learnt their ports (unless it is a hub).
        h1.ping(h2.ip)
        h2.run("ip", "neigh", "flush", "all")
        with ArpCapture(cap, bpf="arp and arp[6:2] = 2", count=1) as capture:
            h2.ping(h1.ip)  # h2 asks by broadcast, h1 answers by unicast
            if hub:
                [reply] = capture.wait(3)
                assert (reply.sender_ip, reply.eth_src, reply.eth_dst) == (H1_IP, h1.mac, h2.mac)
            else:
                with pytest.raises(TimeoutError):
                    capture.wait(0.5)


@needs_root
def test_vlan_host_or_clear_refusal(lab: Lab) -> None:
    if lab.vlan_supported():
        h1 = lab.add_host("host1", H1_IP, vlan=100)
        h2 = lab.add_host("host2", H2_IP, vlan=100)
        assert h1.iface == "eth0.100"
        assert h1.ping(h2.ip)
    else:
        with pytest.raises(LabUnsupported, match=r"802\.1Q"):
            lab.add_host("host1", H1_IP, vlan=100)
        assert "host1" not in lab.hosts
        assert lab.namespaces == [lab.switch_netns]  # refused before anything was created


# -- keepalived ------------------------------------------------------------------------------------------------

FailureMode = Literal["stop", "kill", "link_down"]


@needs_root
@pytest.mark.parametrize("failure", ["stop", "kill", "link_down"])
def test_keepalived_fails_over_and_backup_announces(
    lab: Lab, failure: FailureMode, record_property: Callable[[str, object], None]
) -> None:
    cap = lab.add_capture_port()
    ka1, ka2 = _keepalived_pair(lab)
    h1, h2 = ka1.host, ka2.host

    eventually_sync(ka1.is_master, timeout=10, what="host1 to become master")
    eventually_sync(lambda: not ka2.is_master(), timeout=3, what="host2 to stay (or fall back to) backup")

    with ArpCapture(cap, bpf=garp_filter(VIP, eth_src=h2.mac), count=1, registry=lab.processes) as capture:
        failed_at = time.time()
        if failure == "stop":
            ka1.stop()
        elif failure == "kill":
            ka1.kill()
        else:
            h1.link_down()
        eventually_sync(ka2.is_master, timeout=10, what="the VIP to move to host2")
        [garp] = capture.wait(5)

    assert garp.is_garp
    assert (garp.sender_ip, garp.target_ip) == (VIP, VIP)
    assert (garp.sender_mac, garp.eth_src) == (h2.mac, h2.mac)
    assert garp.eth_dst == "ff:ff:ff:ff:ff:ff"
    failover = garp.timestamp - failed_at
    record_property(f"failover_{failure}_s", round(failover, 3))
    print(f"\nfailover after {failure}: first GARP from host2 {failover:.3f} s after the failure")
    assert 0 < failover < 5

    if failure == "stop":
        assert not ka1.running()
        assert not h1.has_address(VIP)  # the stopped master withdrew the VIP
    elif failure == "kill":
        assert not ka1.running()
        assert ka1.alive_pids() == []


# -- teardown --------------------------------------------------------------------------------------------------


@needs_root
@pytest.mark.parametrize("raise_inside", [False, True])
def test_teardown_leaves_nothing(tmp_path: Path, raise_inside: bool) -> None:
    class Boom(Exception):
        pass

    pids: list[int] = []
    names: list[str] = []
    prefix = ""
    try:
        with Lab(workdir=tmp_path) as lab:
            prefix = lab.prefix
            ka1, ka2 = _keepalived_pair(lab)
            cap = lab.add_capture_port()
            lab.add_capture_namespace()
            sleeper = ka1.host.popen("sleep", "600")
            pids = [*ka1.pids(), *ka2.pids(), sleeper.pid]
            names = [*lab.namespaces, cap]
            assert len(pids) == 5
            assert all(pid_alive(pid) for pid in pids)
            assert set(leftovers(prefix)) == {f"netns {n}" for n in lab.namespaces} | {f"link {cap}"}
            if raise_inside:
                raise Boom
    except Boom:
        assert raise_inside
    assert names
    assert leftovers(prefix) == []
    assert [pid for pid in pids if pid_alive(pid)] == []
    lab.close()  # idempotent


@needs_root
def test_lab_refuses_addresses_outside_documentation_ranges(lab: Lab) -> None:
    with pytest.raises(ValueError, match="documentation"):
        Lab(subnet="10.0.0.0/24")
    with pytest.raises(ValueError, match="subnet"):
        lab.add_host("x", "198.51.100.5")  # documentation range, but not this lab's subnet
    h1 = lab.add_host("host1", H1_IP)
    with pytest.raises(ValueError, match="documentation"):
        h1.arping("10.1.2.3")
    with pytest.raises(ValueError, match="documentation"):
        h1.ping("8.8.8.8")
    with pytest.raises(ValueError, match="already used"):
        lab.add_host("host2", H1_IP)


# -- pure helpers (no root needed) -----------------------------------------------------------------------------


def test_render_config_variants() -> None:
    conf = render_config(
        router_id="r1",
        iface="eth0",
        src_ip=H1_IP,
        peers=[H2_IP],
        vip=VIP,
        prefixlen=24,
        priority=100,
        nopreempt=True,
        auth_pass="1111",
    )
    for line in (
        "state BACKUP",
        "nopreempt",
        "unicast_src_ip 192.0.2.11",
        "192.0.2.12",
        "192.0.2.100/24 dev eth0",
        "garp_master_delay 1",
        "garp_master_refresh 5",
        "auth_pass 1111",
    ):
        assert line in conf
    with pytest.raises(ValueError, match="nopreempt"):
        render_config(
            router_id="r1", iface="eth0", src_ip=H1_IP, peers=[H2_IP], vip=VIP, prefixlen=24,
            priority=100, state="MASTER", nopreempt=True,
        )  # fmt: skip
    with pytest.raises(ValueError, match="documentation"):
        render_config(router_id="r1", iface="eth0", src_ip=H1_IP, peers=["10.0.0.2"], vip=VIP, prefixlen=24,
                      priority=100)  # fmt: skip


def test_parse_tcpdump_hex() -> None:
    text = (
        "1795671962.229904 ARP, Request who-has 192.0.2.100 (ff:ff:ff:ff:ff:ff) tell 192.0.2.100, length 28\n"
        "\t0x0000:  ffff ffff ffff 0200 c000 020c 0806 0001\n"
        "\t0x0010:  0800 0604 0001 0200 c000 020c c000 0264\n"
        "\t0x0020:  ffff ffff ffff c000 0264\n"
    )
    [frame] = parse_tcpdump_hex(text)
    assert frame.is_garp
    assert frame.sender_mac == "02:00:c0:00:02:0c"
    assert frame.sender_ip == frame.target_ip == VIP
    assert frame.timestamp == pytest.approx(1795671962.229904)
