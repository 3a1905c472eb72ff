-- Gateways (edge nodes) carry many devices over one connection. A device remembers the gateway
-- it was last seen through, so that a gateway's death can reach its devices in one step.
CREATE TABLE gateways (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    platform_id text NOT NULL REFERENCES platforms (id),
    gateway_id  text NOT NULL CHECK (gateway_id ~ '^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$'),
    metadata    jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    first_seen  timestamptz,
    last_seen   timestamptz,
    UNIQUE (platform_id, gateway_id)
);

ALTER TABLE devices ADD COLUMN via_gateway bigint REFERENCES gateways (id);
CREATE INDEX devices_via_gateway ON devices (via_gateway) WHERE via_gateway IS NOT NULL;

-- Replays of dead letters by an operator (`iiot dead-letters replay`).
ALTER TABLE dead_letters
    ADD COLUMN replayed_at    timestamptz,
    ADD COLUMN replay_outcome text;
