"""The operator API (FastAPI): device counts now; management, telemetry and metering to come."""
