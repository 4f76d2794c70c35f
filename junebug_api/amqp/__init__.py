"""AMQP: frames and codec, reaching a broker (TLS, failover), the connections."""
