"""The whole chain for real: keepalived fails over on a lab wire, the three services (real processes) turn the
new master's gratuitous ARP into a committed, published transition visible in the API and the metrics."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from shared.settings import CommonSettings
from tests.e2e.system import System, ok, register_inventory
from tests.lab import Keepalived, Lab, LabHost
from tests.listener import EventLog, listening
from tests.tcp_proxy import CuttableProxy
from tests.waiting import eventually

pytestmark = pytest.mark.e2e

LATENCIES_MS: list[tuple[str, float]] = []


@pytest.fixture(scope="module")
def watcher_link() -> Iterator[CuttableProxy]:
    """The watcher reaches RabbitMQ through this proxy: a test can take the broker away from it alone."""
    with CuttableProxy() as proxy:
        yield proxy


@pytest.fixture(scope="module")
def system(
    lab: Lab,
    database_url: str,
    amqp_url: str,
    watcher_link: CuttableProxy,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[System]:
    interface = lab.capture_ports["cap"].iface
    workdir = tmp_path_factory.mktemp("services")
    with System(database_url, amqp_url, interface, workdir, watcher_amqp_url=watcher_link.url(amqp_url)) as system:
        yield system


@pytest.fixture(scope="module")
def inventory(system: System, lab: Lab) -> dict[str, Any]:
    """A VPC, a subnet and the two CVMs, registered through the API."""
    hosts = {name: (lab.hosts[name].ip, lab.hosts[name].mac) for name in ("cvm1", "cvm2")}
    return register_inventory(system, "e2e", str(lab.network), hosts)


@pytest.fixture
async def events(system: System) -> AsyncIterator[EventLog]:
    settings = CommonSettings(amqp_url=system.amqp_url)
    async with listening(settings, ["havip.binding.changed", "havip.claim.rejected"]) as log:
        yield log


@pytest.fixture(scope="module", autouse=True)
def report_latencies(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if LATENCIES_MS:
        with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():  # type: ignore[union-attr]
            print("\ncapture → commit latency observed by the e2e tests (from the transition's own times):")
            for what, ms in LATENCIES_MS:
                print(f"  {what:<28} {ms:7.2f} ms")


def allocate(system: System, inventory: dict[str, Any], name: str) -> dict[str, Any]:
    with system.api() as api:
        havip: dict[str, Any] = ok(
            api.post("/havips", json={"subnet_id": inventory["subnet"]["id"], "name": name})
        )
    return havip


def show(system: System, havip_id: str) -> dict[str, Any]:
    with system.api() as api:
        havip: dict[str, Any] = ok(api.get(f"/havips/{havip_id}"))
    return havip


async def bound_to(system: System, havip_id: str, instance_id: str) -> bool:
    havip = show(system, havip_id)
    return bool(havip["state"] == "BOUND" and havip["bound_instance_id"] == instance_id)


def keepalived_pair(lab: Lab, vip: str, vrid: int) -> tuple[Keepalived, Keepalived]:
    cvm1, cvm2 = lab.hosts["cvm1"], lab.hosts["cvm2"]
    common: dict[str, Any] = {"vip": vip, "vrid": vrid, "garp_master_delay": 1, "garp_master_refresh": 5}
    ka1 = Keepalived(cvm1, peers=[cvm2.ip], priority=100, state="MASTER", workdir=lab.workdir, **common)
    ka2 = Keepalived(cvm2, peers=[cvm1.ip], priority=80, state="BACKUP", workdir=lab.workdir, **common)
    return ka1, ka2


def fail(host: LabHost, keepalived: Keepalived, how: str) -> None:
    if how == "stop":
        keepalived.stop()
    elif how == "kill":
        keepalived.kill()
    else:
        host.link_down()


@pytest.mark.parametrize(("how", "vrid"), [("stop", 61), ("kill", 62), ("link_down", 63)])
async def test_keepalived_failover_moves_the_havip(
    system: System, lab: Lab, inventory: dict[str, Any], events: EventLog, database_url: str, how: str, vrid: int
) -> None:
    cvm1_id = inventory["instances"]["cvm1"]["id"]
    cvm2_id = inventory["instances"]["cvm2"]["id"]
    havip = allocate(system, inventory, f"vip-{how}")
    assert havip["state"] == "UNBOUND"
    vip = havip["address"]
    ka1, ka2 = keepalived_pair(lab, vip, vrid)
    try:
        # The intended master first, and its claim committed, before the backup starts: a pair started at
        # once may elect the lower node first (keepalived starts in BACKUP below priority 255), which would
        # make the history begin with cvm2.
        ka1.start()
        await eventually(lambda: bound_to(system, havip["id"], cvm1_id), timeout=30, what="bound to cvm1")
        ka2.start()
        transitions_before = system.metric("havip_transitions_total", {"reason": "claim"})
        latency_count_before = system.metric("havip_binding_latency_seconds_count")

        fail(lab.hosts["cvm1"], ka1, how)
        await eventually(lambda: bound_to(system, havip["id"], cvm2_id), timeout=20, what="bound to cvm2")

        # The published event.
        def second_transition() -> list[dict[str, Any]]:
            return [e for e in events.of("havip.binding.changed", havip["id"]) if e["sequence"] == 2]

        await eventually(lambda: bool(second_transition()), what="event of the second transition")
        [changed] = second_transition()
        assert changed["previous"] == {"instance_id": cvm1_id, "mac": lab.hosts["cvm1"].mac}
        assert changed["current"] == {"instance_id": cvm2_id, "mac": lab.hosts["cvm2"].mac}
        assert changed["address"] == vip

        # The history, newest first.
        with system.api() as api:
            history = ok(api.get(f"/havips/{havip['id']}/transitions"))["items"]
        assert [(t["sequence"], t["from_instance_id"], t["to_instance_id"]) for t in history[:2]] == [
            (2, cvm1_id, cvm2_id),
            (1, None, cvm1_id),
        ]
        assert history[0]["mac"] == lab.hosts["cvm2"].mac
        assert history[0]["reason"] == "claim"
        captured = datetime.fromisoformat(history[0]["captured_at"])
        committed = datetime.fromisoformat(history[0]["committed_at"])
        latency_ms = (committed - captured).total_seconds() * 1000
        assert 0 <= latency_ms < 1000, latency_ms
        LATENCIES_MS.append((f"failover by {how}", latency_ms))

        # The metrics.
        assert system.metric("havip_transitions_total", {"reason": "claim"}) >= transitions_before + 1
        assert system.metric("havip_binding_latency_seconds_count") >= latency_count_before + 1
        assert show(system, havip["id"])["last_transition_at"] is not None
    finally:
        ka1.stop()
        ka2.stop()
        lab.hosts["cvm1"].link_up()
        for host in (lab.hosts["cvm1"], lab.hosts["cvm2"]):
            if host.has_address(vip):
                host.del_address(vip)


async def test_garp_from_an_unregistered_host_is_refused_and_moves_nothing(
    system: System, lab: Lab, inventory: dict[str, Any], events: EventLog, database_url: str
) -> None:
    cvm1_id = inventory["instances"]["cvm1"]["id"]
    havip = allocate(system, inventory, "vip-spoofed")
    lab.hosts["cvm1"].arping(havip["address"], count=1)
    await eventually(lambda: bound_to(system, havip["id"], cvm1_id), what="bound to cvm1")
    refused_before = system.metric("havip_claims_rejected_total", {"reason": "unknown_mac"})

    lab.hosts["intruder"].arping(havip["address"], count=3)

    await eventually(lambda: len(events.of("havip.claim.rejected", havip["id"])) >= 1, what="refusal published")
    refusal = events.of("havip.claim.rejected", havip["id"])[0]
    assert refusal["reason"] == "unknown_mac"
    assert refusal["mac"] == lab.hosts["intruder"].mac
    assert system.metric("havip_claims_rejected_total", {"reason": "unknown_mac"}) >= refused_before + 1
    conn = await asyncpg.connect(database_url)
    try:
        audited = await conn.fetch(
            "SELECT mac::text, reason FROM binding.rejected_claims WHERE havip_id = $1", uuid.UUID(havip["id"])
        )
    finally:
        await conn.close()
    assert {(r["mac"], r["reason"]) for r in audited} == {(lab.hosts["intruder"].mac, "unknown_mac")}
    shown = show(system, havip["id"])
    assert (shown["state"], shown["bound_instance_id"]) == ("BOUND", cvm1_id)
    with system.api() as api:
        assert len(ok(api.get(f"/havips/{havip['id']}/transitions"))["items"]) == 1


async def test_failovers_during_a_broker_outage_reach_the_binding_when_it_returns(
    system: System, lab: Lab, inventory: dict[str, Any], watcher_link: CuttableProxy
) -> None:
    """R1 (docs/contract.md#reliability) for the watcher: RabbitMQ is away from it while keepalived fails over
    twice (cvm1 → cvm2 → cvm1); it keeps capturing, and when the broker returns the binding service records both
    changes, in order."""
    cvm1_id = inventory["instances"]["cvm1"]["id"]
    cvm2_id = inventory["instances"]["cvm2"]["id"]
    havip = allocate(system, inventory, "vip-outage")
    vip = havip["address"]
    ka1, ka2 = keepalived_pair(lab, vip, 64)
    ka1_again = keepalived_pair(lab, vip, 64)[0]

    def claims_captured() -> float:
        return system.metric("havip_watcher_frames_total", {"result": "claim"}, service="watcher")

    try:
        ka1.start()
        await eventually(lambda: bound_to(system, havip["id"], cvm1_id), timeout=30, what="bound to cvm1")
        ka2.start()
        watcher_link.cut()
        captured = claims_captured()
        ka1.stop()  # cvm2 takes over while the watcher cannot publish
        await eventually(lambda: ka2.is_master() and claims_captured() > captured, timeout=30, what="cvm2's GARP")
        captured = claims_captured()
        ka1_again.start()  # preempts: cvm1 takes the address back, still during the outage
        await eventually(
            lambda: ka1_again.is_master() and claims_captured() > captured, timeout=30, what="cvm1's GARP"
        )
        with system.api() as api:
            assert len(ok(api.get(f"/havips/{havip['id']}/transitions"))["items"]) == 1  # nothing seen yet

        watcher_link.start()  # the broker is back for the watcher

        async def history() -> list[tuple[int, str | None, str | None]]:
            with system.api() as api:
                items = ok(api.get(f"/havips/{havip['id']}/transitions"))["items"]
            return [(t["sequence"], t["from_instance_id"], t["to_instance_id"]) for t in items]

        async def both_changes_recorded() -> bool:
            return len(await history()) >= 3

        await eventually(both_changes_recorded, timeout=60, what="the two failovers of the outage")
        assert await history() == [(3, cvm2_id, cvm1_id), (2, cvm1_id, cvm2_id), (1, None, cvm1_id)]
        assert await bound_to(system, havip["id"], cvm1_id)
        assert system.metric("havip_watcher_publish_failures_total", service="watcher") >= 1
        assert system.metric("havip_watcher_claims_dropped_total", service="watcher") == 0
    finally:
        if not watcher_link.listening:
            watcher_link.start()
        for keepalived in (ka1, ka2, ka1_again):
            keepalived.stop()
        for host in (lab.hosts["cvm1"], lab.hosts["cvm2"]):
            if host.has_address(vip):
                host.del_address(vip)


async def test_two_keepalived_masters_are_split_brain_until_one_stops(
    system: System, lab: Lab, inventory: dict[str, Any]
) -> None:
    """Split brain (docs/contract.md#split-brain) on the wire: two keepalived whose adverts never reach each other
    (each names a peer that does not exist) both become master and both announce the address every second."""
    havip = allocate(system, inventory, "vip-split")
    vip = havip["address"]
    cvm1, cvm2 = lab.hosts["cvm1"], lab.hosts["cvm2"]
    common: dict[str, Any] = {"vip": vip, "vrid": 65, "garp_master_delay": 1, "garp_master_refresh": 1}
    ka1 = Keepalived(cvm1, peers=["192.0.2.250"], priority=100, state="MASTER", workdir=lab.workdir, **common)
    ka2 = Keepalived(cvm2, peers=["192.0.2.251"], priority=80, state="MASTER", workdir=lab.workdir, **common)

    def flags() -> tuple[bool, bool]:
        shown = show(system, havip["id"])
        return shown["split_brain"], shown["flapping"]

    try:
        ka1.start()
        ka2.start()
        await eventually(lambda: ka1.is_master() and ka2.is_master(), timeout=30, what="two masters")
        await eventually(lambda: flags()[0], timeout=40, what="split brain shown")
        assert system.metric("havip_split_brain") >= 1
        assert system.metric("havip_condition_edges_total", {"condition": "split_brain", "edge": "started"}) >= 1
        await eventually(lambda: flags()[1], timeout=60, what="flapping shown (it changes hands every second)")
        ka2.stop()
        await eventually(lambda: not flags()[0], timeout=60, what="split brain over once cvm2 stopped")
        assert show(system, havip["id"])["bound_instance_id"] == inventory["instances"]["cvm1"]["id"]
    finally:
        for keepalived in (ka1, ka2):
            keepalived.stop()
        for host in (cvm1, cvm2):
            if host.has_address(vip):
                host.del_address(vip)


def test_the_lab_is_closed(lab: Lab) -> None:
    for host in lab.hosts.values():
        assert host.default_routes() == []
    assert Path("/var/run/netns").exists()


def havipctl(system: System, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAVIP_")}
    env.update(HAVIP_URL=system.api_url, HAVIP_API_TOKEN=system.token, HAVIP_AMQP_URL=system.amqp_url)
    result = subprocess.run(
        [sys.executable, "-m", "havipctl", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    if check:
        assert result.returncode == 0, f"havipctl {' '.join(args)}: {result.returncode} {result.stderr}"
    return result


async def test_havipctl_follows_the_whole_story_on_the_running_system(
    system: System, lab: Lab, inventory: dict[str, Any]
) -> None:
    """Allocate, watch the claim move the binding, read history and audit, release: all through havipctl."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAVIP_")}
    env.update(HAVIP_AMQP_URL=system.amqp_url)
    watch = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "havipctl", "watch", "havip.binding.changed", "--json"),
        *("--count", "1", "--timeout", "30"),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert watch.stderr is not None
        assert b"watching" in await asyncio.wait_for(watch.stderr.readline(), 15)

        subnet_id = inventory["subnet"]["id"]
        havip = json.loads(havipctl(system, "havip", "allocate", "--subnet", subnet_id, "--json").stdout)
        cvm2, intruder = lab.hosts["cvm2"], lab.hosts["intruder"]
        cvm2.arping(havip["address"])
        intruder.arping(havip["address"])

        stdout, _ = await asyncio.wait_for(watch.communicate(), 30)
        assert watch.returncode == 0
        [event] = [json.loads(line) for line in stdout.decode().splitlines()]
        assert event["type"] == "havip.binding.changed"
        assert event["data"]["havip_id"] == havip["id"]
        assert event["data"]["current"]["mac"] == cvm2.mac
    finally:
        if watch.returncode is None:
            watch.kill()
            await watch.wait()

    cvm2_id = inventory["instances"]["cvm2"]["id"]
    shown = json.loads(havipctl(system, "havip", "show", havip["id"], "--json").stdout)
    assert (shown["state"], shown["bound_instance_id"]) == ("BOUND", cvm2_id)
    table = havipctl(system, "havip", "transitions", havip["id"]).stdout
    assert cvm2_id in table

    async def refusal_audited() -> bool:
        audit = json.loads(havipctl(system, "claims", "rejected", "--havip", havip["id"], "--json").stdout)
        return [(c["mac"], c["reason"]) for c in audit["items"]] == [(intruder.mac, "unknown_mac")]

    await eventually(refusal_audited, what="the intruder's refused claim in the audit")

    refused = havipctl(system, "havip", "release", havip["id"], check=False)
    assert refused.returncode == 1
    assert "HAVIP_BOUND" in refused.stderr
    assert "--force" in refused.stderr
    holder_refused = havipctl(system, "instance", "deregister", cvm2_id, check=False)
    assert holder_refused.returncode == 1
    assert "INSTANCE_HOLDS_HAVIP" in holder_refused.stderr
    havipctl(system, "havip", "release", havip["id"], "--force")
    assert havipctl(system, "havip", "show", havip["id"], check=False).returncode == 1

    async def released_in_history() -> bool:
        history = json.loads(havipctl(system, "havip", "transitions", havip["id"], "--json").stdout)["items"]
        return [(t["sequence"], t["reason"], t["cause"]) for t in history] == [
            (2, "release", "released"),
            (1, "claim", None),
        ]

    await eventually(released_in_history, what="the binding service's final release row")
