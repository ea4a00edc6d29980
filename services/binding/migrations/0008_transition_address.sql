-- Each transition keeps the HAVIP's address, so that it can be published again (havip.binding.replayed, asked
-- for by a reader that missed it) also after the HAVIP is gone. Rows of HAVIPs released before this migration
-- keep no address and are not replayed.
ALTER TABLE transitions ADD COLUMN address inet CHECK (masklen(address) = 32);
UPDATE transitions t SET address = b.address FROM bindings b WHERE b.havip_id = t.havip_id;
-- (0001's note that the allocator reads bindings, transitions and rejected_claims no longer holds: it keeps a
-- view of its own from this service's events, and its database role has no right on this schema.)
