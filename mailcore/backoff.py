"""The one retry schedule of every background job: a delay doubling from a base to a cap."""

from __future__ import annotations


def doubling(attempts: int, base: float, cap: float) -> float:
    """Seconds to wait after the `attempts`-th failed attempt (1 for the first): `base`,
    doubling at each further failure, at most `cap`. The doubling stops after 30: 2**1024
    times a float overflows, and an operator's attempt limit has no upper bound."""
    exponent = min(max(0, attempts - 1), 30)
    return float(min(cap, base * 2 ** exponent))
