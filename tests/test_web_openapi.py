"""The OpenAPI document lists exactly the routes that are served, generated from the route
declarations of every app."""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
from typing import Any

from klein import Klein
from twisted.trial.unittest import TestCase
from twisted.web.iweb import IRequest

from tests.support.oauth import access_token
from tests.support.web import Web
from web import dropmyemail as web_dropmyemail
from web import dropmyemail_jobs as web_dropmyemail_jobs
from web import mailapi as web_mailapi
from web import safedrop as web_safedrop
from web.api import ApiApp
from web.auth import PROTECMAIL
from web.errors import PlainErrors
from web.imap2api import app as imap2api_app
from web.imap2api import pages as imap2api_pages
from web.imap2api import queries as imap2api_queries
from web.meta import MetaApp
from web.openapi import Reply, RouteTable, document, openapi_path
from web.parsing import query_params
from web.settings import WebSettings

IGNORED_METHODS = {"HEAD", "OPTIONS"}  # HEAD: where Werkzeug adds it to a GET rule


def served_operations(apps: Any) -> set[tuple[str, str]]:
    """(OpenAPI path, method) of every Klein rule of every app."""
    served = set()
    for app in apps:
        for rule in app.app.url_map.iter_rules():
            path, _ = openapi_path(rule.rule)
            methods = set(rule.methods or ())
            ignored = IGNORED_METHODS if "GET" in methods else IGNORED_METHODS - {"HEAD"}
            for method in methods - ignored:
                served.add((path, method.lower()))
    return served


def documented_operations(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (path, method)
        for path, item in doc["paths"].items()
        for method in item
        if method != "parameters"
    }


class CompletenessTests(TestCase):
    async def test_every_served_route_is_documented_and_nothing_else(self) -> None:
        web = Web.build()
        status, _, doc = await web.call("GET", "/openapi.json")
        self.assertEqual(status, 200)
        self.assertEqual(doc["openapi"], "3.1.0")
        served = served_operations(web.root.apps.values())
        self.assertEqual(documented_operations(doc), served)
        for expected in [
            ("/api-token-auth/", "post"), ("/api/v1/auth/", "post"),
            ("/api/v1/ping", "get"), ("/api/v1/user", "get"), ("/api/v1/user", "put"),
            ("/", "get"), ("/auth", "get"), ("/metrics", "get"), ("/openapi.json", "get"),
        ]:
            self.assertIn(expected, served)

    async def test_the_document_is_made_once(self) -> None:
        """The routes are fixed once the apps are built: the document is made and encoded
        the first time it is asked for and kept (it took the reactor 20-50 ms a request),
        its HEAD answering the same length."""
        web = Web.build()
        meta = web.root.apps["meta"]
        assert isinstance(meta, MetaApp)
        made = []
        make = meta.openapi

        def counting() -> dict[str, Any]:
            made.append(1)
            return make()

        meta.openapi = counting
        first = await web.call("GET", "/openapi.json")
        second = await web.call("GET", "/openapi.json")
        self.assertEqual((first[0], second[0]), (200, 200))
        self.assertEqual(first[2], second[2])
        self.assertEqual(len(made), 1)
        head = await web.call("HEAD", "/openapi.json")
        self.assertEqual(head[0], 200)
        self.assertEqual(len(made), 1)

    async def test_a_reply_with_two_bodies_documents_both(self) -> None:
        """`GET /dropbundles/ID?send` answers `200 text/plain` `OK` where the same route
        shows a bundle as JSON; the fuzz test (schemathesis) failed a send that worked as
        an undocumented Content-Type."""
        web = Web.build()
        _, _, doc = await web.call("GET", "/openapi.json")
        content = doc["paths"]["/dropbundles/{bundle_id}"]["get"]["responses"]["200"]["content"]
        self.assertEqual(sorted(content), ["application/json", "text/plain"])
        self.assertEqual(content["text/plain"]["schema"], {"type": "string", "enum": ["OK"]})

    async def test_operations_are_well_formed(self) -> None:
        web = Web.build()
        _, _, doc = await web.call("GET", "/openapi.json")
        schemes = doc["components"]["securitySchemes"]
        ids = []
        for item in doc["paths"].values():
            for method, op in item.items():
                if method == "parameters":
                    continue
                ids.append(op["operationId"])
                self.assertTrue(op["summary"])
                self.assertIn("500", op["responses"])
                for requirement in op.get("security", []):
                    for name in requirement:
                        self.assertIn(name, schemes)
        self.assertEqual(len(ids), len(set(ids)))
        ping = doc["paths"]["/api/v1/ping"]["get"]
        self.assertEqual(ping["security"], [{"protecmailApiKey": []}])
        self.assertIn("401", ping["responses"])
        put_user = doc["paths"]["/api/v1/user"]["put"]
        self.assertIn("application/json", put_user["requestBody"]["content"])
        self.assertIn("409", put_user["responses"])
        login = doc["paths"]["/api-token-auth/"]["post"]
        self.assertEqual(
            set(login["requestBody"]["content"]),
            {"application/json", "application/x-www-form-urlencoded", "multipart/form-data"},
        )
        safedrop = doc["paths"]["/auth"]["get"]
        self.assertEqual(
            safedrop["security"],
            [{"safedropUser": [], "safedropApiKey": []}, {"safedropToken": []}],
        )

    async def test_the_mail_api_login_documents_its_api_key(self) -> None:
        """`POST /api/v1/auth/` reads an application api_key from its body, its query or
        `Api-Key` (required with `[mailapi] require_api_key`, else 403): the document named
        only username and password, so a client had no way to learn where to send it."""
        web = Web.build()
        _, _, doc = await web.call("GET", "/openapi.json")
        login = doc["paths"]["/api/v1/auth/"]["post"]
        self.assertEqual([p["name"] for p in login["parameters"]], ["api_key"])
        for content in login["requestBody"]["content"].values():
            self.assertIn("api_key", content["schema"]["properties"])
        self.assertIn("403", login["responses"])
        self.assertIn("Api-Key", doc["paths"]["/api/v1/auth/"]["head"]["description"])

    async def test_every_status_a_handler_raises_is_documented(self) -> None:
        """An `ApiError(status, …)` or `PageError(status, …)` written in a route's own
        handler is among its documented replies. `GET /api/v1/quarantine/{ident}` answered
        403 (the account disabled) and 503 (the release could not be queued) that its
        document did not list, and the fuzz test cannot bring either about."""
        web = Web.build()
        _, _, doc = await web.call("GET", "/openapi.json")
        checked = 0
        for app in web.root.apps.values():
            for spec in app.routes.specs:
                source = textwrap.dedent(inspect.getsource(getattr(type(app), spec.name)))
                raised = {
                    node.args[0].value for node in ast.walk(ast.parse(source))
                    if isinstance(node, ast.Call) and node.args
                    and getattr(node.func, "id", None) in ("ApiError", "PageError")
                    and isinstance(node.args[0], ast.Constant)
                }
                checked += len(raised)
                for path in spec.paths:
                    for method in spec.methods:
                        responses = doc["paths"][openapi_path(path)[0]][method.lower()][
                            "responses"]
                        for status in raised:
                            self.assertIn(str(status), responses, (method, path))
        self.assertGreater(checked, 30)

    async def test_every_query_parameter_a_route_reads_is_documented(self) -> None:
        """Each GET route is called with every API's credential, and the names it looks up
        in its query string (web.parsing.query_params, the IMAP2API's drf_query) are among
        its documented parameters (`thread`, read and checked on /api/emails/threads/ too,
        was documented only on /api/emails/). Credentials in the query are the security
        schemes' business."""
        web = Web.build()
        user = await web.user()
        api_key = await web.credential(user, "apikey")
        token = await web.credential(user, "token")
        bearer = await access_token(web.core.oauth, user.id)
        _, headers, _ = await web.call(
            "GET", "/auth", headers={"X-Auth-User": user.email, "X-Auth-Key": api_key})
        credentials = {
            "imap2api": {"Authorization": f"Token {token}"}, "mailapi": {"Auth-Key": token},
            "protecmail": {"Api-Key": api_key},
            "safedrop": {"X-Auth-Token": headers["x-auth-token"][0]},
            "dropmyemail": {"Authorization": f"Bearer {bearer}"},
        }
        read: set[str] = set()

        class Recorded(dict[str, str]):
            def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
                read.add(key)
                return super().get(key, default)

            def __getitem__(self, key: str) -> str:
                read.add(key)
                return super().__getitem__(key)

            def __contains__(self, key: object) -> bool:
                read.add(str(key))
                return super().__contains__(key)

        def recorded(request: IRequest) -> dict[str, str]:
            return Recorded(query_params(request))

        for module in (web_dropmyemail, web_dropmyemail_jobs, web_mailapi, web_safedrop):
            self.patch(module, "query_params", recorded)
        for module in (imap2api_app, imap2api_pages, imap2api_queries):  # the DRF reading
            self.patch(module, "drf_query", recorded)
        _, _, doc = await web.call("GET", "/openapi.json")
        calls = 0
        for path, item in doc["paths"].items():
            if "get" not in item:
                continue
            op = item["get"]
            read.clear()
            await web.call("GET", re.sub(r"\{[^}]+\}", "1", path) + "?query=x",
                           headers=credentials.get(op["tags"][0], {}))
            calls += bool(read)
            documented = {p["name"] for p in op.get("parameters", [])}
            self.assertEqual(read - documented, set(), path)
        self.assertGreater(calls, 20)

    async def test_integer_query_bounds_are_the_ones_the_routes_keep(self) -> None:
        """Each integer query parameter documented with a maximum takes it and answers
        one more with a 400 (Dropmyemail's `page` took up to 2^31 with no maximum
        documented); IMAP2API's `page_size` and `page` say what DRF makes of other values."""
        web = Web.build()
        user = await web.user()
        bearer = {"Authorization": f"Bearer {await access_token(web.core.oauth, user.id)}"}
        _, _, doc = await web.call("GET", "/openapi.json")
        params = {p["name"]: p["schema"] for p in
                  doc["paths"]["/v1/accounts/{account_id}/contacts"]["get"]["parameters"]}
        self.assertEqual((params["page"]["maximum"], params["per_page"]["maximum"]),
                         (2**31, 40))
        for name, schema in params.items():
            if "maximum" not in schema:
                continue
            for value, expected in ((schema["maximum"], 404), (schema["maximum"] + 1, 400)):
                status, _, body = await web.call(
                    "GET", f"/v1/accounts/1/contacts?{name}={value}", headers=bearer)
                self.assertEqual(status, expected, (name, value, body))
        emails = {p["name"]: p["schema"] for p in
                  doc["paths"]["/api/emails/"]["get"]["parameters"]}
        self.assertIn("is the default", emails["page_size"]["description"])
        self.assertIn('404 "Invalid page."', emails["page"]["description"])

    async def test_every_rate_limited_operation_documents_its_429(self) -> None:
        web = Web.build()
        _, _, doc = await web.call("GET", "/openapi.json")
        limited = [(path, method, op) for path, item in doc["paths"].items()
                   for method, op in item.items() if method != "parameters"
                   and op["tags"][0] in ("protecmail", "mailapi", "safedrop")]
        self.assertGreater(len(limited), 40)
        for path, method, op in limited:
            self.assertIn("429", op["responses"], (path, method))
            self.assertEqual(
                set(op["responses"]["429"]["headers"]),
                {"Retry-After", "X-RateLimit-Limit", "X-RateLimit-Remaining",
                 "X-RateLimit-Reset"}, (path, method))

    def test_a_new_route_appears_without_further_work(self) -> None:
        class Later(ApiApp):
            name = "later"
            title = "a later issue's app"
            shape = PlainErrors()
            app = Klein()
            routes = RouteTable(app, "later")

            @routes.route(["/api/v1/domain/<domain>/addresses/<int:n>",
                           "/api/v1/domains/<domain>/addresses/<int:n>"],
                          ["GET", "DELETE"], summary="an address", auth=PROTECMAIL)
            def address(self, request: IRequest, domain: str, n: int) -> bytes:
                return b""

        app = Later(WebSettings())
        doc = document([app], title="t", version="1")
        self.assertEqual(documented_operations(doc), served_operations([app]))
        item = doc["paths"]["/api/v1/domain/{domain}/addresses/{n}"]
        self.assertEqual(
            item["parameters"],
            [{"name": "domain", "in": "path", "required": True, "schema": {"type": "string"}},
             {"name": "n", "in": "path", "required": True,
              "schema": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}}],
        )
        self.assertEqual(item["get"]["security"], [{"protecmailApiKey": []}])

    async def test_a_download_documents_its_content_type(self) -> None:
        """The Mail API's attachment download was declared `application/octet-stream` with
        no schema, and the document showed a 200 with no body at all."""
        web = Web.build()
        _, _, doc = await web.call("GET", "/openapi.json")
        reply = doc["paths"]["/api/v1/mail/{mail_id}/attachments/{index}"]["get"][
            "responses"]["200"]
        self.assertEqual(reply["content"], {"application/octet-stream": {
            "schema": {"type": "string", "format": "binary"}}})
        self.assertRaises(ValueError, Reply, "bytes", None, "application/pdf")

    def test_a_path_and_method_declared_twice_is_refused(self) -> None:
        class Twice(ApiApp):
            name = "twice"
            title = "twice"
            shape = PlainErrors()
            app = Klein()
            routes = RouteTable(app, "twice")

            @routes.route("/x", "GET", summary="one")
            def one(self, request: IRequest) -> bytes:
                return b""

            @routes.route("/x", "GET", summary="two")
            def two(self, request: IRequest) -> bytes:
                return b""

        self.assertRaises(ValueError, document, [Twice(WebSettings())], title="t", version="1")
