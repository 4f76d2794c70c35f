"""The channel management routes (``channel_api: true``): old Junebug's
create, modify, delete and restart, behind the admin credentials.

Each handler checks the admin credentials (never a channel's own), reads the
body against the schema the OpenAPI document shows
(:func:`~junebug_api.config.channel_api.channel_body_schema`), and hands the
work to the channel admin (:class:`junebug_api.channels.admin.ChannelAdmin`);
answers are Junebug's envelope, as old Junebug gave them.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from http import HTTPStatus
from typing import Any, Protocol

import jsonschema
from twisted.internet.defer import Deferred
from twisted.web.iweb import IRequest

from junebug_api.config.channel_api import channel_body_schema
from junebug_api.formats.api_errors import ApiUsageError, answer
from junebug_api.formats.api_errors import envelope as junebug_envelope
from junebug_api.formats.junebug_formats import decode_json, schema_errors
from junebug_api.http.api import ApiCredentials, HealthCheck, refused

_VALIDATORS = {
    create: jsonschema.Draft7Validator(channel_body_schema(create)) for create in (True, False)
}


def channel_body(body: bytes, create: bool) -> dict[str, Any]:
    """A create (``create``) or modify body: JSON, and within the schema;
    JsonDecodeError or ApiUsageError (``invalid_body`` errors) otherwise."""
    data = decode_json(body)
    errors = schema_errors(_VALIDATORS[create], data)
    if errors:
        raise ApiUsageError(errors[0]["message"], errors)
    return data


class Admin(Protocol):
    """What the routes need of :class:`junebug_api.channels.admin.ChannelAdmin`."""

    async def create(self, body: Any) -> Any: ...

    async def modify(self, channel_id: str, body: Any) -> Any: ...

    async def delete(self, channel_id: str) -> None: ...

    async def restart(self, channel_id: str) -> None: ...


class ChannelManagement:
    """The handlers of the management routes (see :mod:`junebug_api.http.routes`)."""

    def __init__(
        self,
        admin: Admin,
        credentials: ApiCredentials,
        amqp_health: HealthCheck,
        request_timeout: float,
        clock: Any,
    ) -> None:
        self._admin = admin
        self._credentials = credentials
        self._amqp_health = amqp_health
        self._timeout = request_timeout
        self._clock = clock

    def _run(
        self,
        request: IRequest,
        work: Callable[[], Coroutine[Any, Any, Any]],
        status: HTTPStatus,
        said: str,
    ) -> Deferred[bytes] | bytes:
        """``work`` if the admin credentials are right, answered with its result."""
        if not self._credentials.allow(request.getHeader(b"authorization")):
            return refused(request)
        d = Deferred.fromCoroutine(work())
        d.addTimeout(self._timeout, self._clock)
        d.addCallback(
            lambda result: answer(request, status, junebug_envelope(status, said, result))
        )
        return d

    def _shown(self, channel: Any) -> dict[str, Any]:
        return channel.info(self._amqp_health())

    def create_channel(self, request: IRequest) -> Deferred[bytes] | bytes:
        async def create() -> dict[str, Any]:
            body = channel_body(request.content.read(), create=True)
            return self._shown(await self._admin.create(body))

        return self._run(request, create, HTTPStatus.CREATED, "channel created")

    def modify_channel(self, request: IRequest, channel_id: str) -> Deferred[bytes] | bytes:
        async def modify() -> dict[str, Any]:
            body = channel_body(request.content.read(), create=False)
            return self._shown(await self._admin.modify(channel_id, body))

        return self._run(request, modify, HTTPStatus.OK, "channel updated")

    def delete_channel(self, request: IRequest, channel_id: str) -> Deferred[bytes] | bytes:
        async def delete() -> dict[str, Any]:
            await self._admin.delete(channel_id)
            return {}

        return self._run(request, delete, HTTPStatus.OK, "channel deleted")

    def restart_channel(self, request: IRequest, channel_id: str) -> Deferred[bytes] | bytes:
        async def restart() -> dict[str, Any]:
            await self._admin.restart(channel_id)
            return {}

        return self._run(request, restart, HTTPStatus.OK, "channel restarted")
