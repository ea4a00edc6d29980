"""Throwaway certificates for the TLS tests, made by the `openssl` command line in a directory of the test's.

`make_ca` creates a certificate authority (a self-signed CA certificate and its key); `issue` has one sign a
server certificate for the names and addresses given (subjectAltName, extendedKeyUsage serverAuth), with a key of
its own. Keys are P-256, certificates valid for a day; nothing is kept or committed: every test makes its own.
"""

from __future__ import annotations

import ipaddress
import secrets
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

OPENSSL_DEADLINE_S = 30.0
VALID_DAYS = 1


@dataclass(frozen=True)
class Authority:
    name: str
    cert: Path  # PEM, the file a client trusts (--cacert)
    key: Path


@dataclass(frozen=True)
class ServerCertificate:
    cert: Path  # PEM, the server's certificate alone
    key: Path  # PEM, unencrypted PKCS#8
    ca: Path  # the certificate of the authority that signed it


def _openssl(*args: str) -> None:
    done = subprocess.run(
        ["openssl", *args],
        capture_output=True,
        text=True,
        timeout=OPENSSL_DEADLINE_S,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    if done.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed ({done.returncode}): {done.stderr.strip()}")


def _key(path: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path))
    path.chmod(0o600)


def make_ca(directory: Path, name: str = "ca") -> Authority:
    """A new certificate authority, its files `<name>.pem` and `<name>.key` in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _key(key)
    _openssl(
        "req", "-x509", "-new", "-key", str(key), "-out", str(cert), "-days", str(VALID_DAYS),
        "-subj", f"/CN=HAVIP test CA {name} {secrets.token_hex(4)}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return Authority(name, cert, key)


def _alt_name(host: str) -> str:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return f"DNS:{host}"
    return f"IP:{host}"


def issue(
    ca: Authority, directory: Path, name: str = "server", hosts: Sequence[str] = ("localhost", "127.0.0.1")
) -> ServerCertificate:
    """A server certificate signed by `ca` for `hosts` (names and addresses), `<name>.pem` and `<name>.key`."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    request, extensions = directory / f"{name}.csr", directory / f"{name}.ext"
    _key(key)
    _openssl("req", "-new", "-key", str(key), "-out", str(request), "-subj", f"/CN={hosts[0]}")
    extensions.write_text(
        "basicConstraints = critical, CA:FALSE\n"
        "keyUsage = critical, digitalSignature\n"
        "extendedKeyUsage = serverAuth\n"
        "subjectKeyIdentifier = hash\n"
        "authorityKeyIdentifier = keyid\n"
        f"subjectAltName = {', '.join(_alt_name(h) for h in hosts)}\n"
    )
    _openssl(
        "x509", "-req", "-in", str(request), "-CA", str(ca.cert), "-CAkey", str(ca.key),
        "-set_serial", str(secrets.randbits(63)), "-days", str(VALID_DAYS),
        "-extfile", str(extensions), "-out", str(cert),
    )  # fmt: skip
    request.unlink()
    extensions.unlink()
    return ServerCertificate(cert, key, ca.cert)


def engine_files(ca: Authority, directory: Path) -> Path:
    """`directory` holding what the clusters' scripts take (HAVIP_RABBIT_CLUSTER_TLS_DIR of rabbitmq-cluster.sh,
    PGHA_TLS_DIR of postgres-ha.sh): ca.pem, and server.pem with server-key.pem, a certificate `ca` signs for
    127.0.0.1 alone (the address every node of those clusters listens on)."""
    server = issue(ca, directory / "issued", "server", ("127.0.0.1",))
    for source, name in ((ca.cert, "ca.pem"), (server.cert, "server.pem"), (server.key, "server-key.pem")):
        shutil.copy(source, directory / name)
    return directory


def encrypted_copy(key: Path, destination: Path, passphrase: str = "not-a-secret") -> Path:
    """The key encrypted with a passphrase (a key the allocator refuses: it takes no passphrase)."""
    _openssl(
        "pkey", "-in", str(key), "-out", str(destination), "-aes256", "-passout", f"pass:{passphrase}"
    )  # fmt: skip
    destination.chmod(0o600)
    return destination
