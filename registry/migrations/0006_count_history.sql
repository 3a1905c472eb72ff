-- Each platform's counts sampled once per interval (default a minute), for charts and reports.
CREATE TABLE count_history (
    time           timestamptz NOT NULL,
    platform_id    text NOT NULL,
    registered     bigint NOT NULL,
    connected      bigint NOT NULL,
    ever_connected bigint NOT NULL,
    PRIMARY KEY (platform_id, time)
);

-- Every reconciliation of the counters against a recount, with the drift it found and fixed.
CREATE TABLE reconciliations (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    time      timestamptz NOT NULL DEFAULT now(),
    platforms integer NOT NULL,
    drift     jsonb NOT NULL
);
