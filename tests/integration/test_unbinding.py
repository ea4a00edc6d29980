"""One rule for every call that would end a live binding (the API contract): releasing the HAVIP, deregistering
its holder, or a candidate list that leaves the holder out answers 409 with a code that says why — and how to
force it — unless `force=true`; forced, the binding service ends the binding with a `release` transition whose
`cause` says which it was, and any flag the HAVIP had ends with it, published. The real allocator and binding
service, in this process, on real Postgres and RabbitMQ."""

from __future__ import annotations

import httpx
import pytest

from shared.messaging import Broker
from tests.integration.allocator_support import (
    Json,
    error,
    make_havip,
    make_instance,
    make_subnet,
    make_vpc,
    ok,
    publish_claim,
    shown,
    wait_shown,
)
from tests.listener import EventLog
from tests.waiting import eventually

# The real binding service decides on the claims the tests publish as the watcher.
pytestmark = pytest.mark.usefixtures("binding")

# The view is eventually consistent: generous deadlines, met in milliseconds on an idle machine.
DEADLINE_S = 30.0


class Cloud:
    """A VPC, a subnet and two instances of it, made through the API."""

    def __init__(self, client: httpx.AsyncClient, vpc: Json, subnet: Json, cvm1: Json, cvm2: Json) -> None:
        self.client, self.vpc, self.subnet, self.cvm1, self.cvm2 = client, vpc, subnet, cvm1, cvm2

    @classmethod
    async def make(cls, client: httpx.AsyncClient, octet: int) -> Cloud:
        vpc = await make_vpc(client, f"10.{octet}.0.0/16")
        subnet = await make_subnet(client, vpc["id"], f"10.{octet}.1.0/24")
        cvm1 = await make_instance(client, subnet["id"], f"10.{octet}.1.11")
        cvm2 = await make_instance(client, subnet["id"], f"10.{octet}.1.12")
        return cls(client, vpc, subnet, cvm1, cvm2)


async def bind(client: httpx.AsyncClient, watcher: Broker, havip: Json, instance: Json) -> None:
    """Claim until the API shows the instance holding the HAVIP (the binding service learns the inventory from
    the allocator's events: claims before that name no HAVIP)."""

    async def claimed_until_shown() -> bool:
        if (await shown(client, havip))["bound_instance_id"] == instance["id"]:
            return True
        await publish_claim(watcher, havip, instance)
        return False

    await eventually(claimed_until_shown, timeout=DEADLINE_S, interval=0.2, what=f"bound to {instance['name']}")


async def newest_transition(client: httpx.AsyncClient, havip: Json, sequence: int) -> Json:
    latest: Json = {}

    async def arrived() -> bool:
        nonlocal latest
        page = ok(await client.get(f"/v1/havips/{havip['id']}/transitions", params={"limit": 1}))
        latest = page["items"][0] if page["items"] else {}
        return latest.get("sequence") == sequence

    await eventually(arrived, timeout=DEADLINE_S, what=f"transition {sequence} of {havip['id']}")
    return latest


def names_force(body: Json) -> None:
    message = body["error"]["message"]
    assert "force=true" in message, message
    assert "--force" in message, message


async def test_releasing_a_bound_havip_needs_force_and_the_release_says_so(
    client: httpx.AsyncClient, watcher: Broker
) -> None:
    cloud = await Cloud.make(client, 31)
    havip = await make_havip(client, cloud.subnet["id"])
    await bind(client, watcher, havip, cloud.cvm1)

    names_force(error(await client.delete(f"/v1/havips/{havip['id']}"), 409, "HAVIP_BOUND"))
    assert (await shown(client, havip))["state"] == "BOUND"  # refused: nothing changed
    assert (await client.delete(f"/v1/havips/{havip['id']}", params={"force": "true"})).status_code == 204

    final = await newest_transition(client, havip, 2)
    assert (final["reason"], final["cause"]) == ("release", "released")
    assert (final["from_instance_id"], final["to_instance_id"]) == (cloud.cvm1["id"], None)


async def test_deregistering_the_holder_needs_force_and_leaves_the_havip_unbound(
    client: httpx.AsyncClient, watcher: Broker
) -> None:
    cloud = await Cloud.make(client, 32)
    havip = await make_havip(client, cloud.subnet["id"])  # no candidate list: any instance of the subnet
    await bind(client, watcher, havip, cloud.cvm1)

    body = error(await client.delete(f"/v1/instances/{cloud.cvm1['id']}"), 409, "INSTANCE_HOLDS_HAVIP")
    names_force(body)
    assert havip["id"] in body["error"]["message"]
    ok(await client.get(f"/v1/instances/{cloud.cvm1['id']}"))  # still registered
    assert (await client.delete(f"/v1/instances/{cloud.cvm1['id']}", params={"force": "true"})).status_code == 204

    release = await newest_transition(client, havip, 2)
    assert (release["reason"], release["cause"], release["to_instance_id"]) == (
        "release",
        "instance_deregistered",
        None,
    )
    await wait_shown(client, havip, "unbound", state="UNBOUND", bound_instance_id=None)
    await bind(client, watcher, havip, cloud.cvm2)  # until the next authorised claim
    claim = await newest_transition(client, havip, 3)
    assert (claim["reason"], claim["cause"]) == ("claim", None)


async def test_a_candidate_list_leaving_the_holder_out_needs_force(
    client: httpx.AsyncClient, watcher: Broker
) -> None:
    cloud = await Cloud.make(client, 33)
    both = [cloud.cvm1["id"], cloud.cvm2["id"]]
    havip = await make_havip(client, cloud.subnet["id"], candidates=both)
    await bind(client, watcher, havip, cloud.cvm1)
    path = f"/v1/havips/{havip['id']}"

    names_force(
        error(await client.patch(path, json={"candidates": [cloud.cvm2["id"]]}), 409, "HOLDER_NOT_IN_CANDIDATES")
    )
    assert (await shown(client, havip))["candidates"] == both
    assert ok(await client.patch(path, json={"candidates": [cloud.cvm1["id"]]}))["candidates"] == [
        cloud.cvm1["id"]
    ]
    assert ok(await client.patch(path, json={"candidates": []}))["candidates"] == []  # any instance: still held
    assert (await shown(client, havip))["state"] == "BOUND"

    narrowed = ok(await client.patch(path, params={"force": "true"}, json={"candidates": [cloud.cvm2["id"]]}))
    assert narrowed["candidates"] == [cloud.cvm2["id"]]
    release = await newest_transition(client, havip, 2)
    assert (release["reason"], release["cause"]) == ("release", "candidates_changed")
    await wait_shown(client, havip, "unbound", state="UNBOUND")


async def test_forcing_out_a_candidate_keeps_its_id_in_the_list_where_it_authorises_nobody(
    client: httpx.AsyncClient, watcher: Broker
) -> None:
    cloud = await Cloud.make(client, 34)
    havip = await make_havip(client, cloud.subnet["id"], candidates=[cloud.cvm1["id"]])
    names_force(error(await client.delete(f"/v1/instances/{cloud.cvm1['id']}"), 409, "INSTANCE_IN_USE"))
    assert (await client.delete(f"/v1/instances/{cloud.cvm1['id']}", params={"force": "true"})).status_code == 204
    # Taken out, the list would be empty: "any instance of the subnet". Kept, it names nobody who exists.
    assert (await shown(client, havip))["candidates"] == [cloud.cvm1["id"]]

    async def refused() -> bool:
        await publish_claim(watcher, havip, cloud.cvm2)
        page = ok(await client.get("/v1/claims/rejected", params={"havip_id": havip["id"]}))
        return any(r["mac"] == cloud.cvm2["mac"] and r["reason"] == "not_candidate" for r in page["items"])

    await eventually(refused, timeout=DEADLINE_S, interval=0.3, what="cvm2's claim refused as not a candidate")
    assert (await shown(client, havip))["state"] == "UNBOUND"


@pytest.mark.parametrize("ending", ["released", "instance_deregistered", "candidates_changed"])
async def test_a_flapping_split_brain_havip_ended_by_force_publishes_the_end_of_both_flags(
    client: httpx.AsyncClient, watcher: Broker, events: EventLog, ending: str
) -> None:
    cloud = await Cloud.make(
        client, 40 + ["released", "instance_deregistered", "candidates_changed"].index(ending)
    )
    havip = await make_havip(client, cloud.subnet["id"], candidates=[cloud.cvm1["id"], cloud.cvm2["id"]])
    await bind(client, watcher, havip, cloud.cvm1)
    for turn in range(7):  # two masters announcing in turn: more than 5 transitions, the claimant changing
        await publish_claim(watcher, havip, cloud.cvm2 if turn % 2 == 0 else cloud.cvm1)
    await wait_shown(client, havip, "flapping and in split brain", flapping=True, split_brain=True)

    force = {"force": "true"}
    if ending == "released":
        assert (await client.delete(f"/v1/havips/{havip['id']}", params=force)).status_code == 204
    elif ending == "instance_deregistered":
        assert (await client.delete(f"/v1/instances/{cloud.cvm2['id']}", params=force)).status_code == 204
    else:
        ok(await client.patch(f"/v1/havips/{havip['id']}", params=force, json={"candidates": [cloud.cvm1["id"]]}))

    for condition in ("flapping", "split_brain"):
        stopped = await events.wait_for(f"havip.{condition}.stopped", havip["id"])
        assert stopped.data["address"] == havip["address"]
    if ending != "released":
        await wait_shown(client, havip, "flags ended", flapping=False, split_brain=False, state="UNBOUND")
