"""Helpers of the allocator's integration tests: the in-process app, a client, makers of resources
and a stand-in for the binding service that publishes its events."""

from __future__ import annotations

import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from services.allocator.app import create_app
from services.allocator.settings import AllocatorSettings
from shared.events import (
    CLAIMS_EVENT,
    BindingChanged,
    ClaimRejected,
    ClaimsObserved,
    Envelope,
    EventData,
    HavipCondition,
    Holder,
    ObservedClaim,
    RejectReason,
    envelope,
)
from shared.messaging import Broker
from tests.listener import EVENT_TIMEOUT_S
from tests.waiting import eventually

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "test-" + secrets.token_hex(16)
AUTH = {"Authorization": f"Bearer {TOKEN}"}
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


class BindingStandIn:
    """Stands in for the binding service: publishes its events on the test vhost's exchange, as it would (the
    allocator learns bindings only from them), keeping each HAVIP's sequence and holder."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.sequences: dict[str, int] = {}
        self.holders: dict[str, Json | None] = {}

    async def publish(self, event_type: str, data: EventData, *, at: datetime | None = None) -> Envelope:
        """Publish as the binding service would; `at` stamps the event's occurred_at (default: now)."""
        env = envelope(event_type, data, "binding")
        if at is not None:
            env = env.model_copy(update={"occurred_at": at})
        await self.broker.publish(env)
        return env

    def change(
        self,
        havip: Json,
        instance: Json | None,
        *,
        sequence: int | None = None,
        previous: Json | None = None,
        captured_at: datetime | None = None,
        committed_at: datetime | None = None,
    ) -> BindingChanged:
        """The next transition of `havip` to `instance` (None: a release), unless `sequence` is given."""
        hid = havip["id"]
        sequence = sequence if sequence is not None else self.sequences.get(hid, 0) + 1
        previous = previous if previous is not None else self.holders.get(hid)
        now = datetime.now(UTC)
        return BindingChanged(
            havip_id=uuid.UUID(hid),
            address=IPv4Address(havip["address"]),
            previous=Holder(instance_id=uuid.UUID(previous["id"]), mac=previous["mac"]) if previous else None,
            current=Holder(instance_id=uuid.UUID(instance["id"]), mac=instance["mac"]) if instance else None,
            captured_at=(captured_at or now) if instance else None,
            committed_at=committed_at or now,
            watcher_id="watcher-1" if instance else None,
            sequence=sequence,
            reason="claim" if instance else "release",
            cause=None if instance else "released",
        )

    async def move(self, havip: Json, instance: Json | None, **fields: Any) -> BindingChanged:
        """Publish the next transition of `havip` (to `instance`, None: released)."""
        data = self.change(havip, instance, **fields)
        await self.publish("havip.binding.changed", data)
        self.sequences[havip["id"]] = max(self.sequences.get(havip["id"], 0), data.sequence)
        self.holders[havip["id"]] = instance
        return data

    async def condition(self, havip: Json, condition: str, started: bool, *, at: datetime | None = None) -> None:
        data = HavipCondition(
            havip_id=uuid.UUID(havip["id"]),
            address=IPv4Address(havip["address"]),
            transitions_in_window=6,
            claimants_in_window=2,
        )
        await self.publish(f"havip.{condition}.{'started' if started else 'stopped'}", data, at=at)

    async def refuse(
        self,
        havip_id: str | None,
        address: str,
        mac: str,
        reason: RejectReason,
        captured_at: datetime,
        count: int = 1,
    ) -> Envelope:
        data = ClaimRejected(
            address=IPv4Address(address),
            havip_id=uuid.UUID(havip_id) if havip_id else None,
            mac=mac,
            reason=reason,
            captured_at=captured_at,
            watcher_id="watcher-7",
            count=count,
        )
        return await self.publish("havip.claim.rejected", data)


async def publish_claim(watcher: Broker, havip: Json, instance: Json) -> None:
    """A gratuitous ARP of the instance for the HAVIP's address, captured now, as a watcher publishes it."""
    observed = ObservedClaim(
        claim_id=uuid.uuid4(), kind="garp_request", sender_mac=instance["mac"], eth_src=instance["mac"],
        sender_ip=IPv4Address(havip["address"]), target_ip=IPv4Address(havip["address"]),
        captured_at=time.time_ns(),
    )  # fmt: skip
    data = ClaimsObserved(watcher_id="w-chain", interface="lab0", claims=[observed])
    await watcher.publish(envelope(CLAIMS_EVENT, data, "arp_watcher"))


async def shown(client: httpx.AsyncClient, havip: Json) -> Json:
    body: Json = ok(await client.get(f"/v1/havips/{havip['id']}"))
    return body


async def wait_shown(client: httpx.AsyncClient, havip: Json, what: str, **expected: Any) -> Json:
    """The HAVIP as the API shows it once every field of `expected` has the value given (the view of bindings is
    eventually consistent)."""
    latest: Json = {}

    async def matches() -> bool:
        nonlocal latest
        latest = await shown(client, havip)
        return all(latest[k] == v for k, v in expected.items())

    try:
        await eventually(matches, timeout=EVENT_TIMEOUT_S, what=what)
    except TimeoutError as exc:
        raise AssertionError(f"{what}: {latest}") from exc
    return latest


async def wait_history(client: httpx.AsyncClient, havip_id: str, count: int) -> list[Json]:
    """The HAVIP's transitions, newest first, once there are `count` of them."""
    items: list[Json] = []

    async def complete() -> bool:
        nonlocal items
        items = await all_pages(client, f"/v1/havips/{havip_id}/transitions")
        return len(items) >= count

    await eventually(complete, timeout=EVENT_TIMEOUT_S, what=f"{count} transitions of {havip_id}")
    return items
