"""safedrop (seed 003): every request of the seed replayed with its literal bodies, and the
bad input around it (wrong types, unknown fields, bad dates, huge ids, another user's
bundles), which must be a 4xx naming the field and change nothing."""

from __future__ import annotations

import base64
import dataclasses
import email
import email.policy
import hashlib
import json
import re
import sqlite3
from pathlib import Path
from typing import Any
from urllib.parse import quote

import sqlalchemy as sa
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from mailcore.config import Config
from mailcore.core import Core
from mailcore.emailpolicy import to_field
from mailcore.queue import spool
from mailcore.queue.spool import SpoolError
from mailcore.safedrop import service
from mailcore.safedrop.model import MAX_VALID_FOR
from mailcore.smtp.envelope import Envelope, Recipient
from mailcore.smtp.queueid import new_queue_id
from mailcore.store.schema import (
    drop_bundles,
    drop_recipients,
    queue_messages,
    queue_recipients,
    users,
)
from mailcore.workers import CpuPool
from tests.support.db import synchronous_database
from tests.support.pg import create_test_database
from tests.support.web import BASE, START, Web, Wire, header
from web.replies import encode_json
from web.root import build_root

LOREM = (
    "Lorem ipsum dolor sit amet, consectetur adipisicing elit, sed do eiusmod tempor "
    "incididunt ut labore et dolore magna aliqua."
)
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
BUNDLE_KEYS = [
    "read_remove", "allow_comments", "secure_message", "expiry_date", "require_token_auth",
    "message", "id", "email_receipt_when", "subject",
]
BOUNDARY = "def46f21fc67"


def multipart_file(name: str, data: bytes, field: str = "the_file",
                   boundary: str = BOUNDARY) -> bytes:
    return (
        f"--{boundary}\r\ncontent-disposition: form-data; name=\"{field}\"; "
        f"filename=\"{name}\"\r\nContent-Type: text/plain\r\n\r\n"
    ).encode() + data + f"\r\n--{boundary}--\r\n".encode()


MULTIPART = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


class SafedropFixture:
    web: Web
    token: str

    async def start(self, test: TestCase, db_url: str | None = None) -> None:
        """Alice logged in, on an in-memory SQLite store, or on the database at `db_url`."""
        data_dir = Path(test.mktemp())
        # The seed replay and the field tables make more than safedrop_user_rate's burst
        # of requests at one clock instant.
        config = Config(data_dir=data_dir, session_token_ttl=3600,
                        sections={"web": {"safedrop_user_rate": "1000/second"}})
        if db_url is None:
            self.web = Web.build(config)
        else:
            clock = Clock()
            clock.advance(START)
            db = synchronous_database(db_url)
            test.addCleanup(db.close)
            core = Core.build(config, db, clock, cpu=CpuPool.for_tests())
            root = build_root(core, None)
            self.web = Web(core, clock, root, StubTreq(root))
        self.data_dir = data_dir
        self.alice = await self.web.user("alice")
        self.key = await self.web.credential(self.alice)
        self.token = await self.login("alice@example.test", self.key)

    async def login(self, user: str, key: str) -> str:
        status, headers, _ = await self.web.call(
            "GET", "/", headers={"X-Auth-User": user, "X-Auth-Key": key}
        )
        assert status == 204
        token = header(headers, "X-Auth-Token")
        assert token is not None
        return token

    async def call(self, method: str, path: str, body: bytes | None = None,
                   headers: dict[str, str] | None = None, token: str | None = None,
                   via: str = "X-Auth-Token") -> tuple[int, dict[str, list[str]], Any]:
        all_headers = {via: token or self.token, **(headers or {})}
        kwargs: dict[str, Any] = {"headers": all_headers}
        if body is not None:
            kwargs["data"] = body
        return await self.web.call(method, path, **kwargs)

    async def form(self, method: str, path: str, body: str, **kw: Any) -> tuple[int, Any]:
        status, _, reply = await self.call(method, path, body.encode(), FORM, **kw)
        return status, reply

    async def bundle(self, body: str = "subject=x") -> int:
        status, reply = await self.form("POST", "/dropbundles", body)
        assert status == 200, reply
        return int(reply["id"])

    def bundle_rows(self) -> list[Any]:
        def txn(conn: Any) -> list[Any]:
            return list(conn.execute(sa.select(drop_bundles).order_by(drop_bundles.c.id)))

        result: list[Any] = []
        self.web.core.db.read("rows", txn).addCallback(result.extend)
        return result

    def spooled(self) -> list[tuple[str, str, str, bytes]]:
        """(kind, mail_from, recipient, body) of every queued message."""
        def txn(conn: Any) -> list[Any]:
            return list(conn.execute(
                sa.select(queue_messages.c.kind, queue_messages.c.mail_from,
                          queue_recipients.c.address, queue_messages.c.body)
                .join(queue_recipients, queue_recipients.c.message_id == queue_messages.c.id)
                .order_by(queue_recipients.c.address)
            ))

        result: list[Any] = []
        self.web.core.db.read("spooled", txn).addCallback(result.extend)
        return [tuple(r) for r in result]


class SeedReplayTests(TestCase):
    """Seed 003's examples, in its order, with its bodies and headers."""

    async def test_every_seed_request_answers_as_the_seed_shows(self) -> None:
        f = SafedropFixture()
        await f.start(self)

        # Create a safedrop (form-encoded, the seed's literal body)
        status, _, created = await f.call(
            "POST", "/dropbundles",
            b"message=Lorem+ipsum+dolor+sit+amet%2C+consectetur+adipisicing+elit%2C+sed+do+"
            b"eiusmod+tempor+incididunt+ut+labore+et+dolore+magna+aliqua.&subject=Lorem+Ipsum",
            FORM,
        )
        self.assertEqual(status, 200)
        self.assertEqual(list(created), BUNDLE_KEYS)
        bundle_id = created["id"]
        self.assertEqual(created, {
            "read_remove": True, "allow_comments": False, "secure_message": False,
            "expiry_date": None, "require_token_auth": False, "message": LOREM,
            "id": bundle_id, "email_receipt_when": 4, "subject": "Lorem Ipsum",
        })

        # Show a safedrop
        status, headers, shown = await f.call("GET", f"/dropbundles/{bundle_id}")
        self.assertEqual((status, shown), (200, created))
        self.assertEqual(header(headers, "Content-Type"), "application/json; charset=utf-8")

        # Update a safedrop: require_token_auth=1
        status, updated = await f.form("PUT", f"/dropbundles/{bundle_id}",
                                       "require_token_auth=1")
        self.assertEqual((status, updated), (200, {**created, "require_token_auth": True}))

        # List safedrops
        status, _, listed = await f.call("GET", "/dropbundles")
        self.assertEqual((status, listed), (200, [updated]))

        # Add recipients (fred is the seed's literal body)
        ids = {}
        for address in ("mary%40safedrop.com", "john%40safedrop.com", "fred%40safedrop.com"):
            status, added = await f.form(
                "POST", f"/dropbundles/{bundle_id}/dropbundlerecipients", f"email={address}"
            )
            self.assertEqual(status, 200)
            self.assertEqual(list(added), ["id", "telephone", "valid_for", "email"])
            ids[added["email"]] = added["id"]
            self.assertEqual(added["telephone"], "")
            self.assertEqual(added["valid_for"], 0)
        fred = ids["fred@safedrop.com"]

        # List recipients
        status, _, recipients = await f.call(
            "GET", f"/dropbundles/{bundle_id}/dropbundlerecipients"
        )
        self.assertEqual(status, 200)
        self.assertEqual([r["email"] for r in recipients],
                         ["mary@safedrop.com", "john@safedrop.com", "fred@safedrop.com"])

        # Show a recipient
        path = f"/dropbundles/{bundle_id}/dropbundlerecipients/{fred}"
        status, _, shown_r = await f.call("GET", path)
        self.assertEqual((status, shown_r), (200, {
            "id": fred, "telephone": "", "valid_for": 0, "email": "fred@safedrop.com"}))

        # Update a recipient: telephone=442077394252
        status, changed = await f.form("PUT", path, "telephone=442077394252")
        self.assertEqual((status, changed), (200, {
            "id": fred, "telephone": "442077394252", "valid_for": 0,
            "email": "fred@safedrop.com"}))

        # List files (none yet), add two with Auth-Token as the seed spells it, show one
        files = f"/dropbundles/{bundle_id}/dropfiles"
        status, _, none = await f.call("GET", files, via="Auth-Token")
        self.assertEqual((status, none), (200, []))
        added_files = []
        for name in ("file1.txt", "file2.txt"):
            status, _, added_file = await f.call(
                "POST", files, multipart_file(name, b"hello " + name.encode()), MULTIPART,
                via="Auth-Token",
            )
            self.assertEqual(status, 200, added_file)
            self.assertEqual(list(added_file), ["id", "the_file"])
            self.assertEqual(added_file["the_file"], name)
            added_files.append(added_file)
        status, _, listed_files = await f.call("GET", files, via="Auth-Token")
        self.assertEqual((status, listed_files), (200, added_files))
        first = added_files[0]
        status, _, shown_f = await f.call("GET", f"{files}/{first['id']}",
                                          via="Auth-Token")
        self.assertEqual((status, shown_f), (200, first))

        # Send the safedrop to all recipients
        status, headers, body = await f.call("GET", f"/dropbundles/{bundle_id}?send",
                                             via="Auth-Token")
        self.assertEqual((status, body), (200, b"OK"))
        self.assertEqual(header(headers, "Content-Type"), "text/plain")
        spooled = f.spooled()
        self.assertEqual(
            [(kind, sender, rcpt) for kind, sender, rcpt, _ in spooled],
            [("notification", "alice@example.test", a) for a in
             ("fred@safedrop.com", "john@safedrop.com", "mary@safedrop.com")],
        )

        # Once sent: no change to the bundle, its recipients or files (405)
        for method, target, body_bytes, headers_ in [
            ("PUT", f"/dropbundles/{bundle_id}", b"subject=later", FORM),
            ("POST", f"/dropbundles/{bundle_id}/dropbundlerecipients", b"email=x%40y.test",
             FORM),
            ("PUT", path, b"telephone=", FORM),
            ("POST", files, multipart_file("late.txt", b"late"), MULTIPART),
        ]:
            status, headers, reply = await f.call(method, target, body_bytes, headers_)
            self.assertEqual(status, 405, (method, target))
            self.assertEqual(reply["error"],
                             "The safedrop has been sent; it can no longer be changed.")
            # What the sent state leaves, each answered: GET and HEAD (HEAD was left out).
            self.assertEqual(header(headers, "Allow"), "GET, HEAD", (method, target))
            for allowed in ("GET", "HEAD"):
                status, _, _ = await f.call(allowed, target)
                self.assertEqual(status, 200, (allowed, target))
        status, _, still = await f.call("GET", f"/dropbundles/{bundle_id}")
        self.assertEqual((status, still), (200, updated))


class BundleFieldTests(TestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        self.f = SafedropFixture()
        await self.f.start(self)

    async def test_a_user_has_at_most_max_bundles_per_user_unsent(self) -> None:
        """An empty bundle costs no bytes of max_user_size and the seed has no DELETE, so
        a script (or a stolen key) could make them without end: [safedrop]
        max_bundles_per_user bounds those not yet sent; one more is the seed's 400,
        nothing stored; 0 is no limit."""
        safedrop = self.f.web.core.safedrop
        self.assertEqual(safedrop.settings.max_bundles_per_user, 10_000)
        safedrop.settings = dataclasses.replace(safedrop.settings, max_bundles_per_user=2)
        await self.f.bundle()
        await self.f.bundle()
        status, reply = await self.f.form("POST", "/dropbundles", "subject=three")
        self.assertEqual(status, 400, reply)
        self.assertEqual(reply, {"error":
                         "A user may have at most 2 drops not yet sent; send one, or wait "
                         "until an unsent one is deleted, unsent_max_age after it was made."})
        self.assertEqual([r.subject for r in self.f.bundle_rows()], ["x", "x"])
        # Another user's count is their own.
        bob = await self.f.web.user("bob")
        bob_token = await self.f.login("bob@example.test", await self.f.web.credential(bob))
        status, _ = await self.f.form("POST", "/dropbundles", "subject=bob", token=bob_token)
        self.assertEqual(status, 200)
        safedrop.settings = dataclasses.replace(safedrop.settings, max_bundles_per_user=0)
        status, reply = await self.f.form("POST", "/dropbundles", "subject=three")
        self.assertEqual(status, 200, reply)

    async def test_sent_drops_never_downloaded_do_not_lock_a_user_out(self) -> None:
        """A sent drop with the defaults (no expiry, valid_for 0) whose recipient never
        downloads is never removed, and there is no DELETE: were it counted, a user at the
        cap would be locked out for good. Sent ones are bounded by the [limits] send caps
        and do not count; a year on, a new drop is made."""
        safedrop = self.f.web.core.safedrop
        safedrop.settings = dataclasses.replace(safedrop.settings, max_bundles_per_user=1)
        bundle_id = await self.f.bundle()
        status, _ = await self.f.form(
            "POST", f"/dropbundles/{bundle_id}/dropbundlerecipients", "email=x@example.org")
        self.assertEqual(status, 200)
        status, _, _ = await self.f.call(
            "POST", f"/dropbundles/{bundle_id}/dropfiles", multipart_file("a.txt", b"hello"),
            MULTIPART, via="Auth-Token")
        self.assertEqual(status, 200)
        status, _, body = await self.f.call("GET", f"/dropbundles/{bundle_id}?send",
                                            via="Auth-Token")
        self.assertEqual((status, body), (200, b"OK"))
        self.f.web.clock.advance(400 * 24 * 3600)
        await safedrop.sweep()
        [row] = self.f.bundle_rows()
        self.assertIsNotNone(row.sent_at)
        self.assertIsNone(row.removed_at)
        self.f.token = await self.f.login("alice@example.test", self.f.key)
        status, reply = await self.f.form("POST", "/dropbundles", "subject=next year")
        self.assertEqual(status, 200, reply)
        # The new one is unsent: it fills the cap.
        status, reply = await self.f.form("POST", "/dropbundles", "subject=one more")
        self.assertEqual(status, 400, reply)

    async def test_every_field_in_form_multipart_and_json_reads_back_the_same(self) -> None:
        form = ("subject=S&message=M&secure_message=hush&expiry_date=2031-04-01T12%3A00%3A00"
                "%2B02%3A00&email_receipt_when=2&password=pw&read_remove=0&allow_comments=1"
                "&require_token_auth=1")
        status, from_form = await self.f.form("POST", "/dropbundles", form)
        self.assertEqual(status, 200, from_form)
        fields = {
            "subject": "S", "message": "M", "secure_message": "hush",
            "expiry_date": "2031-04-01T12:00:00+02:00", "email_receipt_when": "2",
            "password": "pw", "read_remove": "0", "allow_comments": "1",
            "require_token_auth": "1",
        }
        parts = b"".join(
            f"--b1\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n".encode()
            for k, v in fields.items()
        ) + b"--b1--\r\n"
        status, _, from_multipart = await self.f.call(
            "POST", "/dropbundles", parts, {"Content-Type": "multipart/form-data; boundary=b1"})
        self.assertEqual(status, 200, from_multipart)
        as_json = {**fields, "email_receipt_when": 2, "read_remove": False,
                   "allow_comments": True, "require_token_auth": True}
        status, _, from_json = await self.f.call(
            "POST", "/dropbundles", json.dumps(as_json).encode(),
            {"Content-Type": "application/json"})
        self.assertEqual(status, 200, from_json)
        expected = {
            "read_remove": False, "allow_comments": True, "secure_message": True,
            "expiry_date": "2031-04-01T10:00:00Z", "require_token_auth": True,
            "message": "M", "email_receipt_when": 2, "subject": "S",
        }
        for reply in (from_form, from_multipart, from_json):
            self.assertEqual({k: v for k, v in reply.items() if k != "id"}, expected)

    async def test_a_body_without_a_content_type_is_a_form_as_in_the_seed(self) -> None:
        """Seed 003's requests carry form bodies and no Content-Type header."""
        status, _, created = await self.f.call(
            "POST", "/dropbundles", b"message=Lorem+ipsum%2C+dolor&subject=Lorem+Ipsum")
        self.assertEqual(status, 200, created)
        self.assertEqual((created["message"], created["subject"]),
                         ("Lorem ipsum, dolor", "Lorem Ipsum"))
        status, _, changed = await self.f.call(
            "PUT", f"/dropbundles/{created['id']}", b"require_token_auth=1")
        self.assertEqual((status, changed["require_token_auth"]), (200, True), changed)
        status, _, added = await self.f.call(
            "POST", f"/dropbundles/{created['id']}/dropbundlerecipients",
            b"email=r%40example.test")
        self.assertEqual((status, added.get("email")), (200, "r@example.test"), added)
        # JSON without its type is not guessed at: its text is an unknown field, a 400.
        status, _, refused = await self.f.call("POST", "/dropbundles", b'{"subject": "S"}')
        self.assertEqual(status, 400, refused)
        self.assertEqual(len(self.f.bundle_rows()), 1)

    async def test_secrets_are_write_only_and_never_stored_in_clear(self) -> None:
        bundle_id = await self.f.bundle("password=Hunter2-secret&secure_message=the+vault+code")
        for _, _, reply in [await self.f.call("GET", f"/dropbundles/{bundle_id}"),
                            await self.f.call("GET", "/dropbundles")]:
            text = json.dumps(reply)
            self.assertNotIn("Hunter2", text)
            self.assertNotIn("vault", text)
            self.assertNotIn("password", text)
        row = self.f.bundle_rows()[0]
        self.assertTrue(row.password_hash.startswith("$argon2id$"))
        self.assertNotIn(b"vault", row.secure_message)
        self.assertEqual(self.f.web.core.fetch.secrets.decrypt(row.secure_message),
                         "the vault code")
        # An empty value removes them.
        status, reply = await self.f.form("PUT", f"/dropbundles/{bundle_id}",
                                          "secure_message=&password=")
        self.assertEqual((status, reply["secure_message"]), (200, False))
        row = self.f.bundle_rows()[0]
        self.assertEqual((row.password_hash, row.secure_message), (None, None))

    async def test_read_remove_with_allow_comments_is_400_and_changes_nothing(self) -> None:
        status, reply = await self.f.form("POST", "/dropbundles", "allow_comments=1")
        self.assertEqual(status, 400)
        self.assertEqual(list(reply["errors"]), ["allow_comments"])
        self.assertEqual(self.f.bundle_rows(), [])
        bundle_id = await self.f.bundle("read_remove=0&allow_comments=1")
        status, reply = await self.f.form("PUT", f"/dropbundles/{bundle_id}", "read_remove=1")
        self.assertEqual(status, 400)
        self.assertIn("allow_comments", reply["errors"])
        self.assertFalse(self.f.bundle_rows()[0].read_remove)

    async def test_bad_fields_are_400_naming_each_field_and_change_nothing(self) -> None:
        bundle_id = await self.f.bundle("subject=before")
        cases = [
            ("read_remove=2", "read_remove"),
            ("read_remove=maybe", "read_remove"),
            ("email_receipt_when=5", "email_receipt_when"),
            ("email_receipt_when=four", "email_receipt_when"),
            ("email_receipt_when=99999999999999999999999", "email_receipt_when"),
            ("expiry_date=2011-04-01", "expiry_date"),
            ("expiry_date=2011-04-01T10%3A00%3A00", "expiry_date"),
            ("expiry_date=2011-02-30T10%3A00%3A00Z", "expiry_date"),
            ("expiry_date=tomorrow", "expiry_date"),
            ("subject=a%0Ab", "subject"),
            ("subject=caf%E9", "subject"),
            ("message=a%00b", "message"),
            ("message=red+%1B%5B31m", "message"),
            ("message=a%7Fb", "message"),
            ("secure_message=a%00b", "secure_message"),
            ("colour=blue", "colour"),
            ("id=7", "id"),
        ]
        for body, field in cases:
            for method, path in (("POST", "/dropbundles"), ("PUT", f"/dropbundles/{bundle_id}")):
                status, reply = await self.f.form(method, path, body)
                self.assertEqual(status, 400, (method, body, reply))
                self.assertEqual(list(reply["errors"]), [field], body)
                self.assertIn(field, reply["error"])
        for document in ({"read_remove": "yes please"}, {"subject": 5}, {"message": "a\x00b"},
                         {"expiry_date": 1300000000}, {"password": ["x"]}):
            status, _, reply = await self.f.call(
                "PUT", f"/dropbundles/{bundle_id}", json.dumps(document).encode(),
                {"Content-Type": "application/json"})
            self.assertEqual(status, 400, document)
            self.assertEqual(list(reply["errors"]), list(document))
        rows = self.f.bundle_rows()
        self.assertEqual([(r.id, r.subject) for r in rows], [(bundle_id, "before")])

    async def test_a_message_is_lines_of_text_with_tabs(self) -> None:
        text = "Dear Ann,\r\n\tthe figures\u2028are in.\n"
        status, reply = await self.f.form(
            "POST", "/dropbundles", "message=Dear+Ann%2C%0D%0A%09the+figures%E2%80%A8are+in.%0A"
            "&secure_message=%09pin%0D%0A")
        self.assertEqual((status, reply["message"], reply["secure_message"]),
                         (200, text, True))

    async def test_a_malformed_multipart_body_is_400_and_changes_nothing(self) -> None:
        bundle_id = await self.f.bundle("subject=kept&message=important+text")
        nested = (b"--b1\r\nContent-Disposition: form-data; name=\"message\"\r\n"
                  b"Content-Type: multipart/mixed; boundary=c\r\n\r\n"
                  b"--c\r\n\r\nhello\r\n--c--\r\n--b1--\r\n")
        cut = (b"--b1\r\nContent-Disposition: form-data; name=\"subject\"\r\n\r\nnew\r\n"
               b"--b1\r\nContent-Disposition: form-data; name=\"message\"\r\n\r\nlong mess")
        # A part header that is not UTF-8 was told with the parser's exception's repr,
        # the header's bytes echoed: "Malformed multipart body: ('Segment header failed to
        # decode', UnicodeDecodeError('utf-8', b'Content-Disposition: ...', 41, 42, ...))".
        latin = (b"--b1\r\nContent-Disposition: form-data; name=\"sub\xffject\"\r\n\r\n"
                 b"new\r\n--b1--\r\n")
        for body, said in ((nested, "message"), (cut, "closing boundary"),
                           (latin, "Malformed multipart body: a part's header is not valid "
                            "UTF-8.")):
            status, _, reply = await self.f.call(
                "PUT", f"/dropbundles/{bundle_id}", body,
                {"Content-Type": "multipart/form-data; boundary=b1"})
            self.assertEqual(status, 400, reply)
            self.assertIn(said, reply["error"])
            self.assertNotIn("Error(", reply["error"])
        self.assertEqual([(r.subject, r.message) for r in self.f.bundle_rows()],
                         [("kept", "important text")])

    async def test_expiry_date_round_trips_and_empty_means_never(self) -> None:
        bundle_id = await self.f.bundle("expiry_date=2030-12-19T16%3A39%3A57-08%3A00")
        _, _, reply = await self.f.call("GET", f"/dropbundles/{bundle_id}")
        self.assertEqual(reply["expiry_date"], "2030-12-20T00:39:57Z")
        status, reply = await self.f.form("PUT", f"/dropbundles/{bundle_id}", "expiry_date=")
        self.assertEqual((status, reply["expiry_date"]), (200, None))

    async def test_an_expiry_date_already_passed_is_refused(self) -> None:
        # Found by an audit: it was stored (and the sweep deleted the drop, never sent,
        # files and all), the send alone refusing it. START is 2023-11-14T22:13:20Z.
        bundle_id = await self.f.bundle("subject=kept")
        for date in ("0001-01-01T00%3A00%3A00%2B00%3A00", "2023-11-14T22%3A13%3A19Z",
                     "2023-11-14T22%3A13%3A20Z", "2023-11-14T23%3A13%3A19%2B01%3A00"):
            for method, path in (("POST", "/dropbundles"), ("PUT", f"/dropbundles/{bundle_id}")):
                status, reply = await self.f.form(method, path,
                                                  f"subject=changed&expiry_date={date}")
                self.assertEqual((status, reply), (400, {
                    "error": "expiry_date: The expiry date has passed.",
                    "errors": {"expiry_date": ["The expiry date has passed."]}}),
                    (method, date))
        self.assertEqual([(r.subject, r.expiry_date) for r in self.f.bundle_rows()],
                         [("kept", None)])
        status, reply = await self.f.form("PUT", f"/dropbundles/{bundle_id}",
                                          "expiry_date=2023-11-14T22%3A13%3A21Z")
        self.assertEqual((status, reply["expiry_date"]), (200, "2023-11-14T22:13:21Z"))

    async def test_unknown_ids_and_other_users_bundles_are_404(self) -> None:
        bundle_id = await self.f.bundle()
        bob = await self.f.web.user("bob")
        bob_token = await self.f.login("bob@example.test", await self.f.web.credential(bob))
        for method, path, body in [
            ("GET", f"/dropbundles/{bundle_id}", None),
            ("PUT", f"/dropbundles/{bundle_id}", b"subject=mine"),
            ("GET", f"/dropbundles/{bundle_id}?send", None),
            ("GET", f"/dropbundles/{bundle_id}/dropbundlerecipients", None),
            ("POST", f"/dropbundles/{bundle_id}/dropbundlerecipients", b"email=a%40b.test"),
            ("GET", f"/dropbundles/{bundle_id}/dropfiles", None),
            ("POST", f"/dropbundles/{bundle_id}/dropfiles", None),
        ]:
            headers = FORM if body else None
            status, _, reply = await self.f.call(method, path, body, headers, token=bob_token)
            self.assertEqual(status, 404, (method, path, reply))
            self.assertEqual(reply, {"error": "Not found."})
        status, _, listed = await self.f.call("GET", "/dropbundles", token=bob_token)
        self.assertEqual(listed, [])
        for path in (f"/dropbundles/{2**63}", f"/dropbundles/{2**63 - 1}",
                     f"/dropbundles/{bundle_id}/dropbundlerecipients/{2**64}",
                     f"/dropbundles/{bundle_id}/dropfiles/99"):
            status, _, _ = await self.f.call("GET", path)
            self.assertEqual(status, 404, path)
        self.assertEqual([r.subject for r in self.f.bundle_rows()], ["x"])

    async def test_no_or_expired_token_is_401_and_unknown_methods_405(self) -> None:
        status, _, reply = await self.f.web.call("GET", "/dropbundles")
        self.assertEqual((status, reply), (401, {"error": "An X-Auth-Token header is required."}))
        status, _, _ = await self.f.call("GET", "/dropbundles", token="f" * 40)
        self.assertEqual(status, 401)
        self.f.web.clock.advance(3600)
        status, _, _ = await self.f.call("GET", "/dropbundles")
        self.assertEqual(status, 401)
        self.f.token = await self.f.login("alice@example.test", self.f.key)
        bundle_id = await self.f.bundle()
        for method, path in [("DELETE", f"/dropbundles/{bundle_id}"),
                             ("PUT", "/dropbundles"),
                             ("DELETE", f"/dropbundles/{bundle_id}/dropfiles"),
                             ("PUT", f"/dropbundles/{bundle_id}/dropfiles/1")]:
            status, _, _ = await self.f.call(method, path)
            self.assertEqual(status, 405, (method, path))


class BundleListTests(TestCase):
    """GET /dropbundles writes a user's bundles as they are read, BUNDLES_BATCH at a time,
    pausing while the client's transport is full: it was one reply built whole from every
    bundle the user ever made (sent ones included, each message up to 100,000 characters:
    3,000 of them took 9 s and +860 MiB of the daemon's memory for one request)."""

    async def setUp(self) -> None:  # type: ignore[override]
        self.f = SafedropFixture()
        await self.f.start(self)

    async def listed(self, token: str) -> tuple[int, str | None, bytes]:
        """(status, Content-Type, body bytes) of GET /dropbundles."""
        response = await self.f.web.http.request(
            "GET", BASE + "/dropbundles", headers={"X-Auth-Token": token})
        self.f.web.http.flush()
        body = await response.content()
        return response.code, response.headers.getRawHeaders("content-type", [None])[0], body

    async def shown(self, ids: list[int]) -> list[Any]:
        replies = []
        for bundle_id in ids:
            status, _, reply = await self.f.call("GET", f"/dropbundles/{bundle_id}")
            assert status == 200, reply
            replies.append(reply)
        return replies

    async def test_a_small_list_is_the_same_json_as_before(self) -> None:
        ids = [await self.f.bundle(f"subject=S{i}&message=Line+{i}%0Anext&require_token_auth=1")
               for i in range(3)]
        status, content_type, body = await self.listed(self.f.token)
        self.assertEqual((status, content_type), (200, "application/json; charset=utf-8"))
        # Byte for byte what the whole list encoded at once was.
        self.assertEqual(body, encode_json(await self.shown(ids)))
        bob = await self.f.web.user("bob")
        bob_token = await self.f.login("bob@example.test", await self.f.web.credential(bob))
        self.assertEqual(await self.listed(bob_token),
                         (200, "application/json; charset=utf-8", b"[]"))

    async def test_many_bundles_are_streamed_and_wait_for_the_client(self) -> None:
        bob = await self.f.web.user("bob")
        bob_token = await self.f.login("bob@example.test", await self.f.web.credential(bob))
        ids = []
        for i in range(2 * service.BUNDLES_BATCH + 5):
            ids.append(await self.f.bundle(f"subject=S{i}&message={'m' * 50}{i}"))
            if i % 10 == 0:  # another user's bundles in between are not listed
                await self.f.form("POST", "/dropbundles", "subject=bob", token=bob_token)
        expected = await self.shown(ids)
        reads: list[str] = []
        run_read = self.f.web.core.db.read

        def counting_read(name: str, *args: Any, **kwargs: Any) -> Any:
            reads.append(name)
            return run_read(name, *args, **kwargs)

        self.f.web.core.db.read = counting_read  # type: ignore[method-assign]
        wire = Wire.open(self.f.web)
        full: list[bool] = []
        write = wire.transport.write

        def filling(data: bytes) -> None:
            # The client reads nothing: the transport is full once the reply streams.
            write(data)
            if not full and wire.channel._requestProducer is not None:
                full.append(True)
                wire.channel.pauseProducing()

        wire.transport.write = filling  # type: ignore[method-assign]
        wire.transport.writeSequence = (  # type: ignore[method-assign]
            lambda seq: filling(b"".join(seq)))
        wire.send(b"GET /dropbundles HTTP/1.1\r\nHost: t\r\n"
                  b"X-Auth-Token: " + self.f.token.encode() + b"\r\n\r\n")
        self.assertEqual(reads.count("safedrop_bundles"), 1)
        wire.channel.resumeProducing()
        [(status, headers, body)] = wire.responses()
        self.assertEqual(status, b"HTTP/1.1 200 OK", body[:300])
        self.assertEqual(headers[b"transfer-encoding"], b"chunked")
        self.assertEqual(reads.count("safedrop_bundles"), 3)
        self.assertEqual(json.loads(body), expected)
        wire.close()


class PostgresTextTests(TestCase):
    """PostgreSQL's text columns refuse NUL: a message holding one must be refused as bad
    input before the store sees it (it answered 500 there; SQLite stored and mailed it)."""

    timeout = 240

    async def test_nul_in_a_message_is_400_on_postgresql(self) -> None:
        f = SafedropFixture()
        await f.start(self, await create_test_database(self))
        bundle_id = await f.bundle("subject=kept&message=line+1%0D%0A%09line+2")
        for body, field in (("message=a%00b", "message"), ("secure_message=a%00b",
                                                           "secure_message")):
            for method, path in (("POST", "/dropbundles"), ("PUT", f"/dropbundles/{bundle_id}")):
                status, reply = await f.form(method, path, body)
                self.assertEqual(status, 400, (method, body, reply))
                self.assertEqual(list(reply["errors"]), [field])
        self.assertEqual([(r.subject, r.message) for r in f.bundle_rows()],
                         [("kept", "line 1\r\n\tline 2")])


class RecipientFieldTests(TestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        self.f = SafedropFixture()
        await self.f.start(self)
        self.bundle_id = await self.f.bundle()
        self.path = f"/dropbundles/{self.bundle_id}/dropbundlerecipients"

    async def test_bad_recipient_fields_are_400_naming_the_field(self) -> None:
        for body, field in [
            ("", "email"),
            ("email=", "email"),
            ("email=not-an-address", "email"),
            ("email=a%40b.test%0D%0ABcc%3A+c%40d.test", "email"),
            # A dot-atom spelling an RFC 2047 word that decodes to CR LF: the notification's
            # To field could not be written, and the drop's send failed (500).
            ("email=%3D%3Futf-8%3Fb%3FDQpCY2M6IGV2aWxAeC50ZXN0%3F%3D%40b.test", "email"),
            # What the Mail API refuses too (found by an audit: mail to loopback port 25).
            ("email=a%40localhost", "email"),
            ("email=a%40intranet", "email"),
            ("email=a%40b.test&telephone=%2B442077394252", "telephone"),
            ("email=a%40b.test&telephone=0207", "telephone"),
            ("email=a%40b.test&valid_for=-1", "valid_for"),
            ("email=a%40b.test&valid_for=soon", "valid_for"),
            ("email=a%40b.test&valid_for=315360001", "valid_for"),  # ten years and a second
            ("email=a%40b.test&valid_for=9223372036854775807", "valid_for"),
            ("email=a%40b.test&name=Fred", "name"),
        ]:
            status, reply = await self.f.form("POST", self.path, body)
            self.assertEqual(status, 400, (body, reply))
            self.assertEqual(list(reply["errors"]), [field], body)
        _, _, listed = await self.f.call("GET", self.path)
        self.assertEqual(listed, [])

    async def test_a_bundle_has_at_most_max_recipients(self) -> None:
        """Its send builds and queues one mail per recipient in one transaction of the
        spool's write lane, so their number is bounded ([safedrop] max_recipients)."""
        safedrop = self.f.web.core.safedrop
        self.assertEqual(safedrop.settings.max_recipients, 100)
        safedrop.settings = dataclasses.replace(safedrop.settings, max_recipients=2)
        for n in (1, 2):
            status, _ = await self.f.form("POST", self.path, f"email=r{n}%40example.org")
            self.assertEqual(status, 200)
        status, reply = await self.f.form("POST", self.path, "email=r3%40example.org")
        self.assertEqual(status, 400, reply)
        self.assertEqual(reply["errors"], {"email": ["A drop may have at most 2 recipients."]})
        _, _, listed = await self.f.call("GET", self.path)
        self.assertEqual(len(listed), 2)

    async def test_an_address_is_a_recipient_of_a_bundle_once(self) -> None:
        # The same address added twice was two recipients: the send mailed it twice, with
        # two links. The seed's 400 for properties that "do not meet requirements".
        status, fred = await self.f.form("POST", self.path, "email=fred%40safedrop.com")
        self.assertEqual(status, 200, fred)
        status, ann = await self.f.form("POST", self.path, "email=ann%40example.org")
        self.assertEqual(status, 200, ann)
        duplicate = {"email": ["This address is a recipient of the drop already."]}
        for method, path, body in [
            ("POST", self.path, "email=fred%40safedrop.com"),
            ("POST", self.path, "email=Fred%40SafeDrop.com&telephone=442077394252"),
            ("PUT", f"{self.path}/{ann['id']}", "email=FRED%40safedrop.com"),
        ]:
            status, reply = await self.f.form(method, path, body)
            self.assertEqual((status, reply["errors"]), (400, duplicate), body)
        _, _, listed = await self.f.call("GET", self.path)
        self.assertEqual([r["email"] for r in listed], ["fred@safedrop.com", "ann@example.org"])
        # A recipient keeps its own address; another bundle may have it too.
        status, same = await self.f.form("PUT", f"{self.path}/{fred['id']}",
                                         "email=fred%40safedrop.com&telephone=442077394252")
        self.assertEqual((status, same["telephone"]), (200, "442077394252"))
        other = await self.f.bundle()
        status, _ = await self.f.form("POST", f"/dropbundles/{other}/dropbundlerecipients",
                                      "email=fred%40safedrop.com")
        self.assertEqual(status, 200)

    async def test_a_form_field_given_twice_with_other_values_is_refused(self) -> None:
        # A client adding a list as forms send one (requests' data={"email": [a, b]}) wrote
        # email=a&email=b: the last value won, one recipient b was added (200), a dropped
        # unseen; a bundle's subject the same. As the Mail API refuses it (ab24e1f).
        twice = ["The field is given more than once, with different values; it takes one "
                 "value."]
        status, reply = await self.f.form("POST", self.path,
                                          "email=ann%40example.org&email=fred%40safedrop.com")
        self.assertEqual((status, reply["errors"]), (400, {"email": twice}))
        status, reply = await self.f.form("PUT", f"/dropbundles/{self.bundle_id}",
                                          "subject=a&subject=b")
        self.assertEqual((status, reply["errors"]), (400, {"subject": twice}))
        status, _, body = await self.f.call(
            "PUT", f"/dropbundles/{self.bundle_id}",
            b"--B\r\nContent-Disposition: form-data; name=\"message\"\r\n\r\na\r\n"
            b"--B\r\nContent-Disposition: form-data; name=\"message\"\r\n\r\nb\r\n--B--\r\n",
            {"Content-Type": "multipart/form-data; boundary=B"})
        self.assertEqual((status, body["errors"]), (400, {"message": twice}))
        status, _, body = await self.f.call(
            "POST", self.path, b'{"email": "ann@example.org", "email": "fred@safedrop.com"}',
            {"Content-Type": "application/json"})
        self.assertEqual((status, body["errors"]), (400, {"email": twice}))
        _, _, listed = await self.f.call("GET", self.path)
        self.assertEqual(listed, [])
        _, _, bundle = await self.f.call("GET", f"/dropbundles/{self.bundle_id}")
        self.assertEqual((bundle["subject"], bundle["message"]), ("x", ""))
        # The same value twice says nothing else: taken.
        status, reply = await self.f.form("POST", self.path,
                                          "email=ann%40example.org&email=ann%40example.org")
        self.assertEqual((status, reply["email"]), (200, "ann@example.org"))

    async def test_valid_for_and_telephone_are_kept(self) -> None:
        status, reply = await self.f.form(
            "POST", self.path, "email=ann%40example.org&telephone=442077394252&valid_for=3600")
        self.assertEqual(status, 200)
        self.assertEqual({k: v for k, v in reply.items() if k != "id"}, {
            "telephone": "442077394252", "valid_for": 3600, "email": "ann@example.org"})
        status, changed = await self.f.form("PUT", f"{self.path}/{reply['id']}", "telephone=")
        self.assertEqual((status, changed["telephone"]), (200, ""))

    async def test_valid_for_is_at_most_ten_years(self) -> None:
        # Sending adds valid_for to the moment of sending; 2**63 - 1 seconds is past the
        # year 9999, and every later ?send of the bundle answered 500.
        status, reply = await self.f.form("POST", self.path,
                                          "email=ann%40example.org&valid_for=315360000")
        self.assertEqual((status, reply["valid_for"]), (200, MAX_VALID_FOR))
        recipient = f"{self.path}/{reply['id']}"
        for body in ("valid_for=9223372036854775807", "valid_for=315360001"):
            status, refused = await self.f.form("PUT", recipient, body)
            self.assertEqual(status, 400, body)
            self.assertEqual(list(refused["errors"]), ["valid_for"])
            self.assertIn("valid_for", refused["error"])
        status, _, refused = await self.f.call(
            "PUT", recipient, json.dumps({"valid_for": 2**63 - 1}).encode(),
            {"Content-Type": "application/json"})
        self.assertEqual((status, list(refused["errors"])), (400, ["valid_for"]))
        _, _, shown = await self.f.call("GET", recipient)
        self.assertEqual(shown["valid_for"], MAX_VALID_FOR)


class SendTests(TestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        self.f = SafedropFixture()
        await self.f.start(self)

    async def ready_bundle(self, body: str = "subject=Q3+report&message=See+attached.") -> int:
        bundle_id = await self.f.bundle(body)
        for address in ("ann%40example.org", "bob%40example.net"):
            status, _ = await self.f.form(
                "POST", f"/dropbundles/{bundle_id}/dropbundlerecipients",
                f"email={address}&valid_for=" + ("3600" if address.startswith("ann") else "0"),
            )
            self.assertEqual(status, 200)
        status, _, _ = await self.f.call(
            "POST", f"/dropbundles/{bundle_id}/dropfiles", multipart_file("q3.pdf", b"%PDF"),
            MULTIPART)
        self.assertEqual(status, 200)
        return bundle_id

    async def test_each_recipient_gets_its_own_link_and_no_secret(self) -> None:
        bundle_id = await self.ready_bundle(
            "subject=Q3+report&message=See+attached.&password=Open-Sesame-77"
            "&secure_message=vault+code+Kx7-Quokka&expiry_date=2031-01-01T00%3A00%3A00Z")
        status, _, body = await self.f.call("GET", f"/dropbundles/{bundle_id}?send")
        self.assertEqual((status, body), (200, b"OK"))
        mails = self.f.spooled()
        self.assertEqual([m[2] for m in mails], ["ann@example.org", "bob@example.net"])
        links = []
        for kind, sender, rcpt, raw in mails:
            self.assertEqual((kind, sender), ("notification", "alice@example.test"))
            text = raw.decode()
            self.assertIn("Subject: Secure drop from alice@example.test: Q3 report", text)
            self.assertIn(f"To: {rcpt}", text)
            self.assertIn("Reply-To: alice@example.test", text)
            self.assertIn("See attached.", text)
            self.assertIn("q3.pdf", text)
            self.assertNotIn("Open-Sesame", text)
            self.assertNotIn("Quokka", text)  # letters: a Message-ID holds digits
            found = re.findall(r"https://localhost/drop/([A-Za-z0-9_-]{43})\b", text)
            self.assertEqual(len(found), 1, text)
            links.append(found[0])
        self.assertNotEqual(links[0], links[1])
        # ann's valid_for (an hour) comes before the bundle's expiry; bob has only the latter.
        self.assertIn("available until 2023-11-14T23:13:20Z", mails[0][3].decode())
        self.assertIn("available until 2031-01-01T00:00:00Z", mails[1][3].decode())
        # Only digests of the links are stored.
        rows: list[Any] = []
        self.f.web.core.db.read("r", lambda c: list(c.execute(
            sa.select(drop_recipients.c.link_digest)))).addCallback(rows.extend)
        stored = {bytes(r.link_digest) for r in rows}
        self.assertEqual(stored, {hashlib.sha256(t.encode()).digest() for t in links})
        # Sending again changes nothing.
        status, _, reply = await self.f.call("GET", f"/dropbundles/{bundle_id}?send")
        self.assertEqual(status, 405, reply)
        self.assertEqual(len(self.f.spooled()), 2)

    async def test_send_takes_a_boolean_and_refuses_anything_else(self) -> None:
        """The seed sends with `?send` and writes booleans as 0 and 1: `?send=0` (or
        false) asked for no send and was sent all the same (the parameter's presence was
        read, not its value); a value that is no boolean, or `send` given twice with two
        values, is a 400 naming it, nothing sent (found by the lead's audit)."""
        bundle_id = await self.ready_bundle()
        for no in ("0", "false", "no", "off", "FALSE"):
            status, _, body = await self.f.call("GET", f"/dropbundles/{bundle_id}?send={no}")
            self.assertEqual((status, body["id"], body["subject"]),
                             (200, bundle_id, "Q3 report"), no)
        for bad in ("2", "maybe", "0x1", "send&send=0", "1&send=0"):
            status, _, body = await self.f.call("GET", f"/dropbundles/{bundle_id}?send={bad}")
            self.assertEqual(status, 400, bad)
            self.assertEqual(list(body["errors"]), ["send"], bad)
            status, _, _ = await self.f.call("HEAD", f"/dropbundles/{bundle_id}?send={bad}")
            self.assertEqual(status, 400, bad)
        self.assertEqual(self.f.spooled(), [])
        _, _, shown = await self.f.call("GET", f"/dropbundles/{bundle_id}/dropbundlerecipients")
        status, _, _ = await self.f.call("PUT", f"/dropbundles/{bundle_id}", b"subject=still",
                                         {"Content-Type": "application/x-www-form-urlencoded"})
        self.assertEqual(status, 200)  # not sent: it can be changed
        status, _, body = await self.f.call("GET", f"/dropbundles/{bundle_id}?send=1&send=1")
        self.assertEqual((status, body), (200, b"OK"))
        self.assertEqual(len(self.f.spooled()), len(shown))
        other = await self.ready_bundle()
        status, _, body = await self.f.call("GET", f"/dropbundles/{other}?send=true")
        self.assertEqual((status, body), (200, b"OK"))

    async def test_an_encoded_word_in_the_subject_adds_no_header_field(self) -> None:
        """The `email` package decodes RFC 2047 words in a Subject, and Python 3.11.7 wrote a
        decoded CR LF out as it is (CVE-2024-6923): this subject added Bcc and Content-Type
        fields to every notification (found by an audit). A bundle stored with such a
        subject before it was refused keeps it out of the Subject (the text shows it as
        written)."""
        subject = "=?utf-8?b?" + base64.b64encode(
            b"\r\nBcc: evil@x.test\r\nContent-Type: text/html").decode() + "?="
        bundle_id = await self.ready_bundle()
        await self.f.web.core.db.run("old", lambda c: c.execute(sa.update(drop_bundles).where(
            drop_bundles.c.id == bundle_id).values(subject=subject)))
        status, _, body = await self.f.call("GET", f"/dropbundles/{bundle_id}?send")
        self.assertEqual((status, body), (200, b"OK"))
        mails = self.f.spooled()
        self.assertEqual(len(mails), 2)
        for *_, raw in mails:
            head = raw.partition(b"\r\n\r\n")[0]
            names = [line.split(b":", 1)[0] for line in head.split(b"\r\n")
                     if not line.startswith((b" ", b"\t"))]
            self.assertEqual(names, [b"From", b"Reply-To", b"To", b"Subject", b"Date",
                                     b"Message-ID", b"Auto-Submitted", b"Content-Type",
                                     b"Content-Transfer-Encoding", b"MIME-Version"])
            message: Any = email.message_from_bytes(raw, policy=email.policy.default)
            self.assertEqual(message["Subject"], "Secure drop from alice@example.test")
            self.assertEqual(message.get_content_type(), "text/plain")
            self.assertIn(f"Subject: {subject}", message.get_content())

    async def test_an_encoded_word_decoding_to_a_bidi_control_stays_out_of_the_subject(
            self) -> None:
        """A subject's bidirectional controls are taken (text the sender may write) and
        shown without them, on the page and in the mails; but one inside an RFC 2047 word
        reached the notification's Subject, which mail readers decode: "Pay
        =?utf-8?q?=E2=80=AEfdp.exe?=" read "Pay exe.pdf" in the recipient's inbox (found
        attacking the mails, session 46). Such a subject is left out of the Subject (the
        text shows it as written); a word decoding to plain text stays, decoded."""
        for subject, shown_as in (
                ("Pay =?utf-8?q?=E2=80=AEfdp.exe?=", None),  # right-to-left override
                ("Pay =?utf-8?b?" + base64.b64encode("\u2067fdp.exe".encode()).decode()
                 + "?=", None),  # right-to-left isolate
                ("=?utf-8?q?=E2=80=8F?= Pay", None),  # right-to-left mark
                ("=?utf-8?q?caf=C3=A9?=", "caf\u00e9"),
        ):
            bundle_id = await self.ready_bundle("subject=" + quote(subject))
            status, _, body = await self.f.call("GET", f"/dropbundles/{bundle_id}?send")
            self.assertEqual((status, body), (200, b"OK"), subject)
            messages: list[Any] = [
                email.message_from_bytes(raw, policy=email.policy.default)
                for *_, raw in self.f.spooled()]
            # This bundle's: the text shows the subject as written.
            mine = [m for m in messages
                    if f"Subject: {subject}" in m.get_content().splitlines()]
            self.assertEqual(len(mine), 2, subject)
            expected = "Secure drop from alice@example.test"
            if shown_as is not None:
                expected += ": " + shown_as
            for message in mine:
                self.assertEqual(message["Subject"], expected, subject)

    async def test_a_sender_address_spelling_an_encoded_word_is_left_out_of_the_fields(
            self) -> None:
        """The owner's account email, stored before such addresses were refused, spells an
        RFC 2047 word decoding to CR LF: the notification's Reply-To could not be written,
        so the send failed (500) and so would every mail to that sender (receipts, replies,
        the expiry summary). The address is left out of the header fields it would break
        (shown in the text); a mail to it goes To undisclosed-recipients:;."""
        old = "=?utf-8?q?=0d=0aBcc:_evil=40x.test?=@example.test"
        bundle_id = await self.ready_bundle()
        await self.f.web.core.db.run("old", lambda c: c.execute(sa.update(users).where(
            users.c.email == "alice@example.test").values(email=old)))
        status, _, body = await self.f.call("GET", f"/dropbundles/{bundle_id}?send")
        self.assertEqual((status, body), (200, b"OK"))
        mails = self.f.spooled()
        self.assertEqual(len(mails), 2)
        for _, sender, rcpt, raw in mails:
            self.assertEqual(sender, old)
            message: Any = email.message_from_bytes(raw, policy=email.policy.default)
            self.assertEqual((message["Subject"], message["To"], message["Reply-To"]),
                             ("Secure drop: Q3 report", rcpt, None))
            self.assertNotIn(b"Bcc", raw.partition(b"\r\n\r\n")[0])
            self.assertIn(f"{old} has sent you a secure drop.", message.get_content())
        self.assertEqual(to_field(old), "undisclosed-recipients:;")
        self.assertEqual(to_field("ann@example.org"), "ann@example.org")

    async def test_a_subject_whose_encoded_words_decode_to_a_line_break_is_refused(
            self) -> None:
        # Found by an audit: such a subject was stored and the bundle sent, its mails
        # leaving it out of their Subject; it is the 400 of a raw line break.
        bundle_id = await self.f.bundle("subject=before")
        raw_break = await self.f.form("POST", "/dropbundles", "subject=a%0D%0AX%3A+y")
        self.assertEqual(raw_break[0], 400)
        for words in (b"\r\nBcc: evil@x.test", b"a\nb", b"\x00"):
            subject = "Hi =?utf-8?b?" + base64.b64encode(words).decode() + "?="
            for method, path in (("POST", "/dropbundles"), ("PUT", f"/dropbundles/{bundle_id}")):
                self.assertEqual(await self.f.form(method, path, f"subject={quote(subject)}"),
                                 raw_break, (method, words))
        status, reply = await self.f.form(
            "PUT", f"/dropbundles/{bundle_id}", "subject=" + quote("=?utf-8?q?caf=C3=A9?="))
        self.assertEqual((status, reply["subject"]), (200, "=?utf-8?q?caf=C3=A9?="))
        self.assertEqual([r.subject for r in self.f.bundle_rows()], ["=?utf-8?q?caf=C3=A9?="])

    async def test_a_notification_that_cannot_be_queued_leaves_the_bundle_unsent(
            self) -> None:
        # Found by an audit: bob's notification failed to be queued, the send answered 200
        # OK and the bundle was locked as sent, so bob could never be told. Here bob's
        # queue id is taken already, so its insert fails.
        bundle_id = await self.ready_bundle()
        taken = "0000000TAKEN"
        await self.f.web.core.spool.accept(taken, Envelope(
            "x@example.test", (Recipient("y@example.test", None),)), b"Subject: x\r\n\r\nx\r\n")
        ids = iter(["0000000ANN01", taken])
        self.patch(spool, "new_queue_id", lambda _now: next(ids))
        status, _, _ = await self.f.call("GET", f"/dropbundles/{bundle_id}?send")
        self.assertEqual(status, 500)
        self.assertTrue(self.flushLoggedErrors(sqlite3.IntegrityError))
        self.assertEqual([m[2] for m in self.f.spooled()], ["y@example.test"])
        # Nothing is sent: the client sends it again.
        status, _ = await self.f.form("PUT", f"/dropbundles/{bundle_id}", "subject=Again")
        self.assertEqual(status, 200)
        self.patch(spool, "new_queue_id", new_queue_id)
        status, _, body = await self.f.call("GET", f"/dropbundles/{bundle_id}?send")
        self.assertEqual((status, body), (200, b"OK"))
        self.assertEqual([m[2] for m in self.f.spooled()],
                         ["ann@example.org", "bob@example.net", "y@example.test"])

    async def test_a_send_while_the_database_cannot_be_reached_is_503(self) -> None:
        """The session is known without the database, so the send reaches the spool, whose
        group commit cannot connect: its callers get SpoolError. That was a 500 'Internal
        server error.' with a traceback per request while every other request of the same
        outage answered 503 (mailcore.outages): the SpoolError did not carry its cause."""
        bundle_id = await self.ready_bundle()
        db = self.f.web.core.db
        connect = db.engine.connect

        def refused(*args: Any, **kwargs: Any) -> Any:
            raise sa.exc.OperationalError(
                "connect", {}, Exception("connection failed: Connection refused"))

        self.patch(db.engine, "connect", refused)
        status, headers, reply = await self.f.call("GET", f"/dropbundles/{bundle_id}?send")
        self.assertEqual(status, 503, reply)
        self.assertEqual(header(headers, "Retry-After"), "30")
        self.assertEqual(self.flushLoggedErrors(SpoolError), [])  # not logged as a bug
        self.flushLoggedErrors(sa.exc.OperationalError)  # the spool's line of the outage
        # Nothing was sent: once the database is back, the send goes through.
        self.patch(db.engine, "connect", connect)
        status, _, body = await self.f.call("GET", f"/dropbundles/{bundle_id}?send")
        self.assertEqual((status, body), (200, b"OK"))
        self.assertEqual(len(self.f.spooled()), 2)

    def routed(self) -> list[tuple[str, int | None]]:
        """(address, served domain id) of every queued recipient, by address."""
        rows: list[Any] = []
        self.f.web.core.db.read("r", lambda c: list(c.execute(
            sa.select(queue_recipients.c.address, queue_recipients.c.domain_id)
            .order_by(queue_recipients.c.address)))).addCallback(rows.extend)
        return [tuple(r) for r in rows]

    async def test_safedrop_mail_to_a_served_domain_goes_to_its_next_hop(self) -> None:
        # Found by an audit: a notification was queued with no domain, so mail to a served
        # domain skipped its configured next hop for an MX lookup (the Mail API's outbox
        # routes it by the domain).
        core = self.f.web.core
        org = await core.domains.add("example.org", self.f.alice.id, "mx.example.org",
                                     verified=True)
        own = await core.domains.add("example.test", self.f.alice.id, "mx.example.test",
                                     verified=True)
        bundle_id = await self.ready_bundle("subject=Q3")
        await self.f.form("POST", f"/dropbundles/{bundle_id}/dropbundlerecipients",
                          "email=Cy%40EXAMPLE.org")
        status, _, body = await self.f.call("GET", f"/dropbundles/{bundle_id}?send")
        self.assertEqual((status, body), (200, b"OK"))
        self.assertEqual(self.routed(), [
            ("Cy@EXAMPLE.org", org.id), ("ann@example.org", org.id),
            ("bob@example.net", None)])
        # And safedrop's own mail (here a reply to the sender).
        ann = self.f.spooled()[1][3].decode()
        [token] = re.findall(r"https://localhost/drop/([A-Za-z0-9_-]{43})\b", ann)
        await core.safedrop.comment(await core.safedrop.open_link(token), "Thanks")
        self.assertIn(("alice@example.test", own.id), self.routed())

    async def test_a_stored_valid_for_past_ten_years_sends_with_ten_years(self) -> None:
        # A row written before the API refused such a valid_for: the send used to overflow
        # (500) on every try.
        bundle_id = await self.ready_bundle()
        await self.f.web.core.db.run("huge", lambda c: c.execute(
            sa.update(drop_recipients).where(drop_recipients.c.email == "ann@example.org")
            .values(valid_for=2**63 - 1)))
        status, _, body = await self.f.call("GET", f"/dropbundles/{bundle_id}?send")
        self.assertEqual((status, body), (200, b"OK"))
        ann = self.f.spooled()[0]
        self.assertEqual(ann[2], "ann@example.org")
        self.assertIn("available until 2033-11-11T22:13:20Z", ann[3].decode())

    async def test_a_head_of_the_send_answers_as_the_send_would_and_sends_nothing(
            self) -> None:
        """HEAD is safe (RFC 9110 9.2.1): `HEAD /dropbundles/N?send` (a link checker, `curl
        -I`) sent the bundle, mailing every recipient, and left it unchangeable."""
        empty = await self.f.bundle()
        status, _, _ = await self.f.call("HEAD", f"/dropbundles/{empty}?send")
        self.assertEqual(status, 400)
        bundle_id = await self.ready_bundle()
        status, headers, body = await self.f.call("HEAD", f"/dropbundles/{bundle_id}?send")
        self.assertEqual((status, header(headers, "Content-Type"), body),
                         (200, "text/plain", b""))
        self.assertEqual(self.f.spooled(), [])
        self.assertIsNone(self.f.bundle_rows()[-1].sent_at)
        status, _ = await self.f.form("PUT", f"/dropbundles/{bundle_id}", "subject=still")
        self.assertEqual(status, 200)
        bob = await self.f.web.user("bob")
        bob_token = await self.f.login("bob@example.test", await self.f.web.credential(bob))
        status, _, _ = await self.f.call("HEAD", f"/dropbundles/{bundle_id}?send",
                                         token=bob_token)
        self.assertEqual(status, 404)
        # The GET sends; a HEAD afterwards answers the 405 a second send gets.
        status, _, body = await self.f.call("GET", f"/dropbundles/{bundle_id}?send")
        self.assertEqual((status, body), (200, b"OK"))
        self.assertEqual(len(self.f.spooled()), 2)
        status, headers, _ = await self.f.call("HEAD", f"/dropbundles/{bundle_id}?send")
        self.assertEqual((status, header(headers, "Allow")), (405, "GET, HEAD"))
        self.assertEqual(len(self.f.spooled()), 2)

    async def test_sending_needs_a_recipient_a_file_and_a_future_expiry(self) -> None:
        empty = await self.f.bundle()
        status, _, reply = await self.f.call("GET", f"/dropbundles/{empty}?send")
        self.assertEqual((status, list(reply["errors"])), (400, ["recipients"]))
        await self.f.form("POST", f"/dropbundles/{empty}/dropbundlerecipients",
                          "email=a%40b.test")
        status, _, reply = await self.f.call("GET", f"/dropbundles/{empty}?send")
        self.assertEqual((status, list(reply["errors"])), (400, ["files"]))
        # START is 2023-11-14T22:13:20Z: a minute to go, then past.
        past = await self.ready_bundle("expiry_date=2023-11-14T22%3A14%3A20Z")
        self.f.web.clock.advance(120)
        status, _, reply = await self.f.call("GET", f"/dropbundles/{past}?send")
        self.assertEqual((status, list(reply["errors"])), (400, ["expiry_date"]))
        self.assertEqual(self.f.spooled(), [])
        # Still changeable: nothing was sent.
        status, _ = await self.f.form("PUT", f"/dropbundles/{past}", "expiry_date=")
        self.assertEqual(status, 200)
