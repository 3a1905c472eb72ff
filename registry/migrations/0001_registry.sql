-- Platforms, devices and the metric-name dictionary.
-- Identifier rules are documented in docs/contract.md and mirrored in registry/ids.py.

CREATE TABLE platforms (
    id               text PRIMARY KEY CHECK (id ~ '^[a-z0-9][a-z0-9-]{0,62}$'),
    name             text NOT NULL,
    tier             text NOT NULL DEFAULT 'basic'
                     CHECK (tier IN ('basic', 'growth', 'leading', 'ecosystem')),
    type             text NOT NULL DEFAULT 'professional'
                     CHECK (type IN ('professional', 'industry', 'collaborative')),
    region           text NOT NULL DEFAULT '000000',
    industry         text NOT NULL DEFAULT 'unspecified',
    -- A device is "connected" while its latest data arrived within this window (docs/counts.md).
    liveness_seconds integer NOT NULL DEFAULT 300 CHECK (liveness_seconds BETWEEN 1 AND 86400),
    auto_provision   boolean NOT NULL DEFAULT true,
    metadata         jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE devices (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    platform_id text NOT NULL REFERENCES platforms (id),
    device_id   text NOT NULL CHECK (device_id ~ '^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$'),
    metadata    jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    -- Server receive time of the newest live (not back-filled) data; NULL until the first.
    first_seen  timestamptz,
    last_seen   timestamptz,
    UNIQUE (platform_id, device_id)
);

-- Telemetry stores metric ids, not names: a narrow row and a small index.
CREATE TABLE metrics (
    id   integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name text NOT NULL UNIQUE
);
