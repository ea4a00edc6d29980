"""havipctl without a server: argument parsing, configuration, requests sent, and errors → exit codes.

The HTTP side runs against httpx.MockTransport; run() is main() with its streams and environment injectable.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from havipctl import commands
from havipctl import main as cli
from havipctl.commands import json_line
from havipctl.config import DEFAULT_AMQP_URL, resolve
from havipctl.errors import ExitCode, UsageError
from havipctl.watch import exchange_name
from shared.settings import CommonSettings

VPC_ID = "4e6a271b-80a7-4b18-bb84-3db840eca33b"
SUBNET_ID = "8709a781-3356-4229-a74b-14e3630b83bf"
HAVIP_ID = "8eafa7e0-e78e-4fc6-9cd3-b893849b0f70"
INSTANCE_ID = "3c0bece0-ddae-4bc4-b15d-dc0a0ba3f8e8"
ENV = {"HAVIP_URL": "http://allocator.test:8080", "HAVIP_API_TOKEN": "secret-token"}
VPC = {"id": VPC_ID, "name": "prod", "cidr": "10.20.0.0/16", "created_at": "2026-11-26T06:27:28.404385Z"}


@dataclass
class Result:
    code: int
    out: str
    err: str
    requests: list[httpx.Request] = field(default_factory=list)


Responder = Callable[[httpx.Request], httpx.Response]


def run(argv: list[str], responder: Responder | None = None, env: dict[str, str] | None = None) -> Result:
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        if responder is None:
            raise AssertionError(f"no request expected, got {request.method} {request.url}")
        return responder(request)

    out, err = io.StringIO(), io.StringIO()
    code = cli.run(
        argv, env=ENV if env is None else env, stdout=out, stderr=err, transport=httpx.MockTransport(handler)
    )
    return Result(int(code), out.getvalue(), err.getvalue(), requests)


def answer(status: int, body: Any = None, **headers: str) -> Responder:
    def respond(request: httpx.Request) -> httpx.Response:
        if body is None:
            return httpx.Response(status, headers=headers)
        if isinstance(body, str):
            return httpx.Response(status, text=body, headers=headers)
        return httpx.Response(status, json=body, headers=headers)

    return respond


def error(status: int, code: str, message: str) -> Responder:
    return answer(status, {"error": {"code": code, "message": message}})


# ---- parsing ------------------------------------------------------------------------------------------------


def parse(*argv: str) -> Any:
    return cli.build_parser().parse_args(list(argv))


def test_global_options_go_before_or_after_the_command() -> None:
    before = parse("--json", "--url", "http://a:1", "vpc", "list")
    after = parse("vpc", "list", "--json", "--url", "http://a:1")
    for args in (before, after):
        assert args.json is True
        assert args.url == "http://a:1"
        assert args.handler is commands.vpc_list
    plain = parse("vpc", "list")
    assert not hasattr(plain, "json")
    assert not hasattr(plain, "url")


def test_ids_are_uuids_normalised() -> None:
    args = parse("havip", "show", HAVIP_ID.upper())
    assert args.id == HAVIP_ID


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["vpc"],
        ["vpc", "create", "--name", "x"],  # --cidr missing
        ["vpc", "show", "not-a-uuid"],
        ["havip", "allocate", "--name", "x"],  # --subnet missing
        ["havip", "list", "--state", "SLEEPING"],
        ["havip", "list", "--limit", "0"],
        ["havip", "update", HAVIP_ID, "--candidate", INSTANCE_ID, "--no-candidates"],
        ["havip", "update", HAVIP_ID, "--name", "a", "--no-name"],
        ["havip", "allocate", "--subnet", SUBNET_ID, "--idempotency-key", "x" * 65],
        ["havip", "eip"],
        ["watch", "--timeout", "-1"],
        ["watch", "--count", "many"],
        ["nonsense"],
    ],
)
def test_bad_usage_exits_2_with_argparse_message(argv: list[str]) -> None:
    result = run(argv)
    assert result.code == 2
    assert result.out == ""
    usage, message = result.err.splitlines()[:-1], result.err.splitlines()[-1]
    assert usage[0].startswith("usage: havipctl")
    assert message.startswith("havipctl")
    assert ": error: " in message
    as_json = run([*argv, "--json"] if argv and argv[0] != "nonsense" else ["--json", *argv])
    assert (as_json.code, as_json.out) == (2, "")
    assert json.loads(as_json.err) == {
        "error": {"code": "USAGE_ERROR", "message": message.replace(": error:", ":")}
    }


def test_bad_usage_reads_as_argparse_prints_it() -> None:
    lines = run(["vpc", "create", "--name", "x"]).err.splitlines()
    assert lines[0].startswith("usage: havipctl vpc create [-h] ")
    assert "--cidr CIDR" in " ".join(lines[:-1])
    assert lines[-1] == "havipctl vpc create: error: the following arguments are required: --cidr"


@pytest.mark.parametrize(
    ("argv", "wanted"),
    [
        (["--json", "vpc", "list"], True),
        (["vpc", "list", "--json"], True),
        (["vpc", "list", "--js"], True),  # argparse takes an unambiguous prefix
        (["vpc", "create", "--name", "x", "--json"], True),  # --cidr missing: the refusal is JSON
        (["vpc", "list"], False),
        (["watch", "--", "--json"], False),  # a routing key, not the option
        (["vpc", "list", "--json=yes"], False),
    ],
)
def test_json_is_recognised_before_parsing(argv: list[str], wanted: bool) -> None:
    assert cli.json_requested(argv) is wanted


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--help"]).code == 0
    text = capsys.readouterr().out
    for command in ("vpc", "subnet", "instance", "havip", "claims", "watch", "HAVIP_API_TOKEN", "exit status"):
        assert command in text


def test_allocate_arguments() -> None:
    args = parse(
        "havip",
        "allocate",
        "--subnet",
        SUBNET_ID,
        "--name",
        "vip",
        "--address",
        "10.0.0.9",
        "--candidate",
        INSTANCE_ID,
        "--candidate",
        VPC_ID,
        "--idempotency-key",
        "retry-1",
    )
    assert (args.subnet, args.name, args.address) == (SUBNET_ID, "vip", "10.0.0.9")
    assert args.candidates == [INSTANCE_ID, VPC_ID]
    assert args.idempotency_key == "retry-1"


def test_list_and_watch_arguments() -> None:
    args = parse("havip", "list", "--state", "bound", "--vpc", VPC_ID, "--limit", "5", "--all")
    assert (args.state, args.vpc, args.limit, args.all, args.page_token) == ("BOUND", VPC_ID, 5, True, None)
    watch = parse("watch", "havip.#", "vpc.*", "--count", "3", "--timeout", "2.5", "--json")
    assert (watch.keys, watch.count, watch.timeout, watch.json) == (["havip.#", "vpc.*"], 3, 2.5, True)


# ---- configuration ------------------------------------------------------------------------------------------


def test_configuration_flags_over_environment_over_defaults() -> None:
    defaults = resolve({})
    assert defaults.url == "http://127.0.0.1:8080"
    assert defaults.token is None
    assert defaults.amqp_url == DEFAULT_AMQP_URL
    assert (defaults.connect_timeout, defaults.request_timeout, defaults.amqp_prefix) == (5.0, 30.0, "")
    env = {
        "HAVIP_URL": "http://env:1",
        "HAVIP_API_TOKEN": "env-token",
        "HAVIP_AMQP_URL": "amqp://u:p@env/",
        "HAVIP_AMQP_PREFIX": "t1.",
        "HAVIP_CONNECT_TIMEOUT": "2",
        "HAVIP_REQUEST_TIMEOUT": "7.5",
    }
    from_env = resolve(env)
    assert (from_env.url, from_env.token, from_env.amqp_url, from_env.amqp_prefix) == (
        "http://env:1",
        "env-token",
        "amqp://u:p@env/",
        "t1.",
    )
    assert (from_env.connect_timeout, from_env.request_timeout) == (2.0, 7.5)
    flags = resolve(env, url="https://flag", token="flag-token", request_timeout="1")
    assert (flags.url, flags.token, flags.request_timeout) == ("https://flag", "flag-token", 1.0)
    assert resolve({"HAVIP_API_TOKEN": ""}).token is None


@pytest.mark.parametrize(
    ("env", "flags", "named"),
    [
        ({"HAVIP_URL": "allocator:8080"}, {}, "HAVIP_URL"),
        ({}, {"url": "ftp://x"}, "--url"),
        ({"HAVIP_REQUEST_TIMEOUT": "soon"}, {}, "HAVIP_REQUEST_TIMEOUT"),
        ({}, {"connect_timeout": "0"}, "--connect-timeout"),
        ({"HAVIP_API_TOKEN": "two words"}, {}, "HAVIP_API_TOKEN"),
        ({}, {"amqp_url": "http://rabbit"}, "--amqp-url"),
        ({"HAVIP_AMQP_URL": "amqp://a/,rabbit-2:5672"}, {}, "HAVIP_AMQP_URL: node 2 of 2"),
        ({"HAVIP_AMQP_URL": " , "}, {}, "HAVIP_AMQP_URL"),
        ({"HAVIP_AMQP_CA_FILE": "/nonexistent/ca.pem"}, {}, "HAVIP_AMQP_CA_FILE: /nonexistent/ca.pem does not"),
        ({}, {"amqp_cacert": "/"}, "--amqp-cacert: / is a directory"),
    ],
)
def test_bad_configuration_is_a_usage_error(env: dict[str, str], flags: dict[str, str], named: str) -> None:
    with pytest.raises(UsageError, match=named):
        resolve(env, **flags)


def test_a_cluster_s_nodes_are_read_as_the_services_read_them() -> None:
    config = resolve({"HAVIP_AMQP_URL": "amqps://u:p@rabbit-1/havip, amqps://u:p@rabbit-2/havip,"})
    assert config.amqp_urls == ("amqps://u:p@rabbit-1/havip", "amqps://u:p@rabbit-2/havip")
    assert resolve({}, amqp_url="amqp://one/").amqp_urls == ("amqp://one/",)
    assert resolve({}).amqp_urls == (DEFAULT_AMQP_URL,)
    assert cli.build_parser().parse_args(["watch", "--amqp-url", "amqp://a/,amqp://b/"]).amqp_url == (
        "amqp://a/,amqp://b/"
    )


def test_bad_environment_exits_2_in_one_line() -> None:
    result = run(["vpc", "list"], env={"HAVIP_REQUEST_TIMEOUT": "soon"})
    assert result.code == 2
    assert result.err == "havipctl: HAVIP_REQUEST_TIMEOUT: expected a positive number of seconds, got 'soon'\n"
    as_json = run(["vpc", "list", "--json"], env={"HAVIP_REQUEST_TIMEOUT": "soon"})
    assert as_json.code == 2
    assert json.loads(as_json.err) == {
        "error": {
            "code": "USAGE_ERROR",
            "message": "HAVIP_REQUEST_TIMEOUT: expected a positive number of seconds, got 'soon'",
        }
    }


def test_exit_codes_are_the_documented_ones() -> None:
    assert {c.name: int(c) for c in ExitCode} == {
        "OK": 0,
        "API_ERROR": 1,
        "USAGE": 2,
        "UNREACHABLE": 3,
        "AUTHENTICATION": 4,
        "WATCH_TIMEOUT": 5,
        "INTERNAL": 70,
        "INTERRUPTED": 130,
    }


def test_exchange_name_follows_the_services_prefix_rule() -> None:
    assert exchange_name("") == "havip.events"
    assert exchange_name("test-1.") == "test-1.havip.events"
    # havipctl restates the rule instead of importing it: the services' own settings must agree.
    for prefix in ("", "test-1.", "havip-test-42/"):
        assert exchange_name(prefix) == CommonSettings.model_construct(amqp_prefix=prefix).exchange


# ---- requests -----------------------------------------------------------------------------------------------


def test_requests_carry_the_token_and_the_documented_shapes() -> None:
    result = run(
        [
            "havip",
            "allocate",
            "--subnet",
            SUBNET_ID,
            "--candidate",
            INSTANCE_ID,
            "--idempotency-key",
            "k-1",
            "--json",
        ],
        answer(201, {"id": HAVIP_ID}),
    )
    assert result.code == 0
    (request,) = result.requests
    assert (request.method, request.url.path) == ("POST", "/v1/havips")
    assert request.headers["Authorization"] == "Bearer secret-token"
    assert request.headers["Idempotency-Key"] == "k-1"
    assert json.loads(request.content) == {"subnet_id": SUBNET_ID, "candidates": [INSTANCE_ID]}


@pytest.mark.parametrize(
    ("argv", "method", "path", "query", "body"),
    [
        (
            ["vpc", "create", "--name", "p", "--cidr", "10.0.0.0/16"],
            "POST",
            "/v1/vpcs",
            {},
            {"name": "p", "cidr": "10.0.0.0/16"},
        ),
        (["subnet", "list", "--vpc", VPC_ID], "GET", "/v1/subnets", {"vpc_id": VPC_ID}, None),
        (
            [
                "instance",
                "register",
                "--subnet",
                SUBNET_ID,
                "--name",
                "c",
                "--ip",
                "10.0.0.5",
                "--mac",
                "02:00:00:00:00:01",
            ],
            "POST",
            "/v1/instances",
            {},
            {"subnet_id": SUBNET_ID, "name": "c", "private_ip": "10.0.0.5", "mac": "02:00:00:00:00:01"},
        ),
        (["instance", "list", "--subnet", SUBNET_ID], "GET", "/v1/instances", {"subnet_id": SUBNET_ID}, None),
        (
            ["havip", "list", "--state", "unbound", "--address", "10.0.0.4", "--limit", "2"],
            "GET",
            "/v1/havips",
            {"state": "UNBOUND", "address": "10.0.0.4", "limit": "2"},
            None,
        ),
        (["havip", "update", HAVIP_ID, "--name", "n"], "PATCH", f"/v1/havips/{HAVIP_ID}", {}, {"name": "n"}),
        (["havip", "update", HAVIP_ID, "--no-name"], "PATCH", f"/v1/havips/{HAVIP_ID}", {}, {"name": None}),
        (
            ["havip", "update", HAVIP_ID, "--no-candidates"],
            "PATCH",
            f"/v1/havips/{HAVIP_ID}",
            {},
            {"candidates": []},
        ),
        (["havip", "eip", "associate", HAVIP_ID], "POST", f"/v1/havips/{HAVIP_ID}/eip", {}, {}),
        (
            ["havip", "eip", "associate", HAVIP_ID, "--address", "203.0.113.5"],
            "POST",
            f"/v1/havips/{HAVIP_ID}/eip",
            {},
            {"address": "203.0.113.5"},
        ),
        (["havip", "eip", "dissociate", HAVIP_ID], "DELETE", f"/v1/havips/{HAVIP_ID}/eip", {}, None),
        (["havip", "transitions", HAVIP_ID], "GET", f"/v1/havips/{HAVIP_ID}/transitions", {}, None),
        (["claims", "rejected", "--havip", HAVIP_ID], "GET", "/v1/claims/rejected", {"havip_id": HAVIP_ID}, None),
    ],
)
def test_each_command_calls_its_route(
    argv: list[str], method: str, path: str, query: dict[str, str], body: dict[str, Any] | None
) -> None:
    page: dict[str, Any] = {"items": [], "next_page_token": None}
    result = run(argv, answer(200, page if method == "GET" else {"id": HAVIP_ID}))
    assert result.code == 0, result.err
    (request,) = result.requests
    assert (request.method, request.url.path, dict(request.url.params)) == (method, path, query)
    assert (json.loads(request.content) if request.content else None) == body


@pytest.mark.parametrize(
    ("argv", "path", "query", "said"),
    [
        (["vpc", "delete", VPC_ID], f"/v1/vpcs/{VPC_ID}", {}, f"deleted VPC {VPC_ID}"),
        (["subnet", "delete", SUBNET_ID], f"/v1/subnets/{SUBNET_ID}", {}, f"deleted subnet {SUBNET_ID}"),
        (["instance", "deregister", INSTANCE_ID], f"/v1/instances/{INSTANCE_ID}", {}, "deregistered instance"),
        (["havip", "release", HAVIP_ID], f"/v1/havips/{HAVIP_ID}", {}, f"released HAVIP {HAVIP_ID}"),
        (["havip", "release", HAVIP_ID, "--force"], f"/v1/havips/{HAVIP_ID}", {"force": "true"}, "released"),
    ],
)
def test_deletes(argv: list[str], path: str, query: dict[str, str], said: str) -> None:
    result = run(argv, answer(204))
    assert result.code == 0
    (request,) = result.requests
    assert (request.method, request.url.path, dict(request.url.params)) == ("DELETE", path, query)
    assert said in result.out
    assert run([*argv, "--json"], answer(204)).out == ""  # nothing to print: 204 has no body


def test_update_without_a_change_is_a_usage_error() -> None:
    result = run(["havip", "update", HAVIP_ID])
    assert result.code == 2
    assert result.err.startswith("havipctl: havip update: nothing to change")
    assert result.requests == []


# ---- output -------------------------------------------------------------------------------------------------


def test_json_prints_the_body_untouched() -> None:
    raw = '{ "id" : "' + VPC_ID + '",\t"name": "prod", "extra": [1, 2.50] }'
    result = run(["vpc", "show", VPC_ID, "--json"], answer(200, raw))
    assert result.out == raw + "\n"


def test_show_prints_key_values_and_list_a_table() -> None:
    shown = run(["vpc", "show", VPC_ID], answer(200, VPC))
    assert shown.out.splitlines() == [
        f"id          {VPC_ID}",
        "name        prod",
        "cidr        10.20.0.0/16",
        "created_at  2026-11-26 06:27:28.404385Z",
    ]
    listed = run(["vpc", "list"], answer(200, {"items": [VPC], "next_page_token": None}))
    assert listed.out.splitlines() == [
        f"ID{' ' * 36}NAME  CIDR          CREATED",
        f"{VPC_ID}  prod  10.20.0.0/16  2026-11-26 06:27:28.404385Z",
    ]
    assert listed.err == ""


def test_claims_rejected_shows_how_many_frames_each_row_folds() -> None:
    refusal = {
        "havip_id": HAVIP_ID,
        "address": "10.20.1.2",
        "mac": "02:00:00:00:00:66",
        "reason": "not_candidate",
        "captured_at": "2026-11-26T06:27:30.050903Z",
        "watcher_id": "w1",
        "count": 37,
    }
    result = run(
        ["claims", "rejected", "--havip", HAVIP_ID], answer(200, {"items": [refusal], "next_page_token": None})
    )
    header, row = result.out.splitlines()
    assert "COUNT" in header.split()
    assert row.split()[header.split().index("COUNT") + 1] == "37"  # the time takes two words


def test_empty_list_says_so_on_stderr() -> None:
    result = run(["havip", "transitions", HAVIP_ID], answer(200, {"items": [], "next_page_token": None}))
    assert (result.code, result.out, result.err) == (0, "", "no transitions found\n")


def test_more_pages_are_announced_and_all_follows_them() -> None:
    def pages(request: httpx.Request) -> httpx.Response:
        token = request.url.params.get("page_token")
        if token is None:
            return httpx.Response(200, json={"items": [VPC], "next_page_token": "p2"})
        assert token == "p2"
        return httpx.Response(200, json={"items": [{**VPC, "name": "dev"}], "next_page_token": None})

    one = run(["vpc", "list", "--limit", "1"], pages)
    assert len(one.out.splitlines()) == 2
    assert "--page-token p2" in one.err
    every = run(["vpc", "list", "--limit", "1", "--all", "--json"], pages)
    assert [r.url.params.get("limit") for r in every.requests] == ["1", "1"]
    assert json.loads(every.out) == {"items": [VPC, {**VPC, "name": "dev"}], "next_page_token": None}


def test_idempotent_replay_is_noted() -> None:
    result = run(
        ["havip", "allocate", "--subnet", SUBNET_ID, "--idempotency-key", "k"],
        answer(201, {"id": HAVIP_ID}, **{"Idempotent-Replayed": "true"}),
    )
    assert result.code == 0
    assert "idempotent replay" in result.err
    as_json = run(
        ["havip", "allocate", "--subnet", SUBNET_ID, "--idempotency-key", "k", "--json"],
        answer(201, {"id": HAVIP_ID}, **{"Idempotent-Replayed": "true"}),
    )
    assert json.loads(as_json.out) == {"id": HAVIP_ID}
    assert json.loads(as_json.err)["note"].startswith("idempotent replay")


# ---- errors → exit codes ------------------------------------------------------------------------------------


def test_401_is_an_authentication_failure() -> None:
    result = run(["vpc", "list"], error(401, "UNAUTHENTICATED", "invalid token"))
    assert result.code == 4
    assert result.err == (
        "havipctl: authentication failed: check HAVIP_API_TOKEN / --token (the allocator said: invalid token)\n"
    )


def test_no_token_sends_no_authorization_header() -> None:
    result = run(["vpc", "list"], error(401, "UNAUTHENTICATED", "missing"), env={"HAVIP_URL": "http://a:1"})
    assert "Authorization" not in result.requests[0].headers
    assert result.code == 4


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (400, "ADDRESS_RESERVED"),
        (403, "QUOTA_EXCEEDED"),
        (404, "NOT_FOUND"),
        (409, "ADDRESS_IN_USE"),
        (503, "SERVICE_UNAVAILABLE"),
    ],
)
def test_api_errors_show_code_and_message(status: int, code: str) -> None:
    result = run(["havip", "show", HAVIP_ID], error(status, code, "the\naddress is taken"))
    assert result.code == 1
    assert result.err == f"havipctl: {code} (HTTP {status}): the address is taken\n"
    assert result.out == ""


def test_an_error_without_the_api_shape_still_reads_well() -> None:
    result = run(["vpc", "list"], answer(502, "<html><body>Bad Gateway</body></html>"))
    assert result.code == 1
    assert result.err == "havipctl: HTTP_502 (HTTP 502): <html><body>Bad Gateway</body></html>\n"


def test_a_success_that_is_not_json_is_reported() -> None:
    result = run(["vpc", "list"], answer(200, "<html>welcome</html>"))
    assert result.code == 1
    assert "is this the allocator?" in result.err


def raising(exc: BaseException) -> Responder:
    def respond(request: httpx.Request) -> httpx.Response:
        raise exc

    return respond


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (httpx.ConnectError("[Errno 111] Connection refused"), "[Errno 111] Connection refused"),
        (httpx.ConnectTimeout("timed out"), "connection timed out after 5 s"),
        (httpx.ReadTimeout("timed out"), "no answer within 30 s"),
        (httpx.RemoteProtocolError("Server disconnected"), "the connection broke without an answer"),
    ],
)
def test_unreachable_allocator(exc: Exception, reason: str) -> None:
    result = run(["vpc", "list"], raising(exc))
    assert result.code == 3
    assert result.err.startswith(f"havipctl: cannot reach the allocator at http://allocator.test:8080: {reason}")
    assert result.err.count("\n") == 1


def test_connection_refused_is_named_from_the_os_error() -> None:
    cause = ConnectionRefusedError(111, "Connection refused")
    exc = httpx.ConnectError("All connection attempts failed")
    exc.__cause__ = cause
    result = run(["vpc", "list"], raising(exc))
    assert result.err == "havipctl: cannot reach the allocator at http://allocator.test:8080: connection refused\n"


def test_a_bug_is_one_line_not_a_traceback() -> None:
    result = run(["vpc", "list"], raising(RuntimeError("boom\nsecond line")))
    assert result.code == 70
    assert result.err == "havipctl: internal error: RuntimeError: boom second line\n"


def test_the_password_of_a_url_is_never_printed() -> None:
    env = {"HAVIP_URL": "http://user:hunter2@allocator.test:8080"}
    result = run(["vpc", "list"], raising(httpx.ConnectError("refused")), env=env)
    assert "hunter2" not in result.err
    assert "user:***@allocator.test:8080" in result.err


# ---- errors with --json: one JSON object on stderr, the same exit status ---------------------------------------


def json_error(result: Result) -> dict[str, Any]:
    assert result.out == ""
    assert result.err.endswith("\n")
    assert result.err.count("\n") == 1, result.err
    body: dict[str, Any] = json.loads(result.err)
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert {"code", "message"} <= set(error)
    return error


def test_api_errors_as_json_keep_the_apis_code_message_and_details() -> None:
    details = [
        {"loc": ["body", "cidr"], "msg": "octet 300 of 10.0.300.0/24 is out of range 0–255", "type": "value_error"}
    ]
    body = {"error": {"code": "VALIDATION_ERROR", "message": "cidr: octet 300 …", "details": details}}
    result = run(["vpc", "create", "--name", "x", "--cidr", "10.0.300.0/24", "--json"], answer(422, body))
    assert result.code == 1
    assert json_error(result) == {
        "code": "VALIDATION_ERROR",
        "message": "cidr: octet 300 …",
        "status": 422,
        "details": details,
    }
    conflict = run(["havip", "show", HAVIP_ID, "--json"], error(409, "ADDRESS_IN_USE", "the\naddress is taken"))
    assert conflict.code == 1
    assert json_error(conflict) == {"code": "ADDRESS_IN_USE", "message": "the address is taken", "status": 409}


def test_an_error_without_the_api_shape_as_json() -> None:
    result = run(["vpc", "list", "--json"], answer(502, "<html><body>Bad Gateway</body></html>"))
    assert result.code == 1
    assert json_error(result) == {
        "code": "HTTP_502",
        "message": "<html><body>Bad Gateway</body></html>",
        "status": 502,
    }
    odd = run(["vpc", "list", "--json"], answer(200, "<html>welcome</html>"))
    assert odd.code == 1
    assert json_error(odd)["code"] == "UNEXPECTED_RESPONSE"


def test_authentication_failure_as_json() -> None:
    result = run(["vpc", "list", "--json"], error(401, "UNAUTHENTICATED", "invalid token"))
    assert result.code == 4
    assert json_error(result) == {
        "code": "AUTHENTICATION_FAILED",
        "message": "authentication failed: check HAVIP_API_TOKEN / --token (the allocator said: invalid token)",
    }


def test_unreachable_as_json() -> None:
    cause = ConnectionRefusedError(111, "Connection refused")
    exc = httpx.ConnectError("All connection attempts failed")
    exc.__cause__ = cause
    result = run(["--json", "vpc", "list"], raising(exc))
    assert result.code == 3
    assert json_error(result) == {
        "code": "UNREACHABLE",
        "message": "cannot reach the allocator at http://allocator.test:8080: connection refused",
    }


def test_a_bug_as_json() -> None:
    result = run(["vpc", "list", "--json"], raising(RuntimeError("boom\nsecond line")))
    assert result.code == 70
    assert json_error(result) == {
        "code": "INTERNAL_ERROR",
        "message": "internal error: RuntimeError: boom second line",
    }


def test_an_interruption_as_json() -> None:
    result = run(["vpc", "list", "--json"], raising(KeyboardInterrupt()))
    assert result.code == 130
    assert json_error(result) == {"code": "INTERRUPTED", "message": "interrupted"}
    assert run(["vpc", "list"], raising(KeyboardInterrupt())).err == "havipctl: interrupted\n"


def test_a_usage_error_of_a_command_as_json() -> None:
    result = run(["havip", "update", HAVIP_ID, "--json"])
    assert result.code == 2
    assert json_error(result)["code"] == "USAGE_ERROR"


def raiser(exc: Exception) -> Callable[..., None]:
    def fail(*args: object, **kwargs: object) -> None:
        raise exc

    return fail


def test_watch_errors_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the event stream raises (watch.run: connection lost, refused login) is reported like the rest."""
    from havipctl import watch as stream
    from havipctl.errors import AuthenticationFailed, Unreachable

    for raised, exit_code, code in (
        (
            Unreachable("lost the connection to RabbitMQ at amqp://guest:***@rabbit/: connection reset"),
            3,
            "UNREACHABLE",
        ),
        (
            AuthenticationFailed("RabbitMQ at amqp://guest:***@rabbit/ refused the login"),
            4,
            "AUTHENTICATION_FAILED",
        ),
    ):
        monkeypatch.setattr(stream, "run", raiser(raised))
        result = run(["watch", "--json"])
        assert result.code == exit_code
        assert json_error(result) == {"code": code, "message": str(raised)}
        text = run(["watch"])
        assert text.err == f"havipctl: {raised}\n"


def test_watch_timeout_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    from havipctl import watch as stream

    monkeypatch.setattr(stream, "run", lambda *args, **kwargs: stream.WatchResult(stream.Outcome.TIMED_OUT, 1))
    result = run(["watch", "--count", "3", "--timeout", "2", "--json"])
    assert result.code == 5
    assert json_error(result) == {
        "code": "WATCH_TIMEOUT",
        "message": "watch: --timeout 2 s ran out after 1 of 3 events",
    }


def test_error_messages_are_printed_with_control_characters_escaped() -> None:
    result = run(["havip", "show", HAVIP_ID], error(404, "NOT_FOUND", "no \x1b[31mHAVIP\x1b[0m here"))
    assert "\x1b" not in result.err
    assert result.err == "havipctl: NOT_FOUND (HTTP 404): no \\x1b[31mHAVIP\\x1b[0m here\n"


# ---- watch helpers ----------------------------------------------------------------------------------------------


def test_json_line() -> None:
    assert json_line(b'{"a": 1}') == '{"a": 1}'
    assert json_line(b'{\n "a": 1\n}\n') == '{"a":1}'
    assert json_line(b"not json") is None
    assert json_line(b"\xff") is None
