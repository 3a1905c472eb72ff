-- Access: operators' API keys, devices' and gateways' MQTT credentials, and the audit log.
-- Secrets are random (256 bits) and stored as SHA-256 digests only (docs/access.md): a slow
-- password hash adds nothing against guessing a random 256-bit value and costs every request.

CREATE TABLE api_keys (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The key's public part: shown in lists and logs, and how a presented key is looked up.
    prefix       text NOT NULL UNIQUE,
    digest       bytea NOT NULL,
    role         text NOT NULL CHECK (role IN ('admin', 'operator', 'viewer', 'broker')),
    -- admin and broker keys span all platforms, operator keys are for one; a viewer key is
    -- for one platform, or for all (a national viewer, read only).
    platform_id  text REFERENCES platforms (id),
    name         text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    created_by   bigint REFERENCES api_keys (id),
    revoked_at   timestamptz,
    CHECK (role = 'viewer' OR (role IN ('admin', 'broker')) = (platform_id IS NULL))
);

-- One secret per device, gateway, or a platform's provisioning credential (subject '').
CREATE TABLE credentials (
    platform_id  text NOT NULL REFERENCES platforms (id),
    kind         text NOT NULL CHECK (kind IN ('device', 'gateway', 'provisioning')),
    subject      text NOT NULL,
    digest       bytea NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    rotated_at   timestamptz,
    PRIMARY KEY (platform_id, kind, subject),
    CHECK ((kind = 'provisioning') = (subject = ''))
);

-- Append-only: who changed which key, device or credential, and when.
CREATE TABLE audit_log (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    time         timestamptz NOT NULL DEFAULT now(),
    key_id       bigint REFERENCES api_keys (id),
    platform_id  text,
    action       text NOT NULL,
    subject      text NOT NULL,
    detail       jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX audit_log_platform ON audit_log (platform_id, id);
