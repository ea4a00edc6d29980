"""docker-compose.yml's `ha` profile for real (with docker-compose.ha.yml): a three-node RabbitMQ cluster and a
Postgres primary with its synchronous standby under pg_auto_failover, from the images the CI makes; the services
on them allocate and bind a HAVIP (a keepalived failover in the lab), and keep doing so when one broker node's
container and then the Postgres primary's are killed."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.deploy.images import Images, ensure_images
from tests.deploy.podman import PodmanError
from tests.deploy.stack import LONG_RUNNING_HA, POSTGRES_NODES, RABBITMQ_NODES, ComposeStack
from tests.e2e.system import ok
from tests.lab import Keepalived, Lab
from tests.waiting import eventually

pytestmark = pytest.mark.e2e

SUBNET = "192.0.2.0/24"
TIMINGS: list[tuple[str, str]] = []
# After a kill: how long the services may take to answer again (broker: a reconnection to the next node; Postgres:
# the monitor's failover, ≈ 10 s with its tuned timings, and the services' reconnections).
RECOVERY_TIMEOUT_S = 120.0


@pytest.fixture(scope="module", autouse=True)
def report_timings(request: pytest.FixtureRequest) -> Iterator[None]:
    started = time.monotonic()
    yield
    TIMINGS.append(("whole module", f"{time.monotonic() - started:.1f} s"))
    with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():  # type: ignore[union-attr]
        print("\ncompose ha test: what it cost")
        for what, how in TIMINGS:
            print(f"  {what:<40} {how}")


@pytest.fixture(scope="module")
def images() -> Images:
    missing = [tool for tool in ("podman", "docker-compose", "debootstrap") if shutil.which(tool) is None]
    assert not missing, f"{missing} not installed: run scripts/setup.sh"
    made = ensure_images(ha=True)
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
    workdir = Path(tempfile.mkdtemp(prefix="havip-compose-ha-"))
    try:
        compose = ComposeStack(images, lab.capture_ports["cap"].iface, workdir, ha=True)
        with compose:
            TIMINGS.append(("docker-compose up (ha)", f"{compose.up_seconds:.1f} s"))
            yield compose
            left = compose.close()
            TIMINGS.append(("docker-compose down (ha)", f"{compose.down_seconds:.1f} s"))
            assert left == [], f"docker-compose down left {left} (removed by label since)"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# ---- what the engines say -------------------------------------------------------------------------------------


def running_broker_nodes(stack: ComposeStack, service: str) -> set[str]:
    """The nodes running in the cluster, as the node of SERVICE sees them (`rabbitmqctl cluster_status`); none
    while that node does not answer."""
    try:
        out = stack.exec(service, "rabbitmqctl", "-q", "cluster_status", "--formatter", "json")
        return set(json.loads(out)["running_nodes"])
    except (PodmanError, KeyError, ValueError):
        return set()


def postgres_states(stack: ComposeStack) -> dict[str, tuple[str, str]]:
    """Data node -> (reported state, assigned state), as the monitor sees them (what `pg_autoctl show state`
    shows, from its table)."""
    out = stack.exec(
        "pg-monitor", "psql", "-X", "-At", "-F", " ", "-h", "/var/run/postgresql", "-U", "postgres",
        "-d", "pg_auto_failover", "-c", "SELECT nodename, reportedstate, goalstate FROM pgautofailover.node",
    )  # fmt: skip
    return {name: (reported, goal) for name, reported, goal in (line.split() for line in out.splitlines())}


def postgres_primary(stack: ComposeStack) -> str | None:
    states = postgres_states(stack)
    primaries = [name for name, (reported, goal) in states.items() if reported == goal == "primary"]
    return primaries[0] if len(primaries) == 1 else None


def postgres_healthy(stack: ComposeStack) -> bool:
    """A primary with its synchronous standby: one node primary, the other secondary, as assigned."""
    try:
        states = sorted(postgres_states(stack).values())
    except PodmanError:  # the monitor not answering
        return False
    return states == [("primary", "primary"), ("secondary", "secondary")]


# ---- what the services do -------------------------------------------------------------------------------------


def ready(stack: ComposeStack) -> bool:
    """The API answers through the balancer and a replica behind it says it is ready (its database and broker)."""
    try:
        return httpx.get(f"{stack.api_url}/readyz", timeout=5.0).status_code == 200
    except httpx.HTTPError:
        return False


def allocates(stack: ComposeStack, subnet_id: str, name: str) -> bool:
    """A HAVIP is allocated (an Idempotency-Key: a retry after an unknown outcome is the same allocation)."""
    try:
        with stack.api() as api:
            response = api.post(
                "/havips", json={"subnet_id": subnet_id, "name": name}, headers={"Idempotency-Key": name}
            )
    except httpx.HTTPError:
        return False
    return response.status_code in (200, 201)


async def within(stack: ComposeStack, what: str, condition: Any, deadline_s: float = RECOVERY_TIMEOUT_S) -> float:
    """Seconds until CONDITION holds; an AssertionError with the containers' health after DEADLINE_S."""
    started = time.monotonic()
    try:
        await eventually(condition, timeout=deadline_s, interval=0.5, what=what)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}: {stack.health()}") from None
    return time.monotonic() - started


# ---- the tests, in order (one stack for the module) ------------------------------------------------------------


async def test_every_service_becomes_healthy_on_the_clustered_engines(stack: ComposeStack) -> None:
    def all_healthy() -> bool:
        health = stack.health()
        return all(health.get(service, "").endswith("(healthy)") for service in LONG_RUNNING_HA)

    seconds = await within(stack, "every long-running container healthy", all_healthy, deadline_s=300)
    TIMINGS.append(("healthy after up", f"{seconds:.1f} s"))
    health = stack.health()
    assert health["migrate"] == "exited (0)"
    assert health["rabbitmq-users"] == "exited (0)"
    # The single broker and database are left out (scale 0), Grafana's profile is off.
    assert not {"postgres", "rabbitmq", "grafana"} & set(health), health


def test_the_three_broker_nodes_are_one_cluster(stack: ComposeStack) -> None:
    want = {f"rabbit@{node}" for node in RABBITMQ_NODES}
    for node in RABBITMQ_NODES:
        assert running_broker_nodes(stack, node) == want, node
    # The services' queues are quorum queues, replicated on the three nodes.
    listed = stack.exec("rabbitmq-1", "rabbitmqctl", "-q", "list_queues", "name", "type", "--formatter", "json")
    types = {queue["name"]: queue["type"] for queue in json.loads(listed)}
    assert types["binding.inventory"] == "quorum", types
    assert {types[f"binding.partition.{n}"] for n in range(stack.partitions)} == {"quorum"}


def test_the_postgres_pair_is_a_primary_with_its_synchronous_standby(stack: ComposeStack) -> None:
    shown = stack.exec("pg-monitor", "pg_autoctl", "show", "state")
    assert all(node in shown for node in POSTGRES_NODES), shown
    assert postgres_healthy(stack), postgres_states(stack)
    primary = postgres_primary(stack)
    assert primary in POSTGRES_NODES
    names = stack.exec(primary, "psql", "-X", "-At", "-h", "/var/run/postgresql", "-U", "postgres", "-c",
                       "SHOW synchronous_standby_names").strip()  # fmt: skip
    assert names.startswith("ANY 1 ("), names


def prometheus(stack: ComposeStack, query: str, by: str = "instance") -> dict[str, str]:
    """Label `by` (the instance) -> value of QUERY's series in the Prometheus container; none while it does not
    answer."""
    try:
        response = httpx.get(f"{stack.prometheus_url}/api/v1/query", params={"query": query}, timeout=10.0)
        result = response.json()["data"]["result"]
    except (httpx.HTTPError, KeyError, ValueError):
        return {}
    return {series["metric"][by]: series["value"][1] for series in result}


async def test_prometheus_scrapes_the_broker_nodes_and_the_binding_sees_the_monitor(stack: ComposeStack) -> None:
    nodes = {f"{node}:15692" for node in RABBITMQ_NODES}

    async def until(query: str, want: dict[str, str]) -> None:
        try:
            await eventually(lambda: prometheus(stack, query) == want, timeout=90, interval=1.0, what=query)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}: {prometheus(stack, query)}") from None

    await until('up{job="rabbitmq"}', dict.fromkeys(nodes, "1"))
    # What HavipRabbitmqResourceAlarm reads, from every node (no alarm here); the rule is loaded.
    for alarm in ("rabbitmq_alarms_memory_used_watermark", "rabbitmq_alarms_free_disk_space_watermark"):
        await until(alarm, dict.fromkeys(nodes, "0"))
    async with httpx.AsyncClient(timeout=10.0) as client:
        groups = (await client.get(f"{stack.prometheus_url}/api/v1/rules")).json()["data"]["groups"]
    rules = {rule["name"] for group in groups for rule in group["rules"]}
    assert {"HavipRabbitmqResourceAlarm", "HavipRabbitmqQueueShortOfReplicas"} <= rules
    # What HavipRabbitmqQueueShortOfReplicas counts: every node exports the quorum-queue replicas it holds, per
    # queue — each of the binding's partition queues counted on all three nodes.
    per_queue = (
        'count by (queue) (rabbitmq_raft_term_total{job="rabbitmq_queues", queue=~"binding[.]partition.*"})'
    )

    def every_partition_queue_on_three() -> bool:
        counts = prometheus(stack, per_queue, by="queue")
        return bool(counts) and set(counts.values()) == {"3"}

    try:
        await eventually(every_partition_queue_on_three, timeout=90, interval=1.0, what=per_queue)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}: {prometheus(stack, per_queue, by='queue')}") from None
    # The binding replicas: two database hosts, a synchronous standby, the monitor answering with two nodes.
    replicas = {f"{name}:9103" for name in ("binding", "binding-2")}
    await until('havip_database_hosts{job="binding"}', dict.fromkeys(replicas, "2"))
    await until('havip_database_synchronous_standby{job="binding"}', dict.fromkeys(replicas, "1"))
    await until('havip_database_monitor_up{job="binding"}', dict.fromkeys(replicas, "1"))


class Failover:
    """A keepalived pair in the lab whose HAVIP the services bind: the master, then the backup after it stops."""

    def __init__(self, stack: ComposeStack, lab: Lab, subnet_id: str, name: str, vrid: int) -> None:
        self.stack, self.lab = stack, lab
        cvm1, cvm2 = lab.hosts["cvm1"], lab.hosts["cvm2"]
        with stack.api() as api:
            self.instances = {
                host.name: ok(
                    api.post(
                        "/instances",
                        json={"subnet_id": subnet_id, "name": f"{name}-{host.name}", "private_ip": host.ip,
                              "mac": host.mac},
                    )
                )["id"]
                for host in (cvm1, cvm2)
            }  # fmt: skip
            self.havip = ok(api.post("/havips", json={"subnet_id": subnet_id, "name": name}))
        common: dict[str, Any] = {"vip": self.havip["address"], "vrid": vrid, "garp_master_delay": 1,
                                  "garp_master_refresh": 5}  # fmt: skip
        workdir = lab.workdir
        self.master = Keepalived(cvm1, peers=[cvm2.ip], priority=100, state="MASTER", workdir=workdir, **common)
        self.backup = Keepalived(cvm2, peers=[cvm1.ip], priority=80, state="BACKUP", workdir=workdir, **common)

    def bound_to(self, host: str) -> bool:
        try:
            with self.stack.api() as api:
                shown = api.get(f"/havips/{self.havip['id']}")
        except httpx.HTTPError:
            return False
        if shown.status_code != 200:
            return False
        body = shown.json()
        return bool(body["state"] == "BOUND" and body["bound_instance_id"] == self.instances[host])

    def stop(self) -> None:
        for keepalived in (self.master, self.backup):
            keepalived.stop()
        for host in self.lab.hosts.values():
            if host.has_address(self.havip["address"]):
                host.del_address(self.havip["address"])


async def test_the_services_keep_working_when_a_broker_node_and_then_the_postgres_primary_are_killed(
    stack: ComposeStack, lab: Lab
) -> None:
    with stack.api() as api:
        vpc = ok(api.post("/vpcs", json={"name": "ha", "cidr": SUBNET}))
        subnet = ok(api.post("/subnets", json={"vpc_id": vpc["id"], "name": "lab", "cidr": SUBNET}))
    # A HAVIP bound to cvm1 before anything is killed: the watcher → broker → binding → Postgres path works.
    pair = Failover(stack, lab, subnet["id"], "vip-ha", vrid=72)
    try:
        pair.master.start()
        seconds = await within(stack, "bound to cvm1", lambda: pair.bound_to("cvm1"), deadline_s=90)
        TIMINGS.append(("first binding", f"{seconds:.1f} s"))

        # 1. A broker node's container killed: the services' connections to it move to the other two nodes.
        victim = "rabbitmq-2"
        stack.kill(victim)
        killed = time.monotonic()
        await within(stack, "ready after a broker node was killed", lambda: ready(stack))
        what = "an allocation after a broker node was killed"
        await within(stack, what, lambda: allocates(stack, subnet["id"], "after-mq"))
        TIMINGS.append((f"{victim} killed: allocation again", f"{time.monotonic() - killed:.1f} s"))
        survivors = {f"rabbit@{node}" for node in RABBITMQ_NODES if node != victim}
        assert running_broker_nodes(stack, "rabbitmq-1") >= survivors

        # 2. The Postgres primary's container killed: the monitor promotes the standby, the services follow.
        primary = postgres_primary(stack)
        assert primary is not None, postgres_states(stack)
        stack.kill(primary)
        killed = time.monotonic()
        what = "an allocation after the primary was killed"
        await within(stack, what, lambda: allocates(stack, subnet["id"], "after-pg"))
        TIMINGS.append((f"{primary} (primary) killed: allocation again", f"{time.monotonic() - killed:.1f} s"))
        await within(stack, "ready after the primary was killed", lambda: ready(stack))
        # Which node writes now: the standby promoted, or — when the restart policy brought the killed one back
        # before the monitor gave up on it — the same node.
        TIMINGS.append(("monitor's view after the kill", str(postgres_states(stack))))

        # With one broker node and the first primary down: the binding held, and a keepalived failover (the
        # backup started, then the master stopped, as in test_compose.py) still moves the HAVIP.
        assert pair.bound_to("cvm1")
        pair.backup.start()
        stopping = time.monotonic()
        pair.master.stop()
        await within(stack, "bound to cvm2 after the failover", lambda: pair.bound_to("cvm2"))
        TIMINGS.append(("master stopped: bound to the backup", f"{time.monotonic() - stopping:.1f} s"))
        assert pair.backup.is_master()
    finally:
        pair.stop()

    # The killed containers back (their restart policy, or a start): they rejoin, the pair is healthy again.
    for service in (victim, primary):
        stack.start(service)
    started = time.monotonic()
    want = {f"rabbit@{node}" for node in RABBITMQ_NODES}
    await within(stack, "the broker node back in the cluster", lambda: running_broker_nodes(stack, victim) == want)
    await within(stack, "the killed primary back as the standby", lambda: postgres_healthy(stack))
    TIMINGS.append(("killed containers back", f"{time.monotonic() - started:.1f} s"))
    TIMINGS.append(("primary at the end", str(postgres_primary(stack))))
