"""The help texts of `mailcore` and `twistd mailcore`: every word of every option's and
command's help is printed whole, on an 80-column terminal as anywhere."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Iterator
from unittest import mock

from twisted.trial.unittest import SynchronousTestCase

from mailcore.cli import build_parser
from mailcore.config import DaemonOptions


def parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """`parser` and every subcommand's parser below it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                yield from parsers(sub)


def words(text: str) -> list[str]:
    return [w for w in text.split() if "%" not in w]


class AdminHelpTests(SynchronousTestCase):
    def test_no_word_is_cut_across_lines(self) -> None:
        """argparse wrapped at hyphens and inside long words: `--events`' default came out
        as `sync.completed,e` / `mail.new,…,restore.comp` / `leted`, and /api-token-auth/ as
        `/api-` / `token-auth/`."""
        with mock.patch.dict(os.environ, {"COLUMNS": "80"}):
            for parser in parsers(build_parser()):
                shown = " ".join(parser.format_help().split())
                texts = [parser.description or ""] + [a.help or "" for a in parser._actions]
                for choices in (a for a in parser._actions
                                if isinstance(a, argparse._SubParsersAction)):
                    texts += [c.help or "" for c in choices._choices_actions]
                for word in (w for text in texts for w in words(text)):
                    self.assertIn(word, shown, parser.prog)


class DaemonHelpTests(SynchronousTestCase):
    def test_every_option_is_shown_whole(self) -> None:
        """Every option the daemon reads is in `twistd mailcore --help`, with all of its
        text (Twisted's wrapping may break a word at a hyphen, nothing else)."""
        options = DaemonOptions()
        shown = re.sub(r"-\s+", "-", " ".join(str(options).split()))
        for name, _, _, doc, *_ in options.optParameters:
            self.assertIn(f"--{name}=", shown)
            for word in words(doc):
                self.assertIn(re.sub(r"-\s+", "-", word), shown, f"--{name}")
        for name in ("smtp", "http"):
            self.assertIn(f"--{name}=", shown)
        read = {key.replace("_", "-") for key in options.overrides()}
        for name in read:
            self.assertIn(f"--{name}=", shown)
