"""The pipelining Redis protocol over a StringTransport and a Clock."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from junebug_api.state.redis_client import (
    IncompleteReply,
    RedisConnectionError,
    RedisError,
    RedisProtocol,
    encode_command,
    parse_reply,
)


def connected() -> tuple[RedisProtocol, StringTransport, Clock, list]:
    clock = Clock()
    lost: list = []
    conn = RedisProtocol(clock, reply_timeout=2.0, on_lost=lambda: lost.append(1))
    transport = StringTransport()
    conn.makeConnection(transport)
    return conn, transport, clock, lost


def results(d):
    seen: list = []
    d.addBoth(seen.append)
    return seen


def test_encode_command():
    assert encode_command([b"SET", "kä", 5]) == b"*3\r\n$3\r\nSET\r\n$3\r\nk\xc3\xa4\r\n$1\r\n5\r\n"


@pytest.mark.parametrize(
    ("data", "reply"),
    [
        (b"+OK\r\n", "OK"),
        (b":42\r\n", 42),
        (b"$-1\r\n", None),
        (b"$5\r\nhe\r\nl\r\n", b"he\r\nl"),
        (b"*3\r\n$1\r\na\r\n$-1\r\n*1\r\n:1\r\n", [b"a", None, [1]]),
    ],
)
def test_parse_reply_whole_and_in_pieces(data, reply):
    assert parse_reply(data, 0) == (reply, len(data))
    for cut in range(1, len(data)):
        with pytest.raises(IncompleteReply):
            parse_reply(data[:cut], 0)


def test_commands_are_pipelined_and_replies_matched_in_order():
    conn, transport, _, _ = connected()
    first = results(conn.command(b"GET", b"a"))
    second = results(conn.command(b"SET", b"b", b"1"))
    third = results(conn.command(b"GET", b"c"))
    # All three written before any reply (one send per reactor turn).
    assert transport.value() == b"".join(
        encode_command(c) for c in ([b"GET", b"a"], [b"SET", b"b", b"1"], [b"GET", b"c"])
    )
    conn.dataReceived(b"$1\r\nx\r\n+O")
    assert first == [b"x"] and second == []
    conn.dataReceived(b"K\r\n-ERR wrong\r\n")
    assert second == ["OK"]
    assert isinstance(third[0].value, RedisError)


def test_a_cancelled_command_does_not_take_the_next_reply():
    conn, _, _, _ = connected()
    cancelled = conn.command(b"GET", b"a")
    cancelled.addErrback(lambda _: None)
    cancelled.cancel()
    second = results(conn.command(b"GET", b"b"))
    conn.dataReceived(b"$1\r\na\r\n$1\r\nb\r\n")
    assert second == [b"b"]


def test_no_reply_in_time_drops_the_connection_and_fails_what_waits():
    conn, transport, clock, _ = connected()
    first = results(conn.command(b"PING"))
    clock.advance(1.5)
    second = results(conn.command(b"PING"))
    conn.dataReceived(b"+PONG\r\n")  # the first is answered in time
    assert first == ["PONG"]
    clock.advance(0.6)  # the first's deadline: the second is not late yet
    assert not transport.disconnecting
    clock.advance(1.5)
    assert transport.disconnecting
    assert isinstance(second[0].value, RedisConnectionError)


def test_readonly_reply_drops_the_connection_to_find_the_new_master():
    conn, transport, _, lost = connected()
    write = results(conn.command(b"SET", b"k", b"v"))
    conn.dataReceived(b"-READONLY You can't write against a read only replica.\r\n")
    assert isinstance(write[0].value, RedisError)
    assert transport.disconnecting
    conn.connectionLost(None)
    assert lost == [1]
    late = results(conn.command(b"GET", b"k"))
    assert isinstance(late[0].value, RedisConnectionError)


def test_a_nil_array_reply_is_none():
    assert parse_reply(b"*-1\r\n", 0) == (None, 5)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"!oops\r\n", "unexpected reply type b'!'"),
        (b":not-a-number\r\n", "invalid literal"),
    ],
)
def test_a_garbled_reply_drops_the_connection_and_fails_what_waits(data, error):
    conn, transport, _, _ = connected()
    first = results(conn.command(b"GET", b"a"))
    second = results(conn.command(b"GET", b"b"))
    conn.dataReceived(data)
    assert transport.disconnecting
    for seen in (first, second):
        assert isinstance(seen[0].value, RedisConnectionError)
        assert str(seen[0].value).startswith("bad reply from Redis: ")
        assert error in str(seen[0].value)


def test_a_reply_nobody_asked_for_drops_the_connection():
    conn, transport, _, _ = connected()
    conn.dataReceived(b"+OK\r\n")
    assert transport.disconnecting
