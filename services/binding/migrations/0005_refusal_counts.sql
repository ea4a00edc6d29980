-- Repeats of one refusal (same address, MAC and reason) within a second are folded into one audit row: the
-- frames it stands for are counted, so a flood of spoofed frames cannot grow the table.
ALTER TABLE rejected_claims ADD COLUMN count bigint NOT NULL DEFAULT 1 CHECK (count >= 1);
CREATE INDEX rejected_claims_recorded_at ON rejected_claims (recorded_at);
