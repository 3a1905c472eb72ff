-- Enterprises that platforms serve, their devices and gateways, and the official totals the
-- platform penetration rate divides by (docs/enterprises.md).

-- One row per platform and enterprise: the platform's declaration that it serves the
-- enterprise, with what it says of it. Two platforms serving one enterprise make two rows; the
-- penetration rate counts the code once (registry/penetration.py states the rule that picks
-- one declaration where they disagree). The code's format is checked here, its check
-- characters in registry/uscc.py.
CREATE TABLE enterprises (
    platform_id   text NOT NULL REFERENCES platforms (id),
    code          text NOT NULL CHECK (code ~ '^91[0-9]{6}[0-9A-HJ-NP-RTUW-Y]{10}$'),
    name          text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    -- GB/T 4754-2017 division (大类), two digits.
    industry      text NOT NULL CHECK (industry ~ '^[0-9]{2}$'),
    -- An industrial enterprise above designated size (规模以上工业企业).
    above_size    boolean NOT NULL,
    -- GB/T 2260 code; the code's characters 3-8 unless overridden with a stated reason.
    region        text NOT NULL CHECK (region ~ '^[0-9]{6}$'),
    region_reason text CHECK (length(region_reason) BETWEEN 1 AND 500),
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (platform_id, code),
    CHECK ((region_reason IS NULL) = (region = substr(code, 3, 6)))
);
-- The penetration pass reads an enterprise's declarations together.
CREATE INDEX enterprises_code ON enterprises (code);

-- A device's or gateway's enterprise, set by an operator; a device without one takes its
-- gateway's, then the platform's rule (registry/enterprises.py). The foreign key keeps a link
-- within the platform's own declarations. Partial indexes: rows without a link (every
-- auto-provisioned device) add no index entry, and state updates stay HOT.
ALTER TABLE devices ADD COLUMN enterprise text;
ALTER TABLE devices ADD CONSTRAINT devices_enterprise FOREIGN KEY (platform_id, enterprise)
    REFERENCES enterprises (platform_id, code);
CREATE INDEX devices_enterprise ON devices (platform_id, enterprise) WHERE enterprise IS NOT NULL;
ALTER TABLE gateways ADD COLUMN enterprise text;
ALTER TABLE gateways ADD CONSTRAINT gateways_enterprise FOREIGN KEY (platform_id, enterprise)
    REFERENCES enterprises (platform_id, code);
CREATE INDEX gateways_enterprise ON gateways (platform_id, enterprise) WHERE enterprise IS NOT NULL;

-- A platform's rule for devices without a link of their own or through a gateway (such as
-- auto-provisioned ones): the metadata key whose value is their enterprise's code.
CREATE TABLE enterprise_rules (
    platform_id  text PRIMARY KEY REFERENCES platforms (id),
    metadata_key text NOT NULL CHECK (length(metadata_key) BETWEEN 1 AND 100)
);

-- Every device in service with the enterprise it belongs to (NULL: none) and how it got it.
CREATE VIEW device_enterprises AS
SELECT d.id, d.platform_id, d.device_id,
       coalesce(d.enterprise, g.enterprise, e.code) AS enterprise,
       CASE WHEN d.enterprise IS NOT NULL THEN 'device'
            WHEN g.enterprise IS NOT NULL THEN 'gateway'
            WHEN e.code IS NOT NULL THEN 'rule' END AS linked_by
FROM devices d
LEFT JOIN gateways g ON g.id = d.via_gateway
LEFT JOIN enterprise_rules r ON r.platform_id = d.platform_id
LEFT JOIN enterprises e
       ON e.platform_id = d.platform_id AND e.code = upper(d.metadata ->> r.metadata_key)
WHERE d.decommissioned_at IS NULL;

-- Official totals of industrial enterprises above designated size, each import a version:
-- for a year, the newest import that holds the year is the one in force.
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
    -- '000000' for the whole country, else a province (xx0000) or prefecture (xxxx00).
    region      text NOT NULL CHECK (region ~ '^[0-9]{6}$'),
    -- '' for all industry (sections B, C, D), else a section letter or a division.
    industry    text NOT NULL CHECK (industry ~ '^([BCD]|[0-9]{2})?$'),
    enterprises bigint NOT NULL CHECK (enterprises >= 0),
    PRIMARY KEY (import_id, year, region, industry)
);

-- The penetration pass's result (registry/penetration.py), replaced whole on each run: per
-- enterprise code, the one declaration that counts and whether it used a platform, and the
-- same added up per region and division.
CREATE TABLE enterprise_usage (
    code          text PRIMARY KEY,
    name          text NOT NULL,
    industry      text NOT NULL,
    above_size    boolean NOT NULL,
    region        text NOT NULL,
    platforms     integer NOT NULL,
    connected_30d boolean NOT NULL,
    -- Its platforms declare different industries, sizes or regions.
    disputed      boolean NOT NULL
);
CREATE TABLE penetration_cells (
    region        text NOT NULL,
    industry      text NOT NULL,
    above_size    boolean NOT NULL,
    served        bigint NOT NULL,
    connected_30d bigint NOT NULL,
    PRIMARY KEY (region, industry, above_size)
);
-- Per platform: what the platform indicators show.
CREATE TABLE platform_enterprise_stats (
    platform_id        text PRIMARY KEY REFERENCES platforms (id),
    enterprises        bigint NOT NULL,
    above_size         bigint NOT NULL,
    connected_30d      bigint NOT NULL,
    industries         integer NOT NULL,
    provinces          integer NOT NULL,
    prefectures        integer NOT NULL,
    linked_devices     bigint NOT NULL
);
CREATE TABLE penetration_runs (
    only_row    boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    as_of       timestamptz NOT NULL,
    enterprises bigint NOT NULL,
    disputed    bigint NOT NULL
);
