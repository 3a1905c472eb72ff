-- Sparkplug B sessions are numbered by the host in arrival order (ingest/sparkplug.py), not by
-- the edge node's clock. A stored BIRTH keeps the number its session was given, so that a
-- restarted host ends that session (NDEATH, DDEATH) with the number the registry holds.
-- NULL for BIRTHs stored before: their arrival time is the number. Nullable, no default: adding
-- it rewrites nothing.
ALTER TABLE sparkplug_births ADD COLUMN session bigint;
