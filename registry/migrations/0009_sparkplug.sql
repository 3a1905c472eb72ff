-- Sparkplug B: the last BIRTH certificate of each live edge node and device, so that a restarted
-- ingest process still knows the metric aliases and the bdSeq of every session that is open.
-- Written in the same transaction as the batch that held the BIRTH; a DEATH removes it.
CREATE TABLE sparkplug_births (
    group_id    text NOT NULL,
    edge_node   text NOT NULL,
    -- '' for the edge node's own NBIRTH.
    device      text NOT NULL DEFAULT '',
    payload     bytea NOT NULL,
    received_at timestamptz NOT NULL,
    PRIMARY KEY (group_id, edge_node, device)
);

-- The Sparkplug topic of a refused record that came over Kafka (its `topic` is the Kafka topic).
ALTER TABLE dead_letters ADD COLUMN sparkplug_topic text;
