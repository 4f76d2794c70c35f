"""Messages through the service: outbound published; inbound and events
consumed, POSTed to RapidPro, retried, parked on .failed."""
