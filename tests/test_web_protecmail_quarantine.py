"""Protecmail's quarantine API: listing (pagination as the seed, newest first, own domains and
addresses only, bad start/count), release (once, through the queue, 409 the second time,
404 for unknown or another user's ident, exactly once under concurrent requests, still
releasable after a crash before the queue committed it)."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from mailcore.gateway import quarantine as quarantine_module
from mailcore.gateway.quarantine import ALREADY, MISSING, RELEASED
from mailcore.store.schema import quarantine
from tests.support.db import engine_query_plans, full_scans, transaction_answers
from tests.support.quarantine import GTUBE, Gateway, message, stopper


class _NeverCommits:
    """A spool whose commit never comes: the process is killed before it does."""

    async def accept(self, *args: Any, **kwargs: Any) -> None:
        await defer.Deferred()


class QuarantineApiTests(TestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        self.gw = Gateway()
        self.addCleanup(stopper(self.gw))
        self.alice = await self.gw.owner("alice")
        self.key = await self.gw.web.credential(self.alice)
        self.bob = await self.gw.owner("bob")
        self.bob_key = await self.gw.web.credential(self.bob)
        await self.gw.domain(self.alice, "q.test", spam_action=0)
        await self.gw.domain(self.bob, "bob.test", spam_action=0)
        for i in range(5):
            rcpt = "ann@q.test" if i % 2 else "joe@q.test"
            await self.gw.send(message(f"spam {i}", GTUBE), rcpt)
            self.gw.clock.advance(61)
        await self.gw.send(message("bob's", GTUBE), "x@bob.test")

    async def get(self, path: str, key: str | None = None) -> tuple[int, Any]:
        status, _, body = await self.gw.web.call(
            "GET", path, headers={"Api-Key": key or self.key})
        return status, body

    async def test_list_newest_first_with_seed_pagination(self) -> None:
        status, body = await self.get("/api/v1/quarantine/q.test/0/2")
        self.assertEqual(status, 200)
        data = body["data"]
        self.assertEqual((data["count"], data["nb_pages"], data["current_page"]), (5, 3, 1))
        self.assertEqual([e["subject"] for e in data["emails"]], ["spam 4", "spam 3"])
        first = data["emails"][0]
        self.assertEqual((first["email"], first["domain"], first["mailfrom"]),
                         ("joe@q.test", "q.test", "spammer@x.test"))
        self.assertRegex(first["date"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00$")
        self.assertRegex(first["ident"], r"^\d{20}$")
        _, body = await self.get("/api/v1/quarantine/q.test/4/2")
        self.assertEqual(body["data"]["current_page"], 3)
        self.assertEqual([e["subject"] for e in body["data"]["emails"]], ["spam 0"])

    async def test_list_by_address(self) -> None:
        _, body = await self.get("/api/v1/quarantine/ann@q.test/0/10")
        self.assertEqual([e["subject"] for e in body["data"]["emails"]], ["spam 3", "spam 1"])
        self.assertEqual(body["data"]["count"], 2)

    async def test_other_users_domain_and_address_are_404(self) -> None:
        for path in ("/api/v1/quarantine/bob.test/0/3", "/api/v1/quarantine/x@bob.test/0/3",
                     "/api/v1/quarantine/nope.test/0/3"):
            status, body = await self.get(path)
            self.assertEqual(status, 404, path)
            self.assertIs(body["success"], False)

    async def test_bad_start_or_count_is_400(self) -> None:
        for path in ("/api/v1/quarantine/q.test/-1/3", "/api/v1/quarantine/q.test/0/0",
                     "/api/v1/quarantine/q.test/x/3", "/api/v1/quarantine/q.test/0/1001"):
            status, body = await self.get(path)
            self.assertEqual(status, 400, path)
            self.assertIs(body["success"], False)

    async def ident(self, subject: str = "spam 4") -> str:
        _, body = await self.get("/api/v1/quarantine/q.test/0/10")
        return next(e["ident"] for e in body["data"]["emails"] if e["subject"] == subject)

    async def test_release_delivers_once_and_second_is_409(self) -> None:
        ident = await self.ident()
        status, body = await self.get(f"/api/v1/quarantine/{ident}")
        self.assertEqual((status, body["success"]), (200, True))
        self.assertEqual(set(body), {"request_id", "success"})
        [(sender, rcpts, got)] = self.gw.delivered()
        self.assertEqual((sender, rcpts), ("spammer@x.test", ["joe@q.test"]))
        self.assertEqual(got, message("spam 4", GTUBE))  # the original bytes, not re-filtered
        status, body = await self.get(f"/api/v1/quarantine/{ident}")
        self.assertEqual((status, body["success"], body["msg"]), (409, False, ALREADY))
        self.assertEqual(len(self.gw.delivered()), 1)

    async def test_a_head_of_the_release_answers_as_it_would_and_releases_nothing(
            self) -> None:
        """HEAD is safe (RFC 9110 9.2.1): `HEAD /api/v1/quarantine/{ident}` (a link checker,
        a proxy's probe, `curl -I`) released the message as the GET does: delivered, and
        the GET that meant it answered 409."""
        ident = await self.ident()

        async def head(key: str | None = None) -> tuple[int, dict[str, list[str]], Any]:
            return await self.gw.web.call("HEAD", f"/api/v1/quarantine/{ident}",
                                          headers={"Api-Key": key or self.key})

        status, headers, body = await head()
        self.assertEqual((status, body), (200, b""))
        self.assertEqual(headers["content-type"], ["application/json; charset=utf-8"])
        self.assertEqual(self.gw.delivered(), [])
        [row] = await self.gw.web.core.db.read("released", lambda c: c.execute(
            quarantine.select().where(quarantine.c.ident == ident)).all())
        self.assertIsNone(row.released_at)
        status, _, _ = await head(self.bob_key)
        self.assertEqual(status, 404)
        status, body = await self.get(f"/api/v1/quarantine/{ident}")
        self.assertEqual(status, 200)
        self.assertEqual(len(self.gw.delivered()), 1)
        status, _, _ = await head()
        self.assertEqual(status, 409)
        self.assertEqual(len(self.gw.delivered()), 1)

    async def test_unknown_or_other_users_ident_is_404(self) -> None:
        ident = await self.ident()
        status, body = await self.get(f"/api/v1/quarantine/{ident}", key=self.bob_key)
        self.assertEqual((status, body["success"]), (404, False))
        status, _ = await self.get("/api/v1/quarantine/12345678901234567890")
        self.assertEqual(status, 404)
        self.assertEqual(self.gw.delivered(), [])

    async def test_concurrent_releases_release_exactly_once(self) -> None:
        ident = await self.ident()
        service = self.gw.core.quarantine
        results = await defer.gatherResults([
            defer.Deferred.fromCoroutine(service.release(ident)) for _ in range(3)
        ])
        self.assertEqual(sorted(results), sorted([RELEASED, ALREADY, ALREADY]))
        self.assertEqual(len(self.gw.delivered()), 1)

    async def test_failed_queueing_undoes_the_claim(self) -> None:
        ident = await self.ident()
        service = self.gw.core.quarantine
        spool, service.spool = service.spool, None
        status, body = await self.get(f"/api/v1/quarantine/{ident}")
        self.assertEqual((status, body["success"]), (503, False))
        service.spool = spool
        status, _ = await self.get(f"/api/v1/quarantine/{ident}")
        self.assertEqual(status, 200)
        self.assertEqual(len(self.gw.delivered()), 1)

    async def test_a_release_cut_off_before_the_queue_commits_leaves_it_releasable(
        self,
    ) -> None:
        # The process dies after the release began and before the spool committed the
        # message: nothing of the release may be in the store, or the message could
        # never be released again ("already released", and nothing queued).
        ident = await self.ident()
        service = self.gw.core.quarantine
        spool, service.spool = service.spool, _NeverCommits()
        cut_off = defer.Deferred.fromCoroutine(service.release(ident))
        self.assertNoResult(cut_off)
        service.spool = spool  # the next start
        status, body = await self.get(f"/api/v1/quarantine/{ident}")
        self.assertEqual((status, body["success"]), (200, True))
        self.assertEqual(len(self.gw.delivered()), 1)
        status, _ = await self.get(f"/api/v1/quarantine/{ident}")
        self.assertEqual(status, 409)

    async def test_a_release_racing_the_purge_is_404(self) -> None:
        # The retention purge deletes the row after the release read it and before the
        # spool's transaction claims it: the message is gone (404), not "already released".
        ident = await self.ident()
        service = self.gw.core.quarantine
        spool = service.spool
        assert spool is not None

        class _PurgedFirst:
            async def accept(self, *args: Any, **kwargs: Any) -> None:
                await service.db.run("purge_one", lambda conn: conn.execute(
                    quarantine.delete().where(quarantine.c.ident == ident)))
                await spool.accept(*args, **kwargs)

        service.spool = _PurgedFirst()  # type: ignore[assignment]
        self.assertEqual(await service.release(ident), MISSING)
        service.spool = spool
        status, body = await self.get(f"/api/v1/quarantine/{ident}")
        self.assertEqual((status, body["success"]), (404, False))
        self.assertEqual(self.gw.delivered(), [])

    async def test_purge_after_retention(self) -> None:
        service = self.gw.core.quarantine
        self.assertEqual(await service.purge(), 0)
        self.gw.clock.advance(30 * 86400 - 200)
        self.assertEqual(await service.purge(), 2)  # the three newest remain + bob's
        _, body = await self.get("/api/v1/quarantine/q.test/0/10")
        self.assertEqual(body["data"]["count"], 3)

    async def test_the_purge_deletes_a_batch_a_transaction_through_its_index(self) -> None:
        """The retention purge holds no long write transaction: PURGE_BATCH rows at most
        each, found through ix_quarantine_created_at (no batch reads the whole table)."""
        service = self.gw.core.quarantine
        self.patch(quarantine_module, "PURGE_BATCH", 2)
        batches = transaction_answers(self, service.db, "quarantine_purge".__eq__)
        self.gw.clock.advance(30 * 86400 + 100)  # every one of the six held is old
        with engine_query_plans(service.db.engine) as plans:
            self.assertEqual(await service.purge(), 6)
        self.assertEqual([n for _, n in batches], [2, 2, 2, 0])
        self.assertEqual(full_scans(plans, "quarantine"), [])
        self.assertTrue([p for p in plans if "ix_quarantine_created_at" in p], plans)
        _, body = await self.get("/api/v1/quarantine/q.test/0/10")
        self.assertEqual(body["data"]["count"], 0)
