"""A registry in memory with the ChannelRegistry interface, and a config with
the channel API, for the channel API's unit tests (the real registry has its
own tests)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from junebug_api.config.channels import ChannelSettings, check_distinct, resolve_channels
from junebug_api.config.checks import ConfigError
from junebug_api.config.model import JunebugConfig, load_config
from junebug_api.http.api import ApiCredentials

MO = "http://127.0.0.1:9/mo"
ADMIN_TOKEN = "admin-secret"


def api_config(tmp_path: Any, **options: str) -> JunebugConfig:
    """A config with a config-file channel ``fixed`` and the channel API on a file."""
    cli = {
        "http_bind": "127.0.0.1:1",
        "mo_message_url": MO,
        "channels": '{"fixed": {"label": "from the file"}}',
        "channel_api": "true",
        "channel_api_file": str(tmp_path / "channels.yaml"),
        "admin_auth_token": ADMIN_TOKEN,
        **options,
    }
    return load_config(None, environ={}, cli=cli)


class FakeChannel:
    """A running channel: its settings, shown as the API shows them."""

    def __init__(self, settings: ChannelSettings) -> None:
        self.id = settings.id
        self.settings = settings
        self.restarts = 0
        self.credentials = ApiCredentials(
            settings.api_auth_username, settings.api_auth_password, settings.api_auth_token
        )

    @property
    def messages_path(self) -> str:
        return self.settings.messages_path

    def logs(self, n: int | None) -> list[dict[str, Any]]:
        return []

    def info(self, amqp_health: dict[str, Any]) -> dict[str, Any]:
        return {**self.settings.public(), "status": {"status": "ok"}}


class FakeRegistry:
    """The ChannelRegistry interface over a dict; ``calls`` records each change."""

    def __init__(self, config: JunebugConfig) -> None:
        self._running: dict[str, tuple[FakeChannel, str]] = {}
        self.calls: list[tuple[str, str]] = []
        #: Connector names it refuses, as if another channel had just taken them.
        self.refuse: set[str] = set()
        for settings in resolve_channels(config):
            self._running[settings.id] = (FakeChannel(settings), "config")

    def get(self, channel_id: str) -> FakeChannel | None:
        found = self._running.get(channel_id)
        return None if found is None else found[0]

    def channels(self) -> list[FakeChannel]:
        return [channel for channel, _ in self._running.values()]

    def origin(self, channel_id: str) -> str | None:
        found = self._running.get(channel_id)
        return None if found is None else found[1]

    def _check_free(self, settings: ChannelSettings) -> None:
        if settings.connector_name in self.refuse:
            raise ConfigError(f"channels.{settings.id}.connector_name is taken")

    async def start(self, settings: ChannelSettings, origin: str) -> FakeChannel:
        self._check_free(settings)
        check_distinct([*(c.settings for c in self.channels()), settings])
        channel = FakeChannel(settings)
        self._running[settings.id] = (channel, origin)
        self.calls.append(("start", settings.id))
        return channel

    async def change(self, settings: ChannelSettings) -> FakeChannel:
        self._check_free(settings)
        channel = self._running[settings.id][0]
        channel.settings = settings
        self.calls.append(("change", settings.id))
        return channel

    async def stop(self, channel_id: str) -> None:
        del self._running[channel_id]
        self.calls.append(("stop", channel_id))

    async def restart(self, channel_id: str) -> None:
        self._running[channel_id][0].restarts += 1
        self.calls.append(("restart", channel_id))

    async def apply(self, wanted: Sequence[ChannelSettings], origin: str) -> None:
        ids = {s.id for s in wanted}
        for channel_id, (_, had) in list(self._running.items()):
            if had == origin and channel_id not in ids:
                await self.stop(channel_id)
        for settings in wanted:
            running = self._running.get(settings.id)
            if running is None:
                await self.start(settings, origin)
            elif running[1] == origin and running[0].settings != settings:
                await self.change(settings)
