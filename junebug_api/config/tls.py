"""The TLS material of the AMQP connections, read and checked once from its files.

It sits with the config because reading it is part of checking the config: a
CA file without a certificate, or a client certificate without its key, is a
config error at start, not a failed connection later.
"""

from __future__ import annotations

import re
from typing import Any, Protocol

from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    PrivateCertificate,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)

from junebug_api.config.checks import ConfigError


class TlsFiles(Protocol):
    """Where the TLS material is: an
    :class:`~junebug_api.config.amqp_options.AmqpConnectionSettings`."""

    @property
    def tls_ca_file(self) -> str | None: ...
    @property
    def tls_cert_file(self) -> str | None: ...
    @property
    def tls_key_file(self) -> str | None: ...
    @property
    def tls_verify(self) -> bool: ...


_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


class TlsMaterial:
    """The TLS trust root and client certificate, read once from their files."""

    def __init__(self, settings: TlsFiles) -> None:
        self.verify = settings.tls_verify
        self.trust: Any = None
        self.client_certificate: PrivateCertificate | None = None
        if settings.tls_ca_file is not None:
            with open(settings.tls_ca_file, "rb") as f:
                pems = _PEM_CERT.findall(f.read())
            if not pems:
                raise ConfigError(f"amqp_tls_ca_file {settings.tls_ca_file} holds no certificate")
            try:
                self.trust = trustRootFromCertificates([Certificate.loadPEM(p) for p in pems])
            except Exception as e:
                raise ConfigError(f"amqp_tls_ca_file {settings.tls_ca_file}: {e}") from None
        if settings.tls_cert_file is not None and settings.tls_key_file is not None:
            with open(settings.tls_cert_file, "rb") as f:
                cert = f.read()
            with open(settings.tls_key_file, "rb") as f:
                key = f.read()
            try:
                self.client_certificate = PrivateCertificate.loadPEM(cert + b"\n" + key)
            except Exception as e:
                raise ConfigError(
                    f"amqp_tls_cert_file/amqp_tls_key_file: not a certificate and its key ({e})"
                ) from None

    def options(self, hostname: str) -> Any:
        """The client TLS connection creator for ``hostname``."""
        if not self.verify:
            extra: dict[str, Any] = {}
            if self.client_certificate is not None:
                extra = {
                    "privateKey": self.client_certificate.privateKey.original,
                    "certificate": self.client_certificate.original,
                }
            return CertificateOptions(verify=False, **extra)
        return optionsForClientTLS(
            hostname,
            trustRoot=self.trust if self.trust is not None else platformTrust(),
            clientCertificate=self.client_certificate,
        )
