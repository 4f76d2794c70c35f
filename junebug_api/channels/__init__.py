"""Channels at run time: each channel's workers, sender, credentials, status and logs."""
