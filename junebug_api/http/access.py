"""Who gets into which route: the credentials configured, as schemes.

:class:`ApiAccess` says, for each route of the table, which schemes
(``basic``, ``token``) let a request in and whether some channel asks for
nothing: the OpenAPI document's ``security``, and whether a route can answer
401. Built from ``(username, token)`` pairs, never from a secret's value.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import attrs

from junebug_api.http.routes import Auth, Route


@attrs.frozen
class Access:
    """Who gets in: requests with credentials of one of ``schemes`` (``basic``,
    ``token``), and anyone when ``open`` (some channel asks for nothing)."""

    schemes: frozenset[str] = frozenset()
    open: bool = True

    @classmethod
    def of(cls, credentials: Iterable[tuple[str | None, str | None]]) -> Access:
        """Who gets into routes answered with any of ``credentials``, each a
        ``(username, token)`` pair (None: not set)."""
        schemes: set[str] = set()
        is_open = False
        for username, token in credentials:
            if username is not None:
                schemes.add("basic")
            if token is not None:
                schemes.add("token")
            is_open = is_open or (username is None and token is None)
        return cls(frozenset(schemes), is_open or not schemes)


OPEN = Access()


@attrs.frozen
class ApiAccess:
    """Who gets into each kind of route, from the credentials configured."""

    api: Access = OPEN
    metrics: Access = OPEN
    #: Each channel's own, by id.
    channels: Mapping[str, Access] = attrs.field(factory=dict)
    #: The admin credentials (the channel API's), which also open every read route.
    admin: Access = OPEN

    def of(self, route: Route) -> Access:
        """Who gets into ``route``: a channel route lets in any channel's
        credentials (each channel checks its own); a read route asking for
        credentials also lets the admin ones in."""
        if route.auth is Auth.ADMIN:
            return self.admin
        if route.auth is Auth.API:
            return self._or_admin(self.api)
        if route.auth is Auth.METRICS:
            return self._or_admin(self.metrics)
        if route.auth is Auth.CHANNEL:
            if route.channel is not None:
                return self._or_admin(self.channels.get(route.channel, OPEN))
            return self._or_admin(_union(self.channels.values()))
        return OPEN

    def _or_admin(self, access: Access) -> Access:
        if not access.schemes:
            return access  # open to anyone: credentials change nothing
        return Access(access.schemes | self.admin.schemes, access.open)


def api_access(
    api: tuple[str | None, str | None],
    metrics_auth: bool,
    channels: Mapping[str, tuple[str | None, str | None]],
    admin: tuple[str | None, str | None] = (None, None),
) -> ApiAccess:
    """Who gets in where, from the top-level ``(username, token)``, whether
    metrics ask for them, each channel's own pair and the admin pair."""
    top = Access.of([api])
    return ApiAccess(
        api=top,
        metrics=top if metrics_auth else OPEN,
        channels={cid: Access.of([pair]) for cid, pair in channels.items()},
        admin=Access.of([admin]),
    )


def _union(accesses: Iterable[Access]) -> Access:
    accesses = list(accesses)
    if not accesses:
        return OPEN
    return Access(frozenset().union(*(a.schemes for a in accesses)), any(a.open for a in accesses))
