"""Reaching a broker: endpoints, TLS, and what went wrong, in one sentence.

:func:`broker_endpoint` gives the Twisted endpoint for one broker: plain
TCP, or TLS through Twisted's ``optionsForClientTLS`` (the system trust
store, or the CA bundle of ``amqp_tls_ca_file``; a client certificate for
``EXTERNAL`` logins or brokers that ask for one). :func:`explain` turns a
failed connection attempt into the sentence that goes into the log line and
``/health``'s ``error``: "authentication failed for user guest", "connection
refused by 127.0.0.1:5672", "no AMQP answer within 10 s", "TLS: the
certificate of rabbit:5671 is signed by an unknown CA", never a traceback.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet import error as net_error
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.python.failure import Failure

from junebug_api.config.tls import TlsMaterial

if TYPE_CHECKING:
    from junebug_api.config.model import AmqpConfig, AmqpConnectionSettings


class SetupFailed(Exception):
    """A connection attempt failed; ``str()`` is the sentence that says why."""


def broker_endpoint(
    reactor: Any, broker: AmqpConfig, timeout: float, tls: TlsMaterial | None
) -> IStreamClientEndpoint:
    """The endpoint that reaches ``broker`` (TLS when ``broker.tls``)."""
    endpoint = HostnameEndpoint(reactor, broker.hostname, broker.port, timeout=timeout)
    if not broker.tls:
        return endpoint
    assert tls is not None, "TLS material is loaded when any broker uses TLS"
    return wrapClientTLS(tls.options(broker.hostname), endpoint)


_CLIENT_CERT_REFUSED = (
    "alert unknown ca",
    "alert bad certificate",
    "certificate required",
    "alert certificate unknown",
    "alert access denied",
    "alert handshake failure",
    "alert certificate revoked",
    "alert certificate expired",
    "alert unsupported certificate",
)
_NOT_TLS = (
    "wrong version number",
    "packet length too long",
    "record layer failure",
    "http request",
)


def explain(
    reason: BaseException | Failure,
    broker: AmqpConfig,
    settings: AmqpConnectionSettings,
    client: Any = None,
    timed_out: bool = False,
    established: bool = False,
) -> str:
    """One sentence for a failed connection attempt or (``established``) a
    connection lost after its set-up.

    ``client`` (the protocol, if the TCP connection was made) knows more than
    the exception txAMQP raises: the broker's ``connection.close`` and the
    transport's real reason (a TLS error, say).
    """
    address = broker.address
    if timed_out:
        return f"no AMQP answer within {settings.connect_timeout:g} s from {address}"
    exc = reason.value if isinstance(reason, Failure) else reason
    if isinstance(exc, SetupFailed):
        return str(exc)
    if client is not None:
        if client.close_reason is not None:
            return explain_close(client.close_reason, broker, settings)
        if client.lost_reason is not None:
            exc = client.lost_reason.value
    closed = getattr(exc, "args", None)
    if closed and hasattr(closed[0], "reply_code"):  # txAMQP's Closed(connection.close)
        return explain_close(closed[0], broker, settings)
    if closed and isinstance(closed[0], Failure):
        exc = closed[0].value
    if isinstance(exc, net_error.ConnectionRefusedError):
        return f"connection refused by {address}"
    if isinstance(exc, net_error.DNSLookupError):
        return f"cannot resolve the host name {broker.hostname}"
    if isinstance(exc, (net_error.TimeoutError, net_error.TCPTimedOutError)):
        return f"no TCP connection to {address} within {settings.connect_timeout:g} s"
    if type(exc).__name__ == "VerificationError":  # service_identity: host name mismatch
        return f"TLS: the certificate of {address} does not match the host name {broker.hostname}"
    if type(exc).__module__.startswith("OpenSSL"):
        text = str(exc).lower()
        if "certificate verify failed" in text:
            return f"TLS: the certificate of {address} is signed by an unknown CA"
        if any(marker in text for marker in _CLIENT_CERT_REFUSED):
            if settings.tls_cert_file is None:
                return f"TLS: {address} refused the connection: it wants a client certificate"
            return f"TLS: {address} refused our client certificate"
        if any(marker in text for marker in _NOT_TLS):
            return f"TLS: {address} does not speak TLS (a plain AMQP port? use amqp://)"
        return f"TLS error with {address}: {_short(str(exc))}"
    if established and isinstance(exc, net_error.ConnectionDone):
        return f"the connection to {address} was closed"
    if established and isinstance(exc, net_error.ConnectionLost):
        return f"the connection to {address} was lost"
    if isinstance(exc, (net_error.ConnectionDone, net_error.ConnectionLost)):
        received = client.received if client is not None else b""
        if not broker.tls and received[:1] in (b"\x15", b"\x16"):
            return f"{address} answers with TLS: use amqps:// (or amqp.tls: true)"
        if received.startswith(b"AMQP"):
            return f"{address} does not speak AMQP 0-9-1 (it offered {received[:8]!r})"
        if not broker.tls and not received:
            return (
                f"{address} closed the connection during the AMQP handshake"
                " (a TLS port? use amqps://)"
            )
        return f"{address} closed the connection during the AMQP handshake"
    return f"AMQP set-up with {address} failed: {type(exc).__name__}: {_short(str(exc))}"


def explain_close(message: Any, broker: AmqpConfig, settings: AmqpConnectionSettings) -> str:
    """The broker's ``connection.close`` as a sentence."""
    code = message.reply_code
    text = str(message.reply_text)
    if code == 403 and "login was refused" in text.lower():
        if settings.auth_mechanism == "EXTERNAL":
            return (
                f"authentication failed: {broker.address} refused the client certificate"
                " login (EXTERNAL)"
            )
        return f"authentication failed for user {broker.username}"
    if code in (403, 530) and "vhost" in text.lower():
        if "not found" in text.lower():
            return f"vhost {broker.vhost} not found on {broker.address}"
        return f"access to vhost {broker.vhost} refused for user {broker.username}"
    return f"{broker.address} closed the connection: {_short(text)}"


def explain_channel_close(
    reason: BaseException, name: str, passive: bool, kind: str = "queue"
) -> str:
    """A queue (or exchange) declaration the broker refused, naming it and why."""
    message = reason.args[0] if reason.args else None
    code = getattr(message, "reply_code", None)
    text = _short(str(getattr(message, "reply_text", reason)))
    if code == 404 and passive:
        return f"{kind} {name} does not exist (amqp_declare: passive): {text}"
    if code == 406:
        return f"{kind} {name} exists with other arguments: {text}"
    return f"declaring {kind} {name} failed: {text}"


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
