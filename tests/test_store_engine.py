"""The engine's PostgreSQL connection settings (mailcore.store.engine.make_engine): what a
new connection is asked for, seen before any connection is made."""

from __future__ import annotations

import os
from typing import Any

from sqlalchemy import event
from twisted.trial.unittest import SynchronousTestCase

from mailcore.store.engine import PG_CONNECT_TIMEOUT, make_engine


class _Seen(Exception):
    """Raised instead of connecting, once the connection's parameters are seen."""


class ConnectTimeoutTests(SynchronousTestCase):

    def params(self, url: str) -> dict[str, Any]:
        """The keyword parameters `make_engine(url)` connects with."""
        engine = make_engine(url)
        self.addCleanup(engine.dispose)
        seen: dict[str, Any] = {}

        @event.listens_for(engine, "do_connect")
        def capture(dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> None:
            seen.update(cparams)
            raise _Seen()

        self.assertRaises(_Seen, engine.connect)
        return seen

    def without_env(self) -> None:
        old = os.environ.pop("PGCONNECT_TIMEOUT", None)
        if old is not None:
            self.addCleanup(os.environ.__setitem__, "PGCONNECT_TIMEOUT", old)

    def test_a_new_connection_gives_up_after_ten_seconds(self) -> None:
        self.without_env()
        params = self.params("postgresql+psycopg://mc@127.0.0.1:1/mc")
        self.assertEqual(params["connect_timeout"], PG_CONNECT_TIMEOUT)
        self.assertEqual(params["application_name"], "mailcore")

    def test_the_urls_own_connect_timeout_wins(self) -> None:
        self.without_env()
        params = self.params("postgresql+psycopg://mc@127.0.0.1:1/mc?connect_timeout=3")
        self.assertEqual(params["connect_timeout"], "3")

    def test_the_pgconnect_timeout_environment_variable_wins(self) -> None:
        """libpq (and psycopg) read PGCONNECT_TIMEOUT when the connection names no
        connect_timeout: an operator's setting there was overridden by the 10 s default,
        so a connection gave up after 10 s whatever it said (reproduced with a socket that
        never answers and PGCONNECT_TIMEOUT=2: 10.0 s)."""
        self.without_env()
        os.environ["PGCONNECT_TIMEOUT"] = "3"
        self.addCleanup(os.environ.pop, "PGCONNECT_TIMEOUT", None)
        params = self.params("postgresql+psycopg://mc@127.0.0.1:1/mc")
        self.assertNotIn("connect_timeout", params)
