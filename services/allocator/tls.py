"""The allocator's HTTPS: the checks of `HAVIP_TLS_CERT_FILE` and `HAVIP_TLS_KEY_FILE`, and uvicorn's TLS options.

Each check raises ValueError in words naming the file (its path, never what it holds: a key is a secret), which
the settings report as one line naming the variable. The server's TLS context is uvicorn's own (certificate
chain and key loaded by `ssl.SSLContext.load_cert_chain`) with TLS 1.2 as the oldest version it accepts.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn

MINIMUM_TLS_VERSION = ssl.TLSVersion.TLSv1_2

_CERTIFICATE_MARK = b"-----BEGIN CERTIFICATE-----"
_KEY_MARKS = (
    b"-----BEGIN PRIVATE KEY-----",
    b"-----BEGIN RSA PRIVATE KEY-----",
    b"-----BEGIN EC PRIVATE KEY-----",
)
_ENCRYPTED_KEY_MARKS = (b"-----BEGIN ENCRYPTED PRIVATE KEY-----", b"Proc-Type: 4,ENCRYPTED")


class _PassphraseAsked(Exception):
    """OpenSSL asked for the key's passphrase (without a callback it would prompt on the terminal)."""


def _read(path: Path) -> bytes:
    """The file's bytes; ValueError saying why it cannot be read."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a directory, not a file") from None
    except PermissionError:
        raise ValueError(f"{path} cannot be read by this process: permission denied") from None
    except OSError as exc:
        raise ValueError(f"{path} cannot be read: {exc.strerror or exc}") from None


def check_certificate_file(path: Path) -> None:
    """A readable file holding a PEM certificate (the server's, optionally followed by its intermediates)."""
    if _CERTIFICATE_MARK not in _read(path):
        raise ValueError(f"{path} holds no PEM certificate ({_CERTIFICATE_MARK.decode()})")


def check_key_file(path: Path) -> None:
    """A readable file holding an unencrypted PEM private key."""
    content = _read(path)
    if any(mark in content for mark in _ENCRYPTED_KEY_MARKS):
        raise ValueError(
            f"{path} holds a key encrypted with a passphrase, which the allocator does not take: "
            "give it the key unencrypted, in a file only its user can read"
        )
    if not any(mark in content for mark in _KEY_MARKS):
        raise ValueError(f"{path} holds no PEM private key ({_KEY_MARKS[0].decode()})")


def check_pair(certificate: Path, key: Path) -> None:
    """The certificate and the key load together as uvicorn will load them; ValueError saying what is wrong
    (reported as the key's problem)."""

    def no_passphrase() -> str:
        raise _PassphraseAsked

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(certificate, key, no_passphrase)
    except _PassphraseAsked:
        raise ValueError(f"{key} holds a key encrypted with a passphrase: the allocator takes none") from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ValueError(f"{key} is not the key of the certificate in HAVIP_TLS_CERT_FILE") from None
        raise ValueError(
            f"{key} and the certificate in HAVIP_TLS_CERT_FILE cannot be used together: {exc.reason or exc}"
        ) from None


def server_context(config: uvicorn.Config, default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
    """uvicorn's `ssl_context_factory`: its own context (the configured files loaded), TLS 1.2 at the oldest."""
    context = default()
    context.minimum_version = MINIMUM_TLS_VERSION
    return context


def uvicorn_options(certificate: Path | None, key: Path | None) -> dict[str, Any]:
    """The arguments of uvicorn.Config that make it serve HTTPS; none (plain HTTP) without a certificate."""
    if certificate is None or key is None:
        return {}
    return {"ssl_certfile": str(certificate), "ssl_keyfile": str(key), "ssl_context_factory": server_context}
