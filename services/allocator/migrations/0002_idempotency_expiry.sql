-- Idempotency keys expire (HAVIP_IDEMPOTENCY_TTL_HOURS, at least 24): the purge deletes by age.
CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);
