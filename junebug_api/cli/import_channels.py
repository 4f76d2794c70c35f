"""``junebug-api-import-channels``: old Junebug's channels as junebug-api config.

Reads ``GET /channels/`` and ``GET /channels/<id>`` from a running old
Junebug and writes the equivalent ``channels:`` YAML to stdout, with a
comment on every setting it could not carry over (transports, and their
configs, stay with the transports: junebug-api does not run them). Any
failure is one line on stderr and exit status 1, never a traceback.

A one-shot command-line tool, so plain blocking ``urllib`` rather than the
service's Twisted client.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from junebug_api.config.channels import IGNORED
from junebug_api.formats.queue_names import QueueNames
from junebug_api.formats.urls import url_masked

PROG = "junebug-api-import-channels"

#: Old Junebug channel fields carried over, and the junebug-api option each becomes.
CARRIED = {
    "label": "label",
    "metadata": "metadata",
    "mo_url": "mo_message_url",
    "mo_url_auth_token": "mo_message_url_auth_token",
    "character_limit": "character_limit",
}

#: Old Junebug fields that are no setting (answers, not configuration).
NOT_SETTINGS = {"id", "status"}

#: Why a transport-side field is not carried over.
TRANSPORT_FIELDS = {
    "type": "the transport type; junebug-api runs no transports: run it on its own,"
    " on the queues named below",
    "config": "the transport's own settings; they stay with the transport",
    "public_http": "the transport's HTTP listener; it stays with the transport",
}


class ImportFailed(Exception):
    """The import cannot go on; the message is the one line to print."""


def fetch_json(url: str, auth: tuple[str, str] | None, timeout: float) -> Any:
    """The envelope's ``result`` of a GET to an old Junebug."""
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode("ascii")
        request.add_header("Authorization", f"Basic {token}")
    shown = url_masked(url)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read(50 * 1024 * 1024)
    except urllib.error.HTTPError as e:
        hint = " (give --username and --password)" if e.code == 401 else ""
        raise ImportFailed(f"GET {shown} answered {e.code} {e.reason}{hint}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise ImportFailed(f"cannot reach {shown}: {reason}") from None
    try:
        data = json.loads(body)
    except ValueError:
        raise ImportFailed(f"{shown} is not an old Junebug: its answer is not JSON") from None
    if not (isinstance(data, dict) and "result" in data and "status" in data):
        raise ImportFailed(f"{shown} is not an old Junebug: its answer is no Junebug envelope")
    return data["result"]


def _scalar(value: Any) -> str:
    """A YAML value: JSON, which YAML reads the same (and quotes every string)."""
    return json.dumps(value, ensure_ascii=False)


def channel_yaml(channel: dict[str, Any]) -> list[str]:
    """The lines of one ``channels:`` entry, with comments for what is not carried."""
    channel_id = channel["id"]
    lines = [f"  {_scalar(channel_id)}:"]
    settings, comments = [], []
    for key, value in channel.items():
        if key in NOT_SETTINGS:
            continue
        if key in CARRIED:
            if value is None or value == {}:
                continue
            settings.append(f"    {CARRIED[key]}: {_scalar(value)}")
        elif key in IGNORED:
            if value is not None:
                comments.append(f"    # {key}: {_scalar(value)} (not carried over: {IGNORED[key]})")
        elif key in TRANSPORT_FIELDS:
            shown = _scalar(value) if key == "type" else "..."
            comments.append(f"    # {key}: {shown} (not carried over: {TRANSPORT_FIELDS[key]})")
        else:
            comments.append(f"    # {key}: not carried over (junebug-api has no such setting)")
    queues = QueueNames.for_connector(channel_id)
    comments.append(
        f"    # queues: {queues.outbound}, {queues.inbound}, {queues.event}"
        " (named after the channel id, as in old Junebug)"
    )
    if not settings:
        lines[0] += " {}"
    return lines + settings + comments


def import_channels(
    base_url: str, auth: tuple[str, str] | None = None, timeout: float = 10.0
) -> str:
    """The ``channels:`` YAML for every channel of the old Junebug at ``base_url``."""
    base = base_url.rstrip("/")
    try:
        parts = urlsplit(base)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:
        valid = False
    if not valid:
        raise ImportFailed(f"{url_masked(base)} is not an http:// or https:// URL")
    ids = fetch_json(f"{base}/channels/", auth, timeout)
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ImportFailed(
            f"{url_masked(base)} is not an old Junebug: GET /channels/ listed no channel ids"
        )
    out = [
        f"# Channels of the old Junebug at {url_masked(base)}, for junebug-api's config file",
        "# (written by junebug-api-import-channels). Add the top-level options (http_bind,",
        "# amqp, state_cache_*, api_auth_* ...); top-level values are every channel's defaults.",
    ]
    if not ids:
        out.append("channels: {}")
        return "\n".join(out) + "\n"
    out.append("channels:")
    for channel_id in sorted(ids):
        channel = fetch_json(f"{base}/channels/{channel_id}", auth, timeout)
        if not isinstance(channel, dict):
            raise ImportFailed(f"GET /channels/{channel_id} answered no channel")
        channel = {**channel, "id": channel.get("id") or channel_id}
        out.extend(channel_yaml(channel))
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Write the channels of a running old Junebug as junebug-api's"
        " channels: YAML, on stdout.",
    )
    parser.add_argument("url", help="the old Junebug's base URL, e.g. http://junebug:8080")
    parser.add_argument("--username", help="HTTP Basic user name, if Junebug needs one")
    parser.add_argument("--password", help="HTTP Basic password")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per request")
    args = parser.parse_args(argv)
    if (args.username is None) != (args.password is None):
        parser.error("--username and --password go together")
    auth = (args.username, args.password) if args.username is not None else None
    try:
        text = import_channels(args.url, auth, args.timeout)
    except ImportFailed as e:
        sys.stderr.write(f"{PROG}: {e}\n")
        raise SystemExit(1) from None
    except Exception as e:  # never a traceback for an operator
        sys.stderr.write(f"{PROG}: {type(e).__name__}: {e}\n")
        raise SystemExit(1) from None
    sys.stdout.write(text)


if __name__ == "__main__":  # pragma: no cover
    main()
