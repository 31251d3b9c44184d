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


# Every two-character string of the alphabet, by value (0 to 899): one divmod per pair.
_PAIRS = [a + b for a in _ALPHABET for b in _ALPHABET]
_BASE2 = len(_PAIRS)


def new_queue_id(now: float | None = None) -> str:
    """Fourteen characters: milliseconds since the epoch, then 40 random bits."""
    millis = int((time.time() if now is None else now) * 1000)
    pairs = _PAIRS
    # Nine digits (base 30) of the milliseconds, most significant first: 1 + 4 pairs.
    millis, p4 = divmod(millis, _BASE2)
    millis, p3 = divmod(millis, _BASE2)
    millis, p2 = divmod(millis, _BASE2)
    millis, p1 = divmod(millis, _BASE2)
    head = _ALPHABET[millis % 30] + pairs[p1] + pairs[p2] + pairs[p3] + pairs[p4]
    # Five digits of the random part, least significant first: 2 pairs (reversed) + 1.
    rand = _random.getrandbits(40)
    rand, r1 = divmod(rand, _BASE2)
    rand, r2 = divmod(rand, _BASE2)
    return head + pairs[r1][::-1] + pairs[r2][::-1] + _ALPHABET[rand % 30]
