-- PostgreSQL evaluates a table's CHECK constraints on every UPDATE of a row, whatever columns it
-- changes: the pattern of device and gateway ids cost a regular expression per connection event,
-- a fifth of PostgreSQL's CPU in the registry benchmark (perf, docs/benchmarks.md). A domain's
-- check runs only where a value is assigned to the column (registration, a changed id).
-- The domain gets its check after the columns change type: changing to a domain without checks
-- rewrites nothing, and adding the check then validates the existing ids in one scan.
CREATE DOMAIN external_id AS text;

ALTER TABLE devices
    DROP CONSTRAINT devices_device_id_check,
    ALTER COLUMN device_id TYPE external_id;
ALTER TABLE gateways
    DROP CONSTRAINT gateways_gateway_id_check,
    ALTER COLUMN gateway_id TYPE external_id;

ALTER DOMAIN external_id ADD CONSTRAINT external_id_pattern
    CHECK (VALUE ~ '^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$');
