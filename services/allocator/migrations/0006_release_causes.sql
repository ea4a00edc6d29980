-- The cause of a release, as the binding service's events tell it (NULL for claims, and for releases published
-- before events carried it).
ALTER TABLE view_transitions ADD COLUMN cause text
    CHECK (cause IN ('released', 'instance_deregistered', 'candidates_changed')),
    ADD CHECK (cause IS NULL OR reason = 'release');
