"""A client built from seed 004's curl examples works against us with only the base URL and
the key changed: paths (typos included), headers and bodies exactly as the seed prints them.

The examples are embedded below as the seed prints them (a line break of the document is a
space); when the seed file is found beside the repository (`../shared/seeds/004_*.txt`), a
test checks that the embedded examples are exactly the ones the file holds. The endpoint
lines of the seed ("DELETE https://…/domains/{domain}") are run too, their placeholders
filled in. The two quarantine examples run against messages kept in the quarantine.
"""

from __future__ import annotations

import re
import shlex
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import update
from twisted.trial.unittest import TestCase

from mailcore.config import Config
from mailcore.gateway.quarantine import ToKeep
from mailcore.store.schema import quarantine
from tests.support.web import Web, header
from tests.test_invoices import PROFILE, pdf_text
from tests.test_web_protecmail_domains import build_web

SEED_BASE = "https://protecmail.com/api/v1"
SEED_KEY = "cdd4fc0a-2b4f-4336-90f8-77c72be60791"
REPO = Path(__file__).resolve().parent.parent

SEED_EXAMPLES = (
    '$ curl https://protecmail.com/api/v1/ping --header "Api-Key: cdd4fc0a-2b4f-4336-90f8-77c72be60791"',  # noqa: E501
    '$curl -vvv https://protecmail.com/api/v1/domain/example.tld/addresses --header "Api-Key: cdd4fc0a-2b4f-4336-90f8-77c72be60791"',  # noqa: E501
    '$ curl -vvv https://protecmail.com/api/v1/user --header "Api-Key: cdd4fc0a-2b4f-4336-90f8-77c72be60791"',  # noqa: E501
    '$ curl https://protecmail.com/api/v1/user --header "Api-Key: cdd4fc0a-2b4f-4336-90f8-77c72be60791" --header "Content-Type: application/json" --request PUT --data \'{"first_name":"John","last_name":"Doe","email":"john@doe.com","organisation":"jd unlimited","tva_intra":"FR454545","address":"69 avenue de le pie qui chante","city":"Paris","zip":"75010","country":"FR","phone":"+3365478945"}\'',  # noqa: E501
    '$ curl https://protecmail.com/api/v1/invoices --header "Api-Key: cdd4fc0a-2b4f-4336-90f8-77c72be60791"',  # noqa: E501
    '$ curl https://protecmail.com/api/v1/invoices/26589 --header "Api-Key: cdd4fc0a-2b4f-4336-90f8-77c72be60791"',  # noqa: E501
    '$ curl https://protecmail.com/api/v1/tanks --header "Api-Key: cdd4fc0a-2b4f-4336-90f8-77c72be60791"',  # noqa: E501
    '$ curl https://protecmail.com/api/v1/token/daily-average --header "Api-Key: cdd4fc0a-2b4f-4336-90f8-77c72be60791"',  # noqa: E501
    '$ curl -vvv https://protecmail.com/api/v1/domain/all --header "Api-Key: cdd4fc0a-2b4f-4336-90f8-77c72be60791"',  # noqa: E501
    '$ curl https://protecmail.com/api/v1/domain/protecmail.com --header "Api-Key: cdd4fc0a-2b4f-4336-90f8-77c72be60791"',  # noqa: E501
    '$ curl https://protecmail.com/api/v1/domais/protecmail.fr --header "Api-Key: cdd4fc0a-2b4f-4336-90f8-77c72be60791" --header "Content-Type: application/json" --request POST --data \'{ "domain": "protecmail.fr", "redirectTo": "aspmx.l.google.com", "spamAction": 0, "virusAction": 0, "sendResume": true }\'',  # noqa: E501
    '$ curl https://protecmail.com/api/v1/domain/protecmail.fr --header "Api-Key: cdd4fc0a-2b4f-4336-90f8-77c72be60791" --header "Content-Type: application/json" --request PUT --data \'{ "domain": "protecmail.fr", "redirectTo": "in.mail.protecmail.com", "spamAction": 0, "virusAction": 0, "sendResume": true }\'',  # noqa: E501
    '$ curl https://protecmail.com/api/v1/domain/protecmail.fr --header "Api-Key: cdd4fc0a-2b4f-4336-90f8-77c72be60791" --request DELETE',  # noqa: E501
    '$curl -vvv https://protecmail.com/api/v1/domain/example.tld/addresses --header "Api-Key: cdd4fc0a-2b4f-4336-90f8-77c72be60791"',  # noqa: E501
    '$ curl https://protecmail.com/api/v1/domain/protecmail.fr/addresses/postmaster --header "Api-Key: cdd4fc0a-2b4f-4336-90f8-77c72be60791" --request PUT',  # noqa: E501
    '$ curl https://protecmail.com/api/v1/domain/protecmail.fr/webmaster --header "Api-Key: cdd4fc0a-2b4f-4336-90f8-77c72be60791" --request DELETE',  # noqa: E501
    '$ curl https://protecmail.com/api/v1/quarantine/protecmail.fr/0/3 --header "Api-Key: cdd4fc0a-2b4f-4336-90f8-77c72be60791"',  # noqa: E501
    '$ curl https://protecmail.com/api/v1/quarantine/11062018225433918076 --header "Api-Key: cdd4fc0a-2b4f-4336-90f8-77c72be60791"',  # noqa: E501
)
# The endpoint lines of the seed, as printed.
SEED_ENDPOINTS = (
    "GET https://protecmail.com/api/v1/user",
    "PUT https://protecmail.com/api/v1/user",
    "GET https://protecmail.com/api/v1/invoices",
    "GET https://protecmail.com/api/v1/invoices/{reference}",
    "GET https://protecmail.com/api/v1/tolens",
    "GET https://protecmail.com/api/v1/token/daily-average",
    "GET https://protecmail.com/api/v1/domain/all",
    "GET https://protecmail.com/api/v1/domain/{domain}",
    "POST https://protecmail.com/api/v1/domain/{domain}",
    "PUT https://protecmail.com/api/v1/domain/{domain}",
    "DELETE https://protecmail.com/api/v1/domains/{domain}",
    "GET https://protecmail.com/api/v1/domain/{domain}/addresses",
    "PUT https://protecmail.com/api/v1/domain/{domain}/addresses/{adresse}",
    "DELETE https://protecmail.com/api/v1/domain/{domain}/addresses/{adresse}",
    "GET https://protecmail.com/api/v1/quarantine/{domaine ou adresse}/{start}/{number of records}",
    "GET https://protecmail.com/api/v1/quarantine/{ident}",
)
QUARANTINE = "/api/v1/quarantine/"
SEED_DOMAINS = ["protecmail.com", "protecmail.ch", "an.tisp.am", "wat.tf", "goto.pm",
                "truc.tech", "test.com"]
SEED_USER_FIELDS = {"nic", "first_name", "last_name", "email", "organisation", "tva_intra",
                    "address", "city", "zip", "country", "phone"}


@dataclass(frozen=True)
class CurlRequest:
    method: str
    url: str
    headers: dict[str, str]
    data: str | None

    @property
    def path(self) -> str:
        return self.url.removeprefix(SEED_BASE.removesuffix("/api/v1"))


def parse_curl(command: str) -> CurlRequest:
    """The request a seed curl command makes (the options the seed uses)."""
    words = shlex.split(command.removeprefix("$").strip())
    assert words[0] == "curl", command
    method, url, data = None, None, None
    headers: dict[str, str] = {}
    i = 1
    while i < len(words):
        word = words[i]
        if word in ("--header", "-H"):
            name, _, value = words[i + 1].partition(":")
            headers[name.strip()] = value.strip()
            i += 2
        elif word in ("--request", "-X"):
            method = words[i + 1]
            i += 2
        elif word in ("--data", "-d"):
            data = words[i + 1]
            i += 2
        elif word.startswith("-v"):
            i += 1
        else:
            assert url is None and word.startswith("https://"), command
            url = word
            i += 1
    assert url is not None, command
    return CurlRequest(method or ("POST" if data is not None else "GET"), url, headers, data)


def seed_examples_in(text: str) -> list[str]:
    """The curl commands of a seed text, each joined into one line."""
    commands: list[list[str]] = []
    current: list[str] | None = None
    for line in text.splitlines():
        if re.match(r"^\$ ?curl\b", line):
            current = [line]
            commands.append(current)
        elif current is not None:
            if line.startswith(("<", "{")):
                current = None
            else:
                current.append(line)
    return [" ".join(c) for c in commands]


def seed_file() -> Path | None:
    found = sorted((REPO.parent / "shared" / "seeds").glob("004_*.txt"))
    return found[0] if found else None


class SeedTextTests(TestCase):
    def test_the_embedded_examples_are_the_seeds(self) -> None:
        path = seed_file()
        if path is None:
            raise self.skipTest("seed 004 not found beside the repository")
        text = path.read_text(encoding="utf-8")
        self.assertEqual(tuple(seed_examples_in(text)), SEED_EXAMPLES)
        endpoints = [line for line in text.splitlines()
                     if re.match(r"^(GET|POST|PUT|DELETE) https://", line)]
        self.assertEqual(tuple(endpoints), SEED_ENDPOINTS)

    def test_every_example_parses(self) -> None:
        for command in SEED_EXAMPLES:
            request = parse_curl(command)
            self.assertEqual(request.headers["Api-Key"], SEED_KEY)
            self.assertTrue(request.url.startswith(SEED_BASE + "/"))


class SeedClientTests(TestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        self.web: Web = build_web(Config(sections={"billing": {"first_invoice_ref": 26589}}))
        core = self.web.core
        self.user = await core.identity.create_user("john", "john@doe.com", plan="standard",
                                                    **PROFILE)
        self.key = await self.web.credential(self.user)
        for name in SEED_DOMAINS:
            await core.domains.add(name, self.user.id, "in.mail.protecmail.com",
                                   send_resume=True)
        await core.domains.add("example.tld", self.user.id, "mx.example.tld")
        for local in ("postmaster", "john"):
            await core.domains.add_address("example.tld", local)
        self.invoice = await core.invoices.buy(self.user.id, 10_000, "60")
        await core.tokens.consume(self.user.id, 1263 * 30)

    async def send(self, request: CurlRequest) -> tuple[int, dict[str, list[str]], Any]:
        """The seed's request with only the base URL and the key changed."""
        headers = {name: (self.key if value == SEED_KEY else value)
                   for name, value in request.headers.items()}
        kwargs: dict[str, Any] = {"headers": headers}
        if request.data is not None:
            kwargs["data"] = request.data.encode("utf-8")
        return await self.web.call(request.method, request.path, **kwargs)  # BASE + path

    def envelope(self, reply: Any, request: CurlRequest) -> dict[str, Any]:
        self.assertIsInstance(reply, dict, request)
        uuid.UUID(reply["request_id"])
        self.assertIs(reply["success"], True, (request, reply))
        result: dict[str, Any] = reply
        return result

    async def prepare(self, request: CurlRequest) -> None:
        """The state an example presumes (the seed's examples are not one session)."""
        domains = self.web.core.domains
        if request.path.startswith("/api/v1/domain/protecmail.fr/") and (
            await domains.get("protecmail.fr") is None
        ):
            await domains.add("protecmail.fr", self.user.id, "in.mail.protecmail.com")
        if request.path.endswith("/webmaster"):
            await domains.add_address("protecmail.fr", "webmaster")

    async def check(self, request: CurlRequest) -> None:
        await self.prepare(request)
        status, headers, reply = await self.send(request)
        self.assertEqual(status, 200, (request, reply))
        path = request.path
        if path == "/api/v1/invoices/26589":
            self.assertEqual(header(headers, "Content-Type"), "application/pdf")
            text = await pdf_text(self, reply)
            self.assertIn("Invoice 26589", text)
            self.assertIn("60.00 EUR", text)
            return
        body = self.envelope(reply, request)
        data: Any = body.get("data")
        if path == "/api/v1/ping":
            self.assertEqual(body["msg"], "pong")
        elif path == "/api/v1/domain/example.tld/addresses":
            self.assertEqual(sorted(data), ["john", "postmaster"])
        elif path == "/api/v1/user" and request.method == "GET":
            self.assertEqual(set(data), SEED_USER_FIELDS)
        elif path == "/api/v1/user":
            user = await self.web.core.identity.get_user(self.user.id)
            assert user is not None
            self.assertEqual(user.address, "69 avenue de le pie qui chante")
        elif path == "/api/v1/invoices":
            self.assertEqual(data, [{"ref": 26589, "date": "2023-11-14T22:13:20+00:00",
                                     "total": 60}])
        elif path == "/api/v1/tanks":
            # standard's 50000 monthly tokens minus 30 days of 1263, and the 10000 bought
            self.assertEqual(data, {"monthly": 50_000 - 1263 * 30, "perm": 10_000,
                                    "total": 60_000 - 1263 * 30})
        elif path == "/api/v1/token/daily-average":
            self.assertEqual(data, 1263)
        elif path == "/api/v1/domain/all":
            self.assertTrue(set(SEED_DOMAINS) <= set(data), data)
        elif path == "/api/v1/domain/protecmail.com":
            self.assertEqual(data, {"domain": "protecmail.com",
                                    "redirectTo": "in.mail.protecmail.com", "spamAction": 0,
                                    "virusAction": 0, "sendResume": True})
        elif path == "/api/v1/domais/protecmail.fr":
            self.assertEqual(set(body), {"request_id", "success"})
            found = await self.web.core.domains.get("protecmail.fr", owner_id=self.user.id)
            assert found is not None
            self.assertEqual(found.redirect_to, "aspmx.l.google.com")
        elif path == "/api/v1/domain/protecmail.fr" and request.method == "PUT":
            found = await self.web.core.domains.get("protecmail.fr", owner_id=self.user.id)
            assert found is not None
            self.assertEqual(found.redirect_to, "in.mail.protecmail.com")
        elif path == "/api/v1/domain/protecmail.fr" and request.method == "DELETE":
            self.assertIsNone(await self.web.core.domains.get("protecmail.fr"))
        elif path.endswith("/addresses/postmaster"):
            self.assertIn("postmaster",
                          await self.web.core.domains.list_addresses("protecmail.fr"))
        elif path.endswith("/webmaster"):
            self.assertNotIn("webmaster",
                             await self.web.core.domains.list_addresses("protecmail.fr"))
        else:
            self.fail(f"no check for {request}")

    async def test_every_curl_example_works_with_the_base_url_and_key_changed(self) -> None:
        ran = 0
        for command in SEED_EXAMPLES:
            request = parse_curl(command)
            if request.path.startswith(QUARANTINE):
                continue
            await self.check(request)
            ran += 1
        self.assertEqual(ran, 16)

    async def test_every_endpoint_line_works_with_its_placeholders_filled(self) -> None:
        values = {"reference": str(self.invoice.ref), "domain": "protecmail.fr",
                  "adresse": "postmaster"}
        bodies = {"POST": b'{"redirectTo": "mx.example.net"}', "PUT": b"{}"}
        for line in SEED_ENDPOINTS:
            method, url = line.split(" ", 1)
            path = url.removeprefix(SEED_BASE.removesuffix("/api/v1"))
            if path.startswith(QUARANTINE):
                continue
            path = re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], path)
            domains = self.web.core.domains
            exists = await domains.get("protecmail.fr") is not None
            if method == "POST" and exists:
                await domains.remove("protecmail.fr")
            elif method != "POST" and "protecmail.fr" in path and not exists:
                await domains.add("protecmail.fr", self.user.id, "mx.example.net")
            if method == "PUT" and path.endswith("/addresses/postmaster"):
                kwargs: dict[str, Any] = {}
            else:
                kwargs = {"data": bodies.get(method, b"")}
            status, headers, reply = await self.web.call(
                method, path,
                headers={"Api-Key": self.key, "Content-Type": "application/json"}, **kwargs,
            )
            self.assertEqual(status, 200, (line, reply))
            if path.startswith("/api/v1/invoices/"):
                self.assertEqual(header(headers, "Content-Type"), "application/pdf")
            else:
                self.assertIs(reply["success"], True, line)
            if path == "/api/v1/domains/protecmail.fr":
                self.assertIsNone(await domains.get("protecmail.fr"))

    async def test_the_quarantine_examples(self) -> None:
        paths = [parse_curl(c).path for c in SEED_EXAMPLES]
        self.assertEqual([p for p in paths if p.startswith(QUARANTINE)],
                         ["/api/v1/quarantine/protecmail.fr/0/3",
                          "/api/v1/quarantine/11062018225433918076"])
        core = self.web.core
        dom = await core.domains.add("protecmail.fr", self.user.id, "in.mail.protecmail.com")
        for n in range(4):
            [ident] = await core.quarantine.keep(
                [ToKeep(f"Q{n}", "CanadaExOhrcp@www.Hlawatschek.de", "xxxx@protecmail.fr",
                        dom.id, "spam", "spam: score=1000.0")],
                b"Subject: Check quality\r\n\r\nbuy\r\n",
            )
            self.web.clock.advance(60)
        await core.db.run("seed ident", lambda c: c.execute(
            update(quarantine).where(quarantine.c.ident == ident)
            .values(ident="11062018225433918076")))
        listing, release = (parse_curl(c) for c in SEED_EXAMPLES
                            if parse_curl(c).path.startswith(QUARANTINE))
        status, _, reply = await self.send(listing)
        self.assertEqual(status, 200)
        data = self.envelope(reply, listing)["data"]
        self.assertEqual((data["count"], data["nb_pages"], data["current_page"]), (4, 2, 1))
        self.assertEqual(data["emails"][0]["ident"], "11062018225433918076")
        self.assertEqual(set(data["emails"][0]), {"date", "email", "domain", "mailfrom",
                                                  "subject", "ident"})
        status, _, reply = await self.send(release)
        self.assertEqual(status, 200)
        self.assertEqual(set(self.envelope(reply, release)), {"request_id", "success"})
