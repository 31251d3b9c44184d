"""Bidirectional formatting controls: found and stripped, and nothing else with them (the
zero width joiner of emoji, other format characters, right-to-left letters stay)."""

from __future__ import annotations

from twisted.trial import unittest

from mailcore.text import escape_controls, has_bidi_control, has_control, strip_bidi_controls

BIDI = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"


class BidiControlTests(unittest.SynchronousTestCase):
    def test_every_bidi_control_is_found_and_stripped(self) -> None:
        for c in BIDI:
            self.assertTrue(has_bidi_control(f"a{c}b"), repr(c))
            self.assertEqual(strip_bidi_controls(f"a{c}b"), "ab")
        self.assertEqual(strip_bidi_controls("invoice\u202efdp.exe"), "invoicefdp.exe")

    def test_other_text_stays_as_it_is(self) -> None:
        family = "\U0001f468\u200d\U0001f469\u200d\U0001f467"  # ZWJ joins the emoji
        for text in ("plain.txt", family, "\u05e9\u05dc\u05d5\u05dd.pdf", "a\u00adb", "x\u200by"):
            self.assertFalse(has_bidi_control(text), repr(text))
            self.assertIs(strip_bidi_controls(text), text)
        self.assertFalse(has_control(family))  # one line of text, as before

    def test_what_an_operator_reads_shows_them_escaped(self) -> None:
        """The CLI's tables and the log write each one as its escape (a terminal would
        reorder what follows it); the joiner of emoji and right-to-left letters stay."""
        for c in BIDI:
            self.assertEqual(escape_controls(f"a{c}b"), f"a\\u{ord(c):04x}b")
            self.assertEqual(escape_controls(f"a{c}b\n", keep_lines=True),
                             f"a\\u{ord(c):04x}b\n")
        self.assertEqual(escape_controls("invoice\u202efdp.exe"), "invoice\\u202efdp.exe")
        family = "\U0001f468\u200d\U0001f469\u200d\U0001f467"
        self.assertEqual(escape_controls(family), family)
        self.assertEqual(escape_controls("\u05e9\u05dc\u05d5\u05dd"), "\u05e9\u05dc\u05d5\u05dd")
