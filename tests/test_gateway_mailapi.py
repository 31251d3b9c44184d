"""The Mail API end to end on a real `twistd mailcore` with a byte-exact sink as the next
hop: SMTP into a hosted mailbox lands in its inbox; outbox mail to another hosted mailbox
lands in that inbox; outbox mail to a relayed domain reaches the sink with its headers, no
Bcc field and its attachment intact; 200 messages posted at once arrive in posting
order; the daemon killed with SIGKILL three times while mail is posted and sent (just
after a 202; while a message is held at the next hop, mid-DATA or at its final dot, once
another's 250 is in the daemon's socket unread, or on record in its results journal):
every 201'd draft is there, every 202'd message arrives, in its outbox's order, each handed
to the queue once, and duplicates only where a 250 was never read; and twice while mail for a
hosted mailbox comes in by SMTP: every 250'd message is in the inbox once, its files whole;
a mailbox without room for a message refuses it at RCPT (552 5.2.2)."""

from __future__ import annotations

import email
import email.policy
import hashlib
import json
import smtplib
from collections import Counter
from dataclasses import dataclass, field
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
from tests.support.mailsink import (
    Daemon,
    Received,
    SinkFactory,
    SinkProtocol,
    SinkState,
    done,
    thd_add_domain,
)
from tests.support.reactor import get_reactor
from tests.support.servers import sleep, tempdir_for
from tests.test_gateway_crash import journal_of

BOB = "bob@hosted.test"
JOE = "joe@hosted.test"


def prepare(daemon: Daemon, sink_port: int) -> dict[str, str]:
    """Users bob and joe, hosted.test with their mailboxes, customer.test relayed to the
    sink; returns each user's Mail API token (blocks: before the daemon starts)."""
    from twisted.internet.task import Clock

    daemon.copy_migrated_store()
    db = Database(daemon.db_url, None, synchronous=True)  # type: ignore[arg-type]
    db.migrate_blocking()  # at head already when copied
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
        # Mail accepted before the queue has started is left to its sweeper, within
        # poll_interval: 0.5 s, not the 5 s default.
        self.daemon = Daemon(tempdir_for(self), queue={"hop_concurrency": 1,
                                                       "poll_interval": 0.5},
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


class TrapSink(SinkProtocol):
    """The byte-exact sink, armed to kill the daemon at chosen moments of delivery (see
    TrapState). A "hold" trap stops answering the first of joe's messages not taken yet to
    reach its moment ("data": its Subject line read, mid-DATA; "dot": the final dot read):
    it is not taken, and nothing more on its connection is answered. (Not one taken
    already: the first kill, at a random moment, may leave a message taken whose 250 the
    daemon never read, sent again after the restart: a second copy SMTP allows, which a
    hold would count as the held message's.) The kill trap then waits for the first of
    bob's messages not taken yet to reach its own: "250" (taken, and its 250 put in the
    daemon's socket, not read yet) or "recorded" (taken, and the daemon's results journal
    holds its delivery)."""

    state: TrapState

    # A held message: no line of this connection is answered any more. It reads on rather
    # than pausing (pauseProducing): a paused connection with nothing to write is out of the
    # reactor's sets, and with nothing else holding it the garbage collector frees it and
    # closes its socket, which the daemon reads as the next hop hanging up (ConnectionDone,
    # the message deferred for 5 minutes) before the kill the test waits for.
    swallow = False

    def lineReceived(self, line: bytes) -> None:
        state = self.state
        if self.swallow:
            return
        if self._in_data and state.hold is not None and self.mail_from == JOE:
            if (state.hold == "data" and line.startswith(b"Subject:")) or (
                    state.hold == "dot" and line == b"."):
                data = b"".join(self._data) + line + b"\r\n"
                if subject_of(data) not in state.subjects():
                    state.held = (state.hold, data)
                    state.hold = None
                    self.swallow = True
                    return
        if (self._in_data and line == b"." and state.trap is not None and
                state.held is not None and self.mail_from == BOB and
                subject_of(b"".join(self._data)) not in state.subjects()):
            self._in_data = False
            msg = Received(self.mail_from, list(self.rcpts), b"".join(self._data))
            self._data = []
            self._reset()
            state.messages.append(msg)
            reply = b"250 2.0.0 Ok: queued\r\n"
            if state.trap == "250":
                # Straight into the socket, then the kill: the daemon cannot have read it.
                self.transport.getHandle().send(reply)  # type: ignore[union-attr]
            else:
                self.transport.write(reply)  # type: ignore[union-attr]
            state.fire(msg)
            return
        super().lineReceived(line)


@dataclass
class TrapState(SinkState):
    hold: str | None = None
    held: tuple[str, bytes] | None = None
    trap: str | None = None
    kill: Any = None  # called with the trap and bob's message it caught
    trapped: list[tuple[str, str]] = field(default_factory=list)

    def subjects(self) -> set[str]:
        return {subject_of(m.data) for m in self.messages}

    def fire(self, msg: Received) -> None:
        assert self.trap is not None and self.held is not None
        self.trapped += [(self.held[0], subject_of(self.held[1])),
                         (self.trap, subject_of(msg.data))]
        trap, self.trap, self.held = self.trap, None, None
        self.kill(trap, msg)


class TrapFactory(SinkFactory):
    def buildProtocol(self, addr: Any) -> SinkProtocol:
        return TrapSink(self.state)


def subject_of(data: bytes) -> str:
    return str(email.message_from_bytes(data)["Subject"])


class OutboxKillNineTests(TestCase):
    """bob and joe post mail to their outboxes (and drafts) while the daemon is killed
    (SIGKILL) three times and restarted: just after a 202; then, each time, while joe's
    message is held at the next hop (halfway through its DATA; at its final dot,
    unanswered), once bob's next message has its 250 in the daemon's socket, unread; once
    the daemon's results journal holds bob's message's delivery. Every 201'd draft is
    there; every 202'd mail (and any a post cut off by a kill stored) arrives; none is left
    in the outbox; each was handed to the queue once; each mailbox's mail arrives in its
    outbox's order (each mail's first copy); joe's held mail arrives once, and so does
    bob's mail on record; duplicates stay within what SMTP leaves open (a 250 never
    read)."""

    timeout = 180

    async def test_every_202_is_sent_once_across_kill_9(self) -> None:
        import sqlite3

        state = TrapState()
        listener = await TCP4ServerEndpoint(get_reactor(), 0, interface="127.0.0.1").listen(
            TrapFactory(state))
        self.addCleanup(listener.stopListening)
        daemon = Daemon(tempdir_for(self), queue={"poll_interval": 0.5},
                        web={"mailapi_user_rate": "1000/second"})
        tokens = prepare(daemon, listener.getHost().port)
        await daemon.start()
        self.addCleanup(daemon.stop)
        await daemon.process.wait_for_port(daemon.http_port, timeout=30)
        pool = HTTPConnectionPool(get_reactor(), persistent=False)
        http = HTTPClient(Agent(get_reactor(), pool=pool))
        database = str(daemon.data_dir / "mailcore.sqlite")
        n = 120
        accepted: list[str] = []
        drafts: list[str] = []
        killed: list[defer.Deferred[None]] = []
        on_record: list[str] = []

        def kill_now() -> None:
            daemon.kill()
            killed[-1].callback(None)

        def kill(trap: str, msg: Received) -> None:
            if trap == "250":
                kill_now()
                return
            # Once the journal holds the delivery (the daemon writes it as it reads the 250).
            c = sqlite3.connect(database)
            [(queue_id,)] = c.execute("select queue_id from mailapi_mail where subject = ?",
                                      (subject_of(msg.data),)).fetchall()
            c.close()

            async def when_on_record() -> None:
                for _ in range(2000):
                    if queue_id.encode() in journal_of(daemon):
                        on_record.append(subject_of(msg.data))
                        break
                    await sleep(0.001)
                kill_now()

            defer.Deferred.fromCoroutine(when_on_record())

        state.kill = kill

        async def post(i: int) -> None:
            who, status = ("bob", "joe")[i % 2], "draft" if i % 10 == 9 else "outbox"
            headers: dict[bytes | str, bytes | str] = {
                "Auth-Key": tokens[who], "Content-Type": "application/json"}
            for _ in range(300):  # until the daemon listens again (it is being killed)
                try:
                    response = await http.request(
                        "POST", f"http://127.0.0.1:{daemon.http_port}/api/v1/mail/",
                        headers=headers,
                        data=json.dumps({"status": status, "to": "x@customer.test",
                                         "subject": f"n{i}"}).encode())
                    await treq.content(response)
                except ConnectError:
                    await sleep(0.05)
                    continue
                except Exception:
                    return  # cut off mid-request: it may or may not be stored; never retried
                self.assertEqual(response.code, 201 if status == "draft" else 202)
                (drafts if status == "draft" else accepted).append(f"n{i}")
                if len(accepted) == 15 and not killed:
                    killed.append(defer.Deferred())
                    kill_now()  # just after a 202
                return

        lock = defer.DeferredSemaphore(10)
        posting = defer.gatherResults([lock.run(post, i) for i in range(n)])
        for hold, trap in ((None, None), ("data", "250"), ("dot", "recorded")):
            if trap is not None:
                killed.append(defer.Deferred())
                state.hold, state.trap = hold, trap
            while not killed:
                await sleep(0.01)
            await killed[-1]
            await daemon.stop()
            await daemon.start()
        await posting
        self.assertEqual(len(killed), 3)

        reactor = get_reactor()
        deadline = reactor.seconds() + 60

        def arrived(sender: str | None = None) -> list[str]:
            return [subject_of(m.data) for m in state.messages
                    if sender in (None, m.mail_from)]

        def to_send() -> set[str]:
            """Every mail stored to be sent: the 202'd ones, and those whose post was cut off
            after they were stored."""
            c = sqlite3.connect(database)
            stored = {s for (s,) in c.execute(
                "select subject from mailapi_mail where status in ('outbox', 'sent')")}
            c.close()
            return stored | set(accepted)

        while not to_send() <= set(arrived()) and reactor.seconds() < deadline:
            await sleep(0.1)
        got = arrived()
        missing = sorted(to_send() - set(got))
        duplicates = len(got) - len(set(got))
        print(f"\n  {len(killed)} kills, {len(accepted)} of {n} posts got 202, {len(got)} "
              f"arrived, {duplicates} duplicates; trapped {state.trapped}")
        self.assertEqual(missing, [])
        c = sqlite3.connect(database)
        rows = c.execute("select count(*), count(distinct m.queue_id) from mailapi_mail m "
                         "join queue_messages q on q.id = m.queue_id "
                         "where m.status = 'sent'").fetchone()
        outbox_left = c.execute("select count(*) from mailapi_mail where status = 'outbox'"
                                ).fetchone()[0]
        order = {who: [s for (s,) in c.execute(
            "select m.subject from mailapi_mail m join mailboxes b on b.id = m.mailbox_id "
            "where m.status = 'sent' and b.address = ? order by m.outbox_seq", (who,))]
            for who in (BOB, JOE)}
        stored_drafts = {s for (s,) in c.execute(
            "select subject from mailapi_mail where status = 'draft'")}
        c.close()
        self.assertEqual(sorted(set(drafts) - stored_drafts), [])
        # Each outbox message was handed to the queue once (its queue id is the key).
        self.assertEqual(rows[0], rows[1])
        self.assertEqual(outbox_left, 0)
        # First in, first out across the kills, each mailbox's mail (its first copies).
        for who in (BOB, JOE):
            self.assertEqual(list(dict.fromkeys(arrived(who))), order[who])
        copies = Counter(got)
        trapped = dict(state.trapped)
        # Not taken by the next hop (no 250 sent): it comes again, once. Its delivery on
        # record in the journal when the daemon died: it never comes again.
        self.assertEqual((copies[trapped["data"]], copies[trapped["dot"]]), (1, 1))
        self.assertEqual(on_record, [trapped["recorded"]])
        self.assertEqual(copies[trapped["recorded"]], 1)
        # A 250 the daemon never read: the one window SMTP leaves open (a copy more at most).
        self.assertLessEqual(copies[trapped["250"]], 2)
        self.assertLessEqual(duplicates, len(killed) * QueueSettings().hop_concurrency)


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
