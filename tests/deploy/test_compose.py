"""docker-compose.yml for real: the stack comes up (Grafana's profile off) from local equivalents of the images
it names, with its health checks and start-up order, and a keepalived failover in the lab moves the HAVIP —
seen by the watcher container on the host network, decided by the binding containers (two replicas sharing the
partitions out), shown by the allocator's API and scraped by the Prometheus container."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.deploy.images import Images, ensure_images
from tests.deploy.stack import BINDINGS, LONG_RUNNING, ComposeStack
from tests.e2e.system import ok
from tests.lab import Keepalived, Lab
from tests.waiting import eventually

pytestmark = pytest.mark.e2e

SUBNET = "192.0.2.0/24"
NET_RAW = 1 << 13  # CAP_NET_RAW's bit in /proc/PID/status
TIMINGS: list[tuple[str, str]] = []


@pytest.fixture(scope="module", autouse=True)
def report_timings(request: pytest.FixtureRequest) -> Iterator[None]:
    started = time.monotonic()
    yield
    TIMINGS.append(("whole module", f"{time.monotonic() - started:.1f} s"))
    with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():  # type: ignore[union-attr]
        print("\ncompose test: what it cost")
        for what, how in TIMINGS:
            print(f"  {what:<28} {how}")


@pytest.fixture(scope="module")
def images() -> Images:
    missing = [tool for tool in ("podman", "docker-compose", "debootstrap") if shutil.which(tool) is None]
    assert not missing, f"{missing} not installed: run scripts/setup.sh"
    made = ensure_images()
    TIMINGS.extend((f"image {what}", f"{how} in {seconds:.1f} s") for what, how, seconds in made.steps)
    return made


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab(SUBNET) as lab:
        lab.add_host("cvm1", "192.0.2.11")
        lab.add_host("cvm2", "192.0.2.12")
        lab.add_capture_port("cap")
        yield lab


@pytest.fixture(scope="module")
def stack(images: Images, lab: Lab) -> Iterator[ComposeStack]:
    workdir = Path(tempfile.mkdtemp(prefix="havip-compose-"))
    try:
        compose = ComposeStack(images, lab.capture_ports["cap"].iface, workdir)
        with compose:
            TIMINGS.append(("docker-compose up", f"{compose.up_seconds:.1f} s"))
            yield compose
            left = compose.close()
            TIMINGS.append(("docker-compose down", f"{compose.down_seconds:.1f} s"))
            assert left == [], f"docker-compose down left {left} (removed by label since)"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


async def test_every_service_becomes_healthy_after_the_one_shot_migration(stack: ComposeStack) -> None:
    def all_healthy() -> bool:
        health = stack.health()
        return all(health.get(service, "").endswith("(healthy)") for service in LONG_RUNNING)

    try:
        await eventually(all_healthy, timeout=180, interval=1.0, what="every long-running container healthy")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}: {stack.health()}") from None
    health = stack.health()
    assert health["migrate"] == "exited (0)"
    assert "grafana" not in health  # its profile is off


def test_the_watcher_holds_net_raw_alone_on_the_host_network(stack: ComposeStack) -> None:
    watcher = stack.inspect("arp_watcher")
    assert watcher["HostConfig"]["NetworkMode"] == "host"
    status = dict(
        line.split(":\t", 1) for line in stack.exec("arp_watcher", "cat", "/proc/self/status").splitlines()
    )
    assert int(status["CapEff"], 16) == NET_RAW
    assert int(status["CapBnd"], 16) == NET_RAW
    assert status["NoNewPrivs"].strip() == "1"


def test_the_services_run_as_the_images_unprivileged_user(stack: ComposeStack) -> None:
    for service in ("allocator", "allocator-2", *BINDINGS):
        assert stack.exec(service, "id", "-u").strip() == "10001", service
        status = dict(
            line.split(":\t", 1) for line in stack.exec(service, "cat", "/proc/self/status").splitlines()
        )
        assert int(status["CapEff"], 16) == 0, service


def show(stack: ComposeStack, havip_id: str) -> dict[str, Any]:
    with stack.api() as api:
        havip: dict[str, Any] = ok(api.get(f"/havips/{havip_id}"))
    return havip


async def test_a_keepalived_failover_moves_the_havip_through_the_containers(stack: ComposeStack, lab: Lab) -> None:
    cvm1, cvm2 = lab.hosts["cvm1"], lab.hosts["cvm2"]
    with stack.api() as api:
        vpc = ok(api.post("/vpcs", json={"name": "compose", "cidr": SUBNET}))
        subnet = ok(api.post("/subnets", json={"vpc_id": vpc["id"], "name": "lab", "cidr": SUBNET}))
        instance_ids = {
            host.name: ok(
                api.post(
                    "/instances",
                    json={"subnet_id": subnet["id"], "name": host.name, "private_ip": host.ip, "mac": host.mac},
                )
            )["id"]
            for host in (cvm1, cvm2)
        }
        havip = ok(api.post("/havips", json={"subnet_id": subnet["id"], "name": "vip-compose"}))
    vip = havip["address"]

    def bound_to(host: str) -> bool:
        shown = show(stack, havip["id"])
        return bool(shown["state"] == "BOUND" and shown["bound_instance_id"] == instance_ids[host])

    common: dict[str, Any] = {"vip": vip, "vrid": 71, "garp_master_delay": 1, "garp_master_refresh": 5}
    ka1 = Keepalived(cvm1, peers=[cvm2.ip], priority=100, state="MASTER", workdir=lab.workdir, **common)
    ka2 = Keepalived(cvm2, peers=[cvm1.ip], priority=80, state="BACKUP", workdir=lab.workdir, **common)
    try:
        # The intended master first, its claim committed, then the backup (see tests/e2e/test_failover.py).
        ka1.start()
        await eventually(lambda: bound_to("cvm1"), timeout=60, what="bound to cvm1")
        ka2.start()
        ka1.stop()
        await eventually(lambda: bound_to("cvm2"), timeout=60, what="bound to cvm2 after the failover")
        assert ka2.is_master()
    finally:
        for keepalived in (ka1, ka2):
            keepalived.stop()
        for host in (cvm1, cvm2):
            if host.has_address(vip):
                host.del_address(vip)

    with stack.api() as api:
        history = ok(api.get(f"/havips/{havip['id']}/transitions"))["items"]
    assert [(t["sequence"], t["from_instance_id"], t["to_instance_id"]) for t in history] == [
        (2, instance_ids["cvm1"], instance_ids["cvm2"]),
        (1, None, instance_ids["cvm1"]),
    ]
    assert {t["watcher_id"] for t in history} == {f"{stack.project}/{lab.capture_ports['cap'].iface}"}


def prometheus_query(stack: ComposeStack, query: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{stack.prometheus_url}/api/v1/query", params={"query": query}, timeout=10.0)
    body = response.json()
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


async def test_prometheus_scrapes_the_three_services_including_the_watcher_on_the_host(
    stack: ComposeStack,
) -> None:
    def targets_up() -> dict[tuple[str, str], str]:
        try:
            return {
                (series["metric"]["job"], series["metric"]["instance"].rsplit(":", 1)[0]): series["value"][1]
                for series in prometheus_query(stack, "up")
            }
        except httpx.HTTPError:
            return {}

    async def all_up() -> bool:
        return targets_up() == {
            ("allocator", "allocator"): "1",
            ("allocator", "allocator-2"): "1",
            ("binding", "binding"): "1",
            ("binding", "binding-2"): "1",
            ("arp_watcher", "host.docker.internal"): "1",
        }

    try:
        await eventually(all_up, timeout=60, interval=0.5, what="every target up in the Prometheus container")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}: {targets_up()}") from None
    # The rules are loaded from deploy/prometheus/rules, as mounted.
    async with httpx.AsyncClient(timeout=10.0) as client:
        rules = (await client.get(f"{stack.prometheus_url}/api/v1/rules")).json()["data"]["groups"]
    assert rules, "no rule group loaded"


# What each binding replica says of the partitions (services/binding/metrics.py), without the prefix.
BINDING_GAUGES = ("partitions_owned", "partitions", "replicas", "partition_counts", "consuming")


def binding_gauges(stack: ComposeStack) -> dict[str, dict[str, float]]:
    """Replica (the target's host) -> the binding gauges of its last scrape, by name without the prefix."""
    gauges: dict[str, dict[str, float]] = {}
    names = "|".join(BINDING_GAUGES)
    try:
        series = prometheus_query(stack, f'{{job="binding", __name__=~"havip_binding_({names})"}}')
    except httpx.HTTPError:
        return {}
    for one in series:
        replica = one["metric"]["instance"].rsplit(":", 1)[0]
        name = one["metric"]["__name__"].removeprefix("havip_binding_")
        gauges.setdefault(replica, {})[name] = float(one["value"][1])
    return gauges


async def test_the_binding_replicas_share_every_partition_out_and_hand_them_over(stack: ComposeStack) -> None:
    p = stack.partitions

    async def until(condition: Callable[[], bool], what: str) -> None:
        try:
            await eventually(condition, timeout=60, interval=0.5, what=what)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}: {binding_gauges(stack)}") from None

    def shared_out() -> bool:
        gauges = binding_gauges(stack)
        return (
            set(gauges) == set(BINDINGS)
            and all(
                g.get("partitions") == p
                and g.get("replicas") == len(BINDINGS)
                and g.get("partition_counts") == 1
                and g.get("consuming") == 1
                and g.get("partitions_owned", 0) >= 1
                for g in gauges.values()
            )
            and sum(g["partitions_owned"] for g in gauges.values()) == p
        )

    def held_by_binding_alone() -> bool:
        gauges = binding_gauges(stack)
        return set(gauges) == {"binding"} and gauges["binding"].get("partitions_owned") == p

    await until(shared_out, f"the {p} partitions shared out by both replicas")
    # The binding service's queues: the inventory's, shared by the replicas, and one per partition.
    queues = set(stack.exec("rabbitmq", "rabbitmqctl", "-q", "list_queues", "name").split())
    partition_queues = {f"binding.partition.{n}" for n in range(p)}
    assert {q for q in queues if q.startswith("binding.")} == {"binding.inventory", *partition_queues}
    # The watcher routes claims by the same count.
    [watcher] = prometheus_query(stack, 'havip_watcher_partitions{job="arp_watcher"}')
    assert float(watcher["value"][1]) == p
    # One replica stopped: it hands its partitions over, and the other decides all of them; started again, it
    # takes its share back.
    stack.compose("stop", "-t", "10", "binding-2")
    try:
        await until(held_by_binding_alone, f"the {p} partitions held by binding alone")
    finally:
        stack.compose("start", "binding-2")
    await until(shared_out, f"the {p} partitions shared out again")


async def test_the_api_answers_through_the_balancer_while_one_replica_is_stopped(stack: ComposeStack) -> None:
    with stack.api() as api:
        vpc = ok(api.post("/vpcs", json={"name": "replicas", "cidr": "198.18.0.0/16"}))
    stack.compose("stop", "-t", "2", "allocator")
    try:

        def answered_by_the_other_replica() -> bool:
            # Until the balancer's checks have taken the stopped replica out, a request that cannot connect to
            # it is sent to the other one; once they have, every request goes there.
            with stack.api() as api:
                return all(api.get(f"/vpcs/{vpc['id']}").status_code == 200 for _ in range(6))

        await eventually(answered_by_the_other_replica, timeout=60, interval=0.5, what="the API answering")
        with stack.api() as api:
            ok(api.post("/subnets", json={"vpc_id": vpc["id"], "name": "after", "cidr": "198.18.1.0/24"}))
        assert stack.health()["allocator"].startswith("exited")
        assert stack.health()["api"].endswith("(healthy)")
    finally:
        stack.compose("start", "allocator")
