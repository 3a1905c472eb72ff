"""The national aggregator and the wire format cells use to report to it (docs/national.md)."""
