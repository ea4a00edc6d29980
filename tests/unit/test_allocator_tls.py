"""The allocator's HTTPS settings: both files or neither, each checked (exists, readable, PEM, unencrypted key, the
key of that certificate), one line per problem naming the variable and never what a file holds; uvicorn's TLS
options with TLS 1.2 at the oldest. Certificates made here by tests/tls.py (the openssl command)."""

from __future__ import annotations

import io
import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi import FastAPI
from pydantic import ValidationError

from services.allocator import tls
from services.allocator.__main__ import server_config
from services.allocator.settings import AllocatorSettings
from shared.settings import print_invalid_settings
from tests.tls import encrypted_copy, issue, make_ca

TOKEN = "unit-" + "x" * 24


@dataclass(frozen=True)
class Files:
    cert: Path
    key: Path
    other_key: Path  # the key of another certificate
    encrypted_key: Path
    directory: Path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    directory = tmp_path_factory.mktemp("tls")
    ca = make_ca(directory)
    server = issue(ca, directory, "server")
    other = issue(ca, directory, "other")
    return Files(server.cert, server.key, other.key, encrypted_copy(server.key, directory / "enc.key"), directory)


def problems(monkeypatch: pytest.MonkeyPatch, **variables: str) -> list[str]:
    """The lines print_invalid_settings prints for these variables (and a token), after its heading."""
    monkeypatch.setenv("HAVIP_API_TOKEN", TOKEN)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as info:
        AllocatorSettings()
    out = io.StringIO()
    assert print_invalid_settings(AllocatorSettings, info.value, out) == 2
    lines = out.getvalue().splitlines()
    assert lines[0] == "invalid configuration:"
    return lines[1:]


def test_plain_http_without_either_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HAVIP_TLS_CERT_FILE", "")  # empty is unset
    settings = AllocatorSettings(api_token=TOKEN)
    assert (settings.tls_cert_file, settings.tls_key_file, settings.https) == (None, None, False)
    assert tls.uvicorn_options(None, None) == {}
    config = server_config(settings, FastAPI())
    config.load()
    assert config.ssl is None
    assert not config.is_ssl
    assert config.proxy_headers is False


def test_https_with_both_files_and_tls_1_2_at_the_oldest(monkeypatch: pytest.MonkeyPatch, files: Files) -> None:
    monkeypatch.setenv("HAVIP_TLS_CERT_FILE", str(files.cert))
    monkeypatch.setenv("HAVIP_TLS_KEY_FILE", str(files.key))
    settings = AllocatorSettings(api_token=TOKEN)
    assert (settings.tls_cert_file, settings.tls_key_file, settings.https) == (files.cert, files.key, True)
    config = server_config(settings, FastAPI())
    assert (config.ssl_certfile, config.ssl_keyfile) == (str(files.cert), str(files.key))
    config.load()
    assert isinstance(config.ssl, ssl.SSLContext)
    assert config.ssl.minimum_version == ssl.TLSVersion.TLSv1_2
    assert config.ssl.verify_mode == ssl.CERT_NONE  # no client certificates asked: the API has its token
    # Python's default suites (uvicorn's own default once restricted TLS 1.2 to "TLSv1", NULL ciphers included).
    names = [cipher["name"] for cipher in config.ssl.get_ciphers()]
    assert names
    assert not [n for n in names if "NULL" in n or n.startswith(("ADH", "AECDH")) or "-RC4-" in n], names


def test_the_certificate_alone_is_refused(monkeypatch: pytest.MonkeyPatch, files: Files) -> None:
    assert problems(monkeypatch, HAVIP_TLS_CERT_FILE=str(files.cert)) == [
        "  HAVIP_TLS_KEY_FILE: not set while HAVIP_TLS_CERT_FILE is: set both to serve HTTPS, "
        "or neither to serve plain HTTP"
    ]


def test_the_key_alone_is_refused(monkeypatch: pytest.MonkeyPatch, files: Files) -> None:
    assert problems(monkeypatch, HAVIP_TLS_KEY_FILE=str(files.key)) == [
        "  HAVIP_TLS_KEY_FILE: set without HAVIP_TLS_CERT_FILE: set both to serve HTTPS, "
        "or neither to serve plain HTTP"
    ]


def test_missing_files_are_one_line_each(monkeypatch: pytest.MonkeyPatch, files: Files) -> None:
    cert, key = files.directory / "absent.pem", files.directory / "absent.key"
    assert problems(monkeypatch, HAVIP_TLS_CERT_FILE=str(cert), HAVIP_TLS_KEY_FILE=str(key)) == [
        f"  HAVIP_TLS_CERT_FILE: {cert} does not exist",
        f"  HAVIP_TLS_KEY_FILE: {key} does not exist",
    ]
    # The certificate's problem alone: the key, sound, adds nothing.
    assert problems(monkeypatch, HAVIP_TLS_CERT_FILE=str(cert), HAVIP_TLS_KEY_FILE=str(files.key)) == [
        f"  HAVIP_TLS_CERT_FILE: {cert} does not exist"
    ]


def test_files_of_the_wrong_kind(monkeypatch: pytest.MonkeyPatch, files: Files) -> None:
    assert problems(monkeypatch, HAVIP_TLS_CERT_FILE=str(files.key), HAVIP_TLS_KEY_FILE=str(files.cert)) == [
        f"  HAVIP_TLS_CERT_FILE: {files.key} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
        f"  HAVIP_TLS_KEY_FILE: {files.cert} holds no PEM private key (-----BEGIN PRIVATE KEY-----)",
    ]
    assert problems(monkeypatch, HAVIP_TLS_CERT_FILE=str(files.directory), HAVIP_TLS_KEY_FILE=str(files.key)) == [
        f"  HAVIP_TLS_CERT_FILE: {files.directory} is a directory, not a file"
    ]


def test_a_key_of_another_certificate(monkeypatch: pytest.MonkeyPatch, files: Files) -> None:
    assert problems(monkeypatch, HAVIP_TLS_CERT_FILE=str(files.cert), HAVIP_TLS_KEY_FILE=str(files.other_key)) == [
        f"  HAVIP_TLS_KEY_FILE: {files.other_key} is not the key of the certificate in HAVIP_TLS_CERT_FILE"
    ]


def test_an_encrypted_key_is_refused_without_a_prompt_and_nothing_of_it_is_printed(
    monkeypatch: pytest.MonkeyPatch, files: Files
) -> None:
    lines = problems(monkeypatch, HAVIP_TLS_CERT_FILE=str(files.cert), HAVIP_TLS_KEY_FILE=str(files.encrypted_key))
    assert lines == [
        f"  HAVIP_TLS_KEY_FILE: {files.encrypted_key} holds a key encrypted with a passphrase, which the "
        "allocator does not take: give it the key unencrypted, in a file only its user can read"
    ]
    # The loading itself never prompts either: asked for a passphrase, it says so.
    with pytest.raises(ValueError, match="encrypted with a passphrase"):
        tls.check_pair(files.cert, files.encrypted_key)


def test_no_line_repeats_what_a_key_file_holds(monkeypatch: pytest.MonkeyPatch, files: Files) -> None:
    body = [line for line in files.key.read_text().splitlines() if line and not line.startswith("-----")]
    printed = "\n".join(
        problems(monkeypatch, HAVIP_TLS_CERT_FILE=str(files.key), HAVIP_TLS_KEY_FILE=str(files.other_key))
    )
    assert body
    assert not any(line in printed for line in body)


def test_an_unreadable_file_is_named(monkeypatch: pytest.MonkeyPatch, files: Files) -> None:
    # As root every file is readable: the refusal is simulated.
    def refuse(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(ValueError, match="cannot be read by this process: permission denied") as info:
        tls.check_key_file(files.key)
    assert str(info.value) == f"{files.key} cannot be read by this process: permission denied"
