"""text.has_control_multiline: multi-line text keeps TAB, CR, LF and the line separators,
and refuses every other control character (NUL first of all)."""

from __future__ import annotations

from twisted.trial import unittest

from mailcore.text import has_control, has_control_multiline


class MultilineTests(unittest.TestCase):
    def test_line_breaks_and_tabs_are_text(self) -> None:
        for text in ("", "Dear Ann,\r\n\tsee below.\n", "a\rb", "one\u2028two\u2029three",
                     "R\u00e9union\u00a0\u20ac"):
            self.assertFalse(has_control_multiline(text), repr(text))

    def test_other_control_characters_are_refused(self) -> None:
        for char in ("\x00", "\x08", "\x0b", "\x0c", "\x0e", "\x1b", "\x1f", "\x7f", "\x85",
                     "\x9f"):
            self.assertTrue(has_control_multiline(f"ok{char}ok"), repr(char))

    def test_one_line_text_keeps_its_stricter_check(self) -> None:
        self.assertTrue(has_control("a\nb"))
        self.assertTrue(has_control("a\u2028b"))
        self.assertFalse(has_control_multiline("a\nb\u2028c"))
