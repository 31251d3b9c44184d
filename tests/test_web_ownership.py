"""Every object is scoped to its owner, shown for every route of every API.

alice owns one object of every kind (test_web_head's estate: an IMAP2API server, its mail, a
webhook; a Mail API mailbox with a grant and a mail with an attachment; Protecmail's domain,
invoice and held message; safedrop bundles, recipients and files; Dropmyemail's account, jobs,
attachments and contacts); mallory, who owns none, asks for each of them with her own valid
credential of each API. The routes are the Klein url_maps themselves: for every rule with a
placeholder and every method it serves, mallory's request for alice's object must be the
API's not-found, answered exactly as for an id that exists nowhere (same status, same body:
no existence oracle), and must change no row of the store (nothing of alice's changed,
nothing stored for mallory); HEAD included, and a parent of mallory's own with a child of
alice's. Every route without a placeholder that answers GET is read as mallory and must show
nothing of alice's, and be what she reads in a store where alice has nothing. Ids in queries
and bodies (a list's server filter, a cursor, a mail's from and read-only keys, an OAuth
app's uid, a token to revoke) are answered as ids that exist nowhere. A route added later
fails here, named, until `BODIES`, the estate or `NOT_OWNER_SCOPED` says how to ask for it
or why not.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode

import sqlalchemy as sa
from twisted.trial.unittest import TestCase

from mailcore.fetch.state import thd_folder
from mailcore.store.schema import mailapi_mail, mailboxes
from tests.support.oauth import Client, register
from tests.support.pages import csrf_cookie, csrf_field
from tests.support.web import Web, header
from tests.test_web_head import Estate, build_estate, changes, filled, snapshot
from web.oauth_pages import SESSION_COOKIE, SESSION_SCOPE

# HEAD is asked where Werkzeug adds it to a GET rule (web.api.is_head: a handler may
# answer a HEAD by a road of its own); OPTIONS never.
IGNORED_METHODS = {"OPTIONS"}

# Routes with a placeholder that do not name an object owned by a user, and why. A route
# named here must exist (a stale entry fails).
NOT_OWNER_SCOPED: Mapping[str, str] = {
    # The link's token is the credential: whoever holds it is the bundle's recipient (a
    # token of one bundle with a file of another is checked in test_a_drop_link_...).
    "drop GET /drop/<token>": "capability link, no user",
    "drop HEAD /drop/<token>": "capability link, no user",
    "drop POST /drop/<token>": "capability link, no user",
    # Signed release links mailed to the quarantined message's recipient.
    "quarantine GET /quarantine/release/<token>": "signed capability link, no user",
    "quarantine HEAD /quarantine/release/<token>": "signed capability link, no user",
    "quarantine POST /quarantine/release/<token>": "signed capability link, no user",
    # A domain name is one per store: adding one another user holds is the documented 409
    # ("already registered"), whoever holds it; it changes nothing.
    "protecmail POST /api/v1/domain/<domain>": "domain names are global (409)",
    "protecmail POST /api/v1/domais/<domain>": "domain names are global (409)",
}

# Routes without a placeholder that answer GET but show no user's objects, and why; every
# other one is read as mallory and must show nothing of alice's.
NOT_A_LIST: Mapping[str, str] = {
    "static GET /static/mailcore.css": "a stylesheet",
    "meta GET /openapi.json": "the API document, the same for everyone",
    "meta GET /metrics": "the operator's totals of the whole store, by design",
    "protecmail GET /api/v1/ping": "answers pong",
    # The consent page of an app's authorization request: any user may be asked to let
    # any registered app in (its name is shown to whoever it asks).
    "oauth_pages GET /oauth/authorize": "an app's consent page, for any user",
}

# Values that name no object at all, by placeholder: mallory's request for alice's object must
# be answered as hers for these.
ABSENT: Mapping[str, Any] = {
    "server_id": 987654, "email_id": 987654, "webhook_id": 987654,
    "mail_id": "0fedcba", "index": 1, "email": "nobody@hosted.test", "username": "nobody",
    "domain": "absent.test", "address": "ann", "ref": 987654,
    "ident": "01012020000000123456", "target": "absent.test", "start": 0, "count": 3,
    "bundle_id": 987654, "recipient_id": 987654, "file_id": 987654,
    "account_id": 987654, "mailbox_id": 987654, "message_id": 987654,
    "attachment_id": 987654, "contact_id": 987654, "migrate_id": 987654,
    "restore_id": 987654,
}

MULTIPART = ("multipart/form-data; boundary=B", b"--B\r\nContent-Disposition: form-data; "
             b"name=\"the_file\"; filename=\"m.txt\"\r\nContent-Type: text/plain\r\n\r\n"
             b"mallory\r\n--B--\r\n")
FORM = "application/x-www-form-urlencoded"

# What each write sends: a body its own owner would have taken, so that only the owner check
# stands between mallory and alice's object. "app METHOD rule" -> (Content-Type, body).
BODIES: Mapping[str, tuple[str, bytes]] = {
    **{f"imap2api {m} /api{v}/imap-servers/<int:server_id>/": (
        "application/json", json.dumps({"name": "mallory", "email": "m@x.test",
                                        "host": "127.0.0.1", "port": 993, "use_ssl": True,
                                        "password": "pw"}).encode())
       for m in ("PUT", "PATCH") for v in ("", "/v1")},
    **{f"imap2api {m} /api{v}/webhooks/<int:webhook_id>/": (
        "application/json", json.dumps({"url": "https://hooks.example.com/m",
                                        "events": ["email.new"]}).encode())
       for m in ("PUT", "PATCH") for v in ("", "/v1")},
    "mailapi PUT /api/v1/mail/<mail_id>": ("application/json", b'{"read": true}'),
    "mailapi PUT /api/v1/mailboxes/<email>/access/<username>": (
        "application/json", b'{"allow_read": true}'),
    "protecmail PUT /api/v1/domain/<domain>": ("application/json", b'{"spamAction": 1}'),
    "safedrop PUT /dropbundles/<int:bundle_id>": (FORM, b"subject=mallory"),
    "safedrop POST /dropbundles/<int:bundle_id>/dropbundlerecipients": (
        FORM, b"email=m%40example.org"),
    "safedrop PUT /dropbundles/<int:bundle_id>/dropbundlerecipients/<int:recipient_id>": (
        FORM, b"email=m%40example.org"),
    "safedrop POST /dropbundles/<int:bundle_id>/dropfiles": MULTIPART,
    "dropmyemail PUT /v1/accounts/<int:account_id>": (
        "application/json", b'{"port": 993}'),
    "dropmyemail POST /v1/accounts/<int:account_id>/migrates": (
        "application/json", json.dumps({"email": "m@x.test", "host": "imap.x.test",
                                        "port": 993, "password": "pw"}).encode()),
}

# The query a route needs to be asked at all, by rule.
QUERIES: Mapping[str, str] = {
    "/v1/accounts/<int:account_id>/attachments_search": "?query=report",
    "/v1/accounts/<int:account_id>/messages/search": "?query=report",
}

# Where an app's not-found is not a 404, its status (none yet).
NOT_FOUND: Mapping[str, int] = {}

NIC = re.compile(r'"nic": "[^"]*"')
CSRF_VALUE = re.compile(r'name="csrf_token" value="[^"]*"')
_PLACEHOLDER = re.compile(r"<(?:[a-zA-Z_]+(?:\([^)]*\))?:)?(?P<name>[a-zA-Z_]\w*)>")


def operations(estate: Estate) -> dict[str, tuple[str, str, str]]:
    """Every (method, rule) of every app: "app METHOD rule" -> (app, method, rule)."""
    found = {}
    for app in estate.web.root.apps.values():
        for rule in app.app.url_map.iter_rules():
            methods = set(rule.methods or ()) - IGNORED_METHODS
            for method in methods:
                found[f"{app.name} {method} {rule.rule}"] = (app.name, method, rule.rule)
    return found


async def mallory_credentials(web: Web) -> tuple[dict[str, dict[str, str]], Client]:
    """Valid credentials of every API for mallory, a user who owns nothing, and her own
    OAuth client (an app she registered and let in)."""
    mallory = await web.user("mallory")
    password = web.secrets[-1]
    key = await web.credential(mallory)
    _, _, body = await web.call("POST", "/api-token-auth/", json={
        "username": "mallory", "password": password})
    imap2api = {"Authorization": f"Token {body['token']}"}
    _, _, body = await web.call("POST", "/api/v1/auth/", json={
        "username": "mallory", "password": password})
    mailapi = {"Auth-Key": body["auth_key"]}
    status, headers, _ = await web.call("GET", "/auth", headers={
        "X-Auth-User": mallory.email, "X-Auth-Key": key})
    assert status == 204, status
    safedrop = {"X-Auth-Token": header(headers, "X-Auth-Token") or ""}
    app = await register(web, mallory)
    bearer = {"Authorization": "Bearer " + (await app.token(
        "read write email attachment contact"))["access_token"]}
    session = await web.credential(mallory, "page", label="authorization page",
                                   scopes=(SESSION_SCOPE,))
    return {"oauth_pages": {"Cookie": f"{SESSION_COOKIE}={session}"},
            "imap2api": imap2api, "mailapi": mailapi, "protecmail": {"Api-Key": key},
            "safedrop": safedrop, "dropmyemail": bearer, "drop": {}, "quarantine": {}}, app


def normalised(body: Any, values: list[str]) -> Any:
    """`body` with every value of the request's path written as <id>: a reply may name what
    it was asked for."""
    if isinstance(body, dict):  # a request's own id (Protecmail's envelope) is its own
        body = {k: v for k, v in body.items() if k != "request_id"}
    text = body.decode(errors="replace") if isinstance(body, bytes) else json.dumps(body)
    for value in sorted(values, key=len, reverse=True):
        text = text.replace(value, "<id>")
    # A page's forms carry fresh CSRF tokens, stamped with the time.
    return CSRF_VALUE.sub('name="csrf_token" value="<csrf>"', text)


class OwnershipTests(TestCase):
    maxDiff = None

    async def setUp(self) -> None:  # type: ignore[override]
        self.estate = await build_estate(self)
        self.web = self.estate.web
        self.mallory, self.client = await mallory_credentials(self.web)
        ids = self.estate.ids
        # An address on alice's domain.
        status, _, body = await self.web.call(
            "PUT", "/api/v1/domain/q.test/addresses/ann",
            headers=self.estate.credentials["protecmail"])
        assert status == 200, (status, body)
        ids["protecmail"]["address"] = "ann"
        # A drop link's token is the credential of its own bundle only: the link of the
        # bundle sent to ann with the file of alice's other bundle.
        ids["drop"] = {"token": ids["drop"]["token"], "file_id": ids["safedrop"]["file_id"]}
        self.absent = {**ABSENT, "token": ids["drop"]["token"]}
        # The drop page's download button, as the link's holder has it (its CSRF token and
        # cookie): what a POST of a file of that drop needs before the file is looked at.
        status, headers, page = await self.web.call("GET", f"/drop/{ids['drop']['token']}")
        assert status == 200, status
        self.mallory["drop"] = {"Cookie": f"mc_csrf={csrf_cookie(headers)}"}
        self.bodies = {**BODIES, "drop POST /drop/<token>/files/<int:file_id>": (
            FORM, urlencode({"csrf_token": csrf_field(page, "download"),
                             "action": "download"}).encode())}

    async def ask(self, app: str, method: str, path: str, route: str,
                  ) -> tuple[int, Any]:
        content_type, body = self.bodies.get(route, ("application/json", b""))
        headers = dict(self.mallory[app])
        if body:
            headers["Content-Type"] = content_type
        self.web.clock.advance(1)  # within every API's rate
        status, _, reply = await self.web.call(method, path, headers=headers, data=body)
        # A HEAD has no body; its Content-Length is the GET's (test_web_head), whose body
        # may name the id asked.
        return status, reply

    async def test_another_users_object_is_not_found_on_every_route(self) -> None:
        found = operations(self.estate)
        self.assertLessEqual(set(NOT_OWNER_SCOPED), set(found), "stale NOT_OWNER_SCOPED")
        self.assertLessEqual(set(BODIES), set(found), "BODIES for no route")
        self.assertLessEqual(set(QUERIES), {r for _, _, r in found.values()}, "stale QUERIES")
        unrequestable, leaks, asked = [], [], 0
        # Deletions last: one that went through would hide every leak after it.
        for route, (app, method, rule) in sorted(
                found.items(), key=lambda item: (item[1][1] == "DELETE", item[0])):
            names = [m.group("name") for m in _PLACEHOLDER.finditer(rule)]
            if not names or route in NOT_OWNER_SCOPED:
                continue
            try:
                query = QUERIES.get(rule, "")
                alices = filled(rule, self.estate.ids[app]) + query
                absent = filled(rule, self.absent) + query
                values = [str(self.estate.ids[app][n]) for n in names]
                absent_values = [str(self.absent[n]) for n in names]
                self.mallory[app]
            except KeyError as e:
                unrequestable.append(f"{route} (no value for {e})")
                continue
            before = await self.web.core.db.read("snapshot", snapshot)
            status, reply = await self.ask(app, method, alices, route)
            after = await self.web.core.db.read("snapshot", snapshot)
            none_status, none_reply = await self.ask(app, method, absent, route)
            asked += 1
            wanted = NOT_FOUND.get(app, 404)
            problems = []
            if status != wanted:
                problems.append(f"answered {status} {reply!r:.200}")
            if (status, normalised(reply, values)) != (
                    none_status, normalised(none_reply, absent_values)):
                problems.append(f"unlike an absent id ({none_status} {none_reply!r:.200})")
            changed = changes(before, after)
            if changed:
                problems.append(f"changed {sorted(changed)}")
            if problems:
                leaks.append(f"{route}: " + "; ".join(problems))
        # A route added later without a way to ask for it fails here, named: give the
        # estate its ids (tests/test_web_head.py build_estate) or say in NOT_OWNER_SCOPED
        # why it names nothing of a user's.
        self.assertEqual(unrequestable, [])
        self.assertEqual(leaks, [], "\n".join(leaks))
        self.assertGreater(asked, 60)

    async def test_another_users_lists_show_nothing_of_alices(self) -> None:
        found = operations(self.estate)
        self.assertLessEqual(set(NOT_A_LIST), set(found), "stale NOT_A_LIST")
        ids = self.estate.ids
        app_uid = ids["oauth_pages"]["authorize"].partition("client_id=")[2].partition("&")[0]
        # What only alice's objects say: her name, her servers' and mailboxes' addresses,
        # her domains, her webhook's address, her drops' recipient, her mail's senders and
        # files, her OAuth app.
        alices = ["alice", "a@x.test", "hosted.test", "q.test", "hooks.example.com",
                  "ann@example.org", "zoe@example.test", "bo@example.test", "report.pdf",
                  "zoe.vcf", app_uid]
        # And what she would see in a store where alice has nothing: the same (no count,
        # total or sum of alice's either).
        alone = Web.build(self.web.core.config)
        alone.clock.advance(self.web.clock.seconds() - alone.clock.seconds())
        alone_credentials, alone_client = await mallory_credentials(alone)
        shown, asked = [], 0
        for route, (app, method, rule) in sorted(found.items()):
            if method != "GET" or "<" in rule or route in NOT_A_LIST:
                continue
            asked += 1
            texts = []
            for web, credentials, client in ((self.web, self.mallory, self.client),
                                             (alone, alone_credentials, alone_client)):
                web.clock.advance(1)
                status, _, reply = await web.call("GET", rule, headers=credentials[app])
                if status >= 400:
                    shown.append(f"{route}: answered {status} {reply!r:.200}")
                # Her own app's uid and her account's reference are her store's own.
                texts.append(NIC.sub("<nic>", normalised(reply, [client.uid])))
            named = [marker for marker in alices if marker in texts[0]]
            if named:
                shown.append(f"{route}: shows {named}")
            if texts[0] != texts[1]:
                shown.append(f"{route}: {texts[0]:.300} where alone {texts[1]:.300}")
        self.assertEqual(shown, [], "\n".join(shown))
        self.assertGreater(asked, 20)

    async def alike(self, app: str, method: str, alices: str, absent: str,
                    bodies: tuple[bytes, bytes] = (b"", b""), content_type: str = FORM,
                    headers: Mapping[str, str] | None = None, stores: bool = False,
                    named: tuple[str, str] | None = None) -> list[str]:
        """What is wrong with mallory's request naming alice's object (`alices`, its body
        `bodies[0]`) against one naming none (`absent`, `bodies[1]`): a different answer, or
        a row changed (`stores`: the request stores something of mallory's, which the caller
        checks; the reply's own new `id` is not compared; `named`: what each names, which its
        reply may repeat)."""
        sent = {**self.mallory[app], **(headers or {})}
        if bodies[0]:
            sent["Content-Type"] = content_type
        answers = []
        changed: dict[str, Any] = {}
        for i, (path, body) in enumerate(((alices, bodies[0]), (absent, bodies[1]))):
            self.web.clock.advance(1)
            before = await self.web.core.db.read("snapshot", snapshot)
            status, _, reply = await self.web.call(method, path, headers=sent, data=body)
            after = await self.web.core.db.read("snapshot", snapshot)
            if path == alices:
                changed = changes(before, after)
            if stores and isinstance(reply, dict):
                reply = {k: v for k, v in reply.items() if k != "id"}
            answers.append((status, normalised(reply, [named[i]] if named else [])))

        problems = []
        if answers[0] != answers[1]:
            problems.append(f"{method} {alices}: {answers[0]!r:.300} unlike "
                            f"{answers[1]!r:.300}")
        if changed and not stores:
            problems.append(f"{method} {alices}: changed {sorted(changed)}")
        return problems

    async def test_ids_in_queries_and_bodies_are_scoped_too(self) -> None:
        ids = self.estate.ids
        found = operations(self.estate)
        problems = []
        # IMAP2API's lists filtered by a server (imap_server): alice's as an unknown one.
        server = ids["imap2api"]["server_id"]
        for app, method, rule in sorted(found.values()):
            if app == "imap2api" and method == "GET" and "/emails/" in rule and "<" not in rule:
                problems += await self.alike(app, "GET", f"{rule}?imap_server={server}",
                                             f"{rule}?imap_server={ABSENT['server_id']}")
        # Protecmail's quarantine of an address of alice's domain (the route's domain case
        # is the path test's).
        problems += await self.alike("protecmail", "GET", "/api/v1/quarantine/ann@q.test/0/3",
                                     "/api/v1/quarantine/ann@absent.test/0/3",
                                     named=("q.test", "absent.test"))
        # The Mail API's list from a cursor: alice's mail as an unknown id ("invalid
        # cursor").
        problems += await self.alike(
            "mailapi", "GET", f"/api/v1/mail/?cursor={ids['mailapi']['mail_id']}",
            f"/api/v1/mail/?cursor={ABSENT['mail_id']}")
        # A Mail API mail from alice's mailbox, as a draft and for the outbox, by mallory
        # who has a mailbox of her own: as from a mailbox that does not exist.
        core = self.web.core
        await core.domains.add("m.test", self.client.user.id, "mx.m.test")
        await core.mailboxes.add("mallory@m.test", self.client.user.id)
        def alices_box(conn: sa.Connection) -> list[Any]:
            box = conn.execute(sa.select(mailboxes).where(
                mailboxes.c.address == ids["mailapi"]["email"])).one()
            return [tuple(box), *sorted(map(tuple, conn.execute(sa.select(mailapi_mail).where(
                mailapi_mail.c.mailbox_id == box.id))))]

        before = await core.db.read("alice's box", alices_box)
        for status in ("draft", "outbox"):
            mails = tuple(json.dumps({
                "from": box, "to": "x@far.test", "subject": "s", "body": "b",
                "status": status}).encode()
                for box in (ids["mailapi"]["email"], ABSENT["email"]))
            problems += await self.alike("mailapi", "POST", "/api/v1/mail/", "/api/v1/mail/",
                                         mails, "application/json",  # type: ignore[arg-type]
                                         stores=True)
        # A mail's read-only keys (id, mailbox, attachments) naming alice's mail, on a new
        # mail and on a PUT of mallory's own draft: they change nothing.
        alices_mail = ids["mailapi"]["mail_id"]
        keys = tuple(json.dumps({
            "id": mail, "mailbox": box, "from": "mallory@m.test", "to": "x@far.test",
            "status": "draft",
            "attachments": [{"index": 1, "url": f"/api/v1/mail/{mail}/attachments/1"}],
        }).encode() for mail, box in ((alices_mail, ids["mailapi"]["email"]),
                                      (ABSENT["mail_id"], ABSENT["email"])))
        problems += await self.alike("mailapi", "POST", "/api/v1/mail/", "/api/v1/mail/",
                                     keys, "application/json",  # type: ignore[arg-type]
                                     stores=True)
        self.web.clock.advance(1)
        code, _, draft = await self.web.call(
            "POST", "/api/v1/mail/", headers=self.mallory["mailapi"],
            json={"from": "mallory@m.test", "status": "draft"})
        assert code == 201, (code, draft)
        own = f"/api/v1/mail/{draft['id']}"
        problems += await self.alike("mailapi", "PUT", own, own, keys,  # type: ignore[arg-type]
                                     "application/json", stores=True)
        self.web.clock.advance(1)
        code, _, mine = await self.web.call("GET", own, headers=self.mallory["mailapi"])
        self.assertEqual((code, mine["id"], mine["mailbox"], mine["attachments"]),
                         (200, draft["id"], "mallory@m.test", []))
        # Kept as mallory's drafts, in her own mailbox: alice's holds nothing new.
        self.assertEqual(await core.db.read("alice's box", alices_box), before)
        # OAuth: deleting alice's app, revoking it (mallory never let it in), and revoking
        # alice's token with mallory's client.
        app_uid = ids["oauth_pages"]["authorize"].partition("client_id=")[2].partition("&")[0]
        for page, action in (("/oauth/applications", "delete"),
                             ("/oauth/authorized_applications", "revoke")):
            self.web.clock.advance(1)
            _, headers, body = await self.web.call("GET", page, headers=self.mallory[
                "oauth_pages"])
            cookie = csrf_cookie(headers)
            extra = {"Cookie": self.mallory["oauth_pages"]["Cookie"]
                     + (f"; mc_csrf={cookie}" if cookie else "")}
            token = csrf_field(body, action)
            forms = tuple(urlencode({"csrf_token": token, "action": action,
                                     "uid": uid}).encode()
                          for uid in (app_uid, "absent-app-uid"))
            problems += await self.alike("oauth_pages", "POST", page, page,
                                         forms, headers=extra)  # type: ignore[arg-type]
        alices_token = self.estate.credentials["dropmyemail"]["Authorization"].split()[1]
        revokes = tuple(urlencode({"client_id": self.client.uid,
                                   "client_secret": self.client.secret,
                                   "token": token}).encode()
                        for token in (alices_token, "absent-token"))
        problems += await self.alike("drop", "POST", "/oauth/revoke", "/oauth/revoke",
                                     revokes)  # type: ignore[arg-type]
        self.assertEqual(problems, [], "\n".join(problems))

    async def test_alices_object_under_mallorys_own_is_not_found(self) -> None:
        """A route naming a parent and its child: mallory's own parent (a bundle, an account,
        a folder of it) with alice's child is answered as a child that exists nowhere, and
        changes nothing."""
        web, core = self.web, self.web.core
        mallory = self.client.user
        self.web.clock.advance(1)
        status, _, bundle = await web.call("POST", "/dropbundles", headers={
            **self.mallory["safedrop"], "Content-Type": FORM}, data=b"subject=mine")
        assert status == 200, (status, bundle)
        account = await core.fetch.accounts.create(
            mallory.id, name="m", email="m@x.test", host="127.0.0.1", port=993,
            use_ssl=True, password="pw")
        folder = await core.db.run("folder", lambda c: thd_folder(c, account.id, "INBOX").id)
        mine = {"safedrop": {"bundle_id": bundle["id"]},
                "dropmyemail": {"account_id": account.id, "mailbox_id": folder}}
        problems, asked = [], 0
        for route, (app, method, rule) in sorted(
                operations(self.estate).items(),
                key=lambda item: (item[1][1] == "DELETE", item[0])):
            names = [m.group("name") for m in _PLACEHOLDER.finditer(rule)]
            if app not in mine or len(names) < 2:
                continue
            # Each split: the first `n` placeholders mallory's, the rest alice's.
            for n in range(1, len(names)):
                if not all(name in mine[app] for name in names[:n]):
                    break
                ours = {name: mine[app][name] for name in names[:n]}
                query = QUERIES.get(rule, "")
                body = self.bodies.get(route, ("application/json", b""))
                asked += 1
                problems += await self.alike(
                    app, method, filled(rule, {**self.estate.ids[app], **ours}) + query,
                    filled(rule, {**ABSENT, **ours}) + query, (body[1], body[1]), body[0])
        self.assertEqual(problems, [], "\n".join(problems))
        self.assertGreaterEqual(asked, 10)
