"""The JSON schemas and examples of the OpenAPI document's bodies.

The request body's schema is the one the service enforces
(:data:`junebug_api.formats.junebug_formats.OUTBOUND_SCHEMA`); the answers'
``result`` schemas here describe what the routes answer (the channel's JSON,
message status, logs, ``/health``), and the schemathesis test holds the
running service to them. Error bodies are built by
:mod:`junebug_api.http.openapi` from the error classes each route answers.
"""

from __future__ import annotations

from typing import Any

from junebug_api.config.channel_api import channel_body_schema, option_schema
from junebug_api.config.channel_options import ChannelEntry
from junebug_api.config.options import options
from junebug_api.formats.junebug_formats import OUTBOUND_SCHEMA

_STRING = {"type": "string"}
_NULLABLE_STRING = {"type": ["string", "null"]}
_RATE = {"type": "number", "minimum": 0, "description": "Messages per second."}
_HEALTH = {"type": "string", "enum": ["ok", "degraded", "down"]}

#: Old Junebug's seven channel rates in GET /channels/<id> (a unit test checks
#: they are those the channel answers).
RATE_FIELDS = (
    "inbound_message_rate",
    "outbound_message_rate",
    "submitted_event_rate",
    "rejected_event_rate",
    "delivery_succeeded_rate",
    "delivery_failed_rate",
    "delivery_pending_rate",
)

EVENT_TYPES = [
    "submitted",
    "rejected",
    "delivery_pending",
    "delivery_failed",
    "delivery_succeeded",
]

MESSAGE_ID = "8b9c6a3e1f2d4e5c9a7b6c5d4e3f2a1b"


def _object(properties: dict[str, Any], description: str, **extra: Any) -> dict[str, Any]:
    """An object schema with every property required."""
    return {
        "type": "object",
        "description": description,
        "required": list(properties),
        "properties": properties,
        **extra,
    }


def outbound_message_schema() -> dict[str, Any]:
    """OUTBOUND_SCHEMA as an OpenAPI 3.1 schema: the same keywords, without
    ``$schema`` (draft 7 is a subset of the 2020-12 dialect OpenAPI 3.1 uses)."""
    schema = {k: v for k, v in OUTBOUND_SCHEMA.items() if k != "$schema"}
    schema["description"] = (
        "A message to send, or a reply. Besides this schema: to or reply_to must be"
        " given, from (or the channel's default_from_addr) when not replying, and"
        " content must fit the channel's character_limit."
    )
    return schema


_MESSAGE = _object(
    {
        "to": _NULLABLE_STRING,
        "from": _NULLABLE_STRING,
        "group": _NULLABLE_STRING,
        "message_id": _STRING,
        "channel_id": _STRING,
        "timestamp": {**_STRING, "description": "UTC, as vumi writes it."},
        "reply_to": _NULLABLE_STRING,
        "content": _NULLABLE_STRING,
        "channel_data": {"type": "object"},
    },
    "The message as published, in Junebug's JSON.",
)

_STATUS_EVENT = _object(
    {
        "channel_id": _STRING,
        "message_id": _STRING,
        "timestamp": _STRING,
        "event_type": {"type": "string", "enum": EVENT_TYPES},
        "event_details": {
            "type": "object",
            "description": "For rejected: the transport's reason.",
        },
    },
    "One event of the message.",
)

_MESSAGE_STATUS = _object(
    {
        "id": _STRING,
        "last_event_type": {"type": ["string", "null"], "enum": [*EVENT_TYPES, None]},
        "last_event_timestamp": _NULLABLE_STRING,
        "events": {"type": "array", "items": {"$ref": "#/components/schemas/StatusEvent"}},
    },
    "The message's events, sorted by time; nulls and no events if unknown or expired.",
)

_DELIVERY = {
    "type": "object",
    "required": ["health", "in_flight"],
    "properties": {
        "health": _HEALTH,
        "in_flight": {"type": "integer", "minimum": 0},
        "error": {**_NULLABLE_STRING, "description": "While the last delivery failed."},
    },
}

_CHANNEL_COMPONENTS = _object(
    {
        "amqp": {
            "type": "object",
            "required": ["health"],
            "properties": {"health": _HEALTH},
        },
        "mo_message_url": _DELIVERY,
        "event_url": _DELIVERY,
    },
    "The shared AMQP connection, and the channel's deliveries to RapidPro.",
)

_CHANNEL_STATUS = _object(
    {
        "status": {**_HEALTH, "description": "The worst of the components."},
        "components": {"$ref": "#/components/schemas/ChannelComponents"},
        **dict.fromkeys(RATE_FIELDS, _RATE),
    },
    "Health and old Junebug's rates over the last metric_window seconds.",
)


def channel_schema() -> dict[str, Any]:
    """``GET /channels/<id>``'s result, from the channel options: its id, every
    option that is no secret (under old Junebug's name where it has one, URL
    credentials masked), ``messages_path`` and ``status``; as
    :func:`junebug_api.config.channels.public` shows them."""
    properties: dict[str, Any] = {"id": _STRING}
    for field, about, hint in options(ChannelEntry):
        if about.secret or not about.public:
            continue
        name = about.aliases[0] if about.aliases else field.name
        properties[name] = option_schema(about, hint)
    properties["config"] = {
        "type": "object",
        "description": "Old Junebug's transport config, its secrets masked.",
    }
    properties["messages_path"] = {**_STRING, "description": "Where its messages are sent."}
    properties["status"] = {"$ref": "#/components/schemas/ChannelStatus"}
    return _object(properties, "A channel's settings (no secret) and status.")


_LOG_RECORD = {
    "type": "object",
    "description": "One log record, as old Junebug kept them.",
    "required": ["logger", "level", "timestamp", "message"],
    "properties": {
        "logger": {**_STRING, "description": "The channel's id."},
        "level": {"type": "integer", "description": "Python's level: 10 DEBUG ... 50 CRITICAL."},
        "timestamp": {"type": "number", "description": "Seconds since the epoch."},
        "message": _STRING,
        "exception": _object(
            {"class": _STRING, "instance": _STRING, "stack": {"type": "array", "items": _STRING}},
            "The error logged with the record, if any.",
        ),
    },
}

_COMPONENT = {
    "type": "object",
    "required": ["health"],
    "properties": {"health": _HEALTH},
}

_HEALTH_BODY = _object(
    {
        "health": {"type": "string", "enum": ["ok", "down"]},
        "components": {
            "type": "object",
            "description": "amqp (connections, queues, stuck), redis (with RedisStateCache),"
            " deliveries (destinations down).",
            "additionalProperties": _COMPONENT,
        },
        "channels": {
            "type": "object",
            "description": "Each channel's health and components, by id.",
            "additionalProperties": _COMPONENT,
        },
    },
    "The process's health (not in the envelope).",
)

#: ``components.schemas``, by name.
SCHEMAS: dict[str, Any] = {
    "OutboundMessage": outbound_message_schema(),
    "Message": _MESSAGE,
    "MessageStatus": _MESSAGE_STATUS,
    "StatusEvent": _STATUS_EVENT,
    "ChannelIds": {
        "type": "array",
        "items": _STRING,
        "description": "Every channel's id, sorted.",
    },
    "Channel": channel_schema(),
    "ChannelStatus": _CHANNEL_STATUS,
    "ChannelComponents": _CHANNEL_COMPONENTS,
    "LogRecords": {"type": "array", "items": {"$ref": "#/components/schemas/LogRecord"}},
    "LogRecord": _LOG_RECORD,
    "Health": _HEALTH_BODY,
    "Metrics": {"type": "string", "description": "Prometheus' text exposition format."},
    "OpenApiDocument": {
        "type": "object",
        "required": ["openapi", "info", "paths"],
        "description": "An OpenAPI 3.1 document.",
    },
    "Redirect": _object({"location": _STRING}, "Where the resource is."),
    "NewChannel": {
        **channel_body_schema(create=True),
        "description": "A channel to create: what a channels: entry holds (no <option>_file).",
    },
    "ChannelChanges": {
        **channel_body_schema(create=False),
        "description": "The settings to change (null unsets one); the others stay.",
    },
    "Empty": {"type": "object", "maxProperties": 0, "description": "Nothing."},
}

#: Schemas answered as they are, not as the envelope's ``result``.
BARE = frozenset({"Health", "Metrics", "OpenApiDocument"})

_CHANNEL_EXAMPLE = {
    "id": "sms-za",
    "label": "SMS South Africa",
    "metadata": {},
    "connector_name": "vumi-smpp-za",
    "mo_url": "https://***@rapidpro.example/c/jn/9d1e/receive",
    "default_event_url": None,
    "transport_type": "sms",
    "default_from_addr": "8110",
    "allow_expired_replies": False,
    "character_limit": 160,
    "worker_concurrency": 20,
    "type": "smpp",
    "config": {"system_id": "junebug", "password": "***"},
    "public_http": None,
    "amqp_queue": None,
    "status_url": None,
    "rate_limit_count": None,
    "rate_limit_window": None,
    "messages_path": "/channels/sms-za/messages",
    "status": {
        "status": "ok",
        "components": {
            "amqp": {"health": "ok"},
            "mo_message_url": {"health": "ok", "in_flight": 0},
            "event_url": {"health": "ok", "in_flight": 0},
        },
        **dict.fromkeys(RATE_FIELDS, 0.0),
        "outbound_message_rate": 1.5,
    },
}

#: An example of each schema (the unit tests check each against its schema).
EXAMPLES: dict[str, Any] = {
    "Message": {
        "to": "+27820000001",
        "from": "8110",
        "group": None,
        "message_id": MESSAGE_ID,
        "channel_id": "sms-za",
        "timestamp": "2026-11-26 13:23:18.965428",
        "reply_to": None,
        "content": "Hello",
        "channel_data": {},
    },
    "MessageStatus": {
        "id": MESSAGE_ID,
        "last_event_type": "delivery_succeeded",
        "last_event_timestamp": "2026-11-26 13:23:19.000000",
        "events": [
            {
                "channel_id": "sms-za",
                "message_id": MESSAGE_ID,
                "timestamp": "2026-11-26 13:23:18.500000",
                "event_type": "submitted",
                "event_details": {},
            },
            {
                "channel_id": "sms-za",
                "message_id": MESSAGE_ID,
                "timestamp": "2026-11-26 13:23:19.000000",
                "event_type": "delivery_succeeded",
                "event_details": {},
            },
        ],
    },
    "ChannelIds": ["sms-za", "ussd-ke"],
    "Channel": _CHANNEL_EXAMPLE,
    "LogRecords": [
        {
            "logger": "sms-za",
            "level": 30,
            "timestamp": 1796995398.9,
            "message": "Inbound message 3f2a... not delivered yet (HTTP 503): retry 1 in 1 s",
        }
    ],
    "Health": {
        "health": "ok",
        "components": {
            "amqp": {"health": "ok", "state": "open", "host": "rabbitmq:5672", "vhost": "/"},
            "deliveries": {"health": "ok", "destinations_down": {}},
        },
        "channels": {
            "sms-za": {
                "health": "ok",
                "amqp": {"health": "ok"},
                "mo_message_url": {"health": "ok", "in_flight": 0},
                "event_url": {"health": "ok", "in_flight": 0},
            }
        },
    },
    # /health's 503: the AMQP connection lost.
    "Health 503": {
        "health": "down",
        "components": {
            "amqp": {
                "health": "down",
                "state": "connecting",
                "host": "rabbitmq:5672",
                "vhost": "/",
            },
            "deliveries": {"health": "ok", "destinations_down": {}},
        },
        "channels": {
            "sms-za": {
                "health": "down",
                "amqp": {"health": "down"},
                "mo_message_url": {"health": "ok", "in_flight": 0},
                "event_url": {"health": "ok", "in_flight": 0},
            }
        },
    },
    "Metrics": (
        "# HELP junebug_outbound_requests_total Answers to POST .../messages, by HTTP"
        " status code.\n"
        "# TYPE junebug_outbound_requests_total counter\n"
        'junebug_outbound_requests_total{code="201"} 12.0\n'
    ),
    "Redirect": {"location": "/channels/sms-za/messages"},
}

#: Examples of the outbound message body, by name.
REQUEST_EXAMPLES = {
    "send": {
        "summary": "A new message",
        "value": {"to": "+27820000001", "from": "8110", "content": "Hello"},
    },
    "reply": {
        "summary": "A reply that ends the USSD session",
        "value": {
            "reply_to": MESSAGE_ID,
            "content": "Thank you",
            "channel_data": {"continue_session": False},
        },
    },
    "events": {
        "summary": "With an event URL of its own",
        "value": {
            "to": "+27820000001",
            "content": "Your code is 1234",
            "event_url": "https://rapidpro.example/c/jn/9d1e/event",
            "event_auth_token": "event-token",
        },
    },
}

#: Examples of each request body, by its schema's name.
BODY_EXAMPLES = {
    "OutboundMessage": REQUEST_EXAMPLES,
    "NewChannel": {
        "create": {
            "summary": "An SMS channel, as old Junebug took it",
            "value": {
                "type": "smpp",
                "label": "SMS South Africa",
                "config": {"system_id": "junebug", "password": "secret"},
                "mo_url": "https://rapidpro.example/c/jn/9d1e/receive",
                "mo_url_auth_token": "rapidpro-token",
                "character_limit": 160,
            },
        }
    },
    "ChannelChanges": {
        "move": {
            "summary": "A new mo_url",
            "value": {"mo_url": "https://rapidpro.example/c/jn/7a2b/receive"},
        }
    },
}
