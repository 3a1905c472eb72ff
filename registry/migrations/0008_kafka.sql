-- Kafka: the offsets that the stored data reached, written in the same transaction as the data
-- (the source of truth on restart and rebalance), and where a refused record came from.
CREATE TABLE kafka_offsets (
    group_id       text NOT NULL,
    topic          text NOT NULL,
    partition      integer NOT NULL,
    next_offset    bigint NOT NULL,
    -- The partition's end when the offset was stored: lag = log_end_offset - next_offset.
    log_end_offset bigint,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, topic, partition)
);

ALTER TABLE dead_letters
    ADD COLUMN kafka_partition integer,
    ADD COLUMN kafka_offset    bigint,
    ADD COLUMN kafka_key       text;
