"""Helpers of the allocator's integration tests: the in-process app, a client, makers of resources,
an event log on the test vhost, and a stand-in for the binding service's writes."""

from __future__ import annotations

import asyncio
import re
import secrets
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from aio_pika.abc import AbstractIncomingMessage
from fastapi import FastAPI

from services.allocator.app import create_app
from services.allocator.settings import AllocatorSettings
from shared.events import Envelope, decode

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "test-" + secrets.token_hex(16)
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EVENT_TIMEOUT_S = 5.0
RFC3339_MICRO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")

Json = dict[str, Any]
Headers = Mapping[str, str] | Mapping[bytes, bytes]


# ---- fixtures ----------------------------------------------------------------------------------------------


def http_client(app: FastAPI, headers: Headers = AUTH) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://allocator", headers=headers)


@asynccontextmanager
async def running_app(database_url: str, amqp_url: str, quota: int, **options: Any) -> AsyncIterator[FastAPI]:
    """The app with its lifespan entered; `options` are further AllocatorSettings fields."""
    settings = AllocatorSettings(
        database_url=database_url, amqp_url=amqp_url, api_token=TOKEN, havip_quota_per_vpc=quota, **options
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        yield app


class EventLog:
    """Every event published on the test vhost's exchange, through a queue bound with '#'."""

    def __init__(self) -> None:
        self.received: list[Envelope] = []
        self._arrived = asyncio.Event()

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        async with message.process():
            decode(message.body)  # validates the data against its model
            self.received.append(Envelope.model_validate_json(message.body))
            self._arrived.set()

    async def wait_for(self, event_type: str, resource_id: uuid.UUID | str) -> Envelope:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + EVENT_TIMEOUT_S
        while True:
            for env in self.received:
                if env.type == event_type and env.data.get("id", env.data.get("havip_id")) == str(resource_id):
                    return env
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(
                    f"no {event_type} event for {resource_id}; got {[e.type for e in self.received]}"
                )
            self._arrived.clear()
            with suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)


# ---- helpers -----------------------------------------------------------------------------------------------


def random_mac() -> str:
    octets = [0x02, *secrets.token_bytes(5)]  # locally administered, unicast
    return ":".join(f"{o:02x}" for o in octets)


def ok(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    return response.json() if response.content else None


def error(response: httpx.Response, status: int, code: str) -> Json:
    assert response.status_code == status, response.text
    body: Json = response.json()
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["message"]
    return body


async def make_vpc(client: httpx.AsyncClient, cidr: str = "10.0.0.0/16", name: str = "vpc") -> Json:
    body: Json = ok(await client.post("/v1/vpcs", json={"name": name, "cidr": cidr}), 201)
    return body


async def make_subnet(client: httpx.AsyncClient, vpc_id: str, cidr: str = "10.0.1.0/24") -> Json:
    body: Json = ok(await client.post("/v1/subnets", json={"vpc_id": vpc_id, "name": "sn", "cidr": cidr}), 201)
    return body


async def make_instance(client: httpx.AsyncClient, subnet_id: str, ip: str, mac: str | None = None) -> Json:
    payload = {"subnet_id": subnet_id, "name": f"cvm-{ip}", "private_ip": ip, "mac": mac or random_mac()}
    body: Json = ok(await client.post("/v1/instances", json=payload), 201)
    return body


async def make_havip(client: httpx.AsyncClient, subnet_id: str, **fields: Any) -> Json:
    body: Json = ok(await client.post("/v1/havips", json={"subnet_id": subnet_id, **fields}), 201)
    return body


async def all_pages(client: httpx.AsyncClient, path: str, **params: Any) -> list[Json]:
    items: list[Json] = []
    token = None
    while True:
        query = {**params, **({"page_token": token} if token else {})}
        page = ok(await client.get(path, params=query))
        items.extend(page["items"])
        token = page["next_page_token"]
        if token is None:
            return items


async def bind(db: Any, havip: Json, instance: Json, **extra: Any) -> None:
    now = datetime.now(UTC)
    await db.execute(
        """INSERT INTO binding.bindings (havip_id, address, instance_id, mac, sequence, last_claim_ns,
                                         last_transition_at, last_seen_at, flapping, split_brain)
           VALUES ($1, $2::inet, $3, $4::macaddr, 1, 1, $5, $6, $7, $8)
           ON CONFLICT (havip_id) DO UPDATE SET instance_id = EXCLUDED.instance_id, mac = EXCLUDED.mac""",
        uuid.UUID(havip["id"]),
        havip["address"],
        uuid.UUID(instance["id"]),
        instance["mac"],
        extra.get("last_transition_at", now),
        extra.get("last_seen_at", now),
        extra.get("flapping", False),
        extra.get("split_brain", False),
    )
