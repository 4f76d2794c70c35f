"""``junebug-api-replay``: move dead-lettered messages back to their queue.

``junebug-api-replay --config FILE inbound|event [--limit N] [--channel ID]`` takes messages
from ``<connector>.inbound.failed`` (or ``.event.failed``) and publishes each,
byte for byte, to ``<connector>.inbound`` (or ``.event``); a message is acked
on the failed queue only after the broker confirmed its copy. It reads the
same config sources as the service (file, environment, options). With
several channels in the config, ``--channel`` names the one.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from twisted.internet.defer import Deferred

from junebug_api.config.model import ConfigError, load_config
from junebug_api.formats.queue_names import QueueNames

KINDS = ("inbound", "event")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="junebug-api-replay",
        description="Move messages from a .failed queue back to its main queue.",
    )
    parser.add_argument("--config", "-c", help="YAML config file (default: $VUMI_CONFIG_FILE)")
    parser.add_argument("kind", choices=KINDS, help="which queue: inbound or event")
    parser.add_argument("--limit", type=int, default=None, help="move at most N messages")
    parser.add_argument(
        "--channel", default=None, help="the channel (needed when the config has several)"
    )
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 0:
        parser.error("--limit must not be negative")
    return args


async def replay(amqp: Any, source: str, target: str, limit: int | None) -> int:
    """Move up to ``limit`` messages from ``source`` to ``target``; how many moved."""
    moved = 0
    while limit is None or moved < limit:
        got = await amqp.get(source)
        if got is None:
            break
        body, properties, acker = got
        await amqp.publish(target, body, message_id=properties.get("message-id"))
        acker.ack()
        moved += 1
    return moved


def channel_connector(config: Any, channel_id: str | None) -> str:
    """The connector name of the channel to replay for."""
    from junebug_api.config.channels import resolve_channels

    channels = {c.id: c for c in resolve_channels(config)}
    if channel_id is None:
        if len(channels) == 1:
            return next(iter(channels.values())).connector_name
        raise ConfigError(f"name the channel with --channel (one of {', '.join(sorted(channels))})")
    if channel_id not in channels:
        raise ConfigError(f"no channel {channel_id!r} in the config")
    return channels[channel_id].connector_name


def main(argv: list[str] | None = None) -> None:
    """The console script."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = load_config(args.config)
    except ConfigError as e:
        sys.stderr.write(f"junebug-api-replay: config error: {e}\n")
        raise SystemExit(1) from None

    from twisted.internet import task

    from junebug_api.amqp.service import AmqpService, PublishFailed

    try:
        connector = channel_connector(config, args.channel)
    except ConfigError as e:
        sys.stderr.write(f"junebug-api-replay: {e}\n")
        raise SystemExit(1) from None
    queues = QueueNames.for_connector(connector).by_role()
    source, target = queues[f"{args.kind}_failed"], queues[args.kind]

    async def run(reactor: Any) -> None:
        amqp = AmqpService(
            config.amqp_connection,
            prefetch=1,
            reactor=reactor,
            connection_name="junebug-api-replay",
        )
        amqp.add_queues({target: {}, source: {}})
        amqp.startService()
        try:
            try:
                await amqp.when_connected(failures=3)
            except Exception as e:
                sys.stderr.write(f"junebug-api-replay: cannot connect to AMQP: {e}\n")
                raise SystemExit(1) from None
            try:
                moved = await replay(amqp, source, target, args.limit)
            except PublishFailed as e:
                sys.stderr.write(f"junebug-api-replay: stopped: {e}\n")
                raise SystemExit(1) from None
            left = await amqp.count(source)
            print(f"moved {moved} message(s) from {source} to {target}; {left} left")
        finally:
            await amqp.stopService()

    task.react(lambda reactor: Deferred.fromCoroutine(run(reactor)))
