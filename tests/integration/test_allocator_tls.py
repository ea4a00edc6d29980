"""The allocator over HTTPS, and havipctl verifying it: real processes, certificates made here.

A throwaway CA (tests/tls.py) signs the allocator's certificate for 127.0.0.1 and localhost; another CA signs
nothing the allocator uses; a second allocator serves a certificate of the right CA for another host name. Each
allocator is started as `python -m services.allocator` with `HAVIP_TLS_CERT_FILE` / `HAVIP_TLS_KEY_FILE`, on this
module's database and RabbitMQ vhost, and stopped by its process group. Bad TLS settings are refused before
anything starts. Every wait has a deadline; nothing sleeps a fixed time.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import ssl
import subprocess
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests import service_logs
from tests.lab.proc import terminate_group
from tests.ports import free_port
from tests.tls import Authority, ServerCertificate, issue, make_ca
from tests.waiting import eventually_sync

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "tls-" + secrets.token_hex(16)
START_DEADLINE_S = 90.0  # two shared cores: an allocator's start-up may take a while
COMMAND_DEADLINE_S = 60.0
OTHER_HOST = "allocator.example"


def base_env() -> dict[str, str]:
    """The environment without any HAVIP_* variable of the caller's (nor SSL_CERT_*: the system's CAs are the
    system's)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("HAVIP_", "SSL_CERT_"))}


@dataclass(frozen=True)
class Certificates:
    ca: Authority
    other_ca: Authority
    server: ServerCertificate  # for 127.0.0.1 and localhost
    other_host: ServerCertificate  # signed by `ca`, for OTHER_HOST only


@dataclass(frozen=True)
class Allocator:
    port: int
    url: str  # https://127.0.0.1:port
    log: Path


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    directory = tmp_path_factory.mktemp("tls")
    ca = make_ca(directory, "ca")
    return Certificates(
        ca=ca,
        other_ca=make_ca(directory, "other-ca"),
        server=issue(ca, directory, "server", ("localhost", "127.0.0.1")),
        other_host=issue(ca, directory, "other-host", (OTHER_HOST,)),
    )


def trusting(ca: Authority, *, check_hostname: bool = True) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca.cert))
    context.check_hostname = check_hostname
    return context


@contextmanager
def running_allocator(
    database_url: str, amqp_url: str, certificate: ServerCertificate, directory: Path
) -> Iterator[Allocator]:
    """`python -m services.allocator` serving HTTPS with `certificate`, once its /readyz answers 200 over TLS."""
    port = free_port()
    env = {
        **base_env(),
        "HAVIP_DATABASE_URL": database_url,
        "HAVIP_AMQP_URL": amqp_url,
        "HAVIP_API_TOKEN": TOKEN,
        "HAVIP_HOST": "127.0.0.1",
        "HAVIP_PORT": str(port),
        "HAVIP_TLS_CERT_FILE": str(certificate.cert),
        "HAVIP_TLS_KEY_FILE": str(certificate.key),
        "HAVIP_LOG_LEVEL": "INFO",
    }
    log_path = directory / f"allocator-{port}.log"
    url = f"https://127.0.0.1:{port}"
    # The readiness probe verifies the chain; the host name is another test's subject.
    context = ssl.create_default_context(cafile=str(certificate.ca))
    context.check_hostname = False
    service_logs.follow(f"allocator :{port}", log_path)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.allocator"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"the allocator exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
            try:
                return httpx.get(f"{url}/readyz", verify=context, timeout=5.0).status_code == 200
            except httpx.TransportError:
                return False

        eventually_sync(ready, timeout=START_DEADLINE_S, interval=0.1, what=f"allocator ready at {url}")
        yield Allocator(port, url, log_path)
    finally:
        terminate_group(proc, timeout=15)
        service_logs.forget(log_path)


@pytest.fixture(scope="module")
def allocator(
    database_url: str, amqp_url: str, certificates: Certificates, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Allocator]:
    with running_allocator(
        database_url, amqp_url, certificates.server, tmp_path_factory.mktemp("allocator")
    ) as running:
        yield running


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str


def havipctl(*args: str, url: str, **variables: str) -> Run:
    env = {**base_env(), "HAVIP_URL": url, "HAVIP_API_TOKEN": TOKEN, **variables}
    done = subprocess.run(
        [sys.executable, "-m", "havipctl", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=COMMAND_DEADLINE_S,
        check=False,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return Run(done.returncode, done.stdout, done.stderr)


# ---- the allocator over HTTPS -------------------------------------------------------------------------------


def test_health_readiness_and_the_api_over_https(allocator: Allocator, certificates: Certificates) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for url in (allocator.url, f"https://localhost:{allocator.port}"):
        with httpx.Client(base_url=url, verify=trusting(certificates.ca), timeout=30.0) as client:
            assert client.get("/healthz").status_code == 200
            assert client.get("/readyz").status_code == 200
            assert client.get("/v1/vpcs").status_code == 401  # the token is still asked for
            created = client.post("/v1/vpcs", json={"name": "tls", "cidr": "10.91.0.0/16"}, headers=auth)
            assert created.status_code == 201, created.text
            listed = client.get("/v1/vpcs", headers=auth)
            assert listed.status_code == 200
            assert created.json()["id"] in {vpc["id"] for vpc in listed.json()["items"]}
            assert client.delete(f"/v1/vpcs/{created.json()['id']}", headers=auth).status_code == 204
    assert "serving HTTPS on 127.0.0.1" in allocator.log.read_text()


def handshake(port: int, context: ssl.SSLContext) -> str | None:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=30.0) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        return tls.version()


def test_tls_1_2_and_1_3_are_served_and_older_versions_refused(
    allocator: Allocator, certificates: Certificates
) -> None:
    assert handshake(allocator.port, trusting(certificates.ca)) == "TLSv1.3"
    at_most_1_2 = trusting(certificates.ca)
    at_most_1_2.maximum_version = ssl.TLSVersion.TLSv1_2
    assert handshake(allocator.port, at_most_1_2) == "TLSv1.2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # ssl.TLSVersion.TLSv1_1 is: that is the point
        old = trusting(certificates.ca)
        old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
        old.set_ciphers("DEFAULT:@SECLEVEL=0")  # this client may offer TLS 1.1: the server must refuse it
    with pytest.raises(ssl.SSLError) as info:
        handshake(allocator.port, old)
    assert info.value.reason != "NO_PROTOCOLS_AVAILABLE", "the client could not even offer TLS 1.1"


def test_plain_http_to_the_tls_port_fails_clearly(allocator: Allocator, certificates: Certificates) -> None:
    plain = f"http://127.0.0.1:{allocator.port}"
    with pytest.raises(httpx.RemoteProtocolError):  # no HTTP answer at all: nothing is served in clear
        httpx.get(f"{plain}/readyz", timeout=30.0)
    result = havipctl("vpc", "list", url=plain)
    assert result.code == 3
    assert result.err == (
        f"havipctl: cannot reach the allocator at {plain}: the server speaks TLS on this port: "
        f"use https://127.0.0.1:{allocator.port}\n"
    )
    # …and the allocator goes on serving HTTPS.
    assert httpx.get(f"{allocator.url}/readyz", verify=trusting(certificates.ca), timeout=30.0).status_code == 200


# ---- havipctl verifying the allocator ----------------------------------------------------------------------


def test_havipctl_trusts_the_allocator_signed_by_its_ca_file(
    allocator: Allocator, certificates: Certificates
) -> None:
    ca = str(certificates.ca.cert)
    created = havipctl("vpc", "create", "--name", "via-tls", "--cidr", "10.92.0.0/16", "--json", "--cacert", ca,
                       url=allocator.url)  # fmt: skip
    assert created.code == 0, created.err
    vpc = json.loads(created.out)
    listed = havipctl("vpc", "list", url=f"https://localhost:{allocator.port}", HAVIP_CA_FILE=ca)
    assert listed.code == 0, listed.err
    assert vpc["id"] in listed.out
    deleted = havipctl("vpc", "delete", vpc["id"], "--cacert", ca, url=allocator.url)
    assert deleted.code == 0, deleted.err


def test_havipctl_refuses_an_allocator_its_ca_did_not_sign(
    allocator: Allocator, certificates: Certificates
) -> None:
    other = str(certificates.other_ca.cert)
    result = havipctl("vpc", "list", "--cacert", other, url=allocator.url)
    assert result.code == 3
    assert result.out == ""
    assert result.err == (
        f"havipctl: cannot verify the allocator at {allocator.url}: the server's certificate is not signed by a "
        f"CA havipctl trusts (CA file {other})\n"
    )
    as_json = havipctl("vpc", "list", "--json", url=allocator.url, HAVIP_CA_FILE=other)
    assert as_json.code == 3
    assert json.loads(as_json.err)["error"]["code"] == "SERVER_NOT_TRUSTED"


def test_without_a_ca_file_havipctl_trusts_the_systems_cas_only(allocator: Allocator) -> None:
    result = havipctl("vpc", "list", url=allocator.url)
    assert result.code == 3
    assert result.err == (
        f"havipctl: cannot verify the allocator at {allocator.url}: the server's certificate is not signed by a "
        "CA havipctl trusts (the system's CAs; give the allocator's CA with --cacert or HAVIP_CA_FILE)\n"
    )


def test_havipctl_refuses_a_certificate_for_another_host(
    database_url: str, amqp_url: str, certificates: Certificates, tmp_path: Path
) -> None:
    with running_allocator(database_url, amqp_url, certificates.other_host, tmp_path) as elsewhere:
        ca = str(certificates.ca.cert)
        for host in ("127.0.0.1", "localhost"):
            url = f"https://{host}:{elsewhere.port}"
            result = havipctl("vpc", "list", "--cacert", ca, url=url)
            assert result.code == 3
            assert result.err == (
                f"havipctl: cannot verify the allocator at {url}: the server's certificate is for {OTHER_HOST}, "
                f"not {host}\n"
            )


def test_a_ca_file_that_is_not_there_is_a_usage_error(allocator: Allocator, tmp_path: Path) -> None:
    missing = tmp_path / "absent.pem"
    result = havipctl("vpc", "list", url=allocator.url, HAVIP_CA_FILE=str(missing))
    assert (result.code, result.err) == (2, f"havipctl: HAVIP_CA_FILE: {missing} does not exist\n")


# ---- bad settings -------------------------------------------------------------------------------------------


def refused_start(tmp_path: Path, **variables: str) -> list[str]:
    """`python -m services.allocator` with these variables (and a token): it exits 2 before anything starts;
    the lines it printed after its heading."""
    env = {**base_env(), "HAVIP_API_TOKEN": TOKEN, "HAVIP_PORT": str(free_port()), **variables}
    done = subprocess.run(
        [sys.executable, "-m", "services.allocator"],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=COMMAND_DEADLINE_S,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert lines[0] == "invalid configuration:", done.stderr
    return lines[1:]


def test_the_certificate_without_its_key_is_refused(tmp_path: Path, certificates: Certificates) -> None:
    assert refused_start(tmp_path, HAVIP_TLS_CERT_FILE=str(certificates.server.cert)) == [
        "  HAVIP_TLS_KEY_FILE: not set while HAVIP_TLS_CERT_FILE is: set both to serve HTTPS, "
        "or neither to serve plain HTTP"
    ]


def test_missing_files_are_refused_one_line_each(tmp_path: Path, certificates: Certificates) -> None:
    cert, key = tmp_path / "gone.pem", tmp_path / "gone.key"
    assert refused_start(tmp_path, HAVIP_TLS_CERT_FILE=str(cert), HAVIP_TLS_KEY_FILE=str(key)) == [
        f"  HAVIP_TLS_CERT_FILE: {cert} does not exist",
        f"  HAVIP_TLS_KEY_FILE: {key} does not exist",
    ]
    key_text = certificates.server.key.read_text()
    lines = refused_start(
        tmp_path, HAVIP_TLS_CERT_FILE=str(certificates.server.cert), HAVIP_TLS_KEY_FILE=str(certificates.ca.key)
    )
    assert lines == [
        f"  HAVIP_TLS_KEY_FILE: {certificates.ca.key} is not the key of the certificate in HAVIP_TLS_CERT_FILE"
    ]
    assert not any(part in "\n".join(lines) for part in key_text.splitlines() if not part.startswith("-----"))
