"""twistd's entry: ``Options`` and ``makeService`` for ``twistd junebug-api``.

Every config option is also a command-line option (``--connector-name``,
``--amqp-hostname``, ...), its ``--help`` the option's own sentence from the
config model. A config problem ends the process with one line on stderr and
exit status 1, before anything starts.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.python import usage

from junebug_api.config.model import ConfigError, JunebugConfig, load_config
from junebug_api.config.reference import help_texts

_HELP = help_texts()


class Options(usage.Options):
    """``twistd junebug-api`` options: ``--config`` plus one per config option."""

    synopsis = "[--config FILE] [--OPTION VALUE ...]"
    optParameters = [  # noqa: RUF012 - twisted.python.usage reads this class attribute
        ["config", "c", None, "YAML config file (default: $VUMI_CONFIG_FILE)."],
        *[[name.replace("_", "-"), None, None, text] for name, text in _HELP.items()],
    ]

    def load(self) -> JunebugConfig:
        """The config from the file, the environment and these options (again
        on SIGHUP); ConfigError if it is wrong."""
        cli = {name: self[name.replace("_", "-")] for name in _HELP}
        return load_config(self["config"], cli=cli)

    def postOptions(self) -> None:
        try:
            #: The config as loaded (what a SIGHUP reload compares with).
            self.config: JunebugConfig = self.load()
            from junebug_api.state.cache import load_state_cache_class

            cls = load_state_cache_class(self.config.state_cache_class)
            cls.check_config(
                self.config.state_cache_config, self.config.connector_name or "channels"
            )
        except ConfigError as e:
            sys.stderr.write(f"junebug-api: config error: {e}\n")
            raise SystemExit(1) from None


def makeService(options: Options) -> Any:
    """The service tree for the loaded config, with the open-file limit raised
    and ``http_max_connections`` sized under it; ``log_level`` applies from here."""
    import attrs
    from twisted.internet import reactor

    from junebug_api.http.limits import raise_open_file_limit
    from junebug_api.observe.log import (
        Redactor,
        log_file_observer,
        logger,
        set_log_level,
        twistd_log_file,
    )
    from junebug_api.service import JunebugService

    config = options.config
    # The service sets the level again when it starts; the lines logged here
    # come before that and obey log_level too.
    set_log_level(config.log_level)
    log = logger(__name__)
    before, after, hard = raise_open_file_limit()
    max_connections = config.max_connections(after)
    log.info(
        "Open-file limit {after} (was {before}, hard limit {hard});"
        " at most {max_connections} HTTP connections at once",
        after=after,
        before=before,
        hard=hard,
        max_connections=max_connections,
    )
    if max_connections > after * 3 // 4:
        log.warn(
            "http_max_connections {max_connections} leaves few of the {limit} file"
            " descriptors for AMQP, outgoing HTTP and Redis; a flood may exhaust them",
            max_connections=max_connections,
            limit=after,
        )
    config = attrs.evolve(config, http_max_connections=max_connections)

    # One redactor for the log file and the service, which adds and removes
    # the channels' secrets as they start and stop.
    redactor = Redactor.for_config(config)
    observer = None
    server_options = getattr(options, "parent", None)
    if server_options is not None:
        out = twistd_log_file(server_options)
        if out is not None:
            observer = log_file_observer(config.log_format, out, redactor, config.connector_name)
    return JunebugService(
        config, reactor, log_observer=observer, redactor=redactor, config_source=options
    )
