"""What can go wrong in havipctl, the exit status of each, and the code it has in `--json` error output.

| status | meaning | `--json` code |
|---|---|---|
| 0 | success | — |
| 1 | the allocator refused (its code), or answered without its error shape | e.g. `ADDRESS_IN_USE`; `HTTP_502` |
| 1 | the answer is not the allocator's API at all (not JSON, wrong shape) | `UNEXPECTED_RESPONSE` |
| 2 | bad usage: unknown command, missing or malformed argument, bad configuration value | `USAGE_ERROR` |
| 3 | the allocator (or, for `watch`, RabbitMQ) cannot be reached: refused, timeout, DNS, TLS | `UNREACHABLE` |
| 3 | the allocator's certificate does not verify (CA, host name, dates) | `SERVER_NOT_TRUSTED` |
| 4 | authentication failed: HTTP 401 (check the token), or RabbitMQ refused the login | `AUTHENTICATION_FAILED` |
| 5 | `watch --count N --timeout S`: the time ran out before N events arrived | `WATCH_TIMEOUT` |
| 70 | an unexpected internal error (a bug in havipctl; one line, never a traceback) | `INTERNAL_ERROR` |
| 130 | interrupted (Ctrl-C) outside `watch` | `INTERRUPTED` |

A TLS failure is said in words (`tls_problem`, `certificate_problem`): what OpenSSL reports as a verify code or a
reason, put as what is wrong with the server's certificate and what havipctl trusts.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from enum import IntEnum
from typing import Any


class ExitCode(IntEnum):
    OK = 0
    API_ERROR = 1
    USAGE = 2
    UNREACHABLE = 3
    AUTHENTICATION = 4
    WATCH_TIMEOUT = 5
    INTERNAL = 70
    INTERRUPTED = 130


class HavipctlError(Exception):
    """An error havipctl reports before exiting with `exit_code`: one line on stderr, or with --json
    `{"error": {"code": "UPPER_SNAKE", "message": "..."}}` (as_json)."""

    exit_code: ExitCode = ExitCode.INTERNAL
    code: str = "INTERNAL_ERROR"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def as_json(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}


class UsageError(HavipctlError):
    """A configuration value (flag or environment variable) that cannot be used."""

    exit_code = ExitCode.USAGE
    code = "USAGE_ERROR"


class BadArguments(UsageError):
    """argparse refused the command line: the parser's program name and usage come with its message."""

    def __init__(self, prog: str, problem: str, usage: str) -> None:
        super().__init__(f"{prog}: {problem}")
        self.prog = prog
        self.problem = problem
        self.usage = usage

    def as_text(self) -> str:
        """Exactly what argparse itself prints: the usage, then `prog: error: message`."""
        return f"{self.usage}{self.prog}: error: {self.problem}\n"


class Unreachable(HavipctlError):
    """No answer from the allocator or the broker: refused, timed out, unknown host."""

    exit_code = ExitCode.UNREACHABLE
    code = "UNREACHABLE"


class ServerNotTrusted(Unreachable):
    """The allocator's TLS certificate failed verification: havipctl does not talk to a server it cannot verify
    (exit status 3, as for any connection that could not be made)."""

    code = "SERVER_NOT_TRUSTED"


class AuthenticationFailed(HavipctlError):
    exit_code = ExitCode.AUTHENTICATION
    code = "AUTHENTICATION_FAILED"


class ApiError(HavipctlError):
    """The allocator refused the request: its HTTP status and the code, message (and details) of its error."""

    exit_code = ExitCode.API_ERROR

    def __init__(self, status: int, code: str, message: str, details: list[Any] | None = None) -> None:
        super().__init__(f"{code} (HTTP {status}): {message}")
        self.status = status
        self.code = code
        self.detail = message
        self.details = details

    def as_json(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.detail, "status": self.status}
        if self.details:
            error["details"] = self.details
        return {"error": error}


class UnexpectedResponse(HavipctlError):
    """An answer that is not the allocator's API (not JSON, wrong shape): a proxy, or the wrong URL."""

    exit_code = ExitCode.API_ERROR
    code = "UNEXPECTED_RESPONSE"


class WatchTimedOut(HavipctlError):
    exit_code = ExitCode.WATCH_TIMEOUT
    code = "WATCH_TIMEOUT"


class Interrupted(HavipctlError):
    exit_code = ExitCode.INTERRUPTED
    code = "INTERRUPTED"


class InternalError(HavipctlError):
    """A bug in havipctl, reported like any other error: one line (or one JSON object), never a traceback."""


# ---- TLS failures in words ----------------------------------------------------------------------------------

# OpenSSL's X509_V_ERR_* codes, as ssl.SSLCertVerificationError.verify_code gives them.
_UNTRUSTED_ISSUER = frozenset(
    {
        2,  # UNABLE_TO_GET_ISSUER_CERT
        19,  # SELF_SIGNED_CERT_IN_CHAIN
        20,  # UNABLE_TO_GET_ISSUER_CERT_LOCALLY
        21,  # UNABLE_TO_VERIFY_LEAF_SIGNATURE
    }
)
_SIGNATURE_FAILURE = 7
_NOT_YET_VALID = 9
_EXPIRED = 10
_SELF_SIGNED = 18  # DEPTH_ZERO_SELF_SIGNED_CERT
_INVALID_PURPOSE = 26
_HOSTNAME_MISMATCH = 62
_IP_ADDRESS_MISMATCH = 64
# The certificate is sound but for other names: then the names it is for are worth looking up.
HOST_MISMATCH = frozenset({_HOSTNAME_MISMATCH, _IP_ADDRESS_MISMATCH})

# ssl.SSLError.reason of handshakes that failed before any certificate was looked at.
_NOT_TLS = frozenset({"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST"})
_NO_COMMON_VERSION = frozenset(
    {"TLSV1_ALERT_PROTOCOL_VERSION", "UNSUPPORTED_PROTOCOL", "NO_PROTOCOLS_AVAILABLE", "WRONG_SSL_VERSION"}
)


ALLOCATOR_CA = "give the allocator's CA with --cacert or HAVIP_CA_FILE"
BROKER_CA = "give the broker's CA with --amqp-cacert or HAVIP_AMQP_CA_FILE"


def trust_description(ca_file: str | None, give_ca: str = ALLOCATOR_CA) -> str:
    """What havipctl verifies the server against, as messages name it; `give_ca`: how to name another CA."""
    if ca_file is None:
        return f"the system's CAs; {give_ca}"
    return f"CA file {ca_file}"


def certificate_problem(
    error: ssl.SSLCertVerificationError,
    *,
    host: str,
    ca_file: str | None,
    names: Sequence[str] | None = None,
    give_ca: str = ALLOCATOR_CA,
) -> str:
    """What is wrong with the server's certificate, in words; `names`: those the certificate is for, when known
    (they are only looked up when the host name did not match)."""
    code = error.verify_code
    trust = trust_description(ca_file, give_ca)
    if code in _UNTRUSTED_ISSUER:
        return f"the server's certificate is not signed by a CA havipctl trusts ({trust})"
    if code == _SELF_SIGNED:
        return f"the server's certificate is self-signed, and not one havipctl trusts ({trust})"
    if code in HOST_MISMATCH:
        if names:
            return f"the server's certificate is for {', '.join(names)}, not {host}"
        return f"the server's certificate is not for {host}"
    if code == _EXPIRED:
        return "the server's certificate has expired (or this machine's clock is wrong)"
    if code == _NOT_YET_VALID:
        return "the server's certificate is not valid yet (or this machine's clock is wrong)"
    if code == _INVALID_PURPOSE:
        return "the server's certificate is not one for a TLS server (its key usage or extended key usage)"
    if code == _SIGNATURE_FAILURE:
        return "the signature on the server's certificate does not verify"
    said = error.verify_message or error.reason or str(error)
    return f"the server's certificate does not verify: {said}"


def tls_problem(error: ssl.SSLError) -> str:
    """A TLS handshake that failed for another reason than the certificate, in words."""
    if error.reason in _NOT_TLS:
        return "the server does not speak TLS on this port (is it serving plain HTTP?)"
    if error.reason in _NO_COMMON_VERSION:
        return "the server and havipctl have no TLS version in common (havipctl takes TLS 1.2 or later)"
    if isinstance(error, ssl.SSLEOFError):
        return "the server closed the connection during the TLS handshake"
    return f"the TLS handshake failed: {error.reason or error}"
