"""scripts/rabbitmq-users.sh read without a broker (--dry-run): every user's regular expressions take in the names
its process uses and nothing of another's, whatever the prefix; each routing key is writable by its publisher's
user alone (shared/contracts.py); no password is ever printed unless asked for. The same rights against RabbitMQ
itself: tests/integration/test_broker_permissions.py."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from services.allocator.binding_view.service import QUEUE as ALLOCATOR_QUEUE
from services.binding.main import RETIRED_QUEUE
from services.binding.main import queues as binding_queues
from services.binding.settings import BindingSettings
from shared.contracts import publisher_of
from shared.events import EVENT_TYPES, WATCHER_HEARTBEAT_EVENT
from shared.partitions import MAX_PARTITIONS, claims_routing_key
from shared.settings import CommonSettings

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "rabbitmq-users.sh"
PASSWORDS = {
    "HAVIP_RABBITMQ_MIGRATE_PASSWORD": "pw-migrate",
    "HAVIP_RABBITMQ_ALLOCATOR_PASSWORD": "pw-allocator",
    "HAVIP_RABBITMQ_BINDING_PASSWORD": "pw-binding",
    "HAVIP_RABBITMQ_WATCHER_LAB_PASSWORD": "pw-watcher-lab",
    "HAVIP_RABBITMQ_WATCHER_EDGE_1_PASSWORD": "pw-watcher-edge",
    "HAVIP_RABBITMQ_CONSUMER_DEMO_PASSWORD": "pw-consumer-demo",
    "HAVIP_RABBITMQ_CONSUMER_DEMO_2_PASSWORD": "pw-consumer-demo-2",
}
# Names with every character a prefix may hold that means something in a regular expression.
PREFIXES = ("", "t1.", "a+b(c)[d]{e}^$|?*\\-")


@dataclass
class Rights:
    configure: str = "^$"
    write: str = "^$"
    read: str = "^$"
    topic_write: dict[str, str] = field(default_factory=dict)  # exchange -> routing keys it may publish

    def may(self, right: str, resource: str) -> bool:
        # RabbitMQ's check: the regular expression found in the name (re:run, unanchored); "" matches nothing.
        pattern = getattr(self, right)
        return pattern != "" and re.search(pattern, resource) is not None


def run_script(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("HAVIP_")}
    return subprocess.run(
        ["sh", str(SCRIPT), *args], env={**base, **env}, capture_output=True, text=True, timeout=30, check=False
    )


def dry_run(prefix: str, *args: str) -> dict[str, Rights]:
    done = run_script(
        "--dry-run", "--segment", "lab", "--segment", "edge.1", "--consumer", "demo", "--consumer", "demo-2",
        *args, "the-vhost", prefix, **PASSWORDS,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    for password in PASSWORDS.values():
        assert password not in done.stdout + done.stderr
    users: dict[str, Rights] = {}
    for line in done.stdout.splitlines():
        command, *argv = shlex.split(line)
        assert command == "rabbitmqctl", line
        if argv[0] == "add_user":
            assert argv[2] == "***"
            users[argv[1]] = Rights()
        elif argv[0] == "set_permissions":
            assert argv[1:3] == ["-p", "the-vhost"]
            users[argv[3]].configure, users[argv[3]].write, users[argv[3]].read = argv[4:]
        elif argv[0] == "set_topic_permissions":
            assert argv[1:3] == ["-p", "the-vhost"]
            user, exchange, write, read = argv[3:]
            assert read == ".*"
            users[user].topic_write[exchange] = write
        else:
            raise AssertionError(f"unexpected command: {line}")
    return users


@pytest.mark.parametrize("prefix", PREFIXES)
def test_each_user_reaches_its_own_names_and_no_others(prefix: str) -> None:
    users = dry_run(prefix)
    assert set(users) == {
        "havip-migrate", "havip-allocator", "havip-binding", "havip-watcher-lab", "havip-watcher-edge.1",
        "havip-consumer-demo", "havip-consumer-demo-2",
    }  # fmt: skip
    settings = CommonSettings(amqp_prefix=prefix)
    exchange, dlx, dead = settings.exchange, settings.dead_letter_exchange, settings.dead_letter_queue
    binding = [settings.queue(spec.name) for spec in binding_queues(BindingSettings(partitions=MAX_PARTITIONS))]
    allocator = [settings.queue(ALLOCATOR_QUEUE)]
    retired = [settings.queue(RETIRED_QUEUE)]
    demo = [settings.queue(f"consumer-demo.{name}") for name in ("bindings", "bindings.dlx", "bindings.dead")]
    demo_2 = [settings.queue("consumer-demo-2.bindings")]
    everything = [exchange, dlx, dead, *binding, *allocator, *retired, *demo, *demo_2, "amq.default", "amq.topic"]
    if prefix:
        # The same names without the prefix (another deployment's, or none's): no right on any.
        everything += [n.removeprefix(prefix) for n in [exchange, dlx, dead, *binding, *allocator, *demo]]

    def allowed(user: str, right: str) -> set[str]:
        return {name for name in everything if users[user].may(right, name)}

    # migrate declares everything the services share and their queues (and deletes retired ones), nothing else.
    havip = {exchange, dlx, dead, *binding, *allocator, *retired}
    for right in ("configure", "write", "read"):
        assert allowed("havip-migrate", right) == havip, right
    # A service: its own queues (declared, bound — write — and consumed), the event exchange read (bound from)
    # and written (published to), and the dead-letter exchange written (a queue made to dead-letter there).
    assert allowed("havip-binding", "configure") == {*binding, *retired}
    assert allowed("havip-binding", "write") == {*binding, *retired, exchange, dlx}
    assert allowed("havip-binding", "read") == {*binding, *retired, exchange}
    assert allowed("havip-allocator", "configure") == set(allocator)
    assert allowed("havip-allocator", "write") == {*allocator, exchange, dlx}
    assert allowed("havip-allocator", "read") == {*allocator, exchange}
    # A watcher publishes to the event exchange: nothing else, not even the default exchange.
    for watcher in ("havip-watcher-lab", "havip-watcher-edge.1"):
        assert allowed(watcher, "configure") == allowed(watcher, "read") == set()
        assert allowed(watcher, "write") == {exchange}
    # A consumer: its own names, and the event exchange to bind them to; no write anywhere else.
    for user, own in (("havip-consumer-demo", demo), ("havip-consumer-demo-2", demo_2)):
        assert allowed(user, "configure") == allowed(user, "write") == set(own)
        assert allowed(user, "read") == {*own, exchange}
        assert users[user].topic_write == {}


def test_each_routing_key_is_written_by_its_publishers_user_alone() -> None:
    users = dry_run("p.")
    publishers = {"arp_watcher": "havip-watcher-lab", "allocator": "havip-allocator", "binding": "havip-binding"}
    keys = {
        key: publisher_of(key)
        for key in [*EVENT_TYPES, *(claims_routing_key(p) for p in (0, 7, MAX_PARTITIONS - 1))]
    }
    assert WATCHER_HEARTBEAT_EVENT in keys
    for user in publishers.values():
        assert set(users[user].topic_write) == {"p.havip.events"}, user
    for key, publisher in keys.items():
        writers = {
            user for user in publishers.values() if re.search(users[user].topic_write["p.havip.events"], key)
        }
        assert writers == {publishers[publisher]}, key
    for key in ("havip.binding.changedx", "arp.claims.observed.x", "vpc", "", "havip.binding"):
        for user in publishers.values():
            assert not re.search(users[user].topic_write["p.havip.events"], key), (user, key)


def test_a_new_user_without_a_password_is_refused_unless_one_is_printed() -> None:
    without = {k: v for k, v in PASSWORDS.items() if k != "HAVIP_RABBITMQ_BINDING_PASSWORD"}
    refused = run_script("--dry-run", "--segment", "lab", "vhost", **without)
    assert refused.returncode == 2
    assert "HAVIP_RABBITMQ_BINDING_PASSWORD" in refused.stderr
    printed = run_script("--dry-run", "--print-passwords", "--segment", "lab", "vhost", **without)
    assert printed.returncode == 0, printed.stderr
    [line] = [line for line in printed.stdout.splitlines() if not line.startswith("rabbitmqctl ")]
    variable, password = line.split("=", 1)
    assert variable == "HAVIP_RABBITMQ_BINDING_PASSWORD"
    assert re.fullmatch("[0-9a-f]{48}", password)
    assert password not in printed.stderr


def test_one_segment_takes_the_watchers_password_under_its_short_name() -> None:
    env = {k: v for k, v in PASSWORDS.items() if "WATCHER" not in k} | {"HAVIP_RABBITMQ_WATCHER_PASSWORD": "w"}
    assert run_script("--dry-run", "vhost", **env).returncode == 0  # the default segment
    two = run_script("--dry-run", "--segment", "a", "--segment", "b", "vhost", **env)
    assert two.returncode == 2
    assert "HAVIP_RABBITMQ_WATCHER_A_PASSWORD" in two.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("--consumer", "a.b", "vhost"),  # consumer a's names would take in consumer a.b's
        ("--consumer", "A", "vhost"),
        ("--segment", "-x", "vhost"),
        ("--segment", "a b", "vhost"),
        (),
        ("vhost", "prefix", "extra"),
        ("--unknown", "vhost"),
    ],
)
def test_bad_arguments_are_refused(args: tuple[str, ...]) -> None:
    done = run_script("--dry-run", *args, **PASSWORDS)
    assert done.returncode == 2
    assert done.stdout == ""
