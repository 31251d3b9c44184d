"""Protecmail's account endpoints and its envelope: `GET`/`PUT /api/v1/user`."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import create_engine, event, update
from twisted.trial.unittest import TestCase

from mailcore.store.schema import users
from tests.support.pg import create_test_database
from tests.support.web import Web, header

USER_FIELDS = {
    "nic", "first_name", "last_name", "email", "organisation", "tva_intra", "address",
    "city", "zip", "country", "phone",
}
SEED_EDIT = {
    "first_name": "John", "last_name": "Doe", "email": "john@doe.com",
    "organisation": "jd unlimited", "tva_intra": "FR454545",
    "address": "69 avenue de le pie qui chante", "city": "Paris", "zip": "75010",
    "country": "FR", "phone": "+3365478945",
}


class UserTests(TestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        self.web = Web.build()
        self.alice = await self.web.user()
        self.key = await self.web.credential(self.alice)

    async def put(self, body: Any, **headers: str) -> tuple[int, dict[str, list[str]], Any]:
        return await self.web.call(
            "PUT", "/api/v1/user", json=body, headers={"Api-Key": self.key, **headers}
        )

    async def get(self) -> dict[str, Any]:
        status, _, body = await self.web.call(
            "GET", "/api/v1/user", headers={"Api-Key": self.key}
        )
        self.assertEqual(status, 200)
        self.assertEqual(set(body), {"request_id", "success", "data"})
        self.assertIs(body["success"], True)
        data: dict[str, Any] = body["data"]
        return data

    async def test_get_returns_exactly_the_seed_user_object(self) -> None:
        data = await self.get()
        self.assertEqual(set(data), USER_FIELDS)
        self.assertEqual(data["email"], "alice@example.test")
        self.assertEqual(data["nic"], self.alice.nic)

    async def test_put_the_seed_example_then_get_it_back(self) -> None:
        status, _, body = await self.put(SEED_EDIT)
        self.assertEqual(status, 200)
        self.assertEqual(set(body), {"request_id", "success"})
        self.assertIs(body["success"], True)
        data = await self.get()
        self.assertEqual({k: data[k] for k in SEED_EDIT}, SEED_EDIT)

    async def test_put_is_partial_and_ignores_an_echoed_nic(self) -> None:
        await self.put({"city": "Lyon"})
        status, _, _ = await self.put({"phone": "+331", "nic": "XX-42"})
        self.assertEqual(status, 200)
        data = await self.get()
        self.assertEqual((data["city"], data["phone"], data["nic"]),
                         ("Lyon", "+331", self.alice.nic))
        self.assertEqual(data["email"], "alice@example.test")

    async def test_bad_input_is_a_400_envelope(self) -> None:
        for body, words in [
            ({"zip": 75010}, "zip must be a string"),
            ({"city": None}, "city must be a string"),
            ({"plan": "agency"}, "unknown field: plan"),
            ({"email": "not-an-address"}, "Enter a valid email address."),
            # A local part spelling an RFC 2047 word (CR LF, or text): mail naming the
            # user (safedrop's notifications and receipts) could not be written, or would
            # show the text as the address.
            ({"email": "=?utf-8?q?=0d=0aBcc:_evil=40x.test?=@example.test"},
             "Enter a valid email address."),
            ({"email": "=?utf-8?q?Your_account_is_closed?=@example.test"},
             "Enter a valid email address."),
            ({"city": "x" * 200}, "too long"),
            ([SEED_EDIT], "Expected a JSON object"),
        ]:
            status, _, reply = await self.put(body)
            self.assertEqual(status, 400, body)
            self.assertIs(reply["success"], False)
            self.assertIn(words, reply["msg"])
        self.assertEqual((await self.get())["city"], "")

    async def test_an_email_taken_by_another_user_is_a_409(self) -> None:
        await self.web.user("bob", "bob@example.test")
        status, _, reply = await self.put({"email": "BOB@example.test"})
        self.assertEqual(status, 409)
        self.assertIs(reply["success"], False)
        self.assertEqual(reply["msg"], "A user with that email already exists.")

    async def test_keeping_ones_own_email_is_fine(self) -> None:
        status, _, _ = await self.put({"email": "alice@example.test"})
        self.assertEqual(status, 200)

    async def test_without_a_key_both_methods_are_401_envelopes(self) -> None:
        for method in ("GET", "PUT"):
            status, _, body = await self.web.call(method, "/api/v1/user", json={})
            self.assertEqual((status, body["success"]), (401, False), method)


class UserPostgresTests(TestCase):
    timeout = 240

    async def test_an_email_taken_meanwhile_is_a_409(self) -> None:
        # Bob takes the address between the check and the UPDATE of Alice's PUT (two
        # requests at once, READ COMMITTED): her UPDATE failed on the unique constraint,
        # a 500 with an IntegrityError traceback.
        web = Web.build(url=await create_test_database(self))
        self.addCleanup(web.core.db.close)
        alice = await web.user()
        bob = await web.user("bob", "bob@example.test")
        key = await web.credential(alice)
        other = create_engine(web.core.db.engine.url)
        self.addCleanup(other.dispose)
        done: list[bool] = []

        def hook(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            if statement.startswith("UPDATE users SET") and not done:
                done.append(True)
                with other.begin() as c:
                    c.execute(update(users).where(users.c.id == bob.id)
                              .values(email="john@doe.com"))

        event.listen(web.core.db.engine, "before_cursor_execute", hook)
        self.addCleanup(event.remove, web.core.db.engine, "before_cursor_execute", hook)
        status, _, reply = await web.call("PUT", "/api/v1/user", json={"email": "john@doe.com"},
                                          headers={"Api-Key": key})
        self.assertEqual((status, reply["success"]), (409, False))
        self.assertEqual(reply["msg"], "A user with that email already exists.")
        got = await web.core.identity.get_user(alice.id)
        assert got is not None
        self.assertEqual(got.email, "alice@example.test")


class EnvelopeTests(TestCase):
    async def test_request_id_is_a_fresh_uuid4_on_every_reply_errors_included(self) -> None:
        web = Web.build()
        alice = await web.user()
        key = await web.credential(alice)
        ids = []
        for headers in ({"Api-Key": key}, {"Api-Key": key}, {}, {"Api-Key": "bad"}):
            status, reply_headers, body = await web.call("GET", "/api/v1/ping", headers=headers)
            self.assertIn(status, (200, 401))
            parsed = uuid.UUID(body["request_id"])
            self.assertEqual(parsed.version, 4)
            self.assertEqual(header(reply_headers, "X-Request-Id"), body["request_id"])
            ids.append(body["request_id"])
        status, _, body = await web.call("DELETE", "/api/v1/user", headers={"Api-Key": key})
        self.assertEqual(status, 405)
        ids.append(body["request_id"])
        self.assertEqual(len(set(ids)), 5)
