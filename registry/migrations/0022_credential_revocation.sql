-- A revoked MQTT credential stays revoked until an operator issues a new one: its row is kept
-- and marked instead of deleted, so that the client cannot fall back to its platform's
-- provisioning secret (which admits only clients without a credential of their own). Adding a
-- nullable column without a default changes the catalog only; no row is rewritten.
ALTER TABLE credentials ADD COLUMN revoked_at timestamptz;
