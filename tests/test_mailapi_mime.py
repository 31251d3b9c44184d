"""The Mail API's message building and parsing (mailcore.mailapi.mime) on their own."""

from __future__ import annotations

import email
import email.policy
import itertools
from io import BytesIO

from twisted.trial.unittest import TestCase

from mailcore.mailapi.mime import OutgoingPart, build_message, parse_message

RECIPIENTS = [f"rcpt{i}@customer.example.test" for i in range(12)]


class RoundTripTests(TestCase):
    def test_a_built_message_reads_back_as_written(self) -> None:
        values = {"from": "bob@hosted.test", "subject": "Gr\u00fc\u00dfe \u2013 " + "long " * 30,
                  "body": "Grüße\n" + "a line of text\n" * 20}
        recipients = {"to": RECIPIENTS, "cc": RECIPIENTS[:1], "bcc": ["hidden@far.test"],
                      "reply-to": ["bob@hosted.test"], "from": ["bob@hosted.test"]}
        with_file = [OutgoingPart("rÉport.pdf", "application/pdf", lambda: BytesIO(b"%PDF-1.4"))]
        for parts, ending in itertools.product(([], with_file), ("\n", "", "\n\n")):
            values["body"] = values["body"].rstrip("\n") + ending
            raw = build_message(values, recipients, parts, "mx.hosted.test", 1.7e9)
            self.assertTrue(raw.split(b"\r\n\r\n", 1)[0].isascii())  # RFC 2047 words
            self.assertFalse([line for line in raw.split(b"\r\n") if len(line) > 78])
            self.assertNotIn(b"hidden@far.test", raw)
            parsed = parse_message(raw)
            self.assertEqual((parsed.subject, parsed.to, parsed.cc, parsed.reply_to),
                             (" ".join(values["subject"].split()), ", ".join(RECIPIENTS),
                              RECIPIENTS[0], "bob@hosted.test"))
            # A part before a boundary keeps the text's ending; a message's text ends
            # in a line break either way.
            self.assertEqual(parsed.body, values["body"] + ("" if parts or ending else "\n"))
            self.assertEqual([(a.name, a.data) for a in parsed.attachments],
                             [("rÉport.pdf", b"%PDF-1.4")] if parts else [])
            message = email.message_from_bytes(raw, policy=email.policy.default)
            self.assertEqual(message["Date"], "Tue, 14 Nov 2023 22:13:20 +0000")
            self.assertTrue(message["Message-ID"].endswith("@mx.hosted.test>"))
