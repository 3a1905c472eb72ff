-- The national aggregator's own database (national/): the cells it trusts, every snapshot they
-- delivered (the signed bytes kept as received, so anyone can verify them again), every
-- refusal, the platforms each cell holds, and the national figures sampled over time.

-- A cell and its Ed25519 public key (`iiot national add-cell`). `next_sequence` is the only
-- number the aggregator takes from it next; the rest describes its latest accepted snapshot.
CREATE TABLE cells (
    name             text PRIMARY KEY CHECK (name ~ '^[a-z0-9][a-z0-9-]{0,62}$'),
    public_key       bytea NOT NULL CHECK (length(public_key) = 32),
    added_at         timestamptz NOT NULL DEFAULT now(),
    next_sequence    bigint NOT NULL DEFAULT 1,
    interval_seconds double precision,
    last_taken_at    timestamptz,
    last_received_at timestamptz,
    -- The enterprise list of the latest snapshot, by digest: an unchanged list is not rewritten.
    enterprises_sha256 bytea
);

-- Every accepted snapshot. `body` is the exact signed bytes (dropped after
-- IIOT_NATIONAL_BODY_RETENTION_DAYS but for each cell's latest); digest and signature stay.
-- The figures are the sums over the platforms whose figures were accepted from it.
CREATE TABLE snapshots (
    cell                text NOT NULL REFERENCES cells (name),
    sequence            bigint NOT NULL CHECK (sequence >= 1),
    taken_at            timestamptz NOT NULL,
    received_at         timestamptz NOT NULL DEFAULT now(),
    took_seconds        double precision NOT NULL,
    interval_seconds    double precision NOT NULL,
    definitions_version text NOT NULL,
    body_sha256         bytea NOT NULL,
    signature           bytea NOT NULL,
    body                bytea,
    platforms           integer NOT NULL,
    refused_platforms   integer NOT NULL,
    registered          bigint NOT NULL,
    connected           bigint NOT NULL,
    ever_connected      bigint NOT NULL,
    active_24h          bigint NOT NULL,
    active_30d          bigint NOT NULL,
    -- The distinct-device sketch (DataSketches HLL, compact bytes) and its exact companions.
    sketch              bytea NOT NULL,
    sketch_lg_k         smallint NOT NULL,
    sketch_target       text NOT NULL,
    identities          bigint NOT NULL,
    connected_without_identity bigint NOT NULL,
    PRIMARY KEY (cell, sequence)
);
CREATE INDEX snapshots_by_time ON snapshots (taken_at);

-- Every refused request: what the cell claimed to be, why, and the digest of what it sent.
CREATE TABLE refusals (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at timestamptz NOT NULL DEFAULT now(),
    cell        text NOT NULL,
    sequence    bigint,
    reason      text NOT NULL,
    detail      text NOT NULL,
    body_sha256 bytea NOT NULL,
    body_bytes  integer NOT NULL
);
CREATE INDEX refusals_by_cell ON refusals (cell, id);

-- Each platform counted nationally, with the figures of the latest snapshot that counted it
-- from the cell holding it. `released_to`: the holder released it to that cell (moving); until
-- that cell claims it, these last figures of the source keep counting, once.
CREATE TABLE platforms (
    id             text PRIMARY KEY,
    cell           text NOT NULL REFERENCES cells (name),
    sequence       bigint NOT NULL,
    taken_at       timestamptz NOT NULL,
    name           text NOT NULL,
    tier           text NOT NULL,
    type           text NOT NULL,
    region         text NOT NULL,
    industry_code  text,
    industry_text  text NOT NULL,
    registered     bigint NOT NULL,
    connected      bigint NOT NULL,
    ever_connected bigint NOT NULL,
    active_24h     bigint NOT NULL,
    active_30d     bigint NOT NULL,
    activity_as_of timestamptz,
    released_to    text,
    released_at    timestamptz
);
CREATE INDEX platforms_by_cell ON platforms (cell);

-- A platform's figures refused because another cell holds it (the alert's source).
CREATE TABLE conflicts (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    platform    text NOT NULL,
    claimed_by  text NOT NULL,
    sequence    bigint NOT NULL,
    held_by     text NOT NULL,
    reason      text NOT NULL
);

-- Moves between cells: released by the source (signed, in its snapshot), claimed by the
-- destination's first snapshot that lists the platform.
CREATE TABLE moves (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    platform         text NOT NULL,
    from_cell        text NOT NULL,
    to_cell          text NOT NULL,
    released_at      timestamptz NOT NULL,
    release_sequence bigint NOT NULL,
    claimed_at       timestamptz,
    claim_sequence   bigint
);
CREATE UNIQUE INDEX moves_open ON moves (platform) WHERE claimed_at IS NULL;

-- The enterprises of each cell's latest snapshot (keyed hashes; the key is never held here).
CREATE TABLE cell_enterprises (
    cell          text NOT NULL REFERENCES cells (name),
    code_hmac     text NOT NULL,
    key_id        text NOT NULL,
    region        text NOT NULL,
    industry_code text,
    above_size    boolean NOT NULL,
    active_30d    boolean NOT NULL,
    served        boolean NOT NULL,
    PRIMARY KEY (cell, code_hmac)
);

-- Keys of the national viewers (the ministry's readers): `iiotn_<prefix>_<secret>`, stored as
-- the SHA-256 digest of the whole key.
CREATE TABLE viewer_keys (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    prefix     text NOT NULL UNIQUE,
    digest     bytea NOT NULL,
    name       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);

-- National figures over time: a sample per minute (kept a week), an hourly one beyond (the
-- minute sample last in each hour). Recomputed for past minutes when a cell delivers snapshots
-- it kept while it could not reach the aggregator, so the history is complete.
CREATE TABLE national_samples (
    resolution          text NOT NULL CHECK (resolution IN ('minute', 'hour')),
    at                  timestamptz NOT NULL,
    cells               integer NOT NULL,
    cells_stale         integer NOT NULL,
    oldest_age_seconds  double precision,
    platforms           integer NOT NULL,
    registered          bigint NOT NULL,
    connected           bigint NOT NULL,
    ever_connected      bigint NOT NULL,
    active_24h          bigint NOT NULL,
    active_30d          bigint NOT NULL,
    distinct_connected  double precision NOT NULL,
    distinct_lower      double precision NOT NULL,
    distinct_upper      double precision NOT NULL,
    PRIMARY KEY (resolution, at)
);
-- The earliest minute a late snapshot touched since the sampler last ran (one row).
CREATE TABLE history_backlog (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    since    timestamptz NOT NULL
);

-- Official totals, as the cells' store has them (registry/official_totals.py reads and writes
-- these through the same statements), and the penetration numerators per region and division,
-- computed from the fresh cells' enterprises.
CREATE TABLE enterprise_total_imports (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    imported_at timestamptz NOT NULL DEFAULT now(),
    source      text NOT NULL CHECK (length(source) BETWEEN 1 AND 1000),
    file_name   text NOT NULL,
    sha256      text NOT NULL,
    rows        integer NOT NULL
);
CREATE TABLE enterprise_totals (
    import_id   bigint NOT NULL REFERENCES enterprise_total_imports (id),
    year        smallint NOT NULL CHECK (year BETWEEN 1990 AND 2100),
    region      text NOT NULL CHECK (region ~ '^[0-9]{6}$'),
    industry    text NOT NULL CHECK (industry ~ '^([BCD]|[0-9]{2})?$'),
    enterprises bigint NOT NULL CHECK (enterprises >= 0),
    PRIMARY KEY (import_id, year, region, industry)
);
CREATE TABLE penetration_cells (
    region        text NOT NULL,
    industry      text NOT NULL,
    above_size    boolean NOT NULL,
    served        bigint NOT NULL,
    connected_30d bigint NOT NULL,
    PRIMARY KEY (region, industry, above_size)
);
CREATE TABLE penetration_runs (
    only_row     boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    as_of        timestamptz NOT NULL,
    key_id       text,
    enterprises  bigint NOT NULL,
    disagreements bigint NOT NULL,
    cells        text[] NOT NULL,
    excluded_cells text[] NOT NULL
);
CREATE TABLE penetration_disagreements (
    code_hmac  text PRIMARY KEY,
    industry   text,
    reported   jsonb NOT NULL
);
