"""havipctl end to end: the real CLI, as a subprocess, against a real allocator started here as a subprocess.

The allocator gets this module's own database (both services' migrations applied) and RabbitMQ vhost from
the conftest fixtures, a random token and a free port; it is stopped by its process group in a finally.
`havipctl watch` runs alongside, started before the changes, and must print the allocator's events.
Every wait has a deadline; nothing sleeps a fixed time.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from havipctl.client import display_url
from tests import service_logs
from tests.lab.proc import terminate_group
from tests.ports import free_port
from tests.waiting import eventually_sync

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "cli-" + secrets.token_hex(16)
START_DEADLINE_S = 60.0
COMMAND_DEADLINE_S = 60.0
EVENT_DEADLINE_S = 30.0
EIP_POOL = "203.0.113.8/29"

Json = dict[str, Any]


def base_env() -> dict[str, str]:
    """The environment without any HAVIP_* variable of the caller's: each test says what it means."""
    return {k: v for k, v in os.environ.items() if not k.startswith("HAVIP_")}


@dataclass(frozen=True)
class Allocator:
    url: str
    amqp_url: str
    routes: frozenset[tuple[str, str]]  # (METHOD, path) from its OpenAPI document

    def has(self, method: str, path: str) -> bool:
        return (method, path) in self.routes


@pytest.fixture(scope="module")
def allocator(database_url: str, amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Allocator]:
    port = free_port()
    env = {
        **base_env(),
        "HAVIP_DATABASE_URL": database_url,
        "HAVIP_AMQP_URL": amqp_url,
        "HAVIP_API_TOKEN": TOKEN,
        "HAVIP_HOST": "127.0.0.1",
        "HAVIP_PORT": str(port),
        "HAVIP_EIP_POOL": EIP_POOL,
        "HAVIP_LOG_LEVEL": "WARNING",
    }
    log_path = tmp_path_factory.mktemp("allocator") / "allocator.log"
    url = f"http://127.0.0.1:{port}"
    service_logs.follow("allocator", log_path)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.allocator"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:

            def ready() -> bool:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"the allocator exited with {proc.returncode}: {log_path.read_text()[-2000:]}"
                    )
                try:
                    return httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200
                except httpx.TransportError:
                    return False

            eventually_sync(ready, timeout=START_DEADLINE_S, what=f"allocator ready at {url}")
            document = httpx.get(f"{url}/openapi.json", timeout=10.0).json()
            routes = frozenset(
                (method.upper(), path) for path, item in document["paths"].items() for method in item
            )
            yield Allocator(url, amqp_url, routes)
        finally:
            terminate_group(proc, timeout=15)
            service_logs.forget(log_path)


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def havipctl(allocator: Allocator, *args: str, token: str | None = TOKEN, url: str | None = None) -> Run:
    env = {**base_env(), "HAVIP_URL": url or allocator.url, "HAVIP_AMQP_URL": allocator.amqp_url}
    if token is not None:
        env["HAVIP_API_TOKEN"] = token
    done = subprocess.run(
        [sys.executable, "-m", "havipctl", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=COMMAND_DEADLINE_S,
        check=False,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return Run(done.returncode, done.stdout, done.stderr)


def ok(allocator: Allocator, *args: str) -> Run:
    result = havipctl(allocator, *args)
    assert result.code == 0, f"havipctl {' '.join(args)} → {result.code}: {result.err}"
    return result


def key_values(text: str) -> dict[str, str]:
    """The `show` view back into a dict (first line of each key)."""
    pairs: dict[str, str] = {}
    for line in text.splitlines():
        if line and not line.startswith(" "):
            key, _, value = line.partition(" ")
            pairs[key] = value.strip()
    return pairs


class Watch:
    """`havipctl watch …` in the background, its output in files; started only once its queue is bound."""

    def __init__(self, allocator: Allocator, directory: Path, *args: str) -> None:
        self.out_path = directory / "watch.out"
        self.err_path = directory / "watch.err"
        env = {**base_env(), "HAVIP_AMQP_URL": allocator.amqp_url}
        with self.out_path.open("wb") as out, self.err_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "havipctl", "watch", *args],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )

        def bound() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"watch exited with {self.proc.returncode}: {self.err_path.read_text()}")
            return "watching" in self.err_path.read_text()

        eventually_sync(bound, timeout=EVENT_DEADLINE_S, what="havipctl watch bound its queue")

    def finish(self) -> tuple[int, str, str]:
        try:
            code = self.proc.wait(timeout=EVENT_DEADLINE_S + 10)
        except subprocess.TimeoutExpired:
            self.stop()
            raise
        return code, self.out_path.read_text(), self.err_path.read_text()

    def stop(self) -> None:
        terminate_group(self.proc, timeout=15)


# ---- the lifecycle ------------------------------------------------------------------------------------------


def test_havip_lifecycle_with_watch(allocator: Allocator, tmp_path: Path) -> None:
    has_update = allocator.has("PATCH", "/v1/havips/{havip_id}")
    has_eip = allocator.has("POST", "/v1/havips/{havip_id}/eip")
    expected = Counter(
        {
            "vpc.created": 1,
            "subnet.created": 1,
            "instance.registered": 2,
            "havip.allocated": 2,
            "havip.updated": 2 if has_update else 0,
            "havip.eip.associated": 1 if has_eip else 0,
            "havip.eip.dissociated": 1 if has_eip else 0,
            "havip.released": 2,
            "instance.deregistered": 2,
            "subnet.deleted": 1,
            "vpc.deleted": 1,
        }
    )
    expected = +expected  # drop the zeros
    havip_events = sum(n for t, n in expected.items() if t.count(".") == 1 and t.startswith("havip."))
    everything = Watch(
        allocator, tmp_path, "--json", "--count", str(expected.total()), "--timeout", str(EVENT_DEADLINE_S)
    )
    (tmp_path / "readable").mkdir()
    readable = Watch(
        allocator,
        tmp_path / "readable",
        "havip.*",
        "--count",
        str(havip_events),
        "--timeout",
        str(EVENT_DEADLINE_S),
    )
    try:
        # inventory
        vpc = ok(allocator, "vpc", "create", "--name", "cli-prod", "--cidr", "10.77.0.0/16", "--json").json()
        shown = key_values(ok(allocator, "vpc", "show", vpc["id"]).out)
        assert shown["name"] == "cli-prod"
        assert shown["cidr"] == "10.77.0.0/16"
        subnet = ok(
            allocator, "subnet", "create", "--vpc", vpc["id"], "--name", "web", "--cidr", "10.77.1.0/24", "--json"
        ).json()
        assert (subnet["segment"], subnet["vlan"]) == ("default", None)
        subnets = ok(allocator, "subnet", "list", "--vpc", vpc["id"]).out.splitlines()
        assert subnets[0].split() == ["ID", "VPC", "NAME", "CIDR", "GATEWAY", "FREE", "USABLE", "CREATED"]
        assert subnets[1].split()[:7] == [
            subnet["id"],
            vpc["id"],
            "web",
            "10.77.1.0/24",
            "10.77.1.1",
            "253",
            "253",
        ]
        cvm1 = ok(
            allocator,
            "instance",
            "register",
            "--subnet",
            subnet["id"],
            "--name",
            "cvm1",
            "--ip",
            "10.77.1.10",
            "--mac",
            "02:00:4d:01:00:0a",
            "--json",
        ).json()
        cvm2 = key_values(
            ok(
                allocator,
                "instance",
                "register",
                "--subnet",
                subnet["id"],
                "--name",
                "cvm2",
                "--private-ip",
                "10.77.1.11",
                "--mac",
                "02-00-4D-01-00-0B",
            ).out
        )
        assert cvm2["mac"] == "02:00:4d:01:00:0b"
        instances = ok(allocator, "instance", "list", "--subnet", subnet["id"]).out.splitlines()
        assert [line.split()[2] for line in instances[1:]] == ["cvm1", "cvm2"]

        # allocate: the lowest free address as a table, a chosen one as JSON
        first = key_values(ok(allocator, "havip", "allocate", "--subnet", subnet["id"], "--name", "vip-a").out)
        assert (first["name"], first["address"], first["state"], first["candidates"]) == (
            "vip-a",
            "10.77.1.2",
            "UNBOUND",
            "-",
        )
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}Z", first["created_at"])
        args = [
            "havip",
            "allocate",
            "--subnet",
            subnet["id"],
            "--address",
            "10.77.1.50",
            "--candidate",
            cvm1["id"],
        ]
        second = ok(allocator, *args, "--idempotency-key", "cli-test-1", "--json").json()
        assert second["address"] == "10.77.1.50"
        assert second["candidates"] == [cvm1["id"]]
        replay = havipctl(allocator, *args, "--idempotency-key", "cli-test-1", "--json")
        assert replay.code == 0
        assert replay.json()["id"] == second["id"]
        assert "idempotent replay" in replay.err

        # list and show
        table = ok(allocator, "havip", "list", "--vpc", vpc["id"]).out.splitlines()
        assert table[0].split() == [
            "ID",
            "NAME",
            "ADDRESS",
            "STATE",
            "HOLDER",
            "MAC",
            "EIP",
            "CANDIDATES",
            "FLAGS",
        ]
        rows = {line.split()[0]: line.split() for line in table[1:]}
        assert rows[first["id"]][1:4] == ["vip-a", "10.77.1.2", "UNBOUND"]
        assert rows[second["id"]][7] == "1"
        page = havipctl(allocator, "havip", "list", "--subnet", subnet["id"], "--limit", "1")
        assert page.code == 0
        assert len(page.out.splitlines()) == 2
        assert "--page-token" in page.err
        every = ok(allocator, "havip", "list", "--subnet", subnet["id"], "--limit", "1", "--all", "--json").json()
        assert [h["id"] for h in every["items"]] == [first["id"], second["id"]]
        assert every["next_page_token"] is None
        filtered = ok(allocator, "havip", "list", "--address", "10.77.1.50", "--state", "unbound", "--json").json()
        assert [h["id"] for h in filtered["items"]] == [second["id"]]
        raw = httpx.get(f"{allocator.url}/v1/havips/{second['id']}", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok(allocator, "havip", "show", second["id"], "--json").out == raw.text + "\n"  # untouched
        shown = key_values(ok(allocator, "havip", "show", second["id"]).out)
        assert (shown["address"], shown["state"], shown["bound_instance_id"]) == ("10.77.1.50", "UNBOUND", "-")

        # update: rename, replace the candidates
        if has_update:
            renamed = key_values(ok(allocator, "havip", "update", first["id"], "--name", "vip a renamed").out)
            assert renamed["name"] == "vip a renamed"
            both = ok(
                allocator,
                "havip",
                "update",
                second["id"],
                "--candidate",
                cvm1["id"],
                "--candidate",
                cvm2["id"],
                "--json",
            ).json()
            assert sorted(both["candidates"]) == sorted([cvm1["id"], cvm2["id"]])
            assert both["name"] is None

        # EIP
        if has_eip:
            associated = ok(allocator, "havip", "eip", "associate", first["id"], "--json").json()
            assert associated["eip"] == "203.0.113.9"
            in_use = havipctl(allocator, "havip", "release", first["id"])
            assert in_use.code == 1
            assert "EIP_ASSOCIATED (HTTP 409)" in in_use.err
            dissociated = key_values(ok(allocator, "havip", "eip", "dissociate", first["id"]).out)
            assert dissociated["eip"] == "-"

        # history and audit: nothing happened on the wire
        empty = havipctl(allocator, "havip", "transitions", first["id"])
        assert (empty.code, empty.out, empty.err) == (0, "", "no transitions found\n")
        assert ok(allocator, "havip", "transitions", first["id"], "--json").json() == {
            "items": [],
            "next_page_token": None,
        }
        if allocator.has("GET", "/v1/claims/rejected"):
            audit = havipctl(allocator, "claims", "rejected", "--havip", first["id"])
            assert (audit.code, audit.out, audit.err) == (0, "", "no rejected claims found\n")

        # release and tear down
        assert ok(allocator, "havip", "release", first["id"]).out == f"released HAVIP {first['id']}\n"
        assert ok(allocator, "havip", "release", second["id"], "--force", "--json").out == ""
        ok(allocator, "instance", "deregister", cvm1["id"])
        ok(allocator, "instance", "deregister", cvm2["id"])
        ok(allocator, "subnet", "delete", subnet["id"])
        ok(allocator, "vpc", "delete", vpc["id"])
        gone = havipctl(allocator, "vpc", "show", vpc["id"])
        assert gone.code == 1
        assert gone.err == f"havipctl: NOT_FOUND (HTTP 404): vpc {vpc['id']} not found\n"

        # the events, as JSON lines
        code, out, err = everything.finish()
        assert code == 0, err
        events = [json.loads(line) for line in out.splitlines()]
        assert Counter(e["type"] for e in events) == expected, out
        assert all(set(e) >= {"event_id", "type", "occurred_at", "source", "data"} for e in events)
        assert events[0]["type"] == "vpc.created"
        assert events[0]["data"]["id"] == vpc["id"]
        allocated = [e["data"] for e in events if e["type"] == "havip.allocated"]
        assert {d["address"] for d in allocated} == {"10.77.1.2", "10.77.1.50"}

        # and as readable lines, filtered by routing key
        code, out, err = readable.finish()
        assert code == 0, err
        lines = out.splitlines()
        assert len(lines) == havip_events
        assert all(line.split()[2].count(".") == 1 and line.split()[2].startswith("havip.") for line in lines)
        allocated_lines = [line for line in lines if line.split()[2] == "havip.allocated"]
        assert any(f"10.77.1.2  havip {first['id']}  name=vip-a" in line for line in allocated_lines), lines
    finally:
        everything.stop()
        readable.stop()


# ---- failures -----------------------------------------------------------------------------------------------


def test_every_route_of_the_spec_is_served(allocator: Allocator) -> None:
    """Every route of the API that havipctl covers is served: a missing one is a failure, not a skip."""
    wanted = {
        ("POST", "/v1/vpcs"),
        ("GET", "/v1/vpcs"),
        ("GET", "/v1/vpcs/{vpc_id}"),
        ("DELETE", "/v1/vpcs/{vpc_id}"),
        ("POST", "/v1/subnets"),
        ("GET", "/v1/subnets"),
        ("GET", "/v1/subnets/{subnet_id}"),
        ("DELETE", "/v1/subnets/{subnet_id}"),
        ("POST", "/v1/instances"),
        ("GET", "/v1/instances"),
        ("GET", "/v1/instances/{instance_id}"),
        ("DELETE", "/v1/instances/{instance_id}"),
        ("POST", "/v1/havips"),
        ("GET", "/v1/havips"),
        ("GET", "/v1/havips/{havip_id}"),
        ("PATCH", "/v1/havips/{havip_id}"),
        ("DELETE", "/v1/havips/{havip_id}"),
        ("POST", "/v1/havips/{havip_id}/eip"),
        ("DELETE", "/v1/havips/{havip_id}/eip"),
        ("GET", "/v1/havips/{havip_id}/transitions"),
        ("GET", "/v1/claims/rejected"),
    }
    assert sorted(wanted - allocator.routes) == []


def test_wrong_token(allocator: Allocator) -> None:
    result = havipctl(allocator, "vpc", "list", token="not-the-token")
    assert result.code == 4
    assert result.out == ""
    assert result.err.startswith("havipctl: authentication failed: check HAVIP_API_TOKEN / --token")
    missing = havipctl(allocator, "vpc", "list", token=None)
    assert missing.code == 4
    flag = havipctl(allocator, "--token", TOKEN, "vpc", "list", token="not-the-token")
    assert flag.code == 0  # the flag wins over the environment


def test_unreachable_allocator(allocator: Allocator) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = havipctl(allocator, "havip", "list", url=url)
    assert result.code == 3
    assert result.err == f"havipctl: cannot reach the allocator at {url}: connection refused\n"
    as_json = havipctl(allocator, "havip", "list", "--json", url=url)
    assert (as_json.code, as_json.out) == (3, "")
    assert json.loads(as_json.err) == {
        "error": {"code": "UNREACHABLE", "message": f"cannot reach the allocator at {url}: connection refused"}
    }


def test_unreachable_broker(allocator: Allocator) -> None:
    port = free_port()
    result = havipctl(allocator, "watch", "--amqp-url", f"amqp://guest:guest@127.0.0.1:{port}/", "--timeout", "20")
    assert result.code == 3
    assert (
        result.err
        == f"havipctl: cannot reach RabbitMQ at amqp://guest:***@127.0.0.1:{port}/: connection refused\n"
    )
    as_json = havipctl(
        allocator, "watch", "--json", "--amqp-url", f"amqp://guest:guest@127.0.0.1:{port}/", "--timeout", "20"
    )
    assert (as_json.code, as_json.out) == (3, "")
    assert json.loads(as_json.err) == {
        "error": {
            "code": "UNREACHABLE",
            "message": f"cannot reach RabbitMQ at amqp://guest:***@127.0.0.1:{port}/: connection refused",
        }
    }


def test_watch_passes_over_a_node_that_does_not_answer(allocator: Allocator) -> None:
    """A cluster's nodes comma-separated, as the services take them: the first refuses connections, the watch goes
    to the next and says which one it watches on."""
    dead = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    result = havipctl(allocator, "watch", "--amqp-url", f"{dead},{allocator.amqp_url}", "--timeout", "3")
    assert result.code == 0, result.err
    assert f"on {display_url(allocator.amqp_url)} for #" in result.err


def test_watch_says_why_each_node_could_not_be_reached(allocator: Allocator) -> None:
    ports = free_port(), free_port()
    urls = [f"amqp://guest:guest@127.0.0.1:{port}/" for port in ports]
    result = havipctl(allocator, "watch", "--amqp-url", ",".join(urls), "--timeout", "20")
    assert result.code == 3
    assert result.err == (
        "havipctl: cannot reach any of the 2 RabbitMQ nodes: "
        f"amqp://guest:***@127.0.0.1:{ports[0]}/: connection refused; "
        f"amqp://guest:***@127.0.0.1:{ports[1]}/: connection refused\n"
    )


def test_api_errors_show_their_code(allocator: Allocator) -> None:
    vpc = ok(allocator, "vpc", "create", "--name", "cli-errors", "--cidr", "10.78.0.0/16", "--json").json()
    subnet_args = ("subnet", "create", "--vpc", vpc["id"], "--name", "a", "--cidr", "10.78.1.0/24", "--json")
    subnet = ok(allocator, *subnet_args).json()
    overlap = havipctl(allocator, *subnet_args[:-1])
    assert overlap.code == 1
    assert overlap.err.startswith("havipctl: SUBNET_OVERLAP (HTTP 409): ")
    assert overlap.out == ""
    overlap_json = havipctl(allocator, *subnet_args)  # --json: the error is JSON too
    assert overlap_json.code == 1
    assert json.loads(overlap_json.err)["error"]["code"] == "SUBNET_OVERLAP"
    ok(allocator, "havip", "allocate", "--subnet", subnet["id"], "--address", "10.78.1.9")
    taken = havipctl(allocator, "havip", "allocate", "--subnet", subnet["id"], "--address", "10.78.1.9")
    assert (taken.code, taken.err.split(":")[1].strip()) == (1, "ADDRESS_IN_USE (HTTP 409)")
    reserved = havipctl(allocator, "havip", "allocate", "--subnet", subnet["id"], "--address", "10.78.1.1")
    assert reserved.err.startswith("havipctl: ADDRESS_RESERVED (HTTP 400): ")
    invalid = havipctl(allocator, "vpc", "create", "--name", "x", "--cidr", "10.0.0.1/8")
    assert invalid.code == 1
    assert invalid.err.startswith("havipctl: VALIDATION_ERROR (HTTP 422): ")
    in_use = havipctl(allocator, "vpc", "delete", vpc["id"])
    assert in_use.err.startswith("havipctl: VPC_IN_USE (HTTP 409): ")
    usage = havipctl(allocator, "havip", "show", "not-an-id")
    assert usage.code == 2
    assert "is not an id" in usage.err
    bad_vlan = havipctl(allocator, *subnet_args[:-2], "10.78.2.0/24", "--vlan", "4095")
    assert bad_vlan.err.startswith("havipctl: VALIDATION_ERROR (HTTP 422): ")


def test_errors_with_json_are_json(allocator: Allocator) -> None:
    octet = havipctl(allocator, "vpc", "create", "--name", "x", "--cidr", "10.0.300.0/24", "--json")
    assert (octet.code, octet.out) == (1, "")
    error = json.loads(octet.err)["error"]
    assert (error["code"], error["status"]) == ("VALIDATION_ERROR", 422)
    assert error["message"] == "cidr: octet 300 of 10.0.300.0/24 is out of range 0–255"
    assert error["details"][0]["loc"] == ["body", "cidr"]
    text = havipctl(allocator, "vpc", "create", "--name", "x", "--cidr", "2001:db8::/32")
    assert text.err == (
        "havipctl: VALIDATION_ERROR (HTTP 422): cidr: 2001:db8::/32 is an IPv6 block: IPv6 is not supported yet "
        "(IPv4 only)\n"
    )
    missing = havipctl(allocator, "havip", "show", str(uuid.uuid4()), "--json")
    assert (missing.code, json.loads(missing.err)["error"]["code"]) == (1, "NOT_FOUND")
    usage = havipctl(allocator, "--json", "havip", "show", "not-an-id")
    assert (usage.code, usage.out) == (2, "")
    assert json.loads(usage.err) == {
        "error": {
            "code": "USAGE_ERROR",
            "message": "havipctl havip show: argument ID: 'not-an-id' is not an id (expected a UUID)",
        }
    }
    token = havipctl(allocator, "vpc", "list", "--json", token="not-the-token")
    assert token.code == 4
    assert json.loads(token.err)["error"]["code"] == "AUTHENTICATION_FAILED"


def test_a_subnet_is_attached_to_a_segment_and_vlan(allocator: Allocator) -> None:
    vpc = ok(allocator, "vpc", "create", "--name", "cli-segments", "--cidr", "10.79.0.0/16", "--json").json()
    trunk = ok(
        allocator, "subnet", "create", "--vpc", vpc["id"], "--name", "trunk", "--cidr", "10.79.9.0/24",
        "--segment", "rack-7", "--vlan", "120", "--json",
    ).json()  # fmt: skip
    assert (trunk["segment"], trunk["vlan"]) == ("rack-7", 120)
