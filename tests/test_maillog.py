"""The mail log: one greppable line per message event, starting with the queue id, and no
line that a client's bytes can split or forge."""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet import defer
from twisted.logger import LogEvent, capturedLogs, formatEvent
from twisted.trial.unittest import TestCase

from mailcore import maillog
from mailcore.logwriter import UNIQUE_KEY
from mailcore.queue.routing import Hop
from tests.support.queuetest import QueueTestCase
from tests.test_smtp_server import FixedRoom, ServerTestCase

HOP = Hop("10.0.0.1", 2525)


def lines(events: Sequence[LogEvent]) -> list[str]:
    return [formatEvent(e) for e in events if e.get("log_namespace") == "mailcore.mail"]


class FormatTests(TestCase):
    def test_control_characters_are_escaped(self) -> None:
        with capturedLogs() as events:
            maillog.refused("RCPT", "550 5.7.1 no", client="192.0.2.1",
                            recipients=["x\r\nQ1: delivered to=<forged>@y.test"])
        (line,) = lines(events)
        self.assertNotIn("\n", line)
        self.assertNotIn("\r", line)
        self.assertIn("to=<x\\x0d\\x0aQ1:\\x20delivered", line)

    def test_only_lines_without_a_queue_id_are_for_the_repeated_line_limit(self) -> None:
        with capturedLogs() as events:
            maillog.refused("RCPT", "550 5.7.1 no", client="192.0.2.1")
            maillog.outcome("Q1", "delivered", ["a@b.test"], relay="h:25", delay=0.1,
                            reply="250 ok")
        self.assertEqual([UNIQUE_KEY in e for e in events], [False, True])

    def test_many_recipients_are_counted_not_all_named(self) -> None:
        text = maillog.addresses(f"r{i}@x.test" for i in range(25))
        self.assertEqual(text.count("<"), maillog.MAX_NAMED)
        self.assertTrue(text.endswith("(+15 more)"))


class RunnerEventTests(QueueTestCase):
    settings = {"min_backoff": 300.0, "lifetime": 3600.0}

    async def test_delivery_is_logged_with_relay_reply_and_delay(self) -> None:
        self.clock.advance(0)
        with capturedLogs() as events:
            await self.accept("Q1", "b@customer.test")
        (line,) = [x for x in lines(events) if "delivered" in x]
        self.assertTrue(line.startswith("Q1: delivered to=<b@customer.test> relay=10.0.0.1:2525 "
                                        "delay=0.00 reply=250"), line)

    async def test_deferral_then_bounce_are_logged(self) -> None:
        self.connector.down.add(HOP)
        with capturedLogs() as events:
            await self.accept("Q1", "b@customer.test", sender="s@customer.test")
            for _ in range(20):
                self.clock.advance(300)
        found = lines(events)
        deferred = [x for x in found if x.startswith("Q1: deferred to=<b@customer.test>")]
        bounced = [x for x in found if x.startswith("Q1: bounced to=<b@customer.test>")]
        self.assertTrue(deferred)
        self.assertIn("relay=10.0.0.1:2525", deferred[0])
        self.assertEqual(len(bounced), 1, found)
        self.assertIn("reason=5.4.7 delivery time expired", bounced[0])


class ServerEventTests(ServerTestCase):
    def test_an_accepted_message_is_logged_after_its_250(self) -> None:
        s = self.session()
        with capturedLogs() as events:
            self.start(s, "a@example.com", "b@example.com")
            s.send(b"Subject: hi\r\n\r\nbody\r\n.\r\n")
        [accepted] = self.sink.messages
        (line,) = lines(events)
        self.assertEqual(
            line,
            f"{accepted.queue_id}: accepted client=192.0.2.10 helo=client.example "
            f"from=<sender@remote.test> size={len(accepted.data)} nrcpt=2 "
            "to=<a@example.com>,<b@example.com> tls=no",
        )

    def test_a_client_cannot_write_fields_of_its_own_into_the_line(self) -> None:
        # Found attacking a running daemon: a HELO name, or a sender's quoted local part,
        # with spaces wrote a whole forged set of fields before the real ones.
        s = self.session()
        with capturedLogs() as events:
            s.send(b"EHLO x from=<ceo@bank.test> nrcpt=1 to=<ceo@example.com> tls=yes\r\n")
            s.send(b'MAIL FROM:<"a> size=9 to=<boss@example.com> y=<"@remote.test>\r\n')
            s.send(b"RCPT TO:<u@example.com>\r\n")
            s.send(b"RCPT TO:<y@elsewhere.test>\r\n")
            s.send(b"DATA\r\n")
            s.send(b"Subject: hi\r\n\r\nbody\r\n.\r\n")
        [accepted] = self.sink.messages
        sender = '"a>\\x20size=9\\x20to=<boss@example.com>\\x20y=<"@remote.test'
        self.assertEqual(lines(events), [
            f"NOQUEUE: refused RCPT client=192.0.2.10 from=<{sender}> "
            "to=<y@elsewhere.test>: 550 5.7.1 <y@elsewhere.test>: Relaying denied",
            f"{accepted.queue_id}: accepted client=192.0.2.10 "
            "helo=x\\x20from=<ceo@bank.test>\\x20nrcpt=1\\x20to=<ceo@example.com>\\x20tls=yes "
            f"from=<{sender}> size={len(accepted.data)} nrcpt=1 to=<u@example.com> tls=no",
        ])

    def test_refused_recipients_and_messages_are_logged_with_the_reply(self) -> None:
        s = self.session()
        with capturedLogs() as events:
            s.hello()
            s.send(b"MAIL FROM:<x@spam.test>\r\n")
            s.send(b"RCPT TO:<y@elsewhere.test>\r\n")
            s.send(b"RCPT TO:<nobody@listed.example>\r\n")
            s.send(b"RCPT TO:<u@example.com>\r\n")
            s.send(b"DATA\r\n")
            s.send(b"Subject: hi\r\n\r\nnul \x00 here\r\n.\r\n")
        self.assertEqual(lines(events), [
            "NOQUEUE: refused RCPT client=192.0.2.10 from=<x@spam.test> "
            "to=<y@elsewhere.test>: 550 5.7.1 <y@elsewhere.test>: Relaying denied",
            "NOQUEUE: refused RCPT client=192.0.2.10 from=<x@spam.test> "
            "to=<nobody@listed.example>: 550 5.1.1 <nobody@listed.example>: Recipient "
            "address rejected: User unknown",
            "NOQUEUE: refused DATA client=192.0.2.10 from=<x@spam.test> to=<u@example.com>: "
            "554 5.6.0 Error: NUL character in message data; message refused",
        ])
        self.assertEqual(self.sink.messages, [])

    def test_a_room_check_past_command_timeout_at_data_is_logged(self) -> None:
        # The room of a nearly full mailbox is asked again at the end of DATA; a store that
        # does not answer by command_timeout is a 451, and the refusal has its line as the
        # commit's timeout has.
        factory = self.make_factory(command_timeout=60)
        rooms = FixedRoom({"a@example.com": 5000})
        factory.room = rooms
        s = self.session(factory)
        s.hello()
        self.assertEqual(s.codes(b"MAIL FROM:<x@remote.test>\r\nRCPT TO:<a@example.com>\r\n"
                                 b"DATA\r\n"), ["250", "250", "354"])
        stalled: defer.Deferred[int | None] = defer.Deferred()

        async def frozen(address: str) -> int | None:
            return await stalled

        rooms.room = frozen  # type: ignore[method-assign]
        with capturedLogs() as events:
            self.assertEqual(s.send(b"Subject: hi\r\n\r\nbody\r\n.\r\n"), [])
            self.clock.advance(60)
        self.assertEqual(s.send(b""), [
            "451 4.3.0 Error: timeout waiting for the store, try again later"])
        self.assertEqual(lines(events), [
            "NOQUEUE: refused DATA client=192.0.2.10 from=<x@remote.test> "
            "to=<a@example.com>: 451 4.3.0 Error: timeout waiting for the store, try again "
            "later"])
        self.assertEqual(s.codes(b"NOOP\r\n"), ["250"])
        self.assertEqual(self.sink.messages, [])
