"""TLS towards RabbitMQ and Postgres: HAVIP_AMQP_CA_FILE and the URLs it goes with, a DSN's sslrootcert checked at
start, and what a failed verification says (the CA that does not vouch for the server, the names a certificate is
for). Certificates made here by tests/tls.py (the openssl command); the errors are built as the libraries raise
them (the live ones: tests/integration/test_engines_tls.py)."""

from __future__ import annotations

import io
import ssl
from dataclasses import dataclass
from pathlib import Path

import aiormq
import pytest
from pydantic import ValidationError

from shared.db import database_address, describe_database_error
from shared.messaging import NoBrokerNode, broker_tls_context, describe_broker_error
from shared.settings import CommonSettings, print_invalid_settings
from shared.tls import CertificateNotForHost, check_ca_file
from tests.tls import issue, make_ca

TLS_NODES = "amqps://havip:secret@10.0.0.1:5671/havip,amqps://havip:secret@10.0.0.2:5671/havip"


@dataclass(frozen=True)
class Files:
    ca: Path
    server_cert: Path  # not a CA
    not_pem: Path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    directory = tmp_path_factory.mktemp("tls")
    ca = make_ca(directory)
    server = issue(ca, directory)
    not_pem = directory / "notes.txt"
    not_pem.write_text("not a certificate\n")
    return Files(ca.cert, server.cert, not_pem)


def verification_error(code: int, message: str) -> ssl.SSLCertVerificationError:
    """As Python's ssl module raises it."""
    error = ssl.SSLCertVerificationError(
        1, f"[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: {message}"
    )
    error.verify_code = code
    error.verify_message = message
    return error


def as_aiormq_raises(cause: OSError) -> aiormq.exceptions.AMQPConnectionError:
    """aiormq's TLS transport raises its own error from the ssl module's (its TLSTransportFactory)."""
    try:
        raise aiormq.exceptions.AMQPConnectionError(*cause.args) from cause
    except aiormq.exceptions.AMQPConnectionError as raised:
        return raised


def invalid(**values: object) -> str:
    with pytest.raises(ValidationError) as raised:
        CommonSettings(**values)  # type: ignore[arg-type]
    out = io.StringIO()
    print_invalid_settings(CommonSettings, raised.value, out)
    return out.getvalue()


# --- the settings ----------------------------------------------------------------------------------------------


def test_amqps_nodes_are_verified_against_the_ca_file(files: Files) -> None:
    settings = CommonSettings(amqp_url=TLS_NODES, amqp_ca_file=files.ca)
    assert settings.amqp_tls
    context = broker_tls_context(settings)
    assert context is not None
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert len(context.get_ca_certs()) == 1


def test_amqps_without_a_ca_file_trusts_the_systems_cas() -> None:
    settings = CommonSettings(amqp_url=TLS_NODES)
    context = broker_tls_context(settings)
    assert context is not None
    assert context.check_hostname


def test_plain_amqp_has_no_tls() -> None:
    assert broker_tls_context(CommonSettings(amqp_url="amqp://guest:guest@127.0.0.1:5672/")) is None


def test_a_ca_file_with_plain_amqp_is_refused(files: Files) -> None:
    said = invalid(amqp_url="amqp://havip:secret@10.0.0.1:5672/havip", amqp_ca_file=files.ca)
    assert "HAVIP_AMQP_CA_FILE is set but HAVIP_AMQP_URL names amqp:// nodes (no TLS)" in said
    assert "secret" not in said


def test_tls_to_some_nodes_only_is_refused() -> None:
    said = invalid(amqp_url="amqps://havip:secret@10.0.0.1:5671/havip,amqp://havip:secret@10.0.0.2:5672/havip")
    assert "HAVIP_AMQP_URL: some broker URLs are amqps:// and others amqp://" in said
    assert "secret" not in said


@pytest.mark.parametrize("option", ["cafile=/etc/ca.pem", "no_verify_ssl=1", "certfile=/c.pem&keyfile=/k.pem"])
def test_tls_options_in_a_url_are_refused(option: str) -> None:
    said = invalid(amqp_url=f"amqps://havip:secret@10.0.0.1:5671/havip?{option}")
    assert "HAVIP_AMQP_URL: broker URL 1 sets" in said
    assert "HAVIP_AMQP_CA_FILE" in said
    assert "verification cannot be switched off" in said
    assert "secret" not in said


def test_a_ca_file_that_is_not_one_is_refused(files: Files, tmp_path: Path) -> None:
    assert "HAVIP_AMQP_CA_FILE: " in invalid(amqp_url=TLS_NODES, amqp_ca_file=files.not_pem)
    with pytest.raises(ValueError, match="holds no PEM certificate"):
        check_ca_file(files.not_pem)
    with pytest.raises(ValueError, match="is not a file"):
        check_ca_file(tmp_path / "missing.pem")
    with pytest.raises(ValueError, match="holds no CA certificate"):
        check_ca_file(files.server_cert)


def test_a_database_url_naming_a_missing_ca_is_refused_at_start(files: Files, tmp_path: Path) -> None:
    dsn = f"postgresql://havip:secret@db:5432/havip?sslmode=verify-full&sslrootcert={tmp_path / 'none.pem'}"
    said = invalid(database_url=dsn)
    assert "HAVIP_DATABASE_URL: " in said
    assert "is not a file" in said
    assert "secret" not in said
    ok = f"postgresql://havip@db:5432/havip?sslmode=verify-full&sslrootcert={files.ca}"
    assert CommonSettings(database_url=ok).database_url == ok


# --- what a failed verification says --------------------------------------------------------------------------

NOT_SIGNED = verification_error(20, "unable to get local issuer certificate")
WRONG_IP = verification_error(64, "IP address mismatch, certificate is not valid for '10.0.0.1'.")


def test_a_broker_certificate_not_signed_by_the_ca() -> None:
    said = describe_broker_error(
        as_aiormq_raises(NOT_SIGNED), "amqps://havip:secret@10.0.0.1:5671/", "/etc/ca.pem"
    )
    assert said == (
        "the certificate of RabbitMQ at 10.0.0.1:5671 is not signed by the CA in /etc/ca.pem "
        "(unable to get local issuer certificate)"
    )


def test_a_broker_certificate_for_other_names() -> None:
    mismatch = CertificateNotForHost("10.0.0.1", ("rabbit.example", "10.9.9.9"), WRONG_IP)
    said = describe_broker_error(mismatch, "amqps://havip:secret@10.0.0.1:5671/", "/etc/ca.pem")
    assert said == "the certificate of RabbitMQ at 10.0.0.1:5671 is for rabbit.example, 10.9.9.9, not 10.0.0.1"
    # The names could not be read: the library's words.
    said = describe_broker_error(as_aiormq_raises(WRONG_IP), "amqps://havip:secret@10.0.0.1:5671/")
    assert said == (
        "the certificate of RabbitMQ at 10.0.0.1:5671 is not for the host name connected to: "
        "IP address mismatch, certificate is not valid for '10.0.0.1'."
    )


def test_each_node_of_a_cluster_says_its_own() -> None:
    urls = TLS_NODES.split(",")
    said = describe_broker_error(
        NoBrokerNode([(urls[0], as_aiormq_raises(NOT_SIGNED)), (urls[1], ConnectionRefusedError(111, "refused"))]),
        urls[0],
        "/etc/ca.pem",
    )
    assert said == (
        "no RabbitMQ node can be used: the certificate of RabbitMQ at 10.0.0.1:5671 is not signed by the CA in "
        "/etc/ca.pem (unable to get local issuer certificate); nothing accepts connections at 10.0.0.2:5671 "
        "(is RabbitMQ running?)"
    )


def test_expired_and_plain_ports() -> None:
    expired = verification_error(10, "certificate has expired")
    assert describe_broker_error(expired, "amqps://h:5671/") == "the certificate of RabbitMQ at h:5671 has expired"
    plain = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    plain.reason = "WRONG_VERSION_NUMBER"
    assert describe_broker_error(as_aiormq_raises(plain), "amqps://h:5672/") == (
        "RabbitMQ at h:5672 does not speak TLS there (a plain port?)"
    )


def test_a_database_certificate_not_signed_by_the_ca_names_sslrootcert() -> None:
    dsn = "postgresql://havip:secret@10.0.0.1:5433,10.0.0.2/havip?sslmode=verify-full&sslrootcert=/etc/pg-ca.pem"
    assert database_address(dsn).tls_ca == "/etc/pg-ca.pem"
    said = describe_database_error(NOT_SIGNED, dsn)
    assert said == (
        "the certificate of PostgreSQL at 10.0.0.1:5433 or 10.0.0.2:5432 is not signed by the CA in "
        "/etc/pg-ca.pem (unable to get local issuer certificate)"
    )
    mismatch = CertificateNotForHost("10.0.0.1", ("db.example",), WRONG_IP)
    assert describe_database_error(mismatch, dsn) == (
        "the certificate of PostgreSQL at 10.0.0.1:5433 or 10.0.0.2:5432 is for db.example, not 10.0.0.1"
    )


def test_a_database_without_tls_where_the_url_asks_for_it() -> None:
    dsn = "postgresql://havip@10.0.0.1/havip?sslmode=verify-full&sslrootcert=/etc/pg-ca.pem"
    rejected = ConnectionError('PostgreSQL server at "10.0.0.1:5432" rejected SSL upgrade')
    assert describe_database_error(rejected, dsn) == (
        "PostgreSQL at 10.0.0.1:5432 does not accept TLS, which the URL's sslmode requires "
        "(its ssl setting is off)"
    )


def test_verify_full_without_sslrootcert_uses_the_users_root_crt() -> None:
    assert database_address("postgresql://h/db?sslmode=verify-full").tls_ca == "~/.postgresql/root.crt"
    assert database_address("postgresql://h/db?sslmode=require").tls_ca is None
