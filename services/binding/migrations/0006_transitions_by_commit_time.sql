-- Recent transitions of all HAVIPs, newest first (the Grafana dashboard's history table, refreshed every few
-- seconds): without this index every refresh would scan the whole history, which is kept forever.
CREATE INDEX transitions_committed_at ON transitions (committed_at);
