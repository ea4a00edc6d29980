"""havipctl — the command-line client of the HAVIP allocator API (argparse wiring only).

The commands themselves are in commands.py, the HTTP client in client.py, the formatting in render.py and the
event stream in watch.py. `main()` never lets a traceback out: every failure is one line on stderr and an exit
status from errors.ExitCode. With `--json` that line is `{"error": {"code": "UPPER_SNAKE", "message": "..."}}`,
whatever failed: the API, the connection, the command line, the event stream, or havipctl itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from typing import IO, NoReturn

import httpx

from havipctl import commands, render
from havipctl.config import parse_seconds, resolve
from havipctl.errors import BadArguments, ExitCode, HavipctlError, InternalError, Interrupted

PROG = "havipctl"

EPILOG = """\
environment (a flag wins over its variable):
  HAVIP_URL               allocator base URL (default http://127.0.0.1:8080)
  HAVIP_API_TOKEN         bearer token of the /v1 API
  HAVIP_CONNECT_TIMEOUT   seconds to connect (default 5)
  HAVIP_REQUEST_TIMEOUT   seconds for a whole request (default 30)
  HAVIP_CA_FILE           CA certificates (PEM) an https:// allocator is verified against (default: the system's)
  HAVIP_AMQP_URL          RabbitMQ URL for `watch` (default amqp://guest:guest@127.0.0.1:5672/); a cluster's
                          nodes comma-separated, tried in turn
  HAVIP_AMQP_CA_FILE      CA certificates (PEM) an amqps:// node is verified against (default: the system's)
  HAVIP_AMQP_PREFIX       prefix of the exchange name, as the services use it (default empty)

exit status:
  0 ok   1 API error (code and message shown)   2 bad usage
  3 cannot reach the allocator / RabbitMQ, or the allocator's certificate does not verify
  4 authentication failed   5 watch: --timeout before --count events   70 internal error   130 interrupted
"""


# ---- argument types ---------------------------------------------------------------------------------------


def resource_id(text: str) -> str:
    """An id as the API gives them: a UUID (normalised to its lower-case canonical form)."""
    try:
        return str(uuid.UUID(text.strip()))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an id (expected a UUID)") from None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def seconds(text: str) -> float:
    try:
        return parse_seconds(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds") from None


def idempotency_key(text: str) -> str:
    if not 1 <= len(text) <= 64 or not all(0x20 <= ord(ch) <= 0x7E for ch in text):
        raise argparse.ArgumentTypeError("an Idempotency-Key is 1 to 64 printable ASCII characters")
    return text


def havip_state(text: str) -> str:
    state = text.strip().upper()
    if state not in ("UNBOUND", "BOUND"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a state (UNBOUND or BOUND)")
    return state


# ---- parser -----------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse that raises its usage errors instead of printing them and exiting, so that run() reports them
    like any other error: as argparse does, or as JSON with --json. (Subparsers are of the same class.)"""

    def error(self, message: str) -> NoReturn:
        raise BadArguments(self.prog, message, self.format_usage())


def json_requested(argv: Sequence[str]) -> bool:
    """Whether the command line asks for --json, read before the real parse (which may refuse it)."""
    probe = _Parser(add_help=False)
    probe.add_argument("--json", action="store_true")
    try:
        known, _ = probe.parse_known_args(argv)
    except BadArguments:  # e.g. --json=yes: the real parse refuses it too
        return False
    return bool(known.json)


def _global_options() -> _Parser:
    """Options accepted before the command and after it (SUPPRESS: a leaf does not reset the top's value)."""
    parent = _Parser(add_help=False)
    group = parent.add_argument_group("connection and output")
    group.add_argument("--url", default=argparse.SUPPRESS, help="allocator base URL (env HAVIP_URL)")
    group.add_argument("--token", default=argparse.SUPPRESS, help="API bearer token (env HAVIP_API_TOKEN)")
    group.add_argument(
        "--connect-timeout", metavar="S", default=argparse.SUPPRESS, help="seconds to connect (default 5)"
    )
    group.add_argument(
        "--request-timeout", metavar="S", default=argparse.SUPPRESS, help="seconds per request (default 30)"
    )
    group.add_argument(
        "--cacert",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="verify an https:// allocator against these CA certificates, PEM (env HAVIP_CA_FILE; default: the "
        "system's CAs)",
    )
    group.add_argument(
        "--amqp-url",
        default=argparse.SUPPRESS,
        help="RabbitMQ URL for watch, or a cluster's nodes comma-separated (env HAVIP_AMQP_URL)",
    )
    group.add_argument(
        "--amqp-cacert",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="verify an amqps:// node against these CA certificates, PEM (env HAVIP_AMQP_CA_FILE; default: the "
        "system's CAs)",
    )
    group.add_argument(
        "--amqp-prefix", default=argparse.SUPPRESS, help="exchange name prefix for watch (env HAVIP_AMQP_PREFIX)"
    )
    group.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print the API's JSON untouched (watch: one raw event per line); errors and notes as JSON on stderr",
    )
    return parent


class _Builder:
    def __init__(self) -> None:
        self.common = _global_options()

    def group(
        self, subparsers: argparse._SubParsersAction[_Parser], name: str, help_text: str
    ) -> argparse._SubParsersAction[_Parser]:
        parser = subparsers.add_parser(name, help=help_text, description=help_text)
        return parser.add_subparsers(dest=f"{name}_command", metavar="COMMAND", required=True)

    def leaf(
        self,
        subparsers: argparse._SubParsersAction[_Parser],
        name: str,
        help_text: str,
        handler: commands.Handler,
        *,
        with_id: str | None = None,
    ) -> argparse.ArgumentParser:
        parser = subparsers.add_parser(name, help=help_text, description=help_text, parents=[self.common])
        parser.set_defaults(handler=handler)
        if with_id is not None:
            parser.add_argument("id", metavar="ID", type=resource_id, help=with_id)
        return parser


def _paging(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--limit", type=positive_int, help="page size (the API's default 100, at most 1000)")
    parser.add_argument("--page-token", metavar="TOKEN", help="next_page_token of a previous page")
    parser.add_argument("--all", action="store_true", help="follow next_page_token to the last page")


def build_parser() -> argparse.ArgumentParser:
    b = _Builder()
    parser = _Parser(
        prog=PROG,
        description="Command-line client of the HAVIP allocator: VPCs, subnets, instances, HAVIPs, events.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[b.common],
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    top = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # vpc
    vpc = b.group(top, "vpc", "VPCs: create, list, show, delete")
    p = b.leaf(vpc, "create", "create a VPC", commands.vpc_create)
    p.add_argument("--name", required=True)
    p.add_argument("--cidr", required=True, help="IPv4 block, e.g. 10.0.0.0/16")
    _paging(b.leaf(vpc, "list", "list VPCs", commands.vpc_list))
    b.leaf(vpc, "show", "show a VPC", commands.vpc_show, with_id="VPC id")
    b.leaf(vpc, "delete", "delete a VPC (refused while it has subnets)", commands.vpc_delete, with_id="VPC id")

    # subnet
    subnet = b.group(top, "subnet", "subnets: create, list, show, delete")
    p = b.leaf(subnet, "create", "create a subnet inside a VPC", commands.subnet_create)
    p.add_argument("--vpc", required=True, type=resource_id, help="VPC id")
    p.add_argument("--name", required=True)
    p.add_argument("--cidr", required=True, help="IPv4 block inside the VPC's, e.g. 10.0.1.0/24")
    p.add_argument("--segment", help="the layer-2 segment it is on (a watcher's HAVIP_SEGMENT); default: default")
    p.add_argument("--vlan", type=int, help="its VLAN on that segment (1-4094); default: the whole segment")
    p = b.leaf(subnet, "list", "list subnets", commands.subnet_list)
    p.add_argument("--vpc", type=resource_id, help="only this VPC's subnets")
    _paging(p)
    b.leaf(subnet, "show", "show a subnet with its free-address count", commands.subnet_show, with_id="subnet id")
    b.leaf(subnet, "delete", "delete a subnet (refused while in use)", commands.subnet_delete, with_id="subnet id")

    # instance
    instance = b.group(top, "instance", "instances (server interfaces): register, list, show, deregister")
    p = b.leaf(instance, "register", "register a server's network interface", commands.instance_register)
    p.add_argument("--subnet", required=True, type=resource_id, help="subnet id")
    p.add_argument("--name", required=True)
    p.add_argument("--ip", "--private-ip", dest="ip", required=True, help="private IPv4 address in the subnet")
    p.add_argument("--mac", required=True, help="MAC address, e.g. 02:00:c0:00:02:0a")
    p = b.leaf(instance, "list", "list instances", commands.instance_list)
    p.add_argument("--subnet", type=resource_id, help="only this subnet's instances")
    p.add_argument("--vpc", type=resource_id, help="only this VPC's instances")
    _paging(p)
    b.leaf(instance, "show", "show an instance", commands.instance_show, with_id="instance id")
    p = b.leaf(
        instance,
        "deregister",
        "deregister an instance (refused while it holds a HAVIP or is a HAVIP candidate, unless --force)",
        commands.instance_deregister,
        with_id="instance id",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="deregister even while it holds a HAVIP (the binding ends) or is a candidate (it then authorises "
        "nobody)",
    )

    # havip
    havip = b.group(top, "havip", "HAVIPs: allocate, list, show, update, release, eip, transitions")
    p = b.leaf(
        havip, "allocate", "allocate a HAVIP (the given address, or the lowest free one)", commands.havip_allocate
    )
    p.add_argument("--subnet", required=True, type=resource_id, help="subnet id")
    p.add_argument("--name")
    p.add_argument("--address", help="the address to take (default: the lowest free one)")
    p.add_argument(
        "--candidate",
        dest="candidates",
        action="append",
        type=resource_id,
        metavar="INSTANCE_ID",
        help="an instance allowed to hold it (repeat; none = any instance of the subnet)",
    )
    p.add_argument(
        "--idempotency-key",
        type=idempotency_key,
        metavar="KEY",
        help="a retry with the same key returns the same HAVIP",
    )
    p = b.leaf(havip, "list", "list HAVIPs", commands.havip_list)
    p.add_argument("--vpc", type=resource_id, help="only this VPC's HAVIPs")
    p.add_argument("--subnet", type=resource_id, help="only this subnet's HAVIPs")
    p.add_argument("--state", type=havip_state, help="UNBOUND or BOUND")
    p.add_argument("--address", help="only the HAVIP with this address")
    _paging(p)
    b.leaf(havip, "show", "show a HAVIP with its binding", commands.havip_show, with_id="HAVIP id")
    p = b.leaf(
        havip, "update", "rename a HAVIP or replace its candidate list", commands.havip_update, with_id="HAVIP id"
    )
    names = p.add_mutually_exclusive_group()
    names.add_argument("--name", help="the new name")
    names.add_argument("--no-name", action="store_true", help="remove the name")
    candidates = p.add_mutually_exclusive_group()
    candidates.add_argument(
        "--candidate",
        dest="candidates",
        action="append",
        type=resource_id,
        metavar="INSTANCE_ID",
        help="the new candidate list (repeat)",
    )
    candidates.add_argument(
        "--no-candidates", action="store_true", help="empty the list: any instance may hold it"
    )
    p.add_argument(
        "--force", action="store_true", help="replace the candidates even if the list leaves out the holder"
    )
    p = b.leaf(
        havip,
        "release",
        "release a HAVIP (refused while an EIP is associated, or while bound unless --force)",
        commands.havip_release,
        with_id="HAVIP id",
    )
    p.add_argument("--force", action="store_true", help="release even while an instance holds it")
    eip = b.group(havip, "eip", "a HAVIP's elastic IP: associate, dissociate")
    p = b.leaf(
        eip, "associate", "associate an EIP from the public pool", commands.havip_eip_associate, with_id="HAVIP id"
    )
    p.add_argument("--address", help="the EIP to take (default: one the pool chooses)")
    b.leaf(eip, "dissociate", "dissociate the HAVIP's EIP", commands.havip_eip_dissociate, with_id="HAVIP id")
    p = b.leaf(
        havip,
        "transitions",
        "a HAVIP's ownership history, newest first",
        commands.havip_transitions,
        with_id="HAVIP id",
    )
    _paging(p)

    # claims
    claims = b.group(top, "claims", "the audit of refused ownership claims")
    p = b.leaf(claims, "rejected", "list refused claims", commands.claims_rejected)
    p.add_argument("--havip", type=resource_id, help="only this HAVIP's")
    _paging(p)

    # watch
    p = b.leaf(top, "watch", "print the live event stream from RabbitMQ", commands.watch)
    p.add_argument(
        "keys",
        nargs="*",
        metavar="KEY",
        help="routing-key filters, e.g. 'havip.#' 'vpc.*' (default: every event)",
    )
    p.add_argument("--count", type=positive_int, metavar="N", help="stop after N events")
    p.add_argument("--timeout", type=seconds, metavar="S", help="stop after S seconds")
    return parser


def _version() -> str:
    try:
        return metadata.version("havip")
    except metadata.PackageNotFoundError:
        return "unknown"


# ---- running ----------------------------------------------------------------------------------------------


def _silence_stdout() -> None:
    """After a broken pipe (`havipctl … | head`), keep the interpreter's final flush from failing too."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def _report(err: IO[str], as_json: bool, error: HavipctlError) -> int:
    """The error on stderr, in one line: `havipctl: message` (argparse's own text for bad arguments), or with
    --json its JSON object; returns its exit status."""
    if as_json:
        err.write(json.dumps(error.as_json(), separators=(",", ":")) + "\n")
    elif isinstance(error, BadArguments):
        err.write(error.as_text())
    else:
        err.write(f"{PROG}: {render.clean(error.message)}\n")
    err.flush()
    return error.exit_code


def run(
    argv: Sequence[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
    transport: httpx.BaseTransport | None = None,
) -> int:
    """Parse, run one command, map every failure to one line on stderr and an exit status."""
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    arguments = list(sys.argv[1:] if argv is None else argv)
    as_json = json_requested(arguments)
    parser = build_parser()
    try:
        args = parser.parse_args(arguments)
    except BadArguments as exc:
        return _report(err, as_json, exc)
    except SystemExit as exc:  # argparse: --help / --version, printed on stdout
        return exc.code if isinstance(exc.code, int) else ExitCode.USAGE
    handler: Callable[[argparse.Namespace, commands.Context], int] = args.handler
    try:
        config = resolve(
            os.environ if env is None else env,
            url=getattr(args, "url", None),
            token=getattr(args, "token", None),
            connect_timeout=getattr(args, "connect_timeout", None),
            request_timeout=getattr(args, "request_timeout", None),
            cacert=getattr(args, "cacert", None),
            amqp_url=getattr(args, "amqp_url", None),
            amqp_prefix=getattr(args, "amqp_prefix", None),
            amqp_cacert=getattr(args, "amqp_cacert", None),
        )
        ctx = commands.Context(config, as_json, out, err, transport)
        return handler(args, ctx)
    except HavipctlError as exc:
        return _report(err, as_json, exc)
    except KeyboardInterrupt:
        return _report(err, as_json, Interrupted("interrupted"))
    except BrokenPipeError:
        _silence_stdout()
        return ExitCode.OK
    except Exception as exc:  # a bug: still one line, never a traceback
        return _report(
            err, as_json, InternalError(f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())}")
        )


def main(argv: list[str] | None = None) -> int:
    return int(run(argv))


if __name__ == "__main__":
    sys.exit(main())
