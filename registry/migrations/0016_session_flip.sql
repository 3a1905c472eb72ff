-- What the last session event did to a device, written by that event's UPDATE so that its
-- RETURNING can tell (PostgreSQL before 18 returns only the new row): whether the state
-- changed, and whether it was the device's first connection. Reading the old row in a locking
-- CTE first cost a second index scan and a lock record per device (docs/benchmarks.md).
-- Nullable and without default: adding them rewrites nothing.
ALTER TABLE devices
    ADD COLUMN session_flipped boolean,
    ADD COLUMN session_first boolean;
