"""What a client may see of a server-side failure.

A replica's failure message can carry what Ray and the OS say about it:
process ids, addresses, actor and node ids. Those help an operator (the
server log keeps the whole message) and help an attacker; the client gets the
message with them replaced.
"""

from __future__ import annotations

import re

_PATTERNS = (
    (re.compile(r"\bpid[=: ]+\d+", re.IGNORECASE), "pid=<redacted>"),
    (re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}(?::\d+)?\b"), "<address>"),
    (re.compile(r"\[[0-9a-fA-F:]*:[0-9a-fA-F:]+\](?::\d+)?"), "<address>"),
    (re.compile(r"\b[0-9a-fA-F]{16,}\b"), "<id>"),
    (re.compile(r"\b(?:localhost|[\w-]+(?:\.[\w-]+)+):\d{2,5}\b"), "<address>"),
)


def redact(message: str) -> str:
    """``message`` without process ids, IP addresses, host:port pairs and long
    hexadecimal ids (Ray's actor, node and job ids)."""
    for pattern, replacement in _PATTERNS:
        message = pattern.sub(replacement, message)
    return message
