"""One user's e-mail may not be another's username (a login or a grant names a user by
either). The check reads before it writes, so on PostgreSQL (READ COMMITTED) two users
made at once each passed it unseen by the other; SQLite's writers take turns."""

from __future__ import annotations

import threading
from typing import Any

from sqlalchemy import event, func, select
from twisted.internet import threads
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from mailcore.identity import Identity
from mailcore.store.schema import users
from mailcore.workers import CpuPool
from tests.support.db import DatabaseMixin
from tests.support.reactor import get_reactor


class PostgresNameRaceTests(DatabaseMixin, TestCase):
    backend = "postgresql"
    timeout = 120

    async def test_an_email_made_meanwhile_equal_to_a_new_username_is_refused(self) -> None:
        db = await self.open_database()
        cpu = CpuPool.for_tests()
        identity = Identity(db, get_reactor(), cpu)
        other_done = threading.Event()
        outcomes: list[str] = []
        fired = False

        def other_user_meanwhile(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            # Once the first user's row is written (not yet committed): another request
            # makes a user whose e-mail is the first one's username, given two seconds.
            nonlocal fired
            if fired or not statement.startswith("INSERT INTO users"):
                return
            fired = True

            def make() -> None:
                done = Deferred.fromCoroutine(
                    identity.create_user("dave", "carol@example.test"))
                done.addCallbacks(lambda _: outcomes.append("made"),
                                  lambda f: outcomes.append(f.getErrorMessage()))
                done.addBoth(lambda _: other_done.set())

            get_reactor().callFromThread(make)  # type: ignore[attr-defined]
            other_done.wait(2.0)

        event.listen(db.engine, "after_cursor_execute", other_user_meanwhile)
        try:
            await identity.create_user("carol@example.test", "carol2@example.test")
        finally:
            event.remove(db.engine, "after_cursor_execute", other_user_meanwhile)
        await threads.deferToThread(other_done.wait, 30.0)
        self.assertEqual(outcomes, ["A user with that email already exists."])
        taken = await db.read("taken", lambda conn: conn.execute(
            select(func.count()).select_from(users)
            .where(func.lower(users.c.email) == "carol@example.test")).scalar())
        self.assertEqual(taken, 0)
