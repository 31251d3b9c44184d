"""Queue ids: short, unique, sortable by time, safe to show in SMTP replies and headers."""

from __future__ import annotations

import os
import random
import time

_ALPHABET = "0123456789BCDFGHJKLMNPQRSTVWXZ"

# Uniqueness, not secrecy, is what the random part is for (a queue id grants nothing), so a
# generator seeded once from the OS, not a system call per id. Reseeded in a forked child.
_random = random.Random(os.urandom(16))
os.register_at_fork(after_in_child=lambda: _random.seed(os.urandom(16)))


def new_queue_id(now: float | None = None) -> str:
    """Fourteen characters: milliseconds since the epoch, then 40 random bits."""
    millis = int((time.time() if now is None else now) * 1000)
    out = []
    for _ in range(9):
        millis, r = divmod(millis, len(_ALPHABET))
        out.append(_ALPHABET[r])
    rand = _random.getrandbits(40)
    tail = []
    for _ in range(5):
        rand, r = divmod(rand, len(_ALPHABET))
        tail.append(_ALPHABET[r])
    return "".join(reversed(out)) + "".join(tail)
