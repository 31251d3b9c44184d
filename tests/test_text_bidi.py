"""Bidirectional formatting controls: found and stripped, and nothing else with them (the
zero width joiner of emoji, other format characters, right-to-left letters stay)."""

from __future__ import annotations

from twisted.trial import unittest

from mailcore.text import has_bidi_control, has_control, strip_bidi_controls

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
