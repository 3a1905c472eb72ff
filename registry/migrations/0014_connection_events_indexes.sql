-- Every change of state inserts a connection_events row; each index on it is written with every
-- event (connection events are the registry's hot path, docs/benchmarks.md). Nothing reads the
-- events by platform and time (a device's history uses connection_events_subject), so that index
-- only cost writes.
DROP INDEX connection_events_platform;
