"""RFC 5321 path parsing for MAIL and RCPT, and the refusal of relay tricks."""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from mailcore.smtp.address import (
    Mailbox,
    PathError,
    parse_mail_from,
    parse_rcpt_to,
    relay_refusal,
)


class MailFromTests(TestCase):
    def test_plain_null_and_parameters(self) -> None:
        self.assertEqual(parse_mail_from("FROM:<a@b.test>"), (Mailbox("a", "b.test"), {}))
        self.assertEqual(parse_mail_from("from:<>"), (None, {}))
        self.assertEqual(
            parse_mail_from("FROM:<a.b+c@b.test> SIZE=123 body=8bitmime"),
            (Mailbox("a.b+c", "b.test"), {"SIZE": "123", "BODY": "8bitmime"}),
        )
        self.assertEqual(parse_mail_from("FROM:<> SIZE=1")[1], {"SIZE": "1"})

    def test_lenient_spacing_and_missing_brackets(self) -> None:
        self.assertEqual(parse_mail_from("FROM: <a@b.test>")[0], Mailbox("a", "b.test"))
        self.assertEqual(parse_mail_from("FROM:a@b.test SIZE=5"),
                         (Mailbox("a", "b.test"), {"SIZE": "5"}))

    def test_quoted_and_literal_senders_are_fine(self) -> None:
        self.assertEqual(parse_mail_from('FROM:<"a b>c"@b.test>')[0],
                         Mailbox('"a b>c"', "b.test"))
        self.assertEqual(parse_mail_from("FROM:<a@[192.0.2.1]>")[0],
                         Mailbox("a", "[192.0.2.1]"))

    def test_source_route_is_dropped_from_the_sender(self) -> None:
        self.assertEqual(parse_mail_from("FROM:<@relay.test,@x.test:a@b.test>")[0],
                         Mailbox("a", "b.test"))

    def test_bad_senders(self) -> None:
        cases = {
            "TO:<a@b.test>": "5.5.4",
            "FROM:<a@b.test": "5.5.4",
            "FROM:<a@>": "5.1.7",
            "FROM:<@b.test>": "5.1.7",
            "FROM:<a..b@b.test>": "5.1.7",
            "FROM:<a@b..test>": "5.1.7",
            "FROM:<a@-b.test>": "5.1.7",
            "FROM:<a@b.test.>": "5.1.7",
            "FROM:<a@[300.1.1.1]>": "5.1.7",
            "FROM:<postmaster>": "5.1.7",
            "FROM:<a@b.test>SIZE=1": "5.5.4",
            "FROM:<a@b.test> SIZE=1 SIZE=2": "5.5.4",
            "FROM:<a@b.test> =x": "5.5.4",
            "FROM:<é@b.test>": "5.6.7",
            "FROM:<" + "a" * 65 + "@b.test>": "5.1.7",
            "FROM:<a@" + "b" * 250 + ".test>": "5.1.7",
        }
        for arg, status in cases.items():
            with self.subTest(arg=arg):
                with self.assertRaises(PathError) as cm:
                    parse_mail_from(arg)
                self.assertEqual(cm.exception.status, status)
                self.assertIn(cm.exception.code, (501, 553))


class RcptToTests(TestCase):
    def test_recipients(self) -> None:
        self.assertEqual(parse_rcpt_to("TO:<User@Example.COM>"),
                         (Mailbox("User", "Example.COM"), {}))
        self.assertEqual(parse_rcpt_to("to:<Postmaster>")[0], Mailbox("postmaster", ""))
        self.assertEqual(parse_rcpt_to("TO:<a@b.test> NOTIFY=NEVER")[1], {"NOTIFY": "NEVER"})

    def test_null_recipient_is_refused(self) -> None:
        with self.assertRaises(PathError) as cm:
            parse_rcpt_to("TO:<>")
        self.assertEqual((cm.exception.code, cm.exception.status), (501, "5.1.3"))

    def test_relay_tricks_are_named(self) -> None:
        cases = {
            "TO:<@example.com:user@foreign.test>": "Source routes",
            "TO:<@a.test,@example.com:user@example.com>": "Source routes",
            "TO:<user@[192.0.2.1]>": "Address literals",
            "TO:<user@[IPv6:2001:db8::1]>": "Address literals",
            'TO:<"user@foreign.test"@example.com>': "Quoted local parts",
            'TO:<"user"@example.com>': "Quoted local parts",
            "TO:<user%foreign.test@example.com>": "%-hack",
            "TO:<foreign.test!user@example.com>": "Bang paths",
        }
        for arg, reason in cases.items():
            with self.subTest(arg=arg):
                mailbox, _ = parse_rcpt_to(arg)
                refusal = relay_refusal(mailbox)
                assert refusal is not None
                self.assertIn(reason, refusal)
        self.assertIsNone(relay_refusal(parse_rcpt_to("TO:<a.b+c@example.com>")[0]))
