"""text.storable: NUL and lone surrogates become U+FFFD, ASCII or not."""

from __future__ import annotations

from twisted.trial import unittest

from mailcore.text import storable


class StorableTests(unittest.TestCase):
    def test_ascii(self) -> None:
        self.assertEqual(storable("plain text"), "plain text")
        self.assertEqual(storable("a\x00b\x00"), "a\ufffdb\ufffd")
        self.assertEqual(storable(""), "")

    def test_not_ascii(self) -> None:
        self.assertEqual(storable("R\u00e9union"), "R\u00e9union")
        self.assertEqual(storable("R\u00e9\x00union"), "R\u00e9\ufffdunion")
        self.assertEqual(storable("x\ud800y\udcffz"), "x\ufffdy\ufffdz")

    def test_unchanged_text_is_the_same_object(self) -> None:
        text = "nothing to replace " * 10
        self.assertIs(storable(text), text)
