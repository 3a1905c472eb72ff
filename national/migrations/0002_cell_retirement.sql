-- A cell taken out of service (`iiot national retire-cell`) leaves the coverage: it is no longer
-- reported stale, its snapshots are refused as from an unknown cell, and its history stays.
-- `add-cell` brings it back. Costs nothing: a nullable column.
ALTER TABLE cells ADD COLUMN retired_at timestamptz;
