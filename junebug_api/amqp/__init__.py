"""AMQP: frames and codec, reaching a broker (TLS, failover), the connections."""

import warnings

# txAMQP still calls Twisted's deprecated returnValue; hide that one warning,
# for txAMQP's own modules only, before any module of this package imports them.
warnings.filterwarnings(
    "ignore",
    message=r"twisted\.internet\.defer\.returnValue was deprecated",
    category=DeprecationWarning,
    module=r"txamqp(\.|$)",
)
