"""The watcher's fast encoder (msgspec) writes exactly what the pydantic contract of arp.claims.observed reads."""

from __future__ import annotations

from ipaddress import IPv4Address

from hypothesis import given
from hypothesis import strategies as st

from services.arp_watcher.claims import Claim
from services.arp_watcher.encoding import encode_claims
from shared.events import CLAIMS_EVENT, SCHEMA_VERSION, ClaimsObserved, decode

claims = st.builds(
    Claim,
    kind=st.sampled_from(["garp_request", "arp_reply"]),
    vlan=st.none() | st.integers(0, 4095),
    sender_mac=st.binary(min_size=6, max_size=6),
    eth_src=st.binary(min_size=6, max_size=6),
    sender_ip=st.integers(0, 2**32 - 1),
    target_ip=st.integers(0, 2**32 - 1),
    captured_at=st.integers(1, 2**63 - 1),
    repeats=st.integers(1, 2**32 - 1),
)


@given(batch=st.lists(claims, min_size=1, max_size=50), watcher_id=st.text(min_size=1, max_size=200))
def test_what_the_fast_encoder_writes_validates_against_the_contract(batch: list[Claim], watcher_id: str) -> None:
    event = encode_claims(batch, watcher_id=watcher_id, interface="eth0", source="arp_watcher")
    env, data = decode(event.body)  # raises InvalidEvent on anything the pydantic models refuse
    assert (env.event_id, env.type, env.schema_version, env.source) == (
        event.event_id,
        CLAIMS_EVENT,
        SCHEMA_VERSION,
        "arp_watcher",
    )
    assert env.occurred_at == event.occurred_at
    assert isinstance(data, ClaimsObserved)
    assert (data.watcher_id, data.interface, event.claims) == (watcher_id, "eth0", len(batch))
    assert [
        (c.kind, c.vlan, c.sender_mac, c.eth_src, c.sender_ip, c.target_ip, c.captured_at, c.repeats)
        for c in data.claims
    ] == [
        (
            c.kind,
            c.vlan,
            c.sender_mac.hex(":"),
            c.eth_src.hex(":"),
            IPv4Address(c.sender_ip),
            IPv4Address(c.target_ip),
            c.captured_at,
            c.repeats,
        )
        for c in batch
    ]
    assert len({c.claim_id for c in data.claims}) == len(batch)
