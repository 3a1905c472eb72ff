-- The cell's national snapshots (national/cell/, docs/operations.md): each built snapshot is kept
-- here, signed, until the aggregator has taken it, so a cell that cannot reach the aggregator (or
-- is killed) delivers its history in order when it is back. One row per snapshot (about one a
-- minute, a few kilobytes each); delivered rows are deleted after a retention period.

-- The last sequence number taken, in its own row: it survives the deletion of delivered
-- snapshots, and taking it in the snapshot's transaction leaves no gap and reuses no number.
-- `delivered`: every snapshot up to it has been taken by the aggregator.
CREATE TABLE national_sequence (
    only_row  boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    last      bigint NOT NULL CHECK (last >= 0),
    delivered bigint NOT NULL CHECK (delivered >= 0)
);
INSERT INTO national_sequence (last, delivered) VALUES (0, 0);

CREATE TABLE national_outbox (
    sequence     bigint PRIMARY KEY CHECK (sequence >= 1),
    -- The exact bytes sent and their Ed25519 signature: a retry resends the same bytes.
    body         bytea NOT NULL,
    signature    bytea NOT NULL CHECK (length(signature) = 64),
    taken_at     timestamptz NOT NULL,
    built_at     timestamptz NOT NULL DEFAULT now(),
    delivered_at timestamptz
);
-- Undelivered snapshots, oldest first: what the pusher sends next.
CREATE INDEX national_outbox_undelivered ON national_outbox (sequence)
    WHERE delivered_at IS NULL;

-- Why deliveries failed, counted per reason (for /metrics), and whether delivery is halted: an
-- answer that retrying cannot change (the aggregator holds other bytes under one of our numbers)
-- stops delivery until an operator resumes it (`iiot national push --resume`).
CREATE TABLE national_push_failures (
    reason      text PRIMARY KEY,
    failures    bigint NOT NULL,
    last_at     timestamptz NOT NULL,
    last_detail text NOT NULL
);
CREATE TABLE national_push_halt (
    only_row  boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    reason    text NOT NULL,
    sequence  bigint NOT NULL,
    detail    text NOT NULL,
    halted_at timestamptz NOT NULL DEFAULT now()
);
