"""CR, LF and NUL in an account's username or password never reach a POP3 or IMAP command line.

Stock `POP3Client.user()` writes `USER <name>` as given, so a username "u\\r\\nDELE 1" would
send a second command of the user's choosing; AUTHENTICATE PLAIN uses NUL as its field
separator. The account store refuses such values when they are saved (the API, the CLI),
and the sessions refuse them again at the protocol edge, sending nothing.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from mailcore.fetch.errors import AccountError, AuthFailed
from mailcore.fetch.imap import IMAPClient
from mailcore.fetch.pop3 import POP3Session
from tests.support.web import make_core

HOSTILE = ("u\r\nDELE 1", "u\nQUIT", "u\x00admin", "u\rX")


def failure_of(d: defer.Deferred[Any]) -> BaseException:
    box: list[Any] = []
    d.addErrback(box.append)
    assert box, "the Deferred did not fail"
    return box[0].value


class SessionTests(TestCase):
    def pop3(self) -> tuple[POP3Session, StringTransport]:
        session = POP3Session(Clock(), host="fake")
        transport = StringTransport()
        session.makeConnection(transport)
        session.dataReceived(b"+OK fake POP3\r\n")
        transport.clear()
        return session, transport

    def imap(self, capabilities: set[str]) -> tuple[IMAPClient, StringTransport]:
        client = IMAPClient(Clock(), host="fake")
        transport = StringTransport()
        client.makeConnection(transport)
        client.dataReceived(b"* OK fake ready\r\n")
        client.capabilities = capabilities
        transport.clear()
        return client, transport

    def test_pop3_user_and_pass_refuse_line_breaks_and_send_nothing(self) -> None:
        for username, password in [*((u, "secret") for u in HOSTILE), ("alice", "p\r\nDELE 1")]:
            session, transport = self.pop3()
            d = defer.Deferred.fromCoroutine(session.log_in(username, password))
            error = failure_of(d)
            self.assertIsInstance(error, AuthFailed)
            self.assertEqual(
                str(error), "the username or password holds NUL, CR or LF; not sent to fake"
            )
            self.assertEqual(transport.value(), b"")

    def test_pop3_plain_credentials_still_go_out(self) -> None:
        session, transport = self.pop3()
        d = defer.Deferred.fromCoroutine(session.log_in("zoë", "pa ss"))
        self.assertEqual(transport.value(), "USER zoë\r\n".encode())
        session.dataReceived(b"+OK\r\n")
        self.assertEqual(transport.value(), "USER zoë\r\nPASS pa ss\r\n".encode())
        session.dataReceived(b"+OK\r\n")
        self.successResultOf(d)

    def test_imap_login_and_plain_refuse_line_breaks_and_send_nothing(self) -> None:
        for capabilities in ({"IMAP4REV1"}, {"IMAP4REV1", "AUTH=PLAIN", "SASL-IR"}):
            for username in HOSTILE:
                client, transport = self.imap(capabilities)
                d = defer.Deferred.fromCoroutine(client.authenticate_plain(username, "pw"))
                self.assertIsInstance(failure_of(d), AuthFailed)
                self.assertEqual(transport.value(), b"")


class AccountStoreTests(TestCase):
    """What the API and the CLI save is checked once, in the account store."""

    async def test_control_characters_are_refused_when_an_account_is_saved(self) -> None:
        core, _ = make_core()
        user = await core.identity.create_user("alice", "alice@example.test", "pw-12345678")
        accounts = core.fetch.accounts
        base = {"host": "imap.example.test", "username": "alice", "password": "pw"}
        for field, value, message in [
            ("username", "alice\r\nDELE 1", "username may not hold control characters"),
            ("name", "Work\x00", "name may not hold control characters"),
            ("folders_to_sync", ["INBOX", "Sent\r\nX"],
             "folders_to_sync may not hold control characters"),
            ("password", "pw\nQUIT", "password may not hold NUL, CR or LF"),
            ("username", "\udc80", "username holds a lone surrogate, which is not text"),
        ]:
            with self.assertRaises(AccountError) as caught:
                await accounts.create(user.id, protocol="pop", **{**base, field: value})
            self.assertEqual((caught.exception.field, caught.exception.message),
                             (field, message))
        self.assertEqual(await accounts.list_accounts(user.id), [])
        made = await accounts.create(user.id, protocol="pop", **{**base, "password": "p\tw"})
        self.assertEqual(made.username, "alice")
