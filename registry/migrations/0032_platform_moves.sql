-- A platform moved to another cell (`iiot platform export --move-to`, docs/scaling.md) stays here
-- as a record of where it went: its traffic is refused as `platform_moved` naming the new cell,
-- and it no longer counts in this cell. Both columns are set together, or neither.
ALTER TABLE platforms
    ADD COLUMN moved_to text CHECK (moved_to ~ '^[a-z0-9][a-z0-9-]{0,62}$'),
    ADD COLUMN moved_at timestamptz,
    ADD CONSTRAINT platforms_moved_together CHECK ((moved_to IS NULL) = (moved_at IS NULL));
