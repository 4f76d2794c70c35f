"""The AMQP options: where the brokers are, how to log in, TLS, limits, topology."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

import attrs

from junebug_api.config.checks import (
    AmqpName,
    Between,
    Check,
    ConfigError,
    HostName,
    OneOf,
    OptionError,
    Printable,
    ReadableFile,
)
from junebug_api.config.options import option
from junebug_api.config.urls import url_problem


@attrs.frozen(kw_only=True)
class AmqpConfig:
    """Where one RabbitMQ broker is and how to log in (the ``amqp`` block)."""

    hostname: str = option(
        "127.0.0.1", checks=[HostName()], description="The broker's host name or IP address."
    )
    tls: bool = option(
        False, description="Connects with TLS (see amqp_tls_ca_file and the next options)."
    )
    # Without a port of its own: AMQP's 5672, or 5671 with TLS (as amqps:// has).
    port: int = option(
        attrs.Factory(lambda self: 5671 if self.tls else 5672, takes_self=True),
        checks=[Between(1, 65535)],
        default_text="5672, or 5671 with tls",
        description="The broker's port.",
    )
    username: str = option("guest", checks=[Printable()], description="The user name to log in.")
    password: str = option(
        "guest", secret=True, description="The password to log in.", default_text="guest"
    )
    vhost: str = option("/", checks=[AmqpName()], description="The virtual host.")

    @property
    def address(self) -> str:
        """``host:port``, for log lines and ``/health`` (never credentials)."""
        host = f"[{self.hostname}]" if ":" in self.hostname else self.hostname
        return f"{host}:{self.port}"


def parse_amqp_url(url: str, name: str = "amqp_url") -> AmqpConfig:
    """``amqp[s]://user:pass@host:port/vhost`` as an :class:`AmqpConfig`.

    ``amqps`` means TLS (default port 5671), as in vumi2. Parts the service
    would drop (a query string such as ``?heartbeat=10``, a fragment) are
    refused rather than silently ignored: their options are separate settings.
    """
    problem = url_problem(url.strip())
    if problem is not None:
        raise ConfigError(f"{name} {problem}")
    parts = urlsplit(url.strip())
    if parts.scheme not in ("amqp", "amqps"):
        raise ConfigError(f"{name} must start with amqp:// or amqps://")
    if parts.query or url.rstrip().endswith("?"):
        raise ConfigError(
            f"{name} must not have a query string ({parts.query!r}): use the amqp_* options"
        )
    if parts.fragment:
        raise ConfigError(f"{name} must not have a #fragment")
    tls = parts.scheme == "amqps"
    try:
        return AmqpConfig(
            hostname=parts.hostname or "127.0.0.1",
            port=parts.port or (5671 if tls else 5672),
            username=unquote(parts.username) if parts.username is not None else "guest",
            password=unquote(parts.password) if parts.password is not None else "guest",
            vhost=unquote(parts.path[1:]) if len(parts.path) > 1 else "/",
            tls=tls,
        )
    except OptionError as e:  # a part of the URL, e.g. its vhost
        raise OptionError(name, str(e), separator=": ") from None


@attrs.frozen
class AmqpUrl(Check):
    """An ``amqp://`` or ``amqps://`` URL (see :func:`parse_amqp_url`); empty: unset."""

    def __call__(self, _instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value:
            parse_amqp_url(value, attribute.name)

    @property
    def text(self) -> str:
        return "amqp(s) URL"


@attrs.frozen
class AmqpUrls(Check):
    """A list of ``amqp://`` or ``amqps://`` URLs."""

    def __call__(self, _instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        for i, url in enumerate(value):
            name = f"{attribute.name}[{i}]"
            if not isinstance(url, str) or not url.strip():
                raise ConfigError(f"{name} must be a non-empty amqp:// or amqps:// URL")
            try:
                parse_amqp_url(url, name)
            except OptionError as e:  # a part of one URL: the list is named
                raise ConfigError(f"{attribute.name}: {e.problem}") from None

    @property
    def text(self) -> str:
        return "amqp(s) URLs"


@attrs.frozen
class QueueArguments(Check):
    """AMQP queue arguments: names of 1-255 bytes; strings, booleans, 64-bit integers."""

    def __call__(self, _instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        name = attribute.name
        for key, item in value.items():
            if not isinstance(key, str) or not 0 < len(key.encode("utf-8")) <= 255:
                raise ConfigError(f"{name}: {key!r} is no valid argument name")
            if isinstance(item, int) and not -(2**63) <= item < 2**63:
                raise ConfigError(f"{name}.{key} is out of range")
            if not isinstance(item, (str, int, bool)):
                raise ConfigError(
                    f"{name}.{key} must be a string, an integer or a boolean, got {item!r}"
                )


AMQP_FAILOVER = ("in_order", "shuffle")
AMQP_AUTH_MECHANISMS = ("PLAIN", "EXTERNAL")
AMQP_DECLARE_MODES = ("declare", "passive")


@attrs.frozen(kw_only=True)
class AmqpConnectionSettings:
    """Everything the AMQP connections need: brokers, TLS, login, limits.

    Built from the options by :attr:`AmqpOptions.amqp_connection`; the
    replay script and tests build it directly (``brokers`` alone will do).
    """

    brokers: tuple[AmqpConfig, ...] = (AmqpConfig(),)
    failover: str = "in_order"
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_verify: bool = True
    auth_mechanism: str = "PLAIN"
    heartbeat: int = 30
    connect_timeout: float = 10.0
    max_unconfirmed: int = 5000
    queue_arguments: dict = attrs.field(factory=dict)
    declare: str = "declare"


@attrs.frozen(kw_only=True, slots=False)
class AmqpOptions:
    """The AMQP options of the top-level config."""

    amqp: AmqpConfig = option(
        factory=AmqpConfig,
        description="The broker, when neither amqp_url nor amqp_urls is set.",
    )
    amqp_url: str = option(
        "",
        checks=[AmqpUrl()],
        url=True,
        default_text="unset",
        description=(
            "The broker as amqp://user:pass@host:port/vhost (amqps:// for TLS, port 5671);"
            " wins over amqp, and takes no query string."
        ),
    )
    amqp_urls: list = option(
        factory=list,
        checks=[AmqpUrls()],
        url=True,
        many=True,
        description=(
            "Several brokers (a cluster's nodes) as such URLs, tried in turn;"
            " comma-separated in the environment and on the command line."
        ),
    )
    amqp_failover: str = option(
        "in_order",
        checks=[OneOf(AMQP_FAILOVER)],
        description="The order amqp_urls are tried in: as listed, or shuffled each round.",
    )
    amqp_tls_ca_file: str | None = option(
        checks=[ReadableFile()],
        default_text="the system's trust store",
        description="A PEM bundle of the CAs that sign the broker's certificate.",
    )
    amqp_tls_cert_file: str | None = option(
        checks=[ReadableFile()],
        description=(
            "A PEM client certificate (with amqp_tls_key_file), for brokers that ask for one"
            " and for EXTERNAL."
        ),
    )
    amqp_tls_key_file: str | None = option(
        checks=[ReadableFile()], description="The client certificate's private key (PEM)."
    )
    amqp_tls_verify: bool = option(
        True,
        description=(
            "Checks the broker's certificate and host name; false skips that, with a warning."
        ),
    )
    amqp_auth_mechanism: str = option(
        "PLAIN",
        checks=[OneOf(AMQP_AUTH_MECHANISMS, fold_case=True)],
        description=(
            "PLAIN (user name and password) or EXTERNAL (the client certificate is the"
            " identity; needs TLS)."
        ),
    )
    amqp_connect_timeout: float = option(
        10.0,
        checks=[Between(0, 3600, above=True)],
        description="Seconds for a connection attempt: TCP, TLS and the AMQP handshake.",
    )
    amqp_max_unconfirmed: int = option(
        5000,
        checks=[Between(1, 1_000_000)],
        description=(
            "Publishes that may await the broker's confirm; beyond, outbound requests get 503."
        ),
    )
    amqp_queue_arguments: dict = option(
        factory=dict,
        checks=[QueueArguments()],
        description=('Arguments of every queue declared, e.g. {"x-queue-type": "quorum"}.'),
    )
    amqp_declare: str = option(
        "declare",
        checks=[OneOf(AMQP_DECLARE_MODES)],
        description=("declare the exchange and queues, or passive: only check that they exist."),
    )
    amqp_heartbeat: int = option(
        30, checks=[Between(0, 65535)], description="AMQP heartbeat seconds; 0 turns it off."
    )

    @property
    def amqp_brokers(self) -> list[AmqpConfig]:
        """The brokers to connect to, in order: ``amqp_urls``, else ``amqp_url``,
        else the ``amqp`` block."""
        if self.amqp_urls:
            return [parse_amqp_url(url, f"amqp_urls[{i}]") for i, url in enumerate(self.amqp_urls)]
        if self.amqp_url:
            return [parse_amqp_url(self.amqp_url)]
        return [self.amqp]

    @property
    def amqp_settings(self) -> AmqpConfig:
        """The first broker (the only one unless ``amqp_urls`` lists several)."""
        return self.amqp_brokers[0]

    @property
    def amqp_connection(self) -> AmqpConnectionSettings:
        """The settings the AMQP service connects with."""
        return AmqpConnectionSettings(
            brokers=tuple(self.amqp_brokers),
            failover=self.amqp_failover,
            tls_ca_file=self.amqp_tls_ca_file,
            tls_cert_file=self.amqp_tls_cert_file,
            tls_key_file=self.amqp_tls_key_file,
            tls_verify=self.amqp_tls_verify,
            auth_mechanism=self.amqp_auth_mechanism.upper(),
            heartbeat=self.amqp_heartbeat,
            connect_timeout=self.amqp_connect_timeout,
            max_unconfirmed=self.amqp_max_unconfirmed,
            queue_arguments=dict(self.amqp_queue_arguments),
            declare=self.amqp_declare,
        )


def check_amqp(config: AmqpOptions) -> None:
    """The AMQP options together: one way to name the brokers, a client
    certificate with its key, EXTERNAL with TLS, TLS material that loads."""
    if config.amqp_url and config.amqp_urls:
        raise ConfigError("set amqp_url or amqp_urls, not both")
    if (config.amqp_tls_cert_file is None) != (config.amqp_tls_key_file is None):
        raise ConfigError("amqp_tls_cert_file and amqp_tls_key_file must be set together")
    brokers = config.amqp_brokers
    if config.amqp_auth_mechanism.upper() == "EXTERNAL":
        if config.amqp_tls_cert_file is None:
            raise ConfigError("amqp_auth_mechanism EXTERNAL needs amqp_tls_cert_file and _key_file")
        if not all(broker.tls for broker in brokers):
            raise ConfigError("amqp_auth_mechanism EXTERNAL needs amqps:// (or amqp.tls: true)")
    if any(broker.tls for broker in brokers):
        from junebug_api.config.tls import TlsMaterial  # here: it needs Twisted's TLS

        TlsMaterial(config.amqp_connection)  # reads the PEM files, raising ConfigError
