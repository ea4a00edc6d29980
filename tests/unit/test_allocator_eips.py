"""The EIP pool (parsing, membership, lowest free address), the EIP and idempotency settings and the request
models (no I/O)."""

from __future__ import annotations

import uuid
from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from services.allocator.domain.eips import MAX_ENTRIES, EipPool
from services.allocator.errors import InvalidPageToken
from services.allocator.havips.schemas import EipAssociate, HavipUpdate
from services.allocator.pagination import decode_record, decode_sequence, encode_record, encode_sequence
from services.allocator.settings import AllocatorSettings


def addresses(pool: EipPool) -> list[str]:
    return [str(IPv4Address(a)) for first, last in pool.ranges for a in range(first, last + 1)]


# ---- the pool ----------------------------------------------------------------------------------------------


def test_empty_pool() -> None:
    for spec in ("", " ", ",", " , ,"):
        pool = EipPool.parse(spec)
        assert pool.ranges == ()
        assert pool.size == 0
        assert pool.lowest_free([]) is None
        assert IPv4Address("203.0.113.1") not in pool


def test_blocks_give_their_hosts_and_addresses_themselves() -> None:
    assert addresses(EipPool.parse("203.0.113.8/30")) == ["203.0.113.9", "203.0.113.10"]
    assert addresses(EipPool.parse("203.0.113.8/31")) == ["203.0.113.8", "203.0.113.9"]
    assert addresses(EipPool.parse("203.0.113.8/32")) == ["203.0.113.8"]
    assert addresses(EipPool.parse("203.0.113.0")) == ["203.0.113.0"]  # a single address is taken as written
    assert EipPool.parse("203.0.113.0/24").size == 254
    assert EipPool.parse("198.51.100.0/28, 198.51.100.7 ,203.0.113.5").size == 15  # .7 is inside the block


def test_entries_merge_and_sort() -> None:
    pool = EipPool.parse("203.0.113.20, 203.0.113.8/30, 203.0.113.11, 203.0.113.12, 198.51.100.1")
    assert pool.describe() == "198.51.100.1, 203.0.113.9-203.0.113.12, 203.0.113.20"
    assert pool.size == 6
    assert EipPool.parse("203.0.113.0/28, 203.0.113.0/29").size == 14


@pytest.mark.parametrize(
    "spec",
    [
        "203.0.113.1/24",  # host bits set
        "203.0.113.300",
        "2001:db8::1",
        "nope",
        "203.0.113.0/33",
        "127.0.0.1",
        "224.0.0.0/24",
        "0.0.0.0/0",
        "169.254.1.1",
        "240.0.0.1",
        "203.0.113.1;203.0.113.2",
    ],
)
def test_refused_entries(spec: str) -> None:
    with pytest.raises(ValueError, match="EIP pool entry"):
        EipPool.parse(spec)


def test_too_many_entries() -> None:
    spec = ",".join(str(IPv4Address("198.18.0.0") + i) for i in range(MAX_ENTRIES + 1))
    with pytest.raises(ValueError, match="at most"):
        EipPool.parse(spec)


def test_membership() -> None:
    pool = EipPool.parse("203.0.113.8/30, 198.51.100.7")
    assert IPv4Address("203.0.113.9") in pool
    assert IPv4Address("203.0.113.10") in pool
    assert IPv4Address("203.0.113.8") not in pool
    assert IPv4Address("203.0.113.11") not in pool
    assert IPv4Address("198.51.100.7") in pool
    assert IPv4Address("0.0.0.0") not in pool
    assert IPv4Address("255.255.255.255") not in pool
    assert "203.0.113.9" not in pool  # only addresses


def test_lowest_free() -> None:
    pool = EipPool.parse("203.0.113.8/30, 203.0.113.20")
    a = IPv4Address
    assert pool.lowest_free([]) == a("203.0.113.9")
    assert pool.lowest_free([a("203.0.113.9")]) == a("203.0.113.10")
    assert pool.lowest_free([a("203.0.113.10")]) == a("203.0.113.9")
    assert pool.lowest_free([a("203.0.113.9"), a("203.0.113.10")]) == a("203.0.113.20")
    assert pool.lowest_free([a("203.0.113.9"), a("203.0.113.10"), a("203.0.113.20")]) is None
    # addresses outside the pool (e.g. left over from an earlier configuration) do not count
    assert pool.lowest_free([a("203.0.113.8"), a("10.0.0.1"), a("203.0.113.9")]) == a("203.0.113.10")


BASE = int(IPv4Address("198.18.0.0"))  # the benchmarking range: unicast, in no one's way


def _block(offset_prefix: tuple[int, int]) -> IPv4Network:
    offset, prefix = offset_prefix
    mask = (2**32 - 1) ^ ((1 << (32 - prefix)) - 1)
    return IPv4Network(((BASE + offset) & mask, prefix))


@given(
    blocks=st.lists(st.tuples(st.integers(0, 2047), st.integers(26, 32)).map(_block), max_size=6),
    taken_offsets=st.sets(st.integers(0, 2047), max_size=300),
)
def test_lowest_free_is_the_lowest_untaken_address_of_the_pool(
    blocks: list[IPv4Network], taken_offsets: set[int]
) -> None:
    pool = EipPool.parse(",".join(str(b) for b in blocks))
    taken = [IPv4Address(BASE + o) for o in taken_offsets]
    members = sorted({int(h) for b in blocks for h in b.hosts()})
    assert pool.size == len(members)
    expected = next((m for m in members if IPv4Address(m) not in set(taken)), None)
    assert pool.lowest_free(taken) == (None if expected is None else IPv4Address(expected))
    for m in members[:50]:
        assert IPv4Address(m) in pool


# ---- settings ----------------------------------------------------------------------------------------------


def settings(**fields: object) -> AllocatorSettings:
    return AllocatorSettings(api_token="t" * 32, **fields)  # type: ignore[arg-type]


def test_eip_pool_setting() -> None:
    assert settings().eip_pool == ""
    assert settings().eips.size == 0
    assert settings(eip_pool="203.0.113.0/28").eips.size == 14
    with pytest.raises(ValidationError, match=r"EIP pool entry '10\.0\.0\.1/8'"):
        settings(eip_pool="203.0.113.0/28, 10.0.0.1/8")


def test_eip_pool_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HAVIP_EIP_POOL", "203.0.113.0/29, 198.51.100.9")
    monkeypatch.setenv("HAVIP_IDEMPOTENCY_TTL_HOURS", "48")
    monkeypatch.setenv("HAVIP_IDEMPOTENCY_PURGE_INTERVAL_S", "30")
    loaded = AllocatorSettings(api_token="t" * 32)
    assert loaded.eips.size == 7
    assert loaded.idempotency_ttl_hours == 48
    assert loaded.idempotency_purge_interval_s == 30


def test_idempotency_keys_are_kept_at_least_a_day() -> None:
    assert settings().idempotency_ttl_hours == 24
    assert settings().idempotency_purge_interval_s == 600
    for hours in (0, 1, 23):
        with pytest.raises(ValidationError):
            settings(idempotency_ttl_hours=hours)
    with pytest.raises(ValidationError):
        settings(idempotency_purge_interval_s=0)


# ---- request models ----------------------------------------------------------------------------------------


def test_patch_distinguishes_left_out_from_null() -> None:
    empty = HavipUpdate.model_validate({})
    assert not empty.changes_name
    assert not empty.changes_candidates
    cleared = HavipUpdate.model_validate({"name": None, "candidates": []})
    assert cleared.changes_name
    assert cleared.name is None
    assert cleared.changes_candidates
    assert cleared.candidates == []
    ids = [str(uuid.uuid4()) for _ in range(10)]
    assert HavipUpdate.model_validate({"candidates": ids}).candidates == [uuid.UUID(i) for i in ids]
    assert HavipUpdate.model_validate({"name": "  db  "}).name == "db"


@pytest.mark.parametrize(
    "body",
    [
        {"candidates": None},
        {"candidates": ["x"]},
        {"candidates": [str(uuid.uuid4())] * 2},
        {"candidates": [str(uuid.uuid4()) for _ in range(11)]},
        {"name": ""},
        {"name": "   "},
        {"name": "a\x00b"},
        {"name": 5},
        {"address": "10.0.0.5"},
    ],
)
def test_patch_refuses(body: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        HavipUpdate.model_validate(body)


def test_eip_request() -> None:
    assert EipAssociate.model_validate({}).address is None
    assert EipAssociate.model_validate({"address": "203.0.113.5"}).address == IPv4Address("203.0.113.5")
    for bad in ({"address": "203.0.113.0/24"}, {"address": "::1"}, {"eip": "203.0.113.5"}):
        with pytest.raises(ValidationError):
            EipAssociate.model_validate(bad)


# ---- page tokens of the histories --------------------------------------------------------------------------


@given(st.integers(1, 2**63 - 1))
def test_record_tokens_round_trip(record_id: int) -> None:
    assert decode_record(encode_record(record_id)) == record_id


def test_history_tokens_are_not_interchangeable() -> None:
    with pytest.raises(InvalidPageToken):
        decode_record(encode_sequence(5))
    with pytest.raises(InvalidPageToken):
        decode_sequence(encode_record(5))
    for token in ("", "AAAA", "W10", "eyJyIjowfQ", "eyJyIjp0cnVlfQ", "eyJyIjoxLjV9"):  # [], {"r":0|true|1.5}
        with pytest.raises(InvalidPageToken):
            decode_record(token)
