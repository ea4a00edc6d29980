"""Schemathesis against the allocator's own OpenAPI document (docs/contract.md#reliability R4: fuzzed API requests
never get a 5xx).

The app runs in a real uvicorn server on a free 127.0.0.1 port (its own thread and event loop), with the test
module's database and vhost and an EIP pool; schemathesis loads `/openapi.json` from it and, for every
operation, sends schema-valid and schema-invalid requests with the bearer token. Checks:

* `not_a_server_error`: no 5xx, whatever is sent;
* `status_code_conformance`, `content_type_conformance`, `response_headers_conformance`,
  `response_schema_conformance`: every answer is one the document describes, in the shape it describes
  (errors included);
* `negative_data_rejection`: a request the document calls invalid is refused with a 4xx;
* `positive_data_acceptance`: a request the document calls valid is never refused as malformed (400 is allowed
  for the business rules the schema cannot express, e.g. an address outside the subnet, but never 422);
* `ignored_auth`: the token is really checked.

Some real resources exist first, so generated ids sometimes hit them. Bounded: MAX_EXAMPLES per operation.
"""

from __future__ import annotations

import collections
import secrets
import socket
import threading
import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, settings
from schemathesis import Case
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from services.allocator.app import create_app
from services.allocator.settings import AllocatorSettings
from tests.waiting import eventually_sync

TOKEN = "schemathesis-" + secrets.token_hex(16)
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_EXAMPLES = 50
STARTUP_TIMEOUT_S = 15.0

CHECKS = [
    schemathesis.checks.not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    ignored_auth,
]

cases_run: collections.Counter[str] = collections.Counter()
statuses: collections.defaultdict[str, set[int]] = collections.defaultdict(set)


def settings_for(
    database_url: str = "postgresql://unused/unused", amqp_url: str = "amqp://unused/"
) -> AllocatorSettings:
    return AllocatorSettings(
        database_url=database_url,
        amqp_url=amqp_url,
        api_token=TOKEN,
        havip_quota_per_vpc=20,
        eip_pool="203.0.113.16/29",
    )


# The document is built without a database (test collection needs the operations); the server must serve the
# very same document (test_the_served_document_is_the_one_tested).
DOCUMENT = create_app(settings_for()).openapi()
schema = schemathesis.openapi.from_dict(DOCUMENT)
schema.config.generation.update(max_examples=MAX_EXAMPLES, deterministic=True)


def test_the_served_document_is_the_one_tested(server: str) -> None:
    served = httpx.get(f"{server}/openapi.json", timeout=10)
    assert served.status_code == 200
    assert served.json() == DOCUMENT


def free_port_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.fixture(scope="module")
def server(database_url: str, amqp_url: str) -> Iterator[str]:
    app = create_app(settings_for(database_url, amqp_url))
    sock = free_port_socket()
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_config=None, lifespan="on", server_header=False, proxy_headers=False)
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, name="allocator under test", daemon=True)
    thread.start()
    try:

        def started() -> bool:
            if not thread.is_alive():
                raise RuntimeError("the allocator did not start")
            return srv.started

        eventually_sync(started, timeout=STARTUP_TIMEOUT_S, what="the allocator started")
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=STARTUP_TIMEOUT_S)
        sock.close()


# Ids of real resources by parameter or field name; filled by seeded_server.
known: dict[str, str] = {}


@pytest.fixture(scope="module")
def seeded_server(server: str) -> str:
    """A few real resources, so that some generated requests reach them."""
    with httpx.Client(base_url=server, headers=AUTH, timeout=10) as c:
        vpc = c.post("/v1/vpcs", json={"name": "st", "cidr": "10.0.0.0/16"}).json()
        subnet = c.post("/v1/subnets", json={"vpc_id": vpc["id"], "name": "st", "cidr": "10.0.1.0/24"}).json()
        instance = c.post(
            "/v1/instances",
            json={"subnet_id": subnet["id"], "name": "i", "private_ip": "10.0.1.9", "mac": "02:00:00:00:00:09"},
        ).json()
        havip = c.post("/v1/havips", json={"subnet_id": subnet["id"], "candidates": [instance["id"]]}).json()
        assert c.post(f"/v1/havips/{havip['id']}/eip").status_code == 200
    known.update(vpc_id=vpc["id"], subnet_id=subnet["id"], instance_id=instance["id"], havip_id=havip["id"])
    return server


def aim_at_real_resources(case: Case[Any]) -> None:
    """Schema-valid cases only: in half of them (decided by the case itself, so runs stay reproducible), the
    ids in the path, the query and the body name real resources, so that the requests get past 404 into the
    rules (a real HAVIP renamed, given candidates, an EIP, released...)."""
    if case.meta is None or not case.meta.generation.mode.is_positive:
        return
    fingerprint = repr((case.operation.label, case.path_parameters, case.query, case.body)).encode()
    if zlib.crc32(fingerprint) % 2:
        return
    for params in (case.path_parameters, case.query):
        if params:
            for name in params:
                params[name] = known.get(name, params[name])
    if isinstance(case.body, dict):
        for name, value in case.body.items():
            if name == "candidates" and isinstance(value, list) and value:
                case.body[name] = [known["instance_id"]]
            elif name in known:
                case.body[name] = known[name]


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
    database=None,
)
def test_the_api_keeps_its_openapi_promises(case: Case[Any], seeded_server: str) -> None:
    aim_at_real_resources(case)
    cases_run[case.operation.label] += 1
    response = case.call_and_validate(base_url=seeded_server, headers=AUTH, checks=CHECKS, timeout=10)
    statuses[case.operation.label].add(response.status_code)


def test_every_operation_was_exercised() -> None:
    operations = {result.ok().label for result in schema.get_all_operations() if isinstance(result, Ok)}
    assert len(operations) >= 20
    starved = {op: cases_run[op] for op in operations if cases_run[op] < 5}
    assert not starved, f"operations barely exercised: {starved}; all: {dict(cases_run)}"
    # the token was sent and accepted, and requests got past validation into the rules
    assert all(statuses[op] - {401} for op in operations), dict(statuses)
    reached = {op for op in operations if statuses[op] & {200, 201, 204}}
    assert {
        "POST /v1/vpcs",
        "POST /v1/havips",
        "PATCH /v1/havips/{havip_id}",
        "GET /v1/havips/{havip_id}",
        "DELETE /v1/havips/{havip_id}/eip",
        "GET /v1/claims/rejected",
    } <= reached, {op: sorted(statuses[op]) for op in sorted(operations)}
    print(f"schemathesis: {sum(cases_run.values())} cases over {len(operations)} operations")
    for op in sorted(operations):
        print(f"  {op}: {cases_run[op]} cases, statuses {sorted(statuses[op])}")
