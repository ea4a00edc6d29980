"""Several broker nodes in HAVIP_AMQP_URL: a process connects to one, moves to another when its node goes away
(the connection reset, new ones refused), passes over a node that does not answer at start-up, and says in
words what each node answered when none can be used. Two cuttable proxies in front of the test RabbitMQ play the
nodes: what is checked is the client's choice of node, which a real cluster's failover relies on (a killed
cluster node is in tests/integration/test_rabbitmq_cluster.py)."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import time
import uuid
from collections.abc import Sequence

import aio_pika
import pytest
from prometheus_client import REGISTRY
from yarl import URL

from shared import events
from shared.messaging import Broker, ClusterConnection, Delivery
from shared.settings import CommonSettings
from tests.ports import free_port
from tests.tcp_proxy import CuttableProxy
from tests.waiting import eventually


def vpc(name: str) -> events.Envelope:
    return events.envelope("vpc.created", events.VpcData(id=uuid.uuid4(), name=name, cidr="192.0.2.0/24"), "test")


def nacked(connection: str) -> float:
    return REGISTRY.get_sample_value("havip_broker_publishes_nacked_total", {"connection": connection}) or 0.0


def nobody_at(amqp_url: str) -> str:
    return str(URL(amqp_url).with_port(free_port()))


async def test_a_process_moves_to_another_node_when_its_node_goes_and_consumes_there(amqp_url: str) -> None:
    with CuttableProxy() as first, CuttableProxy() as second:
        settings = CommonSettings(
            amqp_url=f"{first.url(amqp_url)},{second.url(amqp_url)}", amqp_prefix=f"t{uuid.uuid4().hex[:8]}."
        )
        received: list[str] = []

        async def handler(deliveries: Sequence[Delivery]) -> None:
            received.extend(d.data.name for d in deliveries if isinstance(d.data, events.VpcData))

        broker = Broker(settings, "test")
        assert await broker.connect()
        try:
            connection = broker.connection
            assert isinstance(connection, ClusterConnection)
            nodes = {first.port: first, second.port: second}
            used = nodes[URL(f"amqp://{connection.node}").port or 0]
            other = second if used is first else first
            consumer = await broker.consumer("test.nodes", ["vpc.created"], handler, single_active=True)
            try:
                await broker.publish(vpc("before"))
                await eventually(lambda: received == ["before"], what="consumed on the first node")

                used.cut()  # the node dies: its connections reset, new ones refused
                await eventually(lambda: other.connections >= 1, what="a connection to the other node")
                await eventually(lambda: not connection.reconnecting and connection.connected.is_set(), what="up")
                assert connection.node == f"127.0.0.1:{other.port}"

                async def published_after() -> bool:
                    try:
                        await broker.publish(vpc("after"))
                    except Exception:
                        return False
                    return True

                await eventually(published_after, what="a publish confirmed through the other node")
                await eventually(lambda: "after" in received, what="consumed again, through the other node")
            finally:
                await consumer.stop()
        finally:
            await broker.close()


async def test_a_node_that_does_not_answer_at_start_is_passed_over(
    amqp_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="shared.messaging")
    for _ in range(3):  # whichever node the process tries first
        broker = Broker(CommonSettings(amqp_url=f"{nobody_at(amqp_url)},{amqp_url}"), "test")
        assert await asyncio.wait_for(broker.connect(max_delay_s=0.1), 30)
        try:
            assert broker.connect_attempts == 1
            await broker.publish(vpc("started"))
        finally:
            await broker.close()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_no_usable_node_is_explained_once_naming_each_node(
    amqp_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    nodes = [nobody_at(amqp_url), str(URL(amqp_url).with_password("not-the-password"))]
    broker = Broker(CommonSettings(amqp_url=",".join(nodes)), "test")
    stop = asyncio.Event()
    connecting = asyncio.create_task(broker.connect(stop, max_delay_s=0.1))
    await eventually(lambda: broker.connect_attempts >= 4, what="four rounds of the nodes")
    stop.set()
    assert await asyncio.wait_for(connecting, 30) is False
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 1, said
    assert "no RabbitMQ node can be used" in said[0]
    assert f"nothing accepts connections at 127.0.0.1:{URL(nodes[0]).port}" in said[0]
    assert "refused the login of user 'guest': wrong user name or password" in said[0]
    assert "not-the-password" not in caplog.text


async def test_after_a_nack_the_next_publish_goes_out_on_a_new_channel(amqp_url: str) -> None:
    """RabbitMQ 3.10 may nack every publish of a channel that met a quorum queue's leader election (its node
    killed): a nack makes the Broker publish on a new channel, and close the old one a while later (not at once:
    RabbitMQ may not answer its close until the cluster has settled). A full queue that rejects publishes
    (reject-publish) plays the nack here."""
    settings = CommonSettings(amqp_url=amqp_url, amqp_prefix=f"t{uuid.uuid4().hex[:8]}.")
    broker = Broker(settings, "test")
    broker.retired_channel_close_after_s = 3.0
    nacked_before = nacked("test")
    assert await broker.connect()
    vhost = settings.amqp_vhost

    def publishing_channels() -> list[str]:
        """The numbers of the connection's channels in confirm mode, as RabbitMQ lists them."""
        listed = subprocess.run(
            ["rabbitmqctl", "-q", "list_channels", "--no-table-headers", "vhost", "number", "confirm"],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        rows = [line.split("\t") for line in listed.splitlines()]
        return sorted(row[1] for row in rows if len(row) == 3 and row[0] == vhost and row[2] == "true")

    try:
        channel = await broker.connection.channel(publisher_confirms=False)  # not to be counted as publishing
        full = await channel.declare_queue(
            settings.queue("test.full"), arguments={"x-max-length": 1, "x-overflow": "reject-publish"}
        )
        await full.bind(settings.exchange, "vpc.created")
        await broker.publish(vpc("fills the queue"))
        channels_before = publishing_channels()
        with pytest.raises(aio_pika.exceptions.DeliveryError):
            await broker.publish(vpc("nacked"))
        assert nacked("test") == nacked_before + 1
        both = publishing_channels()
        assert len(both) == 2, (channels_before, both)  # the nacked one kept open a while
        assert set(channels_before) < set(both), (channels_before, both)
        await eventually(
            lambda: len(now := publishing_channels()) == 1 and now != channels_before,
            timeout=30,
            interval=0.5,
            what=f"the nacked channel closed, another publishing (before {channels_before})",
        )
        await full.purge()
        await broker.publish(vpc("confirmed on the new channel"))
        await full.delete(if_unused=False, if_empty=False)
        await channel.close()
    finally:
        await broker.close()


async def test_a_retrys_pause_ends_once_the_broker_is_back(amqp_url: str) -> None:
    """Broker.pause, the wait between two tries of a failed publish: the back-off while the connection is up, but
    only until it is back (its channels restored) while it is away — a publish that failed then goes out at
    once, not a back-off later."""
    with CuttableProxy() as proxy:
        settings = CommonSettings(amqp_url=proxy.url(amqp_url), amqp_prefix=f"t{uuid.uuid4().hex[:8]}.")
        broker = Broker(settings, "test")
        assert await broker.connect()
        try:
            began = time.monotonic()
            await broker.pause(0.3)
            assert time.monotonic() - began >= 0.3  # connected: the whole back-off

            connection = broker.connection
            proxy.cut()
            await eventually(lambda: not connection.connected.is_set(), what="the connection lost")
            pausing = asyncio.create_task(broker.pause(120))
            await asyncio.sleep(0.5)
            assert not pausing.done()  # away: waiting
            proxy.start()
            back_at = time.monotonic()
            await asyncio.wait_for(pausing, 60)  # aio-pika tries a lone node again every 5 s
            print(f"\nthe pause ended {time.monotonic() - back_at:.2f} s after the broker was back")
            await broker.publish(vpc("at once"))  # the publishing channel restored with the connection
        finally:
            await broker.close()
