"""What each havipctl command does: call the client, render, print. main.py wires these to argparse.

Output: the answer on stdout (a table, a key/value view, or with --json the API's JSON untouched); notes
(nothing found, more pages, replayed idempotent request, watch started) on stderr, so stdout stays parseable
(with --json as `{"note": "..."}` lines, beside the errors' `{"error": {...}}`).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

import httpx

from havipctl import render
from havipctl.client import UNSET, AllocatorClient, Reply, all_pages
from havipctl.config import Config
from havipctl.errors import UsageError, WatchTimedOut

Handler = Callable[[argparse.Namespace, "Context"], int]


@dataclass(slots=True)
class Context:
    config: Config
    json: bool
    stdout: IO[str]
    stderr: IO[str]
    transport: httpx.BaseTransport | None = None  # tests put a mock transport here

    def client(self) -> AllocatorClient:
        return AllocatorClient(
            self.config.url,
            self.config.token,
            connect_timeout=self.config.connect_timeout,
            request_timeout=self.config.request_timeout,
            ca_file=self.config.ca_file,
            transport=self.transport,
        )

    def out(self, text: str) -> None:
        self.stdout.write(text + "\n")
        self.stdout.flush()

    def note(self, text: str) -> None:
        """A note on stderr; with --json a JSON object too, `{"note": "..."}`, so stderr stays one kind."""
        self.stderr.write((json.dumps({"note": text}, separators=(",", ":")) if self.json else text) + "\n")
        self.stderr.flush()


# ---- output helpers ---------------------------------------------------------------------------------------


def _resource(ctx: Context, reply: Reply) -> None:
    ctx.out(reply.raw if ctx.json else render.show(reply.body))


def _done(ctx: Context, message: str, reply: Reply | None = None) -> None:
    """A command that may answer 204: show the resource if one came back, else a confirmation."""
    if reply is not None:
        _resource(ctx, reply)
    elif not ctx.json:
        ctx.out(message)


def _list(
    ctx: Context, args: argparse.Namespace, kind: str, plural: str, fetch: Callable[[str | None], Reply]
) -> int:
    reply = all_pages(fetch, args.page_token) if args.all else fetch(args.page_token)
    if ctx.json:
        ctx.out(reply.raw)
        return 0
    items = reply.items
    if items:
        ctx.out(render.list_table(kind, items))
    else:
        ctx.note(f"no {plural} found")
    token = reply.next_page_token
    if token is not None:
        ctx.note(f"more {plural}: add --page-token {token}, or --all for every page")
    return 0


# ---- VPCs -------------------------------------------------------------------------------------------------


def vpc_create(args: argparse.Namespace, ctx: Context) -> int:
    with ctx.client() as client:
        _resource(ctx, client.create_vpc(args.name, args.cidr))
    return 0


def vpc_list(args: argparse.Namespace, ctx: Context) -> int:
    with ctx.client() as client:
        return _list(ctx, args, "vpc", "VPCs", lambda token: client.list_vpcs(limit=args.limit, page_token=token))


def vpc_show(args: argparse.Namespace, ctx: Context) -> int:
    with ctx.client() as client:
        _resource(ctx, client.get_vpc(args.id))
    return 0


def vpc_delete(args: argparse.Namespace, ctx: Context) -> int:
    with ctx.client() as client:
        client.delete_vpc(args.id)
    _done(ctx, f"deleted VPC {args.id}")
    return 0


# ---- subnets ----------------------------------------------------------------------------------------------


def subnet_create(args: argparse.Namespace, ctx: Context) -> int:
    with ctx.client() as client:
        _resource(ctx, client.create_subnet(args.vpc, args.name, args.cidr, segment=args.segment, vlan=args.vlan))
    return 0


def subnet_list(args: argparse.Namespace, ctx: Context) -> int:
    with ctx.client() as client:
        return _list(
            ctx,
            args,
            "subnet",
            "subnets",
            lambda token: client.list_subnets(vpc_id=args.vpc, limit=args.limit, page_token=token),
        )


def subnet_show(args: argparse.Namespace, ctx: Context) -> int:
    with ctx.client() as client:
        _resource(ctx, client.get_subnet(args.id))
    return 0


def subnet_delete(args: argparse.Namespace, ctx: Context) -> int:
    with ctx.client() as client:
        client.delete_subnet(args.id)
    _done(ctx, f"deleted subnet {args.id}")
    return 0


# ---- instances --------------------------------------------------------------------------------------------


def instance_register(args: argparse.Namespace, ctx: Context) -> int:
    with ctx.client() as client:
        _resource(ctx, client.register_instance(args.subnet, args.name, args.ip, args.mac))
    return 0


def instance_list(args: argparse.Namespace, ctx: Context) -> int:
    with ctx.client() as client:
        return _list(
            ctx,
            args,
            "instance",
            "instances",
            lambda token: client.list_instances(
                vpc_id=args.vpc, subnet_id=args.subnet, limit=args.limit, page_token=token
            ),
        )


def instance_show(args: argparse.Namespace, ctx: Context) -> int:
    with ctx.client() as client:
        _resource(ctx, client.get_instance(args.id))
    return 0


def instance_deregister(args: argparse.Namespace, ctx: Context) -> int:
    with ctx.client() as client:
        client.deregister_instance(args.id, force=args.force)
    _done(ctx, f"deregistered instance {args.id}")
    return 0


# ---- HAVIPs -----------------------------------------------------------------------------------------------


def havip_allocate(args: argparse.Namespace, ctx: Context) -> int:
    with ctx.client() as client:
        reply = client.allocate_havip(
            args.subnet,
            name=args.name,
            address=args.address,
            candidates=args.candidates or (),
            idempotency_key=args.idempotency_key,
        )
    if reply.replayed:
        ctx.note("idempotent replay: this is the HAVIP allocated earlier with the same Idempotency-Key")
    _resource(ctx, reply)
    return 0


def havip_list(args: argparse.Namespace, ctx: Context) -> int:
    with ctx.client() as client:
        return _list(
            ctx,
            args,
            "havip",
            "HAVIPs",
            lambda token: client.list_havips(
                vpc_id=args.vpc,
                subnet_id=args.subnet,
                state=args.state,
                address=args.address,
                limit=args.limit,
                page_token=token,
            ),
        )


def havip_show(args: argparse.Namespace, ctx: Context) -> int:
    with ctx.client() as client:
        _resource(ctx, client.get_havip(args.id))
    return 0


def havip_update(args: argparse.Namespace, ctx: Context) -> int:
    name: str | None = None if args.no_name else (args.name if args.name is not None else UNSET)
    candidates: list[str] = args.candidates if args.candidates is not None else UNSET
    if args.no_candidates:
        candidates = []
    if name is UNSET and candidates is UNSET:
        raise UsageError(
            "havip update: nothing to change (give --name, --no-name, --candidate or --no-candidates)"
        )
    with ctx.client() as client:
        _resource(ctx, client.update_havip(args.id, name=name, candidates=candidates, force=args.force))
    return 0


def havip_release(args: argparse.Namespace, ctx: Context) -> int:
    with ctx.client() as client:
        client.release_havip(args.id, force=args.force)
    _done(ctx, f"released HAVIP {args.id}")
    return 0


def havip_eip_associate(args: argparse.Namespace, ctx: Context) -> int:
    with ctx.client() as client:
        reply = client.associate_eip(args.id, address=args.address)
    _done(ctx, f"associated an EIP with HAVIP {args.id}", reply)
    return 0


def havip_eip_dissociate(args: argparse.Namespace, ctx: Context) -> int:
    with ctx.client() as client:
        reply = client.dissociate_eip(args.id)
    _done(ctx, f"dissociated the EIP of HAVIP {args.id}", reply)
    return 0


def havip_transitions(args: argparse.Namespace, ctx: Context) -> int:
    with ctx.client() as client:
        return _list(
            ctx,
            args,
            "transition",
            "transitions",
            lambda token: client.list_transitions(args.id, limit=args.limit, page_token=token),
        )


def claims_rejected(args: argparse.Namespace, ctx: Context) -> int:
    with ctx.client() as client:
        return _list(
            ctx,
            args,
            "rejected_claim",
            "rejected claims",
            lambda token: client.list_rejected_claims(havip_id=args.havip, limit=args.limit, page_token=token),
        )


# ---- watch ------------------------------------------------------------------------------------------------


def json_line(body: bytes) -> str | None:
    """The message body as one line of JSON (untouched when it already is one); None if it is not JSON."""
    try:
        text = body.decode("utf-8")
        decoded = json.loads(text)
    except (UnicodeDecodeError, ValueError):
        return None
    text = text.strip()
    if "\n" in text or "\r" in text:
        return json.dumps(decoded, ensure_ascii=False, separators=(",", ":"))
    return text


def watch(args: argparse.Namespace, ctx: Context) -> int:
    from havipctl import watch as stream  # aio-pika is loaded only for this command

    options = stream.WatchOptions(
        amqp_urls=ctx.config.amqp_urls,
        amqp_ca_file=ctx.config.amqp_ca_file,
        exchange=stream.exchange_name(ctx.config.amqp_prefix),
        routing_keys=tuple(args.keys) or (stream.ALL_EVENTS,),
        count=args.count,
        timeout=args.timeout,
        connect_timeout=ctx.config.connect_timeout,
    )

    def emit(body: bytes, routing_key: str) -> bool:
        line = json_line(body)
        if line is None:
            ctx.note(f"skipped a message that is not JSON ({len(body)} bytes, routing key {routing_key!r})")
            return False
        if not ctx.json:
            decoded = json.loads(line)
            if not isinstance(decoded, dict):
                ctx.note(f"skipped a message that is not an event envelope (routing key {routing_key!r})")
                return False
            line = render.event_line(decoded)
        ctx.out(line)
        return True

    result = stream.run(options, emit, ready=ctx.note)
    if result.outcome is stream.Outcome.TIMED_OUT and args.count is not None:
        raise WatchTimedOut(
            f"watch: --timeout {args.timeout:g} s ran out after {result.received} of {args.count} events"
        )
    return 0
