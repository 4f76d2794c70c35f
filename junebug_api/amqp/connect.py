"""Reaching a broker: endpoints, TLS, and what went wrong, in one sentence.

:func:`broker_endpoint` gives the Twisted endpoint for one broker: plain
TCP, or TLS through Twisted's ``optionsForClientTLS`` (the system trust
store, or the CA bundle of ``amqp_tls_ca_file``; a client certificate for
``EXTERNAL`` logins or brokers that ask for one). :func:`explain` turns a
failed connection attempt into the sentence that goes into the log line and
``/health``'s ``error``: "authentication failed for user guest", "connection
refused by 127.0.0.1:5672", "no AMQP answer within 10 s", never a
traceback. A broker certificate we refuse is named for what is wrong with it
(:class:`NamingCertificateFailures`): "TLS: the certificate of rabbit:5671
expired on 2024-05-01 12:00 UTC", "... is not valid before ...", "... is
signed by an unknown CA", "... does not match the host name rabbit".
"""

from __future__ import annotations

import weakref
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from cryptography import x509
from OpenSSL import SSL
from twisted.internet import error as net_error
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IStreamClientEndpoint
from twisted.python.failure import Failure
from zope.interface import implementer

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
    return wrapClientTLS(NamingCertificateFailures(tls.options(broker.hostname)), endpoint)


class CertificateRejected(Exception):
    """We refused the broker's certificate; ``str()`` says why, as the end of
    "the certificate of <broker> ...": "expired on 2024-05-01 12:00 UTC",
    "is not valid before ...", "is signed by an unknown CA"."""


#: TLS alerts (RFC 8446 6.2) OpenSSL sends for a certificate it refused.
_BAD_CERTIFICATE, _CERTIFICATE_EXPIRED, _UNKNOWN_CA = 42, 45, 48


def certificate_problem(
    alert: int, chain: list[x509.Certificate] | None, now: datetime
) -> CertificateRejected | None:
    """Why OpenSSL refused the peer's certificate, from the alert it sends
    and the certificates the peer sent (the leaf first); None for alerts
    that are not about the certificate's dates or issuer (a host name
    mismatch is reported by service_identity)."""
    leaf = chain[0] if chain else None
    if alert == _CERTIFICATE_EXPIRED:
        if leaf is not None and leaf.not_valid_after_utc < now:
            return CertificateRejected(f"expired on {_date(leaf.not_valid_after_utc)}")
        return CertificateRejected("has expired (a certificate of its chain)")
    if alert == _BAD_CERTIFICATE and leaf is not None and leaf.not_valid_before_utc > now:
        return CertificateRejected(f"is not valid before {_date(leaf.not_valid_before_utc)}")
    if alert == _UNKNOWN_CA:
        return CertificateRejected("is signed by an unknown CA")
    return None


def _date(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")


@implementer(IOpenSSLClientConnectionCreator)
class NamingCertificateFailures:
    """Wraps a client TLS connection creator so that a broker certificate
    OpenSSL refuses fails the connection with a :class:`CertificateRejected`
    naming why (expired, not yet valid, unknown CA) rather than OpenSSL's
    "certificate verify failed" for all of them. It reads the alert OpenSSL
    sends and the certificate the broker sent; verification itself is the
    wrapped creator's, unchanged."""

    def __init__(self, creator: IOpenSSLClientConnectionCreator) -> None:
        self.creator = creator

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = self.creator.clientConnectionForTLS(tlsProtocol)
        protocol = weakref.ref(tlsProtocol)

        def on_alert(conn: SSL.Connection, where: int, value: int) -> None:
            if where & SSL.SSL_CB_WRITE_ALERT != SSL.SSL_CB_WRITE_ALERT:
                return
            chain = conn.get_peer_cert_chain(as_cryptography=True)
            problem = certificate_problem(value & 0xFF, chain, datetime.now(UTC))
            tls = protocol()
            if problem is not None and tls is not None:
                tls.failVerification(Failure(problem))

        connection.set_info_callback(on_alert)
        return connection


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
    if timed_out:
        return f"no AMQP answer within {settings.connect_timeout:g} s from {broker.address}"
    exc = reason.value if isinstance(reason, Failure) else reason
    if isinstance(exc, SetupFailed):
        return str(exc)
    close, exc = _cause(exc, client)
    if close is not None:
        return explain_close(close, broker, settings)
    return (
        _network_failure(exc, broker, settings)
        or _tls_failure(exc, broker, settings)
        or _closed_failure(exc, broker, client, established)
        or f"AMQP set-up with {broker.address} failed: {type(exc).__name__}: {_short(str(exc))}"
    )


def _cause(exc: BaseException, client: Any) -> tuple[Any, BaseException]:
    """The broker's ``connection.close`` if it sent one, and the exception
    underneath txAMQP's (the transport's reason)."""
    if client is not None:
        if client.close_reason is not None:
            return client.close_reason, exc
        if client.lost_reason is not None:
            exc = client.lost_reason.value
    closed = getattr(exc, "args", None)
    if closed and hasattr(closed[0], "reply_code"):  # txAMQP's Closed(connection.close)
        return closed[0], exc
    if closed and isinstance(closed[0], Failure):
        exc = closed[0].value
    return None, exc


def _network_failure(
    exc: BaseException, broker: AmqpConfig, settings: AmqpConnectionSettings
) -> str | None:
    if isinstance(exc, net_error.ConnectionRefusedError):
        return f"connection refused by {broker.address}"
    if isinstance(exc, net_error.DNSLookupError):
        return f"cannot resolve the host name {broker.hostname}"
    if isinstance(exc, (net_error.TimeoutError, net_error.TCPTimedOutError)):
        return f"no TCP connection to {broker.address} within {settings.connect_timeout:g} s"
    return None


def _tls_failure(
    exc: BaseException, broker: AmqpConfig, settings: AmqpConnectionSettings
) -> str | None:
    address = broker.address
    if isinstance(exc, CertificateRejected):
        return f"TLS: the certificate of {address} {exc}"
    if type(exc).__name__ == "VerificationError":  # service_identity: host name mismatch
        return f"TLS: the certificate of {address} does not match the host name {broker.hostname}"
    if not type(exc).__module__.startswith("OpenSSL"):
        return None
    text = str(exc).lower()
    if "certificate verify failed" in text:
        return f"TLS: the certificate of {address} failed verification"
    if any(marker in text for marker in _CLIENT_CERT_REFUSED):
        if settings.tls_cert_file is None:
            return f"TLS: {address} refused the connection: it wants a client certificate"
        return f"TLS: {address} refused our client certificate"
    if any(marker in text for marker in _NOT_TLS):
        return f"TLS: {address} does not speak TLS (a plain AMQP port? use amqp://)"
    return f"TLS error with {address}: {_short(str(exc))}"


def _closed_failure(
    exc: BaseException, broker: AmqpConfig, client: Any, established: bool
) -> str | None:
    address = broker.address
    if not isinstance(exc, (net_error.ConnectionDone, net_error.ConnectionLost)):
        return None
    if established:
        lost = isinstance(exc, net_error.ConnectionLost)
        return f"the connection to {address} was {'lost' if lost else 'closed'}"
    received = client.received if client is not None else b""
    if not broker.tls and received[:1] in (b"\x15", b"\x16"):
        return f"{address} answers with TLS: use amqps:// (or amqp.tls: true)"
    if received.startswith(b"AMQP"):
        return f"{address} does not speak AMQP 0-9-1 (it offered {received[:8]!r})"
    if not broker.tls and not received:
        return (
            f"{address} closed the connection during the AMQP handshake (a TLS port? use amqps://)"
        )
    return f"{address} closed the connection during the AMQP handshake"


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
