"""No input yields a 5xx (docs/contract.md#http-api, R4): random paths, query strings, headers and bodies against
every route.

A quick in-process stand-in for the schemathesis run; every answer must be a documented status with the
error shape, and unexpected exceptions would surface here (ASGITransport re-raises them).
"""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.allocator.app import create_app
from services.allocator.settings import AllocatorSettings

TOKEN = "fuzz-" + secrets.token_hex(16)

ROUTES: list[tuple[str, str]] = [
    ("POST", "/v1/vpcs"),
    ("GET", "/v1/vpcs"),
    ("GET", "/v1/vpcs/{id}"),
    ("DELETE", "/v1/vpcs/{id}"),
    ("POST", "/v1/subnets"),
    ("GET", "/v1/subnets"),
    ("GET", "/v1/subnets/{id}"),
    ("DELETE", "/v1/subnets/{id}"),
    ("POST", "/v1/instances"),
    ("GET", "/v1/instances"),
    ("GET", "/v1/instances/{id}"),
    ("DELETE", "/v1/instances/{id}"),
    ("POST", "/v1/havips"),
    ("GET", "/v1/havips"),
    ("GET", "/v1/havips/{id}"),
    ("PATCH", "/v1/havips/{id}"),
    ("DELETE", "/v1/havips/{id}"),
    ("POST", "/v1/havips/{id}/eip"),
    ("DELETE", "/v1/havips/{id}/eip"),
    ("GET", "/v1/havips/{id}/transitions"),
    ("GET", "/v1/claims/rejected"),
]
FIELDS = ["name", "cidr", "vpc_id", "subnet_id", "private_ip", "mac", "address", "candidates"]
PARAMS = ["vpc_id", "subnet_id", "havip_id", "state", "address", "limit", "page_token", "force"]

# Values of the right shape (so requests get past validation into the services) mixed with junk.
known_ids: list[str] = []
plausible = st.one_of(
    st.sampled_from(
        [
            "10.0.0.0/16",
            "10.0.1.0/24",
            "10.0.1.0/29",
            "10.0.0.2",
            "10.0.1.7",
            "10.0.1.255",
            "203.0.113.9",
            "203.0.113.200",
            "02:00:00:00:00:01",
            "0200.0000.0002",
            "UNBOUND",
            "BOUND",
            "true",
            "1",
            "1000",
            "eyJ0IjoiMDAwMS0wMS0wMVQwMDowMDowMCswMDowMCIsImkiOiIwIn0",
            "eyJyIjo5MjIzMzcyMDM2ODU0Nzc1ODA3fQ",  # {"r": 2**63 - 1}
            "eyJzIjoxfQ",  # {"s": 1}
        ]
    ),
    st.uuids().map(str),
    st.deferred(lambda: st.sampled_from(known_ids) if known_ids else st.uuids().map(str)),
)
junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=80),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
values = st.one_of(plausible, plausible, junk, st.lists(plausible, max_size=12))
bodies = st.one_of(
    st.dictionaries(st.sampled_from(FIELDS), values, max_size=len(FIELDS)),
    junk,
)
param_values = st.one_of(plausible, st.text(max_size=40))
queries = st.dictionaries(st.sampled_from(PARAMS), param_values, max_size=4)
path_ids = st.one_of(
    st.uuids().map(str), st.deferred(lambda: st.sampled_from(known_ids or ["x"])), st.text(max_size=20)
)


@pytest.fixture(scope="module")
async def app(database_url: str, amqp_url: str) -> AsyncIterator[FastAPI]:
    application = create_app(
        AllocatorSettings(
            database_url=database_url,
            amqp_url=amqp_url,
            api_token=TOKEN,
            havip_quota_per_vpc=50,
            eip_pool="203.0.113.8/29",
        )
    )
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture(scope="module")
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://allocator", headers=headers
    ) as c:
        # some real resources, so that random requests also hit existing ids
        vpc = (await c.post("/v1/vpcs", json={"name": "fuzz", "cidr": "10.0.0.0/16"})).json()
        subnet = (
            await c.post("/v1/subnets", json={"vpc_id": vpc["id"], "name": "f", "cidr": "10.0.1.0/24"})
        ).json()
        instance = await c.post(
            "/v1/instances",
            json={"subnet_id": subnet["id"], "name": "i", "private_ip": "10.0.1.9", "mac": "02:00:00:00:00:09"},
        )
        havip = (await c.post("/v1/havips", json={"subnet_id": subnet["id"]})).json()
        known_ids.extend([vpc["id"], subnet["id"], instance.json()["id"], havip["id"]])
        yield c


def check(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.request.method, response.request.url, response.text)
    if response.status_code >= 400:
        body: Any = response.json()
        assert set(body) == {"error"}
        assert body["error"]["code"].isupper()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    route=st.sampled_from(ROUTES),
    ident=path_ids,
    query=queries,
    body=bodies,
    idempotency_key=st.none() | st.text(max_size=70),
)
async def test_no_input_yields_a_server_error(
    client: httpx.AsyncClient,
    route: tuple[str, str],
    ident: str,
    query: dict[str, str],
    body: Any,
    idempotency_key: str | None,
) -> None:
    method, template = route
    path = template.replace("{id}", quote(ident, safe="") or "x")
    headers: dict[str, str] = {}
    if idempotency_key is not None and idempotency_key.isascii() and idempotency_key.isprintable():
        headers["Idempotency-Key"] = idempotency_key
    content = json.dumps(body).encode() if method in ("POST", "PATCH") else None
    if content is not None:
        headers["content-type"] = "application/json"
    check(await client.request(method, path, params=query, content=content, headers=headers))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    raw=st.binary(max_size=200),
    route=st.sampled_from([r for r in ROUTES if r[0] in ("POST", "PATCH")]),
    ident=path_ids,
)
async def test_raw_bodies(client: httpx.AsyncClient, raw: bytes, route: tuple[str, str], ident: str) -> None:
    method, template = route
    path = template.replace("{id}", quote(ident, safe="") or "x")
    check(await client.request(method, path, content=raw, headers={"content-type": "application/json"}))


async def test_unknown_ids_are_404(client: httpx.AsyncClient) -> None:
    for template in ("/v1/vpcs/{id}", "/v1/subnets/{id}", "/v1/instances/{id}", "/v1/havips/{id}"):
        response = await client.get(template.replace("{id}", str(uuid.uuid4())))
        assert response.status_code == 404
