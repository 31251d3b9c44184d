"""HEAD is safe on every route: the guard that keeps it so (web.api.is_head).

Werkzeug routes a HEAD to the route that takes GET and twisted.web only drops the body it
writes, so every GET route answers HEAD by running its GET. A GET that changes something
(mints a token, sends or releases mail, marks mail read, records an opening or a download)
must ask `is_head` and change nothing for a HEAD (RFC 9110 9.2.1: a link checker, a proxy's
probe, `curl -I`). This test enumerates every route of every app of the HTTP tree (each
Klein url_map), HEADs each one that answers GET with a valid credential of its API and ids
that exist, on a real store (SQLite), and checks that no row of any table changed but the
columns `REFRESHED_ON_USE` allows (the queue's tables among them: no mail was queued), then
that a GET answers the same status and Content-Length. A GET route added later fails here
until `requests` or `build_estate` says how to request it with ids that exist, or
`CANNOT_REQUEST` says why it cannot; one that changes state on a HEAD fails on its rows.
"""

from __future__ import annotations

import base64
import datetime
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import sqlalchemy as sa
from twisted.trial.unittest import TestCase
from twisted.web.iweb import UNKNOWN_LENGTH

import mailcore.backup.mail as backup_mail
import mailcore.billing.invoices as invoices_module
from mailcore.config import Config
from mailcore.fetch.jobs import thd_create_job
from mailcore.fetch.state import thd_folder
from mailcore.gateway.quarantine import ToKeep
from mailcore.mailapi.delivery import LocalMailboxes
from mailcore.mailapi.files import MailFiles
from mailcore.messages import parts
from mailcore.messages.models import FetchedMessage, Location
from mailcore.safedrop.service import link_digest
from mailcore.store.schema import (
    mailapi_attachments,
    mailapi_mail,
    message_attachments,
    queue_messages,
)
from tests.support.imap2api import FETCH_KEY
from tests.support.oauth import authorize_uri, register
from tests.support.web import BASE, Web, header
from web.oauth_pages import SESSION_COOKIE, SESSION_SCOPE

# Columns a request may change as a use, not as a change of state (web.api.is_head): a HEAD
# counts as a request as a GET does.
REFRESHED_ON_USE: Mapping[str, frozenset[str] | None] = {
    # When a credential was last used (refreshed at most once a minute,
    # mailcore.identity.service): a HEAD is a use of it.
    "credentials": frozenset({"last_used_at"}),
    # Rate-limit buckets (web.ratelimit.SharedRateLimiter): every request is counted.
    "rate_buckets": None,  # None: the whole table
}

# Routes that answer GET which this test cannot request, with the reason. Empty: every one
# is requested below. A route named here is still checked to exist (a stale entry fails).
CANNOT_REQUEST: Mapping[str, str] = {}

# Requests whose GET answers the state it changed, so its length is not the HEAD's.
GET_CHANGES_REPLY: Mapping[str, str] = {
    # The GET shows the mail it marked read ("read": true), the HEAD the mail as it is.
    "mailapi /api/v1/mail/<mail_id>": "marks read",
}

# Routes whose HEAD may leave Content-Length out (RFC 9110 9.3.2: a field known only once
# the content is made), and why; one it sends is the GET's all the same (8.6).
HEAD_LENGTH_UNKNOWN: Mapping[str, str] = {
    # A PDF's length is known once it is rendered; a HEAD renders nothing.
    "protecmail /api/v1/invoices/<ref>": "not rendered for a HEAD",
}

BOX = "alice@hosted.test"
VCARD = (b"BEGIN:VCARD\r\nVERSION:3.0\r\nFN:Zoe Card\r\nEMAIL:zoe@example.test\r\n"
         b"TEL:+33 1 23 45 67 89\r\nEND:VCARD\r\n")


def _mime(subject: str, sender: str, to: str, attachment: bytes, name: str,
          content_type: str = "application/octet-stream") -> bytes:
    encoded = base64.encodebytes(attachment).decode().replace("\n", "\r\n")
    return (
        f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
        "Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n"
        f"Message-ID: <{subject.replace(' ', '-')}@example.test>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=BB\r\n\r\n"
        "--BB\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
        f"--BB\r\nContent-Type: {content_type}\r\n"
        f'Content-Disposition: attachment; filename="{name}"\r\n'
        f"Content-Transfer-Encoding: base64\r\n\r\n{encoded}--BB--\r\n"
    ).encode()


@dataclass
class Estate:
    """One of everything the GET routes show, owned by alice, and her credentials."""

    web: Web
    # Path placeholder values by app name, then by the placeholder's name.
    ids: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The headers carrying a valid credential, by app name.
    credentials: dict[str, dict[str, str]] = field(default_factory=dict)


async def build_estate(test: TestCase) -> Estate:
    data_dir = Path(test.mktemp())
    web = Web.build(Config(data_dir=data_dir, sections={
        "fetch": {"secret_key": FETCH_KEY, "allow_loopback": True},
        "web": {"safedrop_user_rate": "1000/second"},
    }))
    core = web.core
    estate = Estate(web)
    alice = await web.user("alice")
    joe = await web.user("joe")
    key = await web.credential(alice)

    async def ok(method: str, path: str, headers: dict[str, str], status: int = 200,
                 **kwargs: Any) -> Any:
        got, reply_headers, body = await web.call(method, path, headers=headers, **kwargs)
        assert got == status, (method, path, got, body)
        return body if body != b"" else reply_headers

    # IMAP2API: a server (a fetch account, Dropmyemail's backup account too), its mail, a
    # webhook.
    token = (await ok("POST", "/api-token-auth/", {}, json={
        "username": "alice", "password": web.secrets[0]}))["token"]
    imap2api = {"Authorization": f"Token {token}"}
    account = await core.fetch.accounts.create(
        alice.id, name="a", email="a@x.test", host="127.0.0.1", port=993, use_ssl=True,
        password="pw")
    folder = await core.db.run("folder", lambda c: thd_folder(c, account.id, "INBOX").id)
    stored = await core.messages.store_batch(
        Location(alice.id, account.id, folder, "INBOX"),
        [FetchedMessage(raw=_mime("card", "Zoe <zoe@example.test>", "a@x.test", VCARD,
                                  "zoe.vcf", "text/vcard"), uid=1),
         FetchedMessage(raw=_mime("report", "Bo <bo@example.test>", "a@x.test",
                                  b"%PDF-1.4\n" + b"x" * 5000, "report.pdf"), uid=2)])
    email_id = stored.created[0]
    hook = await ok("POST", "/api/webhooks/", imap2api, 201, json={
        "url": "https://hooks.example.com/x", "events": ["email.new"]})
    estate.credentials["imap2api"] = imap2api
    estate.ids["imap2api"] = {"server_id": account.id, "email_id": email_id,
                              "webhook_id": hook["id"]}

    # The Mail API: alice's mailbox, a grant to joe, an inbox mail with an attachment
    # (unread: a GET marks it read).
    auth_key = (await ok("POST", "/api/v1/auth/", {}, json={
        "username": "alice", "password": web.secrets[0]}))["auth_key"]
    mailapi = {"Auth-Key": auth_key}
    await core.domains.add("hosted.test", alice.id, "mx.hosted.test")
    await core.mailboxes.add(BOX, alice.id)
    await ok("PUT", f"/api/v1/mailboxes/{BOX}/access/joe", mailapi, json={"allow_read": True})
    local = core.queue.runner.local_store
    assert isinstance(local, LocalMailboxes)
    prepared = await local.prepare("Q1", _mime("inbox", "s@far.test", BOX, b"A" * 3000,
                                               "a.bin"))
    await core.db.run("deliver", local.thd_store, [(1, BOX)], "Q1", prepared, 1.0)
    mail_id = await core.db.read("mail", lambda c: c.execute(
        sa.select(mailapi_mail.c.public_id)).scalar_one())
    estate.credentials["mailapi"] = mailapi
    estate.ids["mailapi"] = {"mail_id": mail_id, "index": 1, "email": BOX,
                             "username": joe.username}

    # Protecmail: a domain, an invoice, a held message (a GET releases it).
    protecmail = {"Api-Key": key}
    domain = await core.domains.add("q.test", alice.id, "mx.q.test")
    await core.domains.refresh()
    invoice = await core.invoices.buy(alice.id, 10_000, "60")
    [ident] = await core.quarantine.keep(
        [ToKeep("Q2", "spammer@x.test", "ann@q.test", domain.id, "spam", "GTUBE")],
        b"From: spammer@x.test\r\nSubject: spam\r\n\r\n" + b"held " * 1000)
    estate.credentials["protecmail"] = protecmail
    estate.ids["protecmail"] = {"domain": "q.test", "ref": invoice.ref, "ident": ident,
                                "target": "q.test", "start": 0, "count": 3}
    # The release page of the held message's digest link.
    release_link = core.quarantine.link(ident, None)
    estate.ids["quarantine"] = {"token": release_link.rpartition("/")[2]}
    estate.credentials["quarantine"] = {}

    # safedrop: a session token; a bundle sent to ann (read_remove: each download counts)
    # with a file, and one ready to send (a GET of ?send sends it).
    headers = await ok("GET", "/auth", {"X-Auth-User": alice.email, "X-Auth-Key": key}, 204)
    safedrop = {"X-Auth-Token": header(headers, "X-Auth-Token") or ""}
    form = {**safedrop, "Content-Type": "application/x-www-form-urlencoded"}
    bundles = []
    for subject in ("sent", "ready"):
        bundle = await ok("POST", "/dropbundles", form, data=f"subject={subject}".encode())
        recipient = await ok("POST", f"/dropbundles/{bundle['id']}/dropbundlerecipients",
                             form, data=b"email=ann%40example.org")
        body = (b"--B\r\nContent-Disposition: form-data; name=\"the_file\"; "
                b"filename=\"r.txt\"\r\nContent-Type: text/plain\r\n\r\n"
                + b"0123456789" * 500 + b"\r\n--B--\r\n")
        dropped = await ok("POST", f"/dropbundles/{bundle['id']}/dropfiles",
                           {**safedrop, "Content-Type": "multipart/form-data; boundary=B"},
                           data=body)
        bundles.append((bundle["id"], recipient["id"], dropped["id"]))
    sent, ready = bundles
    await ok("GET", f"/dropbundles/{sent[0]}?send", safedrop)
    [raw] = await core.db.read("spooled", lambda c: c.execute(
        sa.select(queue_messages.c.body)).scalars().all())
    link = re.search(rb"https://[^/\s]+(/drop/[A-Za-z0-9_-]{43})", bytes(raw))
    assert link is not None
    drop_token = link.group(1).decode().rpartition("/")[2]
    estate.credentials["safedrop"] = safedrop
    estate.ids["safedrop"] = {"bundle_id": ready[0], "recipient_id": ready[1],
                              "file_id": ready[2]}
    estate.ids["drop"] = {"token": drop_token, "file_id": sent[2]}
    grant = core.safedrop.grants.make_download(link_digest(drop_token), sent[2],
                                               web.clock.seconds())
    estate.credentials["drop"] = {}
    estate.ids["drop_grant"] = {"Cookie": f"mc_drop_dl={grant}"}

    # Dropmyemail: a token of every scope; the backup account above; a migrate and a
    # restore; the attachments described and the contacts worked out (caches a first
    # GET fills, filled here before the HEADs).
    app = await register(web, alice)
    bearer = {"Authorization": "Bearer " + (await app.token(
        "read write email attachment contact"))["access_token"]}
    base = f"/v1/accounts/{account.id}"
    # A migrate logs in to its destination when it is made: one that ran is stored here.
    now = datetime.datetime.fromtimestamp(web.clock.seconds(), datetime.UTC)
    migrate_id = await core.db.run("migrate", lambda c: thd_create_job(c, dict(
        kind="migrate", user_id=alice.id, account_id=account.id, status="done",
        email="m@x.test", host="imap.x.test", port=993, created_at=now, updated_at=now)))
    restore = await ok("POST", f"{base}/restores", bearer, 201)
    await ok("GET", f"{base}/attachments", bearer)
    contacts = await ok("GET", f"{base}/contacts", bearer)
    attachment_id = await core.db.read("att", lambda c: c.execute(
        sa.select(message_attachments.c.id).order_by(message_attachments.c.id)).scalars()
        .first())
    estate.credentials["dropmyemail"] = bearer
    estate.ids["dropmyemail"] = {
        "account_id": account.id, "mailbox_id": folder, "message_id": email_id,
        "attachment_id": attachment_id, "contact_id": contacts["contacts"][0]["id"],
        "migrate_id": migrate_id, "restore_id": restore["id"]}

    # The OAuth pages: a pending authorization request of a registered app, and a browser
    # logged in to them (its consent page, its apps).
    estate.ids["oauth_pages"] = {"authorize": authorize_uri(app.uid).partition("?")[2]}
    session = await web.credential(alice, "page", label="authorization page",
                                   scopes=(SESSION_SCOPE,))
    estate.ids["oauth_session"] = {"Cookie": f"{SESSION_COOKIE}={session}"}
    estate.credentials["oauth_pages"] = {}
    for name in ("static", "meta"):
        estate.ids[name] = {}
        estate.credentials[name] = {}
    return estate


def requests(estate: Estate) -> dict[str, list[tuple[str, dict[str, str]]]]:
    """The HEADs to make of each route ("app rule"): (path with query, extra headers). The
    rule's placeholders take the app's ids; a route with variants that change state
    differently (safedrop's ?send, a read_remove download with and without its button)
    has one request each."""
    ids = estate.ids
    drop = ids["drop"]
    dme = f"/v1/accounts/{ids['dropmyemail']['account_id']}"
    key = estate.credentials["protecmail"]["Api-Key"]
    alice = "alice@example.test"
    return {
        # safedrop's auth server: the key (a GET mints a token), and a token alone.
        "safedrop /": [("/", {"X-Auth-User": alice, "X-Auth-Key": key}),
                       ("/", estate.credentials["safedrop"])],
        "safedrop /auth": [("/auth", {"X-Auth-User": alice, "X-Auth-Key": key})],
        # A GET of ?send mails every recipient.
        "safedrop /dropbundles/<int:bundle_id>": [
            (f"/dropbundles/{ids['safedrop']['bundle_id']}", {}),
            (f"/dropbundles/{ids['safedrop']['bundle_id']}?send", {})],
        # A GET of the link records an opening (and mails a receipt).
        "drop /drop/<token>": [(f"/drop/{drop['token']}", {})],
        # Without its button, the page with the button; with it (the grant cookie), the
        # download, which a GET counts.
        "drop /drop/<token>/files/<int:file_id>": [
            (f"/drop/{drop['token']}/files/{drop['file_id']}", {}),
            (f"/drop/{drop['token']}/files/{drop['file_id']}", ids["drop_grant"])],
        "dropmyemail /v1/accounts/<int:account_id>/attachments_search": [
            (f"{dme}/attachments_search?query=report", {})],
        "dropmyemail /v1/accounts/<int:account_id>/messages/search": [
            (f"{dme}/messages/search?query=report", {})],
        # Logged out, the login form; logged in, the consent page, the user's apps and the apps
        # the user let in.
        "oauth_pages /oauth/authorize": [
            (f"/oauth/authorize?{ids['oauth_pages']['authorize']}", {}),
            (f"/oauth/authorize?{ids['oauth_pages']['authorize']}", ids["oauth_session"])],
        "oauth_pages /oauth/applications": [
            ("/oauth/applications", {}), ("/oauth/applications", ids["oauth_session"])],
        "oauth_pages /oauth/authorized_applications": [
            ("/oauth/authorized_applications", {}),
            ("/oauth/authorized_applications", ids["oauth_session"])],
    }


_PLACEHOLDER = re.compile(r"<(?:[a-zA-Z_]+(?:\([^)]*\))?:)?(?P<name>[a-zA-Z_]\w*)>")


def get_routes(web: Web) -> dict[str, str]:
    """Every route that answers GET: "app rule" -> app name."""
    found = {}
    for app in web.root.apps.values():
        for rule in app.app.url_map.iter_rules():
            if "GET" in (rule.methods or ()):
                found[f"{app.name} {rule.rule}"] = app.name
    return found


def filled(rule: str, values: Mapping[str, Any]) -> str:
    """`rule` with each placeholder replaced by its value (KeyError: none given)."""
    return _PLACEHOLDER.sub(lambda m: str(values[m.group("name")]), rule)


def snapshot(conn: sa.Connection) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table of the store, but the columns REFRESHED_ON_USE allows to
    change, in a stable order."""
    tables: dict[str, list[tuple[Any, ...]]] = {}
    for name in sa.inspect(conn).get_table_names():
        allowed = REFRESHED_ON_USE.get(name, frozenset())
        if allowed is None:
            continue
        result = conn.execute(sa.text(f'SELECT * FROM "{name}"'))
        keep = [i for i, column in enumerate(result.keys()) if column not in allowed]
        tables[name] = sorted((tuple(row[i] for i in keep) for row in result), key=repr)
    return tables


def changes(before: dict[str, list[tuple[Any, ...]]],
            after: dict[str, list[tuple[Any, ...]]]) -> dict[str, Any]:
    """The rows gone and new of each table that differs."""
    found = {}
    for name in sorted(set(before) | set(after)):
        was, now = before.get(name, []), after.get(name, [])
        if was != now:
            found[name] = {"gone": [r for r in was if r not in now],
                           "new": [r for r in now if r not in was]}
    return found


class HeadChangesNothingTests(TestCase):
    async def test_every_get_route_answers_head_with_nothing_changed(self) -> None:
        estate = await build_estate(self)
        web = estate.web
        routes = get_routes(web)
        special = requests(estate)
        self.assertLessEqual(set(CANNOT_REQUEST), set(routes), "stale CANNOT_REQUEST entries")
        self.assertLessEqual(set(special), set(routes), "requests for no route")
        self.assertLessEqual(set(HEAD_LENGTH_UNKNOWN), set(routes), "stale entries")
        unrequestable = []
        made = 0
        for route, app in sorted(routes.items()):
            if route in CANNOT_REQUEST:
                continue
            rule = route.partition(" ")[2]
            try:
                wanted = special.get(route) or [(filled(rule, estate.ids[app]), {})]
                credential = estate.credentials[app]
            except KeyError as e:
                unrequestable.append(f"{route} (no value for {e})")
                continue
            for path, extra in wanted:
                headers = {**credential, **extra}
                web.clock.advance(1)  # within every API's rate (a burst of 20 at most)
                before = await web.core.db.read("snapshot", snapshot)
                status, head_headers, body = await web.call("HEAD", path, headers=headers)
                after = await web.core.db.read("snapshot", snapshot)
                self.assertEqual(changes(before, after), {}, f"HEAD {path} changed rows")
                self.assertEqual(body, b"", path)
                # Exercised: the route answered as for a good request, not a refusal.
                self.assertLess(status, 400, (path, status))
                # The GET's status and length are the HEAD's (RFC 9110 9.3.2); the client
                # takes a GET's Content-Length as the response's length.
                response = await web.http.request("GET", BASE + path, headers=headers)
                await response.content()
                length = None if response.length == UNKNOWN_LENGTH else str(response.length)
                self.assertEqual(response.code, status, path)
                said = header(head_headers, "Content-Length")
                if route in HEAD_LENGTH_UNKNOWN and said is None:
                    pass
                elif route not in GET_CHANGES_REPLY and status not in (204, 304):  # no body
                    self.assertEqual(length, said, path)
                made += 1
        # A GET route added without a way to request it here fails, naming it: add it to
        # `requests` (or its ids to build_estate), or say in CANNOT_REQUEST why not.
        self.assertEqual(unrequestable, [])
        self.assertGreaterEqual(made, len(routes) - len(CANNOT_REQUEST))


def _remove_files(root: Path) -> None:
    for path in [p for p in root.rglob("*") if p.is_file()]:
        path.unlink()


class Statements:
    """The SQL statements the store runs while it is listened to (a real engine's events)."""

    def __init__(self, test: TestCase, engine: sa.Engine) -> None:
        self.seen: list[str] = []

        def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            self.seen.append(statement)

        sa.event.listen(engine, "before_cursor_execute", seen)
        test.addCleanup(sa.event.remove, engine, "before_cursor_execute", seen)

    def naming(self, text: str) -> list[str]:
        return [s for s in self.seen if text in s]


class CountingFiles(MailFiles):
    """The Mail API's file store, counting the files it opens."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.opened = 0

    def open(self, sha256: str) -> BinaryIO:
        self.opened += 1
        return super().open(sha256)


class HeadReadsNoBodyTests(TestCase):
    """A HEAD answers from what the store knows of a body (its size), and reads none of it:
    a HEAD of Protecmail's release read the whole held message (check_release), one of a
    Mail API attachment read its whole file a chunk at a time (the body dropped by
    twisted.web), one of a backed-up message (Dropmyemail) read and base64-encoded it."""

    async def setUp(self) -> None:  # type: ignore[override]
        self.estate = await build_estate(self)
        self.web = self.estate.web
        self.statements = Statements(self, self.web.core.db.engine)

    async def head_and_get(self, app: str, path: str) -> tuple[list[str], str | None]:
        """The statements a HEAD of `path` ran, and its Content-Length (the GET's, checked
        after)."""
        headers = self.estate.credentials[app]
        self.web.clock.advance(1)
        self.statements.seen.clear()
        status, head_headers, _ = await self.web.call("HEAD", path, headers=headers)
        ran = list(self.statements.seen)
        self.assertEqual(status, 200, path)
        response = await self.web.http.request("GET", BASE + path, headers=headers)
        await response.content()
        length = header(head_headers, "Content-Length")
        self.assertEqual((response.code, str(response.length)), (200, length), path)
        return ran, length

    async def test_a_release_check_reads_no_held_message(self) -> None:
        ident = self.estate.ids["protecmail"]["ident"]
        ran, _ = await self.head_and_get("protecmail", f"/api/v1/quarantine/{ident}")
        self.assertEqual([s for s in ran if "quarantine.body" in s], [])
        # The release itself (the GET, after) read it to queue it.
        self.assertNotEqual(self.statements.naming("quarantine.body"), [])

    async def test_an_attachment_head_opens_no_file(self) -> None:
        mail = self.web.core.mail
        mail.files = counting = CountingFiles(mail.files.root)
        ids = self.estate.ids["mailapi"]
        path = f"/api/v1/mail/{ids['mail_id']}/attachments/1"
        _, length = await self.head_and_get("mailapi", path)
        self.assertEqual((length, counting.opened), ("3000", 1))  # the GET's open only
        # One whose file is gone is a 404 for a HEAD as for a GET.
        sha256 = await self.web.core.db.read("sha", lambda c: c.execute(
            sa.select(mailapi_attachments.c.sha256)).scalar_one())
        mail.files.path(sha256).unlink()
        for method in ("HEAD", "GET"):
            status, _, _ = await self.web.call(method, path, headers=self.estate.credentials[
                "mailapi"])
            self.assertEqual(status, 404, method)

    async def test_an_attachment_kept_in_its_row_is_not_read_for_a_head(self) -> None:
        """Attachments stored before migration 0019 hold their bytes in their row."""
        await self.web.core.db.run("inline", lambda c: c.execute(
            mailapi_attachments.update().values(sha256=None, data=b"B" * 3000)))
        ids = self.estate.ids["mailapi"]
        ran, length = await self.head_and_get(
            "mailapi", f"/api/v1/mail/{ids['mail_id']}/attachments/1")
        self.assertEqual(length, "3000")
        self.assertEqual([s for s in ran if "mailapi_attachments.data" in s], [])
        self.assertNotEqual(self.statements.naming("mailapi_attachments.data"), [])

    async def test_a_backed_up_message_is_not_read_for_a_head(self) -> None:
        ids = self.estate.ids["dropmyemail"]
        path = (f"/v1/accounts/{ids['account_id']}/mailboxes/{ids['mailbox_id']}"
                f"/messages/{ids['message_id']}")
        ran, _ = await self.head_and_get("dropmyemail", path)
        self.assertEqual([s for s in ran if "message_blobs.raw" in s], [])
        self.assertNotEqual(self.statements.naming("message_blobs.raw"), [])

    async def test_a_backed_up_attachment_is_not_decoded_for_a_head(self) -> None:
        """A HEAD of a Dropmyemail attachment read its message and decoded the part on the
        CPU pool (parts.check, or the email package) for its size; it answers from the
        index now, with the GET's headers."""
        decoded: list[str] = []
        check, extract = parts.check, backup_mail.extract_part

        def counting_check(*args: Any) -> Any:
            decoded.append("check")
            return check(*args)

        def counting_extract(*args: Any) -> Any:
            decoded.append("extract")
            return extract(*args)

        self.patch(parts, "check", counting_check)
        self.patch(backup_mail, "extract_part", counting_extract)
        ids = self.estate.ids["dropmyemail"]
        path = f"/v1/accounts/{ids['account_id']}/attachments/{ids['attachment_id']}"
        headers = self.estate.credentials["dropmyemail"]
        answers = []
        for method in ("HEAD", "GET"):
            self.web.clock.advance(1)
            self.statements.seen.clear()
            response = await self.web.http.request(method, BASE + path, headers=headers)
            await response.content()
            # The client takes a GET's Content-Length as the response's length.
            length = (response.headers.getRawHeaders("content-length") if method == "HEAD"
                      else [str(response.length)])
            answers.append((response.code, length,
                            *(response.headers.getRawHeaders(name)
                              for name in ("content-type", "cache-control"))))
            if method == "HEAD":
                self.assertEqual(decoded, [])
                self.assertEqual(self.statements.naming("message_blobs.raw"), [])
        self.assertEqual(answers[0], answers[1])
        self.assertEqual(answers[0][:2], (200, ["209"]))
        self.assertEqual(decoded, ["check"])  # the GET's
        # An attached message listed with size 0 may be one nested too deep for its size
        # to be known: the HEAD leaves Content-Length out rather than give a wrong one.
        await self.web.core.db.run("unknown", lambda c: c.execute(
            message_attachments.update().where(message_attachments.c.id == ids["attachment_id"])
            .values(mime_type="message/rfc822", size=0)))
        self.web.clock.advance(1)
        status, got, _ = await self.web.call("HEAD", path, headers=headers)
        self.assertEqual((status, header(got, "Content-Length")), (200, None))
        self.web.clock.advance(1)
        status, got, body = await self.web.call("GET", path, headers=headers)
        self.assertEqual(status, 200)
        self.assertNotEqual(body["size"], 0)

    async def test_an_invoice_head_renders_no_pdf(self) -> None:
        """A HEAD of an invoice rendered its PDF (0.13 s of the CPU pool) to give its
        length; it renders nothing now, and gives the length of a PDF rendered before."""
        made: list[int] = []

        def counting(*args: Any) -> bytes:
            made.append(1)
            return render(*args)

        render = invoices_module.render_invoice_pdf
        self.patch(invoices_module, "render_invoice_pdf", counting)
        path = f"/api/v1/invoices/{self.estate.ids['protecmail']['ref']}"
        headers = self.estate.credentials["protecmail"]
        self.web.clock.advance(1)
        status, head_headers, _ = await self.web.call("HEAD", path, headers=headers)
        self.assertEqual((status, header(head_headers, "Content-Type"), made),
                         (200, "application/pdf", []))
        self.assertIsNone(header(head_headers, "Content-Length"))
        response = await self.web.http.request("GET", BASE + path, headers=headers)
        pdf = await response.content()
        self.assertEqual((response.code, made), (200, [1]))
        status, head_headers, _ = await self.web.call("HEAD", path, headers=headers)
        self.assertEqual((status, header(head_headers, "Content-Length"), made),
                         (200, str(len(pdf)), [1]))
        # Another user's or an unknown invoice is a 404 for a HEAD as for a GET.
        status, _, _ = await self.web.call("HEAD", path + "0", headers=headers)
        self.assertEqual(status, 404)

    async def test_a_thread_head_reads_no_other_email(self) -> None:
        """IMAP2API's e-mail with its thread streams the thread's e-mails with their
        bodies: a HEAD reads none of them."""
        email_id = self.estate.ids["imap2api"]["email_id"]
        self.web.clock.advance(1)
        self.statements.seen.clear()
        status, _, _ = await self.web.call("HEAD", f"/api/emails/{email_id}/thread/",
                                           headers=self.estate.credentials["imap2api"])
        self.assertEqual(status, 200)
        self.assertEqual([s for s in self.statements.seen if "body_text" in s], [])

    async def test_a_drop_file_head_opens_no_file(self) -> None:
        """The drop page's download: a HEAD opened the file (to find it missing: 410) and
        read none of it; it now asks whether it is there (a stat) and opens nothing."""
        drops: Any = self.web.core.safedrop
        run = drops.io.run
        opened: list[str] = []

        def recording(fn: Any, *args: Any, **kwargs: Any) -> Any:
            if getattr(fn, "__name__", "") == "open":
                opened.append(str(getattr(fn, "__self__", "")))
            return run(fn, *args, **kwargs)

        drops.io.run = recording
        drop = self.estate.ids["drop"]
        path = f"/drop/{drop['token']}/files/{drop['file_id']}"
        # The recipient pressed its button (read_remove): this browser may download it.
        self.estate.credentials["drop"] = self.estate.ids["drop_grant"]
        _, length = await self.head_and_get("drop", path)
        self.assertEqual((length, len(opened)), ("5000", 1))  # the GET's open only

    async def test_a_drop_file_missing_on_disk_is_gone_for_a_head(self) -> None:
        drop = self.estate.ids["drop"]
        path = f"/drop/{drop['token']}/files/{drop['file_id']}"
        _remove_files(Path(self.web.core.config.data_dir, "safedrop"))
        for method in ("HEAD", "GET"):
            status, headers, _ = await self.web.call(method, path,
                                                     headers=self.estate.ids["drop_grant"])
            self.assertEqual((status, header(headers, "Content-Disposition")), (410, None),
                             method)
