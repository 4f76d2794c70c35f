"""JSON bodies as the service writes them: the encoding and the Content-Type.

Shared by every layer that writes JSON (AMQP bodies, API answers, POSTs to
RapidPro), so it imports nothing of this package.
"""

from __future__ import annotations

import json
from typing import Any

#: The Content-Type of every JSON body the service sends, answers and POSTs alike.
JSON_CONTENT_TYPE = b"application/json; charset=utf-8"

# Built once: json.dumps with options builds an encoder per call.
_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def compact_json(data: Any) -> bytes:
    """``data`` as compact UTF-8 JSON (AMQP bodies and HTTP bodies alike)."""
    return _encoder.encode(data).encode("utf-8")
