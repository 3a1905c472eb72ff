-- A reading without `ts` takes its arrival time, so a broker's redelivery of a stored message
-- (ingest killed after the commit, before its PUBACK reached the broker) would become a second
-- point. MQTT ingest records the messages it stores that took the arrival time, in the batch's
-- transaction; a redelivery (DUP flag) of one that is recorded gets the same time, and the
-- telemetry key stores it once (ingest/redelivery.py, docs/contract.md "Delivery").
--
-- One row per consumer (MQTT client id) and packet id: a packet id is reused only once the
-- broker has its acknowledgement, so a newer message replaces the row, and a consumer holds at
-- most 65,535 rows. Rows expire with their connection's row (kept for the session expiry
-- interval plus a day; pruned when a consumer connects).
CREATE TABLE mqtt_redeliveries (
    client_id   text NOT NULL,
    packet_id   integer NOT NULL,
    -- blake2b of topic and payload, 8 bytes: a redelivery carries both unchanged.
    digest      bigint NOT NULL,
    received_at timestamptz NOT NULL,  -- the time its readings without `ts` were stored at
    connection  bigint NOT NULL,
    batch       integer NOT NULL,
    PRIMARY KEY (client_id, packet_id)
);

-- Each connection's last committed batch: acknowledgements go out after each commit, so only
-- the rows of a connection's last two batches can belong to messages the broker still holds
-- unacknowledged; older rows are never taken for a redelivery (their packet ids may have been
-- reused by messages that were not stored).
CREATE TABLE mqtt_redelivery_connections (
    client_id  text NOT NULL,
    connection bigint NOT NULL,
    last_batch integer NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (client_id, connection)
);
