"""A watcher's broker user speaks for its own segment only: every message a service publishes carries its broker
user as `user_id`, which RabbitMQ checks against the publishing connection's user — a message claiming another
user is refused by the broker itself — so that the binding can trust it (HAVIP_WATCHER_USER_TEMPLATE)."""

from __future__ import annotations

import os
import secrets
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence

import aio_pika
import pytest
from yarl import URL

from shared import events
from shared.messaging import Broker, Delivery
from shared.settings import CommonSettings
from tests.conftest import AMQP_BASE
from tests.sandbox import temporary_vhost
from tests.waiting import eventually


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture
def vhost_with_watcher_user() -> Iterator[tuple[str, str]]:
    """(the test's vhost as guest, the same vhost as user havip-watcher-<segment>); both removed at the end."""
    user, password = f"havip-test-watcher-{secrets.token_hex(4)}", secrets.token_urlsafe(16)
    with temporary_vhost(AMQP_BASE, f"havip-test-users-{os.getpid()}-{time.monotonic_ns()}") as amqp_url:
        rabbitmqctl("add_user", user, password)
        try:
            vhost = URL(amqp_url).path[1:]
            rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
            yield amqp_url, str(URL(amqp_url).with_user(user).with_password(password))
        finally:
            rabbitmqctl("delete_user", user)


def vpc(name: str) -> events.Envelope:
    return events.envelope("vpc.created", events.VpcData(id=uuid.uuid4(), name=name, cidr="192.0.2.0/24"), "t")


async def test_a_message_carries_its_publishers_user_and_a_forged_one_is_refused_by_the_broker(
    vhost_with_watcher_user: tuple[str, str],
) -> None:
    guest_url, watcher_url = vhost_with_watcher_user
    watcher_user = URL(watcher_url).user
    received: list[Delivery] = []

    async def handler(deliveries: Sequence[Delivery]) -> None:
        received.extend(deliveries)

    consuming = Broker(CommonSettings(amqp_url=guest_url), "test")
    publishing = Broker(CommonSettings(amqp_url=watcher_url), "arp_watcher")
    await consuming.connect()
    await publishing.connect()
    try:
        consumer = await consuming.consumer("test.users", ["vpc.created"], handler)
        try:
            await publishing.publish(vpc("from-the-watcher"))
            await eventually(lambda: len(received) == 1, what="the watcher's message delivered")
            assert received[0].user_id == watcher_user

            # The same connection claiming to be guest: RabbitMQ closes the channel instead of delivering.
            forged = await aio_pika.connect(watcher_url)
            try:
                channel = await forged.channel(publisher_confirms=True)
                exchange = await channel.get_exchange(CommonSettings(amqp_url=guest_url).exchange)
                with pytest.raises(aio_pika.exceptions.AMQPError, match="user_id property set to 'guest'"):
                    await exchange.publish(
                        aio_pika.Message(events.encode(vpc("forged")), user_id="guest"),
                        routing_key="vpc.created",
                        timeout=10,
                    )
            finally:
                await forged.close()
            await publishing.publish(vpc("after"))
            await eventually(lambda: len(received) == 2, what="the next message delivered")
            assert [d.data.name for d in received if isinstance(d.data, events.VpcData)] == [
                "from-the-watcher",
                "after",
            ]
        finally:
            await consumer.stop()
    finally:
        await publishing.close()
        await consuming.close()
