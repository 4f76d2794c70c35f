"""junebug-api-replay: its arguments, the move from .failed back to the queue
(acked only once the copy is confirmed), the channel it picks, and config errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred

from junebug_api.amqp.service import PublishFailed
from junebug_api.cli.replay import channel_connector, main, parse_args, replay
from junebug_api.config.model import ConfigError, load_config
from junebug_api.testing import RecordingPublisher, RecordingQueueControl

from .helpers import result_of

SOURCE, TARGET = "conn.inbound.failed", "conn.inbound"
UNICODE_BODY = '{"content": "Sawubona 👋 ñ 漢字"}'.encode()


class FailedQueue:
    """The two AMQP operations replay uses: ``get`` on the failed queue and ``publish``."""

    def __init__(self, *ready: bytes | tuple[bytes, dict[str, Any]], auto_confirm: bool = True):
        self.control = RecordingQueueControl(*ready)
        self.get = self.control.get
        self.publish = RecordingPublisher(auto_confirm=auto_confirm)


def run(amqp: FailedQueue, limit: int | None = None) -> Deferred[int]:
    return Deferred.fromCoroutine(replay(amqp, SOURCE, TARGET, limit))


# -- parse_args -------------------------------------------------------------------


def test_arguments() -> None:
    args = parse_args(["-c", "junebug.yaml", "event", "--limit", "3", "--channel", "a"])
    assert (args.config, args.kind, args.limit, args.channel) == ("junebug.yaml", "event", 3, "a")
    args = parse_args(["inbound"])
    assert (args.config, args.kind, args.limit, args.channel) == (None, "inbound", None, None)


@pytest.mark.parametrize("argv", [["outbound"], ["inbound", "--limit", "-1"], []])
def test_bad_arguments_exit_2_with_usage(argv: list[str], capsys: Any) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2
    assert "usage: junebug-api-replay" in capsys.readouterr().err


# -- replay -----------------------------------------------------------------------


def test_every_message_moves_byte_for_byte_with_its_message_id() -> None:
    amqp = FailedQueue((UNICODE_BODY, {"message-id": "m-1"}), b"\xff not even JSON")
    assert result_of(run(amqp)) == 2
    sent = amqp.publish.published
    assert [(p.routing_key, p.body, p.message_id) for p in sent] == [
        (TARGET, UNICODE_BODY, "m-1"),
        (TARGET, b"\xff not even JSON", None),
    ]
    assert [(a.acks, a.rejects) for a in amqp.control.ackers] == [(1, 0), (1, 0)]
    assert amqp.control.calls == [f"get {SOURCE}"] * 3  # the third found the queue empty


def test_a_message_is_acked_only_once_its_copy_is_confirmed() -> None:
    amqp = FailedQueue(b"one", b"two", auto_confirm=False)
    moved = run(amqp)
    [acker] = amqp.control.ackers
    assert acker.acks == 0
    amqp.publish.confirm()
    assert acker.acks == 1
    assert not moved.called  # the second is on its way
    amqp.publish.confirm()
    assert result_of(moved) == 2


def test_limit_moves_at_most_that_many() -> None:
    amqp = FailedQueue(b"one", b"two", b"three")
    assert result_of(run(amqp, limit=2)) == 2
    assert amqp.control.ready == [b"three"]
    assert result_of(run(FailedQueue(b"one"), limit=0)) == 0


def test_a_copy_not_confirmed_stops_the_replay_and_leaves_its_message_unacked() -> None:
    amqp = FailedQueue(b"one", b"two")
    amqp.publish.fail_next(PublishFailed("nacked"))
    with pytest.raises(PublishFailed):
        result_of(run(amqp))
    [acker] = amqp.control.ackers
    assert (acker.acks, acker.rejects) == (0, 0)  # the broker requeues it on close
    assert amqp.control.ready == [b"two"]


# -- channel_connector --------------------------------------------------------------


def config(**cli: str) -> Any:
    return load_config(None, environ={}, cli={"http_bind": "127.0.0.1:1", **cli})


def test_the_one_channel_needs_no_name() -> None:
    cfg = config(connector_name="conn", mo_message_url="http://rp.example/in")
    assert channel_connector(cfg, None) == "conn"


def test_several_channels_need_the_name() -> None:
    cfg = config(
        mo_message_url="http://rp.example/in",
        channels=json.dumps({"b": {}, "a": {"connector_name": "a-conn"}}),
    )
    assert channel_connector(cfg, "a") == "a-conn"
    with pytest.raises(ConfigError, match=r"name the channel with --channel \(one of a, b\)"):
        channel_connector(cfg, None)
    with pytest.raises(ConfigError, match="no channel 'c' in the config"):
        channel_connector(cfg, "c")


# -- main: config problems are one line and exit status 1 ----------------------------


def test_a_bad_config_file_is_one_line(tmp_path: Path, capsys: Any) -> None:
    path = tmp_path / "junebug.yaml"
    path.write_text("connector_name: conn\nhttp_bind: 127.0.0.1:1\n")  # no mo_message_url
    with pytest.raises(SystemExit) as info:
        main(["--config", str(path), "inbound"])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err == "junebug-api-replay: config error: mo_message_url is required\n"


def test_an_unknown_channel_is_one_line(tmp_path: Path, capsys: Any) -> None:
    path = tmp_path / "junebug.yaml"
    path.write_text(
        "connector_name: conn\nmo_message_url: http://rp.example/in\nhttp_bind: 127.0.0.1:1\n"
    )
    with pytest.raises(SystemExit) as info:
        main(["--config", str(path), "event", "--channel", "nope"])
    assert info.value.code == 1
    assert capsys.readouterr().err == "junebug-api-replay: no channel 'nope' in the config\n"
