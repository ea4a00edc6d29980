-- A release says why the binding ended: the HAVIP released, its holder deregistered, or a candidate list that no
-- longer names the holder. Releases recorded before this migration did not keep it (NULL: unknown).
ALTER TABLE transitions ADD COLUMN cause text
    CHECK (cause IN ('released', 'instance_deregistered', 'candidates_changed')),
    ADD CHECK (cause IS NULL OR reason = 'release');
