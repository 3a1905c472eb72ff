-- The dashboard's recent ingest rate reads the last hour of a platform's ledger rows.
CREATE INDEX usage_ledger_recent ON usage_ledger (platform_id, recorded_at);
