"""JSON-line messages, each optionally followed by raw bytes, over a pipe.

The agent talks to its helper processes (:mod:`agent.tufclient`) this way. Both ends are
ours, and each still checks what it reads: a line is bounded, must end in a newline and
must hold a JSON object.
"""

from __future__ import annotations

import json
from typing import IO, Any

from agent.errors import TransferError

__all__ = ["MAX_LINE", "send", "read_message"]

MAX_LINE = 1 << 20


def send(tx: IO[bytes], msg: dict[str, Any], data: bytes = b"") -> None:
    tx.write(json.dumps(msg, separators=(",", ":")).encode() + b"\n" + data)
    tx.flush()


def read_message(rx: IO[bytes], peer: str) -> dict[str, Any]:
    """One JSON object line from ``peer``.

    Raises:
        TransferError: the pipe closed, or the line is too long, unterminated or not a
            JSON object.
    """
    line = rx.readline(MAX_LINE + 1)
    if not line:
        raise TransferError(f"the {peer}'s pipe closed")
    if len(line) > MAX_LINE or not line.endswith(b"\n"):
        raise TransferError(f"a line from the {peer} is over {MAX_LINE} bytes or unterminated")
    try:
        msg = json.loads(line)
    except ValueError as e:
        raise TransferError(f"a line from the {peer} is not JSON: {e}") from e
    if not isinstance(msg, dict):
        raise TransferError(f"a line from the {peer} is a JSON {type(msg).__name__}, not an object")
    return msg
