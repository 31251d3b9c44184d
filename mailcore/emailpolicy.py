"""The `email` package's policies as every message we build or parse uses them.

The stock policies' header registry makes a new class (with `type()`) for every header
field set or read: a fifth of the time it takes to build a small message. Ours make each
field's class once; the fields are parsed, checked and folded exactly as the stock ones do.
"""

from __future__ import annotations

from email import policy
from email.headerregistry import HeaderRegistry


class HeaderClasses(HeaderRegistry):
    """A header registry that makes each field's header class once."""

    def __init__(self) -> None:
        super().__init__()
        self._made: dict[str, type] = {}

    def __getitem__(self, name: str) -> type:
        key = name.lower()
        made = self._made.get(key)
        if made is None:
            made = self._made[key] = super().__getitem__(name)
        return made


# Messages we send (CRLF line ends, RFC 2047 words, lines folded at 78).
SMTP = policy.SMTP.clone(header_factory=HeaderClasses())
# Messages we read (Python's default policy).
DEFAULT = policy.default.clone(header_factory=HeaderClasses())
