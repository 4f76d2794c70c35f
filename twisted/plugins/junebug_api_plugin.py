"""The twistd dropin: ``twistd junebug-api``. Imports nothing until run."""

from twisted.application.service import ServiceMaker

junebug_api = ServiceMaker(
    "junebug-api",
    "junebug_api.tap",
    "The Junebug HTTP message API between RapidPro and vumi transports over AMQP.",
    "junebug-api",
)
