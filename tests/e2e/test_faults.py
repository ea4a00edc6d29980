"""R1–R3 (docs/contract.md#reliability): a failover storm on the wire while RabbitMQ or Postgres goes away (for the
services only: they reach them through proxies the test cuts, the shared servers stay up for everyone else), or
while a service is killed with SIGKILL and restarted. Afterwards every HAVIP is bound to the last claimant on the
wire, the history of each has no gap and no duplicate, and the services have reconnected by themselves."""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import pytest

from tests.e2e.system import System, ok, register_inventory
from tests.lab import Lab
from tests.lab.raw import RawSender
from tests.tcp_proxy import CuttableProxy
from tests.waiting import eventually

pytestmark = pytest.mark.e2e

SUBNET = "198.51.100.0/24"
HAVIPS = 10  # the allocator's default quota per VPC
ROUND_S = 0.1


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab(SUBNET) as lab:
        lab.add_host("cvma", "198.51.100.11")
        lab.add_host("cvmb", "198.51.100.12")
        lab.add_capture_port("cap")
        yield lab


class Links:
    """The services' ways to the shared servers, each through a proxy of its own."""

    def __init__(self) -> None:
        self.watcher_amqp = CuttableProxy(5672)
        self.binding_amqp = CuttableProxy(5672)
        self.binding_pg = CuttableProxy(5432)
        self.all = (self.watcher_amqp, self.binding_amqp, self.binding_pg)

    def restore(self) -> None:
        for proxy in self.all:
            if not proxy.listening:
                proxy.start()


@pytest.fixture(scope="module")
def links() -> Iterator[Links]:
    links = Links()
    for proxy in links.all:
        proxy.start()
    try:
        yield links
    finally:
        for proxy in links.all:
            proxy.cut()


@pytest.fixture(scope="module")
def system(
    lab: Lab, database_url: str, amqp_url: str, links: Links, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[System]:
    with System(
        database_url,
        amqp_url,
        lab.capture_ports["cap"].iface,
        tmp_path_factory.mktemp("services"),
        watcher_amqp_url=links.watcher_amqp.url(amqp_url),
        binding_amqp_url=links.binding_amqp.url(amqp_url),
        binding_database_url=links.binding_pg.url(database_url),
    ) as system:
        yield system


@pytest.fixture(scope="module")
def inventory(system: System, lab: Lab) -> dict[str, Any]:
    """A VPC, a subnet and the two CVMs, registered through the API."""
    hosts = {name: (lab.hosts[name].ip, lab.hosts[name].mac) for name in ("cvma", "cvmb")}
    return register_inventory(system, "faults", SUBNET, hosts)


class Storm(threading.Thread):
    """Every ROUND_S, each HAVIP is announced by cvma or cvmb (chosen at random), one GARP each, until
    stopped (bounded by `max_s`). `last` is the last claimant of every address on the wire."""

    def __init__(self, senders: dict[str, RawSender], addresses: list[str], max_s: float, seed: int) -> None:
        super().__init__(name="failover storm", daemon=True)
        self.senders, self.addresses, self.max_s = senders, addresses, max_s
        self.rng = random.Random(seed)
        self.stopping = threading.Event()
        self.last: dict[str, str] = {}
        self.rounds = 0

    def run(self) -> None:
        start = time.monotonic()
        while not self.stopping.is_set() and time.monotonic() - start < self.max_s:
            for address in self.addresses:
                who = self.rng.choice(sorted(self.senders))
                self.senders[who].send([self.senders[who].garp(address)])
                self.last[address] = who
            self.rounds += 1
            self.stopping.wait(ROUND_S)


def break_and_mend(system: System, links: Links, fault: str) -> Callable[[], None]:
    """Break what `fault` names now; the returned function mends it."""
    if fault == "broker":  # R1: RabbitMQ away for the watcher and the binding service
        links.watcher_amqp.cut()
        links.binding_amqp.cut()
        return links.restore
    if fault == "database":  # R2: Postgres away for the binding service
        links.binding_pg.cut()
        return links.restore
    # R3: a service killed mid-stream, restarted
    system.kill(fault)

    def restart() -> None:
        system.start_service(fault)
        system.wait_ready(names=(fault,))

    return restart


@pytest.mark.parametrize("fault", ["broker", "database", "binding", "arp_watcher", "allocator"])
async def test_a_failover_storm_survives_the_fault(
    system: System, lab: Lab, links: Links, inventory: dict[str, Any], database_url: str, fault: str
) -> None:
    instances = {name: inventory["instances"][name]["id"] for name in ("cvma", "cvmb")}
    with system.api() as api:
        havips = [
            ok(api.post("/havips", json={"subnet_id": inventory["subnet"]["id"], "name": f"{fault}-{i}"}))
            for i in range(HAVIPS)
        ]
    addresses = [h["address"] for h in havips]
    senders = {name: RawSender(lab.hosts[name].netns, lab.hosts[name].mac) for name in instances}
    pids = {name: service.process.pid for name, service in system.services.items()}
    publish_failures = system.metric("havip_watcher_publish_failures_total", service="watcher")
    storm = Storm(senders, addresses, max_s=60, seed=zlib.crc32(fault.encode()))
    mend: Callable[[], None] | None = None
    try:
        storm.start()
        await asyncio.sleep(2)  # the storm in its stride
        mend = await asyncio.to_thread(break_and_mend, system, links, fault)
        await asyncio.sleep(3)  # the storm goes on during the fault
        await asyncio.to_thread(mend)
        mend = None
        await asyncio.sleep(3)  # and after it: the last claims are made with everything back
    finally:
        storm.stopping.set()
        await asyncio.to_thread(storm.join, 10)
        if mend is not None:
            await asyncio.to_thread(mend)
        for sender in senders.values():
            sender.close()
    assert storm.rounds >= 50
    # The fault really happened.
    if fault == "broker":
        assert system.metric("havip_watcher_publish_failures_total", service="watcher") > publish_failures
    elif fault == "database":
        assert "handler failed" in system.services["binding"].log(2000)
    else:
        assert system.services[fault].process.pid != pids[fault]

    expected = {address: instances[storm.last[address]] for address in addresses}

    def bound() -> dict[str, str | None]:
        with system.api() as api:
            return {h["address"]: ok(api.get(f"/havips/{h['id']}"))["bound_instance_id"] for h in havips}

    await eventually(lambda: bound() == expected, timeout=90, what=f"every HAVIP on its last claimant ({fault})")

    conn = await asyncpg.connect(database_url)
    rows_of: dict[str, list[asyncpg.Record]] = {}

    async def binding_histories() -> dict[str, list[tuple[int, str]]]:
        for havip in havips:
            rows_of[havip["id"]] = await conn.fetch(
                """SELECT sequence, from_instance_id, to_instance_id FROM binding.transitions
                   WHERE havip_id = $1 ORDER BY sequence""",
                uuid.UUID(havip["id"]),
            )
        return {
            h: [(r["sequence"], str(r["to_instance_id"])) for r in reversed(rows)] for h, rows in rows_of.items()
        }

    def shown_histories() -> dict[str, list[tuple[int, str]]]:
        with system.api() as api:
            return {
                h["id"]: [
                    (t["sequence"], str(t["to_instance_id"]))
                    for t in ok(api.get(f"/havips/{h['id']}/transitions", params={"limit": 1000}))["items"]
                ]
                for h in havips
            }

    async def the_same() -> bool:
        # The binding's histories read again each time: claims left queued by the fault may still be deciding
        # (a holder met again on the way, as the last one, satisfies `bound` before the backlog is through).
        histories = await binding_histories()
        last = {h["address"]: histories[h["id"]][0][1] if histories[h["id"]] else None for h in havips}
        return last == expected and histories == shown_histories()

    try:
        # The allocator's own view (from the binding's events) has the same history: none lost, none twice.
        await eventually(the_same, timeout=60, what=f"the API's histories equal to the binding's ({fault})")
        for havip in havips:
            rows = rows_of[havip["id"]]
            sequences = [r["sequence"] for r in rows]
            assert sequences == list(range(1, len(rows) + 1)), f"{havip['address']}: gap or duplicate"
            for before, after in itertools.pairwise(rows):
                assert after["from_instance_id"] == before["to_instance_id"], f"{havip['address']}: broken chain"
            assert str(rows[-1]["to_instance_id"]) == expected[havip["address"]]
    finally:
        await conn.close()
    # Every service is running and answering (reconnected by itself where its link was cut).
    system.wait_ready(timeout=30)
    with system.api() as api:  # the VPC's quota is for the next fault
        for havip in havips:
            assert api.delete(f"/havips/{havip['id']}", params={"force": "true"}).status_code == 204
