"""havipctl and TLS without a server: the CA file's configuration, the verifying context, and every TLS failure
said in one line (exit 3, as for a connection that could not be made; `SERVER_NOT_TRUSTED` in --json).

The failures are raised as httpx raises them (a ConnectError caused by ssl's own error) from a mock transport;
tests/integration/test_allocator_tls.py makes them happen against a real allocator.
"""

from __future__ import annotations

import io
import json
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from havipctl import main as cli
from havipctl.client import AllocatorClient, tls_context
from havipctl.config import resolve
from havipctl.errors import ServerNotTrusted, UsageError, certificate_problem, tls_problem
from tests.tls import make_ca

URL = "https://allocator.test:8443"


def run(argv: list[str], exc: BaseException, env: dict[str, str] | None = None) -> tuple[int, str]:
    """havipctl with a transport that fails with `exc`: its exit status and stderr."""

    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    err = io.StringIO()
    code = cli.run(
        argv,
        env={"HAVIP_URL": URL, **(env or {})},
        stdout=io.StringIO(),
        stderr=err,
        transport=httpx.MockTransport(handler),
    )
    return int(code), err.getvalue()


def verify_failure(code: int, message: str) -> httpx.ConnectError:
    """A failed certificate verification as httpx reports it: its ConnectError, caused by ssl's error."""
    text = f"[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: {message}"
    cause = ssl.SSLCertVerificationError(1, text)
    cause.verify_code = code
    cause.verify_message = message
    cause.reason = "CERTIFICATE_VERIFY_FAILED"
    exc = httpx.ConnectError(str(cause))
    exc.__cause__ = cause
    return exc


def handshake_failure(reason: str, kind: type[ssl.SSLError] = ssl.SSLError) -> httpx.ConnectError:
    cause = kind(1, f"[SSL: {reason}] {reason.lower().replace('_', ' ')}")
    cause.reason = reason
    exc = httpx.ConnectError(str(cause))
    exc.__cause__ = cause
    return exc


@pytest.fixture(scope="module")
def ca_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_ca(tmp_path_factory.mktemp("ca")).cert


# ---- configuration ------------------------------------------------------------------------------------------


def test_the_ca_file_comes_from_the_flag_else_the_variable_else_the_system(tmp_path: Path, ca_file: Path) -> None:
    other = make_ca(tmp_path, "other").cert
    assert resolve({}).ca_file is None
    assert resolve({"HAVIP_CA_FILE": ""}).ca_file is None
    assert resolve({"HAVIP_CA_FILE": str(ca_file)}).ca_file == str(ca_file)
    assert resolve({"HAVIP_CA_FILE": str(ca_file)}, cacert=str(other)).ca_file == str(other)
    assert cli.build_parser().parse_args(["vpc", "list", "--cacert", "x.pem"]).cacert == "x.pem"


def test_the_broker_s_ca_file_comes_from_its_own_flag_else_its_variable(tmp_path: Path, ca_file: Path) -> None:
    other = make_ca(tmp_path, "other").cert
    assert resolve({}).amqp_ca_file is None
    assert resolve({"HAVIP_AMQP_CA_FILE": str(ca_file)}).amqp_ca_file == str(ca_file)
    assert resolve({"HAVIP_AMQP_CA_FILE": str(ca_file)}, amqp_cacert=str(other)).amqp_ca_file == str(other)
    # The allocator's CA and the broker's are not the same setting.
    assert resolve({"HAVIP_CA_FILE": str(ca_file)}).amqp_ca_file is None
    assert cli.build_parser().parse_args(["watch", "--amqp-cacert", "x.pem"]).amqp_cacert == "x.pem"
    assert cli.build_parser().parse_args(["--cacert", "x.pem", "vpc", "list"]).cacert == "x.pem"


def test_a_ca_file_that_cannot_be_used_is_a_usage_error_naming_where_it_came_from(tmp_path: Path) -> None:
    missing = tmp_path / "absent.pem"
    with pytest.raises(UsageError, match=f"^HAVIP_CA_FILE: {missing} does not exist$"):
        resolve({"HAVIP_CA_FILE": str(missing)})
    with pytest.raises(UsageError, match=f"^--cacert: {tmp_path} is a directory, not a file$"):
        resolve({}, cacert=str(tmp_path))
    not_pem = tmp_path / "notes.txt"
    not_pem.write_text("not a certificate\n")
    with pytest.raises(UsageError, match="holds no PEM certificate"):
        resolve({}, cacert=str(not_pem))
    code, err = run(["vpc", "list", "--cacert", str(missing)], AssertionError("no request expected"))
    assert (code, err) == (2, f"havipctl: --cacert: {missing} does not exist\n")


def test_the_context_verifies_the_chain_and_the_host_name_with_tls_1_2_at_the_oldest(ca_file: Path) -> None:
    for context in (tls_context(), tls_context(str(ca_file))):
        assert context.verify_mode == ssl.CERT_REQUIRED
        assert context.check_hostname
        assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert len(tls_context(str(ca_file)).get_ca_certs()) == 1  # that CA, not the system's as well


def test_the_client_has_no_way_to_skip_verification(ca_file: Path) -> None:
    with AllocatorClient(URL, ca_file=str(ca_file)) as client:
        context = client.verifying_context()
        assert (context.verify_mode, context.check_hostname) == (ssl.CERT_REQUIRED, True)
        assert context.get_ca_certs() == tls_context(str(ca_file)).get_ca_certs()
    with pytest.raises(TypeError):
        AllocatorClient(URL, verify=False)  # type: ignore[call-arg]


# ---- failures in words --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "message", "said"),
    [
        (20, "unable to get local issuer certificate", "is not signed by a CA havipctl trusts (CA file /ca.pem)"),
        (2, "unable to get issuer certificate", "is not signed by a CA havipctl trusts (CA file /ca.pem)"),
        (19, "self-signed certificate in certificate chain", "is not signed by a CA havipctl trusts"),
        (18, "self-signed certificate", "is self-signed, and not one havipctl trusts (CA file /ca.pem)"),
        (10, "certificate has expired", "has expired (or this machine's clock is wrong)"),
        (9, "certificate is not yet valid", "is not valid yet (or this machine's clock is wrong)"),
        (26, "unsupported certificate purpose", "is not one for a TLS server"),
        (62, "Hostname mismatch, certificate is not valid for 'allocator.test'.", "is not for allocator.test"),
        (23, "certificate revoked", "does not verify: certificate revoked"),
    ],
)
def test_each_verification_failure_in_words(code: int, message: str, said: str) -> None:
    error = verify_failure(code, message).__cause__
    assert isinstance(error, ssl.SSLCertVerificationError)
    assert said in certificate_problem(error, host="allocator.test", ca_file="/ca.pem")


def test_the_trust_named_without_a_ca_file_is_the_systems() -> None:
    error = verify_failure(20, "unable to get local issuer certificate").__cause__
    assert isinstance(error, ssl.SSLCertVerificationError)
    assert certificate_problem(error, host="h", ca_file=None) == (
        "the server's certificate is not signed by a CA havipctl trusts "
        "(the system's CAs; give the allocator's CA with --cacert or HAVIP_CA_FILE)"
    )


def test_an_untrusted_server_is_one_line_exit_3(ca_file: Path) -> None:
    code, err = run(["vpc", "list", "--cacert", str(ca_file)], verify_failure(20, "unable to get local issuer"))
    assert code == 3
    assert err == (
        f"havipctl: cannot verify the allocator at {URL}: the server's certificate is not signed by a CA "
        f"havipctl trusts (CA file {ca_file})\n"
    )
    code, err = run(["vpc", "list", "--json"], verify_failure(20, "unable to get local issuer"))
    assert code == 3
    error = json.loads(err)["error"]
    assert error["code"] == ServerNotTrusted.code == "SERVER_NOT_TRUSTED"
    assert error["message"].endswith("(the system's CAs; give the allocator's CA with --cacert or HAVIP_CA_FILE)")


def test_a_host_name_mismatch_names_what_the_certificate_is_for(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[ssl.SSLContext] = []

    def handshake(self: AllocatorClient, context: ssl.SSLContext) -> dict[str, Any] | None:
        seen.append(context)
        return {"subject": ((("commonName", "api.example"),),), "subjectAltName": (("DNS", "api.example"),)}

    monkeypatch.setattr(AllocatorClient, "_handshake", handshake)
    message = "Hostname mismatch, certificate is not valid for 'allocator.test'."
    code, err = run(["vpc", "list"], verify_failure(62, message))
    assert code == 3
    assert err == (
        f"havipctl: cannot verify the allocator at {URL}: the server's certificate is for api.example, "
        "not allocator.test\n"
    )
    # The names were read from a handshake that still verified the chain, only not the name.
    assert [(c.verify_mode, c.check_hostname) for c in seen] == [(ssl.CERT_REQUIRED, False)]


def test_names_from_the_common_name_when_there_is_no_alt_name(monkeypatch: pytest.MonkeyPatch) -> None:
    def handshake(self: AllocatorClient, context: ssl.SSLContext) -> dict[str, Any] | None:
        return {"subject": ((("organizationName", "x"),), (("commonName", "old.example"),))}

    monkeypatch.setattr(AllocatorClient, "_handshake", handshake)
    _, err = run(["vpc", "list"], verify_failure(64, "IP address mismatch"))
    assert "the server's certificate is for old.example, not allocator.test" in err


@pytest.mark.parametrize(
    ("reason", "kind", "said"),
    [
        ("WRONG_VERSION_NUMBER", ssl.SSLError, "the server does not speak TLS on this port (is it serving plain"),
        ("TLSV1_ALERT_PROTOCOL_VERSION", ssl.SSLError, "no TLS version in common (havipctl takes TLS 1.2"),
        ("UNEXPECTED_EOF_WHILE_READING", ssl.SSLEOFError, "closed the connection during the TLS handshake"),
        ("SSLV3_ALERT_HANDSHAKE_FAILURE", ssl.SSLError, "the TLS handshake failed: SSLV3_ALERT_HANDSHAKE_FAILURE"),
    ],
)
def test_other_handshake_failures_are_unreachable_in_words(
    reason: str, kind: type[ssl.SSLError], said: str
) -> None:
    exc = handshake_failure(reason, kind)
    assert isinstance(exc.__cause__, ssl.SSLError)
    assert said in tls_problem(exc.__cause__)
    code, err = run(["vpc", "list"], exc)
    assert code == 3
    assert err.startswith(f"havipctl: cannot reach the allocator at {URL}: ")
    assert said in err
    assert err.count("\n") == 1


def test_plain_http_to_a_tls_port_says_to_use_https(monkeypatch: pytest.MonkeyPatch) -> None:
    speaks_tls: Callable[[AllocatorClient], bool] = lambda self: True  # noqa: E731
    monkeypatch.setattr(AllocatorClient, "_speaks_tls", speaks_tls)
    code, err = run(
        ["vpc", "list", "--url", "http://127.0.0.1:8443"],
        httpx.RemoteProtocolError("Server disconnected without sending a response."),
    )
    assert code == 3
    assert err == (
        "havipctl: cannot reach the allocator at http://127.0.0.1:8443: the server speaks TLS on this port: "
        "use https://127.0.0.1:8443\n"
    )
