"""The Received header field the inbound server prepends: its shapes (one recipient or
several, an IPv6 client, a HELO name that is no domain nor IP literal) and RFC 3848's
protocol keywords."""

from __future__ import annotations

import datetime
import email.utils

from twisted.trial.unittest import TestCase

from mailcore.smtp.envelope import Recipient
from mailcore.smtp.received import received_header, received_protocol

NOW = 1_750_000_000  # Sun, 15 Jun 2025 15:06:40 +0000
DATE = email.utils.format_datetime(datetime.datetime.fromtimestamp(NOW, datetime.UTC))


class ReceivedHeaderTests(TestCase):
    def test_protocol_keywords_of_rfc_3848(self) -> None:
        self.assertEqual(received_protocol(esmtp=False, tls=False), "SMTP")
        self.assertEqual(received_protocol(esmtp=True, tls=False), "ESMTP")
        self.assertEqual(received_protocol(esmtp=True, tls=True), "ESMTPS")
        self.assertEqual(received_protocol(esmtp=True, tls=False, authenticated=True), "ESMTPA")
        self.assertEqual(received_protocol(esmtp=True, tls=True, authenticated=True), "ESMTPSA")

    def test_header_shapes(self) -> None:
        one = (Recipient("u@example.com", 1),)
        two = (Recipient("u@example.com", 1), Recipient("v@example.com", 1))
        self.assertEqual(
            received_header(helo="[192.0.2.9]", client_ip="2001:db8::9", hostname="mx.test",
                            protocol="ESMTPS", queue_id="QID", recipients=one, when=NOW),
            ("Received: from [192.0.2.9] ([IPv6:2001:db8::9])\r\n"
             "\tby mx.test (Mailcore) with ESMTPS id QID\r\n"
             f"\tfor <u@example.com>; {DATE}\r\n").encode(),
        )
        self.assertEqual(
            received_header(helo="bad helo (x)", client_ip="192.0.2.9", hostname="mx.test",
                            protocol="ESMTP", queue_id="QID", recipients=two, when=NOW),
            ("Received: from unknown ([192.0.2.9])\r\n"
             f"\tby mx.test (Mailcore) with ESMTP id QID; {DATE}\r\n").encode(),
        )
        self.assertEqual(DATE, "Sun, 15 Jun 2025 15:06:40 +0000")

    def test_a_helo_literal_that_is_no_ip_address_is_unknown(self) -> None:
        """RFC 5321's general literal allows "(" and ";": one would open a comment hiding
        the rest of our field (the client's address, our "by"), the other end its tokens."""
        def source(helo: str) -> str:
            header = received_header(helo=helo, client_ip="192.0.2.9", hostname="mx.test",
                                     protocol="ESMTP", queue_id="QID", recipients=(),
                                     when=NOW)
            return header.decode().split("\r\n")[0]

        for helo in ("[x(]", "[192.0.2.1);by.trusted.example]", "[IPv6:fe80::1%(x]",
                     "[tag:content]", "[]", "[999.0.2.1]"):
            with self.subTest(helo=helo):
                self.assertEqual(source(helo), "Received: from unknown ([192.0.2.9])")
        for helo in ("[192.0.2.1]", "[IPv6:2001:db8::1]", "[ipv6:::1]"):
            with self.subTest(helo=helo):
                self.assertEqual(source(helo), f"Received: from {helo} ([192.0.2.9])")
