"""Issue 4 end to end: a real `twistd mailcore` whose filter chain asks the real spamd,
clamd and rspamd. smtplib sends to its SMTP listener; what it delivers goes to a byte-exact
sink of ours; the quarantine is listed and released through the Protecmail API (seed 004).

The built-in GTUBE and EICAR checks are off here, so every spam or virus verdict comes from
the daemons: GTUBE scores 1000 only in spamd, the virus names carry clamd's `.UNOFFICIAL`
suffix, and rspamd's own log shows the gateway's queue id with its action. Every filter is
fail-closed (the default), so a verdict at all means each daemon answered; the last test
shows that a daemon that does not answer keeps the mail queued, and that it goes out once
the daemon is back.

Each test has its own daemon and data directory, copied from one the admin CLI made once
per run (`user add`, `apikey create`: seconds per call, a copy costs nothing). Domains are
added through the API (POST /api/v1/domain/{d}) with their spamAction and virusAction and
redirectTo the sink.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import smtplib
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import treq
from treq.client import HTTPClient
from twisted.internet import defer, threads
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from filters.builtin import EICAR, GTUBE
from tests.support import filterd
from tests.support.cli import cli_command
from tests.support.filterd import attachment, message, multipart, text_part, zip_bytes
from tests.support.mailsink import REPO, Daemon, Received, SinkFactory, SinkState
from tests.support.reactor import get_reactor
from tests.support.servers import free_port, sleep, tempdir, tempdir_for
from tests.support.smtpsession import strip_received

QUARANTINE_DOMAIN = "held.test"  # spamAction 0, virusAction 0
TAGGING_DOMAIN = "tagged.test"  # spamAction 1, virusAction 0
SENDER = "alice@example.com"
DATE = "Tue, 14 Nov 2023 22:13:20 +0000"
# Long enough for several sweeps of the queue (poll_interval 0.5 s below).
SETTLE = 1.5

# A data directory with user "owner" and its API key, made by the CLI once per run.
_template: dict[str, Any] = {}


def _cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    return env


async def cli(data_dir: Path, *args: str) -> str:
    """`python -m mailcore.cli --data-dir DIR ARGS`: its stdout; an error fails the test."""
    result = await cli_command("--data-dir", str(data_dir), *args, env=_cli_env(),
                               cwd=data_dir.parent, timeout=60)
    if result.status != 0:
        raise AssertionError(f"mailcore {' '.join(args)}: {result.out}{result.err}")
    return result.out


async def template() -> tuple[Path, str]:
    """(a data dir holding user "owner", that user's API key); made on first use."""
    if not _template:
        base = tempdir("mailcore-filtering-template-")
        atexit.register(shutil.rmtree, base, True)
        data_dir = base / "var"
        await cli(data_dir, "user", "add", "owner", "--email", "owner@example.test",
                  "--password", "secret")
        key = (await cli(data_dir, "apikey", "create", "owner")).strip()
        _template.update(data_dir=data_dir, key=key)
    return _template["data_dir"], _template["key"]


def filter_config(spamd: str, clamd: str, rspamd: str) -> str:
    """`[pipeline]` and `[filters]`: filtering on (explicitly), every real daemon, and the
    built-in checks without their GTUBE and EICAR tests."""
    return "\n".join([
        "[pipeline]",
        "filtering = true",
        "",
        "[filters]",
        'enabled = ["builtin", "spamd", "clamd", "rspamd"]',
        "[filters.builtin]",
        "gtube = false",
        "eicar = false",
        "[filters.spamd]",
        f'address = "{spamd}"',
        "timeout = 20.0",
        "[filters.clamd]",
        f'address = "{clamd}"',
        "timeout = 20.0",
        "[filters.rspamd]",
        f'address = "{rspamd}"',
        "timeout = 20.0",
        "",
    ])


def mail(rcpt: str, subject: str, body: bytes = b"") -> bytes:
    """A well-formed message to `rcpt` (a friendly default body)."""
    headers = [("From", f"Alice <{SENDER}>"), ("To", f"<{rcpt}>"), ("Subject", subject),
               ("Date", DATE), ("Message-ID", f"<{subject.replace(' ', '.')}@example.com>")]
    return message(body, headers=headers) if body else message(headers=headers)


def spam(rcpt: str) -> bytes:
    """A well-formed message to `rcpt` whose body is GTUBE."""
    return mail(rcpt, "Cheap watches", GTUBE)


def split_tags(data: bytes) -> tuple[list[tuple[str, str]], bytes]:
    """The X-Spam-* / X-Virus-* fields right after the gateway's Received header (trace
    fields stay on top), unfolded, and the message without them."""
    received = data[: len(data) - len(strip_received(data))]
    data = data[len(received):]
    tags = []
    while data.startswith((b"X-Spam-", b"X-Virus-")):
        end = data.index(b"\r\n")
        while data[end + 2:end + 3] in (b" ", b"\t"):  # a folded field's next line
            end = data.index(b"\r\n", end + 2)
        field = data[:end].replace(b"\r\n", b"")  # unfolded (RFC 5322 2.2.3)
        name, _, value = field.decode().partition(": ")
        tags.append((name, value))
        data = data[end + 2:]
    return tags, received + data


async def wait_until(check: Callable[[], Awaitable[Any]], seconds: float, what: str) -> Any:
    """Poll `check` until it returns something true (and return that); fail after `seconds`."""
    reactor = get_reactor()
    deadline = reactor.seconds() + seconds
    while True:
        result = await check()
        if result:
            return result
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {what}")
        await sleep(0.1)


class Api:
    """Protecmail calls to the daemon with the owner's Api-Key."""

    def __init__(self, port: int, key: str) -> None:
        self.base = f"http://127.0.0.1:{port}/api/v1"
        self.key = key
        self.pool = HTTPConnectionPool(get_reactor(), persistent=False)
        self.http = HTTPClient(Agent(get_reactor(), pool=self.pool))

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """(HTTP status, decoded JSON envelope) of one request."""
        headers: dict[bytes | str, bytes | str] = {"Api-Key": self.key}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        response = await self.http.request(method, self.base + path, headers=headers,
                                           data=data)
        return response.code, json.loads(await treq.content(response))

    async def add_domain(self, name: str, sink_port: int, spam: int, virus: int) -> None:
        code, reply = await self.call("POST", f"/domain/{name}", {
            "domain": name, "redirectTo": f"127.0.0.1:{sink_port}",
            "spamAction": spam, "virusAction": virus,
        })
        assert code == 200 and reply["success"], reply

    async def quarantine(self, target: str) -> list[dict[str, Any]]:
        """The first page of quarantined mail for a domain or an address."""
        code, reply = await self.call("GET", f"/quarantine/{target}/0/100")
        assert code == 200 and reply["success"], reply
        return list(reply["data"]["emails"])


class FilteringGatewayTests(TestCase):
    # rspamd's first start on an empty regexp cache alone takes ~15 s.
    timeout = 120

    async def start_gateway(self, *, clamd_address: str | None = None) -> None:
        """The sink, the daemon filtering with the real daemons, and the two domains."""
        self.reactor = get_reactor()
        spamd, clamd = await filterd.spamd(), await filterd.clamd()
        self.rspamd = await filterd.rspamd()
        self.state = SinkState()
        listener = await TCP4ServerEndpoint(self.reactor, 0, interface="127.0.0.1").listen(
            SinkFactory(self.state)
        )
        self.addCleanup(listener.stopListening)
        sink_port = listener.getHost().port
        data_dir, key = await template()
        self.daemon = Daemon(tempdir_for(self), queue={"poll_interval": 0.5})
        shutil.copytree(data_dir, self.daemon.data_dir, dirs_exist_ok=True)
        with self.daemon.config.open("a") as f:
            f.write("\n" + filter_config(spamd.address, clamd_address or clamd.address,
                                         self.rspamd.address))
        await self.daemon.start()
        self.addCleanup(self.check_daemon_log)  # runs after the stop below
        self.addCleanup(self.daemon.stop)
        self.api = Api(self.daemon.http_port, key)
        self.addCleanup(self.api.pool.closeCachedConnections)
        await self.api.add_domain(QUARANTINE_DOMAIN, sink_port, spam=0, virus=0)
        await self.api.add_domain(TAGGING_DOMAIN, sink_port, spam=1, virus=0)

    def check_daemon_log(self) -> None:
        """Nothing went wrong inside the daemon unnoticed."""
        log = (self.daemon.directory / "twistd.log").read_text()
        self.assertNotIn("Traceback", log, log[-4000:])

    async def send(self, body: bytes, rcpt: str) -> str:
        """One transaction with smtplib (in a thread); the queue id of the 250 reply."""

        def transaction() -> tuple[int, bytes]:
            with smtplib.SMTP("127.0.0.1", self.daemon.smtp_port, timeout=30) as s:
                s.ehlo("client.example.com")
                code, reply = s.mail(SENDER)
                assert code == 250, reply
                code, reply = s.rcpt(rcpt)
                assert code == 250, reply
                return s.data(body)

        code, reply = await threads.deferToThread(transaction)
        self.assertEqual(code, 250, reply)
        return reply.decode().rsplit(" ", 1)[-1]

    def stored(self, sql: str, *args: Any) -> defer.Deferred[list[Any]]:
        """Rows from the daemon's SQLite store (read in a thread): what the API leaves
        out, such as the quarantine's reason."""

        def read() -> list[Any]:
            conn = sqlite3.connect(str(self.daemon.data_dir / "mailcore.sqlite"))
            try:
                return conn.execute(sql, args).fetchall()
            finally:
                conn.close()

        return threads.deferToThread(read)

    async def recipient_state(self, queue_id: str) -> tuple[str, str]:
        """(state, last reply) of the one recipient of `queue_id`."""
        rows = await self.stored(
            "select state, coalesce(last_error, '') from queue_recipients "
            "where message_id = ?", queue_id)
        self.assertEqual(len(rows), 1, rows)
        return rows[0][0], rows[0][1]

    async def until_state(self, queue_id: str, state: str) -> None:
        """Wait for the recipient's state (results are written a moment after delivery)."""

        async def reached() -> bool:
            return (await self.recipient_state(queue_id))[0] == state

        await wait_until(reached, 10, f"{queue_id} to be {state}")

    async def held(self, queue_id: str) -> list[tuple[str, str, str]]:
        """(email, category, reason) of what the quarantine keeps for `queue_id`."""
        rows = await self.stored(
            "select email, category, reason from quarantine where queue_id = ?", queue_id)
        return [(r[0], r[1], r[2]) for r in rows]

    async def rspamd_said(self, queue_id: str) -> str:
        """rspamd's log line for the scan of `queue_id` (the gateway passes its queue id)."""
        path = self.rspamd.directory / "log" / "rspamd.log"
        marker = f"qid: <{queue_id}>"

        async def line() -> str:
            text = await threads.deferToThread(path.read_text, errors="replace")
            return next((x for x in text.splitlines() if marker in x), "")

        return str(await wait_until(line, 10, f"rspamd's log line for {queue_id}"))

    async def arrived(self, count: int, seconds: float = 30) -> list[Received]:
        """The sink's messages once there are `count` of them."""

        async def check() -> bool:
            return len(self.state.messages) >= count

        await wait_until(check, seconds, f"{count} message(s) at the sink")
        return list(self.state.messages)

    async def listed(self, target: str, seconds: float = 30) -> list[dict[str, Any]]:
        """The API's quarantine listing for `target` once it is not empty."""

        async def check() -> list[dict[str, Any]]:
            return await self.api.quarantine(target)

        return list(await wait_until(check, seconds, f"quarantined mail for {target}"))

    async def assert_nothing_more_arrives(self, count: int) -> None:
        """After several queue sweeps, the sink still holds exactly `count` messages."""
        await sleep(SETTLE)
        self.assertEqual(len(self.state.messages), count,
                         [m.data[:300] for m in self.state.messages])

    # -- the cases ------------------------------------------------------------------------

    async def test_gtube_to_a_quarantining_domain_is_held_and_listed(self) -> None:
        await self.start_gateway()
        rcpt = f"bob@{QUARANTINE_DOMAIN}"
        queue_id = await self.send(spam(rcpt), rcpt)
        [item] = await self.listed(QUARANTINE_DOMAIN)
        self.assertEqual(item["email"], rcpt)
        self.assertEqual(item["domain"], QUARANTINE_DOMAIN)
        self.assertEqual(item["mailfrom"], SENDER)
        self.assertEqual(item["subject"], "Cheap watches")
        self.assertRegex(item["ident"], r"^\d{20}$")
        self.assertRegex(item["date"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00$")
        # Listed for the address too.
        self.assertEqual([e["ident"] for e in await self.api.quarantine(rcpt)], [item["ident"]])
        # Why: spamd's score (GTUBE is worth 1000 there) and rule names.
        [(email, category, reason)] = await self.held(queue_id)
        self.assertEqual((email, category), (rcpt, "spam"))
        self.assertRegex(reason, r"^spam: score=10\d\d\.\d required=5\.0 tests=.*\bGTUBE\b")
        # The recipient's result is written a moment after the quarantine row.
        await self.until_state(queue_id, "quarantined")
        state, last = await self.recipient_state(queue_id)
        self.assertEqual(state, "quarantined")
        self.assertTrue(last.startswith("quarantined: spam: score="), last)
        # rspamd scanned the same message and would have rejected it.
        self.assertIn("(reject)", await self.rspamd_said(queue_id))
        await self.assert_nothing_more_arrives(0)

    async def test_gtube_to_a_tagging_domain_arrives_tagged(self) -> None:
        await self.start_gateway()
        rcpt = f"carol@{TAGGING_DOMAIN}"
        body = spam(rcpt)
        queue_id = await self.send(body, rcpt)
        [got] = await self.arrived(1)
        self.assertEqual((got.mail_from, got.rcpts), (SENDER, [rcpt]))
        tags, rest = split_tags(got.data)
        self.assertEqual([name for name, _ in tags],
                         ["X-Spam-Flag", "X-Spam-Score", "X-Spam-Status"])
        values = dict(tags)
        self.assertEqual(values["X-Spam-Flag"], "YES")
        self.assertGreaterEqual(float(values["X-Spam-Score"]), 1000.0)
        self.assertRegex(values["X-Spam-Status"],
                         r"^Yes, score=10\d\d\.\d required=5\.0 tests=.*\bGTUBE\b")
        # Apart from the tags and our Received header: as sent, with the Subject tagged.
        expected = body.replace(b"\r\nSubject: Cheap watches\r\n",
                                b"\r\nSubject: [SPAM] Cheap watches\r\n")
        self.assertNotEqual(expected, body)
        self.assertEqual(strip_received(rest), expected)
        self.assertEqual(await self.api.quarantine(TAGGING_DOMAIN), [])
        self.assertEqual(await self.held(queue_id), [])
        await self.until_state(queue_id, "delivered")
        await self.assert_nothing_more_arrives(1)

    async def test_eicar_attachments_are_quarantined_with_clamds_virus_name(self) -> None:
        await self.start_gateway()
        plain_rcpt = f"dave@{QUARANTINE_DOMAIN}"
        zip_rcpt = f"erin@{TAGGING_DOMAIN}"  # spamAction 1, but virusAction 0: held too
        plain = multipart([text_part(b"The report is attached."),
                           attachment("report.txt", EICAR, "text/plain")])
        zipped = multipart([text_part(b"The archive is attached."),
                            attachment("report.zip", zip_bytes({"report.txt": EICAR}),
                                       "application/zip")])
        plain_id = await self.send(plain, plain_rcpt)
        zip_id = await self.send(zipped, zip_rcpt)
        for target, rcpt, queue_id in ((QUARANTINE_DOMAIN, plain_rcpt, plain_id),
                                       (TAGGING_DOMAIN, zip_rcpt, zip_id)):
            [item] = await self.listed(target)
            self.assertEqual((item["email"], item["subject"]), (rcpt, "Files"))
            [(email, category, reason)] = await self.held(queue_id)
            self.assertEqual((email, category), (rcpt, "virus"))
            # Names only clamd gives: our self-made signatures, with ".UNOFFICIAL".
            self.assertRegex(reason, r"^virus: Eicar-Test-Signature-(Local|Body)\.UNOFFICIAL$")
            # The recipient's result is written a moment after the quarantine row.
            await self.until_state(queue_id, "quarantined")
            state, last = await self.recipient_state(queue_id)
            self.assertEqual(state, "quarantined")
            self.assertEqual(last, f"quarantined: {reason}")
        await self.assert_nothing_more_arrives(0)

    async def test_clean_mail_arrives_untouched(self) -> None:
        await self.start_gateway()
        rcpt = f"frank@{QUARANTINE_DOMAIN}"
        body = mail(rcpt, "Lunch on Thursday")
        queue_id = await self.send(body, rcpt)
        [got] = await self.arrived(1)
        self.assertEqual((got.mail_from, got.rcpts), (SENDER, [rcpt]))
        self.assertEqual(strip_received(got.data), body)
        self.assertIn(f"(Mailcore) with ESMTP id {queue_id}".encode(),
                      got.data[: len(got.data) - len(body)])
        self.assertEqual(await self.api.quarantine(QUARANTINE_DOMAIN), [])
        await self.until_state(queue_id, "delivered")
        self.assertIn("(no action)", await self.rspamd_said(queue_id))

    async def test_a_release_delivers_exactly_once(self) -> None:
        await self.start_gateway()
        rcpt = f"grace@{QUARANTINE_DOMAIN}"
        body = spam(rcpt)
        await self.send(body, rcpt)
        [item] = await self.listed(QUARANTINE_DOMAIN)
        self.assertEqual(self.state.messages, [])
        code, reply = await self.api.call("GET", f"/quarantine/{item['ident']}")
        self.assertEqual(code, 200, reply)
        self.assertIs(reply["success"], True)
        [got] = await self.arrived(1)
        self.assertEqual((got.mail_from, got.rcpts), (SENDER, [rcpt]))
        # Released as it was kept: not scanned again, so not tagged either.
        self.assertEqual(strip_received(got.data), body)
        code, reply = await self.api.call("GET", f"/quarantine/{item['ident']}")
        self.assertEqual(code, 409, reply)
        self.assertIs(reply["success"], False)
        self.assertEqual(reply["msg"], "already released")
        await self.assert_nothing_more_arrives(1)

    async def test_a_filter_daemon_that_is_down_keeps_the_message_queued(self) -> None:
        closed = f"127.0.0.1:{free_port()}"
        await self.start_gateway(clamd_address=closed)
        rcpt = f"heidi@{QUARANTINE_DOMAIN}"
        body = mail(rcpt, "Minutes")
        queue_id = await self.send(body, rcpt)

        async def deferred() -> bool:
            return (await self.recipient_state(queue_id))[0] == "deferred"

        await wait_until(deferred, 30, "the message to be deferred")
        _, last = await self.recipient_state(queue_id)
        # The filter's address is in the daemon's log, not in the detail a DSN quotes.
        self.assertEqual(last, "4.7.0 filtering unavailable")
        # What the operator sees: still queued, waiting for its next try.
        shown = await cli(self.daemon.data_dir, "queue", "show", queue_id)
        self.assertRegex(shown, rf"{rcpt}\s+deferred\s+1\s")
        await self.assert_nothing_more_arrives(0)
        self.assertEqual(await self.api.quarantine(QUARANTINE_DOMAIN), [])
        # Not lost either: with clamd back, the same message goes out, scanned and clean.
        await self.daemon.stop()
        good = (await filterd.clamd()).address
        self.daemon.config.write_text(self.daemon.config.read_text().replace(closed, good))
        await cli(self.daemon.data_dir, "queue", "flush")
        await self.daemon.start()
        [got] = await self.arrived(1)
        self.assertEqual(strip_received(got.data), body)
        await self.until_state(queue_id, "delivered")
