"""Request models, page tokens and settings of the allocator (no I/O)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from ipaddress import IPv4Network
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from services.allocator.errors import InvalidPageToken
from services.allocator.havips.schemas import HavipCreate
from services.allocator.instances.schemas import InstanceCreate
from services.allocator.pagination import Cursor, decode_cursor, decode_sequence, encode_cursor, encode_sequence
from services.allocator.schemas import normalise_mac, rfc3339
from services.allocator.settings import AllocatorSettings
from services.allocator.vpcs.schemas import VpcCreate

ROOT = Path(__file__).resolve().parents[2]
SUBNET = uuid.uuid4()


@pytest.mark.parametrize(
    "spelling",
    ["02:00:C0:00:02:0A", "02-00-c0-00-02-0a", "0200.c000.020a", "0200C000020A", " 02:00:c0:00:02:0a "],
)
def test_mac_spellings_normalise_to_lowercase_colons(spelling: str) -> None:
    assert normalise_mac(spelling) == "02:00:c0:00:02:0a"
    body = {"subnet_id": str(SUBNET), "name": "a", "private_ip": "10.0.0.5", "mac": spelling}
    assert InstanceCreate.model_validate(body).mac == "02:00:c0:00:02:0a"


@pytest.mark.parametrize(
    "bad",
    ["", "02:00:c0:00:02", "02:00:c0:00:02:0g", "01:00:5e:00:00:01", "00:00:00:00:00:00", "02:00:c0:00:02:0a:0b"],
)
def test_bad_macs_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - ValidationError is a ValueError
        normalise_mac(bad)


@pytest.mark.parametrize(
    ("cidr", "ok"),
    [
        ("10.0.0.0/16", True),
        ("192.0.2.0/29", True),
        ("10.0.0.1/16", False),  # host bits set
        ("10.0.0.0", False),  # no prefix
        ("10.0.0.0/30", False),  # too small
        ("10.0.0.0/7", False),  # too large
        ("2001:db8::/32", False),  # IPv6 is a later goal
        ("224.0.0.0/8", False),
        ("10.0.0.0/33", False),
        ("banana", False),
        (" 10.0.0.0/16", False),  # the documented shape exactly: no padding,
        ("10.0.0.0/16\n", False),
        ("10.0.0.0/016", False),  # no leading zeros
        ("010.0.0.0/16", False),
        ("10.0.0.0/255.255.0.0", False),  # no netmask spelling
    ],
)
def test_vpc_cidr(cidr: str, ok: bool) -> None:
    body = {"name": "v", "cidr": cidr}
    if ok:
        assert VpcCreate.model_validate(body).cidr == IPv4Network(cidr)
    else:
        with pytest.raises(ValidationError):
            VpcCreate.model_validate(body)


@pytest.mark.parametrize("name", ["", "   ", "a\x00b", "tab\there", "x" * 65, "\ud800"])
def test_names_must_be_printable_text(name: str) -> None:
    with pytest.raises(ValidationError):
        VpcCreate.model_validate({"name": name, "cidr": "10.0.0.0/16"})


def test_name_is_stripped_and_extra_fields_refused() -> None:
    assert VpcCreate.model_validate({"name": "  prod ", "cidr": "10.0.0.0/16"}).name == "prod"
    with pytest.raises(ValidationError):
        VpcCreate.model_validate({"name": "prod", "cidr": "10.0.0.0/16", "surprise": 1})


def test_candidates_at_most_ten_and_distinct() -> None:
    ids = [uuid.uuid4() for _ in range(11)]
    assert len(HavipCreate(subnet_id=SUBNET, candidates=ids[:10]).candidates) == 10
    with pytest.raises(ValidationError):
        HavipCreate(subnet_id=SUBNET, candidates=ids)
    with pytest.raises(ValidationError):
        HavipCreate(subnet_id=SUBNET, candidates=[ids[0], ids[0]])


def test_fingerprint_depends_on_the_body_only() -> None:
    a = HavipCreate.model_validate({"subnet_id": str(SUBNET), "name": "x"})
    b = HavipCreate.model_validate({"name": "x", "subnet_id": str(SUBNET)})
    c = HavipCreate.model_validate({"subnet_id": str(SUBNET), "name": "y"})
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_rfc3339_always_has_microseconds() -> None:
    assert rfc3339(datetime(2025, 1, 31, 12, 0, tzinfo=UTC)) == "2025-01-31T12:00:00.000000Z"


@given(st.datetimes(timezones=st.just(UTC)), st.uuids())
def test_cursor_round_trip(when: datetime, ident: uuid.UUID) -> None:
    assert decode_cursor(encode_cursor(Cursor(when, ident))) == Cursor(when, ident)


@given(st.integers(min_value=1, max_value=2**63 - 1))
def test_sequence_token_round_trip(sequence: int) -> None:
    assert decode_sequence(encode_sequence(sequence)) == sequence


@given(st.text(max_size=300))
def test_any_page_token_is_refused_cleanly_or_decoded(token: str) -> None:
    for decode in (decode_cursor, decode_sequence):
        with contextlib.suppress(InvalidPageToken):
            decode(token)


def test_settings_need_a_token_unless_insecure() -> None:
    with pytest.raises(ValidationError, match="HAVIP_API_TOKEN"):
        AllocatorSettings(api_token=None)
    assert AllocatorSettings(api_token=None, insecure_no_auth=True).api_token is None
    for bad in ("", "with space", "t\u00e9st", "x" * 513):
        with pytest.raises(ValidationError, match="1 to 512"):
            AllocatorSettings(api_token=bad)
    assert AllocatorSettings(api_token="e2e-token").weak_token
    strong = AllocatorSettings(api_token="x" * 16, havip_quota_per_vpc=3)
    assert strong.havip_quota_per_vpc == 3
    assert not strong.weak_token


def test_bad_configuration_exits_2_without_leaking_the_token() -> None:
    env = {"PATH": "/usr/bin:/bin", "HAVIP_API_TOKEN": "sh ort-secret", "HAVIP_PORT": "99999"}
    result = subprocess.run(
        [sys.executable, "-m", "services.allocator"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2, result.stderr
    assert "HAVIP_API_TOKEN" in result.stderr
    assert "HAVIP_PORT" in result.stderr
    assert "sh ort-secret" not in result.stderr

    result = subprocess.run(
        [sys.executable, "-m", "services.allocator"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "no API token configured" in result.stderr
