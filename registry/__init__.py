"""The device registry: platforms, devices, connection state and counts, and their store."""
