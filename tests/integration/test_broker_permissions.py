"""Each process its own RabbitMQ user, with only the rights it needs (scripts/rabbitmq-users.sh;
docs/operations.md, "Broker users and their rights"), against the real broker: in a virtual host of its own, with
the users the script makes, `migrate` declares everything; the binding service and the allocator run as processes
under their users, a watcher's user publishes claims, and the example consumer under a consumer's user sees the
HAVIP move — while each user is refused what its process must never do, and a right missing is said in one line of
words."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import httpx
import pytest
from yarl import URL

from shared import events
from shared.messaging import Broker, BrokerAccessRefused, Delivery
from shared.periodic import run_periodically
from shared.settings import CommonSettings
from tests.conftest import AMQP_BASE, RUN_ID
from tests.ports import free_port
from tests.sandbox import temporary_vhost
from tests.waiting import eventually

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "rabbitmq-users.sh"
EXAMPLE_CONSUMER = ROOT / "docs" / "events" / "example_consumer.py"
DEADLINE_S = 60.0  # generous: two shared cores
PREFIX = "p.x-"  # a deployment prefix with a regular expression's metacharacter in it
SEGMENT = "lab"
CONSUMER = "demo"
PARTITIONS = 2
ROLES = ("migrate", "allocator", "binding", f"watcher-{SEGMENT}", f"consumer-{CONSUMER}")
TOKEN = secrets.token_urlsafe(24)


def rabbitmqctl(*args: str) -> str:
    done = subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True, timeout=60)
    return done.stdout


def password_variable(role: str) -> str:
    return f"HAVIP_RABBITMQ_{role.upper().replace('-', '_').replace('.', '_')}_PASSWORD"


@dataclass
class Users:
    """The users scripts/rabbitmq-users.sh made on a virtual host of the test's own."""

    guest_url: str  # the virtual host as guest (every right: the test's own look at the broker)
    vhost: str
    user_prefix: str
    passwords: dict[str, str]

    def name(self, role: str) -> str:
        return f"{self.user_prefix}{role}"

    def url(self, role: str) -> str:
        return str(URL(self.guest_url).with_user(self.name(role)).with_password(self.passwords[role]))

    def settings(self, role: str, **fields: Any) -> CommonSettings:
        return CommonSettings(amqp_url=self.url(role), amqp_prefix=PREFIX, partitions=PARTITIONS, **fields)

    def script(self, *args: str, passwords: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HAVIP_")}
        env["HAVIP_RABBITMQ_USER_PREFIX"] = self.user_prefix
        env.update({password_variable(role): pw for role, pw in (passwords or {}).items()})
        return subprocess.run(
            ["sh", str(SCRIPT), "--segment", SEGMENT, "--consumer", CONSUMER, *args, self.vhost, PREFIX],
            env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip


@pytest.fixture(scope="module")
def users() -> Iterator[Users]:
    user_prefix = f"havip-test-{RUN_ID}-{uuid.uuid4().hex[:4]}-"
    with temporary_vhost(AMQP_BASE, f"havip-test-users-{RUN_ID}-{uuid.uuid4().hex[:6]}") as guest_url:
        made = Users(guest_url, URL(guest_url).path[1:], user_prefix, {r: secrets.token_hex(16) for r in ROLES})
        try:
            done = made.script(passwords=made.passwords)
            assert done.returncode == 0, done.stderr
            assert done.stdout == ""  # no password printed: every one was given
            yield made
        finally:
            for user in rabbitmqctl("list_users", "--no-table-headers").splitlines():
                if user.startswith(user_prefix):
                    rabbitmqctl("delete_user", user.split("\t")[0])


class Process:
    """A service (or the example consumer) started as an operator would: its own environment, its lines read."""

    def __init__(self, proc: asyncio.subprocess.Process, json_lines: bool = True) -> None:
        self.proc = proc
        self.json_lines = json_lines
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._reading = asyncio.ensure_future(self._read())

    @classmethod
    async def start(cls, argv: list[str], env: dict[str, str], *, json_lines: bool = True) -> Process:
        base = {k: v for k, v in os.environ.items() if not k.startswith("HAVIP_")}
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=ROOT, env={**base, "PYTHONUNBUFFERED": "1", **env},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        return cls(proc, json_lines)

    @classmethod
    async def service(cls, module: str, env: dict[str, str], *args: str) -> Process:
        return await cls.start([sys.executable, "-m", module, *args], env)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while raw := await self.proc.stdout.readline():
            line = raw.decode(errors="replace")
            self.raw.append(line)
            if self.json_lines or line.startswith("{"):
                self.lines.append(json.loads(line))  # a service prints JSON lines only: never a trace

    def said(self, words: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if words in line.get("msg", json.dumps(line))]

    async def wait_for(self, words: str) -> dict[str, Any]:
        async def seen() -> bool:
            if self._reading.done():
                self._reading.result()
                if not self.said(words):
                    raise AssertionError(f"ended without saying {words!r}: {''.join(self.raw)[-3000:]}")
            return bool(self.said(words))

        try:
            await eventually(seen, timeout=DEADLINE_S, interval=0.1, what=words)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}: {''.join(self.raw)[-3000:]}") from None
        return self.said(words)[0]

    async def wait(self) -> int:
        async with asyncio.timeout(DEADLINE_S):
            status = await self.proc.wait()
            await self._reading
        return status

    async def terminate(self) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        return await self.wait()

    def kill(self) -> None:
        if self.proc.returncode is None:
            os.killpg(self.proc.pid, signal.SIGKILL)


def service_env(users: Users, role: str, database_url: str, **extra: str) -> dict[str, str]:
    return {
        "HAVIP_AMQP_URL": users.url(role),
        "HAVIP_AMQP_PREFIX": PREFIX,
        "HAVIP_PARTITIONS": str(PARTITIONS),
        "HAVIP_DATABASE_URL": database_url,
        "HAVIP_METRICS_PORT": "0",
        **extra,
    }


@pytest.fixture(scope="module")
async def migrated(users: Users, database_url: str) -> Users:
    """Both services' `migrate` run as the migrate user: every exchange and queue declared."""
    for service in ("allocator", "binding"):
        process = await Process.service(
            f"services.{service}", service_env(users, "migrate", database_url), "migrate"
        )
        assert await process.wait() == 0, "".join(process.raw)
    return users


# ---- what each user may do: the services' own code paths under their own users --------------------------------


async def test_the_services_and_a_consumer_work_each_under_its_own_user(
    migrated: Users, database_url: str
) -> None:
    users = migrated
    api_port = free_port()
    allocator = await Process.service(
        "services.allocator",
        service_env(users, "allocator", database_url, HAVIP_API_TOKEN=TOKEN, HAVIP_PORT=str(api_port)),
    )
    binding = await Process.service(
        "services.binding",
        service_env(
            users, "binding", database_url,
            HAVIP_REPLICA_ID="permissions", HAVIP_WATCHER_USER_TEMPLATE=users.name("watcher-{segment}"),
        ),
    )  # fmt: skip
    consumer = await Process.start(
        [sys.executable, str(EXAMPLE_CONSUMER), "--queue", f"consumer-{CONSUMER}.bindings", "--count", "2"],
        {"HAVIP_AMQP_URL": users.url(f"consumer-{CONSUMER}"), "HAVIP_AMQP_PREFIX": PREFIX},
        json_lines=False,
    )
    watcher = Broker(users.settings(f"watcher-{SEGMENT}"), "arp_watcher")
    try:
        await allocator.wait_for("allocator ready")
        await binding.wait_for("binding service running")
        await consumer.wait_for('"outcome": "ready"')
        for process, role in ((allocator, "allocator"), (binding, "binding")):
            assert process.said(
                f"user '{users.name(role)}' may not declare the exchanges: checking that they exist"
            )
        await watcher.connect()

        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{api_port}/v1", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
        ) as api:
            vpc = await created(api.post("/vpcs", json={"name": "rights", "cidr": "192.0.2.0/24"}))
            subnet = await created(
                api.post(
                    "/subnets",
                    json={"vpc_id": vpc["id"], "name": "lab", "cidr": "192.0.2.0/24", "segment": SEGMENT},
                )
            )
            mac = "02:00:c0:00:02:0b"
            instance = await created(
                api.post(
                    "/instances",
                    json={"subnet_id": subnet["id"], "name": "cvm", "private_ip": "192.0.2.11", "mac": mac},
                )
            )
            havip = await created(api.post("/havips", json={"subnet_id": subnet["id"], "name": "vip"}))

            # The watcher's user publishes claims (until the binding, which learns the inventory from the
            # allocator's events meanwhile, has bound the HAVIP) and a heartbeat.
            await watcher.publish(heartbeat())

            async def bound() -> bool:
                shown = (await api.get(f"/havips/{havip['id']}")).json()
                if shown["state"] == "BOUND":
                    return bool(shown["bound_instance_id"] == instance["id"])
                await watcher.publish(claim(havip["address"], mac))
                return False

            await eventually(bound, timeout=DEADLINE_S, interval=0.5, what="the HAVIP bound, shown by the API")

        # The example consumer, under its user, got the binding's event; a message it cannot read goes to its own
        # dead-letter queue.
        await consumer.wait_for('"outcome": "applied"')
        [applied] = [json.loads(line) for line in consumer.raw if '"outcome": "applied"' in line]
        assert applied["current_mac"] == mac
        await publish_as_guest(users, f"{PREFIX}consumer-{CONSUMER}.bindings", b"{not json")
        assert await consumer.wait() == 0, "".join(consumer.raw)
        assert await messages_in(users, f"{PREFIX}consumer-{CONSUMER}.bindings.dead") == 1
    finally:
        await watcher.close()
        statuses = [await process.terminate() for process in (allocator, binding)]
        for process in (allocator, binding, consumer):
            process.kill()
    assert statuses == [0, 0]
    for process in (allocator, binding):
        problems = [line["msg"] for line in process.lines if line["level"] in ("WARNING", "ERROR")]
        assert not [p for p in problems if "RabbitMQ refused" in p or "RabbitMQ has no" in p], problems


async def created(request: Awaitable[httpx.Response]) -> dict[str, Any]:
    response = await request
    assert response.status_code in (200, 201), response.text
    body: dict[str, Any] = response.json()
    return body


def claim(address: str, mac: str) -> events.Envelope:
    observed = events.ObservedClaim(
        claim_id=uuid.uuid4(), kind="garp_request", sender_mac=mac, eth_src=mac,
        sender_ip=IPv4Address(address), target_ip=IPv4Address(address), captured_at=time.time_ns(),
    )  # fmt: skip
    data = events.ClaimsObserved(watcher_id="w-lab", interface="lab0", segment=SEGMENT, claims=[observed])
    return events.envelope(events.CLAIMS_EVENT, data, "arp_watcher")


def heartbeat() -> events.Envelope:
    data = events.WatcherHeartbeat(
        watcher_id="w-lab", interface="lab0", segment=SEGMENT, interval_s=5.0, started_at=datetime.now(UTC),
        sequence=1, kernel_drops=0, claims_published=0,
    )  # fmt: skip
    return events.envelope(events.WATCHER_HEARTBEAT_EVENT, data, "arp_watcher")


def vpc_created() -> events.Envelope:
    return events.envelope("vpc.created", events.VpcData(id=uuid.uuid4(), name="x", cidr="192.0.2.0/24"), "t")


async def publish_as_guest(users: Users, queue: str, body: bytes) -> None:
    connection = await aio_pika.connect(users.guest_url)
    try:
        channel = await connection.channel()
        await channel.default_exchange.publish(aio_pika.Message(body), routing_key=queue)
    finally:
        await connection.close()


async def messages_in(users: Users, queue: str) -> int:
    connection = await aio_pika.connect(users.guest_url)
    try:
        count = 0

        async def arrived() -> bool:
            nonlocal count
            declared = await (await connection.channel()).declare_queue(queue, passive=True)
            count = declared.declaration_result.message_count or 0
            return count > 0

        await eventually(arrived, timeout=DEADLINE_S, what=f"a message in {queue}")
        return count
    finally:
        await connection.close()


# ---- what each user may not do ---------------------------------------------------------------------------------

Operation = Callable[[aio_pika.abc.AbstractChannel], Awaitable[object]]


def declare_exchange(name: str) -> Operation:
    return lambda channel: channel.declare_exchange(PREFIX + name, aio_pika.ExchangeType.TOPIC, durable=True)


def declare_queue(name: str, dead_letters: str | None = None) -> Operation:
    arguments: dict[str, Any] | None = {"x-dead-letter-exchange": PREFIX + dead_letters} if dead_letters else None
    return lambda channel: channel.declare_queue(PREFIX + name, durable=True, arguments=arguments)


def consume(queue: str) -> Operation:
    async def operation(channel: aio_pika.abc.AbstractChannel) -> object:
        declared = await channel.declare_queue(PREFIX + queue, passive=True)  # takes no right
        return await declared.get(fail=False)

    return operation


def bind(queue: str, exchange: str, key: str) -> Operation:
    async def operation(channel: aio_pika.abc.AbstractChannel) -> object:
        declared = await channel.declare_queue(PREFIX + queue, passive=True)
        return await declared.bind(PREFIX + exchange, routing_key=key)

    return operation


def publish(exchange: str, key: str) -> Operation:
    async def operation(channel: aio_pika.abc.AbstractChannel) -> object:
        target = channel.default_exchange if exchange == "" else await channel.get_exchange(PREFIX + exchange)
        message = aio_pika.Message(b"{}")
        return await target.publish(message, routing_key=PREFIX + key if exchange == "" else key, timeout=10)

    return operation


# (role, what it tries, the operation): RabbitMQ refuses each (ACCESS_REFUSED).
REFUSED: list[tuple[str, str, Operation]] = [
    (f"watcher-{SEGMENT}", "declare the event exchange", declare_exchange("havip.events")),
    (f"watcher-{SEGMENT}", "declare a queue", declare_queue("watcher.own")),
    (f"watcher-{SEGMENT}", "read a partition's queue", consume("binding.partition.0")),
    (f"watcher-{SEGMENT}", "read the allocator's queue", consume("allocator.events")),
    (f"watcher-{SEGMENT}", "publish to the dead-letter exchange", publish("havip.dlx", "x")),
    (f"watcher-{SEGMENT}", "publish straight to a queue", publish("", "binding.partition.0")),
    (f"watcher-{SEGMENT}", "publish a binding's event", publish("havip.events", "havip.binding.changed")),
    (f"watcher-{SEGMENT}", "publish an allocator's event", publish("havip.events", "havip.released")),
    (f"consumer-{CONSUMER}", "publish to the event exchange", publish("havip.events", "havip.binding.changed")),
    (f"consumer-{CONSUMER}", "publish to the dead-letter exchange", publish("havip.dlx", "x")),
    (f"consumer-{CONSUMER}", "publish straight to a queue", publish("", "binding.inventory")),
    (f"consumer-{CONSUMER}", "read a partition's queue", consume("binding.partition.0")),
    (f"consumer-{CONSUMER}", "read the inventory's queue", consume("binding.inventory")),
    (f"consumer-{CONSUMER}", "read the dead letters", consume("havip.dead")),
    (f"consumer-{CONSUMER}", "bind a service's queue", bind("binding.inventory", "havip.events", "#")),
    (f"consumer-{CONSUMER}", "declare another's queue", declare_queue("consumer-other.bindings")),
    (f"consumer-{CONSUMER}", "declare a service's queue", declare_queue("binding.extra")),
    (f"consumer-{CONSUMER}", "dead-letter to the services'", declare_queue(f"consumer-{CONSUMER}.y", "havip.dlx")),
    (f"consumer-{CONSUMER}", "declare the event exchange", declare_exchange("havip.events")),
    ("allocator", "publish a binding's event", publish("havip.events", "havip.binding.changed")),
    ("allocator", "publish a claim", publish("havip.events", "arp.claims.observed.0")),
    ("allocator", "read a partition's queue", consume("binding.partition.0")),
    ("allocator", "declare a binding's queue", declare_queue("binding.extra")),
    ("binding", "publish an allocator's event", publish("havip.events", "vpc.created")),
    ("binding", "publish a claim", publish("havip.events", "arp.claims.observed.0")),
    ("binding", "read the allocator's queue", consume("allocator.events")),
    ("binding", "declare the event exchange", declare_exchange("havip.events")),
    ("migrate", "declare a consumer's queue", declare_queue(f"consumer-{CONSUMER}.bindings")),
]
# What the same users may do (the other side of some of the refusals above).
ALLOWED: list[tuple[str, str, Operation]] = [
    (f"watcher-{SEGMENT}", "publish a claim", publish("havip.events", "arp.claims.observed.1")),
    (f"watcher-{SEGMENT}", "publish a heartbeat", publish("havip.events", "arp.watcher.heartbeat")),
    (
        f"consumer-{CONSUMER}",
        "declare its queue",
        declare_queue(f"consumer-{CONSUMER}.x", f"consumer-{CONSUMER}.x"),
    ),
    (f"consumer-{CONSUMER}", "bind it", bind(f"consumer-{CONSUMER}.x", "havip.events", "havip.#")),
    (f"consumer-{CONSUMER}", "read it", consume(f"consumer-{CONSUMER}.x")),
    ("allocator", "publish its event", publish("havip.events", "havip.binding.replay_requested")),
    ("binding", "publish its event", publish("havip.events", "havip.claim.rejected")),
]


async def attempt(users: Users, role: str, operation: Operation) -> BaseException | None:
    connection = await aio_pika.connect(users.url(role))
    try:
        channel = await connection.channel(publisher_confirms=True)
        await operation(channel)
    except aiormq.exceptions.AMQPError as exc:
        return exc
    finally:
        await connection.close()
    return None


@pytest.mark.parametrize(("role", "what", "operation"), REFUSED, ids=[f"{r}: {w}" for r, w, _ in REFUSED])
async def test_a_user_is_refused_what_its_process_must_never_do(
    migrated: Users, role: str, what: str, operation: Operation
) -> None:
    refused = await attempt(migrated, role, operation)
    assert isinstance(refused, aiormq.exceptions.ChannelAccessRefused), (what, refused)
    assert f"refused for user '{migrated.name(role)}'" in str(refused)


async def test_the_same_users_may_do_what_their_process_does(migrated: Users) -> None:
    for role, what, operation in ALLOWED:
        assert await attempt(migrated, role, operation) is None, (role, what)


# ---- a right missing, in words ---------------------------------------------------------------------------------


def assert_no_trace(process: Process) -> None:
    assert not [line for line in process.raw if "Traceback" in line], "".join(process.raw)


async def test_a_service_under_a_user_without_its_rights_says_so_once_and_waits(
    migrated: Users, database_url: str
) -> None:
    users = migrated
    # The binding service run with the allocator's user: it may not declare the binding's queues.
    binding = await Process.service(
        "services.binding", service_env(users, "allocator", database_url, HAVIP_REPLICA_ID="wrong-user")
    )
    # The allocator run with a watcher's: it may not declare its queue.
    allocator = await Process.service(
        "services.allocator",
        service_env(users, f"watcher-{SEGMENT}", database_url, HAVIP_API_TOKEN=TOKEN, HAVIP_PORT=str(free_port())),
    )
    try:
        said = await binding.wait_for(
            f"RabbitMQ refused to let user '{users.name('allocator')}' declare queue '{PREFIX}binding.inventory' "
            f"in virtual host '{users.vhost}': that takes configure on it"
        )
        assert said["level"] == "ERROR"
        assert "until it is granted" in said["msg"]
        said = await allocator.wait_for(
            f"RabbitMQ refused to let user '{users.name(f'watcher-{SEGMENT}')}' declare queue "
            f"'{PREFIX}allocator.events' in virtual host '{users.vhost}'"
        )
        assert "Broker users and their rights" in said["msg"]
        await asyncio.sleep(2)  # asked again meanwhile, not said again
        assert await binding.terminate() == 0
        assert await allocator.terminate() == 0
    finally:
        binding.kill()
        allocator.kill()
    for process in (binding, allocator):
        assert_no_trace(process)
        refusals = [line["msg"] for line in process.lines if line["level"] in ("WARNING", "ERROR")]
        assert len(refusals) == 1, refusals
    assert binding.said("stopped before its queues were declared")
    assert allocator.said("stopped before consuming")


async def test_migrate_under_a_service_user_ends_with_the_right_it_lacks(
    migrated: Users, database_url: str
) -> None:
    users = migrated
    process = await Process.service("services.binding", service_env(users, "binding", database_url), "migrate")
    assert await process.wait() == 2
    assert_no_trace(process)
    [error] = [line for line in process.lines if line["level"] == "ERROR"]
    assert error["msg"].startswith(
        f"RabbitMQ refused to let user '{users.name('binding')}' declare exchange '{PREFIX}havip.events' in "
        f"virtual host '{users.vhost}': that takes configure on it."
    )


async def test_exchanges_not_declared_yet_are_said_in_words(
    users: Users, caplog: pytest.LogCaptureFixture
) -> None:
    # Another prefix: nothing declared there, and the watcher's user may not declare it.
    settings = CommonSettings(amqp_url=users.url(f"watcher-{SEGMENT}"), amqp_prefix="nowhere.")
    broker = Broker(settings, "arp_watcher")
    stop = asyncio.Event()
    caplog.set_level(logging.INFO, logger="shared.messaging")
    connecting = asyncio.create_task(broker.connect(stop))
    words = (
        f"RabbitMQ has no exchange 'nowhere.havip.events' in virtual host '{users.vhost}', and user "
        f"'{users.name(f'watcher-{SEGMENT}')}' may not declare it: run `migrate` with a user that may declare"
    )
    try:
        await eventually(lambda: words in caplog.text, timeout=DEADLINE_S, what="the missing exchange said")
    finally:
        stop.set()
        assert await asyncio.wait_for(connecting, DEADLINE_S) is False
        await broker.close()


async def test_a_publish_refused_is_said_in_words_and_the_next_one_goes_out(migrated: Users) -> None:
    users = migrated
    broker = Broker(users.settings(f"watcher-{SEGMENT}"), "arp_watcher")
    await broker.connect()
    try:
        with pytest.raises(BrokerAccessRefused) as refused:
            await broker.publish(vpc_created())
        assert str(refused.value).startswith(
            f"RabbitMQ refused to let user '{users.name(f'watcher-{SEGMENT}')}' publish to exchange "
            f"'{PREFIX}havip.events' with routing key 'vpc.created' in virtual host '{users.vhost}'"
        )
        assert "access to topic 'vpc.created'" in str(refused.value)  # RabbitMQ's own words, at the end

        async def goes_out() -> bool:  # once the publishing channel the broker closed is open again
            try:
                await broker.publish(heartbeat())
            except Exception:
                return False
            return True

        await eventually(goes_out, timeout=DEADLINE_S, what="a heartbeat published after the refusal")
    finally:
        await broker.close()


async def test_a_consumer_refused_its_read_right_says_so_and_consumes_once_it_is_granted(
    migrated: Users, caplog: pytest.LogCaptureFixture
) -> None:
    users = migrated
    name, password = users.name("noread"), secrets.token_hex(16)  # removed with the others (its prefix)
    rabbitmqctl("add_user", name, password)
    queue, events_exchange = re.escape(f"{PREFIX}test.noread"), re.escape(f"{PREFIX}havip.events")
    rabbitmqctl("set_permissions", "-p", users.vhost, name, f"^{queue}$", f"^{queue}$", f"^{events_exchange}$")
    guest = Broker(CommonSettings(amqp_url=users.guest_url, amqp_prefix=PREFIX), "test")
    await guest.connect()
    # The queue exists (declared as migrate would): declaring it again takes configure only.
    await (await guest.connection.channel()).declare_queue(
        f"{PREFIX}test.noread", durable=True, arguments={"x-dead-letter-exchange": f"{PREFIX}havip.dlx"}
    )
    settings = CommonSettings(amqp_url=str(URL(users.guest_url).with_user(name).with_password(password)))
    broker = Broker(settings.model_copy(update={"amqp_prefix": PREFIX}), "test")
    await broker.connect()
    received: list[str] = []
    lost: list[str] = []

    async def handler(deliveries: Sequence[Delivery]) -> None:
        received.extend(d.data.name for d in deliveries if isinstance(d.data, events.VpcData))

    caplog.set_level(logging.INFO, logger="shared.messaging")
    consuming = asyncio.create_task(
        broker.consumer("test.noread", ["vpc.created"], handler, on_channel_closed=lambda: lost.append("lost"))
    )
    try:
        words = (
            f"RabbitMQ refused to let user '{name}' consume from queue '{PREFIX}test.noread' in virtual host "
            f"'{users.vhost}': that takes read on it."
        )
        await eventually(lambda: words in caplog.text, timeout=DEADLINE_S, what="the refusal said")
        assert not consuming.done()
        read = re.escape(f"{PREFIX}test.noread")
        rabbitmqctl(
            "set_permissions", "-p", users.vhost, name, f"^{queue}$", f"^{queue}$", f"^({read}|{events_exchange})$"
        )
        consumer = await asyncio.wait_for(consuming, DEADLINE_S)
        try:
            await guest.publish(vpc_created())
            await eventually(lambda: received == ["x"], timeout=DEADLINE_S, what="the message consumed")
        finally:
            await consumer.stop()
    finally:
        consuming.cancel()
        await broker.close()
        await guest.close()
    assert caplog.text.count("RabbitMQ refused") == 1  # said once
    assert "RabbitMQ granted what was refused: going on" in caplog.text
    assert lost == []  # a consume refused is no channel lost
    assert "consuming p.x-test.noread paused" not in caplog.text


async def test_a_periodic_publish_refused_is_logged_in_words_without_a_trace(
    migrated: Users, caplog: pytest.LogCaptureFixture
) -> None:
    # A heartbeat published with the allocator's user (as a watcher's heartbeats would be with a wrong user).
    users = migrated
    broker = Broker(users.settings("allocator"), "arp_watcher")
    await broker.connect()
    stop = asyncio.Event()
    logger = logging.getLogger("test.periodic")
    caplog.set_level(logging.ERROR, logger="test.periodic")
    beating = asyncio.create_task(
        run_periodically(lambda: broker.publish(heartbeat()), 0.05, what="heartbeat", stop=stop, logger=logger)
    )
    try:
        await eventually(
            lambda: any(r.name == "test.periodic" for r in caplog.records), timeout=DEADLINE_S, what="the refusal"
        )
        await asyncio.sleep(0.3)  # failing again meanwhile: not logged again
    finally:
        stop.set()
        await asyncio.wait_for(beating, DEADLINE_S)
        await broker.close()
    [record] = [r for r in caplog.records if r.name == "test.periodic"]
    assert record.exc_info is None
    assert record.getMessage().startswith(
        "heartbeat failed; trying again every 0.05 s: RabbitMQ refused to let user "
        f"'{users.name('allocator')}' publish to exchange '{PREFIX}havip.events' with routing key "
        "'arp.watcher.heartbeat'"
    )


# ---- the script ------------------------------------------------------------------------------------------------


async def test_the_script_is_idempotent_and_prints_a_password_only_when_asked(migrated: Users) -> None:
    users = migrated
    before = rabbitmqctl("list_permissions", "-p", users.vhost)
    again = users.script()  # no password given: every user keeps its own
    assert again.returncode == 0, again.stderr
    assert again.stdout == ""
    assert rabbitmqctl("list_permissions", "-p", users.vhost) == before
    assert await attempt(users, "binding", publish("havip.events", "havip.claim.rejected")) is None

    refused = users.script("--consumer", "late")
    assert refused.returncode == 2
    assert "HAVIP_RABBITMQ_CONSUMER_LATE_PASSWORD" in refused.stderr
    printed = users.script("--consumer", "late", "--print-passwords")
    assert printed.returncode == 0, printed.stderr
    variable, password = printed.stdout.strip().split("=", 1)
    assert variable == "HAVIP_RABBITMQ_CONSUMER_LATE_PASSWORD"
    assert password not in printed.stderr
    users.passwords["consumer-late"] = password
    assert await attempt(users, "consumer-late", declare_queue("consumer-late.bindings")) is None
    refused_read = await attempt(users, "consumer-late", consume(f"consumer-{CONSUMER}.bindings"))
    assert isinstance(refused_read, aiormq.exceptions.ChannelAccessRefused)
