"""Dropmyemail's /v1/accounts/:id/restores and /migrates without a mail server: what a
restore request may carry, and other users' ids."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from twisted.trial.unittest import TestCase

from mailcore.config import Config
from mailcore.fetch.jobs import thd_cancel_job
from mailcore.store.schema import mailbox_jobs
from tests.support.oauth import access_token
from tests.support.web import Web


class JobsApiBase(TestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        self.web = Web.build(Config(sections={"fetch": {"allow_loopback": True}}))
        self.alice = await self.web.user()
        self.token = await access_token(self.web.core.oauth, self.alice.id)
        self.web.secrets.append(self.token)
        account = await self.web.core.fetch.accounts.create(
            self.alice.id, name="a", email="a@x.test", host="127.0.0.1", port=993,
            use_ssl=True, password="pw")
        self.base = f"/v1/accounts/{account.id}"

    async def call(self, method: str, path: str, token: str | None = None,
                   **kwargs: Any) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token or self.token}", **kwargs.pop("headers", {})}
        status, _, body = await self.web.call(method, path, headers=headers, **kwargs)
        return status, body

    async def jobs(self) -> int:
        def txn(conn: Any) -> int:
            return int(conn.execute(select(func.count()).select_from(mailbox_jobs)).scalar())
        return await self.web.core.db.read("t", txn)


class RestoreInputTests(JobsApiBase):
    """A restore takes no input (dropmyemail-v1.md). Any body was ignored: a client that
    asked for three messages back ({"message_ids": [1, 2, 3]}) got a 201 and a restore of
    every missing message, and a body that was no JSON at all was a 201 too."""

    async def test_a_field_is_a_400_naming_it_and_no_job_is_made(self) -> None:
        attempts: list[dict[str, Any]] = [
            {"json": {"message_ids": [1, 2, 3]}},
            {"json": {"message_ids": list(range(100_000))}},
            {"json": {"folder": "INBOX"}},
            {"data": b"message_ids=1", "headers": {
                "Content-Type": "application/x-www-form-urlencoded"}},
        ]
        for kwargs in attempts:
            status, body = await self.call("POST", f"{self.base}/restores", **kwargs)
            self.assertEqual(status, 400, (kwargs.get("json", kwargs.get("data")), body))
            self.assertEqual(body["error"], "invalid_request")
            self.assertTrue(body["error_description"].startswith("Unknown field: "), body)
        self.assertEqual(await self.jobs(), 0)

    async def test_a_body_that_is_no_object_is_a_400(self) -> None:
        for data in (b"not json", b"[1, 2]", b'"x"', b'{"a": '):
            status, body = await self.call("POST", f"{self.base}/restores", data=data,
                                           headers={"Content-Type": "application/json"})
            self.assertEqual(status, 400, (data, body))
            self.assertEqual(body["error"], "invalid_request", data)
        self.assertEqual(await self.jobs(), 0)

    async def test_no_input_makes_a_restore(self) -> None:
        """Nothing, `{}`, JSON null, or an empty body of either type (the token in the header or the
        query)."""
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        bodies: list[tuple[str | None, dict[str, Any]]] = [
            (self.token, {}), (self.token, {"json": {}}),
            (self.token, {"data": b"", "headers": {"Content-Type": "application/json"}}),
            (self.token, {"data": b"null", "headers": {"Content-Type": "application/json"}}),
            (self.token, {"data": b"", "headers": form}),
            ("", {"data": b"", "headers": form}),
        ]
        for token, kwargs in bodies:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            query = "" if token else f"?access_token={self.token}"
            status, _, body = await self.web.call(
                "POST", f"{self.base}/restores{query}",
                headers={**headers, **kwargs.pop("headers", {})}, **kwargs)
            self.assertEqual(status, 201, (kwargs, body))
            await self.web.core.db.run("t", thd_cancel_job, body["id"],
                                      self.web.core.jobs.now())
        self.assertEqual(await self.jobs(), len(bodies))
