"""amqp_connect.explain: each way a connection attempt fails, as one sentence."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
import trustme
from cryptography import x509
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import error
from twisted.python.failure import Failure

from junebug_api.amqp.connect import (
    CertificateRejected,
    SetupFailed,
    certificate_problem,
    explain,
    explain_channel_close,
)
from junebug_api.config.model import AmqpConfig, AmqpConnectionSettings

PLAIN = AmqpConfig(hostname="rabbit", port=5672, username="junebug")
TLS = AmqpConfig(hostname="rabbit", port=5671, username="junebug", tls=True)
SETTINGS = AmqpConnectionSettings(brokers=(PLAIN,), connect_timeout=7)


def client(close=None, lost=None, received=b""):
    return SimpleNamespace(close_reason=close, lost_reason=lost, received=received)


def close_message(code: int, text: str):
    return SimpleNamespace(reply_code=code, reply_text=text)


@pytest.mark.parametrize(
    ("reason", "broker", "the_client", "sentence"),
    [
        (error.ConnectionRefusedError(), PLAIN, None, "connection refused by rabbit:5672"),
        (error.DNSLookupError("x"), PLAIN, None, "cannot resolve the host name rabbit"),
        (error.TimeoutError(), PLAIN, None, "no TCP connection to rabbit:5672 within 7 s"),
        (
            Exception("closed"),
            PLAIN,
            client(
                close=close_message(
                    403,
                    "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN.",
                )
            ),
            "authentication failed for user junebug",
        ),
        (
            Exception("closed"),
            PLAIN,
            client(close=close_message(530, "NOT_ALLOWED - vhost x not found")),
            "vhost / not found on rabbit:5672",
        ),
        (
            Exception("closed"),
            PLAIN,
            client(close=close_message(320, "CONNECTION_FORCED - shutdown")),
            "rabbit:5672 closed the connection: CONNECTION_FORCED - shutdown",
        ),
        (
            Exception("closed"),
            TLS,
            client(lost=Failure(SSL.Error([("SSL routines", "", "certificate verify failed")]))),
            "TLS: the certificate of rabbit:5671 failed verification",
        ),
        (
            Exception("closed"),
            TLS,
            client(lost=Failure(SSL.Error([("SSL routines", "", "tlsv1 alert unknown ca")]))),
            "TLS: rabbit:5671 refused the connection: it wants a client certificate",
        ),
        (
            Exception("closed"),
            TLS,
            client(lost=Failure(SSL.Error([("SSL routines", "", "wrong version number")]))),
            "TLS: rabbit:5671 does not speak TLS (a plain AMQP port? use amqp://)",
        ),
        (
            Exception("closed"),
            TLS,
            client(lost=Failure(VerificationError(errors=[]))),
            "TLS: the certificate of rabbit:5671 does not match the host name rabbit",
        ),
        (
            Exception("closed"),
            PLAIN,
            client(lost=Failure(error.ConnectionDone()), received=b"\x15\x03\x03\x00\x02"),
            "rabbit:5672 answers with TLS: use amqps:// (or amqp.tls: true)",
        ),
        (
            Exception("closed"),
            PLAIN,
            client(lost=Failure(error.ConnectionLost()), received=b"AMQP\x00\x00\x09\x01"),
            "rabbit:5672 does not speak AMQP 0-9-1 (it offered b'AMQP\\x00\\x00\\t\\x01')",
        ),
        (SetupFailed("queue q does not exist"), PLAIN, None, "queue q does not exist"),
    ],
)
def test_explain(reason, broker, the_client, sentence) -> None:
    assert explain(reason, broker, SETTINGS, the_client) == sentence


def test_explain_a_connection_lost_after_its_set_up() -> None:
    closed = client(lost=Failure(error.ConnectionDone()), received=b"\x01")
    assert explain(Exception(), PLAIN, SETTINGS, closed, established=True) == (
        "the connection to rabbit:5672 was closed"
    )
    lost = client(lost=Failure(error.ConnectionLost()), received=b"\x01")
    assert explain(Exception(), PLAIN, SETTINGS, lost, established=True) == (
        "the connection to rabbit:5672 was lost"
    )


def test_explain_timeout_and_external() -> None:
    assert explain(Exception(), PLAIN, SETTINGS, client(), timed_out=True) == (
        "no AMQP answer within 7 s from rabbit:5672"
    )
    external = AmqpConnectionSettings(brokers=(TLS,), auth_mechanism="EXTERNAL")
    refused = client(close=close_message(403, "ACCESS_REFUSED - Login was refused"))
    assert "refused the client certificate login (EXTERNAL)" in explain(
        Exception(), TLS, external, refused
    )


def test_explain_channel_close() -> None:
    def closed(code: int, text: str) -> Exception:
        return Exception(close_message(code, text))

    inequivalent = "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'q'"
    assert explain_channel_close(closed(406, inequivalent), "q", passive=False) == (
        f"queue q exists with other arguments: {inequivalent}"
    )
    assert explain_channel_close(closed(404, "NOT_FOUND - no queue 'q'"), "q", passive=True) == (
        "queue q does not exist (amqp_declare: passive): NOT_FOUND - no queue 'q'"
    )
    missing = closed(404, "NOT_FOUND - no exchange 'vumi'")
    assert explain_channel_close(missing, "vumi", passive=True, kind="exchange") == (
        "exchange vumi does not exist (amqp_declare: passive): NOT_FOUND - no exchange 'vumi'"
    )


# -- a broker certificate we refuse, named for what is wrong with it -----------

NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)


def certificate(ca: trustme.CA, *names: str, **dates: datetime) -> x509.Certificate:
    """A certificate of ``ca`` for ``names`` (``not_before``/``not_after``)."""
    pem = ca.issue_cert(*names, **dates).cert_chain_pems[0].bytes()
    return x509.load_pem_x509_certificate(pem)


@pytest.mark.parametrize(
    ("alert", "dates", "named"),
    [
        (
            45,
            {"not_before": datetime(2029, 1, 1, tzinfo=UTC), "not_after": NOW - timedelta(days=3)},
            "expired on 2030-05-29 12:00 UTC",
        ),
        (45, {}, "has expired (a certificate of its chain)"),  # the leaf is valid: its CA expired
        (
            42,
            {"not_before": NOW + timedelta(hours=2), "not_after": NOW + timedelta(days=90)},
            "is not valid before 2030-06-01 14:00 UTC",
        ),
        (48, {}, "is signed by an unknown CA"),
        (42, {}, None),  # a bad certificate for another reason: OpenSSL's words stand
        (80, {}, None),  # internal error: a host name mismatch (service_identity's)
    ],
)
def test_certificate_problem(alert: int, dates: dict, named: str | None) -> None:
    leaf = certificate(trustme.CA(), "rabbit", **dates)
    problem = certificate_problem(alert, [leaf], NOW)
    assert (problem and str(problem)) == named


def test_a_rejected_certificate_is_one_sentence() -> None:
    rejected = client(lost=Failure(CertificateRejected("expired on 2030-05-29 12:00 UTC")))
    assert explain(Exception("closed"), TLS, SETTINGS, rejected) == (
        "TLS: the certificate of rabbit:5671 expired on 2030-05-29 12:00 UTC"
    )
