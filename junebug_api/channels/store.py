"""Where the channel API keeps its channels: Redis, or a YAML file.

A store maps channel id -> its ``channels:`` entry (what
:func:`~junebug_api.config.channels.channel_entry` gives: the options the
channel sets, secrets included) and has a ``version`` that changes with every
write, so every process can poll it cheaply and reload only when it moved
(:mod:`junebug_api.channels.sync`).

- :class:`RedisChannelStore`, with the Redis state cache: a hash
  ``<key prefix>channels`` of id -> JSON entry and a counter
  ``<key prefix>channels:version`` bumped in the same MULTI/EXEC as each
  write; every process on that Redis shares it.
- :class:`FileChannelStore`, otherwise: ``channel_api_file``, YAML in the
  ``channels:`` shape, written atomically (a temporary file in the same
  directory, fsync, rename) with mode 0600 (it holds secrets).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any, Protocol

import yaml
from twisted.internet.defer import Deferred, gatherResults

from junebug_api.config.checks import ConfigError

Entry = dict[str, Any]
Entries = dict[str, Entry]


class ChannelStore(Protocol):
    """What the channel admin and the store sync need of a store."""

    async def version(self) -> Any:
        """Something that differs after every write (cheap to ask)."""

    async def load(self) -> tuple[Any, Entries]:
        """The version and every entry, read together."""

    async def get(self, channel_id: str) -> Entry | None:
        """One channel's entry; None if it is not stored."""

    async def put(self, channel_id: str, entry: Mapping[str, Any]) -> None:
        """Store (create or replace) one channel's entry."""

    async def delete(self, channel_id: str) -> bool:
        """Forget one channel; whether it was stored."""


class RedisCommands(Protocol):
    """What the Redis store needs of a Redis client: one command at a time,
    pipelined in the order they are issued (the state cache's connection)."""

    @property
    def key_prefix(self) -> bytes:
        """The prefix of every key of this deployment."""

    def command(self, *args: bytes | str | int) -> Deferred[Any]:
        """Send one command; a Deferred of its reply."""


class StoreUnavailable(Exception):
    """The store cannot be read or written now (Redis down, a disk error)."""


class RedisChannelStore:
    """The channels in Redis, under the state cache's key prefix."""

    def __init__(self, redis: RedisCommands) -> None:
        self._redis = redis
        self._hash = redis.key_prefix + b"channels"
        self._version = redis.key_prefix + b"channels:version"

    async def _transaction(self, *commands: tuple[Any, ...]) -> list[Any]:
        """``commands`` in one MULTI/EXEC: the replies of each. They are
        written in one go, so no other command of this process comes between."""
        sent = [self._redis.command(b"MULTI")]
        sent += [self._redis.command(*c) for c in commands]
        sent.append(self._redis.command(b"EXEC"))
        try:
            replies = await gatherResults(sent, consumeErrors=True)
        except Exception as e:
            cause = getattr(e, "subFailure", None)
            message = cause.getErrorMessage() if cause is not None else str(e)
            raise StoreUnavailable(f"Redis: {message}") from None
        if replies[-1] is None:  # pragma: no cover - no WATCH: EXEC is not aborted
            raise StoreUnavailable("Redis aborted the transaction")
        return replies[-1]

    async def version(self) -> Any:
        try:
            return await self._redis.command(b"GET", self._version)
        except Exception as e:
            raise StoreUnavailable(f"Redis: {e}") from None

    async def load(self) -> tuple[Any, Entries]:
        version, flat = await self._transaction((b"GET", self._version), (b"HGETALL", self._hash))
        entries: Entries = {}
        for key, value in zip(flat[::2], flat[1::2], strict=True):
            channel_id = key.decode("utf-8")
            entries[channel_id] = _json_entry(channel_id, value)
        return version, entries

    async def get(self, channel_id: str) -> Entry | None:
        try:
            value = await self._redis.command(b"HGET", self._hash, channel_id)
        except Exception as e:
            raise StoreUnavailable(f"Redis: {e}") from None
        return None if value is None else _json_entry(channel_id, value)

    async def put(self, channel_id: str, entry: Mapping[str, Any]) -> None:
        value = json.dumps(dict(entry), sort_keys=True, ensure_ascii=False)
        await self._transaction((b"HSET", self._hash, channel_id, value), (b"INCR", self._version))

    async def delete(self, channel_id: str) -> bool:
        removed, _ = await self._transaction(
            (b"HDEL", self._hash, channel_id), (b"INCR", self._version)
        )
        return bool(removed)


def _json_entry(channel_id: str, value: bytes) -> Entry:
    try:
        entry = json.loads(value)
    except ValueError:
        entry = None
    if not isinstance(entry, dict):
        raise ConfigError(f"stored channel {channel_id!r} is not a JSON object")
    return entry


class FileChannelStore:
    """The channels in a YAML file (``channels:`` shape), for one host."""

    def __init__(self, path: str) -> None:
        self._path = path

    async def version(self) -> Any:
        return self._stat()

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            stat = os.stat(self._path)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreUnavailable(f"{self._path}: {e.strerror}") from None
        return stat.st_ino, stat.st_mtime_ns, stat.st_size

    async def load(self) -> tuple[Any, Entries]:
        version = self._stat()
        return version, self._read()

    def _read(self) -> Entries:
        try:
            with open(self._path, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except FileNotFoundError:
            return {}
        except OSError as e:
            raise StoreUnavailable(f"{self._path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            problem = str(e).splitlines()[0]
            raise ConfigError(f"channel_api_file {self._path}: not YAML ({problem})") from None
        channels = (data or {}).get("channels") if isinstance(data, dict) else None
        if data and not isinstance(channels, dict):
            raise ConfigError(f"channel_api_file {self._path}: expected a channels: mapping")
        return {str(k): dict(v or {}) for k, v in (channels or {}).items()}

    async def get(self, channel_id: str) -> Entry | None:
        return self._read().get(channel_id)

    async def put(self, channel_id: str, entry: Mapping[str, Any]) -> None:
        entries = self._read()
        entries[channel_id] = dict(entry)
        self._write(entries)

    async def delete(self, channel_id: str) -> bool:
        entries = self._read()
        if entries.pop(channel_id, None) is None:
            return False
        self._write(entries)
        return True

    def _write(self, entries: Entries) -> None:
        """Replace the file atomically: a reader sees the old or the new one."""
        directory = os.path.dirname(os.path.abspath(self._path))
        text = yaml.safe_dump({"channels": entries}, sort_keys=True, allow_unicode=True)
        try:
            fd, temporary = tempfile.mkstemp(prefix=".channels-", dir=directory)  # mode 0600
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(text)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(temporary, self._path)
            except BaseException:
                _remove(temporary)
                raise
            _fsync_directory(directory)
        except OSError as e:
            raise StoreUnavailable(f"{self._path}: {e.strerror or e}") from None


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _fsync_directory(directory: str) -> None:
    """Make the rename itself durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def store_for_config(config: Any, redis: RedisCommands | None) -> ChannelStore:
    """The store of the channel API: Redis when the state cache is Redis
    (``redis``), else ``channel_api_file``."""
    if redis is not None:
        return RedisChannelStore(redis)
    if config.channel_api_file is None:  # pragma: no cover - the config check refuses it
        raise ConfigError("channel_api needs RedisStateCache or channel_api_file")
    return FileChannelStore(config.channel_api_file)
