"""Segments (docs/contract.md#segments) in the lab: two tenants' VPCs use the same CIDR and the same HAVIP address,
their subnets attached to two VLANs of one segment (the watcher's). A claim on one VLAN moves — and is audited
against — only that VLAN's HAVIP; a claim where no subnet is attached is counted, not stored; the attachment
survives a restart of the binding service."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

from tests.e2e.system import System, ok
from tests.lab import Lab
from tests.waiting import eventually

pytestmark = pytest.mark.e2e

CIDR = "192.0.2.0/24"
VIP = "192.0.2.100"
SEGMENT = "lab-trunk"
TENANTS = {"blue": (10, ("b1", "b2")), "red": (20, ("r1", "r2"))}


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab(CIDR) as lab:
        # Untagged hosts that tag their own GARPs (arping -V): the wire carries both VLANs, as on a trunk.
        for i, name in enumerate(("b1", "b2", "r1", "r2")):
            lab.add_host(name, f"192.0.2.{11 + i}")
        lab.add_capture_port("cap")
        yield lab


@pytest.fixture(scope="module")
def system(
    lab: Lab, database_url: str, amqp_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[System]:
    interface = lab.capture_ports["cap"].iface
    workdir = tmp_path_factory.mktemp("services")
    with System(database_url, amqp_url, interface, workdir, segment=SEGMENT) as system:
        yield system


@pytest.fixture(scope="module")
def tenants(system: System, lab: Lab) -> dict[str, Any]:
    """Per tenant: a VPC of the same CIDR, a subnet on its VLAN of the segment, two instances, the HAVIP."""
    out: dict[str, Any] = {}
    with system.api() as api:
        for tenant, (vlan, hosts) in TENANTS.items():
            vpc = ok(api.post("/vpcs", json={"name": tenant, "cidr": CIDR}))
            subnet = ok(
                api.post(
                    "/subnets",
                    json={"vpc_id": vpc["id"], "name": tenant, "cidr": CIDR, "segment": SEGMENT, "vlan": vlan},
                )
            )
            instances = {
                name: ok(
                    api.post(
                        "/instances",
                        json={
                            "subnet_id": subnet["id"],
                            "name": name,
                            "private_ip": lab.hosts[name].ip,
                            "mac": lab.hosts[name].mac,
                        },
                    )
                )
                for name in hosts
            }
            havip = ok(api.post("/havips", json={"subnet_id": subnet["id"], "address": VIP}))
            out[tenant] = {"vlan": vlan, "havip": havip, "instances": instances}
    return out


async def holder(system: System, havip_id: str) -> Any:
    conn = await asyncpg.connect(system.database_url)
    try:
        return await conn.fetchval("SELECT instance_id FROM binding.bindings WHERE havip_id = $1", havip_id)
    finally:
        await conn.close()


async def refusals(system: System, havip_id: str) -> list[tuple[str, str]]:
    conn = await asyncpg.connect(system.database_url)
    try:
        rows = await conn.fetch(
            "SELECT mac::text, reason FROM binding.rejected_claims WHERE havip_id = $1 ORDER BY captured_at",
            havip_id,
        )
        return [(r["mac"], r["reason"]) for r in rows]
    finally:
        await conn.close()


async def test_one_address_two_tenants_each_claim_decided_on_its_own_vlan(
    system: System, lab: Lab, tenants: dict[str, Any]
) -> None:
    blue, red = tenants["blue"], tenants["red"]
    blue_id, red_id = blue["havip"]["id"], red["havip"]["id"]
    assert blue["havip"]["address"] == red["havip"]["address"] == VIP

    async def held_by(havip_id: str, instance: dict[str, Any] | None) -> bool:
        return str(await holder(system, havip_id)) == (instance["id"] if instance else "None")

    lab.hosts["b1"].arping(VIP, vlan=blue["vlan"])
    await eventually(lambda: held_by(blue_id, blue["instances"]["b1"]), what="blue's HAVIP bound to b1")
    lab.hosts["r1"].arping(VIP, vlan=red["vlan"])
    await eventually(lambda: held_by(red_id, red["instances"]["r1"]), what="red's HAVIP bound to r1")
    assert await held_by(blue_id, blue["instances"]["b1"])

    # red's instance claims the address on blue's VLAN: refused against blue's HAVIP, red's is not touched.
    lab.hosts["r2"].arping(VIP, vlan=blue["vlan"])
    r2_mac = lab.hosts["r2"].mac
    await eventually(
        lambda: _contains(refusals(system, blue_id), (r2_mac, "other_subnet")), what="refused against blue"
    )
    assert await refusals(system, red_id) == []
    assert await held_by(red_id, red["instances"]["r1"])
    assert await held_by(blue_id, blue["instances"]["b1"])

    # Untagged: no subnet is attached to the segment without a VLAN — counted, not stored, nothing moves.
    not_havip = system.metric("havip_claims_total", {"outcome": "not_havip"})
    lab.hosts["b2"].arping(VIP)
    await eventually(
        lambda: system.metric("havip_claims_total", {"outcome": "not_havip"}) > not_havip, what="counted"
    )
    assert await refusals(system, red_id) == []
    assert [r for r in await refusals(system, blue_id) if r[0] == lab.hosts["b2"].mac] == []

    # The attachment is the binding's own state: after a restart, b2 on blue's VLAN moves blue's HAVIP only.
    system.kill("binding")
    system.start_service("binding")
    system.wait_ready(names=("binding",))
    lab.hosts["b2"].arping(VIP, vlan=blue["vlan"])
    await eventually(lambda: held_by(blue_id, blue["instances"]["b2"]), what="blue's HAVIP moved to b2")
    assert await held_by(red_id, red["instances"]["r1"])
    with system.api() as api:
        for tenant, name in (("blue", "b2"), ("red", "r1")):
            shown = ok(api.get(f"/havips/{tenants[tenant]['havip']['id']}"))
            assert shown["bound_instance_id"] == tenants[tenant]["instances"][name]["id"]


async def _contains(found: Any, item: tuple[str, str]) -> bool:
    return item in await found
