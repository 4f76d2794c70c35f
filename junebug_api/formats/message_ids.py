"""Message ids as vumi makes them: a version 4 UUID's 32 hex digits.

Its own small module because low layers need it too (the AMQP publisher
stamps a message id on a body that has none), and they must not import the
message formats above them.
"""

from __future__ import annotations

import os


def generate_message_id() -> str:
    """A new message id, formatted as vumi does: a version 4 UUID's 32 hex digits.

    The same bits as ``uuid.uuid4().hex`` without building a UUID object, a
    third of the time on the path of every outbound message.
    """
    bits = bytearray(os.urandom(16))
    bits[6] = (bits[6] & 0x0F) | 0x40  # version 4
    bits[8] = (bits[8] & 0x3F) | 0x80  # RFC 4122 variant
    return bits.hex()
