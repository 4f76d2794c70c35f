"""POSTing JSON to RapidPro: one persistent connection pool, auth, timeouts.

:func:`post_json` raises :class:`DeliveryFailed` for anything but a 2xx,
saying whether a retry may help (connection errors, timeouts, 5xx, 408,
429) or not (any other answer). Credentials in a URL become HTTP Basic auth
and never appear in an error message.
"""

from __future__ import annotations

import base64
from functools import lru_cache
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import attrs
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, TimeoutError
from twisted.internet.error import ConnectError, ConnectionClosed, DNSLookupError
from twisted.web._newclient import ResponseFailed
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    ResponseNeverReceived,
    _HTTP11ClientFactory,
)

RETRYABLE_STATUSES = frozenset({408, 429})


class DeliveryFailed(Exception):
    """A POST that did not get a 2xx; ``retryable`` says if trying again may help."""

    def __init__(self, reason: str, retryable: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable


@lru_cache(maxsize=1024)
def split_credentials(url: str) -> tuple[bytes, bytes | None]:
    """The URL without user info, and a Basic Authorization value if it had any."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url.encode("utf-8"), None
    netloc = parts.netloc.rsplit("@", 1)[1]
    clean = urlunsplit(parts._replace(netloc=netloc))
    user = unquote(parts.username or "")
    password = unquote(parts.password or "")
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return clean.encode("utf-8"), f"Basic {token}".encode("ascii")


def safe_url(url: str) -> str:
    """The URL as it may be logged: without user info."""
    return split_credentials(url)[0].decode("utf-8")


class _QuietClientFactory(_HTTP11ClientFactory):
    noisy = False


def make_pool(reactor: Any, max_per_host: int) -> HTTPConnectionPool:
    """The one persistent pool that every outgoing POST shares."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool._factory = _QuietClientFactory  # no "Starting factory" line per connection
    pool.maxPersistentPerHost = max_per_host
    pool.cachedConnectionTimeout = 120
    pool.retryAutomatically = False
    return pool


@attrs.define(eq=False)
class HttpDelivery:
    """Posts JSON bodies with one treq client (and so one connection pool)."""

    _client: HTTPClient

    @classmethod
    def create(cls, reactor: Any, max_per_host: int) -> HttpDelivery:
        agent = Agent(reactor, pool=make_pool(reactor, max_per_host))
        return cls(HTTPClient(agent))

    async def post_json(self, url: str, body: bytes, auth_token: str | None, timeout: float) -> int:
        """POST ``body`` to ``url``; the status code of a 2xx, else DeliveryFailed."""
        clean_url, basic = split_credentials(url)
        headers = {
            b"Content-Type": [b"application/json; charset=utf-8"],
            b"Accept": [b"application/json"],
        }
        if auth_token is not None:
            headers[b"Authorization"] = [f"Token {auth_token}".encode()]
        elif basic is not None:
            headers[b"Authorization"] = [basic]
        try:
            response = await self._client.post(
                clean_url,
                data=body,
                headers=headers,
                timeout=timeout,
                allow_redirects=False,
            )
            await response.content()
        except (TimeoutError, CancelledError):
            raise DeliveryFailed(f"timed out after {timeout:g} s", retryable=True) from None
        except (ConnectError, DNSLookupError, ConnectionClosed) as e:
            raise DeliveryFailed(f"connection failed: {type(e).__name__}", True) from None
        except (ResponseNeverReceived, ResponseFailed) as e:
            reasons = ", ".join(r.getErrorMessage() for r in e.reasons) or type(e).__name__
            raise DeliveryFailed(f"no response: {reasons}", retryable=True) from None
        code = response.code
        if 200 <= code < 300:
            return code
        retryable = code >= 500 or code in RETRYABLE_STATUSES
        raise DeliveryFailed(f"HTTP {code}", retryable=retryable)
