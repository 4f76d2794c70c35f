"""A broker certificate the AMQP service refuses, in a real TLS handshake
(in memory: the service connects over ``iosim`` to the in-memory broker of
:mod:`tests.unit.helpers` behind a TLS server), is named for what is wrong
with it: expired, not yet valid, another host name, an unknown CA (issue 20
item 6). One sentence each, in the connection's error (log line, /health).

A good certificate is not tried here: the client's TLS layer (``wrapClientTLS``)
writes through the global reactor, which unit tests do not run; the e2e TLS
tests (tests/test_e2e_amqp_tls.py) connect with one."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from twisted.internet.ssl import CertificateOptions
from twisted.protocols.tls import TLSMemoryBIOFactory

from junebug_api.config.model import AmqpConfig

from .helpers import AmqpSetup

BROKER = AmqpConfig(hostname="localhost", port=5671, tls=True)
DAY = timedelta(days=1)


def _date(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def expired(ca: trustme.CA, now: datetime) -> tuple[trustme.LeafCert, str]:
    until = (now - DAY).replace(second=0, microsecond=0)
    cert = ca.issue_cert("localhost", not_before=now - 30 * DAY, not_after=until)
    return cert, f"TLS: the certificate of localhost:5671 expired on {_date(until)}"


def not_yet_valid(ca: trustme.CA, now: datetime) -> tuple[trustme.LeafCert, str]:
    start = (now + DAY).replace(second=0, microsecond=0)
    cert = ca.issue_cert("localhost", not_before=start, not_after=now + 30 * DAY)
    return cert, f"TLS: the certificate of localhost:5671 is not valid before {_date(start)}"


def other_host(ca: trustme.CA, now: datetime) -> tuple[trustme.LeafCert, str]:
    cert = ca.issue_cert("rabbit.example")
    return cert, "TLS: the certificate of localhost:5671 does not match the host name localhost"


def unknown_ca(ca: trustme.CA, now: datetime) -> tuple[trustme.LeafCert, str]:
    cert = trustme.CA().issue_cert("localhost")
    return cert, "TLS: the certificate of localhost:5671 is signed by an unknown CA"


@pytest.mark.parametrize("case", [expired, not_yet_valid, other_host, unknown_ca])
def test_a_refused_broker_certificate_is_named(
    tmp_path: Path, case: Callable[[trustme.CA, datetime], tuple[trustme.LeafCert, str]]
) -> None:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server_cert, sentence = case(ca, datetime.now(UTC))
    s = AmqpSetup(brokers=(BROKER,), listen=(), tls_ca_file=str(ca_file))
    server = CertificateOptions(
        privateKey=load_pem_private_key(server_cert.private_key_pem.bytes(), None),
        certificate=x509.load_pem_x509_certificate(server_cert.cert_chain_pems[0].bytes()),
    )
    tls = TLSMemoryBIOFactory(server, False, s.broker.factory(), clock=s.net.reactor)
    s.net.listen(5671, tls)
    s.service.startService()
    s.net.flush()
    publish, consume = s.service.links
    assert not s.service.connected
    assert publish.error == consume.error == sentence
    assert s.service.health()["error"] == sentence
    s.stop()
