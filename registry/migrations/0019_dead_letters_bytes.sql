-- Dead letters keep what arrived byte for byte, so that any refusal can be recorded and
-- replayed. A Kafka key or header value may hold any bytes (a NUL, invalid UTF-8), which a
-- text column refuses: writing the dead letter of such a record failed, and its partition
-- stopped behind it.
--
-- kafka_key:     the record's key as it arrived (was text; existing keys keep their UTF-8).
-- kafka_headers: the record's headers as [name, value] pairs (names UTF-8 encoded; a header
--                without a value has a NULL value); NULL when it had none.
-- raw_topic:     the topic as it arrived when `topic` cannot hold it as text (a NUL);
--                `topic` then shows it with backslash escapes. NULL otherwise.
--
-- Cost: changing kafka_key's type rewrites the table under an exclusive lock (writers of dead
-- letters wait meanwhile); the table holds only refusals.
ALTER TABLE dead_letters
    ALTER COLUMN kafka_key TYPE bytea USING convert_to(kafka_key, 'UTF8'),
    ADD COLUMN kafka_headers bytea[],
    ADD COLUMN raw_topic bytea;
