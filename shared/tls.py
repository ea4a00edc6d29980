"""TLS towards the engines (RabbitMQ, Postgres): the client context that verifies a server against a CA, the
check of a CA file at start, and what a failed verification means in an operator's words.

A verification that fails on the host name leaves no certificate to look at in the exception: `names_for` opens
a second connection, verifying the chain against the same CA but not the host name, to read the names the
certificate is for (its subjectAltName), which `CertificateNotForHost` carries into the message.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
from collections.abc import Iterator
from pathlib import Path

# OpenSSL's X509_V_ERR_* codes (ssl.SSLCertVerificationError.verify_code) that mean: the chain does not lead to a
# CA the client trusts.
_NOT_SIGNED = {
    2,  # UNABLE_TO_GET_ISSUER_CERT
    7,  # CERT_SIGNATURE_FAILURE
    18,  # DEPTH_ZERO_SELF_SIGNED_CERT
    19,  # SELF_SIGNED_CERT_IN_CHAIN
    20,  # UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    21,  # UNABLE_TO_VERIFY_LEAF_SIGNATURE
}
_NOT_YET_VALID, _EXPIRED = 9, 10
_NOT_FOR_HOST = {62, 64}  # HOSTNAME_MISMATCH, IP_ADDRESS_MISMATCH
NAMES_TIMEOUT_S = 3.0
_POSTGRES_SSL_REQUEST = struct.pack("!ll", 8, 80877103)


def client_context(ca_file: str | Path | None) -> ssl.SSLContext:
    """Verifies the server's chain against the CA certificates in `ca_file` (PEM; None: the system's) and its host
    name; TLS 1.2 or later."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=None if ca_file is None else str(ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def check_ca_file(path: str | Path) -> None:
    """ValueError, in words, unless `path` is a readable file of PEM CA certificates."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"{file} is not a file")
    try:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cafile=str(file))
    except PermissionError:
        raise ValueError(f"{file} cannot be read (permissions)") from None
    except (ssl.SSLError, OSError, ValueError):
        raise ValueError(f"{file} holds no PEM certificate") from None
    if not context.get_ca_certs():
        raise ValueError(f"{file} holds no CA certificate (a server's certificate instead?)")


class CertificateNotForHost(OSError):
    """The server's certificate is signed by a trusted CA but for other names than the host connected to."""

    def __init__(self, host: str, names: tuple[str, ...], cause: ssl.SSLCertVerificationError) -> None:
        super().__init__(f"the certificate is for {', '.join(names) or 'no name'}, not {host}")
        self.host = host
        self.names = names
        self.cause = cause


def verification_failure(exc: BaseException | None) -> ssl.SSLCertVerificationError | None:
    """The certificate verification failure `exc` is, or wraps (aiormq raises its own error from it)."""
    for cause in _chain(exc):
        if isinstance(cause, ssl.SSLCertVerificationError):
            return cause
    return None


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def not_tls(exc: BaseException | None) -> bool:
    """A handshake that failed because the other end does not speak TLS (a plain port)."""
    return any(
        isinstance(cause, ssl.SSLError) and cause.reason in ("WRONG_VERSION_NUMBER", "PACKET_LENGTH_TOO_LONG")
        for cause in _chain(exc)
    )


def describe_tls_failure(exc: BaseException, what: str, where: str, ca: str | None) -> str | None:
    """What a failed TLS handshake with `what` (e.g. "RabbitMQ") at `where` (host:port) means, in words; None if
    `exc` is no TLS failure. `ca`: the CA file the client trusts (None: the system's CAs)."""
    trusted = f"the CA in {ca}" if ca else "the system's CAs"
    subject = f"the certificate of {what} at {where}"
    for cause in _chain(exc):
        if isinstance(cause, CertificateNotForHost):
            return f"{subject} is for {', '.join(cause.names) or 'no host name'}, not {cause.host}"
    failure = verification_failure(exc)
    if failure is not None:
        code = failure.verify_code
        if code in _NOT_FOR_HOST:
            return f"{subject} is not for the host name connected to: {failure.verify_message}"
        if code in _NOT_SIGNED:
            return f"{subject} is not signed by {trusted} ({failure.verify_message})"
        if code == _EXPIRED:
            return f"{subject} has expired"
        if code == _NOT_YET_VALID:
            return f"{subject} is not valid yet (is this machine's clock right?)"
        return f"{subject} cannot be verified against {trusted}: {failure.verify_message}"
    if not_tls(exc):
        return f"{what} at {where} does not speak TLS there (a plain port?)"
    for cause in _chain(exc):
        if isinstance(cause, ssl.SSLError):
            return f"the TLS handshake with {what} at {where} failed: {cause.reason or cause}"
    return None


async def names_for(host: str, port: int, context: ssl.SSLContext, *, postgres: bool = False) -> tuple[str, ...]:
    """The names (subjectAltName, else the common name) of the certificate the server at host:port presents,
    its chain verified with `context`'s CAs, its host name not; `postgres`: ask for TLS the Postgres way first.
    Empty if it cannot be read."""
    lenient = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain (CERT_REQUIRED)
    lenient.check_hostname = False
    cadata = _ca_pem(context)
    if cadata:
        lenient.load_verify_locations(cadata=cadata)
    else:  # the system's CAs, from a directory (which get_ca_certs does not list)
        lenient.load_default_certs()
    with contextlib.suppress(OSError, TimeoutError, ValueError, EOFError, asyncio.IncompleteReadError):
        async with asyncio.timeout(NAMES_TIMEOUT_S):
            if postgres:
                reader, writer = await asyncio.open_connection(host, port)
                try:
                    writer.write(_POSTGRES_SSL_REQUEST)
                    if await reader.readexactly(1) != b"S":
                        return ()
                    await writer.start_tls(lenient, server_hostname=host)
                    return _names(writer.get_extra_info("peercert"))
                finally:
                    writer.close()
            reader, writer = await asyncio.open_connection(host, port, ssl=lenient, server_hostname=host)
            try:
                return _names(writer.get_extra_info("peercert"))
            finally:
                writer.close()
    return ()


def _ca_pem(context: ssl.SSLContext) -> str:
    return "".join(ssl.DER_cert_to_PEM_cert(der) for der in context.get_ca_certs(binary_form=True))


def _names(peercert: object) -> tuple[str, ...]:
    if not isinstance(peercert, dict):
        return ()
    names = tuple(str(value).strip() for _kind, value in peercert.get("subjectAltName", ()))
    if names:
        return names
    return tuple(str(value) for rdn in peercert.get("subject", ()) for key, value in rdn if key == "commonName")


async def naming_the_certificate(
    exc: BaseException, host: str | None, port: int | None, context: ssl.SSLContext, *, postgres: bool = False
) -> BaseException:
    """`exc`, or — for a certificate for another host name than `host` — CertificateNotForHost with the names it
    is for (read from the server at host:port)."""
    failure = verification_failure(exc)
    if failure is None or failure.verify_code not in _NOT_FOR_HOST or host is None or port is None:
        return exc
    names = await names_for(host, port, context, postgres=postgres)
    if not names:
        return exc
    return CertificateNotForHost(host, names, failure)
