"""The Mail API end to end on a real `twistd mailcore` with a byte-exact sink as the next
hop: SMTP into a hosted mailbox lands in its inbox; outbox mail to another hosted mailbox
lands in that inbox; outbox mail to a relayed domain reaches the sink with its headers, no
Bcc field and its attachment intact; 200 messages posted at once arrive in posting
order; the daemon killed with SIGKILL twice while mail is posted and sent: every 202'd
message arrives, none twice, each handed to the queue once; and twice while mail for a
hosted mailbox comes in by SMTP: every 250'd message is in the inbox once, its files whole;
a mailbox without room for a message refuses it at RCPT (552 5.2.2)."""

from __future__ import annotations

import email
import email.policy
import hashlib
import json
import smtplib
from typing import Any

import treq
from treq.client import HTTPClient
from twisted.internet import defer, threads
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import ConnectError
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from mailcore.identity import Identity
from mailcore.mailapi import MailboxService
from mailcore.queue.settings import QueueSettings
from mailcore.store import Database
from mailcore.workers import CpuPool
from tests.support.mailsink import Daemon, SinkFactory, SinkState, done, thd_add_domain
from tests.support.reactor import get_reactor
from tests.support.servers import sleep, tempdir_for

BOB = "bob@hosted.test"
JOE = "joe@hosted.test"


def prepare(daemon: Daemon, sink_port: int) -> dict[str, str]:
    """Users bob and joe, hosted.test with their mailboxes, customer.test relayed to the
    sink; returns each user's Mail API token (blocks: before the daemon starts)."""
    from twisted.internet.task import Clock

    db = Database(daemon.db_url, None, synchronous=True)  # type: ignore[arg-type]
    db.migrate_blocking()
    clock = Clock()
    clock.advance(1_700_000_000)
    identity = Identity(db, clock, CpuPool.for_tests())
    boxes = MailboxService(db, clock)
    tokens = {}
    for name in ("bob", "joe"):
        user = done(defer.Deferred.fromCoroutine(
            identity.create_user(name, f"{name}@hosted.test", "s3cret-Pa55")))
        if name == "bob":
            done(db.run("add", thd_add_domain, "customer.test", "127.0.0.1", sink_port))
            done(db.run("add", thd_add_domain, "hosted.test", "127.0.0.1", sink_port))
        done(defer.Deferred.fromCoroutine(boxes.add(f"{name}@hosted.test", user.id)))
        secret, _ = done(defer.Deferred.fromCoroutine(
            identity.create_credential(user.id, "token")))
        tokens[name] = secret
    db.engine.dispose()
    return tokens


class MailApiGatewayTests(TestCase):
    timeout = 180

    async def setUp(self) -> None:  # type: ignore[override]
        self.state = SinkState()
        listener = await TCP4ServerEndpoint(get_reactor(), 0, interface="127.0.0.1").listen(
            SinkFactory(self.state))
        self.addCleanup(listener.stopListening)
        sink_port = listener.getHost().port
        # One connection to the hop, so that the order of arrival is the queue's order.
        # 200 posts at once in a test, past the per-user rate a person never reaches.
        self.daemon = Daemon(tempdir_for(self), queue={"hop_concurrency": 1},
                             web={"mailapi_user_rate": "1000/second"})
        self.tokens = prepare(self.daemon, sink_port)
        await self.daemon.start()
        self.addCleanup(self.daemon.stop)
        self.pool = HTTPConnectionPool(get_reactor(), persistent=False)
        self.http = HTTPClient(Agent(get_reactor(), pool=self.pool))
        await self.daemon.process.wait_for_port(self.daemon.http_port, timeout=30)

    async def call(self, who: str, method: str, path: str, body: Any = None,
                   raw: bytes | None = None, content_type: str = "") -> tuple[int, Any]:
        headers: dict[bytes | str, bytes | str] = {"Auth-Key": self.tokens[who]}
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        elif content_type:
            headers["Content-Type"] = content_type
        response = await self.http.request(
            method, f"http://127.0.0.1:{self.daemon.http_port}{path}", headers=headers,
            data=data)
        return response.code, json.loads(await treq.content(response))

    async def inbox(self, who: str, count: int) -> list[dict[str, Any]]:
        """The caller's inbox mail once it holds `count` (polls for up to 30 s)."""
        for _ in range(300):
            _, page = await self.call(who, "GET", "/api/v1/mail/?count=1000")
            found = [m for m in page["emails"] if m["status"] == "inbox"]
            if len(found) >= count:
                return found
            await sleep(0.1)
        self.fail(f"{who} has {len(found)} inbox mails, not {count}")

    async def test_smtp_in_outbox_out_local_and_relayed(self) -> None:
        def send() -> Any:
            with smtplib.SMTP("127.0.0.1", self.daemon.smtp_port, timeout=30) as s:
                return s.sendmail("far@away.test", [BOB],
                                  b"From: far@away.test\r\nTo: bob@hosted.test\r\n"
                                  b"Subject: by smtp\r\n\r\nhello bob\r\n")

        self.assertEqual(await threads.deferToThread(send), {})
        [mail] = await self.inbox("bob", 1)
        self.assertEqual((mail["subject"], mail["from"], mail["read"], mail["body"]),
                         ("by smtp", "far@away.test", False, "hello bob\n"))

        # Outbox to another hosted mailbox: into joe's inbox, nothing at the sink.
        status, reply = await self.call("bob", "POST", "/api/v1/mail/", {
            "status": "outbox", "to": JOE, "subject": "hi joe", "body": "local"})
        self.assertEqual((status, reply["message"]), (202, "email enqueued to be sent"))
        [got] = await self.inbox("joe", 1)
        self.assertEqual((got["subject"], got["from"], got["body"]), ("hi joe", BOB, "local\n"))
        self.assertEqual(self.state.messages, [])

        # Outbox to a relayed domain, with a Bcc and an attachment (larger than twisted.web
        # keeps in memory: streamed to disk from its temp file): at the sink.
        payload = bytes(range(256)) * 1200
        raw = (b'--B\r\nContent-Disposition: form-data; name="status"\r\n\r\noutbox\r\n'
               b'--B\r\nContent-Disposition: form-data; name="to"\r\n\r\nx@customer.test\r\n'
               b'--B\r\nContent-Disposition: form-data; name="bcc"\r\n\r\n'
               b'hidden@customer.test\r\n'
               b'--B\r\nContent-Disposition: form-data; name="subject"\r\n\r\nwith file\r\n'
               b'--B\r\nContent-Disposition: form-data; name="attachment"; filename="d.bin"'
               b"\r\nContent-Type: application/octet-stream\r\n\r\n" + payload +
               b"\r\n--B--\r\n")
        status, reply = await self.call("bob", "POST", "/api/v1/mail/", raw=raw,
                                        content_type="multipart/form-data; boundary=B")
        self.assertEqual(status, 202, reply)
        await self.state.wait_for(1)
        [out] = self.state.messages
        self.assertEqual((out.mail_from, sorted(out.rcpts)),
                         (BOB, ["hidden@customer.test", "x@customer.test"]))
        message: Any = email.message_from_bytes(out.data, policy=email.policy.default)
        self.assertEqual((message["From"], message["To"], message["Subject"], message["Bcc"]),
                         (BOB, "x@customer.test", "with file", None))
        self.assertNotIn(b"hidden@customer.test", out.data)
        [part] = list(message.iter_attachments())
        self.assertEqual((part.get_filename(), part.get_content()), ("d.bin", payload))
        # The attachment is a file in the data directory, served from there.
        stored = self.daemon.data_dir / "mailapi" / "files"
        self.assertTrue(any(f.read_bytes() == payload for f in stored.glob("*/*")))
        auth: dict[bytes | str, bytes | str] = {"Auth-Key": self.tokens["bob"]}
        response = await self.http.request(
            "GET", f"http://127.0.0.1:{self.daemon.http_port}/api/v1/mail/{reply['id']}"
            "/attachments/1", headers=auth)
        self.assertEqual((response.code, await treq.content(response)), (200, payload))
        for _ in range(100):
            _, listed = await self.call("bob", "GET", f"/api/v1/mail/{reply['id']}")
            if listed["status"] == "sent":
                break
            await sleep(0.1)
        self.assertEqual(listed["status"], "sent")

    async def test_outbox_is_fifo(self) -> None:
        n = 200
        # Posted at once, ten requests in flight at a time (the web's per-address limits).
        lock = defer.DeferredSemaphore(10)
        posts = [lock.run(self.call, "bob", "POST", "/api/v1/mail/",
                          {"status": "outbox", "to": "x@customer.test", "subject": f"n{i}"})
                 for i in range(n)]
        replies = await defer.gatherResults(posts)
        self.assertTrue(all(status == 202 for status, _ in replies))
        await self.state.wait_for(n)
        _, page = await self.call("bob", "GET", f"/api/v1/mail/?count={n}")
        posted = [m["subject"] for m in reversed(page["emails"])]  # oldest first
        arrived = [email.message_from_bytes(m.data)["Subject"] for m in self.state.messages]
        self.assertEqual(arrived, posted)


class MailboxFullAtRcptTests(TestCase):
    """A hosted mailbox without room for a message refuses it at RCPT (552 5.2.2), over a
    real SMTP session with the daemon: nothing is accepted to be bounced later."""

    timeout = 120

    async def test_a_full_mailbox_refuses_at_rcpt(self) -> None:
        daemon = Daemon(tempdir_for(self), mailapi={"mailbox_quota_bytes": 20_000})
        tokens = prepare(daemon, 9)  # (no mail goes to the sink)
        await daemon.start()
        self.addCleanup(daemon.stop)
        await daemon.process.wait_for_port(daemon.http_port, timeout=30)
        pool = HTTPConnectionPool(get_reactor(), persistent=False)
        http = HTTPClient(Agent(get_reactor(), pool=pool))
        # A draft of 19,990 bytes (its body and its from, bob@hosted.test): 10 bytes left.
        headers: dict[bytes | str, bytes | str] = {
            "Auth-Key": tokens["bob"], "Content-Type": "application/json"}
        response = await http.request(
            "POST", f"http://127.0.0.1:{daemon.http_port}/api/v1/mail/", headers=headers,
            data=json.dumps({"status": "draft", "body": "x" * 19_975}).encode())
        self.assertEqual(response.code, 201, await treq.content(response))
        await treq.content(response)

        def session() -> list[tuple[int, bytes]]:
            with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=30) as s:
                s.ehlo("client.test")
                replies = [s.mail("far@away.test"), s.rcpt(BOB), s.rcpt(JOE), s.rset()]
                replies += [s.mail("far@away.test", ["SIZE=30000"]), s.rcpt(JOE), s.rset()]
                replies += [s.mail("far@away.test", ["SIZE=100"]), s.rcpt(JOE), s.data(
                    b"From: far@away.test\r\nSubject: fits\r\n\r\nhello joe\r\n")]
                return replies

        replies = await threads.deferToThread(session)
        self.assertEqual(replies[1], (552, b"5.2.2 <bob@hosted.test>: Recipient address "
                                           b"rejected: mailbox full"))
        self.assertEqual([code for code, _ in replies],
                         [250, 552, 250, 250, 250, 552, 250, 250, 250, 250])
        self.assertIn(b"5.2.2", replies[5][1])
        # The message that fits is stored; nothing was bounced.
        import sqlite3
        c = sqlite3.connect(str(daemon.data_dir / "mailcore.sqlite"))
        try:
            for _ in range(100):
                inbox = c.execute("select subject from mailapi_mail "
                                  "where status = 'inbox'").fetchall()
                if inbox:
                    break
                await sleep(0.1)
            bounces = c.execute("select count(*) from queue_messages "
                                "where mail_from = ''").fetchone()[0]
        finally:
            c.close()
        self.assertEqual((inbox, bounces), ([("fits",)], 0))


class OutboxKillNineTests(TestCase):
    timeout = 180

    async def test_every_202_is_sent_once_across_kill_9(self) -> None:
        state = SinkState()
        listener = await TCP4ServerEndpoint(get_reactor(), 0, interface="127.0.0.1").listen(
            SinkFactory(state))
        self.addCleanup(listener.stopListening)
        daemon = Daemon(tempdir_for(self), queue={"poll_interval": 0.5})
        tokens = prepare(daemon, listener.getHost().port)
        await daemon.start()
        self.addCleanup(daemon.stop)
        await daemon.process.wait_for_port(daemon.http_port, timeout=30)
        pool = HTTPConnectionPool(get_reactor(), persistent=False)
        http = HTTPClient(Agent(get_reactor(), pool=pool))
        n = 150
        accepted: set[str] = set()
        headers: dict[bytes | str, bytes | str] = {
            "Auth-Key": tokens["bob"], "Content-Type": "application/json"}

        async def post(i: int) -> None:
            for _ in range(100):  # until the daemon listens again (it is being killed)
                try:
                    response = await http.request(
                        "POST", f"http://127.0.0.1:{daemon.http_port}/api/v1/mail/",
                        headers=headers,
                        data=json.dumps({"status": "outbox", "to": "x@customer.test",
                                         "subject": f"n{i}"}).encode())
                    await treq.content(response)
                except ConnectError:
                    await sleep(0.1)
                    continue
                except Exception:
                    return  # cut off mid-request: it may or may not be stored; never retried
                if response.code == 202:
                    accepted.add(f"n{i}")
                return

        lock = defer.DeferredSemaphore(10)
        posting = defer.gatherResults([lock.run(post, i) for i in range(n)])
        kills = 0
        for mark in (n // 3, 2 * n // 3):
            while len(accepted) < mark and not posting.called:
                await sleep(0.01)
            daemon.kill()
            await daemon.stop()
            kills += 1
            await daemon.start()
        await posting
        self.assertEqual(kills, 2)
        reactor = get_reactor()
        deadline = reactor.seconds() + 60

        def arrived() -> list[str]:
            return [str(email.message_from_bytes(m.data)["Subject"]) for m in state.messages]

        while not accepted <= set(arrived()) and reactor.seconds() < deadline:
            await sleep(0.2)
        got = arrived()
        missing = sorted(accepted - set(got))
        duplicates = len(got) - len(set(got))
        print(f"\n  {kills} kills, {len(accepted)} of {n} posts got 202, {len(got)} arrived, "
              f"{duplicates} duplicates")
        self.assertEqual(missing, [])
        # Each outbox message was handed to the queue once (its queue id is the key).
        import sqlite3
        c = sqlite3.connect(str(daemon.data_dir / "mailcore.sqlite"))
        rows = c.execute("select count(*), count(distinct m.queue_id) from mailapi_mail m "
                         "join queue_messages q on q.id = m.queue_id "
                         "where m.status = 'sent'").fetchone()
        outbox_left = c.execute("select count(*) from mailapi_mail where status = 'outbox'"
                                ).fetchone()[0]
        c.close()
        self.assertEqual(rows[0], rows[1])
        self.assertEqual(outbox_left, 0)
        # At the sink, a kill can still cost what SMTP itself leaves open: a transaction whose
        # final dot was sent but whose 250 was not read yet (at most one per connection, so
        # hop_concurrency per kill; the results journal closes every wider window).
        self.assertLessEqual(duplicates, kills * QueueSettings().hop_concurrency)


class LocalDeliveryCrashTests(TestCase):
    timeout = 180

    async def test_every_250_for_a_hosted_mailbox_is_stored_once_across_kill_9(
            self) -> None:
        """Mail for a hosted mailbox, 250'd by the SMTP server, is stored in it once (its
        message file written and fsynced before the row that names it and the queue's
        record commit together) however the daemon is killed meanwhile."""
        listener = await TCP4ServerEndpoint(get_reactor(), 0, interface="127.0.0.1").listen(
            SinkFactory(SinkState()))
        self.addCleanup(listener.stopListening)
        daemon = Daemon(tempdir_for(self), queue={"poll_interval": 0.5})
        prepare(daemon, listener.getHost().port)
        await daemon.start()
        self.addCleanup(daemon.stop)
        n = 120
        accepted: set[str] = set()

        def send(i: int) -> bool | None:
            """True: 250; False: refused or cut off mid-transaction (never retried); None:
            the daemon does not listen (it is being killed), so nothing was sent."""
            attachment = ("QUJD" * 19 + "\r\n") * 100  # 5.7 KB, and an i of its own
            message = (f"From: far@away.test\r\nTo: {BOB}\r\nSubject: m{i}\r\n"
                       "Content-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n"
                       f"Content-Type: text/plain\r\n\r\nbody {i}\r\n--B\r\n"
                       "Content-Type: application/octet-stream\r\n"
                       f"Content-Disposition: attachment; filename=a{i}.bin\r\n"
                       "Content-Transfer-Encoding: base64\r\n\r\n"
                       f"{attachment}{i:04d}\r\n--B--\r\n").encode()
            try:
                with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=30) as s:
                    s.sendmail("far@away.test", [BOB], message)
                    return True
            except ConnectionRefusedError:
                return None
            except (smtplib.SMTPException, OSError):
                return False  # cut off mid-transaction: never retried

        async def one(i: int) -> None:
            for _ in range(100):  # until the daemon listens again (it is being killed)
                sent = await threads.deferToThread(send, i)
                if sent is not None:
                    break
                await sleep(0.1)
            if sent:
                accepted.add(f"m{i}")

        lock = defer.DeferredSemaphore(6)
        sending = defer.gatherResults([lock.run(one, i) for i in range(n)])
        kills = 0
        for mark in (n // 3, 2 * n // 3):
            while len(accepted) < mark and not sending.called:
                await sleep(0.01)
            daemon.kill()
            await daemon.stop()
            kills += 1
            await daemon.start()
        await sending
        self.assertEqual(kills, 2)
        import sqlite3
        reactor = get_reactor()
        deadline = reactor.seconds() + 60
        while True:
            c = sqlite3.connect(str(daemon.data_dir / "mailcore.sqlite"))
            rows = c.execute("select subject, raw_sha256 from mailapi_mail "
                             "where status = 'inbox'").fetchall()
            parts = c.execute("select a.sha256 from mailapi_attachments a join mailapi_mail m "
                              "on m.id = a.mail_id where m.status = 'inbox'").fetchall()
            c.close()
            if accepted <= {s for s, _ in rows} or reactor.seconds() > deadline:
                break
            await sleep(0.2)
        subjects = [s for s, _ in rows]
        print(f"\n  {kills} kills, {len(accepted)} of {n} got 250, {len(rows)} stored")
        self.assertEqual(sorted(accepted - set(subjects)), [])
        self.assertEqual(len(subjects), len(set(subjects)))  # none stored twice
        files = daemon.data_dir / "mailapi" / "files"
        for sha256 in [h for _, h in rows] + [h for (h,) in parts]:
            data = (files / sha256[:2] / sha256).read_bytes()
            self.assertEqual(hashlib.sha256(data).hexdigest(), sha256)
