"""An example consumer of `havip.binding.changed` (see README.md in this directory).

It owns a durable queue bound to the routing key, handles one message at a time in arrival order, and
acknowledges a message only after its work is done. Delivery is at-least-once, so it drops event ids it has
already seen; `sequence` is strictly increasing per HAVIP, so it also drops stale transitions and notices gaps
(a missed event: read `GET /v1/havips/{id}/transitions` to repair). A message it can never process is rejected
without requeue and lands in its own dead-letter queue, `<queue>.dead` (through the fanout exchange `<queue>.dlx`).

It runs as a broker user of its own that may publish nothing: one that may declare, bind and read only queues and
exchanges named after it (`consumer-<name>.…`, given by `scripts/rabbitmq-users.sh --consumer <name>`;
docs/operations.md), and read `havip.events`, which the services' `migrate` declares — so name its queue
`consumer-<name>.<what>`. (A user that may declare `havip.events` declares it, as any other user of it does.)

Its work, by default, is to remember each HAVIP's current holder. With `--program-neighbour NETNS IFACE` it does
what a cloud network does with the event: it makes the HAVIP's address resolve to the new holder's MAC in the
network namespace NETNS (`ip -n NETNS neigh replace ADDRESS lladdr MAC dev IFACE nud permanent`; the entry is
removed while the HAVIP is unbound), so that a client there sends to whoever the platform bound the address to —
whatever ARP says. A failed `ip` call is work not done: the message is returned to the queue and retried.

Each outcome is printed as one JSON line. Configuration: HAVIP_AMQP_URL (one node), HAVIP_AMQP_CA_FILE (the CA an
amqps:// node is verified against, chain and host name; without it the system's CAs), HAVIP_AMQP_PREFIX (prepended
to every exchange and queue name, as the services do).

    python docs/events/example_consumer.py --queue consumer-my-app.bindings --count 10 --timeout 30
    python docs/events/example_consumer.py --queue consumer-lab.neighbours --program-neighbour client-ns eth0
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import re
import ssl
import sys
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage, AbstractRobustConnection

ROUTING_KEY = "havip.binding.changed"
SCHEMA_VERSION = 1
MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
RETRY_DELAY_S = 1.0  # before a message whose work failed is returned to the queue

# The work done for one applied transition: (address, holder's MAC or None) -> details for the printed line.
Work = Callable[[str, "str | None"], Awaitable[dict[str, Any]]]


class NoExchange(RuntimeError):
    """The event exchange is not there, and this user may not declare it."""


class WorkFailed(RuntimeError):
    """The work could not be done this time (it may succeed later): do not acknowledge, retry."""


def now() -> str:
    """RFC 3339 with microseconds, as the services write times."""
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class SeenIds:
    """The most recent event ids, bounded: redeliveries arrive soon after the original, so a window suffices.
    (A consumer with a database records ids, or the last sequence per HAVIP, in the transaction of its work.)"""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, event_id: str) -> bool:
        return event_id in self._ids

    def add(self, event_id: str) -> None:
        self._ids[event_id] = None
        if len(self._ids) > self._capacity:
            self._ids.popitem(last=False)


class NeighbourProgrammer:
    """The work of `--program-neighbour`: the address resolves to its holder's MAC in `netns`, permanently, so that
    no ARP announcement can change it; no entry while nobody holds it."""

    def __init__(self, netns: str, iface: str) -> None:
        self.netns = netns
        self.iface = iface

    async def __call__(self, address: str, mac: str | None) -> dict[str, Any]:
        if mac is not None:
            argv = ["neigh", "replace", address, "lladdr", mac, "dev", self.iface, "nud", "permanent"]
        else:
            argv = ["neigh", "del", address, "dev", self.iface]
        process = await asyncio.create_subprocess_exec(
            "ip", "-n", self.netns, *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        _, stderr = await process.communicate()
        already_absent = mac is None and b"No such file" in stderr
        if process.returncode != 0 and not already_absent:
            raise WorkFailed(f"ip -n {self.netns} {' '.join(argv)}: {stderr.decode(errors='replace').strip()}")
        return {"neighbour": {"netns": self.netns, "address": address, "lladdr": mac, "programmed_at": now()}}


class Consumer:
    def __init__(self, api_url: str, seen_capacity: int, work: Work | None = None) -> None:
        self.api_url = api_url.rstrip("/")
        self.seen = SeenIds(seen_capacity)
        self.last_sequence: dict[str, int] = {}
        # What the example always keeps: the current holder of every HAVIP it has heard of.
        self.holders: dict[str, str | None] = {}
        self.work = work

    async def handle(self, body: bytes) -> dict[str, Any]:
        """Apply one event; return what happened. Raises ValueError for a message that can never be processed,
        WorkFailed when the work failed (nothing is recorded then: the redelivery is applied again)."""
        try:
            event = json.loads(body)
            event_id = str(event["event_id"])
            data = event["data"]
            havip_id = str(data["havip_id"])
            sequence = int(data["sequence"])
            address = str(ipaddress.IPv4Address(data["address"]))
            current = data.get("current")
            mac = None if current is None else str(current["mac"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"not a {ROUTING_KEY} event: {exc!r}") from exc
        if mac is not None and not MAC.fullmatch(mac):
            raise ValueError(f"not a MAC address: {mac!r}")
        if event.get("type") != ROUTING_KEY or event.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(
                f"unexpected type or schema_version: {event.get('type')!r} {event.get('schema_version')!r}"
            )

        if event_id in self.seen:
            return {"outcome": "duplicate", "event_id": event_id, "havip_id": havip_id, "sequence": sequence}
        last = self.last_sequence.get(havip_id)
        if last is not None and sequence <= last:
            # Another event id carrying a transition already applied (e.g. republished): nothing to do.
            self.seen.add(event_id)
            return {"outcome": "stale", "event_id": event_id, "havip_id": havip_id, "sequence": sequence}
        outcome: dict[str, Any] = {"outcome": "applied", "event_id": event_id, "havip_id": havip_id}
        if last is not None and sequence > last + 1:
            # Transitions last+1 … sequence-1 were missed; the allocator's history has them all.
            outcome["gap"] = {
                "missing": list(range(last + 1, sequence)),
                "repair": f"{self.api_url}/v1/havips/{havip_id}/transitions",
            }
        # A gap does not hold the work back: this event names the holder now, which is what the work needs.
        done = await self.work(address, mac) if self.work is not None else {}
        self.holders[havip_id] = mac
        self.last_sequence[havip_id] = sequence
        self.seen.add(event_id)
        return {**outcome, "sequence": sequence, "current_mac": mac, **done}


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


async def event_exchange(connection: AbstractRobustConnection, name: str) -> AbstractExchange:
    """The services' event exchange: declared (idempotent) by a user that may, else only looked up — a consumer's
    own user may not declare it, and needs not: the services' `migrate` did."""
    channel = await connection.channel()
    try:
        return await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)
    except aiormq.exceptions.ChannelAccessRefused:
        await channel.close()  # the broker closed it; closed by us, a robust channel is not reopened
    channel = await connection.channel()
    try:
        return await channel.declare_exchange(name, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        raise NoExchange(
            f"RabbitMQ has no exchange {name!r}, and this user may not declare it: run the services' migrate first"
        ) from None


async def consume(args: argparse.Namespace) -> int:
    prefix = os.environ.get("HAVIP_AMQP_PREFIX", "")
    ca_file = os.environ.get("HAVIP_AMQP_CA_FILE")
    connection = await aio_pika.connect_robust(
        os.environ.get("HAVIP_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
        # Used for amqps:// only; verifies the chain against the CA and the node's host name.
        ssl_context=ssl.create_default_context(cafile=ca_file) if ca_file else None,
        client_properties={"connection_name": f"{prefix}{args.queue}"},
    )
    work = NeighbourProgrammer(*args.program_neighbour) if args.program_neighbour else None
    consumer = Consumer(os.environ.get("HAVIP_API_URL", "http://127.0.0.1:8080"), args.seen_capacity, work)
    handled = 0
    async with connection:
        try:
            exchange = await event_exchange(connection, f"{prefix}havip.events")
        except NoExchange as exc:
            print(exc, file=sys.stderr)
            return 2
        channel = await connection.channel()
        # Order matters per HAVIP, so messages are handled one by one; a small prefetch only saves round trips.
        await channel.set_qos(prefetch_count=16)
        # Dead letters of its own: RabbitMQ lets a queue dead-letter only to an exchange its user may publish to,
        # and this one publishes nowhere else.
        name = f"{prefix}{args.queue}"
        dead_letters = await channel.declare_exchange(f"{name}.dlx", aio_pika.ExchangeType.FANOUT, durable=True)
        dead = await channel.declare_queue(f"{name}.dead", durable=True)
        await dead.bind(dead_letters)
        queue = await channel.declare_queue(
            name, durable=True, arguments={"x-dead-letter-exchange": dead_letters.name}
        )
        await queue.bind(exchange, routing_key=ROUTING_KEY)
        emit({"outcome": "ready", "queue": queue.name})

        async def run() -> None:
            nonlocal handled
            async with queue.iterator() as messages:
                async for message in messages:
                    if not await settle(consumer, message):
                        continue  # returned to the queue: it comes again
                    handled += 1
                    if args.count is not None and handled >= args.count:
                        return

        try:
            await asyncio.wait_for(run(), timeout=args.timeout)
        except TimeoutError:
            emit({"outcome": "timeout", "handled": handled})
            # Stopping on time is the plan without --count; with it, fewer messages than expected is a failure.
            return 2 if args.count is not None else 0
    return 0


async def settle(consumer: Consumer, message: AbstractIncomingMessage) -> bool:
    """Handle one message; False when it went back to the queue."""
    received_at = now()
    try:
        record = await consumer.handle(message.body)
    except ValueError as exc:
        # Never processable: to the dead-letter exchange, and go on with the next message.
        await message.reject(requeue=False)
        emit({"outcome": "dead_lettered", "message_id": message.message_id, "error": str(exc)})
        return True
    except WorkFailed as exc:
        # Maybe possible later: back to the queue (after a pause, not in a hot loop).
        emit({"outcome": "work_failed", "message_id": message.message_id, "error": str(exc)})
        await asyncio.sleep(RETRY_DELAY_S)
        await message.nack(requeue=True)
        return False
    # Acknowledge only after the work is done: a crash before this line means a redelivery, not a loss.
    await message.ack()
    emit({**record, "received_at": received_at})
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Example consumer of havip.binding.changed events.")
    parser.add_argument(
        "--queue",
        default="consumer-example.bindings",
        help="queue name (after the prefix): consumer-<name>.<what>",
    )
    parser.add_argument(
        "--count", type=int, default=None, help="stop after N messages (acknowledged or dead-lettered)"
    )
    parser.add_argument("--timeout", type=float, default=None, help="stop after S seconds")
    parser.add_argument("--seen-capacity", type=int, default=100_000, help="event ids remembered")
    parser.add_argument(
        "--program-neighbour",
        nargs=2,
        metavar=("NETNS", "IFACE"),
        help="make each HAVIP's address resolve to its holder's MAC in network namespace NETNS, on IFACE",
    )
    args = parser.parse_args(argv)
    if args.program_neighbour and not os.path.exists(f"/var/run/netns/{args.program_neighbour[0]}"):
        parser.error(f"no network namespace {args.program_neighbour[0]!r} (ip netns list)")
    return asyncio.run(consume(args))


if __name__ == "__main__":
    sys.exit(main())
