-- What the last session event did to a device or gateway, written by that event's UPDATE so
-- that its RETURNING can tell (PostgreSQL before 18 returns only the new row): whether the
-- state changed, and whether it was the first connection. Reading the old rows in a locking
-- CTE first cost a second index scan and a lock record per row (docs/benchmarks.md).
-- Nullable and without default: adding them rewrites nothing.
ALTER TABLE devices
    ADD COLUMN session_flipped boolean,
    ADD COLUMN session_first boolean;
ALTER TABLE gateways
    ADD COLUMN session_flipped boolean,
    ADD COLUMN session_first boolean;
