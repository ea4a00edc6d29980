"""An example consumer of `havip.binding.changed` (see README.md in this directory).

It owns a durable queue bound to the routing key, handles one message at a time in arrival order, and
acknowledges a message only after its work is done. Delivery is at-least-once, so it drops event ids it has
already seen; `sequence` is strictly increasing per HAVIP, so it also drops stale transitions and notices gaps
(a missed event: read `GET /v1/havips/{id}/transitions` to repair). A message it can never process is rejected
without requeue and lands in the dead-letter queue.

Each outcome is printed as one JSON line. Configuration: HAVIP_AMQP_URL, HAVIP_AMQP_PREFIX (prepended to every
exchange and queue name, as the services do).

    python docs/events/example_consumer.py --queue my-app.bindings --count 10 --timeout 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

ROUTING_KEY = "havip.binding.changed"
SCHEMA_VERSION = 1


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


class Consumer:
    def __init__(self, api_url: str, seen_capacity: int) -> None:
        self.api_url = api_url.rstrip("/")
        self.seen = SeenIds(seen_capacity)
        self.last_sequence: dict[str, int] = {}
        # The example's "work": the current holder of every HAVIP it has heard of.
        self.holders: dict[str, str | None] = {}

    def handle(self, body: bytes) -> dict[str, Any]:
        """Apply one event; return what happened. Raises ValueError for a message that can never be processed."""
        try:
            event = json.loads(body)
            event_id = str(event["event_id"])
            data = event["data"]
            havip_id = str(data["havip_id"])
            sequence = int(data["sequence"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"not a {ROUTING_KEY} event: {exc!r}") from exc
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
        current = data.get("current")
        self.holders[havip_id] = current["mac"] if current else None
        self.last_sequence[havip_id] = sequence
        self.seen.add(event_id)
        return {**outcome, "sequence": sequence, "current_mac": self.holders[havip_id]}


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


async def consume(args: argparse.Namespace) -> int:
    prefix = os.environ.get("HAVIP_AMQP_PREFIX", "")
    connection = await aio_pika.connect_robust(
        os.environ.get("HAVIP_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
        client_properties={"connection_name": f"{prefix}{args.queue}"},
    )
    consumer = Consumer(os.environ.get("HAVIP_API_URL", "http://127.0.0.1:8080"), args.seen_capacity)
    handled = 0
    async with connection:
        channel = await connection.channel()
        # Order matters per HAVIP, so messages are handled one by one; a small prefetch only saves round trips.
        await channel.set_qos(prefetch_count=16)
        exchange = await channel.declare_exchange(
            f"{prefix}havip.events", aio_pika.ExchangeType.TOPIC, durable=True
        )
        dead_letters = await channel.declare_exchange(
            f"{prefix}havip.dlx", aio_pika.ExchangeType.TOPIC, durable=True
        )
        dead = await channel.declare_queue(f"{prefix}havip.dead", durable=True)
        await dead.bind(dead_letters, routing_key="#")
        queue = await channel.declare_queue(
            f"{prefix}{args.queue}", durable=True, arguments={"x-dead-letter-exchange": f"{prefix}havip.dlx"}
        )
        await queue.bind(exchange, routing_key=ROUTING_KEY)
        emit({"outcome": "ready", "queue": queue.name})

        async def run() -> None:
            nonlocal handled
            async with queue.iterator() as messages:
                async for message in messages:
                    await settle(consumer, message)
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


async def settle(consumer: Consumer, message: AbstractIncomingMessage) -> None:
    try:
        record = consumer.handle(message.body)
    except ValueError as exc:
        # Never processable: to the dead-letter exchange, and go on with the next message.
        await message.reject(requeue=False)
        emit({"outcome": "dead_lettered", "message_id": message.message_id, "error": str(exc)})
        return
    # Acknowledge only after the work is done: a crash before this line means a redelivery, not a loss.
    await message.ack()
    emit(record)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Example consumer of havip.binding.changed events.")
    parser.add_argument("--queue", default="example-consumer.bindings", help="queue name (after the prefix)")
    parser.add_argument("--count", type=int, default=None, help="stop after handling N messages")
    parser.add_argument("--timeout", type=float, default=None, help="stop after S seconds")
    parser.add_argument("--seen-capacity", type=int, default=100_000, help="event ids remembered")
    return asyncio.run(consume(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
