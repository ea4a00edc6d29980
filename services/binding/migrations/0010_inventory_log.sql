-- The inventory as every binding replica follows it: one replica at a time (the active consumer of
-- binding.inventory) writes each inventory event's projection and appends the event here, in the same transaction,
-- under a transaction-level advisory lock so that `seq` grows in commit order. Every replica applies the rows past
-- the last one it applied (woken by NOTIFY havip_binding_inventory): the projection is written once per change,
-- and no replica's view is rolled back by another's. Rows are kept for a day (a replica starting loads the
-- projection and the last seq in one snapshot).
CREATE TABLE inventory_log (
    seq bigserial PRIMARY KEY,
    event_id uuid NOT NULL UNIQUE,
    body bytea NOT NULL,
    logged_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX inventory_log_logged_at ON inventory_log (logged_at);
