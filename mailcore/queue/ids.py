"""Queue ids: short, unique, sortable by time, safe to show in SMTP replies and headers."""

from __future__ import annotations

import secrets
import time

_ALPHABET = "0123456789BCDFGHJKLMNPQRSTVWXZ"


def new_queue_id(now: float | None = None) -> str:
    """Fourteen characters: milliseconds since the epoch, then 40 random bits."""
    millis = int((time.time() if now is None else now) * 1000)
    out = []
    for _ in range(9):
        millis, r = divmod(millis, len(_ALPHABET))
        out.append(_ALPHABET[r])
    rand = secrets.randbits(40)
    tail = []
    for _ in range(5):
        rand, r = divmod(rand, len(_ALPHABET))
        tail.append(_ALPHABET[r])
    return "".join(reversed(out)) + "".join(tail)
