"""junebug-api: the Junebug HTTP message API between RapidPro and vumi transports."""

__version__ = "0.1.0"
