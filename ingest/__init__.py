"""Ingest: receive telemetry (MQTT, Kafka), decode and validate it, batch it, write it with COPY,
and acknowledge it only once it is committed."""
