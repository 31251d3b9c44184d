"""Keyset reads behind page numbers: where earlier pages of a list began and ended.

The published APIs page by number (`?page=N`, an offset). Each page read remembers the sort
key (date, id) of its first and last row at their offsets, with the user's change stamp and
the list's count at that stamp; a later read of a page at or after a remembered offset
starts from that key in the index instead of walking every entry before it, so paging
forward (or reading one deep page again) costs as much as the first page, and a page can be
planned from the last stamp and count before either is read again (`known`). A store,
delete or move of one of the user's messages moves the stamp and the marks are forgotten.
Lists ordered by date only (the default, either way round); used from the store's pool
threads, so a lock guards it.
"""

from __future__ import annotations

import datetime
import threading
from collections import OrderedDict
from collections.abc import Hashable

Mark = tuple[datetime.datetime, int]


class PageMarks:
    """Per list (user, filters, ordering): the stamp and count it was read at, and
    offset -> (date, id) of the row there."""

    def __init__(self, lists: int = 256, marks: int = 64) -> None:
        self.lists = lists
        self.marks = marks
        self._items: OrderedDict[Hashable, tuple[int, int, dict[int, Mark]]] = OrderedDict()
        self._lock = threading.Lock()

    def nearest(self, key: Hashable, stamp: int, offset: int) -> tuple[int, Mark] | None:
        """The remembered offset closest to `offset` at or before it, and its mark."""
        with self._lock:
            found = self._items.get(key)
            if found is None or found[0] != stamp:
                return None
            self._items.move_to_end(key)
            before = [o for o in found[2] if o <= offset]
            if not before:
                return None
            best = max(before)
            return best, found[2][best]

    def known(self, key: Hashable) -> tuple[int, int] | None:
        """The stamp and the count the list was last read at, or None."""
        with self._lock:
            found = self._items.get(key)
            return None if found is None else (found[0], found[1])

    def remember(self, key: Hashable, stamp: int, count: int, marks: dict[int, Mark]) -> None:
        with self._lock:
            found = self._items.get(key)
            kept = found[2] if found is not None and found[0] == stamp else {}
            kept.update(marks)
            while len(kept) > self.marks:
                kept.pop(next(iter(kept)))
            self._items[key] = (stamp, count, kept)
            self._items.move_to_end(key)
            while len(self._items) > self.lists:
                self._items.popitem(last=False)
