-- Claims carry an id of their own (arp.claims.observed): a redelivered claim that was refused is recognised and
-- neither audited nor published a second time.
ALTER TABLE rejected_claims ADD COLUMN claim_id uuid;
CREATE UNIQUE INDEX rejected_claims_claim_id ON rejected_claims (claim_id);
