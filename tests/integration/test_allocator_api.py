"""The allocator's HTTP API against the real Postgres and RabbitMQ of the test run.

The app runs in-process (httpx over ASGI, lifespan entered), with settings passed explicitly. Every test makes
its own VPC, so tests do not depend on each other's data.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import secrets
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from shared.db import drop_database
from shared.events import EVENT_TYPES
from tests.integration.allocator_support import (
    RFC3339_MICRO,
    ROOT,
    TOKEN,
    BindingStandIn,
    Headers,
    all_pages,
    error,
    http_client,
    make_havip,
    make_instance,
    make_subnet,
    make_vpc,
    ok,
    random_mac,
    running_app,
    wait_history,
    wait_shown,
)
from tests.listener import EventLog

# ---- open routes, auth -------------------------------------------------------------------------------------


async def test_open_routes(client: httpx.AsyncClient) -> None:
    anonymous = {"Authorization": ""}
    assert ok(await client.get("/healthz", headers=anonymous)) == {"status": "ok"}
    ready = ok(await client.get("/readyz", headers=anonymous))
    assert ready == {"status": "ok", "checks": {"database": "ok", "broker": "ok"}}
    metrics = await client.get("/metrics", headers=anonymous)
    assert metrics.status_code == 200
    assert "havip_api_requests_total" in metrics.text
    spec = ok(await client.get("/openapi.json", headers=anonymous))
    assert {"/v1/vpcs", "/v1/subnets/{subnet_id}", "/v1/havips/{havip_id}/transitions"} <= set(spec["paths"])
    assert "bearerAuth" in spec["components"]["securitySchemes"]
    assert spec["paths"]["/v1/vpcs"]["post"]["security"] == [{"bearerAuth": []}]
    # documented errors have the error shape, 422 included
    post = spec["paths"]["/v1/vpcs"]["post"]["responses"]
    assert post["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")


ASSET_TYPES = {".js": "text/javascript", ".css": "text/css", ".png": "image/png", ".json": "application/json"}


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_docs_load_nothing_from_outside(client: httpx.AsyncClient, page: str) -> None:
    """The documentation pages work on an isolated control plane: every file they load is the allocator's own,
    served without the token (as /openapi.json is)."""
    anonymous = {"Authorization": ""}
    response = await client.get(page, headers=anonymous)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    html = response.text
    assert not re.search(r"(?i)(?:https?:)?//[a-z0-9]", html), "an absolute URL in the page"
    if page == "/docs":  # Swagger UI's badge from validator.swagger.io: off
        assert '"validatorUrl": null' in html
    referenced = re.findall(r'(?:src|href|spec-url)="([^"]+)"', html) + re.findall(r"\burl: '([^']+)'", html)
    suffixes = {url[url.rfind(".") :] for url in referenced}
    wanted = {".js", ".png", ".json"} | ({".css"} if page == "/docs" else set())
    assert suffixes == wanted, referenced
    for url in referenced:
        assert url.startswith("/"), url
        asset = await client.get(url, headers=anonymous)
        assert asset.status_code == 200, url
        assert asset.headers["content-type"].startswith(ASSET_TYPES[url[url.rfind(".") :]]), url
        assert len(asset.content) > 1000, url
    error(await client.get("/docs/assets/nothing.js", headers=anonymous), 404, "NOT_FOUND")


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token-0123456789"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": "Bearer"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {b"Authorization": "Bearer t\u00e9st-0123456789abcdef".encode("latin-1")},
    ],
)
async def test_v1_routes_require_the_token(app: FastAPI, headers: Headers) -> None:
    async with http_client(app, headers) as anonymous:
        for method, path, body in [
            ("GET", "/v1/vpcs", None),
            ("POST", "/v1/vpcs", {"name": "x", "cidr": "10.0.0.0/16"}),
            ("GET", f"/v1/havips/{uuid.uuid4()}", None),
            ("DELETE", f"/v1/subnets/{uuid.uuid4()}", None),
        ]:
            response = await anonymous.request(method, path, json=body)
            error(response, 401, "UNAUTHENTICATED")
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
        # the token is checked before the body is even parsed
        response = await anonymous.post("/v1/vpcs", content=b"{nope", headers={"content-type": "application/json"})
        error(response, 401, "UNAUTHENTICATED")


# ---- validation and error shape ----------------------------------------------------------------------------


async def test_validation_errors_have_the_error_shape(client: httpx.AsyncClient) -> None:
    body = error(await client.post("/v1/vpcs", json={"name": "x", "cidr": "10.0.0.1/16"}), 422, "VALIDATION_ERROR")
    assert body["error"]["details"][0]["loc"] == ["body", "cidr"]
    error(await client.post("/v1/vpcs", json={"name": "x", "cidr": "10.0.0.0/30"}), 422, "VALIDATION_ERROR")
    error(await client.post("/v1/vpcs", json={"name": "x", "cidr": "2001:db8::/32"}), 422, "VALIDATION_ERROR")
    error(await client.post("/v1/vpcs", json={"name": "", "cidr": "10.0.0.0/16"}), 422, "VALIDATION_ERROR")
    error(await client.post("/v1/vpcs", json={"name": "a\u0000b", "cidr": "10.0.0.0/16"}), 422, "VALIDATION_ERROR")
    error(
        await client.post("/v1/vpcs", json={"name": "x", "cidr": "10.0.0.0/16", "extra": 1}),
        422,
        "VALIDATION_ERROR",
    )
    error(await client.post("/v1/vpcs", json=[1, 2]), 422, "VALIDATION_ERROR")
    error(await client.post("/v1/vpcs"), 422, "VALIDATION_ERROR")
    error(
        await client.post("/v1/vpcs", content=b'{"name": "x",', headers={"content-type": "application/json"}),
        400,
        "MALFORMED_JSON",
    )
    error(
        await client.post("/v1/vpcs", content=b"name=x", headers={"content-type": "text/plain"}),
        422,
        "VALIDATION_ERROR",
    )
    # a lone surrogate cannot be stored: refused, not a 500
    error(
        await client.post(
            "/v1/vpcs",
            content=b'{"name": "\\ud800", "cidr": "10.0.0.0/16"}',
            headers={"content-type": "application/json"},
        ),
        422,
        "VALIDATION_ERROR",
    )
    error(await client.get("/v1/vpcs/not-a-uuid"), 422, "VALIDATION_ERROR")
    error(await client.get("/v1/vpcs", params={"limit": 0}), 422, "VALIDATION_ERROR")
    error(await client.get("/v1/vpcs", params={"limit": 1001}), 422, "VALIDATION_ERROR")
    error(await client.get("/v1/havips", params={"state": "MAYBE"}), 422, "VALIDATION_ERROR")
    error(await client.get("/v1/havips", params={"address": "10.0.0.256"}), 422, "VALIDATION_ERROR")
    error(await client.get("/v1/vpcs", params={"page_token": "garbage!"}), 400, "INVALID_PAGE_TOKEN")
    error(await client.get("/v1/havips", params={"page_token": "eyJ4IjoxfQ"}), 400, "INVALID_PAGE_TOKEN")
    error(await client.get(f"/v1/vpcs/{uuid.uuid4()}"), 404, "NOT_FOUND")
    error(await client.get("/v1/nothing-here"), 404, "NOT_FOUND")
    response = await client.put("/v1/vpcs")
    error(response, 405, "METHOD_NOT_ALLOWED")
    assert "GET" in response.headers["Allow"]
    big = {"name": "x", "cidr": "10.0.0.0/16", "pad": "x" * 100_000}
    error(await client.post("/v1/vpcs", json=big), 413, "PAYLOAD_TOO_LARGE")


@pytest.mark.parametrize(
    ("method", "path", "body", "message"),
    [
        (
            "POST",
            "/v1/vpcs",
            {"name": "x", "cidr": "10.0.300.0/24"},
            "cidr: octet 300 of 10.0.300.0/24 is out of range 0–255",
        ),
        (
            "POST",
            "/v1/vpcs",
            {"name": "x", "cidr": "2001:db8::/32"},
            "cidr: 2001:db8::/32 is an IPv6 block: IPv6 is not supported yet (IPv4 only)",
        ),
        (
            "POST",
            "/v1/vpcs",
            {"name": "x", "cidr": "10.0.0.1/16"},
            "cidr: 10.0.0.1/16 has host bits set: the block is 10.0.0.0/16",
        ),
        (
            "POST",
            "/v1/vpcs",
            {"name": "x", "cidr": "10.0.0.0/33"},
            "cidr: prefix length /33 of 10.0.0.0/33 is out of range: IPv4 has /0 to /32",
        ),
        (
            "POST",
            "/v1/vpcs",
            {"name": "x", "cidr": "10.0.0.0/30"},
            "cidr: prefix length must be between /8 and /29 (a /29 holds 5 usable addresses), got /30",
        ),
        (
            "POST",
            "/v1/subnets",
            {"vpc_id": str(uuid.uuid4()), "name": "x", "cidr": "banana"},
            "cidr: the value is not an IPv4 CIDR block: expected four decimal octets 0–255 separated by dots, "
            "like 10.0.0.0/16",
        ),
        (
            "POST",
            "/v1/instances",
            {"subnet_id": str(uuid.uuid4()), "name": "x", "private_ip": "10.0.0.300", "mac": "02:00:00:00:00:01"},
            "private_ip: octet 300 of 10.0.0.300 is out of range 0–255",
        ),
        (
            "POST",
            "/v1/instances",
            {"subnet_id": str(uuid.uuid4()), "name": "x", "private_ip": 167772165, "mac": "02:00:00:00:00:01"},
            "private_ip: an IPv4 address must be a string like 10.0.0.5, not a number",
        ),
        (
            "POST",
            "/v1/instances",
            {"subnet_id": str(uuid.uuid4()), "name": "x", "private_ip": "10.0.0.5", "mac": "01:00:5e:00:00:01"},
            "mac: a multicast MAC address cannot belong to an interface",
        ),
        (
            "POST",
            "/v1/havips",
            {"subnet_id": str(uuid.uuid4()), "address": "2001:db8::5"},
            "address: 2001:db8::5 is an IPv6 address: IPv6 is not supported yet (IPv4 only)",
        ),
        (
            "POST",
            f"/v1/havips/{uuid.uuid4()}/eip",
            {"address": "203.0.113.5/32"},
            "address: 203.0.113.5/32 is a CIDR block: give the address alone, without its /prefix length",
        ),
        (
            "GET",
            "/v1/havips?address=10.0.0.256",
            None,
            "query parameter address: octet 256 of 10.0.0.256 is out of range 0–255",
        ),
        ("GET", "/v1/vpcs?subnetid=x", None, "query parameter subnetid: this route has no such parameter"),
    ],
)
async def test_validation_messages_say_what_is_wrong(
    client: httpx.AsyncClient, method: str, path: str, body: Any, message: str
) -> None:
    answer = error(await client.request(method, path, json=body), 422, "VALIDATION_ERROR")
    assert answer["error"]["message"] == message
    (detail,) = answer["error"]["details"]
    assert message.endswith(detail["msg"])
    assert "Value error" not in answer["error"]["message"]


# ---- VPCs --------------------------------------------------------------------------------------------------


async def test_vpc_create_show_list_delete(client: httpx.AsyncClient) -> None:
    vpc = await make_vpc(client, "192.0.2.0/24", name="  lab ")
    assert set(vpc) == {"id", "name", "cidr", "created_at"}
    assert uuid.UUID(vpc["id"])
    assert vpc["name"] == "lab"
    assert vpc["cidr"] == "192.0.2.0/24"
    assert RFC3339_MICRO.match(vpc["created_at"])
    assert ok(await client.get(f"/v1/vpcs/{vpc['id']}")) == vpc

    more = [await make_vpc(client) for _ in range(3)]
    listed = await all_pages(client, "/v1/vpcs", limit=2)
    ids = [v["id"] for v in listed]
    assert len(ids) == len(set(ids))
    assert {vpc["id"], *(v["id"] for v in more)} <= set(ids)
    first = ok(await client.get("/v1/vpcs", params={"limit": 1}))
    assert len(first["items"]) == 1
    assert first["next_page_token"]

    assert (await client.delete(f"/v1/vpcs/{vpc['id']}")).status_code == 204
    error(await client.get(f"/v1/vpcs/{vpc['id']}"), 404, "NOT_FOUND")
    error(await client.delete(f"/v1/vpcs/{vpc['id']}"), 404, "NOT_FOUND")


# ---- subnets -----------------------------------------------------------------------------------------------


async def test_subnet_containment_overlap_and_in_use(client: httpx.AsyncClient) -> None:
    vpc = await make_vpc(client, "10.20.0.0/16")
    subnet = await make_subnet(client, vpc["id"], "10.20.1.0/24")
    assert subnet["vpc_id"] == vpc["id"]
    assert subnet["gateway"] == "10.20.1.1"
    assert subnet["usable_addresses"] == subnet["free_addresses"] == 253
    assert RFC3339_MICRO.match(subnet["created_at"])

    def create(cidr: str, vpc_id: str = vpc["id"]) -> Any:
        return client.post("/v1/subnets", json={"vpc_id": vpc_id, "name": "s", "cidr": cidr})

    error(await create("10.21.0.0/24"), 400, "SUBNET_NOT_IN_VPC")
    error(await create("10.20.0.0/15"), 400, "SUBNET_NOT_IN_VPC")
    error(await create("10.20.1.0/24"), 409, "SUBNET_OVERLAP")
    error(await create("10.20.1.128/25"), 409, "SUBNET_OVERLAP")
    error(await create("10.20.0.0/23"), 409, "SUBNET_OVERLAP")
    error(await create("10.20.2.0/24", vpc_id=str(uuid.uuid4())), 404, "NOT_FOUND")
    error(await create("10.20.2.0/30"), 422, "VALIDATION_ERROR")
    small = ok(await create("10.20.2.0/29"), 201)
    assert small["usable_addresses"] == 5

    listed = await all_pages(client, "/v1/subnets", vpc_id=vpc["id"])
    assert {s["id"] for s in listed} == {subnet["id"], small["id"]}
    other_vpc = await make_vpc(client, "10.20.0.0/16")  # VPC blocks may overlap each other
    assert ok(await client.get("/v1/subnets", params={"vpc_id": other_vpc["id"]}))["items"] == []

    await make_instance(client, subnet["id"], "10.20.1.10")
    shown = ok(await client.get(f"/v1/subnets/{subnet['id']}"))
    assert shown["free_addresses"] == 252

    error(await client.delete(f"/v1/vpcs/{vpc['id']}"), 409, "VPC_IN_USE")
    error(await client.delete(f"/v1/subnets/{subnet['id']}"), 409, "SUBNET_IN_USE")
    assert (await client.delete(f"/v1/subnets/{small['id']}")).status_code == 204
    error(await client.get(f"/v1/subnets/{small['id']}"), 404, "NOT_FOUND")


# ---- instances ---------------------------------------------------------------------------------------------


async def test_instance_register_show_list_deregister(client: httpx.AsyncClient) -> None:
    vpc = await make_vpc(client, "10.30.0.0/16")
    subnet = await make_subnet(client, vpc["id"], "10.30.1.0/24")
    other = await make_subnet(client, vpc["id"], "10.30.2.0/24")
    mac = random_mac()
    instance = await make_instance(client, subnet["id"], "10.30.1.10", mac.upper().replace(":", "-"))
    assert instance["mac"] == mac
    assert instance["vpc_id"] == vpc["id"]
    assert instance["private_ip"] == "10.30.1.10"
    assert RFC3339_MICRO.match(instance["created_at"])
    assert ok(await client.get(f"/v1/instances/{instance['id']}")) == instance

    def register(ip: str, mac: str | None = None, subnet_id: str = subnet["id"]) -> Any:
        payload = {"subnet_id": subnet_id, "name": "n", "private_ip": ip, "mac": mac or random_mac()}
        return client.post("/v1/instances", json=payload)

    for reserved in ("10.30.1.0", "10.30.1.1", "10.30.1.255"):
        error(await register(reserved), 400, "ADDRESS_RESERVED")
    error(await register("10.30.3.5"), 400, "ADDRESS_NOT_IN_SUBNET")
    error(await register("10.30.1.10"), 409, "ADDRESS_IN_USE")
    error(await register("10.30.1.11", mac=mac.upper()), 409, "MAC_IN_USE")
    error(await register("10.30.2.11", mac=mac, subnet_id=other["id"]), 409, "MAC_IN_USE")
    error(await register("10.30.1.11", mac="01:00:5e:00:00:01"), 422, "VALIDATION_ERROR")
    error(await register("10.30.1.11", subnet_id=str(uuid.uuid4())), 404, "NOT_FOUND")
    second = ok(await register("10.30.2.10", subnet_id=other["id"]), 201)

    assert [i["id"] for i in await all_pages(client, "/v1/instances", subnet_id=subnet["id"])] == [instance["id"]]
    by_vpc = await all_pages(client, "/v1/instances", vpc_id=vpc["id"], limit=1)
    assert [i["id"] for i in by_vpc] == [instance["id"], second["id"]]

    assert (await client.delete(f"/v1/instances/{instance['id']}")).status_code == 204
    error(await client.get(f"/v1/instances/{instance['id']}"), 404, "NOT_FOUND")
    error(await client.delete(f"/v1/instances/{instance['id']}"), 404, "NOT_FOUND")
    # the address and the MAC are free again
    await make_instance(client, subnet["id"], "10.30.1.10", mac)


# ---- HAVIPs ------------------------------------------------------------------------------------------------


async def test_havip_allocation_rules(client: httpx.AsyncClient) -> None:
    vpc = await make_vpc(client, "10.40.0.0/16")
    subnet = await make_subnet(client, vpc["id"], "10.40.1.0/24")
    sid = subnet["id"]

    first = await make_havip(client, sid, name="web")
    assert first["address"] == "10.40.1.2"  # .0 network, .1 gateway
    assert first["state"] == "UNBOUND"
    assert first["vpc_id"] == vpc["id"]
    assert first["candidates"] == []
    assert first["eip"] is None
    assert first["bound_instance_id"] is first["bound_mac"] is first["last_transition_at"] is None
    assert first["flapping"] is first["split_brain"] is False
    assert RFC3339_MICRO.match(first["created_at"])

    await make_instance(client, sid, "10.40.1.3")
    assert (await make_havip(client, sid))["address"] == "10.40.1.4"  # lowest free skips the instance
    given = await make_havip(client, sid, address="10.40.1.200")
    assert given["address"] == "10.40.1.200"
    assert (await make_havip(client, sid))["address"] == "10.40.1.5"

    def allocate(**fields: Any) -> Any:
        return client.post("/v1/havips", json={"subnet_id": sid, **fields})

    error(await allocate(address="10.40.1.200"), 409, "ADDRESS_IN_USE")
    error(await allocate(address="10.40.1.3"), 409, "ADDRESS_IN_USE")  # an instance's IP
    for reserved in ("10.40.1.0", "10.40.1.1", "10.40.1.255"):
        error(await allocate(address=reserved), 400, "ADDRESS_RESERVED")
    error(await allocate(address="10.40.2.9"), 400, "ADDRESS_NOT_IN_SUBNET")
    error(await allocate(address="not-an-ip"), 422, "VALIDATION_ERROR")
    error(await client.post("/v1/havips", json={"subnet_id": str(uuid.uuid4())}), 404, "NOT_FOUND")
    # and an instance may not take a HAVIP's address
    response = await client.post(
        "/v1/instances", json={"subnet_id": sid, "name": "n", "private_ip": "10.40.1.2", "mac": random_mac()}
    )
    error(response, 409, "ADDRESS_IN_USE")

    assert ok(await client.get(f"/v1/havips/{first['id']}")) == first
    assert (await client.delete(f"/v1/havips/{first['id']}")).status_code == 204
    error(await client.get(f"/v1/havips/{first['id']}"), 404, "NOT_FOUND")
    error(await client.delete(f"/v1/havips/{first['id']}"), 404, "NOT_FOUND")
    assert (await make_havip(client, sid))["address"] == "10.40.1.2"  # released addresses are reused


async def test_a_subnet_is_attached_to_a_segment_and_vlan_published_with_it(
    client: httpx.AsyncClient, events: EventLog
) -> None:
    """Segments (docs/contract.md#segments): the default segment needs no configuration; a named segment (and VLAN)
    is kept, shown and published for the binding service; a bad one is refused."""
    vpc = await make_vpc(client, "10.30.0.0/16")
    plain = await make_subnet(client, vpc["id"], "10.30.1.0/24")
    assert (plain["segment"], plain["vlan"]) == ("default", None)

    def create(cidr: str, **attachment: Any) -> Any:
        return client.post("/v1/subnets", json={"vpc_id": vpc["id"], "name": "s", "cidr": cidr, **attachment})

    trunk = ok(await create("10.30.2.0/24", segment="rack-7.trunk", vlan=120), 201)
    assert (trunk["segment"], trunk["vlan"]) == ("rack-7.trunk", 120)
    assert ok(await client.get(f"/v1/subnets/{trunk['id']}"))["vlan"] == 120
    created = await events.wait_for("subnet.created", trunk["id"])
    assert (created.data["segment"], created.data["vlan"]) == ("rack-7.trunk", 120)
    for bad in ({"segment": ""}, {"segment": "has space"}, {"segment": "x" * 64}, {"vlan": 0}, {"vlan": 4095}):
        error(await create("10.30.3.0/24", **bad), 422, "VALIDATION_ERROR")


async def test_smallest_subnet_fills_up(client: httpx.AsyncClient) -> None:
    vpc = await make_vpc(client, "10.41.0.0/16")
    subnet = await make_subnet(client, vpc["id"], "10.41.0.8/29")
    addresses = [(await make_havip(client, subnet["id"]))["address"] for _ in range(5)]
    assert addresses == [f"10.41.0.{i}" for i in range(10, 15)]
    error(await client.post("/v1/havips", json={"subnet_id": subnet["id"]}), 409, "SUBNET_FULL")
    assert ok(await client.get(f"/v1/subnets/{subnet['id']}"))["free_addresses"] == 0


async def test_candidates(client: httpx.AsyncClient) -> None:
    vpc = await make_vpc(client, "10.42.0.0/16")
    subnet = await make_subnet(client, vpc["id"], "10.42.1.0/24")
    elsewhere = await make_subnet(client, vpc["id"], "10.42.2.0/24")
    a = await make_instance(client, subnet["id"], "10.42.1.10")
    b = await make_instance(client, subnet["id"], "10.42.1.11")
    stranger = await make_instance(client, elsewhere["id"], "10.42.2.10")

    havip = await make_havip(client, subnet["id"], candidates=[a["id"], b["id"]])
    assert havip["candidates"] == [a["id"], b["id"]]

    def allocate(candidates: list[str]) -> Any:
        return client.post("/v1/havips", json={"subnet_id": subnet["id"], "candidates": candidates})

    error(await allocate([a["id"], stranger["id"]]), 400, "INVALID_CANDIDATES")
    error(await allocate([str(uuid.uuid4())]), 400, "INVALID_CANDIDATES")
    error(await allocate([a["id"], a["id"]]), 422, "VALIDATION_ERROR")
    error(await allocate([str(uuid.uuid4()) for _ in range(11)]), 422, "VALIDATION_ERROR")
    error(await allocate(["nope"]), 422, "VALIDATION_ERROR")

    # a candidate cannot vanish from under its HAVIP (an emptied list would admit any instance)
    error(await client.delete(f"/v1/instances/{a['id']}"), 409, "INSTANCE_IN_USE")
    assert (await client.delete(f"/v1/havips/{havip['id']}")).status_code == 204
    assert (await client.delete(f"/v1/instances/{a['id']}")).status_code == 204


async def test_havip_list_filters_and_pages(client: httpx.AsyncClient, binding_events: BindingStandIn) -> None:
    vpc = await make_vpc(client, "10.43.0.0/16")
    one = await make_subnet(client, vpc["id"], "10.43.1.0/24")
    two = await make_subnet(client, vpc["id"], "10.43.2.0/24")
    in_one = [await make_havip(client, one["id"]) for _ in range(3)]
    in_two = [await make_havip(client, two["id"]) for _ in range(2)]

    everything = await all_pages(client, "/v1/havips", vpc_id=vpc["id"], limit=2)
    assert [h["id"] for h in everything] == [h["id"] for h in in_one + in_two]
    assert [h["id"] for h in await all_pages(client, "/v1/havips", subnet_id=two["id"])] == [
        h["id"] for h in in_two
    ]
    found = await all_pages(client, "/v1/havips", vpc_id=vpc["id"], address="10.43.1.3")
    assert [h["id"] for h in found] == [in_one[1]["id"]]

    instance = await make_instance(client, one["id"], "10.43.1.50")
    await binding_events.move(in_one[0], instance)
    await wait_shown(client, in_one[0], "bound", state="BOUND")
    bound = await all_pages(client, "/v1/havips", vpc_id=vpc["id"], state="BOUND")
    unbound = await all_pages(client, "/v1/havips", vpc_id=vpc["id"], state="UNBOUND")
    assert [h["id"] for h in bound] == [in_one[0]["id"]]
    assert len(unbound) == 4


async def test_quota_holds_under_concurrency(database_url: str, amqp_url: str) -> None:
    async with running_app(database_url, amqp_url, quota=3) as small_app, http_client(small_app) as small:
        vpc = await make_vpc(small, "10.44.0.0/16")
        one = await make_subnet(small, vpc["id"], "10.44.1.0/24")
        two = await make_subnet(small, vpc["id"], "10.44.2.0/24")
        responses = await asyncio.gather(
            *(small.post("/v1/havips", json={"subnet_id": (one, two)[i % 2]["id"]}) for i in range(12))
        )
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [201] * 3 + [403] * 9
        for response in responses:
            if response.status_code == 403:
                error(response, 403, "QUOTA_EXCEEDED")
        assert len(await all_pages(small, "/v1/havips", vpc_id=vpc["id"])) == 3
        # the quota is per VPC
        other = await make_vpc(small, "10.44.0.0/16")
        await make_havip(small, (await make_subnet(small, other["id"], "10.44.1.0/24"))["id"])


async def test_concurrent_allocations_never_share_an_address(client: httpx.AsyncClient) -> None:
    vpc = await make_vpc(client, "10.45.0.0/16")
    subnet = await make_subnet(client, vpc["id"], "10.45.0.0/24")
    net = ipaddress.IPv4Network(subnet["cidr"])
    instance_ips = ["10.45.0.5", "10.45.0.20", "10.45.0.33"]

    havip_calls = [client.post("/v1/havips", json={"subnet_id": subnet["id"]}) for _ in range(50)]
    instance_calls = [
        client.post(
            "/v1/instances",
            json={"subnet_id": subnet["id"], "name": "n", "private_ip": ip, "mac": random_mac()},
        )
        for ip in instance_ips
    ]
    responses = await asyncio.gather(*havip_calls, *instance_calls)
    havip_responses, instance_responses = responses[:50], responses[50:]
    addresses = [ok(r, 201)["address"] for r in havip_responses]
    taken_by_instances = {r.json()["private_ip"] for r in instance_responses if r.status_code == 201}
    for r in instance_responses:
        assert r.status_code in (201, 409), r.text  # an instance may lose its IP to a HAVIP, never share it

    assert len(set(addresses)) == 50
    reserved = {str(net.network_address), str(net.network_address + 1), str(net.broadcast_address)}
    assert not set(addresses) & reserved
    assert not set(addresses) & taken_by_instances
    assert all(ipaddress.IPv4Address(a) in net for a in addresses)
    # the lowest ones, wherever the instances landed
    expected = sorted(
        (a for a in net.hosts() if str(a) not in reserved and str(a) not in taken_by_instances), key=int
    )[:50]
    assert sorted(addresses, key=lambda a: int(ipaddress.IPv4Address(a))) == [str(a) for a in expected]


async def test_idempotency_key(client: httpx.AsyncClient) -> None:
    vpc = await make_vpc(client, "10.46.0.0/16")
    subnet = await make_subnet(client, vpc["id"], "10.46.1.0/24")
    key = {"Idempotency-Key": f"order {uuid.uuid4()}"}
    body = {"subnet_id": subnet["id"], "name": "db"}

    first = await client.post("/v1/havips", json=body, headers=key)
    again = await client.post("/v1/havips", json=body, headers=key)
    assert ok(first, 201) == ok(again, 201)
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    error(
        await client.post("/v1/havips", json={**body, "name": "other"}, headers=key), 409, "IDEMPOTENCY_KEY_REUSED"
    )

    racing = {"Idempotency-Key": secrets.token_hex(8)}
    results = await asyncio.gather(*(client.post("/v1/havips", json=body, headers=racing) for _ in range(8)))
    assert len({ok(r, 201)["id"] for r in results}) == 1
    assert len(await all_pages(client, "/v1/havips", subnet_id=subnet["id"])) == 2

    assert (await client.delete(f"/v1/havips/{first.json()['id']}")).status_code == 204
    error(await client.post("/v1/havips", json=body, headers=key), 409, "IDEMPOTENCY_KEY_REUSED")
    for bad in ("x" * 65, "tab\there"):
        response = await client.post("/v1/havips", json=body, headers={"Idempotency-Key": bad})
        error(response, 422, "VALIDATION_ERROR")


# ---- the view of bindings (the binding service's events, published here by a stand-in) ----------------------


async def test_havip_shows_its_binding(client: httpx.AsyncClient, binding_events: BindingStandIn) -> None:
    vpc = await make_vpc(client, "10.47.0.0/16")
    subnet = await make_subnet(client, vpc["id"], "10.47.1.0/24")
    instance = await make_instance(client, subnet["id"], "10.47.1.10")
    havip = await make_havip(client, subnet["id"])
    assert ok(await client.get(f"/v1/havips/{havip['id']}"))["state"] == "UNBOUND"

    captured_at = datetime(2025, 1, 31, 12, 0, 0, tzinfo=UTC)
    committed_at = captured_at + timedelta(seconds=3, microseconds=250)
    await binding_events.move(havip, instance, captured_at=captured_at, committed_at=committed_at)
    await binding_events.condition(havip, "split_brain", True)
    shown = await wait_shown(client, havip, "bound, split brain", state="BOUND", split_brain=True)
    assert shown["bound_instance_id"] == instance["id"]
    assert shown["bound_mac"] == instance["mac"]
    assert shown["last_transition_at"] == "2025-01-31T12:00:03.000250Z"
    assert shown["last_seen_at"] == "2025-01-31T12:00:00.000000Z"
    assert shown["flapping"] is False

    error(await client.delete(f"/v1/havips/{havip['id']}"), 409, "HAVIP_BOUND")
    # the binding service released it (e.g. its holder deregistered): UNBOUND again
    released_at = committed_at + timedelta(seconds=1)
    await binding_events.move(havip, None, committed_at=released_at)
    unbound = await wait_shown(client, havip, "released", state="UNBOUND")
    assert unbound["bound_mac"] is None
    assert unbound["bound_instance_id"] is None
    assert unbound["last_transition_at"] == "2025-01-31T12:00:04.000250Z"
    assert unbound["last_seen_at"] == "2025-01-31T12:00:00.000000Z"  # when the holder was last seen
    await binding_events.move(havip, instance)
    await wait_shown(client, havip, "bound again", state="BOUND")
    error(await client.delete(f"/v1/havips/{havip['id']}"), 409, "HAVIP_BOUND")
    assert (await client.delete(f"/v1/havips/{havip['id']}", params={"force": "true"})).status_code == 204


async def test_eip_blocks_release(client: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    vpc = await make_vpc(client, "10.48.0.0/16")
    havip = await make_havip(client, (await make_subnet(client, vpc["id"], "10.48.1.0/24"))["id"])
    eip = f"203.0.113.{secrets.randbelow(250) + 1}"
    await db.execute("UPDATE allocator.havips SET eip = $1::inet WHERE id = $2", eip, uuid.UUID(havip["id"]))
    assert ok(await client.get(f"/v1/havips/{havip['id']}"))["eip"] == eip
    error(await client.delete(f"/v1/havips/{havip['id']}", params={"force": "true"}), 409, "EIP_ASSOCIATED")
    await db.execute("UPDATE allocator.havips SET eip = NULL WHERE id = $1", uuid.UUID(havip["id"]))
    assert (await client.delete(f"/v1/havips/{havip['id']}")).status_code == 204


async def test_transitions_newest_first(client: httpx.AsyncClient, binding_events: BindingStandIn) -> None:
    vpc = await make_vpc(client, "10.49.0.0/16")
    subnet = await make_subnet(client, vpc["id"], "10.49.1.0/24")
    a = await make_instance(client, subnet["id"], "10.49.1.10")
    b = await make_instance(client, subnet["id"], "10.49.1.11")
    havip = await make_havip(client, subnet["id"])
    hid = uuid.UUID(havip["id"])
    assert ok(await client.get(f"/v1/havips/{hid}/transitions")) == {"items": [], "next_page_token": None}

    base = datetime(2025, 2, 1, 8, 0, 0, tzinfo=UTC)
    for seq, holder in enumerate([a, b, a, None], start=1):
        await binding_events.move(
            havip,
            holder,
            captured_at=base + timedelta(seconds=seq),
            committed_at=base + timedelta(seconds=seq, microseconds=1500),
        )
    await wait_history(client, havip["id"], 4)

    page = ok(await client.get(f"/v1/havips/{hid}/transitions", params={"limit": 3}))
    assert [t["sequence"] for t in page["items"]] == [4, 3, 2]
    newest = page["items"][0]
    assert newest == {
        "sequence": 4,
        "from_instance_id": a["id"],
        "to_instance_id": None,
        "mac": None,
        "captured_at": None,
        "committed_at": "2025-02-01T08:00:04.001500Z",
        "watcher_id": None,
        "reason": "release",
        "cause": "released",
    }
    assert page["items"][1]["mac"] == a["mac"]
    assert page["items"][1]["captured_at"] == "2025-02-01T08:00:03.000000Z"
    assert page["items"][1]["from_instance_id"] == b["id"]
    rest = ok(
        await client.get(
            f"/v1/havips/{hid}/transitions", params={"limit": 3, "page_token": page["next_page_token"]}
        )
    )
    assert [t["sequence"] for t in rest["items"]] == [1]
    assert rest["items"][0]["from_instance_id"] is None
    assert rest["next_page_token"] is None

    # history outlives the HAVIP
    assert (await client.delete(f"/v1/havips/{hid}")).status_code == 204
    assert len(ok(await client.get(f"/v1/havips/{hid}/transitions"))["items"]) == 4
    error(await client.get(f"/v1/havips/{uuid.uuid4()}/transitions"), 404, "NOT_FOUND")
    error(
        await client.get(f"/v1/havips/{hid}/transitions", params={"page_token": "AAAA"}), 400, "INVALID_PAGE_TOKEN"
    )


# ---- events ------------------------------------------------------------------------------------------------


async def test_every_change_is_published(client: httpx.AsyncClient, events: EventLog) -> None:
    vpc = await make_vpc(client, "198.51.100.0/24")
    subnet = await make_subnet(client, vpc["id"], "198.51.100.64/26")
    instance = await make_instance(client, subnet["id"], "198.51.100.70")
    havip = await make_havip(client, subnet["id"], name="vip", candidates=[instance["id"]])
    assert (await client.delete(f"/v1/havips/{havip['id']}")).status_code == 204
    assert (await client.delete(f"/v1/instances/{instance['id']}")).status_code == 204
    assert (await client.delete(f"/v1/subnets/{subnet['id']}")).status_code == 204
    assert (await client.delete(f"/v1/vpcs/{vpc['id']}")).status_code == 204

    expected = [
        ("vpc.created", vpc),
        ("subnet.created", subnet),
        ("instance.registered", instance),
        ("havip.allocated", havip),
        ("havip.released", havip),
        ("instance.deregistered", instance),
        ("subnet.deleted", subnet),
        ("vpc.deleted", vpc),
    ]
    for event_type, resource in expected:
        env = await events.wait_for(event_type, resource["id"])
        assert env.source == "allocator"
        assert EVENT_TYPES[event_type].model_validate(env.data)
    allocated = await events.wait_for("havip.allocated", havip["id"])
    assert allocated.data == {
        "id": havip["id"],
        "vpc_id": vpc["id"],
        "subnet_id": subnet["id"],
        "name": "vip",
        "address": havip["address"],
        "candidates": [instance["id"]],
        "eip": None,
    }
    registered = await events.wait_for("instance.registered", instance["id"])
    assert registered.data["mac"] == instance["mac"]
    assert registered.data["private_ip"] == "198.51.100.70"
    # failed requests publish nothing
    error(
        await client.post("/v1/subnets", json={"vpc_id": vpc["id"], "name": "x", "cidr": "10.0.0.0/24"}),
        404,
        "NOT_FOUND",
    )
    ours = {vpc["id"], subnet["id"], instance["id"], havip["id"]}
    assert len([e for e in events.received if e.data.get("id") in ours]) == len(expected)


# ---- metrics -----------------------------------------------------------------------------------------------


async def test_metrics_use_route_templates(client: httpx.AsyncClient) -> None:
    vpc = await make_vpc(client, "10.50.0.0/16")
    ok(await client.get(f"/v1/vpcs/{vpc['id']}"))
    await make_havip(client, (await make_subnet(client, vpc["id"], "10.50.1.0/24"))["id"])
    await client.request("BREW", "/v1/vpcs")
    text = (await client.get("/metrics")).text
    assert 'havip_api_requests_total{method="GET",route="/v1/vpcs/{vpc_id}",status="200"}' in text
    assert 'havip_api_request_duration_seconds_count{method="POST",route="/v1/havips"}' in text
    assert 'route="/v1/vpcs",status="405"' in text
    assert 'method="OTHER"' in text
    assert vpc["id"] not in text
    assert re.search(r"^havip_allocations_total [1-9]", text, re.M)


# ---- command line ------------------------------------------------------------------------------------------


async def test_migrate_command_creates_and_migrates_a_database(database_url: str, amqp_url: str) -> None:
    dsn = database_url.rsplit("/", 1)[0] + f"/havip_test_migrate_{secrets.token_hex(4)}"
    env = {"PATH": "/usr/bin:/bin", "HAVIP_DATABASE_URL": dsn, "HAVIP_AMQP_URL": amqp_url}
    try:
        for _ in range(2):  # a second run applies nothing and succeeds
            result = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "services.allocator", "migrate"],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert result.returncode == 0, result.stderr
        conn = await asyncpg.connect(dsn)
        try:
            owners = {
                r["tablename"]: r["tableowner"]
                for r in await conn.fetch(
                    "SELECT tablename, tableowner FROM pg_tables WHERE schemaname = 'allocator'"
                )
            }
        finally:
            await conn.close()
        assert {"vpcs", "subnets", "instances", "havips", "outbox", "idempotency_keys", "view_bindings"} <= set(
            owners
        )
        assert set(owners.values()) == {"havip_allocator"}  # the allocator's role owns its schema, and only it
        # Ready on its own schema: the binding service's migrations are not the allocator's concern.
        async with running_app(dsn, amqp_url, quota=10) as alone, http_client(alone) as client:
            assert ok(await client.get("/readyz"))["checks"] == {"database": "ok", "broker": "ok"}
        # The queue of binding events exists before the allocator first starts: nothing published is lost.
        connection = await aio_pika.connect(amqp_url)
        try:
            channel = await connection.channel()
            queue = await channel.declare_queue("allocator.events", passive=True)
            assert queue.name == "allocator.events"
        finally:
            await connection.close()
    finally:
        await drop_database(dsn)
