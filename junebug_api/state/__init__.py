"""The state cache: its interface, in memory, in Redis (with Sentinel)."""
