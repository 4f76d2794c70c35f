"""Configuration: the options, their checks, and the three sources (file, environment, CLI)."""
