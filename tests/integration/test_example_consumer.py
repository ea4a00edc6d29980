"""docs/events/example_consumer.py against the real RabbitMQ: it applies transitions in order, drops a
redelivered event, reports a gap in `sequence` with the history to read, dead-letters a message it cannot
process (to a dead-letter queue of its own) and goes on, and stops by itself after --count messages; with
--program-neighbour it programs a lab namespace's neighbour table and retries work that failed. Under a consumer's
own broker user: tests/integration/test_broker_permissions.py."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from datetime import UTC, datetime
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from shared.events import BindingChanged, Envelope, Holder, envelope
from shared.messaging import Broker
from shared.settings import CommonSettings
from tests.lab import Lab
from tests.waiting import eventually

ROOT = Path(__file__).resolve().parents[2]
CONSUMER = ROOT / "docs" / "events" / "example_consumer.py"
DEADLINE_S = 60.0  # generous: CI shares two cores with other test runs


def transition(havip_id: uuid.UUID, sequence: int, mac: str | None) -> Envelope:
    return envelope(
        "havip.binding.changed",
        BindingChanged(
            havip_id=havip_id,
            address=IPv4Address("192.0.2.10"),
            previous=None,
            current=None if mac is None else Holder(instance_id=uuid.uuid4(), mac=mac),
            captured_at=datetime.now(UTC),
            committed_at=datetime.now(UTC),
            watcher_id="watcher-1",
            sequence=sequence,
            reason="claim" if mac is not None else "release",
        ),
        source="test",
    )


async def read_line(process: asyncio.subprocess.Process) -> dict[str, Any]:
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), timeout=DEADLINE_S)
    assert line, "the consumer ended before printing what was expected"
    record: dict[str, Any] = json.loads(line)
    return record


async def test_example_consumer_drops_duplicates_reports_gaps_and_dead_letters_poison(amqp_url: str) -> None:
    prefix = f"example-{uuid.uuid4().hex[:8]}."
    settings = CommonSettings(amqp_url=amqp_url, amqp_prefix=prefix)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(CONSUMER),
        "--queue",
        "bindings",
        "--count",
        "5",
        "--timeout",
        str(DEADLINE_S),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "HAVIP_AMQP_URL": amqp_url, "HAVIP_AMQP_PREFIX": prefix},
        start_new_session=True,
    )
    broker = Broker(settings, "test")
    try:
        ready = await read_line(process)  # the queue is bound: nothing published from now on is lost
        assert ready == {"outcome": "ready", "queue": f"{prefix}bindings"}

        await broker.connect()
        havip = uuid.uuid4()
        first = transition(havip, 1, "02:00:c0:00:02:0a")
        second = transition(havip, 2, "02:00:c0:00:02:0b")
        after_gap = transition(havip, 4, "02:00:c0:00:02:0a")
        for env in (first, second, second, after_gap):  # `second` twice: a redelivery
            await broker.publish(env)
        await broker.publish_encoded("havip.binding.changed", b"{not json", uuid.uuid4())

        records = [await read_line(process) for _ in range(5)]
        assert await asyncio.wait_for(process.wait(), timeout=DEADLINE_S) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await broker.close()

    outcomes = [(r["outcome"], r.get("event_id"), r.get("sequence")) for r in records]
    assert outcomes == [
        ("applied", str(first.event_id), 1),
        ("applied", str(second.event_id), 2),
        ("duplicate", str(second.event_id), 2),
        ("applied", str(after_gap.event_id), 4),
        ("dead_lettered", None, None),
    ]
    assert "gap" not in records[1]
    assert records[1]["current_mac"] == "02:00:c0:00:02:0b"
    assert records[3]["gap"]["missing"] == [3]
    assert records[3]["gap"]["repair"].endswith(f"/v1/havips/{havip}/transitions")

    # The poison message was rejected to the consumer's own dead-letter queue, not requeued or lost.
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        dead = await channel.declare_queue(f"{prefix}bindings.dead", durable=True, passive=True)
        dead_bodies: list[bytes] = []

        async def one_dead_letter() -> bool:
            message = await dead.get(no_ack=True, fail=False)
            if message is not None:
                dead_bodies.append(message.body)
            return bool(dead_bodies)

        await eventually(one_dead_letter, timeout=DEADLINE_S, what="the poison message in the dead-letter queue")
        assert dead_bodies == [b"{not json"]
    finally:
        await connection.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="programming a lab namespace needs root")
async def test_example_consumer_programs_the_neighbour_entry_and_retries_work_that_failed(amqp_url: str) -> None:
    """--program-neighbour: each transition sets the address's permanent entry to the holder's MAC in the
    namespace, a release removes it; when `ip` fails the message is not acknowledged and is applied on retry."""
    prefix = f"example-{uuid.uuid4().hex[:8]}."
    settings = CommonSettings(amqp_url=amqp_url, amqp_prefix=prefix)
    broker = Broker(settings, "test")
    with Lab("192.0.2.0/24") as lab:
        client = lab.add_host("client", "192.0.2.21")
        # The interface it is told to program does not exist yet: the first attempt must fail and be retried.
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(CONSUMER),
            *("--queue", "neighbours", "--count", "3", "--timeout", str(DEADLINE_S)),
            *("--program-neighbour", client.netns, "lan1"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "HAVIP_AMQP_URL": amqp_url, "HAVIP_AMQP_PREFIX": prefix},
            start_new_session=True,
        )
        try:
            assert (await read_line(process))["outcome"] == "ready"
            await broker.connect()
            havip = uuid.uuid4()
            first = transition(havip, 1, "02:00:c0:00:02:0a")
            await broker.publish(first)
            failed = await read_line(process)
            assert failed["outcome"] == "work_failed"
            assert "lan1" in failed["error"]

            client.iproute("link", "add", "lan1", "type", "veth", "peer", "name", "lan1peer")
            client.iproute("link", "set", "dev", "lan1", "up")
            applied = await read_line(process)
            assert (applied["outcome"], applied["event_id"]) == ("applied", str(first.event_id))
            assert applied["neighbour"]["lladdr"] == "02:00:c0:00:02:0a"

            def entry() -> str:
                return client.iproute("neigh", "show", "192.0.2.10", "dev", "lan1").stdout.strip()

            assert entry() == "192.0.2.10 lladdr 02:00:c0:00:02:0a PERMANENT"
            second = transition(havip, 2, "02:00:c0:00:02:0b")
            await broker.publish(second)
            assert (await read_line(process))["neighbour"]["lladdr"] == "02:00:c0:00:02:0b"
            assert entry() == "192.0.2.10 lladdr 02:00:c0:00:02:0b PERMANENT"

            await broker.publish(transition(havip, 3, None))  # released: nobody holds it
            released = await read_line(process)
            assert (released["outcome"], released["current_mac"], released["neighbour"]["lladdr"]) == (
                "applied",
                None,
                None,
            )
            assert entry() == ""
            assert await asyncio.wait_for(process.wait(), timeout=DEADLINE_S) == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            await broker.close()
