"""The claim rule (docs/contract.md#claims), and the claim of the arp.claims.observed event it produces."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.arp_watcher.claims import Claim, ClaimMemo, claim_from_frame, classify
from services.arp_watcher.encoding import encode_claims
from services.arp_watcher.frames import ARP_REPLY, ARP_REQUEST, ArpFrame, MalformedFrame, parse_frame
from shared.events import ClaimsObserved, ObservedClaim, decode
from tests.lab.arp_frames import build_arp_frame

MAC_A = bytes.fromhex("02000000000a")
MAC_B = bytes.fromhex("02000000000b")
VIP = int(IPv4Address("192.0.2.10"))
HOST = int(IPv4Address("192.0.2.1"))
T = 1_700_000_000_123_456_789


def frame(
    oper: int,
    sender_ip: int,
    target_ip: int,
    *,
    eth_src: bytes | None = None,
    vlan_tags: tuple[tuple[int, int], ...] = (),
    aux_vlan: int | None = None,
) -> ArpFrame:
    data = build_arp_frame(
        oper=oper, sender_mac=MAC_A, sender_ip=sender_ip, target_ip=target_ip, eth_src=eth_src, vlan_tags=vlan_tags
    )
    return parse_frame(data, aux_vlan)


def observe(parsed: ArpFrame, *, captured_at: int) -> ObservedClaim | None:
    """The claim as a consumer reads it: written by the fast encoder, read through the pydantic contract."""
    claim = claim_from_frame(parsed, captured_at)
    if claim is None:
        return None
    event = encode_claims([claim], watcher_id="h1/eth0", interface="eth0", source="arp_watcher")
    env, data = decode(event.body)
    assert env.event_id == event.event_id
    assert isinstance(data, ClaimsObserved)
    assert (data.watcher_id, data.interface) == ("h1/eth0", "eth0")
    [observed] = data.claims
    return observed


def test_gratuitous_request_is_a_claim() -> None:
    event = observe(frame(ARP_REQUEST, VIP, VIP), captured_at=T)
    assert event is not None
    assert event == ObservedClaim(
        claim_id=event.claim_id,
        vlan=None,
        kind="garp_request",
        sender_mac="02:00:00:00:00:0a",
        eth_src="02:00:00:00:00:0a",
        sender_ip=IPv4Address("192.0.2.10"),
        target_ip=IPv4Address("192.0.2.10"),
        captured_at=T,
        repeats=1,
    )


def test_reply_is_a_claim() -> None:
    event = observe(frame(ARP_REPLY, VIP, HOST), captured_at=T)
    assert event is not None
    assert event.kind == "arp_reply"
    assert (event.sender_ip, event.target_ip) == (IPv4Address("192.0.2.10"), IPv4Address("192.0.2.1"))


def test_gratuitous_reply_is_a_claim() -> None:
    assert classify(frame(ARP_REPLY, VIP, VIP)) == "arp_reply"


def test_probe_is_not_a_claim() -> None:
    assert classify(frame(ARP_REQUEST, 0, VIP)) is None


def test_all_zero_request_is_not_a_claim() -> None:
    assert classify(frame(ARP_REQUEST, 0, 0)) is None


def test_reply_from_zero_address_is_not_a_claim() -> None:
    assert classify(frame(ARP_REPLY, 0, HOST)) is None


def test_ordinary_request_is_not_a_claim() -> None:
    assert classify(frame(ARP_REQUEST, HOST, VIP)) is None


@pytest.mark.parametrize("oper", [0, 3, 4, 8, 9, 0xFFFF])
def test_other_opcodes_are_not_claims(oper: int) -> None:
    assert classify(frame(oper, VIP, VIP)) is None


def test_eth_mismatch_is_still_emitted_with_both_macs() -> None:
    event = observe(frame(ARP_REQUEST, VIP, VIP, eth_src=MAC_B), captured_at=T)
    assert event is not None
    assert (event.sender_mac, event.eth_src) == ("02:00:00:00:00:0a", "02:00:00:00:00:0b")


def test_tagged_frame_reports_its_vlan() -> None:
    event = observe(frame(ARP_REQUEST, VIP, VIP, vlan_tags=((0x8100, 100),)), captured_at=T)
    assert event is not None
    assert event.vlan == 100


def test_vlan_from_auxdata_is_reported() -> None:
    claim = claim_from_frame(frame(ARP_REQUEST, VIP, VIP, aux_vlan=42), T)
    assert claim is not None
    assert claim.vlan == 42


def test_claim_is_compact_and_event_round_trips_through_the_envelope() -> None:
    claim = claim_from_frame(frame(ARP_REQUEST, VIP, VIP), T)
    assert claim == Claim("garp_request", None, MAC_A, MAC_A, VIP, VIP, T, 1)
    event = encode_claims([claim, claim._replace(repeats=5)], watcher_id="w", interface="eth0", source="w")
    decoded_env, data = decode(event.body)
    assert decoded_env.type == "arp.claims.observed"
    assert isinstance(data, ClaimsObserved)
    assert [(c.captured_at, c.sender_ip, c.repeats) for c in data.claims] == [
        (T, IPv4Address("192.0.2.10"), 1),
        (T, IPv4Address("192.0.2.10"), 5),
    ]
    assert data.claims[0].claim_id != data.claims[1].claim_id


@given(
    oper=st.integers(min_value=0, max_value=0xFFFF),
    sender_ip=st.integers(min_value=0, max_value=2**32 - 1),
    target_ip=st.integers(min_value=0, max_value=2**32 - 1),
    sender_mac=st.binary(min_size=6, max_size=6),
    eth_src=st.binary(min_size=6, max_size=6),
    aux_vlan=st.none() | st.integers(min_value=0, max_value=0xFFFF),
    captured_at=st.integers(min_value=1, max_value=2**63 - 1),
)
def test_rule_and_event_for_any_arp_frame(
    oper: int,
    sender_ip: int,
    target_ip: int,
    sender_mac: bytes,
    eth_src: bytes,
    aux_vlan: int | None,
    captured_at: int,
) -> None:
    parsed = parse_frame(
        build_arp_frame(
            oper=oper, sender_mac=sender_mac, eth_src=eth_src, sender_ip=sender_ip, target_ip=target_ip
        ),
        aux_vlan,
    )
    expected = None
    if oper == ARP_REQUEST and sender_ip != 0 and sender_ip == target_ip:
        expected = "garp_request"
    elif oper == ARP_REPLY and sender_ip != 0:
        expected = "arp_reply"
    assert classify(parsed) == expected
    # Every claim makes a valid event (pydantic validates it), whatever the addresses.
    event = observe(parsed, captured_at=captured_at)
    assert (event is None) == (expected is None)
    if event is not None:
        assert event.sender_mac == sender_mac.hex(":")
        assert event.eth_src == eth_src.hex(":")
        assert event.sender_ip == IPv4Address(sender_ip)
        assert event.vlan == (None if aux_vlan is None else aux_vlan & 0x0FFF)


@given(
    frames=st.lists(
        st.tuples(
            st.sampled_from([ARP_REQUEST, ARP_REPLY, 3]),
            st.sampled_from([0, VIP, HOST]),
            st.sampled_from([0, VIP, HOST]),
            st.sampled_from([MAC_A, MAC_B]),
            st.none() | st.sampled_from([0, 7, 0x1007]),
            st.booleans(),  # cut short: malformed
        ),
        max_size=40,
    ),
    max_frames=st.integers(min_value=1, max_value=8),
)
def test_the_memo_gives_what_parsing_gives_for_repeated_frames_and_stays_bounded(
    frames: list[tuple[int, int, int, bytes, int | None, bool]], max_frames: int
) -> None:
    memo = ClaimMemo(max_frames)
    for i, (oper, sender_ip, target_ip, mac, aux_vlan, cut) in enumerate(frames):
        data = build_arp_frame(oper=oper, sender_mac=mac, sender_ip=sender_ip, target_ip=target_ip)
        if cut:
            data = data[:30]
        captured_at = T + i
        try:
            expected: Claim | type[Exception] | None = claim_from_frame(parse_frame(data, aux_vlan), captured_at)
        except MalformedFrame:
            expected = MalformedFrame
        try:
            got: Claim | type[Exception] | None = memo.claim(data, aux_vlan, captured_at)
        except MalformedFrame:
            got = MalformedFrame
        assert got == expected
        assert len(memo) <= max_frames
