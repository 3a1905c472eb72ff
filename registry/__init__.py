"""The device registry: platforms, devices, connection state and counts, and the store they live in."""
