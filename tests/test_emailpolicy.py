"""The `email` policies every message we build or parse uses (mailcore.emailpolicy)."""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import TestCase

from mailcore.emailpolicy import DEFAULT, SMTP


class HeaderClassTests(TestCase):
    def test_each_fields_header_class_is_made_once(self) -> None:
        # The stock registry makes a new class (type()) for every field set or read.
        for policy in (SMTP, DEFAULT):
            registry: Any = policy.header_factory
            self.assertIs(registry["Subject"], registry["subject"])
            self.assertIs(registry["X-Own"], registry["x-own"])
            self.assertIsNot(registry["To"], registry["Subject"])
            self.assertEqual(registry["To"].max_count, 1)  # still the address class
