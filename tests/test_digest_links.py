"""Quarantine digests on a Clock: one per recipient with new mail, templates, plan re-check,
and their release links (once; used, expired and tampered links refused; GET never
releases)."""

from __future__ import annotations

import email
import email.policy
import re
import stat
import threading
from typing import Any

import sqlalchemy as sa
from twisted.internet import defer
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from mailcore.gateway.quarantine import (
    MAX_DIGEST_ITEMS,
    MAX_ITEM_SUBJECT,
    LinkSigner,
    ToKeep,
    render,
)
from mailcore.store.schema import domains
from mailcore.workers import CpuPool
from tests.support.pages import form_credentials
from tests.support.quarantine import GTUBE, Gateway, message, stopper
from tests.support.reactor import get_reactor

LINK = re.compile(r"https://([^/\s]+)/quarantine/release/(\S+)")


class _DiesAfterCommit:
    """The spool of a process killed right after its commit of a message."""

    def __init__(self, spool: Any) -> None:
        self.spool = spool

    async def accept(self, *args: Any, **kwargs: Any) -> None:
        await self.spool.accept(*args, **kwargs)
        await defer.Deferred()


class DigestTests(TestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        self.gw = Gateway()
        self.addCleanup(stopper(self.gw))
        self.user = await self.gw.owner("alice")
        await self.gw.core.identity.set_plan(self.user.id, "standard")
        await self.gw.domain(self.user, "q.test", spam_action=0, send_resume=True)
        await self.gw.send(message("first", GTUBE), "ann@q.test")
        await self.gw.send(message("second", GTUBE), "ann@q.test")
        await self.gw.send(message("third", GTUBE), "joe@q.test")
        self.gw.core.quarantine.startService()

    def digests(self) -> list[tuple[list[str], email.message.Message]]:
        return [(rcpts, email.message_from_bytes(body))
                for sender, rcpts, body in self.gw.delivered() if sender == ""]

    def tick(self) -> None:
        self.gw.clock.advance(self.gw.core.quarantine.settings.digest_interval)

    async def test_one_digest_per_recipient_then_only_new_mail(self) -> None:
        self.tick()
        got = {tuple(r): m for r, m in self.digests()}
        self.assertEqual(set(got), {("ann@q.test",), ("joe@q.test",)})
        ann = got[("ann@q.test",)]
        self.assertEqual(ann["Subject"], "Quarantine summary for ann@q.test: 2 new message(s)")
        text = ann.get_payload(decode=True).decode()  # type: ignore[union-attr]
        self.assertIn("first", text)
        self.assertEqual(len(LINK.findall(text)), 2)
        self.tick()
        self.assertEqual(len(self.digests()), 2)  # nothing new: no digest
        await self.gw.send(message("fourth", GTUBE), "ann@q.test")
        self.tick()
        self.assertEqual(len(self.digests()), 3)

    async def flood(self, count: int, subject: str) -> None:
        """Quarantine `count` messages with `subject` for ann@q.test (as a spam flood)."""
        dom = self.gw.core.domains.lookup("q.test")
        assert dom is not None
        held = [ToKeep(f"QFLOOD{subject}{n}", "spammer@x.test", "ann@q.test", dom.id, "spam",
                       "GTUBE") for n in range(count)]
        await self.gw.core.quarantine.keep(held, message(subject, GTUBE))

    async def test_a_flood_lists_the_newest_and_counts_the_rest_once(self) -> None:
        """Every held message of an address was listed (10,000 made a digest of 1.9 MB,
        50,000 one of 9 MB built in 2 s on the reactor); a digest lists the newest
        MAX_DIGEST_ITEMS and counts the others, which no later digest lists again."""
        await self.flood(5 * MAX_DIGEST_ITEMS, "flood")
        await self.flood(1, "newest")
        self.tick()
        ann = dict((tuple(r), m) for r, m in self.digests())[("ann@q.test",)]
        total = 5 * MAX_DIGEST_ITEMS + 3
        self.assertEqual(ann["Subject"],
                         f"Quarantine summary for ann@q.test: {total} new message(s)")
        text = ann.get_payload(decode=True).decode()  # type: ignore[union-attr]
        self.assertEqual(len(LINK.findall(text)), MAX_DIGEST_ITEMS)
        self.assertLess(len(ann.as_bytes()), 300 * MAX_DIGEST_ITEMS)
        self.assertIn("newest", text)
        self.assertNotIn("first", text)  # the oldest: counted, not listed
        self.assertIn(f"and {total - MAX_DIGEST_ITEMS:,} older message(s)", text)
        self.tick()
        self.assertEqual(len(self.digests()), 2)  # everything was listed or counted
        await self.gw.send(message("fourth", GTUBE), "ann@q.test")
        self.tick()
        later = self.digests()[2][1]
        self.assertEqual(later["Subject"],
                         "Quarantine summary for ann@q.test: 1 new message(s)")

    async def test_long_subjects_are_cut_in_a_digest(self) -> None:
        """A spammer's Subject may be as long as the header block a message keeps (64 KB):
        MAX_DIGEST_ITEMS of them made a digest of 17 MB, which a next hop's size limit
        refuses (the recipient never saw the digest), of lines longer than 998 octets."""
        dom = self.gw.core.domains.lookup("q.test")
        assert dom is not None
        await self.gw.core.quarantine.keep(
            [ToKeep(f"QLONG{n}", "spammer@x.test", "ann@q.test", dom.id, "spam", "GTUBE")
             for n in range(MAX_DIGEST_ITEMS)], message("x" * 60_000, GTUBE))
        self.tick()
        ann = dict((tuple(r), raw) for _s, r, raw in self.gw.delivered())[("ann@q.test",)]
        self.assertLess(len(ann), 500 * MAX_DIGEST_ITEMS)
        text = email.message_from_bytes(ann).get_payload(decode=True).decode()  # type: ignore[union-attr]
        line = "Subject: " + "x" * (MAX_ITEM_SUBJECT - 1) + "\u2026\r\n"
        self.assertEqual(text.count(line), MAX_DIGEST_ITEMS)
        self.assertEqual(len(LINK.findall(text)), MAX_DIGEST_ITEMS)
        self.assertLessEqual(max(len(line) for line in ann.split(b"\r\n")), 998)

    async def test_one_digest_for_every_spelling_of_an_address(self) -> None:
        # Held for "ünal" composed, decomposed and in capitals (as senders spelled it): one
        # recipient (the quarantine's email_key), so one digest listing the three.
        dom = self.gw.core.domains.lookup("q.test")
        assert dom is not None
        for n, spelling in enumerate(["\u00fcnal@q.test", "u\u0308nal@q.test",
                                      "\u00dcNAL@q.test"]):
            await self.gw.core.quarantine.keep(
                [ToKeep(f"QSPELL{n}", "spammer@x.test", spelling, dom.id, "spam", "GTUBE")],
                message(f"spelling {n}", GTUBE))
        self.assertEqual(await self.gw.core.quarantine.send_digests(), 3)  # ann, joe, ünal
        self.gw.clock.advance(1)
        [(rcpts, digest)] = [(r, m) for r, m in self.digests()
                             if r not in (["ann@q.test"], ["joe@q.test"])]
        self.assertEqual(rcpts, ["\u00fcnal@q.test"])  # the oldest row's spelling
        text = digest.get_payload(decode=True).decode()  # type: ignore[union-attr]
        self.assertEqual(len(LINK.findall(text)), 3)
        self.assertEqual(await self.gw.core.quarantine.send_digests(), 0)

    async def test_a_digest_queued_just_before_a_crash_is_not_sent_again(self) -> None:
        # The process dies right after the spool committed the first digest: the next run
        # sends the other recipient's digest, and not the first one a second time.
        service = self.gw.core.quarantine
        spool, service.spool = service.spool, _DiesAfterCommit(service.spool)
        cut_off = defer.Deferred.fromCoroutine(service.send_digests())
        self.assertNoResult(cut_off)
        service.spool = spool  # the next start
        self.assertEqual(await service.send_digests(), 1)
        self.gw.clock.advance(1)
        self.assertEqual(sorted(r for r, _ in self.digests()),
                         [["ann@q.test"], ["joe@q.test"]])

    async def test_digests_are_built_off_the_reactor_thread(self) -> None:
        service = self.gw.core.quarantine
        service.cpu = CpuPool(get_reactor())
        self.addCleanup(service.cpu.stop)
        threads: list[threading.Thread] = []
        build = service.digest_message

        def spy(*args: Any, **kwargs: Any) -> bytes:
            threads.append(threading.current_thread())
            return build(*args, **kwargs)

        service.digest_message = spy  # type: ignore[method-assign]
        self.assertEqual(await service.send_digests(), 2)
        self.assertEqual(len(threads), 2)
        self.assertNotIn(threading.main_thread(), threads)

    async def test_free_plan_gets_no_digest(self) -> None:
        await self.gw.core.identity.set_plan(self.user.id, "free")
        self.tick()
        self.assertEqual(self.digests(), [])

    async def test_a_disabled_owner_gets_no_digest_until_it_is_enabled(self) -> None:
        """`mailcore user disable` stops the account's digests; its held mail is kept
        undigested and listed in the first digest once the user is enabled."""
        await self.gw.core.identity.set_active(self.user.id, False)
        self.tick()
        self.tick()
        self.assertEqual(self.digests(), [])
        await self.gw.core.identity.set_active(self.user.id, True)
        self.tick()
        got = {tuple(r): m for r, m in self.digests()}
        self.assertEqual(set(got), {("ann@q.test",), ("joe@q.test",)})
        self.assertEqual(got[("ann@q.test",)]["Subject"],
                         "Quarantine summary for ann@q.test: 2 new message(s)")

    async def test_agency_templates_reply_to_and_link_host(self) -> None:
        await self.gw.core.identity.set_plan(self.user.id, "agency")
        await self.gw.core.domains.update("q.test", {
            "resume_template_subject": "{count} held for {email} {nope} {email.__class__}",
            "resume_template_body": "Items:\n{items}",
            "resume_template_resume": "* {subject} {link}\n",
            "resume_link_hostname": "links.q.test", "resume_reply_to": "help@q.test",
        })
        self.tick()
        ann = dict((tuple(r), m) for r, m in self.digests())[("ann@q.test",)]
        self.assertEqual(ann["Subject"], "2 held for ann@q.test {nope} {email.__class__}")
        self.assertEqual(ann["Reply-To"], "help@q.test")
        text = ann.get_payload(decode=True).decode()  # type: ignore[union-attr]
        text = text.replace("\r\n", "\n")
        self.assertTrue(text.startswith("Items:\n* first https://links.q.test/"), text)

    async def keep_for(self, rcpt: str, subject: bytes, sender: str = "spammer@x.test"
                       ) -> None:
        """Quarantine a message with the raw Subject `subject` for `rcpt` at q.test (any
        local part: a domain without an address list takes every one)."""
        dom = self.gw.core.domains.lookup("q.test")
        assert dom is not None
        self.seq = getattr(self, "seq", 0) + 1
        body = (b"From: s@x.test\r\nSubject: " + subject + b"\r\nMIME-Version: 1.0\r\n"
                b"Content-Type: text/plain\r\n\r\n" + GTUBE + b"\r\n")
        await self.gw.core.quarantine.keep(
            [ToKeep(f"QHOSTILE{self.seq}", sender, rcpt, dom.id, "spam", "GTUBE")], body)

    def assertWellFormed(self, raw: bytes) -> email.message.Message:
        """`raw` parses under policy.strict, each line at most 998 octets, one To and one
        Subject, no Bcc: a digest a spammer's text could not reshape."""
        parsed = email.message_from_bytes(raw, policy=email.policy.strict)
        self.assertLessEqual(max(len(line) for line in raw.split(b"\r\n")), 998)
        self.assertEqual(parsed.defects, [])
        for name in ("To", "Subject", "From", "Date", "Message-ID"):
            self.assertEqual(len(parsed.get_all(name, [])), 1, name)
        self.assertIsNone(parsed["Bcc"])
        return parsed

    async def test_an_address_that_decodes_to_a_line_break_stops_no_digest(self) -> None:
        """A domain without an address list takes any local part: one that is an RFC 2047
        word decoding to CR LF made the digest unbuildable (the Subject and To fields
        holding it were refused), and the exception ended the run: every recipient after
        it (this one sorts first) got no digest, run after run."""
        poison = "=?utf-8?b?DQpCY2M6IGV2aWxAeC50ZXN0?=@q.test"
        await self.keep_for(poison, b"poisoned")
        self.tick()
        got = {tuple(r): raw for _s, r, raw in self.gw.delivered() if _s == ""}
        self.assertEqual(set(got), {(poison,), ("ann@q.test",), ("joe@q.test",)})
        for raw in got.values():
            self.assertWellFormed(raw)
        digest = email.message_from_bytes(got[(poison,)])
        self.assertEqual((digest["To"], digest["Subject"]),
                         ("undisclosed-recipients:;", "Quarantine summary: 1 new message(s)"))
        self.assertIn(b"poisoned", digest.get_payload(decode=True))  # type: ignore[arg-type]
        self.assertEqual(len(self.digests()), 3)
        self.tick()
        self.assertEqual(len(self.digests()), 3)  # digested once, like the others

    async def test_an_address_spelling_an_encoded_word_is_not_decoded(self) -> None:
        # "=?utf-8?q?Your_account_is_closed?=@q.test" was written "Your account is
        # closed@q.test" in the digest's To and Subject.
        spoof = "=?utf-8?q?Your_account_is_closed?=@q.test"
        await self.keep_for(spoof, b"spoof")
        self.tick()
        [raw] = [raw for _s, r, raw in self.gw.delivered() if r == [spoof]]
        digest = self.assertWellFormed(raw)
        self.assertEqual((digest["To"], digest["Subject"]),
                         ("undisclosed-recipients:;", "Quarantine summary: 1 new message(s)"))
        self.assertNotIn(b"Your account", raw.split(b"\r\n\r\n")[0])

    async def store_templates(self, **columns: str) -> None:
        """Set q.test's digest columns in the store as they are (past the checks of
        `domains.update`, as values stored before a check was added)."""
        await self.gw.core.db.run(
            "set_templates", lambda conn: conn.execute(
                sa.update(domains).where(domains.c.name == "q.test").values(**columns)))

    async def test_an_encoded_word_in_a_subject_template_is_the_owners_to_write(
            self) -> None:
        await self.gw.core.identity.set_plan(self.user.id, "agency")
        await self.gw.core.domains.update("q.test", {
            "resume_template_subject": "=?utf-8?q?R=C3=A9sum=C3=A9?= {count} for {email}"})
        self.tick()
        raw = dict((tuple(r), b) for _s, r, b in self.gw.delivered())[("ann@q.test",)]
        ann = email.message_from_bytes(raw, policy=email.policy.default)
        self.assertEqual(ann["Subject"], "R\u00e9sum\u00e9 2 for ann@q.test")

    async def test_templates_that_decode_to_a_line_break_stop_no_digest(self) -> None:
        # An agency domain's Subject template and Reply-To were checked for control
        # characters only (as those stored then still are): an RFC 2047 word decoding to
        # CR LF was refused by the email package, and that ended the run for every
        # recipient after it.
        await self.gw.core.identity.set_plan(self.user.id, "agency")
        await self.store_templates(
            resume_template_subject="=?utf-8?b?DQpCY2M6IGV2aWxAeC50ZXN0?= {count}",
            resume_reply_to="=?utf-8?b?DQpCY2M6IGV2aWxAeC50ZXN0?=@q.test")
        self.tick()
        got = {tuple(r): raw for s, r, raw in self.gw.delivered() if s == ""}
        self.assertEqual(set(got), {("ann@q.test",), ("joe@q.test",)})
        ann = self.assertWellFormed(got[("ann@q.test",)])
        self.assertEqual(ann["Subject"], "Quarantine summary: 2 new message(s)")
        self.assertIsNone(ann["Reply-To"])

    async def test_a_digest_that_cannot_be_built_stops_no_other(self) -> None:
        # The digest that cannot be built is logged once and counts as done for the run,
        # which finishes: resuming it (at start and at every purge sweep) rebuilt it and
        # logged a traceback each time until the next run, which tries it again.
        service = self.gw.core.quarantine
        build = service.digest_message

        def fails_for_ann(items: Any, **kwargs: Any) -> bytes:
            if items[0].email == "ann@q.test":
                raise ValueError("unbuildable")
            return build(items, **kwargs)

        service.digest_message = fails_for_ann  # type: ignore[method-assign]
        self.tick()
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertEqual([r for r, _m in self.digests()], [["joe@q.test"]])
        self.assertEqual(await service.resume_digests(), 0)  # the run is finished
        self.assertEqual(self.flushLoggedErrors(ValueError), [])
        service.digest_message = build  # type: ignore[method-assign]
        self.tick()  # the next run
        self.gw.clock.advance(1)
        self.assertEqual(sorted(r for r, _m in self.digests()),
                         [["ann@q.test"], ["joe@q.test"]])

    async def test_a_run_resumed_for_another_does_not_build_it_again(self) -> None:
        # Joe's digest fails to be queued, so the run is resumed: ann's, which could not be
        # built, is done for the run and is neither built nor logged again.
        service = self.gw.core.quarantine
        build, accept = service.digest_message, service.spool.accept
        built: list[str] = []

        def fails_for_ann(items: Any, **kwargs: Any) -> bytes:
            built.append(items[0].email)
            if items[0].email == "ann@q.test":
                raise ValueError("unbuildable")
            return build(items, **kwargs)

        async def fails_once_for_joe(queue_id: str, envelope: Any, *args: Any,
                                     **kwargs: Any) -> Any:
            if envelope.recipients[0].address == "joe@q.test" and "joe" not in failed:
                failed.append("joe")
                raise OSError("disk full")
            return await accept(queue_id, envelope, *args, **kwargs)

        failed: list[str] = []
        service.digest_message = fails_for_ann  # type: ignore[method-assign]
        self.patch(service.spool, "accept", fails_once_for_joe)
        self.tick()
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual(await service.resume_digests(), 1)  # joe's
        self.assertEqual(self.flushLoggedErrors(ValueError), [])
        self.assertEqual(built, ["ann@q.test", "joe@q.test", "joe@q.test"])
        self.assertEqual(await service.resume_digests(), 0)  # finished
        self.gw.clock.advance(1)
        self.assertEqual([r for r, _m in self.digests()], [["joe@q.test"]])

    async def release_link(self) -> tuple[str, str]:
        self.tick()
        joe = next(m for r, m in self.digests() if r == ["joe@q.test"])
        text = joe.get_payload(decode=True).decode()  # type: ignore[union-attr]
        [(host, token)] = LINK.findall(text)
        return host, token

    async def test_link_releases_once_get_never_releases(self) -> None:
        _host, token = await self.release_link()
        path = f"/quarantine/release/{token}"
        before = len(self.gw.delivered())
        status, _headers, body = await self.gw.web.call("GET", path)
        self.assertEqual(status, 200)
        self.assertIn(b"third", body)
        self.assertIn(b'method="post"', body)
        cookies, form = await form_credentials(self.gw.web, path)
        self.assertEqual(len(self.gw.delivered()), before)  # the GETs released nothing
        status, _, body = await self.gw.web.call("POST", path, cookies=cookies, data=form)
        self.assertEqual(status, 200)
        released = self.gw.delivered()[before:]
        self.assertEqual([(s, r) for s, r, _b in released], [("spammer@x.test", ["joe@q.test"])])
        status, _, body = await self.gw.web.call("POST", path, cookies=cookies, data=form)
        self.assertEqual(status, 409)
        self.assertIn(b"used already", body)
        self.assertEqual(len(self.gw.delivered()), before + 1)

    async def test_the_logs_never_show_a_release_token(self) -> None:
        _host, token = await self.release_link()
        events: list[dict[str, Any]] = []
        observe: Any = events.append
        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        path = f"/quarantine/release/{token}"
        cookies, form = await form_credentials(self.gw.web, path)  # the GET
        for _ in range(2):
            await self.gw.web.call("POST", path, cookies=cookies, data=form)
        access = [e for e in events if e.get("log_namespace") == "mailcore.web.access"]
        self.assertEqual([(e["method"], e["status"]) for e in access],
                         [("GET", 200), ("POST", 200), ("POST", 409)])
        for event in access:
            self.assertEqual(event["target"], "/quarantine/release/[redacted]")
        for event in events:
            self.assertNotIn(token, formatEvent(event) or "")
            self.assertNotIn(token, repr(event))

    async def test_expired_and_tampered_links_are_refused(self) -> None:
        _host, token = await self.release_link()
        ident, expiry, mac = token.split(".")
        forged = f"{ident}.{int(expiry) + 86400}.{mac}"
        status, _, _ = await self.gw.web.call("POST", f"/quarantine/release/{forged}")
        self.assertEqual(status, 404)
        self.gw.clock.advance(self.gw.core.quarantine.settings.link_ttl + 1)
        for method in ("GET", "POST"):
            status, _, body = await self.gw.web.call(method, f"/quarantine/release/{token}")
            self.assertEqual(status, 404)
            self.assertIn(b"not valid", body)
        self.assertEqual([r for s, r, _b in self.gw.delivered() if s], [])


class LinkKeyTests(TestCase):
    def test_key_file_is_made_with_mode_0600_and_reused(self) -> None:
        from pathlib import Path

        path = Path(self.mktemp()) / "quarantine.key"
        first = LinkSigner.from_file(path)
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)
        self.assertEqual(LinkSigner.from_file(path).key, first.key)
        token = first.sign("01012024000000123456", 100)
        self.assertEqual(first.verify(token, 50), "01012024000000123456")
        self.assertIsNone(LinkSigner(b"k" * 32).verify(token, 50))

    def test_render_is_plain_substitution(self) -> None:
        self.assertEqual(render("{a} {b} {a.x} {0}", {"a": "1"}), "1 {b} {a.x} {0}")
