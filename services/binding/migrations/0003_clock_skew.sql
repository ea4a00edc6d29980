-- A claim captured too far ahead of the binding service's clock is refused and audited as clock_skew.
ALTER TABLE rejected_claims DROP CONSTRAINT rejected_claims_reason_check;
ALTER TABLE rejected_claims ADD CONSTRAINT rejected_claims_reason_check
    CHECK (reason IN ('unknown_mac', 'other_subnet', 'not_candidate', 'eth_mismatch', 'clock_skew'));
