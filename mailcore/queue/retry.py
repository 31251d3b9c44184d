"""The retry schedule and how a reply turns into a recipient outcome."""

from __future__ import annotations

from mailcore.backoff import doubling
from mailcore.queue.settings import QueueSettings


def backoff(attempts: int, settings: QueueSettings) -> float:
    """Seconds to wait after the `attempts`-th failed attempt: doubling from min to max."""
    return doubling(attempts, settings.min_backoff, settings.max_backoff)


def expired(created_at: float, now: float, settings: QueueSettings) -> bool:
    """True once a message has been in the queue longer than the lifetime."""
    return now - created_at >= settings.lifetime


def next_attempt(attempts: int, created_at: float, now: float, settings: QueueSettings) -> float:
    """When to try again; never later than the end of the lifetime (one last try there)."""
    return min(now + backoff(attempts, settings), max(now, created_at + settings.lifetime))
