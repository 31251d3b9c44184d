"""Hostile input gets a 4xx in the API's own shape, never a 500.

Each attack below answered 500 before the input boundary (web.parsing, the routes' `int`
converter) refused it: JSON nested past Python's recursion limit, a lone surrogate ("\\ud800")
that no database or reply can encode, ids of 2^63 and more in paths, queries and bodies,
other scripts' digits in a quarantine release token. A JSON null is not an object, and a
control character in a name, username, description or folder name is refused.
"""

from __future__ import annotations

import datetime
import gzip
import json
from typing import Any

from twisted.trial.unittest import TestCase

from mailcore.identity import IdentityError
from tests.support.oauth import access_token
from tests.support.web import PASSWORD, Web, Wire

TOO_BIG = 2**63
DEEP = b"[" * 100_000 + b"]" * 100_000
SURROGATE = b'"\\ud800"'
CONTROL = "Control characters (NUL, CR, LF, TAB...) are not allowed."
NUL = "The value holds NUL (U+0000), which no text field takes."


def json_headers(**extra: str) -> dict[str, str]:
    return {"Content-Type": "application/json", **extra}


class HostileInputTests(TestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        self.web = Web.build()
        self.alice = await self.web.user()
        self.token = {"Authorization": f"Token {await self.web.credential(self.alice, 'token')}"}
        self.key = {"Api-Key": await self.web.credential(self.alice)}

    async def call(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        status, _, body = await self.web.call(method, path, **kwargs)
        return status, body

    def json_routes(self) -> list[tuple[str, str, dict[str, str], str]]:
        """A JSON route of each API that reads a body, and the key of its error message."""
        return [
            ("POST", "/api/imap-servers/", self.token, "detail"),
            ("POST", "/api/webhooks/", self.token, "detail"),
            ("POST", "/api-token-auth/", {}, "detail"),
            ("POST", "/api/v1/auth/", {}, "error"),
            ("PUT", "/api/v1/user", self.key, "msg"),
            ("POST", "/api/v1/domain/example.com", self.key, "msg"),
        ]

    async def test_deeply_nested_json_is_a_400_in_each_apis_shape(self) -> None:
        for method, path, auth, key in self.json_routes():
            for body in (DEEP, b'{"name": ' + b"[" * 40 + b"]" * 40 + b"}"):
                status, reply = await self.call(method, path, data=body,
                                                headers=json_headers(**auth))
                self.assertEqual(status, 400, (path, reply))
                self.assertEqual(reply[key], "JSON parse error - nested deeper than 32 levels.")

    async def test_a_lone_surrogate_in_any_text_field_is_a_400(self) -> None:
        for method, path, auth, key in self.json_routes():
            for field in ("name", "username", "password", "first_name", "description",
                          "redirectTo"):
                body = b'{"%s": %s}' % (field.encode(), SURROGATE)
                status, reply = await self.call(method, path, data=body,
                                                headers=json_headers(**auth))
                self.assertEqual(status, 400, (path, field, reply))
                self.assertIn("lone surrogate", reply[key])
        # In a key too, and inside a list.
        status, reply = await self.call(
            "POST", "/api/imap-servers/", headers=json_headers(**self.token),
            data=b'{"folders_to_sync": ["INBOX", "\\udfff"], "\\ud800": 1}')
        self.assertEqual(status, 400, reply)
        # Form and multipart bodies cannot carry one: their text must be UTF-8, which never
        # decodes to a surrogate, so an encoded one is bytes that are not UTF-8, a 400.
        status, reply = await self.call(
            "POST", "/api/v1/auth/", data=b"username=%ED%A0%80&password=x",
            headers={"Content-Type": "application/x-www-form-urlencoded"})
        self.assertEqual((status, reply),
                         (400, {"error": "username: The value is not valid UTF-8."}))

    async def test_ids_past_the_signed_64_bit_range_in_paths_are_404(self) -> None:
        for path in (f"/api/emails/{TOO_BIG}/", f"/api/v1/emails/{TOO_BIG}/thread/",
                     f"/api/imap-servers/{TOO_BIG}/", f"/api/imap-servers/{10**40}/",
                     f"/api/webhooks/{TOO_BIG}/", f"/api/webhooks/{TOO_BIG}/deliveries/",
                     f"/api/emails/{TOO_BIG - 1}/", "/api/emails/\u0661\u0662/"):
            status, reply = await self.call("GET", path, headers=self.token)
            self.assertEqual((status, reply), (404, {"detail": "Not found."}), path)
        # Other methods too: a 404, not the router's 405 for the path's other rules.
        for method, path in [("DELETE", f"/api/webhooks/{TOO_BIG}/"),
                             ("PATCH", f"/api/imap-servers/{TOO_BIG}/"),
                             ("POST", f"/api/imap-servers/{'9' * 5000}/sync/")]:
            status, reply = await self.call(method, path, headers=self.token, json={})
            self.assertEqual((status, reply), (404, {"detail": "Not found."}), path[:40])

    async def test_ids_past_the_range_in_queries_and_bodies_are_400(self) -> None:
        for path in ("/api/emails/", "/api/emails/folders/", "/api/emails/statistics/"):
            status, reply = await self.call("GET", f"{path}?imap_server={TOO_BIG}",
                                            headers=self.token)
            self.assertEqual(status, 400, path)
            self.assertEqual(reply, {"imap_server": [
                "Ensure this value is less than or equal to 2147483647."]})
        status, reply = await self.call("GET", "/api/emails/?page=" + "9" * 5000,
                                        headers=self.token)
        self.assertEqual((status, reply), (404, {"detail": "Invalid page."}))
        status, reply = await self.call("GET", "/api/emails/?page_size=" + "9" * 5000,
                                        headers=self.token)
        self.assertEqual(status, 200)
        base = {"host": "imap.example.test", "username": "a", "password": "p"}
        for field in ("sync_interval", "sync_limit_value", "port"):
            for value in (10**30, TOO_BIG, str(10**30)):
                status, reply = await self.call(
                    "POST", "/api/imap-servers/", headers=self.token,
                    json={**base, field: value})
                self.assertEqual(status, 400, (field, value, reply))
                self.assertEqual(list(reply), [field])

    async def test_a_query_parameter_given_twice_with_other_values_is_a_400(self) -> None:
        """`?count=5&count=500`: the last value won unseen (a client building the query
        from a list, or a proxy or template appending its own value, got what it did not
        read back). Now a 400 naming the parameter, in each API's shape, as a form's field
        given twice is at the Mail API and safedrop; the same value twice is taken, and a
        parameter the route does not read is left alone. The IMAP2API takes the last, as
        the seed's Django REST framework service did (QueryDict.get)."""
        twice = ("The parameter is given more than once, with different values; it takes "
                 "one value.")
        bearer = {"Authorization": f"Bearer {await self.oauth_token()}"}
        mailapi = {"Auth-Key": self.token["Authorization"].split()[1]}
        for path, auth, expected in [
            ("/api/v1/mail/?count=5&count=500", mailapi, {"message": f"count: {twice}"}),
            ("/v1/accounts?sort=email&sort=storage", bearer,
             {"error": "invalid_request", "error_description": f"sort: {twice}"}),
        ]:
            status, reply = await self.call("GET", path, headers=auth)
            self.assertEqual((status, reply), (400, expected), path)
        for path, auth in [("/api/emails/?page_size=5&page_size=5&x=1&x=2", self.token),
                           ("/api/v1/mail/?count=5&count=5", mailapi),
                           ("/v1/accounts?sort=email&sort=email", bearer)]:
            status, reply = await self.call("GET", path, headers=auth)
            self.assertEqual(status, 200, (path, reply))
        # The IMAP2API: the last value, whichever parameter it is (a bad last one is the
        # 400 or 404 it is alone, a good one read).
        for path, code in [
            ("/api/emails/?page_size=5&page_size=100", 200),
            ("/api/v1/emails/?folder=INBOX&folder=Sent", 200),
            ("/api/imap-servers/?q=a&page=1&q=b", 200),
            ("/api/imap-servers/?page=1&page=2", 404),
            ("/api/emails/statistics/?imap_server=x&imap_server=1", 200),
            ("/api/emails/statistics/?imap_server=1&imap_server=x", 400),
        ]:
            status, reply = await self.call("GET", path, headers=self.token)
            self.assertEqual(status, code, (path, reply))
            self.assertNotIn(twice, json.dumps(reply), path)

    async def test_a_body_with_a_content_encoding_is_refused_and_changes_nothing(
            self) -> None:
        """`Content-Encoding: gzip` on a body was not read: the compressed bytes were
        parsed as JSON or a form (a 400 about bad JSON, or a form of one garbled field) or
        stored as an upload's bytes. Now a 415 with `Accept-Encoding: identity` (RFC 9110
        15.5.16, 12.5.3) in each API's shape, a 400 where the API answers a body of
        another type so (the Mail API, safedrop, /oauth/token), and nothing is stored."""
        _, headers, _ = await self.web.call(
            "GET", "/auth", headers={"X-Auth-User": self.alice.email,
                                     "X-Auth-Key": self.key["Api-Key"]})
        drop = {"X-Auth-Token": headers["x-auth-token"][0]}
        bearer = {"Authorization": f"Bearer {await self.oauth_token()}"}
        mailapi = {"Auth-Key": self.token["Authorization"].split()[1]}
        server = {"host": "imap.example.test", "username": "a", "password": "p"}
        form = "application/x-www-form-urlencoded"
        upload = (b"--B\r\nContent-Disposition: form-data; name=\"the_file\"; "
                  b"filename=\"a.txt\"\r\n\r\nhello\r\n--B--\r\n")
        status, _, bundle = await self.web.call("POST", "/dropbundles", data=b"subject=x",
                                                headers={"Content-Type": form, **drop})
        self.assertEqual(status, 200, bundle)
        cases: list[tuple[str, str, bytes, dict[str, str], int, str]] = [
            ("POST", "/api/imap-servers/", json.dumps(server).encode(),
             json_headers(**self.token), 415, "detail"),
            ("POST", "/api-token-auth/", b'{"username": "a", "password": "b"}',
             json_headers(), 415, "detail"),
            ("POST", "/api/v1/mail/", b'{"status": "draft", "subject": "x"}',
             json_headers(**mailapi), 400, "message"),
            ("PUT", "/api/v1/user", b'{"first_name": "Eve"}', json_headers(**self.key),
             415, "msg"),
            ("POST", "/v1/accounts", b'{"email": "a@example.test", "password": "p"}',
             json_headers(**bearer), 415, "error_description"),
            ("POST", "/oauth/token", b"grant_type=authorization_code&code=x",
             {"Content-Type": form}, 400, "error_description"),
            ("POST", "/dropbundles", b"subject=y", {"Content-Type": form, **drop}, 400,
             "error"),
        ]
        # The uploads (multipart POSTs) through the daemon's site: StubTreq's plain Site
        # parses a POST's multipart body itself and answers a bare 400 to one it cannot.
        uploads = [
            ("POST", "/api/v1/mail/", upload.replace(b"the_file", b"attachment"),
             {"Content-Type": "multipart/form-data; boundary=B", **mailapi}, 400,
             "message"),
            ("POST", f"/dropbundles/{bundle['id']}/dropfiles", upload,
             {"Content-Type": "multipart/form-data; boundary=B", **drop}, 400, "error"),
        ]
        for method, path, body, headers_, expected, key in cases + uploads:
            for coding in ("gzip", "identity, br", "zstd"):
                data = gzip.compress(body) if coding == "gzip" else body
                sent = {**headers_, "Content-Encoding": coding}
                if (method, path, body, headers_, expected, key) in uploads:
                    status, headers, reply = self.on_the_wire(method, path, data, sent)
                else:
                    status, headers, reply = await self.web.call(method, path, data=data,
                                                                 headers=sent)
                self.assertEqual(status, expected, (path, coding, reply))
                self.assertIn(f'Content-Encoding "{coding.replace("identity, ", "")}" is '
                              "not supported", reply[key], path)
                self.assertEqual(headers.get("accept-encoding"), ["identity"], path)
        _, servers = await self.call("GET", "/api/imap-servers/", headers=self.token)
        _, mail = await self.call("GET", "/api/v1/mail/", headers=mailapi)
        _, user = await self.call("GET", "/api/v1/user", headers=self.key)
        _, accounts = await self.call("GET", "/v1/accounts", headers=bearer)
        _, bundles = await self.call("GET", "/dropbundles", headers=drop)
        _, files = await self.call("GET", f"/dropbundles/{bundle['id']}/dropfiles",
                                   headers=drop)
        self.assertEqual((servers["count"], mail["count"], accounts, len(bundles), files),
                         (0, 0, [], 1, []))
        self.assertNotEqual(user["data"]["first_name"], "Eve")
        # No coding ("identity"), or a value that is no coding that transforms a body (a
        # charset sent by mistake), is the body as it is.
        for coding in ("identity", "utf-8"):
            status, reply = await self.call(
                "POST", "/dropbundles", data=b"subject=y",
                headers={"Content-Type": form, "Content-Encoding": coding, **drop})
            self.assertEqual((status, reply["subject"]), (200, "y"), coding)
        status, reply = await self.call(
            "POST", "/api-token-auth/", data=json.dumps(
                {"username": "alice", "password": PASSWORD}).encode(),
            headers=json_headers(**{"Content-Encoding": "utf-8"}))
        self.assertEqual(status, 200, reply)

    def on_the_wire(self, method: str, path: str, body: bytes, headers: dict[str, str]
                    ) -> tuple[int, dict[str, list[str]], Any]:
        """One request through the daemon's own site (web.root.MailcoreSite)."""
        wire = Wire.open(self.web)
        self.addCleanup(wire.close)
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        wire.send(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                  f"{head}\r\n".encode() + body)
        [(status, found, reply)] = wire.responses()
        return (int(status.split()[1]),
                {k.decode(): [v.decode()] for k, v in found.items()}, json.loads(reply))

    async def oauth_token(self) -> str:
        token = await access_token(self.web.core.oauth, self.alice.id)
        self.web.secrets.append(token)
        return token

    async def test_other_scripts_digits_in_a_release_token_are_an_invalid_link(self) -> None:
        for token in ("\u0661\u0662.\u0663\u0664.abc", "1.2.\u00e9t\u00e9",
                      "\uff11.\uff12.x"):
            for method in ("GET", "POST"):
                status, _, body = await self.web.call(method, f"/quarantine/release/{token}")
                self.assertEqual(status, 404, (method, token))
                self.assertIn(b"This release link is not valid", body)
        # A safedrop recipient's link too (found by tests.test_web_fuzz).
        status, _, body = await self.web.call("GET", "/drop/\u00e1~")
        self.assertEqual(status, 404)
        status, reply = await self.call("GET", "/api/v1/quarantine/\u0661\u0662",
                                        headers=self.key)
        self.assertEqual(status, 404)
        self.assertIs(reply["success"], False)

    async def test_json_null_is_not_an_object(self) -> None:
        for method, path, auth, key in self.json_routes():
            status, reply = await self.call(method, path, data=b"null",
                                            headers=json_headers(**auth))
            self.assertEqual(status, 400, path)
            self.assertEqual(reply[key], "Invalid data. Expected a JSON object, but got null.")
        # An empty body is still no fields.
        status, reply = await self.call("PUT", "/api/v1/user", headers=self.key)
        self.assertEqual(status, 200, reply)

    async def test_control_characters_in_names_are_refused(self) -> None:
        base = {"host": "imap.example.test", "username": "a", "password": "p"}
        for field, value in [("name", "Work\x1f"), ("username", "a\r\nDELE 1"),
                             ("email", "a@b\n"), ("host", "h\tx"),
                             ("folders_to_sync", ["INBOX", "a\rb"]),
                             ("folders_to_sync", "INBOX,\x1b[2J")]:
            status, reply = await self.call("POST", "/api/imap-servers/", headers=self.token,
                                            json={**base, field: value})
            self.assertEqual((status, reply), (400, {field: [CONTROL]}), field)
        status, reply = await self.call("POST", "/api/imap-servers/", headers=self.token,
                                        json={**base, "password": "p\r\nQUIT"})
        self.assertEqual((status, reply), (400, {"password": ["NUL, CR and LF are not allowed."]}))
        status, reply = await self.call(
            "POST", "/api/webhooks/", headers=self.token,
            json={"url": "https://hooks.example.test/", "description": "new\nline"})
        self.assertEqual((status, reply), (400, {"description": [CONTROL]}))
        status, reply = await self.call("POST", "/api-token-auth/",
                                        json={"username": "alice\x07", "password": "x"})
        self.assertEqual((status, reply), (400, {"username": [CONTROL]}))
        # NUL, in any field, is refused as the JSON is read (PostgreSQL's text refuses it).
        status, reply = await self.call("POST", "/api-token-auth/",
                                        json={"username": "alice\x00", "password": "x"})
        self.assertEqual((status, reply), (400, {"username": [NUL]}))
        status, reply = await self.call("PUT", "/api/v1/user", headers=self.key,
                                        json={"first_name": "Eve\r\nBcc: x"})
        self.assertEqual(status, 400)
        self.assertEqual(reply["msg"], "Field first_name may not hold control characters.")
        stored = await self.web.core.identity.get_user(self.alice.id)
        assert stored is not None
        self.assertEqual(stored.first_name, self.alice.first_name)

    async def test_usernames_with_a_line_break_are_refused_by_the_identity(self) -> None:
        identity = self.web.core.identity
        for username, email in [("bob\n", "bob@example.test"), ("bob", "bob\x00@example.test"),
                                ("bob", "bob@exa\x85mple.test")]:
            with self.assertRaises(IdentityError):
                await identity.create_user(username, email, "pw-12345678")
        self.assertIsNone(await identity.find_user("bob\n"))

    async def test_replies_stay_valid_utf8_json(self) -> None:
        """The fallback: text stored before the boundary refused surrogates is escaped."""
        from web.replies import encode_json

        self.assertEqual(encode_json({"a": "\ud800é"}), b'{"a":"\\ud800\\u00e9"}')
        self.assertEqual(encode_json({"a": "é"}), '{"a":"é"}'.encode())
        json.loads(encode_json({"a": "\udfff"}))
        # No JSON form: null. Past 64 bits: written exactly (the standard library's path).
        self.assertEqual(encode_json({"a": float("nan"), "b": float("inf")}),
                         b'{"a":null,"b":null}')
        self.assertEqual(encode_json({"n": 2**70, 3: [1.5]}),
                         b'{"n":1180591620717411303424,"3":[1.5]}')

    def test_a_time_in_a_reply_is_written_as_iso_writes_it_on_either_path(self) -> None:
        from mailcore.webhooks.payload import iso, moment_json
        from web.replies import encode_json

        utc = datetime.datetime(2024, 10, 2, 12, 0, 0, tzinfo=datetime.UTC)
        berlin = datetime.datetime(2024, 10, 2, 14, 0, 0, 5,
                                   tzinfo=datetime.timezone(datetime.timedelta(hours=2)))
        for moment in (utc, utc.replace(microsecond=120000), berlin):
            written = f'"{iso(moment)}"'
            self.assertEqual(encode_json({"t": moment_json(moment)}),
                             f'{{"t":{written}}}'.encode())
            # orjson refuses the lone surrogate: the standard library writes it all.
            self.assertEqual(encode_json({"t": moment_json(moment), "s": "\ud800"}),
                             f'{{"t":{written},"s":"\\ud800"}}'.encode())
            self.assertEqual(encode_json({"t": moment_json(moment), "n": 2**70}),
                             f'{{"t":{written},"n":{2**70}}}'.encode())
        self.assertEqual(iso(berlin), "2024-10-02T12:00:00.000005Z")
        self.assertIs(moment_json(utc), utc)  # left to the encoder
        self.assertIsNone(moment_json(None))
