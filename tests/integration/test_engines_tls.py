"""RabbitMQ over TLS (amqps://) and Postgres with sslmode=verify-full, on real engines, certificates made here.

A throwaway CA (tests/tls.py) signs one certificate for 127.0.0.1 alone; a second CA signs nothing the engines use.
A three-node RabbitMQ cluster (scripts/rabbitmq-cluster.sh, HAVIP_RABBIT_CLUSTER_TLS_DIR) and a Postgres primary
with its standby (scripts/postgres-ha.sh, PGHA_TLS_DIR) are started for this module alone, on ports of their own,
with that certificate, and stopped at its end. The services' own code connects: a Broker (HAVIP_AMQP_CA_FILE)
publishes and consumes over TLS, create_pool opens a pool with the cluster's verify-full DSN, a service's
`migrate` uses both. Trusting the other CA, or reaching the same servers as `localhost` (a name their certificate
is not for), is said once in words while the service waits: which server, and which CA does not vouch for it, or
which names its certificate is for.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from yarl import URL

from shared import events
from shared.db import create_pool
from shared.messaging import Broker, Delivery
from shared.settings import CommonSettings
from tests.clusters.postgres import PostgresHA
from tests.clusters.rabbitmq import RabbitCluster
from tests.tls import Authority, engine_files, make_ca
from tests.waiting import eventually

ROOT = Path(__file__).resolve().parents[2]
# Ports of this module's own: neither the scripts' defaults nor another test's clusters.
RABBIT_PORT_BASE = 27300  # AMQP 27301-27303, AMQP over TLS 27304-27306, Erlang 27311-27313, epmd 27320, CLI 27321-
PG_PORTS = {"monitor": 27401, "node1": 27411, "node2": 27412}
ATTEMPTS = 3  # failed connection attempts seen before a wait is stopped

pytestmark = pytest.mark.timeout(600)


@dataclass(frozen=True)
class Certificates:
    ca: Authority
    other_ca: Authority
    engines: Path  # ca.pem, server.pem (127.0.0.1 alone), server-key.pem: what the clusters' scripts take


@dataclass(frozen=True)
class Engines:
    rabbit: RabbitCluster
    postgres: PostgresHA


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    directory = tmp_path_factory.mktemp("tls")
    ca = make_ca(directory, "ca")
    engines = engine_files(ca, directory / "engines")
    return Certificates(ca, make_ca(directory, "other-ca"), engines)


@pytest.fixture(scope="module")
def engines(certificates: Certificates) -> Iterator[Engines]:
    """Both clusters, started side by side (each takes seconds of waiting), stopped at the module's end."""
    rabbit_dir = Path(tempfile.mkdtemp(prefix="havip-rabbit-tls-"))
    pg_dir = Path(tempfile.mkdtemp(prefix="havip-pg-tls-"))
    rabbit = RabbitCluster(rabbit_dir, port_base=RABBIT_PORT_BASE, tls_dir=certificates.engines)
    postgres = PostgresHA(pg_dir, ports=PG_PORTS, tls_dir=certificates.engines)
    try:
        with contextlib.ExitStack() as stack, concurrent.futures.ThreadPoolExecutor(2) as pool:
            starting: dict[concurrent.futures.Future[object], RabbitCluster | PostgresHA] = {
                pool.submit(rabbit.__enter__): rabbit,
                pool.submit(postgres.__enter__): postgres,
            }
            failures = []
            for future, cluster in starting.items():
                try:
                    future.result()
                except BaseException as exc:  # its __enter__ stopped it
                    failures.append(exc)
                else:
                    stack.callback(cluster.stop)
            if failures:
                raise failures[0]
            yield Engines(rabbit, postgres)
    finally:
        shutil.rmtree(rabbit_dir, ignore_errors=True)
        shutil.rmtree(pg_dir, ignore_errors=True)


def vpc(name: str) -> events.Envelope:
    return events.envelope("vpc.created", events.VpcData(id=uuid.uuid4(), name=name, cidr="192.0.2.0/24"), "test")


def as_localhost(url: str) -> str:
    return str(URL(url).with_host("localhost"))


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


async def said_while_waiting(broker: Broker, caplog: pytest.LogCaptureFixture) -> str:
    """What a Broker that cannot connect says, once, over several attempts; then its wait is stopped."""
    stop = asyncio.Event()
    connecting = asyncio.create_task(broker.connect(stop, max_delay_s=0.1))
    await eventually(lambda: broker.connect_attempts >= ATTEMPTS, what=f"{ATTEMPTS} attempts", timeout=60)
    stop.set()
    assert await asyncio.wait_for(connecting, 30) is False
    said = warnings_of(caplog)
    assert len(said) == 1, said
    assert "Traceback" not in caplog.text
    return said[0]


# --- RabbitMQ ---------------------------------------------------------------------------------------------------


async def test_a_broker_over_tls_publishes_and_consumes(engines: Engines, certificates: Certificates) -> None:
    settings = CommonSettings(
        amqp_url=",".join(engines.rabbit.tls_urls),
        amqp_ca_file=certificates.ca.cert,
        amqp_prefix=f"t{uuid.uuid4().hex[:8]}.",
    )
    handled: list[str] = []

    async def handler(deliveries: Sequence[Delivery]) -> None:
        handled.extend(d.data.name for d in deliveries if isinstance(d.data, events.VpcData))

    broker = Broker(settings, "test-tls")
    assert await broker.connect()
    try:
        consumer = await broker.consumer("tls.events", ["vpc.created"], handler)
        try:
            await broker.publish(vpc("over-tls"))
            await eventually(lambda: handled == ["over-tls"], what="the event consumed over TLS")
        finally:
            await consumer.stop()
        # The broker's view: this process's connection is a TLS one, on a node's TLS port.
        listed = await asyncio.to_thread(
            engines.rabbit.ctl, "-q", "list_connections", "name", "ssl", "ssl_protocol", "--formatter", "json"
        )
        mine = [row for row in json.loads(listed) if URL(f"amqps://{row['name'].split(' -> ')[1]}").port in
                {URL(url).port for url in engines.rabbit.tls_urls}]  # fmt: skip
        assert mine
        assert all(row["ssl"] is True and row["ssl_protocol"] in ("tlsv1.2", "tlsv1.3") for row in mine), mine
    finally:
        await broker.close()


async def test_nodes_whose_certificate_the_ca_does_not_sign_are_said_so_once(
    engines: Engines, certificates: Certificates, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = CommonSettings(amqp_url=",".join(engines.rabbit.tls_urls), amqp_ca_file=certificates.other_ca.cert)
    said = await said_while_waiting(Broker(settings, "test-tls"), caplog)
    nodes = [f"127.0.0.1:{URL(url).port}" for url in engines.rabbit.tls_urls]
    assert said.startswith("no RabbitMQ node can be used: ")
    for node in nodes:
        assert (
            f"the certificate of RabbitMQ at {node} is not signed by the CA in {certificates.other_ca.cert}"
        ) in said
    assert "guest:guest" not in said  # a URL's password never said


async def test_a_node_reached_by_a_name_its_certificate_is_not_for_is_said_so_once(
    engines: Engines, certificates: Certificates, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    url = as_localhost(engines.rabbit.tls_urls[0])
    settings = CommonSettings(amqp_url=url, amqp_ca_file=certificates.ca.cert)
    said = await said_while_waiting(Broker(settings, "test-tls"), caplog)
    assert said.startswith(
        f"the certificate of RabbitMQ at localhost:{URL(url).port} is for 127.0.0.1, not localhost; trying again"
    ), said


# --- Postgres ---------------------------------------------------------------------------------------------------


async def test_a_pool_over_verify_full(engines: Engines) -> None:
    dsn = engines.postgres.dsn("postgres")
    assert "sslmode=verify-full" in dsn
    pool = await create_pool(dsn, min_size=1, max_size=2)
    try:
        async with pool.acquire() as conn:
            row = await conn.fetchrow("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        assert row is not None
        assert row["ssl"] is True
        assert row["version"] in ("TLSv1.2", "TLSv1.3")
    finally:
        await pool.close()


async def said_by_create_pool(dsn: str, caplog: pytest.LogCaptureFixture) -> str:
    stop = asyncio.Event()
    opening = asyncio.create_task(create_pool(dsn, min_size=1, max_size=1, stop=stop))
    await eventually(lambda: len(warnings_of(caplog)) >= 1, what="what is wrong said", timeout=60)
    await asyncio.sleep(1.0)  # further attempts (back-off from 0.1 s): said no more
    stop.set()
    assert await asyncio.wait_for(opening, 30) is None
    said = warnings_of(caplog)
    assert len(said) == 1, said
    return said[0]


async def test_a_server_certificate_the_ca_does_not_sign_is_said_so_once(
    engines: Engines, certificates: Certificates, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="shared.db")
    dsn = engines.postgres.dsn("postgres").replace(str(engines.postgres.ca_file), str(certificates.other_ca.cert))
    said = await said_by_create_pool(dsn, caplog)
    hosts = " or ".join(f"127.0.0.1:{PG_PORTS[n]}" for n in ("node1", "node2"))
    assert said.startswith(
        f"the certificate of PostgreSQL at {hosts} is not signed by the CA in {certificates.other_ca.cert}"
    ), said


async def test_a_server_reached_by_a_name_its_certificate_is_not_for_is_said_so_once(
    engines: Engines, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="shared.db")
    dsn = engines.postgres.dsn("postgres").replace("127.0.0.1", "localhost")
    said = await said_by_create_pool(dsn, caplog)
    hosts = " or ".join(f"localhost:{PG_PORTS[n]}" for n in ("node1", "node2"))
    assert said.startswith(f"the certificate of PostgreSQL at {hosts} is for 127.0.0.1, not localhost;"), said


# --- a service ---------------------------------------------------------------------------------------------------


def test_a_service_migrates_over_tls_to_both_engines(engines: Engines, certificates: Certificates) -> None:
    """`python -m services.allocator migrate` with HAVIP_DATABASE_URL the verify-full DSN and HAVIP_AMQP_URL the
    amqps:// nodes with HAVIP_AMQP_CA_FILE: it creates its database, applies its migrations, declares the
    exchanges and its queue."""
    env = {
        "PATH": "/usr/bin:/bin",
        "HAVIP_DATABASE_URL": engines.postgres.dsn(f"havip_tls_{uuid.uuid4().hex[:6]}"),
        "HAVIP_AMQP_URL": ",".join(engines.rabbit.tls_urls),
        "HAVIP_AMQP_CA_FILE": str(certificates.ca.cert),
        "HAVIP_AMQP_PREFIX": f"t{uuid.uuid4().hex[:8]}.",
    }
    done = subprocess.run(
        [sys.executable, "-m", "services.allocator", "migrate"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    queues = engines.rabbit.queue_rows("name")
    assert f"{env['HAVIP_AMQP_PREFIX']}allocator.events" in {row["name"] for row in queues}


def havipctl_watch(engines: Engines, urls: Sequence[str], **env: str) -> subprocess.CompletedProcess[str]:
    """`havipctl watch` for 3 s against `urls` (a cluster's nodes, comma-separated, as the services take them)."""
    environment = {"PATH": "/usr/bin:/bin", "HAVIP_AMQP_URL": ",".join(urls), "HAVIP_AMQP_PREFIX": "w.", **env}
    return subprocess.run(
        [sys.executable, "-m", "havipctl", "watch", "--timeout", "3"],
        cwd=ROOT, env=environment, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_havipctl_watches_the_cluster_over_tls_with_the_broker_s_ca(
    engines: Engines, certificates: Certificates
) -> None:
    trusted = havipctl_watch(engines, engines.rabbit.tls_urls, HAVIP_AMQP_CA_FILE=str(certificates.ca.cert))
    assert trusted.returncode == 0, trusted.stderr
    assert "watching w.havip.events on amqps://guest:***@127.0.0.1:" in trusted.stderr

    # The system's CAs do not vouch for the throwaway CA: each node says so, and how to give the broker's CA.
    untrusted = havipctl_watch(engines, engines.rabbit.tls_urls[:1])
    assert untrusted.returncode == 3
    assert untrusted.stderr.endswith(
        ": the server's certificate is not signed by a CA havipctl trusts (the system's CAs; give the broker's CA "
        "with --amqp-cacert or HAVIP_AMQP_CA_FILE)\n"
    ), untrusted.stderr

    by_name = havipctl_watch(
        engines, [as_localhost(engines.rabbit.tls_urls[0])], HAVIP_AMQP_CA_FILE=str(certificates.ca.cert)
    )
    assert by_name.returncode == 3
    assert by_name.stderr.endswith(": the server's certificate is not for localhost\n"), by_name.stderr


def test_the_example_consumer_verifies_the_node_against_the_broker_s_ca(
    engines: Engines, certificates: Certificates
) -> None:
    def consumer(ca: Path) -> subprocess.CompletedProcess[str]:
        environment = {
            "PATH": "/usr/bin:/bin",
            "HAVIP_AMQP_URL": engines.rabbit.tls_urls[0],
            "HAVIP_AMQP_CA_FILE": str(ca),
            "HAVIP_AMQP_PREFIX": f"c{uuid.uuid4().hex[:8]}.",
        }
        return subprocess.run(
            [sys.executable, "docs/events/example_consumer.py", "--queue", "consumer-tls.q", "--timeout", "2"],
            cwd=ROOT, env=environment, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    trusted = consumer(certificates.ca.cert)
    assert trusted.returncode == 0, trusted.stderr[-2000:]
    untrusted = consumer(certificates.other_ca.cert)
    assert untrusted.returncode != 0
    assert "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr, untrusted.stderr[-2000:]
