"""RFC 3464 delivery status notifications, parsed back with the email package."""

from __future__ import annotations

from email import message_from_bytes
from typing import Any

from twisted.trial.unittest import TestCase

from mailcore.smtp.dsn import Failure, build_dsn, diagnostic_code, should_bounce, status_of

ORIGINAL = (
    b"From: Alice <alice@example.test>\r\n"
    b"To: bob@customer.test\r\n"
    b"Subject: quarterly numbers\r\n"
    b"Message-ID: <orig-1@example.test>\r\n\r\n"
)


def make(failures: list[Failure]) -> bytes:
    return build_dsn(
        reporting_mta="mx.test",
        queue_id="QID123",
        original_sender="alice@example.test",
        original_headers=ORIGINAL,
        arrival_date=1_700_000_000.0,
        failures=failures,
        now=1_700_000_500.0,
    )


class DSNFormatTests(TestCase):
    def setUp(self) -> None:
        self.raw = make([
            Failure("bob@customer.test", "550 5.1.1 <bob@customer.test>: user unknown",
                    "mx.customer.test"),
            Failure("carol@customer.test", "5.4.7 delivery time expired after 5 days; "
                    "last error: 4.4.1 connection refused"),
        ])
        self.msg: Any = message_from_bytes(self.raw)

    def test_is_multipart_report_of_delivery_status(self) -> None:
        self.assertEqual(self.msg.get_content_type(), "multipart/report")
        self.assertEqual(self.msg.get_param("report-type"), "delivery-status")
        parts = self.msg.get_payload()
        assert isinstance(parts, list)
        self.assertEqual(
            [p.get_content_type() for p in parts],
            ["text/plain", "message/delivery-status", "text/rfc822-headers"],
        )

    def test_headers_say_who_and_what(self) -> None:
        self.assertEqual(self.msg["To"], "<alice@example.test>")
        self.assertIn("MAILER-DAEMON@mx.test", self.msg["From"])
        self.assertEqual(self.msg["Auto-Submitted"], "auto-replied")
        self.assertTrue(self.msg["Message-ID"])
        self.assertTrue(self.msg["Date"])

    def test_delivery_status_has_per_message_and_per_recipient_fields(self) -> None:
        status = self.msg.get_payload()[1]
        blocks: list[Any] = status.get_payload()
        self.assertEqual(blocks[0]["Reporting-MTA"], "dns; mx.test")
        self.assertTrue(blocks[0]["Arrival-Date"])
        self.assertEqual(len(blocks), 3)
        bob, carol = blocks[1], blocks[2]
        self.assertEqual(bob["Final-Recipient"], "rfc822; bob@customer.test")
        self.assertEqual(bob["Action"], "failed")
        self.assertEqual(bob["Status"], "5.1.1")
        self.assertEqual(bob["Remote-MTA"], "dns; mx.customer.test")
        self.assertEqual(
            bob["Diagnostic-Code"], "smtp; 550 5.1.1 <bob@customer.test>: user unknown"
        )
        self.assertEqual(carol["Status"], "5.4.7")
        self.assertTrue(carol["Diagnostic-Code"].startswith("X-Mailcore; 5.4.7"))

    def test_original_headers_are_returned(self) -> None:
        headers = self.msg.get_payload()[2].get_payload()
        self.assertIn("Subject: quarterly numbers", headers)
        self.assertIn("Message-ID: <orig-1@example.test>", headers)

    def test_every_line_ends_in_crlf(self) -> None:
        self.assertEqual(self.raw.count(b"\n"), self.raw.count(b"\r\n"))

    def test_no_header_injection_through_the_reply_text(self) -> None:
        raw = make([Failure("x@c.test", "550 bad\r\nBcc: victim@example.test")])
        self.assertNotIn(b"\r\nBcc:", raw)


class HostileReplyTests(TestCase):
    """A next hop's reply is quoted in the text part and the Diagnostic-Code: whatever it
    says, no line passes 998 octets (RFC 5322 2.1.1) and no control character gets in."""

    def setUp(self) -> None:
        # A multi-line 550 of 5 lines of 300 octets and one of controls, joined as the
        # client joins a reply's lines.
        lines = ["5.1.1 <b@customer.test>: unknown", *["y" * 300] * 5,
                 "bad\x00nul \x1b[2J esc\x7f \x85c1"]
        self.raw = make([Failure("b@customer.test", "550 " + " ".join(lines), "mx.c.test")])

    def test_no_line_passes_998_octets(self) -> None:
        self.assertLessEqual(max(len(line) for line in self.raw.split(b"\r\n")), 998)

    def test_controls_are_dropped(self) -> None:
        for control in ("\x00", "\x1b", "\x7f", "\x85"):
            self.assertNotIn(control.encode("utf-8"), self.raw)

    def test_the_folded_fields_still_say_it_all(self) -> None:
        msg: Any = message_from_bytes(self.raw)
        status = msg.get_payload()[1].get_payload()[1]
        diagnostic = " ".join(status["Diagnostic-Code"].split())
        self.assertEqual(diagnostic, "smtp; 550 5.1.1 <b@customer.test>: unknown "
                         + " ".join(["y" * 300] * 5) + " badnul [2J esc c1")
        self.assertEqual(status["Status"], "5.1.1")

    def test_a_word_too_long_for_any_line_is_cut(self) -> None:
        raw = make([Failure("b@customer.test", "550 " + "z" * 1500)])
        self.assertLessEqual(max(len(line) for line in raw.split(b"\r\n")), 998)
        self.assertEqual(raw.count(b"z"), 3000)  # the text part and the Diagnostic-Code

    def test_non_ascii_is_written_in_rfc6533_notation_where_ascii_is_required(self) -> None:
        """A next hop's reply in UTF-8 went raw into message/delivery-status (RFC 3464:
        ASCII); the text for people keeps it as it came."""
        raw = build_dsn(
            reporting_mta="mx.test", queue_id="Q1", original_sender="alice@example.test",
            original_headers=ORIGINAL, arrival_date=1_700_000_000.0, now=1_700_000_500.0,
            failures=[Failure("b\u00fccher@customer.test",
                              "550 5.1.1 Empf\u00e4nger unbekannt \U0001f600")],
        )
        msg: Any = message_from_bytes(raw)
        text, status, headers = msg.get_payload()
        self.assertIn("Empf\u00e4nger unbekannt \U0001f600",
                      text.get_payload(decode=True).decode("utf-8"))
        block = status.as_bytes().split(b"\n\n", 1)[1]
        self.assertTrue(block.isascii())
        fields = status.get_payload()[1]
        self.assertEqual(fields["Final-Recipient"], "utf-8; b\\x{FC}cher@customer.test")
        self.assertEqual(fields["Diagnostic-Code"],
                         "smtp; 550 5.1.1 Empf\\x{E4}nger unbekannt \\x{1F600}")
        self.assertEqual(headers.get_content_type(), "text/rfc822-headers")

    def test_eight_bit_original_headers_are_global_headers(self) -> None:
        raw = build_dsn(
            reporting_mta="mx.test", queue_id="Q1", original_sender="alice@example.test",
            original_headers=ORIGINAL.replace(b"quarterly", "Quartalsb\u00fccher".encode()),
            arrival_date=1_700_000_000.0, now=1_700_000_500.0,
            failures=[Failure("bob@customer.test", "550 5.1.1 unknown")],
        )
        msg: Any = message_from_bytes(raw)
        self.assertEqual(msg.get_payload()[2].get_content_type(), "message/global-headers")
        self.assertIn("Quartalsb\u00fccher".encode(), raw)


class StatusTests(TestCase):
    def test_status_from_reply(self) -> None:
        self.assertEqual(status_of("550 5.7.1 relaying denied"), "5.7.1")
        self.assertEqual(status_of("550 no enhanced code"), "5.0.0")
        self.assertEqual(status_of("5.4.7 expired"), "5.4.7")
        self.assertEqual(status_of("connection refused"), "5.0.0")

    def test_diagnostic_type(self) -> None:
        self.assertEqual(diagnostic_code("554 5.7.1 no"), "smtp; 554 5.7.1 no")
        self.assertEqual(diagnostic_code("4.4.1 refused"), "X-Mailcore; 4.4.1 refused")
        self.assertEqual(diagnostic_code("550 caf\u00e9"), "smtp; 550 caf\\x{E9}")

    def test_never_bounce_the_null_sender(self) -> None:
        self.assertFalse(should_bounce(""))
        self.assertFalse(should_bounce("<>"))
        self.assertTrue(should_bounce("a@x.test"))

    def test_a_dsn_needs_a_failure(self) -> None:
        with self.assertRaises(ValueError):
            make([])
