"""The database server's clock: the daemon's services (built by mailcore.service.build_core)
read PostgreSQL's clock, so that a node whose own clock is minutes ahead takes no lease
another node still holds, and the offset is measured again while the daemon runs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from mailcore.config import Config
from mailcore.core import Core
from mailcore.service import build_core
from mailcore.store.dbclock import ClockFollower, DatabaseTime
from tests.support.db import open_database
from tests.support.logs import logged
from tests.support.pg import create_test_database
from tests.support.reactor import get_reactor
from tests.support.servers import tempdir_for

AHEAD = 300.0  # a node's clock five minutes fast


class SkewedReactor:
    """The test's reactor with its clock `ahead` seconds fast (a node whose clock is off);
    everything else is the reactor's."""

    def __init__(self, reactor: Any, ahead: float) -> None:
        self._reactor = reactor
        self._ahead = ahead

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)

    def seconds(self) -> float:
        return float(self._reactor.seconds()) + self._ahead


def warnings_of(test: TestCase) -> list[str]:
    """The clock warnings logged from now on in `test`."""
    return logged(test, lambda event: "clock" in (event.get("log_format") or ""))


class DaemonClockTests(TestCase):
    timeout = 120

    async def node(self, url: str | None, name: str, reactor: Any) -> Core:
        """A node's Core as the daemon builds it, on the database `url`."""
        data_dir = Path(tempdir_for(self, f"mailcore-{name}-")) / "var"
        self.addCleanup(os.umask, os.umask(0o077))  # build_core sets 077, as the daemon
        core = build_core(Config(data_dir=data_dir, db_url=url,
                                 sections={"queue": {"node_id": name}}), reactor)
        self.addCleanup(core.cpu.stop)
        await core.db.open()
        self.addCleanup(core.db.close)
        return core

    async def test_a_node_whose_clock_is_ahead_takes_no_lease_another_holds(self) -> None:
        url = await create_test_database(self)
        warned = warnings_of(self)
        a = await self.node(url, "node-a", get_reactor())
        b = await self.node(url, "node-b", SkewedReactor(get_reactor(), AHEAD))
        # Node a holds a job for a minute; node b, five minutes fast, must not find it lapsed.
        self.assertTrue(await a.leases.claim("job", a.clock.seconds(), 60.0))
        self.assertFalse(await b.leases.claim("job", b.clock.seconds(), 60.0))
        # Nor is a periodic job (a verification pass, a digest run) run again by node b.
        self.assertTrue(await a.leases.claim_periodic("pass", a.clock.seconds(), 120.0))
        self.assertFalse(await b.leases.claim_periodic("pass", b.clock.seconds(), 120.0))
        self.assertLess(abs(b.clock.seconds() - a.clock.seconds()), 1.0)
        self.assertEqual(len(warned), 1)
        self.assertIn("this node's clock is 300", warned[0])
        self.assertIn("ahead of the database server's", warned[0])
        # The daemon measures the offset again while it runs (its first background service).
        follower = b.background_services()[0]
        self.assertIsInstance(follower, ClockFollower)

    async def test_sqlite_keeps_the_nodes_own_clock(self) -> None:
        warned = warnings_of(self)
        core = await self.node(None, "solo", SkewedReactor(get_reactor(), AHEAD))
        assert isinstance(core.clock, DatabaseTime)
        self.assertEqual(core.clock.offset, 0.0)
        self.assertEqual(warned, [])


class SecondsTests(TestCase):

    def test_with_no_offset_seconds_is_the_reactors_own(self) -> None:
        # (read many times per relayed message: no call of ours around the reactor's)
        reactor = Clock()
        reactor.advance(1000.0)
        time = DatabaseTime(reactor)
        self.assertEqual(time.seconds, reactor.seconds)
        time.offset = 5.0
        self.assertEqual(time.seconds(), 1005.0)
        reactor.advance(1.0)
        self.assertEqual(time.seconds(), 1006.0)
        time.offset = 0.0
        self.assertEqual(time.seconds, reactor.seconds)
        self.assertEqual(time.seconds(), 1001.0)


class FollowTests(TestCase):
    timeout = 60

    async def test_a_clock_stepped_while_running_is_caught_up_with(self) -> None:
        db = await open_database(self, "postgresql")
        warned = warnings_of(self)
        reactor = Clock()
        reactor.advance(get_reactor().seconds())
        time = DatabaseTime(reactor)
        follower = ClockFollower(time, db)
        follower.startService()
        self.addCleanup(follower.stopService)
        await follower.stopService()  # its first measurement has ended
        self.assertLess(abs(time.seconds() - get_reactor().seconds()), 1.0)
        self.assertEqual(warned, [])
        reactor.advance(AHEAD)  # the node's clock steps five minutes forward
        follower.startService()
        await follower.stopService()
        self.assertLess(abs(time.seconds() - get_reactor().seconds()), 1.0)
        self.assertEqual(len(warned), 1)
        self.assertIn("ahead of", warned[0])
