"""Seeing what the service does: logs, metrics, /health's queue monitor, Sentry."""
