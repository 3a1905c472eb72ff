-- Everything ingest refuses lands here with its reason and raw payload, so it can be counted,
-- inspected and replayed. Written in the same transaction as the batch it was refused from.
CREATE TABLE dead_letters (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at timestamptz NOT NULL,
    source      text NOT NULL CHECK (source IN ('mqtt', 'kafka')),
    topic       text NOT NULL,
    platform_id text,
    reason      text NOT NULL,
    detail      text NOT NULL,
    payload     bytea NOT NULL
);

CREATE INDEX dead_letters_platform_received ON dead_letters (platform_id, received_at);
