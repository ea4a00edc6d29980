"""The allocator against the real Postgres and RabbitMQ of the test run: PATCH of a HAVIP, EIPs, the
audit of refused claims, expiry of idempotency keys, filters and pages of every list, subnet metrics, and the
events of every change.

Helpers come from allocator_support, the in-process app from conftest. Every test makes its own VPC (and,
where EIPs are concerned, its own app with its own EIP pool: the pool is shared by the whole database).
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
from fastapi import FastAPI

from shared.events import EipData, HavipData, RejectReason
from tests.integration.allocator_support import (
    RFC3339_MICRO,
    BindingStandIn,
    Json,
    all_pages,
    error,
    http_client,
    make_havip,
    make_instance,
    make_subnet,
    make_vpc,
    ok,
    running_app,
    wait_history,
    wait_shown,
)
from tests.listener import EventLog
from tests.metrics_text import value
from tests.waiting import eventually


async def setup(client: httpx.AsyncClient, cidr: str) -> tuple[Json, Json]:
    """A VPC with one /24 subnet: `cidr` is the VPC's /16."""
    vpc = await make_vpc(client, cidr)
    subnet_cidr = cidr.replace(".0.0/16", ".1.0/24")
    return vpc, await make_subnet(client, vpc["id"], subnet_cidr)


# ---- PATCH /v1/havips/{id} ---------------------------------------------------------------------------------


async def test_rename_and_replace_candidates(client: httpx.AsyncClient, events: EventLog) -> None:
    vpc, subnet = await setup(client, "10.60.0.0/16")
    a = await make_instance(client, subnet["id"], "10.60.1.10")
    b = await make_instance(client, subnet["id"], "10.60.1.11")
    havip = await make_havip(client, subnet["id"], name="old", candidates=[a["id"]])
    path = f"/v1/havips/{havip['id']}"

    renamed = ok(await client.patch(path, json={"name": "  new  "}))
    assert renamed["name"] == "new"
    assert renamed["candidates"] == [a["id"]]  # left out = kept
    replaced = ok(await client.patch(path, json={"candidates": [b["id"], a["id"]]}))
    assert replaced["candidates"] == [b["id"], a["id"]]
    assert replaced["name"] == "new"
    both = ok(await client.patch(path, json={"name": None, "candidates": []}))
    assert both["name"] is None
    assert both["candidates"] == []
    assert {k: v for k, v in both.items() if k not in ("name", "candidates")} == {
        k: v for k, v in havip.items() if k not in ("name", "candidates")
    }
    assert ok(await client.get(path)) == both

    # every change is published with the whole HAVIP, in order
    await events.wait_for("havip.updated", havip["id"])
    await eventually(lambda: len(events.of("havip.updated", havip["id"])) == 3, what="three updates")
    updates = events.of("havip.updated", havip["id"])
    assert [HavipData.model_validate(u).name for u in updates] == ["new", "new", None]
    assert updates[1] == {
        "id": havip["id"],
        "vpc_id": vpc["id"],
        "subnet_id": subnet["id"],
        "name": "new",
        "address": havip["address"],
        "candidates": [b["id"], a["id"]],
        "eip": None,
    }


async def test_patch_refuses_bad_input(client: httpx.AsyncClient) -> None:
    _vpc, subnet = await setup(client, "10.61.0.0/16")
    other = await make_subnet(client, _vpc["id"], "10.61.2.0/24")
    a = await make_instance(client, subnet["id"], "10.61.1.10")
    stranger = await make_instance(client, other["id"], "10.61.2.10")
    havip = await make_havip(client, subnet["id"], name="keep", candidates=[a["id"]])
    path = f"/v1/havips/{havip['id']}"

    def patch(body: Any) -> Any:
        return client.patch(path, json=body)

    error(await patch({"candidates": [a["id"], stranger["id"]]}), 400, "INVALID_CANDIDATES")
    error(await patch({"candidates": [str(uuid.uuid4())]}), 400, "INVALID_CANDIDATES")
    error(await patch({"candidates": [a["id"], a["id"]]}), 422, "VALIDATION_ERROR")
    error(await patch({"candidates": [str(uuid.uuid4()) for _ in range(11)]}), 422, "VALIDATION_ERROR")
    error(await patch({"candidates": None}), 422, "VALIDATION_ERROR")  # [] clears, null means nothing
    error(await patch({"name": ""}), 422, "VALIDATION_ERROR")
    error(await patch({"name": "x" * 65}), 422, "VALIDATION_ERROR")
    error(await patch({"address": "10.61.1.99"}), 422, "VALIDATION_ERROR")  # not changeable
    error(await patch({"subnet_id": other["id"]}), 422, "VALIDATION_ERROR")
    error(await patch([]), 422, "VALIDATION_ERROR")
    error(await client.patch(path), 422, "VALIDATION_ERROR")
    error(
        await client.patch(path, content=b"{", headers={"content-type": "application/json"}), 400, "MALFORMED_JSON"
    )
    error(await client.patch(f"/v1/havips/{uuid.uuid4()}", json={"name": "x"}), 404, "NOT_FOUND")
    error(await client.patch("/v1/havips/not-a-uuid", json={"name": "x"}), 422, "VALIDATION_ERROR")
    # nothing changed
    assert ok(await client.get(path)) == havip


async def test_patch_without_a_change_publishes_nothing(client: httpx.AsyncClient, events: EventLog) -> None:
    _vpc, subnet = await setup(client, "10.62.0.0/16")
    havip = await make_havip(client, subnet["id"], name="same")
    path = f"/v1/havips/{havip['id']}"
    assert ok(await client.patch(path, json={})) == havip
    assert ok(await client.patch(path, json={"name": "same", "candidates": []})) == havip
    ok(await client.patch(path, json={"name": "changed"}))
    # events leave in commit order: anything the no-ops had published would have arrived before this one
    await events.wait_for("havip.updated", havip["id"])
    assert len(events.of("havip.updated", havip["id"])) == 1


async def test_a_removed_candidate_can_be_deregistered(client: httpx.AsyncClient) -> None:
    _vpc, subnet = await setup(client, "10.63.0.0/16")
    a = await make_instance(client, subnet["id"], "10.63.1.10")
    b = await make_instance(client, subnet["id"], "10.63.1.11")
    havip = await make_havip(client, subnet["id"], candidates=[a["id"], b["id"]])
    error(await client.delete(f"/v1/instances/{a['id']}"), 409, "INSTANCE_IN_USE")
    ok(await client.patch(f"/v1/havips/{havip['id']}", json={"candidates": [b["id"]]}))
    assert (await client.delete(f"/v1/instances/{a['id']}")).status_code == 204
    # and a deregistered instance cannot come back into the list
    error(
        await client.patch(f"/v1/havips/{havip['id']}", json={"candidates": [a["id"]]}), 400, "INVALID_CANDIDATES"
    )


async def test_patch_and_deregistration_never_both_win(client: httpx.AsyncClient) -> None:
    """A candidate list never names an instance that is gone: both take the subnet's lock."""
    _vpc, subnet = await setup(client, "10.64.0.0/16")
    havip = await make_havip(client, subnet["id"])
    for i in range(8):
        instance = await make_instance(client, subnet["id"], f"10.64.1.{10 + i}")
        patched, deregistered = await asyncio.gather(
            client.patch(f"/v1/havips/{havip['id']}", json={"candidates": [instance["id"]]}),
            client.delete(f"/v1/instances/{instance['id']}"),
        )
        if patched.status_code == 200:
            error(deregistered, 409, "INSTANCE_IN_USE")
            ok(await client.patch(f"/v1/havips/{havip['id']}", json={"candidates": []}))
        else:
            error(patched, 400, "INVALID_CANDIDATES")
            assert deregistered.status_code == 204
    assert ok(await client.get(f"/v1/havips/{havip['id']}"))["candidates"] == []


async def test_patch_of_a_released_havip_is_404(client: httpx.AsyncClient) -> None:
    _vpc, subnet = await setup(client, "10.65.0.0/16")
    havip = await make_havip(client, subnet["id"])
    assert (await client.delete(f"/v1/havips/{havip['id']}")).status_code == 204
    error(await client.patch(f"/v1/havips/{havip['id']}", json={"name": "x"}), 404, "NOT_FOUND")


# ---- EIPs --------------------------------------------------------------------------------------------------


async def test_eips_unavailable_without_a_pool(client: httpx.AsyncClient) -> None:
    _vpc, subnet = await setup(client, "10.66.0.0/16")
    havip = await make_havip(client, subnet["id"])
    path = f"/v1/havips/{havip['id']}/eip"
    error(await client.post(path), 409, "EIP_POOL_NOT_CONFIGURED")
    error(await client.post(path, json={"address": "203.0.113.1"}), 409, "EIP_POOL_NOT_CONFIGURED")
    error(await client.delete(path), 409, "EIP_NOT_ASSOCIATED")
    error(await client.post(f"/v1/havips/{uuid.uuid4()}/eip"), 404, "NOT_FOUND")
    assert ok(await client.get(f"/v1/havips/{havip['id']}"))["eip"] is None


async def test_eip_association(database_url: str, amqp_url: str, events: EventLog) -> None:
    # .9 and .10 (a /30 gives its two hosts), and .20
    pool = "203.0.113.8/30, 203.0.113.20"
    async with running_app(database_url, amqp_url, 100, eip_pool=pool) as app, http_client(app) as client:
        _vpc, subnet = await setup(client, "10.67.0.0/16")
        one, two, three, four = [await make_havip(client, subnet["id"]) for _ in range(4)]

        def eip(havip: Json) -> str:
            return f"/v1/havips/{havip['id']}/eip"

        first = ok(await client.post(eip(one)))
        assert first["eip"] == "203.0.113.9"  # the lowest free
        assert {k: v for k, v in first.items() if k != "eip"} == {k: v for k, v in one.items() if k != "eip"}
        assert ok(await client.get(f"/v1/havips/{one['id']}"))["eip"] == "203.0.113.9"
        assert ok(await client.post(eip(two), json={"address": "203.0.113.20"}))["eip"] == "203.0.113.20"
        error(await client.post(eip(three), json={"address": "203.0.113.20"}), 409, "EIP_IN_USE")
        for outside in ("203.0.113.8", "203.0.113.11", "198.51.100.1", "10.67.1.5"):
            error(await client.post(eip(three), json={"address": outside}), 400, "EIP_NOT_IN_POOL")
        error(await client.post(eip(three), json={"address": "nope"}), 422, "VALIDATION_ERROR")
        error(await client.post(eip(three), json={"eip": "203.0.113.10"}), 422, "VALIDATION_ERROR")
        error(await client.post(eip(one)), 409, "EIP_ASSOCIATED")  # one per HAVIP
        error(await client.post(eip(one), json={"address": "203.0.113.9"}), 409, "EIP_ASSOCIATED")
        # an empty object or null is the same as no body
        assert ok(await client.post(eip(three), json={}))["eip"] == "203.0.113.10"
        error(await client.post(eip(four), json=None), 409, "EIP_POOL_EXHAUSTED")

        # release is refused while an EIP is associated, even forced
        error(await client.delete(f"/v1/havips/{one['id']}", params={"force": "true"}), 409, "EIP_ASSOCIATED")
        dissociated = ok(await client.delete(eip(one)))
        assert dissociated["eip"] is None
        error(await client.delete(eip(one)), 409, "EIP_NOT_ASSOCIATED")
        assert (await client.delete(f"/v1/havips/{one['id']}")).status_code == 204
        error(await client.delete(eip(one)), 404, "NOT_FOUND")
        # the freed address is the lowest again
        assert ok(await client.post(eip(four), content=b""))["eip"] == "203.0.113.9"

        # a rename publishes the whole HAVIP, its EIP included
        ok(await client.patch(f"/v1/havips/{two['id']}", json={"name": "with-eip"}))
        updated = await events.wait_for("havip.updated", two["id"])
        assert updated.data["eip"] == "203.0.113.20"

        associated = await events.wait_for("havip.eip.associated", one["id"])
        assert EipData.model_validate(associated.data) == EipData(havip_id=uuid.UUID(one["id"]), eip="203.0.113.9")
        gone = await events.wait_for("havip.eip.dissociated", one["id"])
        assert gone.data == {"havip_id": one["id"], "eip": "203.0.113.9"}
        await events.wait_for("havip.eip.associated", four["id"])
        await events.wait_for("havip.released", one["id"])
        # refused requests published nothing
        assert [e.type for e in events.received if e.data.get("havip_id") == three["id"]] == [
            "havip.eip.associated"
        ]
        assert events.of("havip.eip.associated", two["id"]) == [{"havip_id": two["id"], "eip": "203.0.113.20"}]


async def test_an_eip_is_never_shared(database_url: str, amqp_url: str) -> None:
    pool = "198.51.100.32/29"  # 6 hosts: .33 to .38
    async with running_app(database_url, amqp_url, 100, eip_pool=pool) as app, http_client(app) as client:
        # spread over subnets of two VPCs: only the pool's lock serialises them, not a subnet's
        subnets = []
        for cidr in ("10.68.0.0/16", "10.168.0.0/16"):
            vpc = await make_vpc(client, cidr)
            for n in range(1, 4):
                subnets.append(await make_subnet(client, vpc["id"], cidr.replace(".0.0/16", f".{n}.0/24")))
        havips = [await make_havip(client, subnets[i % len(subnets)]["id"]) for i in range(10)]
        responses = await asyncio.gather(*(client.post(f"/v1/havips/{h['id']}/eip") for h in havips))
        given = [r.json()["eip"] for r in responses if r.status_code == 200]
        assert sorted(given, key=lambda a: int(a.rsplit(".", 1)[1])) == [f"198.51.100.{i}" for i in range(33, 39)]
        for r in responses:
            if r.status_code != 200:
                error(r, 409, "EIP_POOL_EXHAUSTED")

        # two HAVIPs asking for the same address: one gets it
        for h, r in zip(havips, responses, strict=True):
            if r.status_code == 200 and r.json()["eip"] in ("198.51.100.33", "198.51.100.34"):
                ok(await client.delete(f"/v1/havips/{h['id']}/eip"))
        idle = [h for h, r in zip(havips, responses, strict=True) if r.status_code != 200]
        same = await asyncio.gather(
            *(client.post(f"/v1/havips/{h['id']}/eip", json={"address": "198.51.100.33"}) for h in idle)
        )
        assert sorted(r.status_code for r in same) == [200] + [409] * (len(idle) - 1)
        for r in same:
            if r.status_code == 409:
                error(r, 409, "EIP_IN_USE")
        # one HAVIP asking four times at once: one EIP (the lowest free, .34), three refusals
        loser = next(h for h, r in zip(idle, same, strict=True) if r.status_code == 409)
        twice = await asyncio.gather(*(client.post(f"/v1/havips/{loser['id']}/eip") for _ in range(4)))
        assert sorted(r.status_code for r in twice) == [200, 409, 409, 409]
        assert [r.json()["eip"] for r in twice if r.status_code == 200] == ["198.51.100.34"]
        for r in twice:
            if r.status_code == 409:
                error(r, 409, "EIP_ASSOCIATED")
        listed = [ok(await client.get(f"/v1/havips/{h['id']}")) for h in havips]
        eips = [h["eip"] for h in listed if h["eip"] is not None]
        assert len(eips) == len(set(eips)) == 6


# ---- GET /v1/claims/rejected -------------------------------------------------------------------------------


async def test_rejected_claims_newest_first(client: httpx.AsyncClient, binding_events: BindingStandIn) -> None:
    _vpc, subnet = await setup(client, "10.69.0.0/16")
    havip = await make_havip(client, subnet["id"])
    other = await make_havip(client, subnet["id"])
    base = datetime(2025, 3, 1, 9, 0, 0, 250, tzinfo=UTC)
    reasons: list[RejectReason] = ["unknown_mac", "other_subnet", "not_candidate", "eth_mismatch", "unknown_mac"]

    async def audited(n: int) -> bool:
        return len(await all_pages(client, "/v1/claims/rejected", limit=1000)) >= n

    for i, reason in enumerate(reasons):
        mac = f"02:00:00:00:01:{i:02x}"
        await binding_events.refuse(havip["id"], havip["address"], mac, reason, base + timedelta(i))
        await binding_events.refuse(other["id"], other["address"], "02:00:00:00:02:00", "not_candidate", base)
        # The audit lists in the order the view recorded them; the view's consumers may take two messages
        # published back to back in either order: each refusal is recorded before the next is published.
        await eventually(functools.partial(audited, 2 * (i + 1)), what=f"refusal {i} recorded")
    last = await binding_events.refuse(None, "10.69.1.200", "02:00:00:00:03:00", "unknown_mac", base, count=7)
    await binding_events.broker.publish(last)  # delivered twice (a publisher's retry): stored once

    async def all_audited() -> bool:
        return len(await all_pages(client, "/v1/claims/rejected", limit=1000)) >= 11

    await eventually(all_audited, what="the 11 refusals in the audit")

    page = ok(await client.get("/v1/claims/rejected", params={"havip_id": havip["id"], "limit": 2}))
    assert page["items"][0] == {
        "havip_id": havip["id"],
        "address": havip["address"],
        "mac": "02:00:00:00:01:04",
        "reason": "unknown_mac",
        "captured_at": "2025-03-05T09:00:00.000250Z",
        "watcher_id": "watcher-7",
        "count": 1,
    }
    ours = await all_pages(client, "/v1/claims/rejected", havip_id=havip["id"], limit=2)
    assert [c["reason"] for c in ours] == reasons[::-1]
    assert [c["mac"][-2:] for c in ours] == ["04", "03", "02", "01", "00"]
    assert all(RFC3339_MICRO.match(c["captured_at"]) for c in ours)

    everything = await all_pages(client, "/v1/claims/rejected", limit=3)
    assert everything[0]["havip_id"] is None  # the newest, on no HAVIP
    assert everything[0]["address"] == "10.69.1.200"
    assert everything[0]["count"] == 7
    assert len([c for c in everything if c["address"] == "10.69.1.200"]) == 1
    assert len([c for c in everything if c["havip_id"] == other["id"]]) == 5
    # the audit outlives the HAVIP
    assert (await client.delete(f"/v1/havips/{havip['id']}")).status_code == 204
    assert len(await all_pages(client, "/v1/claims/rejected", havip_id=havip["id"])) == 5
    assert ok(await client.get("/v1/claims/rejected", params={"havip_id": str(uuid.uuid4())})) == {
        "items": [],
        "next_page_token": None,
    }

    for params in ({"havip_id": "nope"}, {"limit": 0}, {"limit": 1001}, {"page_token": "x" * 257}):
        error(await client.get("/v1/claims/rejected", params=params), 422, "VALIDATION_ERROR")
    transitions_token = "eyJzIjo1fQ"  # {"s":5}: a transitions token is not a claims token
    for token in ("AAAA", transitions_token, "eyJyIjowfQ", "eyJyIjoiMSJ9"):  # ..., {"r":0}, {"r":"1"}
        error(await client.get("/v1/claims/rejected", params={"page_token": token}), 400, "INVALID_PAGE_TOKEN")


# ---- idempotency keys expire -------------------------------------------------------------------------------


async def test_an_expired_idempotency_key_is_forgotten(client: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    _vpc, subnet = await setup(client, "10.70.0.0/16")
    key = f"expiry-{uuid.uuid4()}"
    body = {"subnet_id": subnet["id"], "name": "first"}

    async def allocate(payload: Json) -> httpx.Response:
        return await client.post("/v1/havips", json=payload, headers={"Idempotency-Key": key})

    async def age(hours: float) -> None:
        await db.execute(
            "UPDATE allocator.idempotency_keys SET created_at = now() - make_interval(secs => $2) WHERE key = $1",
            key,
            hours * 3600,
        )

    first = ok(await allocate(body), 201)
    await age(23.9)  # kept at least 24 hours: still the same HAVIP, still refused with another body
    again = await allocate(body)
    assert ok(again, 201) == first
    assert again.headers["Idempotent-Replayed"] == "true"
    error(await allocate({**body, "name": "second"}), 409, "IDEMPOTENCY_KEY_REUSED")

    await age(24.1)  # expired: forgotten even before the purge deletes it
    fresh = await allocate({**body, "name": "second"})
    second = ok(fresh, 201)
    assert "Idempotent-Replayed" not in fresh.headers
    assert second["id"] != first["id"]
    assert second["name"] == "second"
    # and the key is honoured again from now on, for the new HAVIP
    replay = await allocate({**body, "name": "second"})
    assert ok(replay, 201) == second
    assert replay.headers["Idempotent-Replayed"] == "true"
    error(await allocate(body), 409, "IDEMPOTENCY_KEY_REUSED")

    # an expired key of a released HAVIP allocates anew, too
    assert (await client.delete(f"/v1/havips/{second['id']}")).status_code == 204
    error(await allocate({**body, "name": "second"}), 409, "IDEMPOTENCY_KEY_REUSED")
    await age(25)
    assert ok(await allocate(body), 201)["id"] not in (first["id"], second["id"])


async def test_expired_idempotency_keys_are_purged(
    database_url: str, amqp_url: str, db: asyncpg.Connection
) -> None:
    old, recent = f"old-{uuid.uuid4()}", f"recent-{uuid.uuid4()}"
    for key, hours in ((old, 30), (recent, 23)):
        await db.execute(
            """INSERT INTO allocator.idempotency_keys (key, request_hash, havip_id, created_at)
               VALUES ($1, 'x', $2, now() - make_interval(hours => $3))""",
            key,
            uuid.uuid4(),
            hours,
        )

    async def present(key: str) -> bool:
        return bool(await db.fetchval("SELECT count(*) FROM allocator.idempotency_keys WHERE key = $1", key))

    async with running_app(database_url, amqp_url, 100, idempotency_purge_interval_s=0.05):
        await eventually(lambda: _not(present(old)), timeout=5, what="the expired key purged")
    assert await present(recent)


async def _not(result: Any) -> bool:
    return not await result


# ---- filters and pages of every list -----------------------------------------------------------------------


async def test_every_list_pages_and_filters(client: httpx.AsyncClient, binding_events: BindingStandIn) -> None:
    vpc, one = await setup(client, "10.71.0.0/16")
    two = await make_subnet(client, vpc["id"], "10.71.2.0/24")
    other_vpc = await make_vpc(client, "10.71.0.0/16")
    elsewhere = await make_subnet(client, other_vpc["id"], "10.71.1.0/24")
    inst = [await make_instance(client, s["id"], f"10.71.{n}.9") for s, n in ((one, 1), (two, 2))]
    foreign = await make_instance(client, elsewhere["id"], "10.71.1.9")
    h1 = [await make_havip(client, one["id"]) for _ in range(3)]
    h2 = [await make_havip(client, two["id"]) for _ in range(2)]
    h3 = await make_havip(client, elsewhere["id"])

    def ids(items: list[Json]) -> list[str]:
        return [i["id"] for i in items]

    async def listed(path: str, **params: Any) -> list[Json]:
        # walk one item per page; the result must not depend on the page size
        single = await all_pages(client, path, limit=1, **params)
        assert single == await all_pages(client, path, limit=1000, **params)
        return single

    assert ids(await listed("/v1/subnets", vpc_id=vpc["id"])) == [one["id"], two["id"]]
    assert [v["id"] for v in await listed("/v1/vpcs") if v["id"] in (vpc["id"], other_vpc["id"])] == [
        vpc["id"],
        other_vpc["id"],
    ]
    assert ids(await listed("/v1/instances", vpc_id=vpc["id"])) == ids(inst)
    assert ids(await listed("/v1/instances", subnet_id=two["id"])) == [inst[1]["id"]]
    assert ids(await listed("/v1/instances", vpc_id=other_vpc["id"])) == [foreign["id"]]
    assert ids(await listed("/v1/instances", vpc_id=other_vpc["id"], subnet_id=one["id"])) == []

    assert ids(await listed("/v1/havips", vpc_id=vpc["id"])) == ids(h1 + h2)
    assert ids(await listed("/v1/havips", subnet_id=two["id"])) == ids(h2)
    assert ids(await listed("/v1/havips", vpc_id=other_vpc["id"])) == [h3["id"]]
    # the same address in two VPCs: the address filter with and without the VPC
    assert h3["address"] == h1[0]["address"] == "10.71.1.2"
    assert ids(await listed("/v1/havips", address="10.71.1.2")) == [h1[0]["id"], h3["id"]]
    assert ids(await listed("/v1/havips", address="10.71.1.2", vpc_id=other_vpc["id"])) == [h3["id"]]

    # state from the view of bindings: never bound, bound, bound and released
    await binding_events.move(h1[1], inst[0])
    await binding_events.move(h2[0], inst[1])
    await binding_events.move(h1[2], inst[0])
    await binding_events.move(h1[2], None)
    await wait_history(client, h1[2]["id"], 2)
    await wait_shown(client, h2[0], "bound", state="BOUND")
    assert ids(await listed("/v1/havips", vpc_id=vpc["id"], state="BOUND")) == [h1[1]["id"], h2[0]["id"]]
    assert ids(await listed("/v1/havips", vpc_id=vpc["id"], state="UNBOUND")) == [
        h1[0]["id"],
        h1[2]["id"],
        h2[1]["id"],
    ]
    assert ids(await listed("/v1/havips", subnet_id=two["id"], state="BOUND")) == [h2[0]["id"]]
    assert ids(await listed("/v1/havips", vpc_id=vpc["id"], state="BOUND", address=h1[1]["address"])) == [
        h1[1]["id"]
    ]
    assert ids(await listed("/v1/havips", vpc_id=vpc["id"], state="UNBOUND", address=h1[1]["address"])) == []

    for path, params in (
        ("/v1/havips", {"state": "bound"}),
        ("/v1/havips", {"address": "10.71.1.256"}),
        ("/v1/havips", {"address": "10.71.1.0/24"}),
        ("/v1/havips", {"vpc_id": "x"}),
        ("/v1/subnets", {"vpc_id": "x"}),
        ("/v1/instances", {"subnet_id": "x"}),
        ("/v1/vpcs", {"limit": 0}),
        ("/v1/instances", {"limit": 1001}),
        (f"/v1/havips/{h1[0]['id']}/transitions", {"limit": "many"}),
    ):
        error(await client.get(path, params=params), 422, "VALIDATION_ERROR")
    for path in ("/v1/vpcs", "/v1/subnets", "/v1/instances", "/v1/havips", "/v1/claims/rejected"):
        error(await client.get(path, params={"page_token": "%%%"}), 400, "INVALID_PAGE_TOKEN")


async def test_unknown_query_parameters_are_refused(app: FastAPI, client: httpx.AsyncClient) -> None:
    """A misspelled filter must not silently list everything."""
    vpc = await make_vpc(client, "10.74.0.0/16")
    body = error(await client.get("/v1/havips", params={"vpcid": vpc["id"]}), 422, "VALIDATION_ERROR")
    assert body["error"]["details"] == [
        {"loc": ["query", "vpcid"], "msg": "this route has no such parameter", "type": "extra_forbidden"}
    ]
    assert body["error"]["message"] == "query parameter vpcid: this route has no such parameter"
    for method, path, params in (
        ("GET", "/v1/vpcs", {"": "x"}),
        ("GET", f"/v1/vpcs/{vpc['id']}", {"verbose": "1"}),
        ("DELETE", f"/v1/vpcs/{vpc['id']}", {"forse": "true"}),
        ("POST", "/v1/havips", {"dry_run": "1"}),
        ("GET", "/v1/claims/rejected", {"havip": str(uuid.uuid4())}),
    ):
        error(await client.request(method, path, params=params, json={}), 422, "VALIDATION_ERROR")
    ok(await client.get(f"/v1/vpcs/{vpc['id']}"))  # nothing was deleted
    # the declared ones pass, the token is still checked first
    ok(await client.get("/v1/havips", params={"vpc_id": vpc["id"], "limit": 5, "state": "BOUND"}))
    async with http_client(app, {}) as anonymous:
        error(await anonymous.get("/v1/havips", params={"vpcid": "x"}), 401, "UNAUTHENTICATED")
    # the open routes are not /v1 routes
    assert (await client.get("/healthz", params={"probe": "1"})).status_code == 200


# ---- metrics -----------------------------------------------------------------------------------------------


def free_addresses(text: str, subnet_id: str) -> float | None:
    return value(text, "havip_subnet_free_addresses", {"subnet_id": subnet_id})


async def test_subnet_free_addresses_metric(client: httpx.AsyncClient) -> None:
    vpc = await make_vpc(client, "10.72.0.0/16")
    subnet = await make_subnet(client, vpc["id"], "10.72.1.0/29")  # 5 usable

    async def scraped() -> float | None:
        return free_addresses((await client.get("/metrics", headers={"Authorization": ""})).text, subnet["id"])

    assert await scraped() == 5
    text = (await client.get("/metrics")).text
    assert f'havip_subnet_usable_addresses{{subnet_id="{subnet["id"]}"}} 5.0' in text
    havip = await make_havip(client, subnet["id"])
    assert await scraped() == 4
    instance = await make_instance(client, subnet["id"], "10.72.1.6")
    assert await scraped() == 3
    assert ok(await client.get(f"/v1/subnets/{subnet['id']}"))["free_addresses"] == 3
    assert (await client.delete(f"/v1/instances/{instance['id']}")).status_code == 204
    assert (await client.delete(f"/v1/havips/{havip['id']}")).status_code == 204
    assert await scraped() == 5
    assert (await client.delete(f"/v1/subnets/{subnet['id']}")).status_code == 204
    assert await scraped() is None  # a deleted subnet's series is gone


async def test_new_routes_are_measured_by_template(client: httpx.AsyncClient) -> None:
    _vpc, subnet = await setup(client, "10.73.0.0/16")
    havip = await make_havip(client, subnet["id"])
    ok(await client.patch(f"/v1/havips/{havip['id']}", json={"name": "m"}))
    error(await client.post(f"/v1/havips/{havip['id']}/eip"), 409, "EIP_POOL_NOT_CONFIGURED")
    ok(await client.get("/v1/claims/rejected"))
    text = (await client.get("/metrics")).text
    assert 'havip_api_requests_total{method="PATCH",route="/v1/havips/{havip_id}",status="200"}' in text
    assert 'havip_api_requests_total{method="POST",route="/v1/havips/{havip_id}/eip",status="409"}' in text
    assert 'havip_api_request_duration_seconds_count{method="GET",route="/v1/claims/rejected"}' in text
    assert havip["id"] not in text


async def test_the_new_routes_require_the_token(app: FastAPI, client: httpx.AsyncClient) -> None:
    _vpc, subnet = await setup(client, "10.75.0.0/16")
    havip = await make_havip(client, subnet["id"])
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}):
        async with http_client(app, headers) as anonymous:
            for method, path in (
                ("PATCH", f"/v1/havips/{havip['id']}"),
                ("POST", f"/v1/havips/{havip['id']}/eip"),
                ("DELETE", f"/v1/havips/{havip['id']}/eip"),
                ("GET", "/v1/claims/rejected"),
            ):
                response = await anonymous.request(method, path, json={"name": "stolen"})
                error(response, 401, "UNAUTHENTICATED")
    assert ok(await client.get(f"/v1/havips/{havip['id']}")) == havip


# ---- the OpenAPI document ----------------------------------------------------------------------------------


async def test_openapi_describes_the_new_routes_and_their_errors(client: httpx.AsyncClient) -> None:
    spec = ok(await client.get("/openapi.json", headers={"Authorization": ""}))
    for path, method in (
        ("/v1/havips/{havip_id}", "patch"),
        ("/v1/havips/{havip_id}/eip", "post"),
        ("/v1/havips/{havip_id}/eip", "delete"),
        ("/v1/claims/rejected", "get"),
    ):
        operation = spec["paths"][path][method]
        assert operation["security"] == [{"bearerAuth": []}]
        for status in ("400", "401", "404", "409", "422", "503"):
            assert operation["responses"][status]["content"]["application/json"]["schema"]["$ref"].endswith(
                "/ErrorResponse"
            ), (path, method, status)
    claim = spec["components"]["schemas"]["RejectedClaim"]
    assert set(claim["required"]) == {"havip_id", "address", "mac", "reason", "captured_at", "watcher_id", "count"}
