"""After every credential flow of the web layer, no password, key or token is stored in
clear: every row of every table is read and searched for each secret."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, MetaData, inspect, select
from twisted.trial.unittest import TestCase

from tests.support.web import PASSWORD, Web, header


def every_value(conn: Connection) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table that exists in the database (not only the declared ones)."""
    reflected = MetaData()
    reflected.reflect(conn)
    names = inspect(conn).get_table_names()
    return {name: [tuple(row) for row in conn.execute(select(reflected.tables[name]))]
            for name in names}


def texts(value: Any) -> list[str]:
    """The ways a stored value could spell a secret."""
    if value is None:
        return []
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        return [raw.decode("latin-1"), raw.hex()]
    return [str(value)]


class NoSecretInClearTests(TestCase):
    async def test_no_secret_of_any_flow_is_stored(self) -> None:
        web = Web.build()
        alice = await web.user("alice", "alice@example.test", PASSWORD)
        key = await web.credential(alice, "apikey", label="laptop")

        status, _, body = await web.call(
            "POST", "/api-token-auth/", json={"username": "alice", "password": PASSWORD}
        )
        self.assertEqual(status, 200)
        token = body["token"]
        status, _, body = await web.call(
            "POST", "/api/v1/auth/", data={"username": "alice", "password": PASSWORD}
        )
        self.assertEqual(status, 200)
        auth_key = body["auth_key"]
        status, headers, _ = await web.call(
            "GET", "/auth", headers={"X-Auth-User": "alice@example.test", "X-Auth-Key": key}
        )
        self.assertEqual(status, 204)
        session = header(headers, "X-Auth-Token")
        assert session is not None
        status, _, _ = await web.call(
            "PUT", "/api/v1/user", json={"city": "Paris"}, headers={"Api-Key": key}
        )
        self.assertEqual(status, 200)
        # A failed login must not leave its password anywhere either.
        wrong = "Wr0ng-guess-password"
        await web.call("POST", "/api-token-auth/", json={"username": "alice", "password": wrong})

        # Each secret really works (so the search below looks for live values).
        identity = web.core.identity
        self.assertIsNotNone(await identity.resolve(token, ("token",)))
        self.assertIsNotNone(await identity.resolve(auth_key, ("token",)))
        self.assertIsNotNone(await identity.resolve(session, ("session",)))
        self.assertIsNotNone(await identity.resolve(key, ("apikey",)))

        tables = await web.core.db.read("dump_every_row", every_value)
        self.assertGreaterEqual(len(tables["credentials"]), 4)
        stored = [
            (table, text)
            for table, rows in tables.items()
            for row in rows
            for value in row
            for text in texts(value)
        ]
        self.assertTrue(any("$argon2id$" in text for _, text in stored))
        for secret in {PASSWORD, wrong, key, token, auth_key, session, *web.secrets}:
            for table, text in stored:
                self.assertNotIn(secret, text, f"a secret is stored in clear in {table}")
